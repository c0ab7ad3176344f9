"""
Midtrain a base model on conversations: it learns the chat format (the special tokens of user and assistant turns),
multiple-choice answers, calculator calls, spelling and counting letters, and its own name.

As in pretraining, the rendered conversations are packed back to back into rows of max_seq_len, and every token is
trained on (midtraining teaches the whole format). One epoch of the mixture by default; the LR is constant, then
decays linearly to 0 over the last warmdown_ratio of the progress (through the epoch, or through num_iterations when
that ends first), which the ranks agree on every step so that they use the same LR and stop at the same step.

The mixture (the original's): SmolTalk, MMLU auxiliary_train, GSM8K train, the identity conversations (twice),
SimpleSpelling, SpellingBee. A source whose data is missing is an error unless named in --skip. Offline
(NANOCHAT_DATA_DIR), skip mmlu_aux and give --smoltalk_file a local stand-in (both exist only on the hub).
Checkpoints go to <base>/mid_checkpoints/<model_tag>/.

Usage:
    python -m scripts.mid_train
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --device_batch_size=16
    NANOCHAT_DATA_DIR=data/tasks python -m scripts.mid_train --skip=mmlu_aux \\
        --smoltalk_file=data/tasks/chat/chatterbot_corpus_english.jsonl --max_seq_len=512 --device_batch_size=8 \\
        --total_batch_size=8192 --num_iterations=100
"""

import os
import time
from collections import deque

import torch
import torch.distributed as dist

from nanochat.checkpoint_manager import checkpoint_dir, load_model, save_checkpoint
from nanochat.common import (UserError, check_same_on_all_ranks, compute_cleanup, compute_init, grad_accum_steps,
                             init_wandb, print0, should_compile)
from nanochat.configurator import check_positive, configure
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import accumulate_gradients, lr_multiplier, muon_momentum
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Settings
run = "dummy"  # wandb run name; "dummy" logs nothing to wandb
device_type = ""  # cuda | cpu | mps; "" = autodetect
model_tag = ""  # base model to start from (and the tag of the mid checkpoint); "" = the largest one
model_step = -1  # base checkpoint step; -1 = the last
# Batch
max_seq_len = 2048  # tokens per row
device_batch_size = 32  # rows per micro-step per process; lower it if memory runs out (the math stays the same)
total_batch_size = 524288  # tokens per optimizer step, across all processes and micro-steps
num_iterations = -1  # optimizer steps; -1 = one epoch of the mixture
# Optimization (the base model's LRs, scaled by init_lr_frac)
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
init_lr_frac = 1.0
weight_decay = 0.0
warmdown_ratio = 0.2  # the LR decays linearly to 0 over this last fraction of the progress
# Mixture
skip = ""  # comma list of sources to leave out: smoltalk, mmlu_aux, gsm8k, identity, simple_spelling, spelling_bee
smoltalk_file = ""  # a local JSONL of conversations standing in for SmolTalk ("" = the real SmolTalk)
identity_file = os.path.join(REPO_ROOT, "data", "identity", "identity_conversations.jsonl")
identity_copies = 2  # the identity conversations are few: each epoch sees them this many times
simple_spelling_size = 200000
spelling_bee_size = 80000
# Evaluation (every <= 0: never, except that the final val bpb is always measured)
eval_every = 150  # steps between val bpb evaluations
eval_tokens = 20 * 524288  # tokens per val bpb evaluation
compile = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
dry_run = False  # train and evaluate, but save no checkpoint and write no report
user_config = configure(globals())

# -----------------------------------------------------------------------------
# Settings check, processes, model

check_positive(user_config, "max_seq_len", "device_batch_size", "total_batch_size", "simple_spelling_size",
               "spelling_bee_size")
if identity_copies < 0:
    raise UserError(f"--identity_copies={identity_copies}: must be 0 or more")
if not 0 <= warmdown_ratio <= 1:
    raise UserError(f"--warmdown_ratio={warmdown_ratio}: must be between 0 and 1")
if num_iterations == 0 or num_iterations < -1:
    raise UserError(f"--num_iterations={num_iterations}: must be a positive number of steps, or -1 for one epoch")

is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
master_process = rank == 0
synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
wandb_run = init_wandb(run, user_config, master_process, project="nanochat-mid")

world_tokens_per_fwdbwd = device_batch_size * max_seq_len * world_size  # one micro-step of every process
accum_steps = grad_accum_steps("total_batch_size", total_batch_size, device_batch_size, world_size, max_seq_len)
use_compile = should_compile(compile, device)

