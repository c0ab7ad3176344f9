"""
The GPU check (run it through dev/gpu_check.sh): speedrun.sh in miniature on CUDA, plus the figures the full run
depends on, within a hard time limit for the whole run (default 8 minutes). The last line printed is ONE JSON summary
(also $OUT/gpu_check.json, with every stage's log in $OUT/gpu_check_logs.txt); exit status 0 when every stage passed.

Stages (real commands of the pipeline, under torchrun with every GPU where the speedrun uses torchrun):
    environment   Python, torch, CUDA, driver, GPUs (check_cuda); every import a stage needs, in a subprocess
    data          the embedded corpus (python -m nanochat.dataset --embedded)
    tokenizer     tok_train (8,192 tokens on 20M characters) and tok_eval; without rustbpe, GPT-4's first ranks
    base_train    d6, compiled, bf16, 300 steps of 16 x 1024 tokens per GPU, then base_loss, base_eval (3 CORE
                  tasks), mid_train, chat_sft, chat_rl (a few steps each), chat_eval after each, the report
    chat_web      the SFT model served to the official `openai` client (streaming and not) and the native stream
    model_tests   tests/test_gpt.py and tests/test_engine.py with their models on the GPU (NANOCHAT_TEST_DEVICE=cuda)
    d12_mfu       base_train d12 as the speedrun shapes it (vocab 65,536, 32 x 2048 per GPU): tokens/s and MFU
    d20_memory    base_train d20 at device_batch_size=32, seq 2048: peak memory (does the speedrun fit?) and MFU
    engine        dev/bench/engine.py at d12 and d20 shapes with random weights
A stage starts once the stages it needs are done, up to 3 at a time; the three measurements run alone at the end.
A failed stage is named in the summary with the tail of its log, and the stages that needed it are skipped.
--dry_run runs every stage on the CPU at tiny sizes: the test suite runs it, so the script is known to work before
a GPU is lent.

Usage:
    bash dev/gpu_check.sh                                    # on the GPU machine, <= 8 minutes
    bash dev/gpu_check.sh --dry_run                          # anywhere, CPU only: a few minutes of CPU
    bash dev/gpu_check.sh --keep                             # keep the work directory (its path is in the summary)
    bash dev/gpu_check.sh --work_dir=/tmp/x --stages=chat_web  # again, only chat_web, on a kept work directory
"""

import argparse
import concurrent.futures
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
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
T0 = float(os.environ.get("GPU_CHECK_T0") or time.time())  # gpu_check.sh's start: choosing the Python counts too

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dry_run", action="store_true", help="every stage on the CPU at tiny sizes")
parser.add_argument("--budget_s", type=float, default=480.0, help="hard limit for the whole run, in seconds")
parser.add_argument("--keep", action="store_true", help="keep the work directory (checkpoints included)")
parser.add_argument("--work_dir", default="", help="work here (e.g. a kept one) instead of a new temporary directory")
parser.add_argument("--stages", default="", help="comma list: run only these (their inputs must be in --work_dir)")
args = parser.parse_args()

DRY = args.dry_run
DEADLINE = T0 + args.budget_s - 15  # 15 s for stopping what runs (10 s at most, see stop) and writing the summary
PY = sys.executable
work_dir = os.path.abspath(args.work_dir) if args.work_dir else tempfile.mkdtemp(prefix="nanochat_gpu_check_")
PIPELINE_DIR = os.path.join(work_dir, "pipeline")  # NANOCHAT_BASE_DIR of the miniature speedrun
PERF_DIR = os.path.join(work_dir, "perf")  # NANOCHAT_BASE_DIR of d12_mfu and d20_memory: the speedrun's vocab
LOG_DIR = os.path.join(work_dir, "logs")
for directory in (PIPELINE_DIR, PERF_DIR, LOG_DIR):
    os.makedirs(directory, exist_ok=True)

import torch  # noqa: E402  (after the settings: --help should not wait for torch)

