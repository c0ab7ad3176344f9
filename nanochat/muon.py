"""
Muon: momentum SGD whose update is orthogonalized by a Newton-Schulz iteration (https://kellerjordan.github.io/posts/muon/),
for the 2-D weight matrices of the Transformer blocks. Not for embeddings or lm_head (AdamW, nanochat/adamw.py).

One update function, muon_update, serves both optimizers: Muon (one process) and DistMuon (torchrun), which only
adds the communication: each matrix is owned by one rank, which receives the averaged gradient (reduce-scatter),
updates it, and sends the result to every rank (all-gather). Momentum therefore lives on the owner only, so the
optimizer state is per rank.
"""

import os

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE


def newton_schulz5(G, steps, dtype):
    """An approximately orthogonal matrix with G's singular vectors: U V^T from G = U S V^T, by a quintic
    Newton-Schulz iteration. The coefficients (3.4445, -4.7750, 2.0315) trade accuracy for speed: after 5 steps
    the singular values land in a band around 1 (~0.7-1.2) instead of exactly 1, which trains as well."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.mT if tall else X


# Compiled only on CUDA, where it pays; on CPU compiling costs more than it saves in short runs and tests
# (NANOCHAT_COMPILE_MUON=1 compiles there too). Made on first use: merely creating it imports torch._dynamo,
# which costs seconds at every `import nanochat.gpt`.
_newton_schulz5_compiled = None


def orthogonalize(G, steps, dtype=torch.bfloat16):
    global _newton_schulz5_compiled
    if not (G.is_cuda or os.environ.get("NANOCHAT_COMPILE_MUON") == "1"):
        return newton_schulz5(G, steps, dtype)
    if _newton_schulz5_compiled is None:
        _newton_schulz5_compiled = torch.compile(newton_schulz5)
    return _newton_schulz5_compiled(G, steps, dtype)


@torch.no_grad()
def muon_update(p, grad, momentum_buffer, lr, momentum, nesterov, ns_steps, weight_decay, ns_dtype):
    """One Muon step for matrix p given its (averaged) gradient; momentum_buffer is updated in place."""
    momentum_buffer.lerp_(grad, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer  # Nesterov: look one step ahead
    update = orthogonalize(update, ns_steps, ns_dtype)
    # An orthogonal update has RMS ~ 1/sqrt(max(rows, cols)); the factor gives tall matrices the same RMS per
    # element as wide ones of the same size
    scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
    if weight_decay:
        p.mul_(1 - lr * weight_decay)  # decoupled, as in AdamW
    p.add_(update.to(p.dtype), alpha=-lr * scale)


class Muon(torch.optim.Optimizer):
    """Muon in one process. Params are grouped by shape (one param group per shape, in a fixed order), the layout
    DistMuon needs; keeping it here too makes both optimizers' param_groups look alike.
    ns_dtype: the Newton-Schulz precision. Default: bf16 where the model computes in bf16 (the hardware multiplies
    bf16 natively, and bf16 is accurate enough here), else fp32: on a CPU without native bf16 a bf16 Newton-Schulz
    is 10-35x slower than fp32 (measured, AVX2 EPYC). Tests set fp32 for exact comparisons."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, ns_dtype=None):
        params = list(params)
        for p in params:
            if not isinstance(p, torch.Tensor) or p.ndim != 2:
                raise ValueError("Muon takes a list of 2-D weight matrices (no param group dicts, no vectors); got "
                                 f"{type(p).__name__} {getattr(p, 'shape', '')}")
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [dict(params=[p for p in params if tuple(p.shape) == shape]) for shape in shapes]
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype or (torch.bfloat16 if COMPUTE_DTYPE == torch.bfloat16 else torch.float32)

    def _update(self, p, grad, group):
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        muon_update(p, grad, state["momentum_buffer"], group["lr"], group["momentum"], group["nesterov"],
                    group["ns_steps"], group["weight_decay"], self.ns_dtype)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)


class DistMuon(Muon):
    """Muon across the ranks of the default process group, without a DDP wrapper. Within each shape group the
    params go in blocks of world_size: param block[r] is owned by rank r. One reduce-scatter hands every owner
    its param's gradient averaged over all ranks; owners update; one all-gather copies the new values everywhere.
    All reductions are launched before any update so that communication overlaps the Newton-Schulz work."""

    @torch.no_grad()
    def step(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        reductions = []  # (group, block of params, the gradient this rank owns, pending work)
        for group in self.param_groups:
            params = group["params"]
            zero = torch.zeros_like(params[0])  # pads the last block and stands in for a missing grad
            for base in range(0, len(params), world_size):
                block = params[base:base + world_size]
                grads = [p.grad if p.grad is not None else zero for p in block]
                grads += [zero] * (world_size - len(block))
                owned_grad = torch.empty_like(zero)
                work = dist.reduce_scatter(owned_grad, grads, op=dist.ReduceOp.AVG, async_op=True)
                reductions.append((group, block, owned_grad, work))
        gathers = []
        for group, block, owned_grad, work in reductions:
            work.wait()
            if rank < len(block):
                self._update(block[rank], owned_grad, group)
                source = block[rank]
            else:
                source = torch.empty_like(block[0])  # this rank owns nothing in the last block: sends padding
            outputs = block + [torch.empty_like(block[0]) for _ in range(world_size - len(block))]
            if rank >= len(block):
                outputs[rank] = source
            gathers.append(dist.all_gather(outputs, source, async_op=True))
        for work in gathers:
            work.wait()