model, tokenizer, meta = load_model("base", device, phase="train", model_tag=model_tag or None,
                                    step=None if model_step < 0 else model_step)
model_tag, model_config = meta["model_tag"], meta["model_config"]
pretrain_batch = meta.get("device_batch_size")
if pretrain_batch is not None and device_batch_size > pretrain_batch:
    print0(f"Warning: device_batch_size={device_batch_size} is larger than pretraining's ({pretrain_batch}); "
           f"lower it if memory runs out")
if max_seq_len > model_config["sequence_len"]:
    print0(f"Warning: max_seq_len={max_seq_len} is longer than the model was pretrained on ({model_config['sequence_len']})")
orig_model = model  # uncompiled: for state_dict
if use_compile:
    model = orig_model.compile_regions()  # each block and the head compiled: see GPT.compile_regions
token_bytes = get_token_bytes(device=device)

optimizer = orig_model.setup_optimizers(unembedding_lr=unembedding_lr * init_lr_frac, embedding_lr=embedding_lr * init_lr_frac,
                                        matrix_lr=matrix_lr * init_lr_frac, weight_decay=weight_decay)

# -----------------------------------------------------------------------------
# Data: the mixture, and conversations packed into a token stream

from tasks.common import TaskMixture, build_mixture  # noqa: E402  (after the settings: importing tasks is not free)
from tasks.customjson import CustomJSON  # noqa: E402
from tasks.gsm8k import GSM8K  # noqa: E402
from tasks.mmlu import MMLU  # noqa: E402
from tasks.smoltalk import SmolTalk  # noqa: E402
from tasks.spellingbee import SimpleSpelling, SpellingBee  # noqa: E402


train_tasks, source_sizes, skipped = build_mixture({
    "smoltalk": lambda: [SmolTalk("train", filepath=smoltalk_file or None)],
    "mmlu_aux": lambda: [MMLU("auxiliary_train", "train")],
    "gsm8k": lambda: [GSM8K("main", "train")],
    "identity": lambda: [CustomJSON(identity_file)] * identity_copies,
    "simple_spelling": lambda: [SimpleSpelling(size=simple_spelling_size, split="train")],
    "spelling_bee": lambda: [SpellingBee(size=spelling_bee_size, split="train")],
}, skip, "midtraining")
val_builders = {  # held-out conversations of the same kinds, from validation splits (never test: tasks/common.py)
    "smoltalk": lambda: [SmolTalk("test", filepath=smoltalk_file or None)],
    "mmlu_aux": lambda: [MMLU("all", "validation")],
    "gsm8k": lambda: [GSM8K("main", "val", stop=420)],
}
val_tasks = [task for name in source_sizes if name in val_builders for task in val_builders[name]()]
if not val_tasks:  # only the synthetic sources are left: validate on their val split
    val_tasks = [SpellingBee(size=1000, split="val"), SimpleSpelling(size=1000, split="val")]
train_dataset, val_dataset = TaskMixture(train_tasks), TaskMixture(val_tasks)
if len(train_dataset) < world_size:
    raise UserError(f"{len(train_dataset)} training conversations for {world_size} ranks")


def packed_batches(dataset, loop):
    """(inputs, targets, progress, epoch_done) with inputs/targets (B, T): conversations of this rank (rank, rank +
    world_size, ...) rendered and concatenated, cut into B*T+1 token chunks (the last token of a chunk is the first
    of the next). progress: fraction of the epoch this rank has read; epoch_done: this rank went past its end (then
    the stream starts over when loop, else it stops)."""
    needed = device_batch_size * max_seq_len + 1
    buffer = deque()
    cursor, epoch_done = rank, False
    while True:
        while len(buffer) < needed:
            ids, _ = tokenizer.render_conversation(dataset[cursor], max_tokens=max(2048, max_seq_len))
            buffer.extend(ids)
            cursor += world_size
            if cursor >= len(dataset):
                if not loop:
                    return
                cursor -= len(dataset)
                epoch_done = True
        chunk = [buffer.popleft() for _ in range(needed - 1)] + [buffer[0]]
        tokens = torch.tensor(chunk, dtype=torch.long, pin_memory=device.type == "cuda")
        tokens = tokens.to(device, non_blocking=True)
        inputs = tokens[:-1].view(device_batch_size, max_seq_len)
        targets = tokens[1:].view(device_batch_size, max_seq_len)
        yield inputs, targets, 1.0 if epoch_done else cursor / len(dataset), epoch_done