from nanochat.common import cuda_driver_version  # noqa: E402

# This process never starts CUDA (its context would hold GPU memory through the whole run): the stages do.
NPROC = 1 if DRY else max(1, torch.cuda.device_count())
DEVICE = f"--device_type={'cpu' if DRY else 'cuda'}"
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOCHAT_DATA_DIR": os.path.join(REPO, "data", "tasks"),
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
if DRY:
    ENV["CUDA_VISIBLE_DEVICES"] = ""
CHAT_FILE = os.path.join(REPO, "data", "tasks", "chat", "chatterbot_corpus_english.jsonl")

# Sizes: the GPU's, then the dry run's. Pipeline rows are seq x batch per GPU; every total is a whole number of
# micro-steps for any GPU count.
if not DRY:
    PIPE = dict(depth=6, vocab=8192, chars=20_000_000, seq=1024, batch=16, base_steps=300, mid_steps=30, sft_steps=20,
                rl_steps=3, core_per_task=32, chat_problems=16, max_new_tokens=128)
    PERF_VOCAB, MFU_STEPS, D20_STEPS = 65536, 25, 8
    ENGINE = ["--depths=12,20", "--vocab_size=65536", "--batch_sizes=1,8,32,128", "--num_tokens=128", "--repeats=1",
              "--device_type=cuda"]
else:
    PIPE = dict(depth=2, vocab=512, chars=2_000_000, seq=64, batch=4, base_steps=12, mid_steps=3, sft_steps=2,
                rl_steps=1, core_per_task=2, chat_problems=2, max_new_tokens=16)
    PERF_VOCAB, MFU_STEPS, D20_STEPS = 512, 4, 3
    ENGINE = ["--depths=2", "--vocab_size=512", "--batch_sizes=1,2", "--prompt_tokens=8", "--num_tokens=8",
              "--repeats=1", "--threads=1", "--device_type=cpu"]
PIPE_TOKENS = PIPE["seq"] * PIPE["batch"] * NPROC  # one micro-step of every GPU
TAG = f"d{PIPE['depth']}"

# What each stage imports beyond what every stage needs (the environment stage checks them all for real)
BASE_IMPORTS = ["torch", "numpy", "tiktoken", "pyarrow", "regex", "requests", "filelock", "psutil", "tqdm", "yaml"]
STAGE_IMPORTS = {"report": ["matplotlib"], "model_tests": ["pytest"],
                 "chat_web": ["fastapi", "uvicorn", "pydantic", "nanochat.server", "openai"]}

# -----------------------------------------------------------------------------
# Running commands


class StageFailed(Exception):
    pass


class OutOfTime(StageFailed):
    pass


def remaining():
    return DEADLINE - time.time()


def tail(text, lines=20):
    """The last lines of a log, after its first `error:` line (a user error under torchrun is followed by many lines
    of the launcher's own report)."""
    errors = re.findall(r"^(?:\[rank\d+\]: )?(error: .*)$", text, re.M)
    return "\n".join(errors[:1] + text.strip().splitlines()[-lines:])


def run(log_name, command, base_dir=PIPELINE_DIR, env=None, limit_s=None):
    """Run a command from the repo root in its own process group, its output appended to logs/<log_name>.log, until it
    ends, limit_s passes or the whole run's time is up (then it and everything it started are killed). Returns its
    output; a non-zero exit raises StageFailed with the tail of the output. A stage's own limit is sized for a GPU:
    the dry run, on whatever CPU and load it finds, is bound by its budget only."""
    limit_s = float("inf") if DRY or not limit_s else limit_s
    timeout, out_of_budget = min(remaining(), limit_s), remaining() < limit_s
    if timeout < 1:
        raise OutOfTime(f"no time left to start: {' '.join(command)}")
    log_path = os.path.join(LOG_DIR, f"{log_name}.log")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env={**ENV, "NANOCHAT_BASE_DIR": base_dir, **(env or {})},
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(process)
            code = None
    with open(log_path, encoding="utf-8", errors="replace") as f:
        output = f.read()
    if code is None:
        why = "the whole run's time was up" if out_of_budget else f"its limit of {limit_s:.0f}s passed"
        raise (OutOfTime if out_of_budget else StageFailed)(
            f"stopped after {timeout:.0f}s ({why}): {' '.join(command[:6])} ...\n{tail(output)}")
    if code != 0:
        raise StageFailed(f"exit {code}: {' '.join(command[:6])} ...\n{tail(output)}")
    return output


