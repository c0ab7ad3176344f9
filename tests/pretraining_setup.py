"""Helpers for the pretraining tests (not a test file): a tiny but real base dir (parquet shards of the embedded
corpus + a tokenizer + token_bytes) and runners for scripts.base_train, alone or under torchrun, whose per-step
losses are read back from the curve the script writes (<base>/report/base_train_curve.json)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat import dataset
from nanochat.tokenizer import SPLIT_PATTERN, RustBPETokenizer, compute_token_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = Path(dataset.EMBEDDED_DIR)


def corpus_text(name="shard_00000.parquet"):
    return pq.read_table(EMBEDDED / name).column("text").to_pylist()


def write_shard(path, docs, docs_per_row_group):
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=docs_per_row_group)


def install_tokenizer(base_dir, vocab_size=None, training_docs=None):
    """Save a tokenizer into <base_dir>/tokenizer: byte-level (the 256 bytes + the special tokens, i.e. BPE with no
    merges) when vocab_size is None, else BPE trained by rustbpe on training_docs."""
    if vocab_size is None:
        tokenizer = RustBPETokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})
    else:
        tokenizer = RustBPETokenizer.train_from_iterator(iter(training_docs), vocab_size)
    tokenizer_dir = Path(base_dir) / "tokenizer"
    tokenizer.save(str(tokenizer_dir))
    torch.save(compute_token_bytes(tokenizer), tokenizer_dir / "token_bytes.pt")
    return tokenizer


def make_base_dir(base_dir, vocab_size=None, num_train_docs=48, num_val_docs=16, doc_chars=2000, docs_per_row_group=8):
    """Shards of real documents (cropped to doc_chars) from the embedded corpus, and a tokenizer."""
    data_dir = Path(base_dir) / "base_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    train_docs = [doc[:doc_chars] for doc in corpus_text("shard_00000.parquet")[:num_train_docs]]
    val_docs = [doc[:doc_chars] for doc in corpus_text("shard_00006.parquet")[:num_val_docs]]
    write_shard(data_dir / "shard_00000.parquet", train_docs, docs_per_row_group)
    write_shard(data_dir / dataset.VAL_FILENAME, val_docs, docs_per_row_group)
    install_tokenizer(base_dir, vocab_size, train_docs)
    return Path(base_dir)


def make_aligned_base_dir(base_dir, rows_per_row_group, row_len, num_train_row_groups=32, num_val_row_groups=4):
    """A byte-level base dir whose every row group packs into exactly rows_per_row_group rows of row_len tokens
    (one ASCII document of rows*row_len - 1 characters, + its BOS). With one row group per micro-batch, one process
    accumulating N micro-batches and N processes taking one each see the same batches in the same steps."""
    text = " ".join(corpus_text("shard_00001.parquet")).encode("ascii", "ignore").decode("ascii")
    doc_chars = rows_per_row_group * row_len - 1
    docs = [text[i * doc_chars:(i + 1) * doc_chars] for i in range(num_train_row_groups + num_val_row_groups)]
    assert all(len(doc) == doc_chars for doc in docs), "not enough ASCII text for that many row groups"
    data_dir = Path(base_dir) / "base_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    write_shard(data_dir / "shard_00000.parquet", docs[:num_train_row_groups], 1)
    write_shard(data_dir / dataset.VAL_FILENAME, docs[num_train_row_groups:], 1)
    install_tokenizer(base_dir)
    return Path(base_dir)


def run_base_train(base_dir, *args, nproc=1, timeout=1800, check=True):
    """Run scripts.base_train (under torchrun when nproc > 1) with NANOCHAT_BASE_DIR=base_dir, one thread per process
    (deterministic and kind to a shared machine). Returns the CompletedProcess (stdout + stderr in .stdout)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "scripts.base_train", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "scripts.base_train", "--", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"base_train exited with {result.returncode}:\n{result.stdout[-5000:]}")
    return result


def read_curve(base_dir):
    with open(Path(base_dir) / "report" / "base_train_curve.json", encoding="utf-8") as f:
        return json.load(f)
