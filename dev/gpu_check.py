"""
The one-shot GPU check (run it through dev/gpu_check.sh): on a bare machine that has PyTorch and a GPU but no
internet and no uv, check that nanochat's CUDA paths work and measure what matters, in well under 8 minutes on
one H100, then print ONE JSON summary as the last line (also written to $OUT/gpu_check.json when $OUT is set).

Steps, each independent (a failure is recorded and the rest go on; every heavy step runs in its own process
with a timeout, and a step that would start past the time budget is skipped):
    environment   Python, torch, GPU, and which of nanochat's imports are missing here
    data          the embedded corpus into a scratch NANOCHAT_BASE_DIR (python3 -m nanochat.dataset --embedded)
    tokenizer     a ready tokenizer, no training: GPT-4's cl100k_base ranks (shipped in data/tiktoken/) cut to
                  the first 65,527, so the vocab is the speedrun's 65,536; byte-level when that cannot be had
    cuda_tests    pytest tests/test_gpt.py (+ test_engine.py) when pytest is there, and a built-in check: a GPT's
                  forward/backward in bf16 on the GPU against fp32, and KV-cache decoding against a full forward
    base_train    d12, 100 steps, torch.compile, bf16, seq 2048, 262,144 tokens a step: tok/s and MFU (against
                  the datasheet peak in nanochat.common) read from its log, steps after the 10th only
    engine        decode speed of the trained d12 through nanochat.engine.Engine (the naive generate without
                  it), batch 1 and batch 16; plus dev/bench/engine.py's JSON when that file exists
    chat_web      when fastapi/uvicorn import: the server on the d12, /health, one OpenAI-style and one native
                  streaming reply

--dry_run does all of it on the CPU with tiny sizes (d2, a 512-token vocab, a dozen steps, no compile): the test
suite runs it, so the script is known to work end to end before a GPU is ever rented.

Not a benchmark suite (dev/bench/ is) and not a test suite: it reports, it never fails the machine's exit code
unless the script itself breaks.

Usage:
    bash dev/gpu_check.sh                 # on the GPU machine
    bash dev/gpu_check.sh --dry_run       # anywhere, CPU only, ~1 minute
    python3 dev/gpu_check.py --budget_s=420 --keep
"""

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What nanochat imports somewhere, by import name (the server's three only matter for chat_web)
IMPORTS = ["torch", "numpy", "tiktoken", "pyarrow", "regex", "requests", "filelock", "psutil", "tqdm", "yaml",
           "rustbpe", "pytest", "matplotlib", "fastapi", "uvicorn", "pydantic", "datasets", "wandb"]

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dry_run", action="store_true", help="CPU only, tiny sizes")
parser.add_argument("--budget_s", type=float, default=450.0, help="no step starts after this many seconds")
parser.add_argument("--train_steps", type=int, default=0, help="base_train steps (default: 100, dry run 12)")
parser.add_argument("--keep", action="store_true", help="keep the scratch base dir (its path is in the summary)")
parser.add_argument("--selftest", default="", help=argparse.SUPPRESS)  # internal: one phase of the built-in CUDA check
parser.add_argument("--selftest_file", default="", help=argparse.SUPPRESS)
args = parser.parse_args()


# -----------------------------------------------------------------------------
# The built-in CUDA check, run as subprocesses of this file (the compute dtype is fixed when nanochat.common is
# imported, so fp32 and bf16 need a process each)

def selftest(phase, path):
    import torch

    from nanochat.gpt import GPT, GPTConfig, KVCache

    device = "cpu" if args.dry_run else "cuda"
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    if phase == "ref":
        # the zero-initialized output projections would make every layer an identity: randomize them all
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
        idx = torch.randint(0, 512, (4, 64), device=device)
        torch.backends.cuda.matmul.allow_tf32 = False
        loss = model(idx, targets=idx.roll(-1, 1))
        loss.backward()
        torch.save({"state": model.state_dict(), "idx": idx.cpu(), "loss": loss.item(),
                    "logits": model(idx).detach().cpu(), "grads": [p.grad.cpu() for p in model.parameters()]}, path)
        return {}
    ref = torch.load(path, weights_only=True)
    model.load_state_dict(ref["state"])
    idx = ref["idx"].to(device)
    loss = model(idx, targets=idx.roll(-1, 1))
    loss.backward()
    logits = model(idx).detach().cpu()
    cos = [torch.nn.functional.cosine_similarity(p.grad.cpu().flatten(), g.flatten(), dim=0).item()
           for p, g in zip(model.parameters(), ref["grads"]) if g.abs().sum() > 0]
    result = {"loss_fp32": ref["loss"], "loss_bf16": loss.item(),
              "logits_max_abs_diff": (logits - ref["logits"]).abs().max().item(), "grad_cosine_min": min(cos)}
    # KV-cache decoding: prefill 40 tokens, then 24 one at a time; each step's logits = the full forward's
    model.eval()
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(4, config.n_kv_head, 64, config.n_embd // config.n_head, config.n_layer, device=device)
        steps = [model(idx[:, :40], kv_cache=cache)[:, -1]]
        for t in range(40, 63):
            steps.append(model(idx[:, t:t + 1], kv_cache=cache)[:, -1])
        decoded = torch.stack(steps, 1)
        reference = full[:, 39:63]
    result["kv_decode_max_abs_diff"] = (decoded - reference).abs().max().item()
    result["kv_decode_argmax_agree"] = (decoded.argmax(-1) == reference.argmax(-1)).float().mean().item()
    result["ok"] = (abs(result["loss_bf16"] - result["loss_fp32"]) < 0.05 and result["grad_cosine_min"] > 0.98
                    and result["kv_decode_argmax_agree"] > 0.97)
    return result


if args.selftest:
    print("SELFTEST " + json.dumps(selftest(args.selftest, args.selftest_file)))
    sys.exit(0)

# -----------------------------------------------------------------------------
# Running steps

T0 = time.time()
DRY = args.dry_run
summary = {"dry_run": DRY, "repo": REPO, "steps": {}}
work_dir = tempfile.mkdtemp(prefix="nanochat_gpu_check_")
base_dir = os.path.join(work_dir, "base")
log_dir = os.path.join(work_dir, "logs")
os.makedirs(log_dir)
ENV = {**os.environ, "NANOCHAT_BASE_DIR": base_dir, "PYTHONUNBUFFERED": "1", "TIKTOKEN_CACHE_DIR": os.path.join(work_dir, "tiktoken")}
if DRY:
    ENV.update(CUDA_VISIBLE_DEVICES="", NANOCHAT_DTYPE="bfloat16", OMP_NUM_THREADS=ENV.get("OMP_NUM_THREADS", "1"))
PY = sys.executable


def run(name, command, timeout, env=None):
    """Run a command from the repo root; its output goes to logs/<name>.log. Returns (returncode, output)."""
    start = time.time()
    with open(os.path.join(log_dir, f"{name}.log"), "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(command, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=timeout)
            output, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:
            output = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "")
            output += f"\n[gpu_check: timed out after {timeout}s]"
            code = 124
        log.write(output)
    print(f"  {name}: exit {code} in {time.time() - start:.1f}s", flush=True)
    return code, output


def tail(text, lines=12):
    return "\n".join(text.strip().splitlines()[-lines:])


def step(name, needs=()):
    """Decorator: run the function as a step now, record ok/failed/skipped, its seconds and what it returns."""
    def wrap(fn):
        record = {}
        elapsed = time.time() - T0
        missing = [n for n in needs if summary["steps"].get(n, {}).get("status") != "ok"]
        if elapsed > args.budget_s and summary["steps"]:  # the environment step always runs
            record = {"status": "skipped", "why": f"time budget of {args.budget_s:.0f}s spent ({elapsed:.0f}s)"}
        elif missing:
            record = {"status": "skipped", "why": f"needs step(s) that did not succeed: {', '.join(missing)}"}
        else:
            print(f"[{elapsed:6.1f}s] {name}", flush=True)
            start = time.time()
            try:
                record = {"status": "ok", **(fn() or {})}
            except Exception as e:
                record = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-3000:]}
            record["seconds"] = round(time.time() - start, 1)
        summary["steps"][name] = record
        if record["status"] != "ok":
            print(f"  {name}: {record['status']}: {record.get('why') or record.get('error')}", flush=True)
        return fn
    return wrap


