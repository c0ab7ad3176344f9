"""
Pretrain the base model on the parquet shards in <base>/base_data with the tokenizer in <base>/tokenizer.

One dial, --depth: the width (64 * depth), the heads (head dim 128) and, through the parameter count, the
training horizon (target_param_data_ratio tokens per parameter) follow from it. A step is total_batch_size tokens
whatever the hardware: each process accumulates gradients over as many micro-steps as it takes. --arch picks the
architecture (GPTConfig's fields beyond the shape; recorded in the checkpoint): by default v2 (the original's newest)
without its per-layer lambdas, or seed, or either with fields overridden.

Checkpoints go to <base>/base_checkpoints/<model_tag>/ (every save_every steps and at the end, BEFORE the final
evaluation). --resume_from_step=last (or a step number) resumes exactly: weights, every rank's optimizer state,
data position, RNG and loop state, so on CPU in fp32 the losses after the resume equal an uninterrupted run's
bit for bit. Ctrl+C or SIGTERM saves a checkpoint at the end of the current step and exits cleanly.
Val bpb is measured every eval_every steps and always at the end, over eval_tokens tokens (default: 20 steps'
worth, but never more than the run trains on).

Usage:
    python -m scripts.base_train --depth=4 --max_seq_len=512 --device_batch_size=8 --total_batch_size=8192
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth=20
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=host0:29500 -m scripts.base_train -- --depth=26
    python -m scripts.base_train --depth=4 --resume_from_step=last
"""

import os

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation; before CUDA starts

import gc
import math
import random
import time

import torch

from nanochat.checkpoint_manager import (checkpoint_dir, load_resume_checkpoint, restore_rng_state, rng_state,
                                         save_checkpoint)
from nanochat.common import (COMPUTE_DTYPE, SAMPLE_PROMPTS, StopOnSignal, all_ranks_gather, all_ranks_sum,
                             compute_cleanup, compute_init, format_duration, get_peak_flops, grad_accum_steps, init_wandb,
                             peak_memory, print0, should_compile)
from nanochat.core_eval import evaluate_model as evaluate_core
from nanochat.configurator import configure
from nanochat.dataloader import tokenizing_distributed_data_loader, tokenizing_distributed_data_loader_with_state
from nanochat.gpt import GPT, GPTConfig, arch_config, dims_for_depth, keep_freed_cpu_memory
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import (accumulate_gradients, batch_scaling, batch_size_law, cosine_decay, lr_multiplier,
                            muon_momentum, training_horizon)
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes, get_tokenizer

