"""
Train the BPE tokenizer on the pretraining text and save it to <base>/tokenizer/.

Reads documents of the train split (put there by `python -m nanochat.dataset -n 8`, or offline by
`python -m nanochat.dataset --embedded`), each cropped to doc_cap characters, until max_chars characters in all;
trains rustbpe; writes tokenizer.tiktoken + tokenizer.json, and token_bytes.pt (bytes per token id, used for
bits-per-byte). Single process: run it with python, not torchrun.

Usage:
    python -m scripts.tok_train
    python -m scripts.tok_train --max_chars=20_000_000 --vocab_size=8192
"""

import os
import time

import torch
from tqdm import tqdm

from nanochat.common import get_base_dir, write_atomic
from nanochat.configurator import check_positive, configure
from nanochat.dataset import parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer, compute_token_bytes

# Settings
max_chars = 2_000_000_000  # characters of training text, enough for a stable 64K vocab (the reference's speedrun)
doc_cap = 10_000  # crop each document to this many characters, so a few huge documents cannot dominate the counts
vocab_size = 65536  # 2^16, special tokens included
user_config = configure(globals())
check_positive(user_config, "max_chars", "doc_cap")

# -----------------------------------------------------------------------------
# Train

train_chars = 0  # characters actually handed to the trainer (less than max_chars if the split is smaller)


def text_iterator():
    """Train-split documents cropped to doc_cap characters, until max_chars characters in all."""
    global train_chars
    with tqdm(total=max_chars, unit="char", unit_scale=True, desc="tokenizer training text") as progress:
        for batch in parquets_iter_batched(split="train"):
            for doc in batch:
                doc = doc[:doc_cap]
                train_chars += len(doc)
                progress.update(len(doc))
                yield doc
                if train_chars >= max_chars:
                    return


t0 = time.time()
tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), vocab_size)
train_time = time.time() - t0
print(f"Trained a {tokenizer.get_vocab_size():,}-token vocabulary on {train_chars:,} characters in {train_time:.1f}s")

# -----------------------------------------------------------------------------
# Save, then check that what was saved loads back and round-trips text of many kinds

tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
tokenizer.save(tokenizer_dir)
print(f"Saved the tokenizer to {tokenizer_dir}")

sanity_text = (
    "Hello world! This is a test.\n"
    "Numbers: 123, 4567, 89.01, 1e-5\n"
    "Contractions: I'm, you're, it's, they'll, we'd\n"
    "Symbols: @#$%^&*()[]{} -> => != <|bos|>\n"
    "Unicode: 你好世界 안녕하세요 Привет café naïve 🌍🚀👍🏽\n"
    "    def f(x):\n\treturn x ** 2  # indented code\n\n\n"
)
loaded = RustBPETokenizer.from_directory(tokenizer_dir)
sanity_ids = loaded.encode(sanity_text)
assert loaded.decode(sanity_ids) == sanity_text, "the saved tokenizer does not round-trip text"
assert sanity_ids == tokenizer.encode(sanity_text), "the saved tokenizer encodes differently from the trained one"
print(f"Round trip OK: {len(sanity_text)} characters -> {len(sanity_ids)} tokens -> the same text")

token_bytes = compute_token_bytes(loaded)
token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
write_atomic(token_bytes_path, lambda f: torch.save(token_bytes, f))
print(f"Saved token_bytes to {token_bytes_path}")

# -----------------------------------------------------------------------------
# Stats and report

text_token_bytes = token_bytes[token_bytes > 0].float()  # special tokens stand for no text
stats = {
    "train_chars": train_chars,
    "train_time_s": round(train_time, 2),
    "vocab_size": tokenizer.get_vocab_size(),
    "num_special_tokens": len(SPECIAL_TOKENS),
    "token_bytes_min": int(text_token_bytes.min()),
    "token_bytes_max": int(text_token_bytes.max()),
    "token_bytes_mean": round(text_token_bytes.mean().item(), 3),
    "token_bytes_std": round(text_token_bytes.std().item(), 3),
}
for name, value in stats.items():
    print(f"{name}: {value}")

get_report().log(section="Tokenizer training", data=[user_config, stats])
