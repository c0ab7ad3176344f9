"""
Bits per byte of a trained base model on the train and val splits, next to the unigram baseline (what a model
without context would get: token frequencies counted on the train tokens, scored on the val tokens), plus greedy
samples from a few prompts. Evaluates split_tokens tokens of each split with the sequence length and packing the
model was trained with, and logs the "Base model loss" report section.

Usage:
    python -m scripts.base_loss
    python -m scripts.base_loss --model_tag=d4 --device_batch_size=8 --split_tokens=262144
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss
"""

from nanochat.checkpoint_manager import load_model
from nanochat.common import SAMPLE_PROMPTS, UserError, compute_cleanup, compute_init, print0
from nanochat.configurator import configure
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.loss_eval import UnigramBaseline, evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

# Settings
device_type = ""  # cuda | cpu | mps; "" = autodetect
model_tag = ""  # checkpoint directory; "" = the largest d<N>
model_step = -1  # checkpoint step; -1 = the last complete one
device_batch_size = 32
split_tokens = 20 * 524288  # tokens evaluated per split
user_config = configure(globals())

is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=model_tag or None,
                                    step=None if model_step < 0 else model_step)
sequence_len = meta["model_config"]["sequence_len"]
bos_aligned = meta["user_config"].get("bos_aligned", False)
print0(f"Model: {model_tag or 'largest'} step {meta['step']} | sequence_len {sequence_len} | bos_aligned {bos_aligned}")

# -----------------------------------------------------------------------------
# Bits per byte on each split

tokens_per_step = device_batch_size * sequence_len * world_size
steps = split_tokens // tokens_per_step
if steps == 0:
    raise UserError(f"split_tokens={split_tokens:,} is less than one batch of device_batch_size * sequence_len * world_size = "
                    f"{tokens_per_step:,} tokens; raise split_tokens or lower device_batch_size")
token_bytes = get_token_bytes(device=device)
unigram = UnigramBaseline(token_bytes)  # token frequencies from the train tokens below, scored on the val tokens
bpb = {}
for split in ("train", "val"):
    batches = tokenizing_distributed_data_loader(device_batch_size, sequence_len, split, device=device, bos_aligned=bos_aligned)
    batches = unigram.count(batches) if split == "train" else unigram.score(batches)
    bpb[split] = evaluate_bpb(model, batches, steps, token_bytes)
    print0(f"{split} bpb: {bpb[split]:.4f} ({steps * tokens_per_step:,} tokens)")
bpb["unigram"] = unigram.bpb()
print0(f"val bpb {bpb['val']:.4f} vs {bpb['unigram']:.4f} for the unigram baseline (token frequencies alone)")

# -----------------------------------------------------------------------------
# Greedy samples (rank 0)

samples = []
if rank == 0:
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        sample = prompt + tokenizer.decode(list(model.generate(tokens, max_tokens=16, temperature=0)))
        print(repr(sample))
        samples.append(sample)

get_report().log(section="Base model loss", data=[
    user_config,
    {"model step": meta["step"], "train bpb": bpb["train"], "val bpb": bpb["val"], "unigram bpb": bpb["unigram"]},
    "", "Samples:", "",
    *[f"    {sample!r}" for sample in samples],  # indented: a code block, so model output is never taken for markdown
])
compute_cleanup()