# Settings
run = "dummy"  # wandb run name; "dummy" logs nothing to wandb
device_type = ""  # cuda | cpu | mps; "" = autodetect
# Model
depth = 20  # the one dial: n_layer = depth, model_dim = 64 * depth, heads of 128
# v2 | seed (nanochat/gpt.py ARCHITECTURES), then any ",field=value" of GPTConfig. The default drops v2's per-layer
# lambdas: they cost it 0.067 bpb at d4 (8,192-token steps; dev/BENCHMARKS.md, "Quality per FLOP"); the original
# found them a gain at its 524,288, which no CPU can check
arch = "v2,layer_lambdas=False"
max_seq_len = 2048  # context length
# Horizon: the first one set wins
num_iterations = -1  # optimizer steps
target_flops = -1.0  # total training FLOPs
target_param_data_ratio = 20  # training tokens per parameter (Chinchilla)
count_embedding = True  # the token embedding counts as parameters (False: the original's count, for its ratio ~12)
# Batch
device_batch_size = 32  # rows per micro-step per process; lower it if memory runs out (the math stays the same)
total_batch_size = 524288  # tokens per optimizer step, across all processes and micro-steps; -1 = the batch-size law
# Optimization
embedding_lr = 0.2  # AdamW, token embedding (value embeddings at half of it)
unembedding_lr = 0.004  # AdamW, lm_head
matrix_lr = 0.02  # Muon, every matrix in the transformer blocks
scalar_lr = 0.5  # AdamW, the per-layer lambdas, smear and backout
weight_decay = 0.0  # AdamW's, lm_head and embeddings
muon_weight_decay = 0.0  # Muon's, cosine-decayed to 0 over the run
batch_lr_scaling = False  # LRs x sqrt(B / 2^19), Muon's weight decay as well x d12's params / the model's
orthogonalizer = "newton_schulz"  # Muon's: newton_schulz | polar_express
normuon_beta2 = 0.0  # NorMuon's second-moment decay; 0 = off
cautious_weight_decay = False  # Muon's weight decay only where the update has the weight's sign
muon_momentum_peak = 0.95  # Muon's momentum: 0.85 -> this over the first momentum_warmup_steps...
momentum_warmup_steps = 300
muon_momentum_final = -1.0  # ...and down to this over the warmdown; -1 = stays
warmup_ratio = 0.0  # fraction of the steps spent warming the LR up
# The LR schedule: a long warmdown to 5% (the original's newest) beats the seed's 20% to 0 at equal FLOPs at d4
# (dev/BENCHMARKS.md, "Quality per FLOP")
warmdown_ratio = 0.65  # fraction of the steps spent decaying the LR...
final_lr_frac = 0.05  # ...linearly, to this fraction of the initial LR
resume_from_step = ""  # "" starts afresh; a step number like "200", or "last", resumes from that checkpoint
# Evaluation and checkpoints (every <= 0: never, except that the final val bpb is always measured)
eval_every = 250  # steps between val bpb evaluations
eval_tokens = -1  # tokens per val bpb evaluation; -1 = min(20 * total_batch_size, the run's training tokens)
core_metric_every = 2000  # steps between CORE evaluations
core_metric_max_per_task = 500  # examples per CORE task
sample_every = 2000  # steps between printing greedy samples
save_every = -1  # steps between checkpoints (there is always one at the end)
model_tag = ""  # checkpoint directory name; "" = d<depth>
compile = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
bos_aligned = False  # every row starts at a document's BOS (best-fit packing) instead of a plain token stream
seed = 42
user_config = configure(globals())

# -----------------------------------------------------------------------------
# Set-up: processes, tokenizer, model shape, batch and horizon

is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
master_process = rank == 0
random.seed(seed)
torch.manual_seed(seed)  # the same on every rank: without a DDP wrapper, identical init is what keeps replicas equal
synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
if device.type == "cpu":
    keep_freed_cpu_memory()  # no page faults for the large per-step buffers (see its docstring)
wandb_run = init_wandb(run, user_config, master_process)
# for MFU; on CPU this measures matmuls on random numbers, so it runs here, in the same place on a resume
peak_flops = get_peak_flops(device, COMPUTE_DTYPE)
if device.type == "cpu":  # a busy machine measures a low peak, and MFU then reads high: say what it divides by
    print0(f"MFU is against this CPU's measured {str(COMPUTE_DTYPE).removeprefix('torch.')} matmul peak: "
           f"{peak_flops / 1e9:,.0f} GFLOP/s")

model_dims, arch_fields = dims_for_depth(depth), arch_config(arch)  # errors early, before any data is read
print0(f"depth={depth}: {depth} layers, model_dim {model_dims['n_embd']}, {model_dims['n_head']} heads of "
       f"{model_dims['n_embd'] // model_dims['n_head']}; arch={arch}")
world_tokens_per_fwdbwd = device_batch_size * max_seq_len * world_size  # one micro-step of every process
if total_batch_size > 0:  # checked before the tokenizer is read (the batch-size law below needs the vocab size)
    accum_steps = grad_accum_steps("total_batch_size", total_batch_size, device_batch_size, world_size, max_seq_len)
use_compile = should_compile(compile, device)

tokenizer = get_tokenizer()
token_bytes = get_token_bytes(device=device)
vocab_size = tokenizer.get_vocab_size()
print0(f"Vocab size: {vocab_size:,}")
model_config = dict(sequence_len=max_seq_len, vocab_size=vocab_size, **model_dims, **arch_fields)
with torch.device("meta"):  # the batch-size law's counts: this model's and the d12's that the LRs were tuned at
    law_params, reference_params = [GPT(GPTConfig(**{**model_config, **dims})).num_scaling_params(embedding=False)
                                    for dims in (model_dims, dims_for_depth(12))]
