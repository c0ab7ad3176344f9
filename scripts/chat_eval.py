"""
Evaluate a chat model (mid, SFT or RL checkpoint) on the chat tasks and report ChatCORE.

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) are scored without sampling: the prompts of a batch go through
one forward, and the answer is the letter whose token has the highest logit at the last prompt position. Generative
tasks (GSM8K, HumanEval, SpellingBee, SimpleSpelling) sample num_samples completions per problem (calculator tool
included) and pass if any is correct (pass@k); the completions of all problems share --gen_batch decoder rows, a
finished row taking the next (problem, sample) at once, since one problem's samples alone would leave the batch
mostly idle. ChatCORE is the mean over the six ChatCORE tasks of (accuracy - baseline) / (1 - baseline), baseline
0.25 for the four-choice tasks and 0 for the others; it is reported only when all six ran. Results go to the report
section "Chat evaluation <source>". Runs alone or under torchrun (ranks take every world_size-th problem; the counts
are summed). Which split each task is scored on: tasks/common.py.

Usage:
    python -m scripts.chat_eval -i sft
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" -x 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft -a GSM8K -n 8 -t 1.0
Offline, point the tasks at a local copy of the data: NANOCHAT_DATA_DIR=data/tasks python -m scripts.chat_eval -i sft
"""

import argparse
import time
from collections import deque
from functools import partial

import torch
import torch.distributed as dist

from nanochat.common import UserError, compute_cleanup, compute_init, get_dist_info, print0
from nanochat.checkpoint_manager import load_model
from nanochat.engine import BatchDecoder, Engine
from nanochat.report import get_report
from tasks.arc import ARC, eval_split
from tasks.common import local_data_dir
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SimpleSpelling, SpellingBee

# The score a model gets by guessing; ChatCORE centres each task on it
CHATCORE_BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0,
                      "SpellingBee": 0.0}
TASKS = {
    "ARC-Easy": lambda **kw: ARC("ARC-Easy", eval_split("ARC-Easy"), **kw),
    "ARC-Challenge": lambda **kw: ARC("ARC-Challenge", eval_split("ARC-Challenge"), **kw),
    "MMLU": partial(MMLU, "all", "test"),
    "GSM8K": partial(GSM8K, "main", "test"),
    "HumanEval": HumanEval,
    "SpellingBee": partial(SpellingBee, 256, "test"),
    "SimpleSpelling": partial(SimpleSpelling, 256, "test"),  # a warm-up check, not part of ChatCORE
}


def make_task(task_name, max_problems=None):
    """The evaluation task called task_name, cut to its first max_problems problems (already shuffled)."""
    if task_name not in TASKS:
        raise UserError(f"unknown task {task_name!r}; the tasks are {', '.join(TASKS)}")
    return TASKS[task_name](stop=max_problems)


def all_reduce_counts(num_passed, total, device):
    """Sum the per-rank counts over all ranks (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return num_passed, total
    counts = torch.tensor([num_passed, total], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return counts[0].item(), counts[1].item()


def letter_token_ids(tokenizer, letters):
    """The token id of each answer letter; each must be one token, as the assistant's answer is."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens with this tokenizer; categorical "
                             f"scoring needs one token per letter")
        ids.append(encoded[0])
    return ids


@torch.no_grad()
def categorical_predictions(model, tokenizer, conversations, batch_size):
    """The predicted letter of each conversation: the letter whose token has the highest logit after the prompt.
    Prompts of a batch are right-padded and go through one forward; padding sits after each prompt's last token,
    so causal attention keeps it out of that position's logits."""
    device = model.get_device()
    pad_id = tokenizer.get_bos_token_id()
    predictions = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in batch]
        max_len = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([prompt + [pad_id] * (max_len - len(prompt)) for prompt in prompts],
                           dtype=torch.long, device=device)  # (B, T)
        first = min(len(prompt) for prompt in prompts) - 1  # the earliest position read: no logits before it
        logits = model(ids, logits_from=first)  # (B, T - first, V)
        for row, (conversation, prompt) in enumerate(zip(batch, prompts)):
            letters = conversation["letters"]
            letter_logits = logits[row, len(prompt) - 1 - first, letter_token_ids(tokenizer, letters)]  # (num_letters,)
            predictions.append(letters[letter_logits.argmax().item()])
    return predictions


