"""
Muon: momentum SGD whose update is orthogonalized by a Newton-Schulz iteration (https://kellerjordan.github.io/posts/muon/),
for the 2-D weight matrices of the Transformer blocks. Not for embeddings or lm_head (AdamW, nanochat/adamw.py).

One update function, muon_update, serves both optimizers: Muon (one process) and DistMuon (torchrun), which only
adds the communication: each matrix is owned by one rank, which receives the averaged gradient (reduce-scatter),
updates it, and sends the result to every rank (all-gather). Momentum therefore lives on the owner only, so the
optimizer state is per rank. muon_update takes all same-shape matrices at once and orthogonalizes them as one
stack: one batched matmul per Newton-Schulz product for the whole shape group instead of one per matrix.

On CUDA the update runs torch.compile'd (many small kernels fused; LR and momentum go in as 0-D tensors, so the
schedules never recompile it). On CPU it runs eagerly: there the time is the matmuls themselves, and compiling
measured 116 vs 123 ms for d4's 24 matrices (bf16, one thread), ~0.5% of a step, for seconds more compile time
(NANOCHAT_COMPILE_MUON=1 compiles anyway). Batching took the same update from 138 to 123 ms.
"""

import os

import torch
import torch.distributed as dist

from nanochat.common import COMPUTE_DTYPE


def newton_schulz5(G, steps, dtype):
    """An approximately orthogonal matrix with G's singular vectors: U V^T from G = U S V^T, by a quintic
    Newton-Schulz iteration. The coefficients (3.4445, -4.7750, 2.0315) trade accuracy for speed: after 5 steps
    the singular values land in a band around 1 (~0.7-1.2) instead of exactly 1, which trains as well.
    G: one matrix (rows, cols) or a stack of same-shape matrices (n, rows, cols), each orthogonalized on its own."""
    if G.dim() == 2:
        return newton_schulz5(G[None], steps, dtype)[0]
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius norm >= spectral norm: singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A A: the scaling and the sum ride on the matmul
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


@torch.no_grad()
def muon_update(params, grads, momentum_buffers, momentum, one_minus_momentum, step_size, decay, nesterov, ns_steps,
                ns_dtype):
    """One Muon step for a list of same-shape matrices given their (averaged) gradients; the momentum buffers are
    updated in place. The step's numbers come precomputed (step_size = lr * shape scale, decay = 1 - lr * weight
    decay or None): Python floats when run eagerly, 0-D tensors of the params' dtype when compiled."""
    updates = []
    for grad, buf in zip(grads, momentum_buffers):
        buf.lerp_(grad, one_minus_momentum)  # buf = momentum * buf + (1 - momentum) * grad
        updates.append(grad.lerp(buf, momentum) if nesterov else buf)  # Nesterov: look one step ahead
    orthogonal = newton_schulz5(torch.stack(updates), ns_steps, ns_dtype)
    for p, update in zip(params, orthogonal.unbind(0)):
        if decay is not None:
            p.mul_(decay)  # decoupled weight decay, as in AdamW
        update = update.to(p.dtype)
        if isinstance(step_size, torch.Tensor):
            p.sub_(update * step_size)
        else:
            p.add_(update, alpha=-step_size)


_muon_update_compiled = None  # made on first use: creating it imports torch._dynamo (seconds at every import)


def compile_by_default(device):
    return device.type == "cuda" or os.environ.get("NANOCHAT_COMPILE_MUON") == "1"


