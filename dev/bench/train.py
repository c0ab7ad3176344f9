"""
Pretraining throughput on this machine: base_train's whole loop against the model's bare forward+backward.
Prints one JSON object with, per execution mode (eager / torch.compile'd) and compute dtype (NANOCHAT_DTYPE):
  - loop: steady-state tokens/s and MFU of `python -m scripts.base_train` itself, read from its step lines after
    warm_up_steps steps;
  - model: tokens/s and MFU of forward+backward alone on one fixed batch, same model and shapes (the peer);
  - loop_overhead: the share of a step spent outside forward+backward, split into optimizer_share_of_loop_step
    and overhead_besides_optimizer (data, logging, the loop); compile_s: first-step time minus a steady step, with
    an empty inductor cache unless told otherwise.
With --compare_repo=<another checkout> (e.g. `git worktree add /tmp/old <commit>`), every loop runs there too,
alternating with ours round by round so that both see the same load; the JSON then carries compare_loop and
loop_speedup (ours / theirs, median over the rounds). MFU is against get_peak_flops.

The loop runs in a throwaway base dir with the data of <base>/base_data (or the embedded corpus) and a tokenizer of
vocab_size tokens: <base>/tokenizer when it has that size, else one trained by rustbpe and cached in
<base>/bench/tokenizer_<vocab_size>/.

Usage:
    python -m dev.bench.train          # d4, vocab 32768, seq 512, batch 4 x 512 = 2048 tokens, compiled, bf16 and fp32
    python -m dev.bench.train --compare_repo=/tmp/old --rounds=3
    python -m dev.bench.train --vocab_size=4096 --device_batch_size=8 --total_batch_size=8192 --dtypes=bfloat16  # demo
    python -m dev.bench.train --depth=2 --max_seq_len=64 --vocab_size=512 --steps=8 --warm_up_steps=3 --modes=eager
"""

import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from dev.bench import REPO_ROOT, log, settings
from nanochat.common import COMPUTE_DTYPE, cpu_name, get_base_dir, get_peak_flops

# Settings
depth = 4
max_seq_len = 512
device_batch_size = 4
total_batch_size = 2048  # = device_batch_size * max_seq_len: one micro-step a step
vocab_size = 32768
steps = 20  # base_train steps per mode
warm_up_steps = 5  # left out of the steady state (the first one compiles)
model_steps = 10  # timed forward+backward calls per mode, after one warm-up call
modes = "compiled"  # comma-separated: eager, compiled
dtypes = "bfloat16,float32"  # compute dtypes (NANOCHAT_DTYPE), each in its own processes
compare_repo = ""  # another checkout whose base_train runs alternately with ours
rounds = 1  # loop runs per configuration (and per repo), alternating
cold_compile = True  # each run gets an empty inductor cache, so that compile_s is the real compile time
worker = ""  # internal: "model" measures the peer in this process and prints its JSON
user_config = settings(globals())
if steps <= warm_up_steps:
    raise SystemExit(f"steps={steps} must be larger than warm_up_steps={warm_up_steps}")



# -----------------------------------------------------------------------------
# Worker: the peer, forward+backward alone, same model and shapes, one fixed batch (own process: the compute dtype
# is fixed at import)

if worker == "model":
    from nanochat.gpt import GPT, GPTConfig, dims_for_depth, keep_freed_cpu_memory

    keep_freed_cpu_memory()  # as base_train does on CPU
    compiled = modes == "compiled"
    config = GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, **dims_for_depth(depth))
    torch.manual_seed(0)
    model = GPT.create(config, "cpu")
    forward = model.compile_regions() if compiled else model  # as base_train compiles it
    optimizer = model.setup_optimizers()
    inputs = torch.randint(0, vocab_size, (device_batch_size, max_seq_len))
    targets = torch.randint(0, vocab_size, (device_batch_size, max_seq_len))
    times, optimizer_times = [], []
    for _ in range(model_steps + 1):
        t0 = time.perf_counter()
        forward(inputs, targets).backward()
        t1 = time.perf_counter()
        optimizer.update()  # timed apart: the peer is forward+backward alone
        times.append(t1 - t0)
        optimizer_times.append(time.perf_counter() - t1)
    step_s = statistics.median(times[1:])
    tokens = device_batch_size * max_seq_len
    peak = get_peak_flops("cpu", COMPUTE_DTYPE)
    print(json.dumps({"step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s),
                      "mfu_percent": round(100 * model.estimate_flops() * tokens / step_s / peak, 2),
                      "compile_s": round(times[0] - step_s, 2) if compiled else None, "first_step_s": round(times[0], 3),
                      "steps": model_steps, "optimizer_step_s": round(statistics.median(optimizer_times[1:]), 4)}))
    sys.exit(0)