def stop(process):
    """SIGTERM to the process group (torchrun's workers, a server's threads), then SIGKILL after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass


def script(name, *settings, dry_launcher=False):
    """python -m scripts.<name> settings..., under torchrun with every GPU, as the speedrun runs it. The dry run
    launches only the pipeline's base_train that way: each launcher costs a torch import, and one proves the path."""
    if not DRY or dry_launcher:
        return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NPROC}", "-m", f"scripts.{name}",
                "--", *settings]
    return [PY, "-m", f"scripts.{name}", *settings]


def figures(output, **patterns):
    """{name: the last match of each regex's first group in output (a number when it parses as one)}."""
    found = {}
    for name, pattern in patterns.items():
        matches = re.findall(pattern, output, re.M)
        if matches:
            value = matches[-1].replace(",", "")
            try:
                found[name] = float(value) if "." in value else int(value)
            except ValueError:
                found[name] = matches[-1].strip()
    return found


def train_figures(output, warm_up):
    """base_train's log: steps, first and last loss, median tok/s and MFU after warm_up steps, peak memory, val bpb."""
    steps = [(int(m[0]), float(m[1]), float(m[2].replace(",", "")), float(m[3])) for m in re.findall(
        r"^step (\d+)/\d+ .*?\| loss ([\d.]+) .*?\| tok/s ([\d,]+) \| mfu ([\d.]+)%", output, re.M)]
    timed = [s for s in steps if s[0] > warm_up] or steps
    if not steps:
        raise StageFailed(f"no step lines in base_train's log:\n{tail(output)}")
    result = {"steps": len(steps), "loss_first_last": [steps[0][1], steps[-1][1]],
              "tok_per_s_median": round(statistics.median(s[2] for s in timed)),
              "mfu_percent_median": round(statistics.median(s[3] for s in timed), 2)}
    return result | figures(output, val_bpb=r"val bpb ([\d.]+)", peak_memory=r"Peak memory: ([^|]+?) \|",
                            parameters=r"Parameters: ([\d,]+)")


# -----------------------------------------------------------------------------
# The stages. Each returns the figures for the summary or raises; STAGES below says what each needs.

IMPORT_CHECK = r"""
import importlib, json, sys
results = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        # run from the repo root, the bare rustbpe/ source folder imports too: only the built extension has Tokenizer
        results[name] = "ok" if name != "rustbpe" or hasattr(module, "Tokenizer") else "the extension is not built"
    except BaseException as e:
        results[name] = f"{type(e).__name__}: {e}"
print("IMPORTS " + json.dumps(results))
"""


