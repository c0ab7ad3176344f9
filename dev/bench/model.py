"""
Model throughput: forward+backward tokens/s and MFU of the GPT alone (no data, no optimizer), per depth, compute
dtype and execution mode (eager / torch.compile). Prints one JSON object.

MFU = estimate_flops() * tokens/s / peak. The peak is nanochat.common's datasheet table on CUDA; on CPU it is this
machine's best F.linear matmul per dtype, timed in the same run (an AVX2-only CPU multiplies bf16 far slower than
fp32: its bf16 MFU is against its bf16 peak). Each dtype runs in its own subprocess (NANOCHAT_DTYPE is read at
import); on CPU the process keeps freed memory, as base_train does.

Usage:
    python -m dev.bench.model                                   # d4,d8 x fp32,bf16 x eager,compiled; vocab 32768, B 4, T 512
    python -m dev.bench.model --depths=2 --max_seq_len=64 --vocab_size=512 --steps=2 --modes=eager --peak_matmul_size=512
On a 2-core AVX2 CPU the fp32 half of the default run takes minutes, the bf16 half about half an hour
(--dtypes=float32 skips it).
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from dev.bench import REPO_ROOT, log, settings
from nanochat.common import cpu_name

# Settings
depths = "4,8"  # comma-separated model depths
device_batch_size = 4
max_seq_len = 512
vocab_size = 32768
steps = 3  # timed forward+backward calls per configuration (median), after one warm-up call (which compiles)
dtypes = "float32,bfloat16"  # compute dtypes (NANOCHAT_DTYPE values)
modes = "eager,compiled"
device_type = ""  # cpu | cuda; "" = autodetect
peak_matmul_size = 2048  # CPU peak: the best square F.linear matmul of this size over half a second
worker_dtype = ""  # internal: set by this script for the subprocess that measures one dtype
user_config = settings(globals())


# -----------------------------------------------------------------------------
# Parent: one subprocess per dtype, then one JSON object

if not worker_dtype:
    results, peaks = [], {}
    for dtype_name in dtypes.split(","):
        args = [f"--{name}={value}" for name, value in user_config.items() if name != "worker_dtype"]
        env = dict(os.environ, NANOCHAT_DTYPE=dtype_name)
        log(f"measuring compute dtype {dtype_name}")
        result = subprocess.run([sys.executable, "-m", "dev.bench.model", *args, f"--worker_dtype={dtype_name}"], env=env,
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"the {dtype_name} worker failed (exit {result.returncode}); its log is above")
        worker = json.loads(result.stdout.strip().splitlines()[-1])
        peaks[dtype_name] = worker["peak_flops"]
        results += worker["results"]
    print(json.dumps({
        "benchmark": "model",
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "settings": {name: value for name, value in user_config.items() if name != "worker_dtype"},
        "peak_flops": peaks,
        "results": results,
    }, indent=2))
    sys.exit(0)

# -----------------------------------------------------------------------------
# Worker: every depth and mode in one compute dtype

from nanochat.common import COMPUTE_DTYPE, autodetect_device_type, get_peak_flops, measure_cpu_matmul_flops  # noqa: E402
from nanochat.gpt import GPT, GPTConfig, dims_for_depth, keep_freed_cpu_memory  # noqa: E402


assert str(COMPUTE_DTYPE) == f"torch.{worker_dtype}", (COMPUTE_DTYPE, worker_dtype)
device = torch.device(device_type or autodetect_device_type())
synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
if device.type == "cpu":
    keep_freed_cpu_memory()  # as base_train does: the per-step buffers are reused instead of page-faulted in again
    peak = measure_cpu_matmul_flops(COMPUTE_DTYPE, peak_matmul_size)  # get_peak_flops' measurement, at a set size
else:
    peak = get_peak_flops(device, COMPUTE_DTYPE)
log(f"{worker_dtype} peak: {peak / 1e9:.1f} GFLOP/s")

results = []
for depth in [int(d) for d in depths.split(",")]:
    config = GPTConfig(sequence_len=max_seq_len, vocab_size=vocab_size, **dims_for_depth(depth))
    for mode in modes.split(","):
        if mode not in ("eager", "compiled"):
            raise SystemExit(f"--modes: {mode!r} is not eager or compiled")
        torch.manual_seed(0)
        model = GPT.create(config, device)
        forward = model.compile_regions() if mode == "compiled" else model  # as base_train compiles it
        inputs = torch.randint(0, vocab_size, (device_batch_size, max_seq_len), device=device)
        targets = torch.randint(0, vocab_size, (device_batch_size, max_seq_len), device=device)
        times = []
        for _ in range(steps + 1):
            synchronize()
            t0 = time.perf_counter()
            forward(inputs, targets).backward()
            synchronize()
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        step_s = statistics.median(times[1:])
        tokens_per_s = device_batch_size * max_seq_len / step_s
        row = {"depth": depth, "dtype": worker_dtype, "mode": mode, "tokens_per_s": round(tokens_per_s),
               "mfu_percent": round(100 * model.estimate_flops() * tokens_per_s / peak, 2),
               "step_s": round(step_s, 4), "first_step_s": round(times[0], 2),
               "params": model.num_scaling_params(), "flops_per_token": model.estimate_flops()}
        log(json.dumps(row))
        results.append(row)
        del model, forward

print(json.dumps({"peak_flops": peak, "results": results}))
