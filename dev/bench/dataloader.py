"""
Pretraining dataloader throughput on this machine. Prints one JSON object with:
  - loader: tokens/s that tokenizing_distributed_data_loader_with_state delivers, per (B, T), end to end
    (parquet read, batched multi-threaded tokenization, packing, tensors), over enough tokens to cross many
    row groups, start-up included;
  - plain_loop: tokens/s of reading the same documents and tokenizing them one by one in a Python loop (the peer);
  - train_step: tokens/s a d<depth> forward+backward consumes on the CPU at B=4, T=512, i.e. whether the loader
    keeps up with training here.

Needs data in <base>/base_data (`python -m nanochat.dataset --embedded` is enough) and the trained tokenizer in
<base>/tokenizer (`python -m scripts.tok_train`).

Usage:
    python -m dev.bench.dataloader
    python -m dev.bench.dataloader --batch_sizes=4,8,32 --seq_lens=512,1024,2048 --num_tokens=4000000
"""

import json
import os
import platform
import time

import torch

from dev.bench import log, settings
from nanochat.common import cpu_name
from nanochat.dataloader import tokenizing_distributed_data_loader_with_state
from nanochat.dataset import list_parquet_files, parquets_iter_batched
from nanochat.tokenizer import get_tokenizer

# Settings
batch_sizes = "4,32"  # comma-separated B values
seq_lens = "512,2048"  # comma-separated T values
num_tokens = 2_000_000  # tokens timed per (B, T); keep it many row groups long (FineWeb: ~1M tokens each, embedded: ~0.25M)
tokenizer_threads = 0  # 0 = the loader's default: the CPUs this process may use
bos_aligned = False
depth = 4  # model for the train-step measurement
train_steps = 5  # timed forward+backward steps (0 = skip)
user_config = settings(globals())

tokenizer = get_tokenizer()


# -----------------------------------------------------------------------------
# The loader, per (B, T)

loader_results = []
for T in [int(t) for t in seq_lens.split(",")]:
    for B in [int(b) for b in batch_sizes.split(",")]:
        num_batches = max(1, num_tokens // (B * T))
        t0 = time.perf_counter()
        loader = tokenizing_distributed_data_loader_with_state(
            B, T, "train", tokenizer_threads=tokenizer_threads or None, bos_aligned=bos_aligned, tokenizer=tokenizer,
            rank=0, world_size=1)
        for _ in range(num_batches):
            inputs, targets, state = next(loader)
        seconds = time.perf_counter() - t0
        tokens = num_batches * B * T
        loader_results.append({"B": B, "T": T, "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds)})
        log(f"loader B={B} T={T}: {tokens / seconds:,.0f} tokens/s (ended at {state})")

# -----------------------------------------------------------------------------
# The peer: the same documents, read and tokenized one at a time

t0 = time.perf_counter()
plain_tokens = 0
for text in (text for texts in parquets_iter_batched("train") for text in texts):
    plain_tokens += len(tokenizer.encode(text)) + 1  # + the BOS the loader adds
    if plain_tokens >= num_tokens:
        break
plain_seconds = time.perf_counter() - t0
plain_loop = {"tokens": plain_tokens, "seconds": round(plain_seconds, 3), "tokens_per_s": round(plain_tokens / plain_seconds)}
log(f"plain loop: {plain_tokens / plain_seconds:,.0f} tokens/s")

# -----------------------------------------------------------------------------
# What a d<depth> train step consumes on this CPU

train_step = None
if train_steps > 0:
    from nanochat.gpt import GPT, GPTConfig, dims_for_depth

    B, T = 4, 512
    config = GPTConfig(sequence_len=T, vocab_size=tokenizer.get_vocab_size(), **dims_for_depth(depth))
    model = GPT.create(config, "cpu")
    loader = tokenizing_distributed_data_loader_with_state(B, T, "train", tokenizer=tokenizer, rank=0, world_size=1)
    batches = [next(loader)[:2] for _ in range(train_steps + 1)]
    for step, (inputs, targets) in enumerate(batches):
        if step == 1:
            t0 = time.perf_counter()  # step 0 is the warm-up
        model(inputs, targets).backward()
        model.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    train_step = {"depth": depth, "B": B, "T": T, "steps": train_steps, "seconds": round(seconds, 3),
                  "tokens_per_s": round(train_steps * B * T / seconds), "torch_threads": torch.get_num_threads()}
    log(f"d{depth} forward+backward: {train_step['tokens_per_s']:,} tokens/s")

best_loader = max(r["tokens_per_s"] for r in loader_results)
print(json.dumps({
    "benchmark": "dataloader",
    "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count()},
    "settings": user_config,
    "tokenizer": {"vocab_size": tokenizer.get_vocab_size()},
    "train_shards": len(list_parquet_files(split="train")),
    "loader": loader_results,
    "plain_loop": plain_loop,
    "loader_speedup_vs_plain_loop": round(best_loader / plain_loop["tokens_per_s"], 2),
    "train_step": train_step,
    "loader_vs_train_step": None if train_step is None else round(best_loader / train_step["tokens_per_s"], 1),
}, indent=2))