def environment():
    info = {"python": platform.python_version(), "executable": PY, "why_this_python": os.environ.get(
        "GPU_CHECK_PYTHON_WHY", "run directly"), "pythonpath": os.environ.get("PYTHONPATH", ""),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cpus": os.cpu_count()}
    driver = cuda_driver_version()
    info["driver_cuda"] = f"{driver[0]}.{driver[1]}" if driver else None
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
    modules = BASE_IMPORTS + ["rustbpe"] + sorted({m for ms in STAGE_IMPORTS.values() for m in ms})
    output = run("environment", [PY, "-c", IMPORT_CHECK, *modules], limit_s=120)
    info["imports"] = json.loads(re.search(r"^IMPORTS (.+)$", output, re.M).group(1))
    missing = {name: why for name, why in info["imports"].items() if name in BASE_IMPORTS and why != "ok"}
    if missing:
        raise StageFailed(f"every stage needs these, and they do not import: {missing}")
    # speedrun.sh's own check: one line saying what runs, or an error saying why not
    output = run("environment", [PY, "-m", "nanochat.common", DEVICE, f"--nproc_per_node={NPROC}"], limit_s=60)
    info["check_cuda"] = output.strip().splitlines()[-1]
    return info


def data():
    run("data", [PY, "-m", "nanochat.dataset", "--embedded"], limit_s=120)
    shards = sorted(name for name in os.listdir(os.path.join(PIPELINE_DIR, "base_data")) if name.endswith(".parquet"))
    if not os.path.exists(os.path.join(PERF_DIR, "base_data")):
        os.symlink(os.path.join(PIPELINE_DIR, "base_data"), os.path.join(PERF_DIR, "base_data"))
    return {"shards": len(shards)}


def cl100k_tokenizer(base_dir, vocab_size):
    """A ready tokenizer of vocab_size tokens without training: the lowest ranks of GPT-4's cl100k_base (shipped in
    data/tiktoken/) are a valid smaller BPE table (every merge's parts rank lower), plus nanochat's special tokens."""
    import base64

    from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer, compute_token_bytes

    with open(os.path.join(REPO, "data", "tiktoken", "cl100k_base.tiktoken"), "rb") as f:
        lines = f.read().splitlines()[: vocab_size - len(SPECIAL_TOKENS)]
    tokenizer = RustBPETokenizer(SPLIT_PATTERN, {base64.b64decode(t): int(r) for t, r in (ln.split() for ln in lines)})
    directory = os.path.join(base_dir, "tokenizer")
    tokenizer.save(directory)
    torch.save(compute_token_bytes(tokenizer), os.path.join(directory, "token_bytes.pt"))
    text = "The capital of France is Paris. 12 + 30 = 42"
    assert tokenizer.decode(tokenizer.encode(text)) == text and tokenizer.get_vocab_size() == vocab_size
    return {"vocab_size": vocab_size, "kind": f"GPT-4's cl100k_base ranks 0..{len(lines) - 1} + special tokens"}


def tokenizer():
    if IMPORTS.get("rustbpe", "ok") != "ok":  # a bare machine: the pipeline still needs a tokenizer
        return cl100k_tokenizer(PIPELINE_DIR, PIPE["vocab"]) | {"tok_train": f"not run: rustbpe {IMPORTS['rustbpe']}"}
    output = run("tokenizer", [PY, "-m", "scripts.tok_train", f"--max_chars={PIPE['chars']}",
                               f"--vocab_size={PIPE['vocab']}"], limit_s=120)
    result = figures(output, train_seconds=r"^train_time_s: ([\d.]+)")
    run("tokenizer", [PY, "-m", "scripts.tok_eval", "--num_docs=20"], limit_s=60)
    return result | {"vocab_size": PIPE["vocab"], "kind": "tok_train"}


def base_train():
    output = run("base_train", script(
        "base_train", f"--depth={PIPE['depth']}", f"--max_seq_len={PIPE['seq']}",
        f"--device_batch_size={PIPE['batch']}", f"--total_batch_size={PIPE_TOKENS}", f"--num_iterations={PIPE['base_steps']}",
        f"--eval_every={max(1, PIPE['base_steps'] // 3)}", f"--eval_tokens={4 * PIPE_TOKENS}", "--core_metric_every=-1",
        "--sample_every=-1", f"--compile={'false' if DRY else 'true'}", DEVICE, dry_launcher=True), limit_s=240)
    result = train_figures(output, warm_up=PIPE["base_steps"] // 2)
    if result["loss_first_last"][1] >= result["loss_first_last"][0]:
        raise StageFailed(f"the loss did not fall: {result}")
    return result


def base_loss():
    output = run("base_loss", script("base_loss", f"--device_batch_size={PIPE['batch']}",
                                     f"--split_tokens={8 * PIPE_TOKENS}", DEVICE), limit_s=90)
    return figures(output, train_bpb=r"^train bpb: ([\d.]+)", val_bpb=r"^val bpb: ([\d.]+)",
                   unigram_bpb=r"vs ([\d.]+) for the unigram baseline")


def base_eval():
    # a bundle of three CORE tasks, one of each kind; the others are missing, so CORE reads "over 3 of 22 tasks"
    bundle = os.path.join(work_dir, "core_bundle")
    for name in ("core.yaml", "eval_meta_data.csv", "eval_data/world_knowledge/arc_easy.jsonl",
                 "eval_data/language_understanding/winograd_wsc.jsonl",
                 "eval_data/language_understanding/lambada_openai.jsonl"):
        os.makedirs(os.path.dirname(os.path.join(bundle, name)), exist_ok=True)
        shutil.copy(os.path.join(REPO, "data", "core_eval", name), os.path.join(bundle, name))
    output = run("base_eval", script("base_eval", f"--bundle_dir={bundle}", f"--max_per_task={PIPE['core_per_task']}",
                                     "--hellaswag_fallback=False", DEVICE), limit_s=120)
    return figures(output, core=r"^CORE over \d+ of \d+ tasks: (-?[\d.]+)", label=r"^(CORE over \d+ of \d+ tasks)")


def mid_train():
    output = run("mid_train", script(
        "mid_train", "--skip=mmlu_aux", f"--smoltalk_file={CHAT_FILE}", f"--max_seq_len={PIPE['seq']}",
        f"--device_batch_size={PIPE['batch']}", f"--total_batch_size={PIPE_TOKENS}",
        f"--num_iterations={PIPE['mid_steps']}", "--eval_every=-1", f"--eval_tokens={2 * PIPE_TOKENS}",
        "--simple_spelling_size=2000", "--spelling_bee_size=2000", DEVICE), limit_s=150)
    return figures(output, loss=r"^step \d+ .*?\| loss ([\d.]+)", val_bpb=r"val bpb ([\d.]+)")


def chat_sft():
    output = run("chat_sft", script(
        "chat_sft", "--skip=arc_easy,arc_challenge", f"--smoltalk_file={CHAT_FILE}", f"--max_seq_len={PIPE['seq']}",
        "--device_batch_size=4", f"--target_examples_per_step={8 * NPROC}", f"--num_iterations={PIPE['sft_steps']}",
        "--eval_every=-1", "--eval_steps=2", "--eval_metrics_every=-1", "--simple_spelling_size=300",
        "--spelling_bee_size=300", DEVICE), limit_s=120)
    return figures(output, loss=r"^step \d+/\d+ \| loss ([\d.]+)", val_loss=r"val loss ([\d.]+)")


def chat_rl():
    output = run("chat_rl", script(
        "chat_rl", "--task=GSM8K", f"--examples_per_step={2 * NPROC}", "--num_samples=4", "--device_batch_size=4",
        f"--max_new_tokens={PIPE['max_new_tokens']}", f"--num_iterations={PIPE['rl_steps']}", "--eval_every=-1",
        "--eval_examples=4", "--eval_num_samples=2", DEVICE), limit_s=150)
    return figures(output, mean_reward=r"mean reward ([\d.]+)")


def chat_eval(source):
    def evaluate():
        output = run(f"chat_eval_{source}", script(
            "chat_eval", "-i", source, "-x", str(PIPE["chat_problems"]), "-m", str(PIPE["max_new_tokens"]), DEVICE),
            limit_s=120)
        # "ARC-Easy: 31.2 ± 5.8 (n=64, base 25.0)* (12.3s)": accuracy in percent, one standard error, baseline
        scores = re.findall(r"^([\w-]+): ([\d.]+) ± ([\d.]+) \(n=(\d+), base ([\d.]+)\)\*? \([\d.]+s\)$", output, re.M)
        return {"tasks": {name: {"accuracy": float(accuracy) / 100, "stderr": float(stderr) / 100, "n": int(n),
                                 "baseline": float(base) / 100} for name, accuracy, stderr, n, base in scores}} | figures(
            output, chatcore=r"^ChatCORE: (-?[\d.]+)")
    return evaluate


def report():
    run("report", [PY, "-m", "nanochat.report", "generate"], limit_s=60)
    with open(os.path.join(PIPELINE_DIR, "report", "report.md"), encoding="utf-8") as f:
        text = f.read()
    if "## Summary" not in text:
        raise StageFailed("report.md has no summary")
    return {"report_chars": len(text)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_web():
    import openai

    port, log_path = free_port(), os.path.join(LOG_DIR, "chat_web.log")
    command = [PY, "-m", "scripts.chat_web", "-i", "sft", "-g", TAG, "-p", str(port), "--host", "127.0.0.1",
               "--max_batch=4", DEVICE]
    with open(log_path, "w", encoding="utf-8") as log:
        server = subprocess.Popen(command, cwd=REPO, env={**ENV, "NANOCHAT_BASE_DIR": PIPELINE_DIR}, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    url, started, result = f"http://127.0.0.1:{port}", time.time(), {}
    try:
        while server.poll() is None and remaining() > 10:  # until /health says ready
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if json.loads(response.read()).get("ready"):
                        break
            except OSError:
                pass
            time.sleep(0.5)
        if server.poll() is not None or remaining() <= 10:
            with open(log_path, encoding="utf-8", errors="replace") as f:
                raise StageFailed(f"the server did not become ready (exit {server.poll()}):\n{tail(f.read(), 30)}")
        result["ready_after_s"] = round(time.time() - started, 1)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=min(60, remaining()))
        messages = [{"role": "user", "content": "Hello! What is the capital of France?"}]
        t0 = time.time()
        reply = client.chat.completions.create(model="nanochat", messages=messages, max_tokens=24, temperature=0)
        if not isinstance(reply.choices[0].message.content, str) or reply.usage.completion_tokens < 1:
            raise StageFailed(f"odd OpenAI reply: {reply}")
        result["openai"] = {"seconds": round(time.time() - t0, 2), "finish_reason": reply.choices[0].finish_reason,
                            "completion_tokens": reply.usage.completion_tokens}
        t0 = time.time()
        chunks = list(client.chat.completions.create(model="nanochat", messages=messages, max_tokens=24,
                                                     temperature=0, stream=True))
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        if streamed != reply.choices[0].message.content:  # greedy: the stream must say what the plain reply said
            raise StageFailed(f"streamed {streamed!r} but the plain reply was {reply.choices[0].message.content!r}")
        result["openai_stream"] = {"seconds": round(time.time() - t0, 2), "chunks": len(chunks)}
        request = urllib.request.Request(url + "/chat/completions", data=json.dumps(
            {"messages": messages, "max_tokens": 24}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=min(60, remaining())) as response:
            events = [line for line in response.read().decode().splitlines() if line.startswith("data:")]
        if not events or '"done": true' not in events[-1]:
            raise StageFailed(f"the native stream did not end with done: {events[-3:]}")
        result["native_stream_events"] = len(events)
    finally:
        stop(server)
    return result


def model_tests():
    files = ["tests/test_gpt.py", "tests/test_engine.py"]
    # with NANOCHAT_TEST_DEVICE set, only the tests that put their tensors on that device run (tests/conftest.py)
    selection = ["-k", "chunked_prefill and MHA or greedy_generation_equals"] if DRY else []
    output = run("model_tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, *selection],
                 env={"NANOCHAT_TEST_DEVICE": "cpu" if DRY else "cuda"}, limit_s=180)
    return {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|deselected)", output)}


def speedrun_shaped(depth, steps):
    """base_train at the speedrun's shapes (vocab 65,536, 32 rows of 2048 per GPU; the dry run: tiny)."""
    def measure():
        seq, batch = (64, 4) if DRY else (2048, 32)
        micro_steps = 2 if depth == 12 else 1  # d12 as the speedrun's 524,288-token steps do: accumulating
        output = run(f"d{depth}", script(
            "base_train", f"--depth={2 if DRY else depth}", f"--max_seq_len={seq}", f"--device_batch_size={batch}",
            f"--total_batch_size={seq * batch * NPROC * micro_steps}", f"--num_iterations={steps}", "--eval_every=-1",
            f"--eval_tokens={seq * batch * NPROC}", "--core_metric_every=-1", "--sample_every=-1",
            f"--model_tag=d{depth}", f"--compile={'false' if DRY else 'true'}", DEVICE), base_dir=PERF_DIR, limit_s=200)
        return train_figures(output, warm_up=steps // 2) | {"device_batch_size": batch, "max_seq_len": seq}
    return measure


def engine():
    output = run("engine", [PY, "-m", "dev.bench.engine", *ENGINE], limit_s=180)
    return {"command": "python -m dev.bench.engine " + " ".join(ENGINE),
            "results": json.loads(output[output.rindex("\n{") + 1:])["results"]}  # its JSON comes last


# name: (function, the stages it needs, runs alone)
STAGES = {
    "environment": (environment, [], False),
    "data": (data, ["environment"], False),
    "tokenizer": (tokenizer, ["data"], False),
    "perf_tokenizer": (lambda: cl100k_tokenizer(PERF_DIR, PERF_VOCAB), ["data"], False),
    "base_train": (base_train, ["tokenizer"], False),
    "model_tests": (model_tests, ["environment"], False),
    "base_loss": (base_loss, ["base_train"], False),
    "base_eval": (base_eval, ["base_train"], False),
    "mid_train": (mid_train, ["base_train"], False),
    "chat_eval_mid": (chat_eval("mid"), ["mid_train"], False),
    "chat_sft": (chat_sft, ["mid_train"], False),
    "chat_eval_sft": (chat_eval("sft"), ["chat_sft"], False),
    "chat_web": (chat_web, ["chat_sft"], False),
    "chat_rl": (chat_rl, ["chat_sft"], False),
    "chat_eval_rl": (chat_eval("rl"), ["chat_rl"], False),
    "report": (report, ["base_loss", "base_eval", "chat_eval_mid", "chat_eval_sft", "chat_eval_rl"], False),
    "d12_mfu": (speedrun_shaped(12, MFU_STEPS), ["perf_tokenizer"], True),
    "d20_memory": (speedrun_shaped(20, D20_STEPS), ["perf_tokenizer"], True),
    "engine": (engine, ["environment"], True),
}

# -----------------------------------------------------------------------------
# The run: stages start in the order above as soon as what they need is done, up to max_parallel at once; a stage
# that runs alone waits for the others to finish and holds the machine while it runs.

selected = [name.strip() for name in args.stages.split(",") if name.strip()] or list(STAGES)
unknown = [name for name in selected if name not in STAGES]
if unknown:
    sys.exit(f"error: --stages: unknown {unknown}; the stages are {', '.join(STAGES)}")
max_parallel = 2 if DRY else 3
records = {name: {"status": "skipped", "why": "not selected"} for name in STAGES if name not in selected}
pending = [name for name in STAGES if name in selected]
running = {}  # name -> future
IMPORTS = {}  # module -> "ok" or its error, from the environment stage
lock = threading.Lock()


def say(message):
    with lock:
        print(f"[{time.time() - T0:6.1f}s] {message}", flush=True)


def execute(name):
    start = time.time()
    try:
        record = {"status": "ok", **(STAGES[name][0]() or {})}
    except OutOfTime as e:
        record = {"status": "out_of_time", "error": str(e)[-3000:]}
    except Exception as e:
        record = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-3000:]}
    record["seconds"] = round(time.time() - start, 1)
    if os.path.exists(os.path.join(LOG_DIR, f"{name}.log")):
        record["log"] = f"{name}.log"  # in summary["logs"]
    return record


with concurrent.futures.ThreadPoolExecutor(max_workers=max_parallel) as pool:
    while pending or running:
        for name, future in list(running.items()):
            if future.done():
                records[name] = future.result()
                del running[name]
                if name == "environment" and records[name]["status"] == "ok":
                    IMPORTS.update(records[name]["imports"])
                status = records[name]["status"]
                say(f"{status} {name} ({records[name]['seconds']}s)" + ("" if status == "ok" else
                                                                         f": {records[name]['error'][:300]}"))
        alone_running = any(STAGES[name][2] for name in running)
        for name in list(pending):
            needs = [need for need in STAGES[name][1] if need in selected]
            failed = [need for need in needs if need in records and records[need]["status"] != "ok"]
            missing = {m: IMPORTS[m] for m in STAGE_IMPORTS.get(name, []) if IMPORTS.get(m, "ok") != "ok"}
            late = remaining() < 1 or any(records[need]["status"] == "out_of_time" for need in failed)
            if failed or missing or late:
                why = ("the time was up before it could start" if late else f"needs {', '.join(failed)}" if failed
                       else f"cannot import {missing}")
                records[name] = {"status": "out_of_time" if late else "skipped", "why": why}
                pending.remove(name)
                say(f"{records[name]['status']} {name}: {why}")
                continue
            if any(need not in records for need in needs) or alone_running:
                continue  # its inputs are not ready yet
            if STAGES[name][2]:  # alone: start when nothing else runs, and start nothing else meanwhile
                if not running:
                    running[name] = pool.submit(execute, name)
                    pending.remove(name)
                    say(f"start {name} (alone)")
                break
            if len(running) < max_parallel:
                running[name] = pool.submit(execute, name)
                pending.remove(name)
                say(f"start {name}")
        time.sleep(0.2)

# -----------------------------------------------------------------------------
# The summary: one JSON line; every log in $OUT/gpu_check_logs.txt; the work directory removed unless kept

summary = {"ok": all(r["status"] == "ok" or r.get("why") == "not selected" for r in records.values()),
           "failed": [name for name in STAGES if records[name]["status"] == "failed"],
           "out_of_time": [name for name in STAGES if records[name]["status"] == "out_of_time"],
           "skipped": [name for name in STAGES if records[name]["status"] == "skipped"
                       and records[name].get("why") != "not selected"],
           "dry_run": DRY, "gpus": NPROC if not DRY else 0, "budget_s": args.budget_s,
           "total_seconds": round(time.time() - T0, 1), "stages": {name: records[name] for name in STAGES}}
out = os.environ.get("OUT")
if out:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "gpu_check_logs.txt"), "w", encoding="utf-8") as f:
        for name in sorted(os.listdir(LOG_DIR)):
            with open(os.path.join(LOG_DIR, name), encoding="utf-8", errors="replace") as log:
                f.write(f"===== {name}\n{log.read()[-300_000:]}\n")
    summary["logs"] = os.path.join(out, "gpu_check_logs.txt")
if args.keep or args.work_dir:
    summary["work_dir"], summary["logs"] = work_dir, LOG_DIR
elif out or summary["ok"]:
    shutil.rmtree(work_dir, ignore_errors=True)
else:  # a failure without $OUT: keep the logs where the summary says, drop the checkpoints
    for directory in (PIPELINE_DIR, PERF_DIR):
        shutil.rmtree(directory, ignore_errors=True)
    summary["logs"] = LOG_DIR
if out:
    with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
print(json.dumps(summary), flush=True)
sys.exit(0 if summary["ok"] else 1)
