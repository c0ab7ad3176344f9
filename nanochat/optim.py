"""
The optimizer: Muon for the 2-D matrices of the Transformer blocks, AdamW for the embedding and the lm_head, in one
class that runs the same code in one process and across the ranks of a torchrun; with the schedules and the
gradient accumulation that every training loop shares. There is no DDP wrapper: the
optimizer averages the gradients itself, so a fix to the update is a fix for 1 and N processes alike (the original
kept single- and multi-process versions apart until a fix landed in only one of them).

A step has three phases: (1) every gradient reduction is launched; (2) group by group, wait for its reductions,
update what this rank owns, launch the gathers; (3) wait for the gathers. With one process, phases 1 and 3 are empty
and every rank-owned piece is the whole param. Ownership (ZeRO-2 style, so optimizer state is per rank):
- AdamW: a param of >= 1024 elements whose rows divide by world_size is reduce-scattered by rows, each rank updates
  its slice and keeps that slice's moments, the slices are all-gathered; smaller params are all-reduced and updated
  whole everywhere.
- Muon: within a group (matrices of one shape), params go in blocks of world_size, param block[r] owned by rank r,
  which receives its gradient averaged (reduce-scatter), keeps its momentum and sends the new value to every rank
  (all-gather). The owned matrices of a group are orthogonalized as one stack (one batched matmul per Newton-Schulz
  product instead of one per matrix: d4's update 138 -> 123 ms).

Muon (https://kellerjordan.github.io/posts/muon/): momentum SGD whose update is orthogonalized by a Newton-Schulz
iteration. On CUDA its update runs torch.compile'd (many small kernels fused; LR and momentum go in as 0-D tensors,
so the schedules never recompile it); on CPU eagerly, where the time is the matmuls themselves (compiled: 116 vs
123 ms for d4's 24 matrices, ~0.5% of a step, for seconds of compile; NANOCHAT_COMPILE_MUON=1 compiles anyway).
"""

import math
import os

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE, UserError, dist_rank_and_size


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # one quintic for every step (Keller Jordan's Muon)
# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): a quintic per step, each the best for the
# singular values that the steps before it can have left, so 5 steps bring them closer to 1 than Newton-Schulz's 5.
# The paper's coefficients for 5 steps (safety factor 2e-2, cushion 2), as the original nanochat uses them.
ORTHOGONALIZERS = ("newton_schulz", "polar_express")
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def orthogonalize(G, steps, dtype, method="newton_schulz"):
    """An approximately orthogonal matrix with G's singular vectors: U V^T from G = U S V^T, by `steps` quintic
    iterations X <- a X + b (X X^T) X + c (X X^T)^2 X that push every singular value towards 1.
    newton_schulz: the same (a, b, c) every step, chosen for speed over accuracy: after 5 steps the singular values
    land in a band around 1 (~0.7-1.2) instead of exactly 1, which trains as well. polar_express: the per-step
    coefficients of POLAR_EXPRESS (at most 5 steps), a narrower band for the same work.
    G: one matrix (rows, cols) or a stack of same-shape matrices (n, rows, cols), each orthogonalized on its own."""
    if G.dim() == 2:
        return orthogonalize(G[None], steps, dtype, method)[0]
    if method == "newton_schulz":
        coefficients = [NEWTON_SCHULZ] * steps
    elif method == "polar_express" and steps <= len(POLAR_EXPRESS):
        coefficients = POLAR_EXPRESS[:steps]
    else:
        raise ValueError(f"orthogonalizer {method!r} with {steps} steps: expected newton_schulz (any number of steps) "
                         f"or polar_express (at most {len(POLAR_EXPRESS)})")
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    # Frobenius norm >= spectral norm: singular values <= 1. Polar Express's first steps are tuned for exactly that
    # interval, so 1% more keeps rounding from putting one above it.
    scale = X.norm(dim=(-2, -1), keepdim=True)
    X = X / (scale + 1e-7) if method == "newton_schulz" else X / (scale * 1.01 + 1e-7)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A: the scaling and the sum ride on the matmul
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