if total_batch_size <= 0:
    total_batch_size = batch_size_law(law_params, reference_params)
    accum_steps = grad_accum_steps("total_batch_size", total_batch_size, device_batch_size, world_size, max_seq_len)
lr_scale, wd_scale = batch_scaling(total_batch_size, law_params, reference_params) if batch_lr_scaling else (1, 1)

# -----------------------------------------------------------------------------
# Resume: read the checkpoint first, so a mismatch fails before any work

model_tag = model_tag or f"d{depth}"
ckpt_dir = checkpoint_dir("base", model_tag)
resume_step = None
if resume_from_step:
    resume_step, model_data, optimizer_data, meta = load_resume_checkpoint(ckpt_dir, resume_from_step, device, rank,
                                                                           model_config, world_size)
    print0(f"Resuming from {ckpt_dir} step {resume_step}")

# -----------------------------------------------------------------------------
# Model and optimizers

model = GPT.create(GPTConfig(**model_config), device)
if resume_step is not None:
    model.load_state_dict(model_data, strict=True)
    del model_data
orig_model = model  # uncompiled: for sampling, CORE and state_dict
if use_compile:
    model = orig_model.compile_regions()  # each block and the head compiled: see GPT.compile_regions
num_params = sum(p.numel() for p in orig_model.parameters())
num_scaling_params = orig_model.num_scaling_params(count_embedding)
flops_per_token = orig_model.estimate_flops()
print0(f"Parameters: {num_params:,} ({num_scaling_params:,} for scaling) | FLOPs per token: {flops_per_token:e}")
num_iterations, horizon = training_horizon(num_iterations, target_flops, target_param_data_ratio, flops_per_token,
                                           num_scaling_params, total_batch_size)
total_tokens = total_batch_size * num_iterations
print0(f"Iterations: {num_iterations:,} (from {horizon}) | tokens: {total_tokens:,} | tokens per scaling parameter: "
       f"{total_tokens / num_scaling_params:.2f} | total FLOPs: {flops_per_token * total_tokens:e}")

muon_weight_decay *= wd_scale
if batch_lr_scaling:
    print0(f"LRs x {lr_scale:.4f} for {total_batch_size:,} tokens a step; Muon's weight decay {muon_weight_decay:.4f}")
optimizer = orig_model.setup_optimizers(
    unembedding_lr=unembedding_lr * lr_scale, embedding_lr=embedding_lr * lr_scale, matrix_lr=matrix_lr * lr_scale,
    scalar_lr=scalar_lr * lr_scale, weight_decay=weight_decay,
    muon=dict(weight_decay=muon_weight_decay, orthogonalizer=orthogonalizer, beta2=normuon_beta2,
              cautious_weight_decay=cautious_weight_decay))
if resume_step is not None:
    optimizer.load_state_dict(optimizer_data)
    del optimizer_data

# -----------------------------------------------------------------------------
# Data, schedules, RNG and loop state

loader_resume_state = meta["dataloader_state_dicts"][rank] if resume_step is not None else None
train_loader = tokenizing_distributed_data_loader_with_state(device_batch_size, max_seq_len, "train", device=device,
                                                             resume_state_dict=loader_resume_state, bos_aligned=bos_aligned)
if eval_tokens <= 0:  # the default: never evaluate on more tokens than the run trains on
    eval_tokens = min(20 * total_batch_size, total_tokens)