class Muon(torch.optim.Optimizer):
    """Muon in one process. Params are grouped by shape (one param group per shape, in a fixed order): each group is
    updated as one stack, and DistMuon needs the same layout.
    ns_dtype: the Newton-Schulz precision. Default: bf16 where the model computes in bf16 (the hardware multiplies
    bf16 natively, and bf16 is accurate enough here), else fp32: on a CPU without native bf16 a bf16 Newton-Schulz
    is 10-35x slower than fp32 (measured, AVX2 EPYC). Tests set fp32 for exact comparisons.
    compile: run the update torch.compile'd; None = on CUDA only (see the module docstring)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0, ns_dtype=None,
                 compile=None):
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
        self.compile = compile
        self._scalars = {}  # (name, dtype, device) -> 0-D tensor that the compiled update reads its numbers from

    def _scalar(self, name, value, like):
        """value as a persistent 0-D tensor of like's dtype and device, refilled in place (no host sync on CUDA)."""
        key = (name, like.dtype, like.device)
        if key not in self._scalars:
            self._scalars[key] = torch.zeros((), dtype=like.dtype, device=like.device)
        return self._scalars[key].fill_(value)

    def _update(self, params, grads, group):
        """Update the same-shape matrices `params` of `group` given their gradients."""
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        rows, cols = params[0].shape
        # An orthogonal update has RMS ~ 1/sqrt(max(rows, cols)); the factor gives tall matrices the same RMS per
        # element as wide ones of the same size
        step_size = group["lr"] * max(1.0, rows / cols) ** 0.5
        momentum = group["momentum"]
        decay = 1 - group["lr"] * group["weight_decay"] if group["weight_decay"] else None
        static = dict(nesterov=group["nesterov"], ns_steps=group["ns_steps"], ns_dtype=self.ns_dtype)
        compile = self.compile if self.compile is not None else compile_by_default(params[0].device)
        if not compile:
            muon_update(params, grads, buffers, momentum, 1 - momentum, step_size, decay, **static)
            return
        global _muon_update_compiled
        if _muon_update_compiled is None:
            _muon_update_compiled = torch.compile(muon_update, dynamic=False)
        like = params[0]
        numbers = [self._scalar(name, value, like) if value is not None else None for name, value in
                   [("momentum", momentum), ("one_minus_momentum", 1 - momentum), ("step_size", step_size),
                    ("decay", decay)]]
        _muon_update_compiled(params, grads, buffers, *numbers, **static)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, [p.grad for p in params], group)


class DistMuon(Muon):
    """Muon across the ranks of the default process group, without a DDP wrapper. Within each shape group the
    params go in blocks of world_size: param block[r] is owned by rank r. One reduce-scatter per block hands every
    owner its param's gradient averaged over all ranks; each rank updates all the params it owns in the group as
    one stack; one all-gather per block copies the new values everywhere. All reductions are launched before any
    update so that communication overlaps the Newton-Schulz work."""

    @torch.no_grad()
    def step(self):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        reductions = []  # per group: (group, [(block of params, the gradient this rank owns, pending work)])
        for group in self.param_groups:
            params = group["params"]
            zero = torch.zeros_like(params[0])  # pads the last block and stands in for a missing grad
            blocks = []
            for base in range(0, len(params), world_size):
                block = params[base:base + world_size]
                grads = [p.grad if p.grad is not None else zero for p in block]
                grads += [zero] * (world_size - len(block))
                owned_grad = torch.empty_like(zero)
                work = dist.reduce_scatter(owned_grad, grads, op=dist.ReduceOp.AVG, async_op=True)
                blocks.append((block, owned_grad, work))
            reductions.append((group, blocks))
        gathers = []
        for group, blocks in reductions:
            for _, _, work in blocks:
                work.wait()
            owned = [(block[rank], owned_grad) for block, owned_grad, _ in blocks if rank < len(block)]
            if owned:
                self._update([p for p, _ in owned], [g for _, g in owned], group)
            for block, _, _ in blocks:
                if rank < len(block):
                    source = block[rank]
                else:
                    source = torch.empty_like(block[0])  # this rank owns nothing in the last block: sends padding
                outputs = block + [torch.empty_like(block[0]) for _ in range(world_size - len(block))]
                if rank >= len(block):
                    outputs[rank] = source
                gathers.append(dist.all_gather(outputs, source, async_op=True))
        for work in gathers:
            work.wait()
