"""
Decode speed of nanochat.engine, measured as an inference benchmark does: the time of one decode step at each batch
size with stop tokens disabled (every row runs num_tokens), tokens/s, time to first token, and on CUDA the memory
bandwidth a step uses against the GPU's datasheet figure. Prints one JSON object.

The model has random weights of the shape of a depth (speed does not depend on what the weights say).
--host_overhead=1 makes it d12-deep but only 64 wide (1 head, vocab 512): the step time is then what the host spends
per step, i.e. what a GPU would wait on. --repos measures other checkouts of nanochat (this repo at another commit,
or the original) in the same run, interleaved; each measurement runs in a subprocess that imports nanochat from its
checkout. Figures are medians over the repeats, with the spread; cpu_step_ms divides this process's CPU time
instead of wall time (less sensitive to other processes).

Usage:
    python -m dev.bench.engine --depths=4 --batch_sizes=1,8
    python -m dev.bench.engine --host_overhead=1 --batch_sizes=1,8,32 --repos=/tmp/nanochat-before
    python -m dev.bench.engine --depths=20 --vocab_size=65536 --batch_sizes=1,8,32,128   # on a GPU
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

# -----------------------------------------------------------------------------
# Worker: one checkout, every batch size, one timed run each (settings as JSON in argv; nothing but torch and the
# checkout's nanochat.gpt / nanochat.engine is imported, so that any checkout can run it)

if len(sys.argv) == 3 and sys.argv[1] == "--worker":
    import inspect

    import torch

    settings = json.loads(sys.argv[2])
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig
    try:
        from nanochat.common import COMPUTE_DTYPE
    except ImportError:  # checkouts from before the explicit compute dtype: fp32 on the CPU, as built
        COMPUTE_DTYPE = None
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    device = torch.device(settings["device"])
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    class SyntheticTokenizer:
        """What the engine asks of a tokenizer; the special ids are negative, so no sampled token ever stops a row."""

        def encode_special(self, name):
            return -1 - ["<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
                         "<|assistant_end|>"].index(name)

        def get_bos_token_id(self):
            return -6

        def decode(self, ids):
            return ""

        def encode(self, text):
            return []

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=2048, **settings["shape"]))
    model.to_empty(device=device)
    model.init_weights()
    if COMPUTE_DTYPE is not None:
        model.to(COMPUTE_DTYPE)  # as load_model(phase="eval") serves it: weights cast once, not at every use
    model.eval()
    options = {}
    if "compile_step" in inspect.signature(Engine).parameters and settings["compile_step"] != "auto":
        options["compile_step"] = bool(int(settings["compile_step"]))
    engine = Engine(model, SyntheticTokenizer(), **options)
    prompt = torch.randint(0, settings["shape"]["vocab_size"], (settings["prompt_tokens"],),
                           generator=torch.Generator().manual_seed(1)).tolist()
    num_tokens = settings["num_tokens"]

    def decode(batch_size):
        """(seconds to the first column, wall seconds per later step, CPU seconds per later step)"""
        synchronize()
        start = time.perf_counter()
        columns = engine.generate(prompt, batch_size, num_tokens, settings["temperature"], settings["top_k"], seed=0)
        next(columns)
        synchronize()
        first, cpu = time.perf_counter(), time.process_time()
        steps = 1 + sum(1 for _ in columns)
        synchronize()
        assert steps == num_tokens, f"{steps} steps, expected {num_tokens}: a row stopped"
        return first - start, (time.perf_counter() - first) / (steps - 1), (time.process_time() - cpu) / (steps - 1)

    result = {"dtype": str(model.lm_head.weight.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in model.parameters()), "batches": {}}
    with torch.inference_mode():
        for batch_size in settings["batch_sizes"]:
            decode(batch_size)  # warm-up: first-use allocations, compiles and CUDA graph captures
            ttft, step, cpu_step = decode(batch_size)
            result["batches"][batch_size] = {"ttft_s": ttft, "step_s": step, "cpu_step_s": cpu_step}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
        # bytes a step must read: every weight but the embedding (looked up, not multiplied), and the keys and values
        # of the context so far (the mean over the timed steps)
        result["weight_bytes"] = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                                     if "wte" not in name)
        config = model.config
        result["kv_bytes_per_row"] = (2 * config.n_layer * config.n_kv_head * (config.n_embd // config.n_head)
                                      * (settings["prompt_tokens"] + num_tokens / 2)
                                      * model.lm_head.weight.element_size())
    print(json.dumps(result))
    sys.exit(0)

# -----------------------------------------------------------------------------
# Parent: settings, then every (depth, checkout) `repeats` times, interleaved, then one JSON object


import torch  # noqa: E402

from dev.bench import REPO_ROOT, log, settings  # noqa: E402
from nanochat.common import autodetect_device_type, cpu_name  # noqa: E402
from nanochat.gpt import dims_for_depth  # noqa: E402

# Settings
depths = "4"  # model shapes: the depth dial's (layers, width, heads); with host_overhead, the layer count
host_overhead = 0  # 1: width 64, 1 head, vocab 512: the arithmetic is negligible, the step is host time
vocab_size = 32768
dtype = "default"  # NANOCHAT_DTYPE for the workers; "default" = what nanochat picks (bf16 on CUDA, else fp32)
batch_sizes = "1,8,32,128"
prompt_tokens = 64
num_tokens = 128  # decode steps per run (every row runs all of them)
temperature = 1.0
top_k = 50
compile_step = "auto"  # Engine(compile_step=...): 1/0, "auto" = the engine's default (on for CUDA)
repos = ""  # other nanochat checkouts to measure in the same run, comma-separated
repeats = 3
threads = 0  # torch threads; 0 = torch's default (one per core)
device_type = ""  # cpu | cuda; "" = autodetect
user_config = settings(globals())

DATASHEET_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12, "H200": 4.8e12,
                       "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.94e12}  # bytes/s


checkouts = [REPO_ROOT] + [os.path.abspath(path) for path in repos.split(",") if path]
device = device_type or autodetect_device_type()
env = dict(os.environ)
if dtype == "default":
    env.pop("NANOCHAT_DTYPE", None)
else:
    env["NANOCHAT_DTYPE"] = dtype


def shape_of(depth):
    if host_overhead:
        return dict(vocab_size=512, n_layer=depth, n_head=1, n_kv_head=1, n_embd=64)
    return dict(vocab_size=vocab_size, **dims_for_depth(depth))


def measure(checkout, depth):
    settings = dict(shape=shape_of(depth), batch_sizes=[int(b) for b in batch_sizes.split(",")], device=device,
                    prompt_tokens=prompt_tokens, num_tokens=num_tokens, temperature=temperature, top_k=top_k,
                    compile_step=str(compile_step), threads=threads)
    worker_env = dict(env, PYTHONPATH=checkout)  # the checkout's nanochat comes first
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(settings)],
                            env=worker_env, cwd=checkout, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the worker for {checkout} (d{depth}) failed (exit {result.returncode}); its log is above")
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(runs):
    """Medians and spreads over the repeats of one (depth, checkout)."""
    first = runs[0]
    out = {key: first[key] for key in ("dtype", "threads", "params", "gpu") if key in first}
    out["batches"] = {}
    for batch_size in first["batches"]:
        steps = [run["batches"][batch_size]["step_s"] for run in runs]
        step = statistics.median(steps)
        figures = {"step_ms": round(1e3 * step, 3), "step_ms_spread": [round(1e3 * min(steps), 3),
                                                                       round(1e3 * max(steps), 3)],
                   "cpu_step_ms": round(1e3 * statistics.median(run["batches"][batch_size]["cpu_step_s"]
                                                              for run in runs), 3),
                   "tokens_per_s": round(int(batch_size) / step, 1),
                   "ttft_ms": round(1e3 * statistics.median(run["batches"][batch_size]["ttft_s"] for run in runs), 2)}
        if "gpu" in first:
            bandwidth = (first["weight_bytes"] + int(batch_size) * first["kv_bytes_per_row"]) / step
            peak = next((value for name, value in DATASHEET_BANDWIDTH.items() if name in first["gpu"]), None)
            figures["bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
            figures["bandwidth_of_datasheet"] = round(bandwidth / peak, 3) if peak else None
        out["batches"][batch_size] = figures
    return out


load_before = os.getloadavg()
results = []
for depth in [int(d) for d in depths.split(",")]:
    runs = {checkout: [] for checkout in checkouts}
    for repeat in range(repeats):
        for checkout in checkouts:
            log(f"d{depth} repeat {repeat + 1}/{repeats}: {checkout}")
            runs[checkout].append(measure(checkout, depth))
    for checkout in checkouts:
        row = {"checkout": "this" if checkout == REPO_ROOT else checkout, "depth": depth, "shape": shape_of(depth),
               **summary(runs[checkout])}
        results.append(row)
        log(json.dumps(row))
    base = results[-len(checkouts)]
    for row in results[len(results) - len(checkouts) + 1:]:  # this checkout's tokens/s over the other's, per batch
        row["this_over_it"] = {b: round(base["batches"][b]["tokens_per_s"] / figures["tokens_per_s"], 2)
                               for b, figures in row["batches"].items()}

print(json.dumps({
    "benchmark": "engine",
    "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                "torch": torch.__version__, "device": device,
                "load_average_1min": [load_before[0], os.getloadavg()[0]]},
    "settings": {name: globals()[name] for name in ("depths", "host_overhead", "vocab_size", "dtype", "batch_sizes",
                                                     "prompt_tokens", "num_tokens", "temperature", "top_k",
                                                     "compile_step", "repos", "repeats", "threads", "device_type")},
    "results": results,
}, indent=2))