class StepFailed(Exception):
    pass


def check(code, output, what):
    if code != 0:
        raise StepFailed(f"{what} exited with {code}:\n{tail(output, 25)}")


# -----------------------------------------------------------------------------
# The steps

@step("environment")
def environment():
    info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
            "cpus": os.cpu_count(), "pythonpath": os.environ.get("PYTHONPATH", "")}
    info["missing_imports"] = [name for name in IMPORTS if importlib.util.find_spec(name) is None]
    if importlib.util.find_spec("rustbpe") is not None:
        code, out = run("rustbpe_import", [PY, "-c", "import rustbpe; print(hasattr(rustbpe, 'Tokenizer'))"], 60)
        if out.strip().splitlines()[-1:] != ["True"]:
            info["missing_imports"].append("rustbpe (found but not the built extension for this Python)")
    import torch

    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    elif not DRY:
        raise StepFailed("torch sees no CUDA GPU (use --dry_run to check the script on a CPU)")
    if shutil.which("nvidia-smi"):
        code, out = run("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                       "--format=csv,noheader"], 30)
        info["nvidia_smi"] = out.strip()
    return info


@step("data")
def data():
    code, out = run("data", [PY, "-m", "nanochat.dataset", "--embedded"], 120)
    check(code, out, "python -m nanochat.dataset --embedded")
    return {"shards": sorted(name for name in os.listdir(os.path.join(base_dir, "base_data")) if name.endswith(".parquet"))}


TOKENIZER_CODE = r"""
import base64, os, sys, torch
from nanochat.common import get_base_dir
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, compute_token_bytes
vocab_size, source = int(sys.argv[1]), sys.argv[2]
if os.path.isfile(source):
    # the lowest ranks of a BPE table are a valid smaller table: every merge's parts have lower ranks
    with open(source, "rb") as f:
        lines = f.read().splitlines()[: vocab_size - len(SPECIAL_TOKENS)]
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in lines)}
    kind = f"cl100k_base ranks 0..{len(ranks) - 1}"
else:
    ranks = {bytes([i]): i for i in range(256)}
    kind = "byte-level (no cl100k_base rank file)"
tokenizer = RustBPETokenizer(SPLIT_PATTERN, ranks)
directory = os.path.join(get_base_dir(), "tokenizer")
tokenizer.save(directory)
torch.save(compute_token_bytes(tokenizer), os.path.join(directory, "token_bytes.pt"))
text = "The capital of France is Paris. 12 + 30 = 42"
assert tokenizer.decode(tokenizer.encode(text)) == text
print(f"TOKENIZER {tokenizer.get_vocab_size()} {kind}")
"""


@step("tokenizer")
def tokenizer():
    vocab = 512 if DRY else 65536
    source = os.path.join(REPO, "data", "tiktoken", "cl100k_base.tiktoken")
    code, out = run("tokenizer", [PY, "-c", TOKENIZER_CODE, str(vocab), source], 120)
    if code != 0 and "tiktoken" in out:
        raise StepFailed("tiktoken is missing: no tokenizer can be built (nanochat's tokenizer runs on tiktoken)")
    check(code, out, "building the tokenizer")
    found = re.search(r"^TOKENIZER (\d+) (.+)$", out, re.M)
    return {"vocab_size": int(found.group(1)), "kind": found.group(2)}


@step("cuda_tests")
def cuda_tests():
    result = {}
    if importlib.util.find_spec("pytest") is not None:
        files = [f for f in ("tests/test_gpt.py", "tests/test_engine.py") if os.path.exists(os.path.join(REPO, f))]
        selection = ["-k", "cache or decode"] if DRY else []  # the dry run only proves the path works
        code, out = run("pytest", [PY, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files, *selection],
                        150 if not DRY else 120)
        counts = re.findall(r"(\d+) (passed|failed|error|skipped|deselected)", out)
        result["pytest"] = {kind: int(n) for n, kind in counts} | {"exit": code, "files": files}
        if code not in (0, 5):
            result["pytest"]["tail"] = tail(out, 15)
    else:
        result["pytest"] = "not installed: built-in check only"
    ref = os.path.join(work_dir, "selftest_ref.pt")
    extra = ["--dry_run"] if DRY else []
    code, out = run("selftest_fp32", [PY, __file__, "--selftest=ref", f"--selftest_file={ref}", *extra], 180,
                    env={**ENV, "NANOCHAT_DTYPE": "float32"})
    check(code, out, "the fp32 reference")
    code, out = run("selftest_bf16", [PY, __file__, "--selftest=cmp", f"--selftest_file={ref}", *extra], 180,
                    env={**ENV, "NANOCHAT_DTYPE": "bfloat16"})
    check(code, out, "the bf16 comparison")
    found = re.search(r"^SELFTEST (.+)$", out, re.M)
    result["builtin"] = json.loads(found.group(1))
    pytest_ok = not isinstance(result["pytest"], dict) or result["pytest"]["exit"] in (0, 5)
    if not (result["builtin"]["ok"] and pytest_ok):
        raise StepFailed(json.dumps(result))
    return result


def parse_train_log(out):
    steps = [(int(m.group(1)), float(m.group(2).replace(",", "")), float(m.group(3)))
             for m in re.finditer(r"^step (\d+)/\d+ .*?\| tok/s ([\d,]+) \| mfu ([\d.]+)%", out, re.M)]
    timed = [s for s in steps if s[0] > 10] or steps
    result = {"steps_logged": len(steps)}
    if timed:
        result.update(tok_per_s_median=round(statistics.median(s[1] for s in timed)),
                      mfu_percent_median=round(statistics.median(s[2] for s in timed), 2))
    for key, pattern in (("val_bpb", r"val bpb ([\d.]+)"), ("peak_memory", r"Peak memory: ([^|]+)"),
                         ("parameters", r"Parameters: ([\d,]+)"), ("total_training_time", r"total training time: ([^|]+)")):
        found = re.findall(pattern, out)
        if found:
            result[key] = found[-1].strip()
    losses = re.findall(r"^step \d+/\d+ .*?\| loss ([\d.]+)", out, re.M)
    if losses:
        result["loss_first_last"] = [float(losses[0]), float(losses[-1])]
    return result


@step("base_train", needs=("data", "tokenizer"))
def base_train():
    if DRY:
        settings = ["--depth=2", "--max_seq_len=128", "--device_batch_size=2", "--total_batch_size=512",
                    f"--num_iterations={args.train_steps or 12}", "--eval_tokens=2048", "--compile=false", "--device_type=cpu"]
    else:
        # 262,144 tokens a step = 4 micro-steps of 32 x 2048: long enough steps that timing noise is small, 100 of
        # them in about a minute on an H100 after ~1-2 minutes of compilation
        settings = ["--depth=12", "--max_seq_len=2048", "--device_batch_size=32", "--total_batch_size=262144",
                    f"--num_iterations={args.train_steps or 100}", "--eval_tokens=1048576", "--compile=true"]
    command = [PY, "-m", "scripts.base_train", *settings, "--eval_every=-1", "--core_metric_every=-1",
               "--sample_every=-1", "--model_tag=check"]
    code, out = run("base_train", command, 150 if DRY else 330)
    result = {"command": " ".join(["python", "-m", "scripts.base_train", *settings]), **parse_train_log(out)}
    if code != 0:
        raise StepFailed(f"base_train exited with {code}: {json.dumps(result)}\n{tail(out, 25)}")
    return result


ENGINE_CODE = r"""
import json, sys, time, torch
from nanochat.checkpoint_manager import load_model
from nanochat.common import autodetect_device_type
device = torch.device(sys.argv[1] or autodetect_device_type())
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag="check")
prompt = tokenizer.encode("The capital of France is", prepend=tokenizer.get_bos_token_id())
max_tokens = int(sys.argv[2])
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
results = {}
try:
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    def generate(batch):
        rows, _ = engine.generate_batch(prompt, num_samples=batch, max_tokens=max_tokens, temperature=1.0, top_k=50, seed=1)
        return sum(len(row) - len(prompt) for row in rows)
    results["via"] = "nanochat.engine.Engine.generate_batch"
except ImportError:
    def generate(batch):  # the naive reference sampler: one row, no cache reuse across rows
        return sum(len(list(model.generate(prompt, max_tokens=max_tokens, temperature=1.0, top_k=50, seed=1))) for _ in range(batch))
    results["via"] = "GPT.generate (nanochat.engine not importable)"
with torch.inference_mode():
    generate(1)  # warm-up
    for batch in (1, 16):
        sync(); t0 = time.time(); tokens = generate(batch); sync(); dt = time.time() - t0
        results[f"batch{batch}"] = {"tokens": tokens, "seconds": round(dt, 3), "tok_per_s": round(tokens / dt, 1)}
print("ENGINE " + json.dumps(results))
"""


@step("engine", needs=("base_train",))
def engine():
    device = "cpu" if DRY else ""
    code, out = run("engine", [PY, "-c", ENGINE_CODE, device, "16" if DRY else "256"], 180)
    check(code, out, "the decode benchmark")
    result = json.loads(re.search(r"^ENGINE (.+)$", out, re.M).group(1))
    bench = os.path.join(REPO, "dev", "bench", "engine.py")
    if os.path.exists(bench) and not DRY:
        code, out = run("bench_engine", [PY, "-m", "dev.bench.engine"], 120)
        objects = [line for line in out.splitlines() if line.startswith("{")]
        result["dev_bench_engine"] = json.loads(objects[-1]) if code == 0 and objects else f"exit {code}: {tail(out, 5)}"
    return result


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.read().decode("utf-8", errors="replace")


@step("chat_web", needs=("base_train",))
def chat_web():
    missing = [name for name in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(name) is None]
    if missing or not os.path.exists(os.path.join(REPO, "scripts", "chat_web.py")):
        return {"status": "skipped", "why": f"missing: {', '.join(missing) or 'scripts/chat_web.py'}"}
    # serve the base model as if it were the SFT model: the server only needs some checkpoint
    source = os.path.join(base_dir, "base_checkpoints", "check")
    target = os.path.join(base_dir, "chatsft_checkpoints", "check")
    shutil.copytree(source, target, copy_function=os.link)
    port = free_port()
    command = [PY, "-m", "scripts.chat_web", "-i", "sft", "-g", "check", "-p", str(port), "--host", "127.0.0.1",
               "--max_batch=4", *(["--device_type=cpu"] if DRY else [])]
    log = open(os.path.join(log_dir, "chat_web.log"), "w", encoding="utf-8")
    server = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    result = {}
    try:
        deadline, ready = time.time() + 150, False
        while time.time() < deadline and server.poll() is None and not ready:
            try:
                ready = json.loads(http(base_url + "/health", timeout=5)[1]).get("ready", False)
            except Exception:
                pass
            time.sleep(1)
        if not ready:
            log.flush()
            with open(log.name, encoding="utf-8", errors="replace") as f:
                raise StepFailed(f"the server did not become ready (exit {server.poll()}):\n{tail(f.read(), 25)}")
        result["ready_after_s"] = round(time.time() - (deadline - 150), 1)
        message = [{"role": "user", "content": "Hello! What is the capital of France?"}]
        t0 = time.time()
        status, text = http(base_url + "/v1/chat/completions", {"model": "nanochat", "messages": message, "max_tokens": 24})
        reply = json.loads(text)["choices"][0]["message"]["content"]
        result["openai"] = {"status": status, "seconds": round(time.time() - t0, 2), "reply_chars": len(reply)}
        t0 = time.time()
        status, text = http(base_url + "/chat/completions", {"messages": message, "max_tokens": 24})
        events = [line for line in text.splitlines() if line.startswith("data:")]
        result["native_stream"] = {"status": status, "seconds": round(time.time() - t0, 2), "events": len(events),
                                   "done": any('"done"' in line for line in events)}
        if not result["native_stream"]["done"]:
            raise StepFailed(f"the stream did not end with done: {events[-3:]}")
    finally:
        if server.poll() is None:  # its own process group: the server and anything it started
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        log.close()
    return result


# -----------------------------------------------------------------------------
# The summary

summary["total_seconds"] = round(time.time() - T0, 1)
for name, record in summary["steps"].items():  # a step may report itself skipped (e.g. chat_web without fastapi)
    if record.get("status") == "skipped" and "why" not in record:
        record["why"] = "?"
summary["ok"] = all(r["status"] in ("ok", "skipped") for r in summary["steps"].values())
summary["failed"] = [name for name, r in summary["steps"].items() if r["status"] == "failed"]
if os.environ.get("OUT"):  # every step's full log, for the figures behind the summary
    os.makedirs(os.environ["OUT"], exist_ok=True)
    with open(os.path.join(os.environ["OUT"], "gpu_check_logs.txt"), "w", encoding="utf-8") as out:
        for name in sorted(os.listdir(log_dir)):
            with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
                out.write(f"===== {name}\n{f.read()[-200_000:]}\n")
if args.keep:
    summary["work_dir"] = work_dir
else:
    shutil.rmtree(work_dir, ignore_errors=True)
if os.environ.get("OUT"):
    os.makedirs(os.environ["OUT"], exist_ok=True)
    with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
print(json.dumps(summary), flush=True)