def normalize_neurons(updates, second_moments, beta2):
    """NorMuon (Li et al. 2025, arXiv 2510.05491): an orthogonalized update's rows (or columns) come out with uneven
    sizes; divide each by the running RMS of its own past updates, then restore the update's overall (Frobenius)
    norm, so each neuron of the longer side moves at a similar rate. updates: (n, rows, cols); second_moments: one
    (rows, 1) (tall or square) or (1, cols) (wide) buffer per matrix, updated in place."""
    reduce_dim = -1 if updates.size(-2) >= updates.size(-1) else -2
    wide = updates.to(torch.promote_types(updates.dtype, torch.float32))  # sums of squares in fp32 at least
    for buffer, mean_square in zip(second_moments, wide.square().mean(dim=reduce_dim, keepdim=True)):
        buffer.lerp_(mean_square.to(buffer.dtype), 1 - beta2)
    scaled = wide * torch.stack(second_moments).clamp_min(1e-10).rsqrt().to(wide.dtype)
    norms = wide.norm(dim=(-2, -1), keepdim=True) / scaled.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-10)
    return (scaled * norms).to(updates.dtype)


@torch.no_grad()
def muon_update(params, grads, momentum_buffers, second_moments, momentum, one_minus_momentum, step_size, decay, beta2,
                nesterov, ns_steps, ns_dtype, orthogonalizer, cautious):
    """One Muon step for a list of same-shape matrices given their (averaged) gradients; the momentum buffers (and
    NorMuon's second moments, when beta2 is given) are updated in place. The step's numbers come precomputed
    (step_size = lr * shape scale, decay = 1 - lr * weight decay or None): Python floats when run eagerly, 0-D
    tensors of the params' dtype when compiled. cautious: decay only the entries whose update has the weight's
    sign, i.e. where the update itself moves the weight towards zero (Cautious Weight Decay, arXiv 2510.12402)."""
    updates = []
    for grad, buf in zip(grads, momentum_buffers):
        buf.lerp_(grad, one_minus_momentum)  # buf = momentum * buf + (1 - momentum) * grad
        updates.append(grad.lerp(buf, momentum) if nesterov else buf)  # Nesterov: look one step ahead
    orthogonal = orthogonalize(torch.stack(updates), ns_steps, ns_dtype, orthogonalizer)
    if beta2 is not None:
        orthogonal = normalize_neurons(orthogonal, second_moments, beta2)
    for p, update in zip(params, orthogonal.unbind(0)):
        update = update.to(p.dtype)
        if decay is not None and cautious:
            p.sub_(p * (update * p >= 0) * (1 - decay))
        elif decay is not None:
            p.mul_(decay)  # decoupled weight decay, as in AdamW
        if isinstance(step_size, torch.Tensor):
            p.sub_(update * step_size)
        else:
            p.add_(update, alpha=-step_size)