def run_categorical_eval(task, model, tokenizer, batch_size=8):
    """(num_passed, total) over this rank's share of the task (every world_size-th problem)."""
    _, rank, _, world_size = get_dist_info()
    conversations = [task[i] for i in range(rank, len(task), world_size)]
    predictions = categorical_predictions(model, tokenizer, conversations, batch_size)
    num_passed = sum(task.evaluate(conversation, letter) for conversation, letter in zip(conversations, predictions))
    return num_passed, len(conversations)


def decide_problems(engine, prompts, is_correct, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                    gen_batch=32, seed=42):
    """Yield (problem, passed) for each prompt as soon as it is decided: passed once is_correct(problem, completion)
    holds for one of its num_samples completions (its other samples are then dropped), failed once all are wrong.

    The (problem, sample) pairs share gen_batch decoder rows, a finished row taking the next pair at once, so the
    work is batched across problems instead of within one. A completion is the generated tokens with the calculator's
    forced ones, the stop token left out, as in Engine.generate_batch; greedy completions are the ones generate_batch
    gives (up to float rounding of batched matmuls). Sample s of every problem is seeded with seed + s, so sampled
    completions do not depend on gen_batch, the rank or the other problems (they are not generate_batch's, whose
    samples of a prompt share one generator)."""
    if not prompts:
        return
    # Room for the longest prompt and its reply, as generate_batch allocates per prompt (the rotary table is the limit)
    max_seq_len = min(max(len(prompt) for prompt in prompts) + max_new_tokens, engine.model.rotary_seq_len)
    decoder = BatchDecoder(engine.model, engine.tokenizer, min(gen_batch, len(prompts) * num_samples), max_seq_len)
    waiting = deque((problem, sample) for problem in range(len(prompts)) for sample in range(num_samples))
    samples_left = [num_samples] * len(prompts)  # 0 = decided
    rows = {}  # row_id -> (problem, its completion so far)
    while waiting or rows:
        while waiting and decoder.num_free:
            problem, sample = waiting.popleft()
            if samples_left[problem]:
                row_id = decoder.add(prompts[problem], max_new_tokens, temperature, top_k, seed + sample)
                rows[row_id] = (problem, [])
        for event in decoder.step():
            if event.row_id not in rows:  # a sibling sample passed earlier in this step and dropped it
                continue
            problem, completion = rows[event.row_id]
            if event.finish_reason != "stop":  # the stop token ends the reply but is not part of it
                completion.append(event.token)
            if not event.finished:
                continue
            del rows[event.row_id]
            if is_correct(problem, completion):
                samples_left[problem] = 0
                for row_id in [row_id for row_id, (other, _) in rows.items() if other == problem]:
                    decoder.remove(row_id)
                    del rows[row_id]
                yield problem, True
            else:
                samples_left[problem] -= 1
                if samples_left[problem] == 0:
                    yield problem, False


def run_generative_eval(task, tokenizer, engine, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                        gen_batch=32):
    """(num_passed, total) over this rank's share of the task: a problem passes when any of its num_samples
    completions is correct (pass@num_samples). gen_batch completions are decoded together (decide_problems)."""
    _, rank, _, world_size = get_dist_info()
    conversations = [task[i] for i in range(rank, len(task), world_size)]
    prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]

    def is_correct(problem, completion):
        return task.evaluate(conversations[problem], tokenizer.decode(completion))

    num_passed = total = 0
    for _, passed in decide_problems(engine, prompts, is_correct, num_samples, max_new_tokens, temperature, top_k,
                                     gen_batch):
        num_passed += passed
        total += 1
        if total % 50 == 0:  # long generative runs (GSM8K: 1319 problems) show that they are moving
            print0(f"  {type(task).__name__}: {num_passed}/{total} passed on rank 0 so far")
    return num_passed, total


