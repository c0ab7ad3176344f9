"""
CORE of a trained base model (nanochat/core_eval.py): accuracy and centred accuracy per task, and their mean.

Loads <base>/base_checkpoints/<model_tag>/ at its last complete step (or --model_step), evaluates the tasks of the
eval bundle (--bundle_dir, else <base>/eval_bundle, downloaded the first time), and writes
<base>/base_eval/<model_tag>_<step>.csv and the report section "Base model evaluation". With tasks missing the number
is labelled "CORE over N of 22 tasks": compare it with other runs over the same tasks, never with published CORE.

Usage:
    python -m scripts.base_eval
    python -m scripts.base_eval --model_tag=d4 --max_per_task=100 --bundle_dir=data/core_eval
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval -- --max_per_task=500
"""

import os
import time

from nanochat import core_eval
from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_cleanup, compute_init, get_base_dir, print0, write_atomic
from nanochat.configurator import configure
from nanochat.report import get_report

# Settings
device_type = ""  # cuda | cpu | mps; "" = autodetect
model_tag = ""  # checkpoint directory; "" = the largest d<N>
model_step = -1  # checkpoint step; -1 = the last complete one
max_per_task = -1  # examples per task (a random sample, the same every run); -1 = all
bundle_dir = ""  # eval bundle directory (core.yaml, eval_meta_data.csv, eval_data/); "" = <base>/eval_bundle, downloaded
batch_tokens = -1  # padded tokens per forward; -1 = the device's default (core_eval.BATCH_TOKENS), 0 = one example
hellaswag_fallback = True  # without hellaswag.jsonl, run HellaSwag on eval_data_fallback/ when present (labelled)
user_config = configure(globals())

is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag or None,
                                    step=None if model_step < 0 else model_step)
model_tag = meta["model_tag"]
step = meta["step"]
print0(f"Model: {model_tag} step {step} | sequence_len {model.config.sequence_len}")

# -----------------------------------------------------------------------------
# Evaluate

t0 = time.time()
result = core_eval.evaluate_model(model, tokenizer, device, max_per_task=max_per_task, bundle_dir=bundle_dir or None,
                                  batch_tokens=None if batch_tokens < 0 else batch_tokens, use_fallback=hellaswag_fallback)
eval_seconds = time.time() - t0

# -----------------------------------------------------------------------------
# CSV and report (rank 0)

if rank == 0:
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for task, accuracy in result["results"].items():
        lines.append(f"{task:<35}, {accuracy:<10.6f}, {result['centered_results'][task]:<10.6f}")
    lines.append(f"{result['label']:<35}, {'':<10}, {result['core_metric']:<10.6f}")
    csv_text = "\n".join(lines) + "\n"
    csv_dir = os.path.join(get_base_dir(), "base_eval")
    os.makedirs(csv_dir, exist_ok=True)
    csv_path = os.path.join(csv_dir, f"{model_tag}_{step}.csv")
    write_atomic(csv_path, lambda f: f.write(csv_text.encode("utf-8")))
    print(csv_text, end="")
    print(f"Wrote {csv_path} ({eval_seconds:.1f}s)")

    partial = result["num_tasks"] < result["total_tasks"]
    over = f" (over {result['num_tasks']} of {result['total_tasks']} tasks)" if partial else ""
    get_report().log(section="Base model evaluation", data=[
        user_config,
        {"Model": f"{model_tag} step {step}", "CORE": f"{result['core_metric']:.4f}{over}", "CORE label": result["label"],
         "Cropped": core_eval.cropped_note(result, model), "Evaluation time": f"{eval_seconds:.1f}s"},
        *[f"- Skipped: {task} ({why})" for task, why in result["skipped"].items()],
        "", "Per task (accuracy, centered):", "",
        *[f"- {task}: {accuracy:.4f}, {result['centered_results'][task]:.4f}" for task, accuracy in result["results"].items()],
    ])
compute_cleanup()
