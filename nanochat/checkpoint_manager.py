"""
Checkpoints on disk: saving and loading a model with its optimizer shards and metadata, and finding them.

Layout, one directory per source and model tag (the tag defaults to d<depth>):
    <base>/{base,mid,chatsft,chatrl}_checkpoints/<model_tag>/
        model_<step:06d>.pt            the model's state_dict (tensors only; written by rank 0)
        optim_<step:06d>_rank<r>.pt    rank r's optimizer state (sharded across ranks, so every rank writes one)
        meta_<step:06d>.json           model_config, user_config, step, loop and dataloader state, ...
Every file is written atomically, and the meta last, once every rank has written its files: a checkpoint counts
only once its meta exists, so a process killed mid-save never leaves something that looks complete. Loading uses
torch.load(weights_only=True): it runs no pickled code. Also here, for an exact resume: every rank's RNG state as
JSON-able text and the checks that a checkpoint belongs to the run that resumes it.
"""

import base64
import json
import os
import random
import re

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE, MissingFileError, UserError, get_base_dir, logger, write_atomic

CHECKPOINT_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
TRAIN_COMMANDS = {"base": "python -m scripts.base_train", "mid": "python -m scripts.mid_train",
                  "sft": "python -m scripts.chat_sft", "rl": "python -m scripts.chat_rl"}
META_PATTERN = re.compile(r"^meta_(\d+)\.json$")


def checkpoints_root(source):
    """<base>/<source>_checkpoints: the directory holding one subdirectory per model tag."""
    if source not in CHECKPOINT_DIRS:
        raise UserError(f"source={source!r}: expected one of {sorted(CHECKPOINT_DIRS)}")
    return os.path.join(get_base_dir(), CHECKPOINT_DIRS[source])


def checkpoint_dir(source, model_tag):
    return os.path.join(checkpoints_root(source), model_tag)


