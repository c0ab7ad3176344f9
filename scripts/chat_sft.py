"""
Supervised fine-tuning (SFT): train a midtrained (or base) model on whole conversations, one per row, learning only
the assistant's replies.

Rows are padded to the longest of their micro-batch; a target counts only where the render mask says the assistant
wrote it (its text, its calculator calls, the <|assistant_end|> that stops it). The loss of a step is the mean over
every supervised token of the step (all micro-steps, all ranks), as if it were one big batch. A step is
target_examples_per_step conversations; the LR multiplier falls linearly from 1 to 0 over num_iterations.
Periodically: the validation loss, MMLU and ARC-Easy accuracy, and SpellingBee sampled with the calculator.

The mixture (the original's): ARC-Easy and ARC-Challenge train, GSM8K train, the first smoltalk_size SmolTalk
conversations, the identity conversations, SimpleSpelling and SpellingBee. --skip and --smoltalk_file work as in
mid_train (offline, ARC train and SmolTalk exist only on the hub). Checkpoints go to
<base>/chatsft_checkpoints/<model_tag>/.

Usage:
    python -m scripts.chat_sft
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
    NANOCHAT_DATA_DIR=data/tasks python -m scripts.chat_sft --skip=arc_easy,arc_challenge \
        --smoltalk_file=data/tasks/chat/chatterbot_corpus_english.jsonl --device_batch_size=8 --num_iterations=100
"""

import os
import time

import torch

from nanochat.checkpoint_manager import checkpoint_dir, load_model, save_checkpoint
from nanochat.common import (UserError, all_ranks_sum, check_same_on_all_ranks, compute_cleanup, compute_init,
                             grad_accum_steps, init_wandb, print0)
from nanochat.configurator import check_positive, configure
from nanochat.dataloader import masked_batch
from nanochat.engine import Engine
from nanochat.optim import lr_multiplier
from nanochat.report import get_report

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Settings
run = "dummy"  # wandb run name; "dummy" logs nothing to wandb
device_type = ""  # cuda | cpu | mps; "" = autodetect
source = "mid"  # the model to fine-tune: mid | base
model_tag = ""  # "" = the largest model of that source
model_step = -1  # -1 = its last checkpoint
# Batch
device_batch_size = 4  # conversations per micro-step per process
target_examples_per_step = 32  # conversations per optimizer step, across processes and micro-steps
max_seq_len = 2048  # longer conversations are cut
num_epochs = 1
num_iterations = -1  # optimizer steps; -1 = num_epochs of the mixture
# Optimization: the base LRs scaled by init_lr_frac, decaying linearly to 0
embedding_lr = 0.2
unembedding_lr = 0.004
matrix_lr = 0.02
init_lr_frac = 0.02
weight_decay = 0.0
# Mixture
skip = ""  # comma list of sources to leave out: arc_easy, arc_challenge, gsm8k, smoltalk, identity, simple_spelling, spelling_bee
smoltalk_file = ""  # a local JSONL of conversations standing in for SmolTalk ("" = the real SmolTalk)
smoltalk_size = 10000  # the first this many SmolTalk train conversations
identity_file = os.path.join(REPO_ROOT, "data", "identity", "identity_conversations.jsonl")
identity_copies = 1
simple_spelling_size = 300
spelling_bee_size = 300
# Evaluation (every <= 0: never; the last step always evaluates what is enabled)
eval_every = 100  # steps between validation losses
eval_steps = 100  # micro-batches per validation loss
eval_metrics_every = 200  # steps between the task metrics (MMLU, ARC-Easy, SpellingBee)
eval_metrics_max_problems = 1024  # per categorical task
eval_spelling_problems = 64  # SpellingBee problems sampled per evaluation (generation is slow); 0 = none
eval_max_new_tokens = 256  # tokens per SpellingBee answer
dry_run = False  # train and evaluate, but save no checkpoint and write no report
user_config = configure(globals())

# -----------------------------------------------------------------------------
# Settings check, processes, model

if source not in ("mid", "base"):
    raise UserError(f"--source={source}: expected mid or base")
check_positive(user_config, "device_batch_size", "target_examples_per_step", "max_seq_len", "num_epochs",
               "smoltalk_size", "simple_spelling_size", "spelling_bee_size")
if num_iterations == 0 or num_iterations < -1:
    raise UserError(f"--num_iterations={num_iterations}: must be a positive number of steps, or -1 for num_epochs")

