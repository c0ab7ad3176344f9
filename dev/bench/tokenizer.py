"""
Tokenizer speed on this machine. Prints one JSON object with:
  - train: per vocab size, seconds, chars/s and peak memory of training our Rust trainer (rustbpe) vs HuggingFace
    `tokenizers` (BpeTrainer) on the same text with the same split pattern, and the speedup. Each training runs in
    its own subprocess; rss_delta_mib is its peak RSS minus its RSS after loading the text.
  - encode: chars/s of encoding the same documents with our vocab through tiktoken (what nanochat uses), rustbpe's
    own encoder and HF tokenizers, and with GPT-2's (r50k_base) through tiktoken: one document at a time on one
    thread, and batched at several thread counts.
Text: the prose shards in data_dir (3,715 documents, 27.7M chars: English prose + Python/PostgreSQL/SQLite docs).

Usage:
    python -m dev.bench.tokenizer
    python -m dev.bench.tokenizer --max_chars=2000000 --encode_chars=500000 --vocab_sizes=1024 --encode_vocab_size=1024
"""

import glob
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq

from dev.bench import REPO_ROOT, log, settings

# Settings
data_dir = "../shared/data/pretrain_prose"  # parquet shards with a `text` column
tiktoken_dir = "../shared/data/tiktoken"  # holds r50k_base.tiktoken (GPT-2's ranks)
max_chars = 0  # characters of text for training and encoding (0 = all of data_dir, 27.7M chars)
vocab_sizes = "4096,32768"  # comma-separated vocab sizes to train (256 byte tokens + merges, no special tokens)
repeats = 1  # trainings per trainer and vocab size (best time)
encode_vocab_size = 32768  # the vocab whose encoding speed is measured
encode_chars = 10_000_000  # characters of the (fixed, leading) documents timed for encoding
encode_threads = "1,2,4,8"  # thread counts for the batched encoders that take one
encode_repeats = 2  # timed runs per encoder (best time)
worker = ""  # internal: "rust:<vocab>" or "hf:<vocab>", the subprocess that trains one tokenizer
worker_save = ""  # internal: where an hf worker saves its tokenizer.json, so the parent can reuse it for encoding
worker_pattern = ""  # internal: the split pattern, handed over so that workers need not import nanochat.tokenizer,
# whose torch import alone is ~580 MiB of RSS that would swamp the trainers' peaks
user_config = settings(globals())


def mib(kib):
    return round(kib / 1024, 1)


def rss_kib(field):
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that over from the
    parent through fork and exec, so every worker would report at least the parent's RSS (torch included)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def load_texts():
    """All documents of data_dir in shard order, until max_chars characters (0 = all). One shard at a time, so
    the load's own peak memory stays small next to the trainers'."""
    paths = sorted(glob.glob(os.path.join(data_dir, "*.parquet")))
    if not paths:
        raise SystemExit(f"no parquet shards in --data_dir={data_dir!r}")
    texts, chars = [], 0
    for path in paths:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            if max_chars and chars >= max_chars:
                return texts
            texts.append(text)
            chars += len(text)
    return texts


def train_hf(texts, vocab_size, pattern):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # the same recipe as ours: split with our pattern, then BPE over bytes (ByteLevel maps each byte to a char)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# -----------------------------------------------------------------------------
# Worker: train one tokenizer, print its time and memory as one JSON line

if worker:
    import rustbpe

    trainer_name, vocab_size = worker.split(":")[0], int(worker.split(":")[1])
    texts = load_texts()
    load_peak_kib, baseline_kib = rss_kib("VmHWM"), rss_kib("VmRSS")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if trainer_name == "rust":
            tokenizer = rustbpe.Tokenizer()
            tokenizer.train_from_iterator(iter(texts), vocab_size, pattern=worker_pattern)
            trained_vocab_size = len(tokenizer.get_mergeable_ranks())
        else:
            tokenizer = train_hf(texts, vocab_size, worker_pattern)
            trained_vocab_size = tokenizer.get_vocab_size()
        best = min(best, time.perf_counter() - t0)
    peak_kib = rss_kib("VmHWM")
    if worker_save:
        tokenizer.save(worker_save)
    chars = sum(len(text) for text in texts)
    print(json.dumps({"seconds": round(best, 2), "chars_per_s": round(chars / best), "vocab_size": trained_vocab_size,
                      "peak_rss_mib": mib(peak_kib), "rss_delta_mib": mib(peak_kib - baseline_kib),
                      "baseline_rss_mib": mib(baseline_kib), "load_peak_rss_mib": mib(load_peak_kib)}))
    sys.exit(0)

# -----------------------------------------------------------------------------
# Parent: training, one subprocess per trainer and vocab size

import rustbpe  # noqa: E402
import tiktoken  # noqa: E402
from tiktoken.load import load_tiktoken_bpe  # noqa: E402
from tiktoken_ext.openai_public import r50k_pat_str  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from nanochat.common import cpu_name  # noqa: E402
from nanochat.tokenizer import SPLIT_PATTERN, RustBPETokenizer, available_cpus  # noqa: E402