eval_steps = max(1, eval_tokens // world_tokens_per_fwdbwd)

# -----------------------------------------------------------------------------
# Training loop: iteration `step` evaluates the model after `step` updates, then (unless last) trains once

report = get_report()
curve = {"model_tag": model_tag, "step": [], "loss": [], "lrm": [], "val_step": [], "val_bpb": []}
train_batches = packed_batches(train_dataset, loop=True)
batch = next(train_batches)  # (inputs, targets, progress, epoch_done), prefetched
step, progress, last_step = 0, 0.0, False
val_bpb, min_val_bpb = None, float("inf")
smooth_train_loss, total_training_time = 0.0, 0.0
lrm_history = []  # this rank's LR multipliers, compared across ranks at the end
while True:
    if last_step or (eval_every > 0 and step % eval_every == 0):
        orig_model.eval()
        val_bpb = evaluate_bpb(model, packed_batches(val_dataset, loop=True), eval_steps, token_bytes)
        orig_model.train()
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
        wandb_run.log({"step": step, "val/bpb": val_bpb})
        curve["val_step"].append(step)
        curve["val_bpb"].append(val_bpb)
    if last_step:
        break

    synchronize()
    t0 = time.time()
    loss, (_, _, rank_progress, rank_epoch_done), batch = accumulate_gradients(model, batch, train_batches,
                                                                             accum_steps)
    step += 1
    # Progress and the end of the epoch are agreed on (max over ranks): the same LR and the same last step everywhere
    if num_iterations > 0:
        rank_progress = max(rank_progress, step / num_iterations)
        rank_epoch_done = rank_epoch_done or step >= num_iterations
    agreed = torch.tensor([rank_progress, float(rank_epoch_done), loss.item()], device=device)
    if is_ddp:
        dist.all_reduce(agreed[:2], op=dist.ReduceOp.MAX)
        dist.all_reduce(agreed[2:], op=dist.ReduceOp.SUM)
        agreed[2] /= world_size
    # 1, then down to 0 over the last warmdown_ratio of the progress before this step (as every rank agreed on it)
    lrm = lr_multiplier(progress, 1.0, warmdown_steps=warmdown_ratio)
    progress = max(progress, agreed[0].item())  # monotone, so the LR never goes back up
    last_step = agreed[1].item() > 0
    train_loss = agreed[2].item()
    optimizer.update(lrm, muon_momentum(step - 1))
    synchronize()
    dt = time.time() - t0

    total_training_time += dt
    lrm_history.append(lrm)
    ema_beta = 0.9
    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased_loss = smooth_train_loss / (1 - ema_beta ** step)
    print0(f"step {step:05d} ({100 * progress:.1f}%) | loss {debiased_loss:.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f}ms | "
           f"tok/s {total_batch_size / dt:,.0f} | elapsed {total_training_time:.0f}s", flush=True)
    wandb_run.log({"step": step, "train/loss": debiased_loss, "train/lrm": lrm, "train/dt": dt})
    curve["step"].append(step)
    curve["loss"].append(train_loss)
    curve["lrm"].append(lrm)

check_same_on_all_ranks(lrm_history, "LR multipliers")  # every rank used the same LR at every step

# -----------------------------------------------------------------------------
# Save and report

if not dry_run:
    save_checkpoint(checkpoint_dir("mid", model_tag), step, orig_model.state_dict(), None, {
        "step": step,
        "val_bpb": val_bpb,
        "model_config": model_config,
        "user_config": user_config,
        "device_batch_size": device_batch_size,
        "max_seq_len": max_seq_len,
        "world_size": world_size,
        "mixture": source_sizes,
        "skipped": skipped,
    }, rank=rank)
    report.log_curve("mid_train", curve)
    report.log(section="Midtraining", data=[
        user_config,
        {
            "Mixture": ", ".join(f"{name} {size:,}" for name, size in source_sizes.items()),
            "Skipped sources": ", ".join(skipped) or "none",
            "Number of conversations": len(train_dataset),
            "Number of iterations": step,
            "Progress (of the epoch or num_iterations)": f"{progress:.4f}",
            "DDP world size": world_size,
            "Final train loss": train_loss if step else "-",
            "Minimum validation bpb": min_val_bpb,
            "Final validation bpb": val_bpb,
            "Total training time": f"{total_training_time:.0f}s",
        },
    ])
wandb_run.finish()
compute_cleanup()
