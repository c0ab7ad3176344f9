"""
Run by tests/test_optim.py under `torchrun --standalone --nproc_per_node=2` (gloo, CPU); not a pytest module.

Checks that MuonAdamW across 2 ranks computes what it computes in one process:
  1. a small GPT trained for a few steps with setup_optimizers(), each rank computing the gradients of its half of
     the batch, ends with the same weights as the same GPT trained by the same optimizer on the whole batch in one
     process (in float64, so the two agree to float rounding): the seed's model and Muon, and the v2 recipe's;
  2. its AdamW on params that take each path (sharded by rows, too small, rows not divisible) matches one process
     on the averaged gradients;
  3. Muon state lives only on a param's owner, and a saved/reloaded per-rank optimizer state resumes exactly (v2's,
     with NorMuon's second moments).
Prints "OK" from every rank on success; any failed assert exits non-zero.
"""

import copy

import torch
import torch.distributed as dist

import nanochat.gpt
import nanochat.optim
from nanochat.gpt import GPT, GPTConfig, arch_config
from nanochat.optim import MuonAdamW

# Part 1 runs the model in float64: in fp32 the gradients of this tiny random model carry ~1e-3 relative rounding
# noise (sums that nearly cancel), so half-batch gradients averaged over ranks differ visibly from the full-batch
# one, and Adam's normalization turns that into step-sized differences. In fp64 the runs agree to ~1e-12.
nanochat.gpt.COMPUTE_DTYPE = torch.float64
# Weights are compared relative to their size; a wrong owner, shard, average or gather leaves >= 1e-4.
RTOL = 1e-5

dist.init_process_group("gloo")
rank, world_size = dist.get_rank(), dist.get_world_size()
assert world_size == 2, f"run with --nproc_per_node=2, got {world_size}"


def max_diff(params_a, params_b):
    """The largest difference between corresponding params, relative to the param's largest entry."""
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(params_a, params_b))


def train(model, optimizer, idx, targets, steps):
    for _ in range(steps):
        model(idx, targets).backward()
        optimizer.update()


def one_process(step):
    """Run step() as if no process group were up: the single-process code path of the same optimizer."""
    real = nanochat.optim.dist_rank_and_size
    nanochat.optim.dist_rank_and_size = lambda: (0, 1)
    try:
        return step()
    finally:
        nanochat.optim.dist_rank_and_size = real


# 1. The real model and optimizer setup, of the seed and of the v2 recipe (value embeddings, lambdas, smear, backout,
# windows; Muon with Polar Express, NorMuon and cautious weight decay). 3 layers and GQA: every Muon shape group has
# an odd number of matrices, so the last block of each is partial and exercises the padding.
RECIPE_MUON = dict(orthogonalizer="polar_express", beta2=0.9, weight_decay=0.2, cautious_weight_decay=True)
for arch, muon in [("seed", None), ("v2", RECIPE_MUON)]:
    config = GPTConfig(sequence_len=16, vocab_size=300, n_layer=3, n_head=4, n_kv_head=2, n_embd=64,
                       **arch_config(arch))
    torch.manual_seed(0)  # the same init, batch and data on every rank
    model = GPT.create(config, "cpu")
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # zero-initialized projections would hide mistakes
    reference = copy.deepcopy(model)
    idx = torch.randint(0, config.vocab_size, (4, 16))
    targets = torch.randint(0, config.vocab_size, (4, 16))

    optimizer = model.setup_optimizers(muon=muon)  # the process group is up: it communicates
    optimizer.ns_dtype = torch.float64
    half = slice(rank * 2, rank * 2 + 2)  # this rank's half of the batch
    train(model, optimizer, idx[half], targets[half], steps=5)

    ref_optimizer = reference.setup_optimizers(muon=muon)
    ref_optimizer.ns_dtype = torch.float64
    one_process(lambda: train(reference, ref_optimizer, idx, targets, steps=5))

    model_diff = max_diff(model.parameters(), reference.parameters())
    assert model_diff < RTOL, f"rank {rank}, {arch}: distributed vs single-process weights differ by {model_diff:.3g}"
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), f"{arch}: the ranks' weights diverged"

# 3a. Momentum only on owners: each rank holds the state of the matrices it owns, half of them (rounded up/down).
muon_groups = [group for group in optimizer.param_groups if group["kind"] == "muon"]
owned = sum(len(range(rank, len(group["params"]), world_size)) for group in muon_groups)
muon_state = [p for group in muon_groups for p in group["params"] if p in optimizer.state]
assert len(muon_state) == owned and owned > 0, (len(muon_state), owned)
# 3b. Per-rank state round trip: a fresh optimizer loaded from state_dict() continues exactly like the original.
snapshot = copy.deepcopy(model)
state = copy.deepcopy(optimizer.state_dict())
train(model, optimizer, idx[half], targets[half], steps=2)
optimizer2 = snapshot.setup_optimizers(muon=muon)
optimizer2.load_state_dict(state)
optimizer2.ns_dtype = torch.float64
train(snapshot, optimizer2, idx[half], targets[half], steps=2)
assert max_diff(model.parameters(), snapshot.parameters()) == 0.0, "resumed optimizer state does not continue exactly"

# 2. AdamW's three paths across ranks: sharded (64 x 32), too small to shard (3 x 5), rows not divisible by 2 (33 x 64).
torch.manual_seed(1)
shapes = [(64, 32), (3, 5), (33, 64)]
params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
settings = dict(kind="adamw", lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
dist_opt = MuonAdamW([dict(params=params, **settings)])
ref_opt = MuonAdamW([dict(params=ref_params, **settings)])
for step in range(4):
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(world_size)]  # every rank draws all ranks'
    for p, g in zip(params, grads[rank]):
        p.grad = g.clone()
    for p, *per_rank in zip(ref_params, *grads):
        p.grad = sum(per_rank) / world_size
    dist_opt.step()
    one_process(ref_opt.step)
adamw_diff = max_diff(params, ref_params)
assert adamw_diff < RTOL, f"rank {rank}: AdamW on 2 ranks vs 1 differs by (relative) {adamw_diff:.3g}"
assert dist_opt.state[params[0]]["exp_avg"].shape == (32, 32)  # ZeRO-2: this rank keeps moments of its rows only
assert dist_opt.state[params[1]]["exp_avg"].shape == (3, 5)

print(f"rank {rank} OK: model max diff {model_diff:.2g}, AdamW max diff {adamw_diff:.2g}", flush=True)
dist.barrier()  # leave together: gloo can abort a rank that tears down while the other still talks
dist.destroy_process_group()