# -----------------------------------------------------------------------------
# A throwaway base dir: data and a tokenizer of vocab_size tokens

user_base = get_base_dir()
bench_base = tempfile.mkdtemp(prefix="nanochat_bench_train_")
user_data = os.path.join(user_base, "base_data")
if os.path.isdir(user_data) and any(name.endswith(".parquet") for name in os.listdir(user_data)):
    os.symlink(user_data, os.path.join(bench_base, "base_data"))
else:
    from nanochat.dataset import install_embedded
    with contextlib.redirect_stdout(sys.stderr):
        install_embedded(os.path.join(bench_base, "base_data"))


def tokenizer_vocab(tokenizer_dir):
    try:
        with open(os.path.join(tokenizer_dir, "tokenizer.json"), encoding="utf-8") as f:
            return json.load(f)["vocab_size"]
    except (OSError, KeyError, ValueError):
        return None


tokenizer_dir = os.path.join(user_base, "tokenizer")
tokenizer_train_s = None
if tokenizer_vocab(tokenizer_dir) != vocab_size:
    tokenizer_dir = os.path.join(user_base, "bench", f"tokenizer_{vocab_size}")
    if tokenizer_vocab(tokenizer_dir) != vocab_size:
        from nanochat.dataset import parquets_iter_batched
        from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes

        def texts(max_chars=50_000_000):
            seen = 0
            for batch in parquets_iter_batched("train", data_dir=os.path.join(bench_base, "base_data")):
                for text in batch:
                    yield text[:10_000]
                    seen += min(len(text), 10_000)
                    if seen >= max_chars:
                        return

        log(f"training a {vocab_size}-token tokenizer for the benchmark into {tokenizer_dir}")
        t0 = time.perf_counter()
        tokenizer = RustBPETokenizer.train_from_iterator(texts(), vocab_size)
        tokenizer_train_s = round(time.perf_counter() - t0, 1)
        tokenizer.save(tokenizer_dir)
        torch.save(compute_token_bytes(tokenizer), os.path.join(tokenizer_dir, "token_bytes.pt"))
shutil.copytree(tokenizer_dir, os.path.join(bench_base, "tokenizer"))

# -----------------------------------------------------------------------------
# base_train's loop, and the peer, per mode and dtype

STEP_LINE = re.compile(r"^step (\d+)/\d+ .*\| dt (\d+)ms \| tok/s [\d,]+ \| mfu ([\d.]+)%", re.M)


def run_env(dtype):
    env = {**os.environ, "NANOCHAT_BASE_DIR": bench_base, "NANOCHAT_DTYPE": dtype}
    if cold_compile:
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanochat_bench_inductor_")
    return env


def process_cpu_s(pid):
    """CPU seconds (user + system, all threads) that process pid has used so far, from /proc (Linux); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def run_loop(repo, compiled, dtype):
    """One base_train run. Besides each step's wall time (its dt) the process's CPU time is sampled at every step line:
    on a machine shared with other work, CPU seconds per step (cpu_step_s) hardly move with the load when the run has
    one thread (OMP_NUM_THREADS=1), while wall times do; with several threads it also counts their spin-waiting."""
    args = [f"--depth={depth}", f"--max_seq_len={max_seq_len}", f"--device_batch_size={device_batch_size}",
            f"--total_batch_size={total_batch_size}", f"--num_iterations={steps}", "--eval_every=-1",
            f"--eval_tokens={device_batch_size * max_seq_len}", "--core_metric_every=-1", "--sample_every=-1",
            f"--compile={compiled}", "--model_tag=bench"]
    env = {**run_env(dtype), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=repo)
    output, cpu_at_step = [], {}
    for line in process.stdout:
        output.append(line)
        match = STEP_LINE.match(line)
        if match:
            cpu_at_step[int(match.group(1))] = process_cpu_s(process.pid)
    process.wait()
    wall_s = time.perf_counter() - t0
    shutil.rmtree(env.get("TORCHINDUCTOR_CACHE_DIR", ""), ignore_errors=True)
    stdout = "".join(output)
    if process.returncode != 0:
        raise SystemExit(f"base_train in {repo} failed:\n{stdout[-5000:]}")
    rows = [(int(s), int(dt) / 1000, float(mfu)) for s, dt, mfu in STEP_LINE.findall(stdout)]
    assert len(rows) == steps, f"expected {steps} step lines, got {len(rows)}"
    steady = [dt for s, dt, _ in rows if s > warm_up_steps]
    step_s = statistics.median(steady)
    cpu_steps = [cpu_at_step[s] - cpu_at_step[s - 1] for s, _, _ in rows
                 if s > warm_up_steps and cpu_at_step.get(s) is not None and cpu_at_step.get(s - 1) is not None]
    cpu_step_s = statistics.median(cpu_steps) if cpu_steps else None
    return {"step_s": round(step_s, 4), "tokens_per_s": round(total_batch_size / step_s),
            "mfu_percent": round(statistics.median(mfu for s, _, mfu in rows if s > warm_up_steps), 2),
            "cpu_step_s": round(cpu_step_s, 3) if cpu_step_s else None,
            "tokens_per_cpu_s": round(total_batch_size / cpu_step_s) if cpu_step_s else None,
            "compile_s": round(rows[0][1] - step_s, 2) if compiled else None, "first_step_s": rows[0][1], "steps": steps,
            "wall_s_incl_startup_and_eval": round(wall_s, 1)}


def run_model(compiled, dtype):
    args = [f"--{name}={value}" for name, value in user_config.items() if name not in ("worker", "modes", "dtypes")]
    env = run_env(dtype)
    result = subprocess.run([sys.executable, "-m", "dev.bench.train", *args, f"--modes={'compiled' if compiled else 'eager'}",
                             f"--dtypes={dtype}", "--worker=model"], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    shutil.rmtree(env.get("TORCHINDUCTOR_CACHE_DIR", ""), ignore_errors=True)
    if result.returncode != 0:
        raise SystemExit(f"the peer ({dtype}) failed (exit {result.returncode}); its log is above")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_run(runs):
    """The run with the median tokens/s, plus every run's tokens/s."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return {**ranked[len(ranked) // 2], "tokens_per_s_all_rounds": [r["tokens_per_s"] for r in runs]}