def _paths(checkpoint_dir, step, rank=0):
    return (os.path.join(checkpoint_dir, f"model_{step:06d}.pt"),
            os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt"),
            os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Write one checkpoint. Call it on every rank: each writes its optimizer shard (when optimizer_data is not
    None), rank 0 the model, and rank 0 the meta once all ranks are done."""
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    os.makedirs(checkpoint_dir, exist_ok=True)  # any rank may get here first
    if optimizer_data is not None:
        write_atomic(optim_path, lambda f: torch.save(optimizer_data, f))
    if rank == 0:
        write_atomic(model_path, lambda f: torch.save(model_data, f))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's optimizer shard is on disk before the meta declares the checkpoint complete
    if rank == 0:
        text = json.dumps(meta_data, indent=2) + "\n"
        write_atomic(meta_path, lambda f: f.write(text.encode("utf-8")))
        logger.info(f"Saved checkpoint {checkpoint_dir} step {step}")


def _complete_steps(checkpoint_dir):
    if not os.path.isdir(checkpoint_dir):
        return []
    return sorted(int(m.group(1)) for m in map(META_PATTERN.match, os.listdir(checkpoint_dir)) if m)


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_data, optimizer_data or None, meta_data) of a complete checkpoint; tensors mapped to device."""
    model_path, optim_path, meta_path = _paths(checkpoint_dir, step, rank)
    if not os.path.exists(meta_path):
        steps = _complete_steps(checkpoint_dir)
        raise MissingFileError(f"no complete checkpoint for step {step} in {checkpoint_dir} ({meta_path} is missing); "
                               f"complete steps there: {steps or 'none'}")
    with open(meta_path, encoding="utf-8") as f:
        meta_data = json.load(f)
    model_data = torch.load(model_path, map_location=device, weights_only=True)
    optimizer_data = None
    if load_optimizer:
        if not os.path.exists(optim_path):
            saved_ranks = meta_data.get("world_size", "an unknown number of")
            raise MissingFileError(f"{optim_path} is missing: the checkpoint holds the optimizer shards of {saved_ranks} "
                                   f"rank(s); resume with the same number of ranks as the run that saved it")
        optimizer_data = torch.load(optim_path, map_location=device, weights_only=True)
    return model_data, optimizer_data, meta_data


def build_model(checkpoint_dir, step, device, phase):
    """(model, tokenizer, meta) from a checkpoint; phase "train" or "eval" sets the model's mode."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import get_tokenizer

    if phase not in ("train", "eval"):
        raise ValueError(f"phase={phase!r}: expected 'train' or 'eval'")
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    # A compiled model's state_dict names every tensor "_orig_mod.<name>" (removeprefix, not lstrip: lstrip
    # strips characters, and would eat the start of names like "o...").
    model_data = {name.removeprefix("_orig_mod."): tensor for name, tensor in model_data.items()}
    config = GPTConfig(**saved_model_config(meta, checkpoint_dir))
    model = GPT.create(config, device)  # init_weights fills the rotary tables; the weights come next
    # Copying into the parameters (not assign=True) keeps the dtypes this device's model uses: bf16 weights
    # saved on a GPU become fp32 on CPU/MPS.
    model.load_state_dict(model_data, strict=True)
    model.train(phase == "train")
    if phase == "eval":
        # Inference only: cast the weights to the compute dtype once, the same values Linear would cast them to at
        # every use. Decoding reads every weight per token, so the per-use casts cost more than the matmuls they feed
        # (d4, vocab 32K, bf16 on CPU: a one-token forward 6.6 -> 4.1 ms).
        model.to(COMPUTE_DTYPE)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"the tokenizer in {get_base_dir()}/tokenizer has {tokenizer.get_vocab_size():,} tokens but the "
                        f"model in {checkpoint_dir} was trained with vocab_size={config.vocab_size:,}: they must be the "
                        f"same tokenizer (was the tokenizer retrained after training this model?)")
    return model, tokenizer, meta


def find_largest_model(checkpoints_dir):
    """The model tag to load by default: d<N> with the largest N, else the most recently modified tag."""
    tags = [name for name in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, name))] \
        if os.path.isdir(checkpoints_dir) else []
    if not tags:
        raise MissingFileError(f"no model checkpoints in {checkpoints_dir}")
    depths = [(int(m.group(1)), tag) for tag in tags if (m := re.fullmatch(r"d(\d+)", tag))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag)))


def find_last_step(checkpoint_dir):
    """The largest step with a complete checkpoint (its meta file exists)."""
    steps = _complete_steps(checkpoint_dir)
    if not steps:
        found = sorted(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else "the directory does not exist"
        raise MissingFileError(f"no complete checkpoint (meta_<step>.json) in {checkpoint_dir}; found: {found or 'nothing'}")
    return steps[-1]


def load_model(source, device, phase, model_tag=None, step=None):
    """(model, tokenizer, meta) of source "base" | "mid" | "sft" | "rl", by default the largest model at its last step;
    meta["model_tag"] says which model that was."""
    root = checkpoints_root(source)
    try:
        model_tag = model_tag or find_largest_model(root)
        directory = os.path.join(root, model_tag)
        if not os.path.isdir(directory):
            tags = sorted(os.listdir(root)) if os.path.isdir(root) else []
            raise MissingFileError(f"no checkpoints for model_tag={model_tag!r} in {root}; tags there: {tags or 'none'}")
        step = find_last_step(directory) if step is None else step
        model, tokenizer, meta = build_model(directory, step, device, phase)
        return model, tokenizer, {**meta, "model_tag": model_tag}
    except MissingFileError as e:
        if "tok_train" in str(e):  # the message already names the fix
            raise
        raise MissingFileError(f"{e}. Train a {source} model first: `{TRAIN_COMMANDS[source]}`") from None


# GPTConfig fields measured and removed since (dev/BENCHMARKS.md, "Quality per FLOP"), at the value the model without
# them equals: checkpoints saved with them off still load and resume
REMOVED_FIELDS = {"attn_gate": False}


def saved_model_config(meta, checkpoint_dir):
    """The GPTConfig fields of a checkpoint's meta, less the removed ones (a UserError where one was on)."""
    config = dict(meta["model_config"])
    for name, off in REMOVED_FIELDS.items():
        if config.pop(name, off) != off:
            raise UserError(f"the checkpoint in {checkpoint_dir} was trained with {name}, a setting removed since: "
                            f"load it with the nanochat that trained it")
    return config


def load_resume_checkpoint(checkpoint_dir, which, device, rank, model_config, world_size):
    """(step, model_data, optimizer_data, meta) of the checkpoint to resume: which is a step number ("200") or
    "last". UserError when it does not fit this run: another model_config, or another number of processes (each rank
    resumes its own optimizer shard, data position and RNG)."""
    if which == "last":
        step = find_last_step(checkpoint_dir)
    elif which.isdigit():
        step = int(which)
    else:
        raise UserError(f"resume_from_step={which!r}: expected '' (start afresh), a step number, or 'last'")
    model_data, optimizer_data, meta = load_checkpoint(checkpoint_dir, step, device, load_optimizer=True, rank=rank)
    from nanochat.gpt import SEED_ARCHITECTURE

    saved = {**SEED_ARCHITECTURE, **saved_model_config(meta, checkpoint_dir)}  # a field newer than the meta: the seed's
    if saved != model_config:
        differing = ", ".join(f"{name}={saved[name]!r} (these settings: {model_config.get(name)!r})"
                              for name in saved if saved[name] != model_config.get(name))
        raise UserError(f"the checkpoint {checkpoint_dir} step {step} was trained with {differing}: resume with the "
                        f"settings of the run that saved it (one saved before --arch existed is --arch=seed)")
    if meta["world_size"] != world_size:
        raise UserError(f"the checkpoint {checkpoint_dir} step {step} was saved by {meta['world_size']} process(es); "
                        f"an exact resume needs the same number (this run has {world_size})")
    return step, model_data, optimizer_data, meta


def _encode_bytes(tensor):
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _decode_bytes(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state(device):
    """This process's random number generators (Python, torch CPU, and the device's), as JSON-able values."""
    state = {"python": random.getstate(), "torch": _encode_bytes(torch.get_rng_state())}
    if device.type == "cuda":
        state["cuda"] = _encode_bytes(torch.cuda.get_rng_state(device))
    if device.type == "mps":
        state["mps"] = _encode_bytes(torch.mps.get_rng_state())
    return state


def restore_rng_state(state, device):
    version, internal, gauss = state["python"]  # JSON turned the tuples into lists
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(_decode_bytes(state["torch"]))
    if "cuda" in state:
        torch.cuda.set_rng_state(_decode_bytes(state["cuda"]), device)
    if "mps" in state:
        torch.mps.set_rng_state(_decode_bytes(state["mps"]))