is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
master_process = rank == 0
wandb_run = init_wandb(run, user_config, master_process, project="nanochat-sft")

accum_steps = grad_accum_steps("target_examples_per_step", target_examples_per_step, device_batch_size, world_size)

model, tokenizer, meta = load_model(source, device, phase="train", model_tag=model_tag or None,
                                    step=None if model_step < 0 else model_step)
model_tag, model_config = meta["model_tag"], meta["model_config"]
optimizer = model.setup_optimizers(unembedding_lr=unembedding_lr * init_lr_frac, embedding_lr=embedding_lr * init_lr_frac,
                                   matrix_lr=matrix_lr * init_lr_frac, weight_decay=weight_decay)
# not compiled: every micro-batch has its own length

# -----------------------------------------------------------------------------
# Data

from nanochat.chat_eval import score_chat_task  # noqa: E402  (after the settings: importing tasks is not free)
from tasks.arc import ARC  # noqa: E402
from tasks.common import TaskMixture, build_mixture  # noqa: E402
from tasks.customjson import CustomJSON  # noqa: E402
from tasks.gsm8k import GSM8K  # noqa: E402
from tasks.smoltalk import SmolTalk  # noqa: E402
from tasks.spellingbee import SimpleSpelling, SpellingBee  # noqa: E402


train_tasks, source_sizes, skipped = build_mixture({
    "arc_easy": lambda: [ARC("ARC-Easy", "train")],
    "arc_challenge": lambda: [ARC("ARC-Challenge", "train")],
    "gsm8k": lambda: [GSM8K("main", "train")],
    "smoltalk": lambda: [SmolTalk("train", filepath=smoltalk_file or None, stop=smoltalk_size)],
    "identity": lambda: [CustomJSON(identity_file)] * identity_copies,
    "simple_spelling": lambda: [SimpleSpelling(size=simple_spelling_size, split="train")],
    "spelling_bee": lambda: [SpellingBee(size=spelling_bee_size, split="train")],
}, skip, "SFT")
train_dataset = TaskMixture(train_tasks)
val_dataset = SmolTalk("test", filepath=smoltalk_file or None) if "smoltalk" in source_sizes else \
    SpellingBee(size=1000, split="val")

pad_id = tokenizer.encode_special("<|assistant_end|>")  # any id will do: padded positions are never targets


def micro_batches(dataset):
    """Endless (inputs, targets) (B, T) of this rank: conversations rank, rank + world_size, ... one per row, in
    groups of device_batch_size, starting over after the end. Only what the assistant wrote is a target (the render
    mask), never the user's turns, tool outputs, the BOS or the padding."""
    cursor = rank
    while True:
        rendered = []
        for _ in range(device_batch_size):
            rendered.append(tokenizer.render_conversation(dataset[cursor % len(dataset)], max_tokens=max_seq_len + 1))
            cursor += world_size
        inputs, targets = masked_batch([ids for ids, _ in rendered], [mask for _, mask in rendered], pad_id)
        yield inputs.to(device), targets.to(device)


