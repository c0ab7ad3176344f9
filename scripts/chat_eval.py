"""
Evaluate a chat model (mid, SFT or RL checkpoint) on the chat tasks and report ChatCORE.

Each accuracy is printed as "80.1 ± 2.5 (n=256, base 59.0)": percent, one standard error, the number of problems
and the baseline of answering without reading the question; a "*" marks one within two standard errors of its
baseline (nanochat/chat_eval.py says how tasks are scored). The test split is reported by default; tune on
--split=val. --calculator=off scores the model without its tool. Results go to the report section
"Chat evaluation <source>" (" val" / " no calculator" appended for those runs, which the summary table leaves out).

Usage:
    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100
    python -m scripts.chat_eval -i sft -a SpellingBee --split=val --calculator=off
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft -a GSM8K -n 8 -t 1.0
Offline, point the tasks at a local copy of the data: NANOCHAT_DATA_DIR=data/tasks python -m scripts.chat_eval -i sft
"""

import argparse
import time

from nanochat.chat_eval import CHATCORE_BASELINES, SPLITS, TASKS, chatcore, score_chat_task
from nanochat.checkpoint_manager import load_model
from nanochat.common import UserError, compute_cleanup, compute_init, print0
from nanochat.engine import Engine
from nanochat.report import NEAR_BASELINE_LEGEND, get_report
from tasks.arc import eval_split
from tasks.common import local_data_dir

parser = argparse.ArgumentParser(description="Evaluate a chat model on the chat tasks (see the docstring).")
parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"],
                    help="which checkpoints to load")
parser.add_argument("-a", "--task_name", default=None,
                    help=f"tasks separated by '|' (default: the six ChatCORE tasks, those with the split); any of "
                         f"{', '.join(TASKS)}")
parser.add_argument("--split", default="test", choices=SPLITS, help="test (reported) or val (to tune on)")
parser.add_argument("--calculator", default="on", choices=["on", "off"],
                    help="off: the model's python blocks are not run and nothing is forced into its replies")
parser.add_argument("-t", "--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
parser.add_argument("-m", "--max_new_tokens", type=int, default=512, help="tokens per completion at most")
parser.add_argument("-n", "--num_samples", type=int, default=1, help="completions per problem (pass@n)")
parser.add_argument("-k", "--top_k", type=int, default=50, help="sample among the k likeliest tokens")
parser.add_argument("-b", "--batch_size", type=int, default=8, help="prompts per forward (categorical tasks)")
parser.add_argument("--gen_batch", type=int, default=32,
                    help="completions decoded together across problems and samples (generative tasks)")
parser.add_argument("-g", "--model_tag", default=None, help="checkpoint directory (default: the largest model)")
parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the last)")
parser.add_argument("-x", "--max_problems", type=int, default=None, help="problems per task at most")
parser.add_argument("--device_type", default="", help="cuda | cpu | mps; empty = autodetect")
args = parser.parse_args()
if args.task_name is None:
    task_names = [name for name in CHATCORE_BASELINES if args.split in TASKS[name]]
else:
    task_names = [name.strip() for name in args.task_name.split("|") if name.strip()]
for name in task_names:
    if name not in TASKS:
        raise UserError(f"-a {args.task_name!r}: unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    if args.split not in TASKS[name]:
        raise UserError(f"-a {args.task_name!r}: {name} has no {args.split} split; leave it out")
for flag, value in (("-b", args.batch_size), ("-n", args.num_samples), ("-m", args.max_new_tokens),
                    ("-x", args.max_problems), ("--gen_batch", args.gen_batch)):
    if value is not None and value < 1:
        raise UserError(f"{flag} {value}: must be at least 1")

is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
engine = Engine(model, tokenizer, calculator=args.calculator == "on")  # off: python blocks are not run
print0(f"Model: {args.source} step {meta['step']} | {args.split} split | calculator {args.calculator} | "
       f"tasks: {', '.join(task_names)}")

# -----------------------------------------------------------------------------
# Evaluate

scores, seconds = {}, {}
for task_name in task_names:
    t0 = time.time()
    scores[task_name] = score_chat_task(task_name, model, tokenizer, engine, split=args.split,
                                        batch_size=args.batch_size, num_samples=args.num_samples,
                                        max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_k=args.top_k, max_problems=args.max_problems, gen_batch=args.gen_batch)
    seconds[task_name] = time.time() - t0
    print0(f"{task_name}: {scores[task_name]} ({seconds[task_name]:.1f}s)")
    if scores[task_name].notes:
        print0(f"  {scores[task_name].notes}")
near_baseline = [name for name, score in scores.items() if score.near_baseline]
if near_baseline:
    print0(NEAR_BASELINE_LEGEND)
chatcore_metric = chatcore({name: score.accuracy for name, score in scores.items()})
if chatcore_metric is not None:
    print0(f"ChatCORE: {chatcore_metric:.4f}")

# -----------------------------------------------------------------------------
# Report

section = f"Chat evaluation {args.source}" + (" val" if args.split == "val" else "") + \
    (" no calculator" if args.calculator == "off" else "")
get_report().log(section=section, data=[
    vars(args),
    {"Model": f"{args.source} step {meta['step']}",
     "Data": f"local copy {local_data_dir()}" if local_data_dir() else "Hugging Face hub"},
    "", "Accuracy in percent ± one standard error (n = problems, base = baseline: chance for ARC and MMLU, the best "
    "constant answer for GSM8K, SpellingBee and SimpleSpelling, 0 for HumanEval, where no constant reply passes):", "",
    {name: str(score) for name, score in scores.items()},
    {"ChatCORE": f"{chatcore_metric:.4f}"} if chatcore_metric is not None else
    "ChatCORE: not computed (needs all six of " + ", ".join(CHATCORE_BASELINES) + ")",
    *([NEAR_BASELINE_LEGEND] if near_baseline else []),
    *[f"{name}: {score.notes}" for name, score in scores.items() if score.notes],
    *[f"{name} scored on its {eval_split(name)} split" for name in scores
      if name.startswith("ARC") and args.split == "test"],
    "", "Evaluation time: " + ", ".join(f"{name} {s:.1f}s" for name, s in seconds.items()),
])
compute_cleanup()