@torch.no_grad()
def adamw_update(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step on p (an fp32 master weight) in place; exp_avg and exp_avg_sq (p's dtype) are updated in
    place; step counts from 1. torch's fused AdamW kernel does it in one pass over memory (the same formula as
    torch.optim.AdamW: decoupled weight decay, bias correction), ~10x faster on CPU than the eight separate
    elementwise ops it replaces, which at vocab 32K were most of a small model's optimizer step."""
    # The step count as a 0-D tensor made by a fill on the device (torch.tensor(step, device=...) would be a
    # host-to-device copy on CUDA every step); lr and the betas go in as plain numbers, which nothing recompiles
    # for. Not torch.compile'd: this kernel is already one pass over memory, and a compiled AdamW formula measured
    # 2.2x slower (13.2 vs 5.9 ms for a 32768 x 256 matrix, CPU, one thread).
    step = torch.full((), step, dtype=torch.float32, device=p.device)
    torch._fused_adamw_([p], [grad.to(p.dtype)], [exp_avg], [exp_avg_sq], [], [step], lr=lr, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


_muon_update_compiled = None  # made on first use: creating it imports torch._dynamo (seconds at every import)

ADAMW_DEFAULTS = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
# Muon as the seed had it; setup_optimizers and base_train pass the recipe's settings
MUON_DEFAULTS = dict(momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, orthogonalizer="newton_schulz",
                     beta2=0.0, cautious_weight_decay=False)


def muon_groups(params, **settings):
    """Muon param groups for a list of 2-D matrices: one group per shape, in a fixed (sorted) order, so that every
    rank builds the same blocks. ValueError for anything that is not a 2-D tensor."""
    params = list(params)
    for p in params:
        if not isinstance(p, torch.Tensor) or p.ndim != 2:
            raise ValueError(f"Muon takes 2-D weight matrices; got {type(p).__name__} {tuple(getattr(p, 'shape', ()))}")
    shapes = sorted({tuple(p.shape) for p in params})
    return [dict(kind="muon", params=[p for p in params if tuple(p.shape) == shape], **settings) for shape in shapes]


def lr_multiplier(step, num_steps, warmup_steps=0, warmdown_steps=0, final_frac=0.0):
    """Every training loop's LR schedule, as the multiplier of the initial LRs: linear warmup over warmup_steps,
    constant, then a linear warmdown to final_frac at num_steps, never below 0 past it. step and num_steps may be
    fractions (mid-training measures its progress through the data, from 0 to 1). (A 1 - sqrt warmdown did no better
    at d4: dev/BENCHMARKS.md, "Quality per FLOP".)"""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_steps - warmdown_steps:
        return 1.0
    progress = max(0.0, (num_steps - step) / warmdown_steps)  # 1 -> 0 over the warmdown
    return progress + (1 - progress) * final_frac


def muon_momentum(step, warmup_steps=300, start=0.85, peak=0.95, num_steps=0, warmdown_steps=0, final=None):
    """Muon's momentum schedule: start -> peak over the first warmup_steps (less momentum while gradients change
    fast); with final, also peak -> final over the last warmdown_steps of num_steps (less momentum while the LR comes
    down, so the last updates follow the last gradients), the lower of the two where they overlap."""
    frac = min(step / warmup_steps, 1.0)
    momentum = (1 - frac) * start + frac * peak
    if final is not None and warmdown_steps > 0 and step > num_steps - warmdown_steps:
        progress = min((step - (num_steps - warmdown_steps)) / warmdown_steps, 1.0)
        momentum = min(momentum, peak + progress * (final - peak))
    return momentum


def cosine_decay(step, num_steps):
    """1 -> 0 over num_steps along half a cosine: the recipe's schedule of Muon's weight decay (strong while the
    weights grow, gone by the end)."""
    return 0.5 * (1 + math.cos(math.pi * min(step / num_steps, 1.0)))


# The batch-size law and the transfer of LRs and weight decay from a reference size, as the original nanochat fit them:
# tuned at d12 (its tokens:params ratio times d12's scaling parameters of training) in batches of 2^19 tokens.
REFERENCE_BATCH_SIZE = 2**19


def batch_size_law(num_params, reference_params):
    """Tokens per optimizer step for a model of num_params scaling parameters trained for a fixed number of tokens
    per parameter: the compute-optimal batch grows as D^0.383 with the horizon D (Power Lines, arXiv 2505.13738), from
    REFERENCE_BATCH_SIZE at the reference model's horizon; the nearest power of 2."""
    return 2 ** round(math.log2(REFERENCE_BATCH_SIZE * (num_params / reference_params) ** 0.383))


def batch_scaling(batch_size, num_params, reference_params):
    """(LR multiplier, weight decay multiplier) for batch_size tokens a step, a model of num_params scaling
    parameters and a horizon in proportion to it: every LR times sqrt(B / B_ref) (Adam's square-root rule, assumed
    for Muon too), and Muon's weight decay chosen to keep T_epoch = B / (lr * wd * D) as at the reference (arXiv
    2405.13698): times sqrt(B / B_ref) * D_ref / D, where D_ref / D = reference_params / num_params."""
    lr_scale = (batch_size / REFERENCE_BATCH_SIZE) ** 0.5
    return lr_scale, lr_scale * reference_params / num_params


def training_horizon(num_iterations, target_flops, target_param_data_ratio, flops_per_token, num_params, batch_size):
    """(optimizer steps, the setting that set them): num_iterations when positive, else target_flops / (FLOPs per
    step), else target_param_data_ratio tokens per scaling parameter; a UserError when none is positive."""
    if num_iterations > 0:
        return num_iterations, "num_iterations"
    if target_flops > 0:
        return round(target_flops / (flops_per_token * batch_size)), f"target_flops={target_flops:e}"
    if target_param_data_ratio > 0:
        steps = int(target_param_data_ratio * num_params // batch_size)
        return steps, f"target_param_data_ratio={target_param_data_ratio}"
    raise UserError("no training horizon: set num_iterations, target_flops or target_param_data_ratio to a positive "
                    "value")


def accumulate_gradients(model, batch, batches, accum_steps):
    """Forward and backward over accum_steps micro-batches, the first being `batch` and the others drawn from the
    iterator `batches` (of (inputs, targets, *position)); each loss is divided by accum_steps, so the gradients are
    the mean over all of them, as for one big batch. The next step's first micro-batch is fetched while the device
    still runs the last backward. Returns (the mean loss: a tensor, read without a host sync, the last micro-batch
    trained on: its position is where the data continues, the next step's first micro-batch)."""
    loss_sum = 0
    for _ in range(accum_steps):
        loss = model(batch[0], batch[1])
        (loss / accum_steps).backward()
        loss_sum = loss_sum + loss.detach()
        trained, batch = batch, next(batches)
    return loss_sum / accum_steps, trained, batch


class MuonAdamW(torch.optim.Optimizer):
    """AdamW and Muon param groups in one optimizer, for 1 process or all ranks of the default process group.

    param_groups: dicts with kind="adamw" (params, lr, betas, eps, weight_decay) or kind="muon" (params of one shape,
    lr, momentum, nesterov, ns_steps, weight_decay); missing settings take ADAMW_DEFAULTS / MUON_DEFAULTS. Every group
    remembers its initial_lr, which update() scales by the schedule's multiplier.
    ns_dtype: the Newton-Schulz precision. Default: bf16 where the model computes in bf16 (the hardware multiplies
    bf16 natively, and bf16 is accurate enough here), else fp32: on a CPU without native bf16 a bf16 Newton-Schulz
    is 10-35x slower than fp32 (measured, AVX2 EPYC). Tests set fp32 for exact comparisons.
    compile_muon: run Muon's update torch.compile'd; None = on CUDA only (see the module docstring)."""

    def __init__(self, param_groups, ns_dtype=None, compile_muon=None):
        groups = []
        for group in param_groups:
            kind = group.get("kind")
            if kind not in ("adamw", "muon"):
                raise ValueError(f"param group kind={kind!r}: expected 'adamw' or 'muon'")
            group = {**(ADAMW_DEFAULTS if kind == "adamw" else MUON_DEFAULTS), **group, "params": list(group["params"])}
            if kind == "muon" and len({tuple(p.shape) for p in group["params"]}) != 1:
                raise ValueError("a Muon param group holds matrices of one shape (see muon_groups)")
            if kind == "muon" and group["orthogonalizer"] not in ORTHOGONALIZERS:
                raise ValueError(f"orthogonalizer={group['orthogonalizer']!r}: expected one of "
                                 f"{', '.join(ORTHOGONALIZERS)}")
            group.setdefault("initial_lr", group["lr"])
            groups.append(group)
        super().__init__(groups, {})
        self.ns_dtype = ns_dtype or (torch.bfloat16 if COMPUTE_DTYPE == torch.bfloat16 else torch.float32)
        self.compile_muon = compile_muon
        self._scalars = {}  # (name, dtype, device) -> 0-D tensor that the compiled update reads its numbers from

    def update(self, lr_multiplier=1.0, muon_momentum=None, muon_weight_decay=None):
        """The training loops' optimizer step: every group's LR set to initial_lr * lr_multiplier (and Muon's
        momentum and weight decay, when given), one step, the gradients cleared."""
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier
            if group["kind"] == "muon" and muon_momentum is not None:
                group["momentum"] = muon_momentum
            if group["kind"] == "muon" and muon_weight_decay is not None:
                group["weight_decay"] = muon_weight_decay
        self.step()
        self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def step(self):
        rank, world_size = dist_rank_and_size()
        launch = {"adamw": self._reduce_adamw, "muon": self._reduce_muon}
        pending = [(group, launch[group["kind"]](group, rank, world_size)) for group in self.param_groups]
        gathers = []
        for group, pieces in pending:
            if group["kind"] == "adamw":
                gathers += self._step_adamw(group, pieces)
            else:
                gathers += self._step_muon(group, pieces, rank, world_size)
        for work in gathers:
            work.wait()

    # -- AdamW ------------------------------------------------------------------------------------------------------

    def _reduce_adamw(self, group, rank, world_size):
        """[(param, the part of it this rank updates, that part's averaged gradient, pending reduction or None)]."""
        pieces = []
        for p in group["params"]:
            if p.grad is None:  # must hold on every rank alike, or the collectives would not pair up
                continue
            if world_size == 1:
                pieces.append((p, p, p.grad, None))
            elif p.numel() >= 1024 and p.size(0) % world_size == 0:
                rows = p.size(0) // world_size
                grad_slice = torch.empty_like(p.grad[:rows])
                work = dist.reduce_scatter_tensor(grad_slice, p.grad, op=dist.ReduceOp.AVG, async_op=True)
                pieces.append((p, p[rank * rows:(rank + 1) * rows], grad_slice, work))
            else:
                pieces.append((p, p, p.grad, dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, async_op=True)))
        return pieces

    def _step_adamw(self, group, pieces):
        gathers = []
        beta1, beta2 = group["betas"]
        for p, part, grad, work in pieces:
            if work is not None:
                work.wait()
            state = self.state[p]
            if not state:
                state["step"] = 0
                # shaped like what this rank updates, in the param's dtype (torch's load_state_dict casts to it too)
                state["exp_avg"] = torch.zeros_like(part)
                state["exp_avg_sq"] = torch.zeros_like(part)
            state["step"] += 1
            adamw_update(part, grad, state["exp_avg"], state["exp_avg_sq"], state["step"], group["lr"], beta1, beta2,
                         group["eps"], group["weight_decay"])
            if part is not p:  # in place: this rank's slice already sits at its place in p
                gathers.append(dist.all_gather_into_tensor(p, part, async_op=True))
        return gathers

    # -- Muon -------------------------------------------------------------------------------------------------------

    def _reduce_muon(self, group, rank, world_size):
        """[(block of params, the averaged gradient of the one this rank owns, pending reduction or None)]; with one
        process a single block holds every param that has a gradient."""
        params = group["params"]
        if world_size == 1:
            with_grad = [p for p in params if p.grad is not None]
            return [(with_grad, [p.grad for p in with_grad], None)] if with_grad else []
        zero = torch.zeros_like(params[0])  # pads the last block and stands in for a missing grad
        blocks = []
        for base in range(0, len(params), world_size):
            block = params[base:base + world_size]
            grads = [p.grad if p.grad is not None else zero for p in block] + [zero] * (world_size - len(block))
            owned_grad = torch.empty_like(zero)
            work = dist.reduce_scatter(owned_grad, grads, op=dist.ReduceOp.AVG, async_op=True)
            blocks.append((block, [owned_grad], work))
        return blocks

    def _step_muon(self, group, blocks, rank, world_size):
        if world_size == 1:  # one block of every param with a gradient, all owned here
            for params, grads, _ in blocks:
                self._muon_update(params, grads, group)
            return []
        for _, _, work in blocks:
            work.wait()
        owned = [(block[rank], grads[0]) for block, grads, _ in blocks if rank < len(block)]
        if owned:
            self._muon_update([p for p, _ in owned], [g for _, g in owned], group)
        gathers = []
        for block, _, _ in blocks:
            # a rank that owns nothing in the (partial) last block sends padding
            source = block[rank] if rank < len(block) else torch.empty_like(block[0])
            outputs = block + [torch.empty_like(block[0]) for _ in range(world_size - len(block))]
            outputs[rank] = source
            gathers.append(dist.all_gather(outputs, source, async_op=True))
        return gathers

    def _scalar(self, name, value, like):
        """value as a persistent 0-D tensor of like's dtype and device, refilled in place (no host sync on CUDA)."""
        key = (name, like.dtype, like.device)
        if key not in self._scalars:
            self._scalars[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return self._scalars[key].fill_(value)

    def _muon_update(self, params, grads, group):
        """Update the same-shape matrices `params` of `group` given their averaged gradients."""
        normuon = group["beta2"] > 0
        rows, cols = params[0].shape
        buffers, second_moments = [], []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            if normuon and "second_moment" not in state:  # per row of a tall (or square) matrix, else per column
                state["second_moment"] = p.new_zeros((rows, 1) if rows >= cols else (1, cols))
            buffers.append(state["momentum_buffer"])
            second_moments.append(state.get("second_moment"))
        # An orthogonal update has RMS ~ 1/sqrt(max(rows, cols)); the factor gives tall matrices the same RMS per
        # element as wide ones of the same size
        step_size = group["lr"] * max(1.0, rows / cols) ** 0.5
        momentum = group["momentum"]
        decay = 1 - group["lr"] * group["weight_decay"] if group["weight_decay"] else None
        beta2 = group["beta2"] if normuon else None
        static = dict(nesterov=group["nesterov"], ns_steps=group["ns_steps"], ns_dtype=self.ns_dtype,
                      orthogonalizer=group["orthogonalizer"], cautious=group["cautious_weight_decay"])
        compile = self.compile_muon
        if compile is None:
            compile = params[0].device.type == "cuda" or os.environ.get("NANOCHAT_COMPILE_MUON") == "1"
        if not compile:
            muon_update(params, grads, buffers, second_moments, momentum, 1 - momentum, step_size, decay, beta2,
                        **static)
            return
        global _muon_update_compiled
        if _muon_update_compiled is None:
            _muon_update_compiled = torch.compile(muon_update, dynamic=False)
        numbers = [self._scalar(name, value, params[0]) if value is not None else None for name, value in
                   [("momentum", momentum), ("one_minus_momentum", 1 - momentum), ("step_size", step_size),
                    ("decay", decay), ("beta2", beta2)]]
        _muon_update_compiled(params, grads, buffers, second_moments, *numbers, **static)