eval_steps = max(1, eval_tokens // world_tokens_per_fwdbwd)
print0(f"Val bpb evaluations: {eval_steps * world_tokens_per_fwdbwd:,} tokens each")

report = get_report()
curve = {"model_tag": model_tag, "step": [], "loss": [], "val_step": [], "val_bpb": []}
loop_state = {"smooth_train_loss": 0.0, "total_training_time": 0.0, "min_val_bpb": None, "val_bpb": None}
step = 0
if resume_step is not None:
    step, loop_state = meta["step"], meta["loop_state"]
    restore_rng_state(meta["rng_states"][rank], device)
    saved_curve = report.read_curve("base_train")
    if saved_curve is not None and saved_curve.get("model_tag") == model_tag:
        keep = sum(1 for s in saved_curve["step"] if s <= step)  # drop what a longer, abandoned run logged later
        keep_val = sum(1 for s in saved_curve["val_step"] if s < step)  # the val bpb at `step` is measured again
        curve = {**saved_curve, "step": saved_curve["step"][:keep], "loss": saved_curve["loss"][:keep],
                 "val_step": saved_curve["val_step"][:keep_val], "val_bpb": saved_curve["val_bpb"][:keep_val]}
smooth_train_loss = loop_state["smooth_train_loss"]  # the EMA of the loss, before debiasing
total_training_time, val_bpb = loop_state["total_training_time"], loop_state["val_bpb"]
min_val_bpb = loop_state["min_val_bpb"] if loop_state["min_val_bpb"] is not None else float("inf")
stop_signal = StopOnSignal(rank)  # Ctrl+C / SIGTERM: save a checkpoint at the end of the step, then exit

# -----------------------------------------------------------------------------
# Training loop: iteration `step` evaluates/saves the model after `step` updates, then (unless last) trains once

loader_state = loader_resume_state  # where the data continues: the position after the last batch trained on
first_step = step  # this process's first step
batch = next(train_loader)  # (inputs, targets, the position after them), prefetched
core_metric = None
timed_steps, timed_seconds = 0, 0.0  # this process's steps after warm-up, for the ETA
mfu = 0.0
stop_now = False  # set after a step when any rank was asked to stop; every rank sees the same value
while True:
    last_step = step == num_iterations

    # Checkpoint: the weights after `step` updates and everything needed to continue from there; before the
    # evaluations, so a crash in them loses no training
    if step != resume_step and (last_step or stop_now or (save_every > 0 and step % save_every == 0 and step > 0)):
        save_checkpoint(ckpt_dir, step, orig_model.state_dict(), optimizer.state_dict(), {
            "step": step, "model_config": model_config, "user_config": user_config,
            "device_batch_size": device_batch_size, "max_seq_len": max_seq_len, "world_size": world_size,
            "val_bpb": val_bpb,
            "loop_state": {"smooth_train_loss": smooth_train_loss, "total_training_time": total_training_time,
                           "min_val_bpb": None if math.isinf(min_val_bpb) else min_val_bpb, "val_bpb": val_bpb},
            # per rank: where its data stream continues (the batch not yet trained on) and its RNG
            "dataloader_state_dicts": all_ranks_gather(loader_state),
            "rng_states": all_ranks_gather(rng_state(device)),
        }, rank=rank)
        report.log_curve("base_train", curve)
    if stop_now:
        print0(f"Stopped at step {step}. Resume with --resume_from_step={step} (or last)")
        break

    if last_step or (eval_every > 0 and step % eval_every == 0):
        orig_model.eval()
        val_loader = tokenizing_distributed_data_loader(device_batch_size, max_seq_len, "val", device=device,
                                                        bos_aligned=bos_aligned)
        val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
        orig_model.train()
        min_val_bpb = min(min_val_bpb, val_bpb)
        print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
        wandb_run.log({"step": step, "total_training_time": total_training_time, "val/bpb": val_bpb})
        curve["val_step"].append(step)
        curve["val_bpb"].append(val_bpb)
        report.log_curve("base_train", curve)

    if core_metric_every > 0 and (last_step or (step > 0 and step % core_metric_every == 0)):
        orig_model.eval()
        core_results = evaluate_core(orig_model, tokenizer, device, max_per_task=core_metric_max_per_task)
        orig_model.train()
        core_metric = core_results["core_metric"]
        print0(f"step {step:05d} | {core_results['label']} {core_metric:.4f}")
        wandb_run.log({"step": step, "core_metric": core_metric})

    if master_process and sample_every > 0 and (last_step or (step > 0 and step % sample_every == 0)):
        orig_model.eval()
        for prompt in SAMPLE_PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            sample = list(orig_model.generate(tokens, max_tokens=16, temperature=0))
            print(f"{prompt} -> {tokenizer.decode(sample)!r}")
        orig_model.train()

    if last_step:
        break

    # One optimizer step: accum_steps micro-steps, then the update with this step's LR and momentum
    synchronize()
    t0 = time.time()
    loss, trained, batch = accumulate_gradients(model, batch, train_loader, accum_steps)
    loader_state = trained[2]
    warmdown_steps = round(warmdown_ratio * num_iterations)
    lrm = lr_multiplier(step, num_iterations, round(warmup_ratio * num_iterations), warmdown_steps, final_lr_frac)
    momentum = muon_momentum(step, momentum_warmup_steps, 0.85, muon_momentum_peak, num_iterations, warmdown_steps,
                             muon_momentum_final if muon_momentum_final > 0 else None)
    optimizer.update(lrm, momentum, muon_weight_decay * cosine_decay(step, num_iterations))
    # One collective carries the loss (for an all-rank mean) and the stop flag (any rank's signal stops every rank)
    stats = torch.stack([loss, torch.tensor(float(stop_signal.requested), device=device)])
    train_loss, stop_votes = (all_ranks_sum(stats) / world_size).tolist()
    stop_now = stop_votes > 0
    synchronize()
    dt = time.time() - t0

    # The garbage collector: after the first step (compilation made most of the long-lived objects) freeze what
    # exists and collect only every 1000 steps, instead of full collections scanning it all at random steps
    if step == first_step:
        gc.collect()
        gc.freeze()
        gc.disable()
    elif step % 1000 == 0:
        gc.collect()

    # Logging
    total_training_time += dt
    if step >= 10:  # the first steps include compilation and warm-up
        timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt
    ema_beta = 0.9
    smooth_train_loss = ema_beta * smooth_train_loss + (1 - ema_beta) * train_loss
    debiased_loss = smooth_train_loss / (1 - ema_beta ** (step + 1))
    tokens_per_second = total_batch_size / dt  # the whole step: every micro-step of every process
    mfu = flops_per_token * total_batch_size / dt / (peak_flops * world_size)  # model FLOPs / what the hardware could do
    step += 1
    eta = (num_iterations - step) * (timed_seconds / timed_steps if timed_steps else dt)
    width = max(5, len(str(num_iterations)))
    print0(f"step {step:0{width}d}/{num_iterations:0{width}d} ({100 * step / num_iterations:.1f}%) | loss {debiased_loss:.3f} | "
           f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {tokens_per_second:,.0f} | mfu {100 * mfu:.1f}% | "
           f"elapsed {format_duration(total_training_time)} | eta {format_duration(eta)}", flush=True)
    wandb_run.log({"step": step, "total_training_time": total_training_time, "train/loss": debiased_loss,
                   "train/lrm": lrm, "train/dt": dt, "train/tok_per_sec": tokens_per_second, "train/mfu": 100 * mfu})
    curve["step"].append(step)
    curve["loss"].append(train_loss)

# -----------------------------------------------------------------------------
# Report

report.log_curve("base_train", curve)
if not stop_now:
    if timed_steps:  # the steady-state MFU, warm-up steps left out
        mfu = flops_per_token * total_batch_size * timed_steps / timed_seconds / (peak_flops * world_size)
    print0(f"Peak memory: {peak_memory(device)} | total training time: {format_duration(total_training_time)} | "
           f"min val bpb: {min_val_bpb:.4f}")
    report.log(section="Base model training", data=[
        user_config,
        {
            "Number of parameters": num_params,
            "Number of scaling parameters": num_scaling_params,
            "Number of FLOPs per token": f"{flops_per_token:e}",
            "Calculated number of iterations": num_iterations,
            "Number of training tokens": total_tokens,
            "Tokens : Params ratio": total_tokens / num_scaling_params,
            "DDP world size": world_size,
            "Minimum validation bpb": min_val_bpb,
            "Final validation bpb": val_bpb,
            "CORE metric estimate": core_metric if core_metric is not None else "-",
            "MFU %": f"{100 * mfu:.2f}%",
            "Total training flops": f"{flops_per_token * total_tokens:e}",
            "Total training time": format_duration(total_training_time),
            "Peak memory usage": peak_memory(device),
        },
    ])
wandb_run.finish()
compute_cleanup()