def run_chat_eval(task_name, model, tokenizer, engine, batch_size=8, num_samples=1, max_new_tokens=512,
                  temperature=0.0, top_k=50, max_problems=None, gen_batch=32):
    """Accuracy of the model on one task (over all ranks), in [0, 1]."""
    task = make_task(task_name, max_problems)
    if task.eval_type == "categorical":
        num_passed, total = run_categorical_eval(task, model, tokenizer, batch_size)
    else:
        num_passed, total = run_generative_eval(task, tokenizer, engine, num_samples, max_new_tokens, temperature,
                                                top_k, gen_batch)
    num_passed, total = all_reduce_counts(num_passed, total, model.get_device())
    if total == 0:
        raise UserError(f"{task_name}: no problems to evaluate (max_problems={max_problems})")
    return num_passed / total


def load_engine(model, tokenizer):
    """The sampler of the generative tasks (chat_sft and chat_rl build theirs here too)."""
    return Engine(model, tokenizer)


def chatcore(results):
    """Mean centred accuracy over the six ChatCORE tasks, or None unless all six are in results."""
    if not all(name in results for name in CHATCORE_BASELINES):
        return None
    centred = [(results[name] - base) / (1.0 - base) for name, base in CHATCORE_BASELINES.items()]
    return sum(centred) / len(centred)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Evaluate a chat model on the chat tasks (see the docstring).")
    parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"],
                        help="which checkpoints to load")
    parser.add_argument("-a", "--task_name", default="|".join(CHATCORE_BASELINES),
                        help=f"tasks separated by '|' (default: the six ChatCORE tasks); any of {', '.join(TASKS)}")
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
    task_names = [name.strip() for name in args.task_name.split("|") if name.strip()]
    for name in task_names:
        if name not in TASKS:
            raise UserError(f"-a {args.task_name!r}: unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    for flag, value, low in (("-b", args.batch_size, 1), ("-n", args.num_samples, 1), ("-m", args.max_new_tokens, 1),
                             ("-x", args.max_problems, 1), ("--gen_batch", args.gen_batch, 1)):
        if value is not None and value < low:
            raise UserError(f"{flag} {value}: must be at least {low}")

    is_ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = load_engine(model, tokenizer)
    print0(f"Model: {args.source} step {meta['step']} | tasks: {', '.join(task_names)}")

    results, seconds = {}, {}
    for task_name in task_names:
        t0 = time.time()
        results[task_name] = run_chat_eval(task_name, model, tokenizer, engine, batch_size=args.batch_size,
                                           num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, top_k=args.top_k,
                                           max_problems=args.max_problems, gen_batch=args.gen_batch)
        seconds[task_name] = time.time() - t0
        print0(f"{task_name}: {results[task_name]:.4f} ({seconds[task_name]:.1f}s)")
    chatcore_metric = chatcore(results)
    if chatcore_metric is not None:
        print0(f"ChatCORE: {chatcore_metric:.4f}")

    get_report().log(section=f"Chat evaluation {args.source}", data=[
        vars(args),
        {"Model": f"{args.source} step {meta['step']}",
         "Data": f"local copy {local_data_dir()}" if local_data_dir() else "Hugging Face hub"},
        {name: f"{accuracy:.4f}" for name, accuracy in results.items()},
        {"ChatCORE": f"{chatcore_metric:.4f}"} if chatcore_metric is not None else
        "ChatCORE: not computed (needs all six of " + ", ".join(CHATCORE_BASELINES) + ")",
        *[f"{name} scored on its {eval_split(name)} split" for name in results if name.startswith("ARC")],
        "", "Evaluation time: " + ", ".join(f"{name} {s:.1f}s" for name, s in seconds.items()),
    ])
    compute_cleanup()
