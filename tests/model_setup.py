"""Helpers for tests that need a trained-looking model (not a test file): a tokenizer plus a small randomly
initialized GPT saved as a real checkpoint of any source (base, mid, sft, rl), so that load_model, the engine,
the chat scripts and the evaluations run on it exactly as on a trained one."""

from pathlib import Path

import torch

from nanochat.checkpoint_manager import CHECKPOINT_DIRS, save_checkpoint
from nanochat.gpt import GPT, GPTConfig

from pretraining_setup import corpus_text, install_tokenizer


def tiny_config(vocab_size, n_layer=2, n_embd=64, n_head=2, n_kv_head=2, sequence_len=256, **architecture):
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, **architecture)


def build_tiny_model(config, seed=0, device="cpu"):
    """A GPT with every weight random (the output projections too, which init_weights zeroes), so that its
    outputs depend on the input and differ between tokens, as a trained model's do."""
    torch.manual_seed(seed)
    model = GPT.create(config, device)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.5)
    return model.eval()


def make_chat_checkpoint(base_dir, source="sft", model_tag="d2", step=0, vocab_size=None, seed=0, **config_overrides):
    """Tokenizer (byte-level when vocab_size is None, else BPE on the embedded corpus) + a tiny model saved as
    <base_dir>/<source>_checkpoints/<model_tag>/ step `step`. Returns (model, tokenizer)."""
    docs = None if vocab_size is None else corpus_text("shard_00000.parquet")[:200]
    tokenizer = install_tokenizer(base_dir, vocab_size, docs)
    config = tiny_config(tokenizer.get_vocab_size(), **config_overrides)
    model = build_tiny_model(config, seed=seed)
    directory = Path(base_dir) / CHECKPOINT_DIRS[source] / model_tag
    meta = {"step": step, "model_config": vars(config), "user_config": {}, "world_size": 1}
    save_checkpoint(str(directory), step, model.state_dict(), None, meta)
    return model, tokenizer