data_dir, tiktoken_dir = os.path.abspath(data_dir), os.path.abspath(tiktoken_dir)  # the workers run in REPO_ROOT
texts = load_texts()
text_chars = sum(len(text) for text in texts)
log(f"{len(texts):,} documents, {text_chars:,} chars")
scratch = tempfile.TemporaryDirectory()
hf_json = os.path.join(scratch.name, "tokenizer.json")


def run_worker(name, vocab_size):
    args = [f"--{k}={v}" for k, v in user_config.items() if not k.startswith("worker") and k != "data_dir"]
    args += [f"--data_dir={data_dir}", f"--worker={name}:{vocab_size}", f"--worker_pattern={SPLIT_PATTERN}"]
    if name == "hf" and vocab_size == encode_vocab_size:
        args.append(f"--worker_save={hf_json}")  # HF training is the slow one: train it once, reuse it to encode
    log(f"training {name} at vocab {vocab_size}")
    result = subprocess.run([sys.executable, "-m", "dev.bench.tokenizer", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {name}:{vocab_size} worker failed (exit {result.returncode}); its log is above")
    return json.loads(result.stdout.strip().splitlines()[-1])


train_results = []
for vocab_size in [int(v) for v in vocab_sizes.split(",")]:
    rust, hf = run_worker("rust", vocab_size), run_worker("hf", vocab_size)
    train_results.append({"vocab_size": vocab_size, "rustbpe": rust, "hf_tokenizers": hf,
                          "speedup": round(hf["seconds"] / rust["seconds"], 2)})
    log(f"vocab {vocab_size}: rustbpe {rust['seconds']}s, HF {hf['seconds']}s, speedup {train_results[-1]['speedup']}x")

# -----------------------------------------------------------------------------
# Encoding: a fixed subset of the same documents, every encoder on the same list

log(f"training the vocab-{encode_vocab_size} tokenizers to encode with")
ours_rust = rustbpe.Tokenizer()  # rustbpe cannot be rebuilt from ranks, so train in-process (the fast one)
ours_rust.train_from_iterator(iter(texts), encode_vocab_size, pattern=SPLIT_PATTERN)
ours = RustBPETokenizer(ours_rust.get_pattern(), dict(ours_rust.get_mergeable_ranks()))
if os.path.exists(hf_json):
    hf_tokenizer = Tokenizer.from_file(hf_json)  # saved by the hf worker at this vocab size
else:
    hf_tokenizer = train_hf(texts, encode_vocab_size, SPLIT_PATTERN)
os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local rank file as is, write no cached copy anywhere
gpt2 = tiktoken.Encoding("r50k_base", pat_str=r50k_pat_str, special_tokens={"<|endoftext|>": 50256},
                         mergeable_ranks=load_tiktoken_bpe(os.path.join(tiktoken_dir, "r50k_base.tiktoken")))

encode_docs, chars = [], 0
for text in texts:
    if chars >= encode_chars:
        break
    encode_docs.append(text)
    chars += len(text)
encode_results = {}


def time_encoder(name, encode_all):
    """Best of encode_repeats runs of encode_all(encode_docs) -> list of id lists."""
    best = float("inf")
    for _ in range(encode_repeats):
        t0 = time.perf_counter()
        rows = encode_all(encode_docs)
        best = min(best, time.perf_counter() - t0)
    tokens = sum(len(row) for row in rows)
    encode_results[name] = {"seconds": round(best, 3), "chars_per_s": round(chars / best), "tokens": tokens,
                            "chars_per_token": round(chars / tokens, 3)}
    log(f"encode {name}: {chars / best:,.0f} chars/s")


# loops run on one thread; the batched calls are what the dataloader uses. HF and rustbpe batches use every
# available thread (rayon), ours defaults to available_cpus() threads.
thread_counts = [int(n) for n in encode_threads.split(",")]
time_encoder("ours_tiktoken_loop", lambda docs: [ours.encode(doc) for doc in docs])
time_encoder(f"ours_tiktoken_batch_default_{available_cpus()}_threads", lambda docs: ours.encode(docs))
for n in thread_counts:
    time_encoder(f"ours_tiktoken_batch_{n}_threads", lambda docs: ours.encode(docs, num_threads=n))
time_encoder("gpt2_tiktoken_loop", lambda docs: [gpt2.encode_ordinary(doc) for doc in docs])
for n in thread_counts:
    time_encoder(f"gpt2_tiktoken_batch_{n}_threads", lambda docs: gpt2.encode_ordinary_batch(docs, num_threads=n))
time_encoder("hf_tokenizers_loop", lambda docs: [hf_tokenizer.encode(doc).ids for doc in docs])
time_encoder("hf_tokenizers_batch", lambda docs: [encoding.ids for encoding in hf_tokenizer.encode_batch(docs)])
time_encoder("rustbpe_loop", lambda docs: [ours_rust.encode(doc) for doc in docs])
time_encoder("rustbpe_batch", lambda docs: ours_rust.batch_encode(docs))


print(json.dumps({
    "benchmark": "tokenizer",
    "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count(),
                "threads_available": available_cpus()},
    "settings": {k: v for k, v in user_config.items() if not k.startswith("worker")},
    "text": {"docs": len(texts), "chars": text_chars},
    "train": train_results,
    "encode": {"vocab_size": encode_vocab_size, "docs": len(encode_docs), "chars": chars, "results": encode_results},
}, indent=2))