if num_iterations < 0:
    num_iterations = max(1, num_epochs * len(train_dataset) // target_examples_per_step)
print0(f"Iterations: {num_iterations:,} ({num_iterations * target_examples_per_step / len(train_dataset):.2f} epochs)")


# -----------------------------------------------------------------------------
# Evaluation: validation loss, and task metrics with chat_eval's functions


@torch.no_grad()
def evaluate_val_loss():
    """Mean loss per supervised token over eval_steps micro-batches of the validation conversations."""
    model.eval()
    batches = micro_batches(val_dataset)
    total_loss, total_tokens = 0.0, 0
    for _ in range(eval_steps):
        inputs, targets = next(batches)
        total_loss += model(inputs, targets, loss_reduction="sum").item()
        total_tokens += (targets >= 0).sum().item()
    model.train()
    total_loss, total_tokens = all_ranks_sum([total_loss, total_tokens], device)
    return total_loss / max(1.0, total_tokens)


engine = Engine(model, tokenizer)


def evaluate_metrics():
    """Accuracy on MMLU and ARC-Easy (categorical, their first eval_metrics_max_problems questions) and on
    SpellingBee (greedy, with the calculator, eval_spelling_problems of them); a task whose data is missing is left
    out with a message."""
    model.eval()
    metrics = {}
    for name, max_problems in [("MMLU", eval_metrics_max_problems), ("ARC-Easy", eval_metrics_max_problems),
                               ("SpellingBee", eval_spelling_problems)]:
        if max_problems <= 0:
            continue
        try:
            metrics[name] = score_chat_task(name, model, tokenizer, engine, split="val", batch_size=device_batch_size,
                                            max_new_tokens=eval_max_new_tokens, max_problems=max_problems).accuracy
        except FileNotFoundError as e:
            print0(f"Metric {name} left out: {e}")
    model.train()
    return metrics


# -----------------------------------------------------------------------------
# Training loop: iteration `step` evaluates the model after `step` updates, then (unless last) trains once

report = get_report()
curve = {"model_tag": model_tag, "step": [], "loss": [], "lrm": [], "tokens": [], "val_step": [], "val_loss": []}
train_batches = micro_batches(train_dataset)
step, total_training_time = 0, 0.0
val_loss, metrics = None, {}
lrm_history = []
while True:
    last_step = step == num_iterations
    if last_step or (eval_every > 0 and step % eval_every == 0):
        val_loss = evaluate_val_loss()
        print0(f"step {step:05d} | val loss {val_loss:.4f}")
        wandb_run.log({"step": step, "val/loss": val_loss})
        curve["val_step"].append(step)
        curve["val_loss"].append(val_loss)
    if eval_metrics_every > 0 and (last_step or (step > 0 and step % eval_metrics_every == 0)):
        metrics = evaluate_metrics()
        print0(f"step {step:05d} | " + " | ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
        wandb_run.log({"step": step, **{f"metrics/{name}": value for name, value in metrics.items()}})
    if last_step:
        break

    t0 = time.time()
    batches = [next(train_batches) for _ in range(accum_steps)]
    rank_tokens = sum(int((targets >= 0).sum()) for _, targets in batches)
    step_tokens = all_ranks_sum(rank_tokens, device)  # supervised tokens of the whole step, every rank
    # sum of this rank's token losses / all tokens of the step, times world_size because the optimizers average the
    # ranks' gradients: the gradient of the mean loss over every supervised token of the step
    loss_sum = 0.0
    for inputs, targets in batches:
        loss = model(inputs, targets, loss_reduction="sum") * (world_size / max(1.0, step_tokens))
        loss.backward()
        loss_sum += loss.item() / world_size
    train_loss = all_ranks_sum(loss_sum, device)
    lrm = lr_multiplier(step, num_iterations, warmdown_steps=num_iterations)  # 1 -> 0 linearly, never below 0
    optimizer.update(lrm)
    dt = time.time() - t0
    step += 1

    total_training_time += dt
    lrm_history.append(lrm)
    print0(f"step {step:05d}/{num_iterations:05d} | loss {train_loss:.4f} | lrm {lrm:.4f} | supervised tokens "
           f"{int(step_tokens):,} | dt {dt * 1000:.0f}ms", flush=True)
    wandb_run.log({"step": step, "train/loss": train_loss, "train/lrm": lrm, "train/tokens": step_tokens})
    curve["step"].append(step)
    curve["loss"].append(train_loss)
    curve["lrm"].append(lrm)
    curve["tokens"].append(int(step_tokens))

check_same_on_all_ranks(lrm_history, "LR multipliers")  # every rank used the same LR at every step

# -----------------------------------------------------------------------------
# Save and report

if not dry_run:
    save_checkpoint(checkpoint_dir("sft", model_tag), step, model.state_dict(), None, {
        "step": step,
        "val_loss": val_loss,
        **metrics,
        "model_config": model_config,
        "user_config": user_config,
        "world_size": world_size,
        "mixture": source_sizes,
        "skipped": skipped,
    }, rank=rank)
    report.log_curve("chat_sft", curve)
    report.log(section="Chat SFT", data=[
        user_config,
        {
            "Source": f"{source} ({model_tag})",
            "Mixture": ", ".join(f"{name} {size:,}" for name, size in source_sizes.items()),
            "Skipped sources": ", ".join(skipped) or "none",
            "Number of conversations": len(train_dataset),
            "Number of iterations": step,
            "DDP world size": world_size,
            "Final train loss": curve["loss"][-1] if curve["loss"] else "-",
            "Validation loss": val_loss,
            **metrics,
            "Total training time": f"{total_training_time:.0f}s",
        },
    ])
wandb_run.finish()
compute_cleanup()