results = {}
for mode in modes.split(","):
    if mode not in ("eager", "compiled"):
        raise SystemExit(f"--modes: {mode!r} is not eager or compiled")
    compiled = mode == "compiled"
    for dtype in dtypes.split(","):
        ours, theirs = [], []
        for round_index in range(rounds):
            ours.append(run_loop(REPO_ROOT, compiled, dtype))
            log(f"{mode} {dtype} loop, round {round_index + 1}: {ours[-1]['tokens_per_s']:,} tok/s, "
                f"MFU {ours[-1]['mfu_percent']}%, CPU s/step {ours[-1]['cpu_step_s']}, compile {ours[-1]['compile_s']} s")
            if compare_repo:
                theirs.append(run_loop(os.path.abspath(compare_repo), compiled, dtype))
                log(f"{mode} {dtype} loop of {compare_repo}, round {round_index + 1}: "
                    f"{theirs[-1]['tokens_per_s']:,} tok/s, CPU s/step {theirs[-1]['cpu_step_s']}, "
                    f"compile {theirs[-1]['compile_s']} s")
        loop = median_run(ours)
        model = run_model(compiled, dtype)
        log(f"{mode} {dtype} model fwd+bwd: {model['tokens_per_s']:,} tok/s, MFU {model['mfu_percent']}%")
        overhead = 1 - loop["tokens_per_s"] / model["tokens_per_s"]
        # what is left once the optimizer step is counted as model work too: data loading, logging, the loop itself
        overhead_besides_optimizer = 1 - (model["step_s"] + model["optimizer_step_s"]) / loop["step_s"]
        row = {"loop": loop, "model": model, "loop_overhead": round(overhead, 4),
               "optimizer_share_of_loop_step": round(model["optimizer_step_s"] / loop["step_s"], 4),
               "overhead_besides_optimizer": round(overhead_besides_optimizer, 4)}
        if compare_repo:
            row["compare_loop"] = median_run(theirs)
            row["loop_speedup"] = round(loop["tokens_per_s"] / row["compare_loop"]["tokens_per_s"], 3)
            row["loop_speedup_per_round"] = [round(a["tokens_per_s"] / b["tokens_per_s"], 3) for a, b in zip(ours, theirs)]
            if all(r["cpu_step_s"] for r in ours + theirs):  # CPU seconds per step: theirs / ours
                row["cpu_time_speedup_per_round"] = [round(b["cpu_step_s"] / a["cpu_step_s"], 3) for a, b in zip(ours, theirs)]
                row["cpu_time_speedup"] = round(statistics.median(r["cpu_step_s"] for r in theirs)
                                                / statistics.median(r["cpu_step_s"] for r in ours), 3)
        results[f"{mode}/{dtype}"] = row
shutil.rmtree(bench_base, ignore_errors=True)

print(json.dumps({
    "benchmark": "train",
    "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                "load_average_at_end": os.getloadavg()},
    "settings": user_config,
    "tokenizer_train_s": tokenizer_train_s,
    "results": results,
}, indent=2))
