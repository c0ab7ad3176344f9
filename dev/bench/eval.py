"""
Evaluation speed on this machine. Prints one JSON object with:
  - core: CORE examples/s of a d4 model (random weights, a 4096-token tokenizer trained on the embedded corpus),
    three ways in the same run: one example per forward with every option's full prompt (the original's way), one
    example per forward with the options' shared prefix run once, and batched; and whether all three agree.
  - humaneval: the 164 HumanEval canonical solutions through nanochat.execution.execute_code, with bubblewrap and
    without: programs/s, total seconds, passes.
Random weights make the accuracies meaningless; the speed is what a trained d4 would have (same shapes).

Usage:
    python -m dev.bench.eval
    python -m dev.bench.eval --max_per_task=4 --parts=core
"""

import contextlib
import gzip
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import torch

from dev.bench import log, settings
from nanochat import dataset
from nanochat.common import COMPUTE_DTYPE, cpu_name

# Settings
parts = "core,humaneval"  # which halves to run
bundle_dir = "../shared/data/core_eval_bundle"  # CORE bundle (falls back to the repo's data/core_eval when absent)
max_per_task = 12  # examples per CORE task
depth = 4
sequence_len = 1024  # the model's context: longer prompts are left-cropped to it
vocab_size = 4096
batch_tokens = 2048  # the batched run's padded-token budget per forward
threads = 0  # torch threads for the CORE half; 0 = torch's default (one per core)
humaneval_path = "../shared/data/humaneval/HumanEval.jsonl.gz"
workers = 2  # programs run at once (threads, each waiting on its own subprocess)
timeout = 10.0  # seconds per program
user_config = settings(globals())


result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                      "load_avg_1min": os.getloadavg()[0], "compute_dtype": str(COMPUTE_DTYPE).removeprefix("torch.")},
          "settings": user_config}

# -----------------------------------------------------------------------------
# CORE: batched vs one example per forward

if "core" in parts:
    from nanochat import core_eval
    from nanochat.gpt import GPT, GPTConfig, dims_for_depth
    from nanochat.tokenizer import RustBPETokenizer

    if not os.path.isfile(os.path.join(bundle_dir, "core.yaml")):
        bundle_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "data", "core_eval")
    texts = pq.read_table(os.path.join(dataset.EMBEDDED_DIR, "shard_00000.parquet")).column("text").to_pylist()[:300]
    with contextlib.redirect_stdout(sys.stderr):
        tokenizer = RustBPETokenizer.train_from_iterator(iter(texts), vocab_size)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), **dims_for_depth(depth))
    torch.manual_seed(0)
    model = GPT.create(config, "cpu")
    model.eval().to(COMPUTE_DTYPE)  # as load_model(phase="eval") serves it: weights cast once

    if threads > 0:
        torch.set_num_threads(threads)
    modes = {"one_example_full_rows": dict(batch_tokens=0, share_prefix=False),
             "one_example_shared_prefix": dict(batch_tokens=0, share_prefix=True),
             "batched": dict(batch_tokens=batch_tokens, share_prefix=True)}
    tasks = [t for t in core_eval.load_tasks(bundle_dir) if t["path"]]
    runs, accuracies = {}, {}
    for name, mode in modes.items():
        examples, seconds, by_type, accuracies[name] = 0, 0.0, {}, {}
        for task in tasks:
            data = core_eval.load_examples(task["path"], max_per_task)
            t0 = time.perf_counter()
            accuracies[name][task["label"]] = core_eval.evaluate_task(model, tokenizer, data, task, "cpu", **mode)
            seconds += time.perf_counter() - t0
            examples += len(data)
            by_type[task["task_type"]] = round(by_type.get(task["task_type"], 0.0) + time.perf_counter() - t0, 2)
        runs[name] = {"examples": examples, "seconds": round(seconds, 2), "examples_per_s": round(examples / seconds, 2),
                      "seconds_by_task_type": by_type}
        log(f"CORE {name}: {examples} examples of {len(tasks)} tasks in {seconds:.1f}s")
    rate = {name: run["examples_per_s"] for name, run in runs.items()}
    result["core"] = {"bundle": bundle_dir, "tasks": len(tasks), "torch_threads": torch.get_num_threads(),
                      "batch_tokens": batch_tokens,
                      "model": f"d{depth} {config.n_embd} wide, vocab {config.vocab_size}, sequence_len {sequence_len}",
                      **runs,
                      "speedup_batched_vs_one_example_full_rows": round(rate["batched"] / rate["one_example_full_rows"], 2),
                      "speedup_batched_vs_one_example_shared_prefix": round(rate["batched"] / rate["one_example_shared_prefix"], 2),
                      "identical_results": all(acc == accuracies["batched"] for acc in accuracies.values())}

# -----------------------------------------------------------------------------
# HumanEval canonical solutions through the sandbox

if "humaneval" in parts:
    from nanochat.execution import execute_code

    with gzip.open(humaneval_path, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"
                for p in problems]
    result["humaneval"] = {"programs": len(programs), "workers": workers}
    for name, use_bwrap in (("bwrap", True), ("no_bwrap", False)):
        def run(program, use_bwrap=use_bwrap):
            return execute_code(program, timeout=timeout, use_bwrap=use_bwrap)
        try:
            run("print(1)")  # warm-up: a failure to start bwrap shows here, not 164 times
            t0 = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                outcomes = list(pool.map(run, programs))
            seconds = time.perf_counter() - t0
            failed = [problems[i]["task_id"] for i, o in enumerate(outcomes) if not o.success]
            result["humaneval"][name] = {"seconds": round(seconds, 2),
                                         "programs_per_s": round(len(programs) / seconds, 1),
                                         "passed": len(programs) - len(failed), "failed": failed[:10]}
            log(f"HumanEval {name}: {len(programs) - len(failed)}/{len(programs)} passed in {seconds:.1f}s")
        except Exception as e:  # e.g. bwrap missing or not permitted here
            result["humaneval"][name] = {"error": f"{type(e).__name__}: {e}"}

result["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
print(json.dumps(result, indent=2))
