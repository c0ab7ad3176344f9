"""
The GPT model: a decoder-only Transformer, its weight init, FLOP estimate, optimizer grouping and a naive sampler.

Architecture: token embedding -> RMSNorm -> pre-norm blocks (attention with rotary embeddings, QK-norm and
grouped-query attention; a relu^2 MLP) -> RMSNorm -> untied lm_head -> logit softcap. No biases and no learnable
norm parameters anywhere. GPTConfig's fields beyond the shape switch on the parts of the original nanochat's newest
recipe (value embeddings, per-layer lambdas, smear, backout, sliding windows, ...); their defaults are the
architecture above. Weights are fp32 master copies; activations run in COMPUTE_DTYPE
(nanochat.common) with each Linear casting its weight at use, so there is no autocast and what runs in which
precision is explicit.

Also here: KVCache, the preallocated key/value store that makes decoding incremental. Not here: batched sampling,
tools and stopping rules (nanochat/engine.py), the training loop (scripts/base_train.py).
"""

import ctypes
import math
import sys
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, UserError
from nanochat.optim import MuonAdamW, muon_groups


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads: n_head = multi-head, fewer = grouped-query, 1 = multi-query
    n_embd: int = 768
    # The architecture beyond the shape. Every default is the seed's, so that a checkpoint saved before a field existed
    # loads as the model it was; base_train's --arch picks a preset of ARCHITECTURES.
    value_embeds: bool = False  # a second token embedding added to the values of alternating layers (the last
    # included) through a gate per key/value head computed from the layer's input (ResFormer-style)
    value_embeds_every_layer: bool = False  # with value_embeds: in every layer
    layer_lambdas: bool = False  # learned per-layer scalars: x = resid_lambdas[i] * x + x0_lambdas[i] * x0 before
    # block i, x0 the embedding (how much of the stream to keep, how much of the input to re-inject)
    smear: bool = False  # each token's embedding gets a gated share of the previous token's (bigram information)
    backout: bool = False  # a learned share of the mid-depth residual stream is subtracted before the head
    qk_scale: float = 1.0  # q and k times this after QK-norm (> 1: sharper attention)
    rope_base: float = 10000.0  # the rotary embedding's base period
    window_pattern: str = "L"  # per layer, tiled: L attends to the whole context, S to a sliding window of a quarter
    # of sequence_len; the last layer is always L
    wte_std: float = 1.0  # init: the token embedding's standard deviation
    c_fc_gain: float = 1.0  # init: the MLP's input matrix relative to the attention matrices' std 1/sqrt(n_embd)


SHAPE_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
SEED_ARCHITECTURE = {f.name: f.default for f in fields(GPTConfig) if f.name not in SHAPE_FIELDS}
# base_train's --arch presets: "seed" is today's model (the defaults), "v2" the original nanochat's newest recipe
ARCHITECTURES = {
    "seed": {},
    "v2": dict(value_embeds=True, layer_lambdas=True, smear=True, backout=True, qk_scale=1.2, rope_base=100000.0,
               window_pattern="SSSL", wte_std=0.8, c_fc_gain=0.4),
}


def arch_config(arch):
    """Every architecture field of GPTConfig for base_train's --arch: a preset of ARCHITECTURES, then optional
    ,field=value overrides: "v2", "seed", "v2,smear=False,window_pattern=L"."""
    from nanochat.configurator import parse_overrides

    name, *overrides = [part.strip() for part in arch.split(",")]
    if name not in ARCHITECTURES:
        raise UserError(f"arch={arch!r}: the architecture {name!r} is not one of {', '.join(ARCHITECTURES)}")
    settings = {**SEED_ARCHITECTURE, **ARCHITECTURES[name]}
    try:  # the fields parse and type-check like --name=value settings
        settings.update(parse_overrides(settings, [f"--{override}" for override in overrides]))
        check_window_pattern(settings["window_pattern"])
    except (UserError, ValueError) as error:
        raise UserError(f"arch={arch!r}: {error}") from None
    return settings


def check_window_pattern(pattern):
    if not pattern or set(pattern) - {"S", "L"}:
        raise ValueError(f"window_pattern={pattern!r}: expected the letters S and L, like SSSL")


def dims_for_depth(depth):
    """The one dial: n_layer = depth, width 64 * depth (aspect ratio 64), heads ~128 wide (exactly 128 where the width
    is a multiple of 128), as many key/value heads as query heads. The GPTConfig fields besides sequence_len and
    vocab_size, for base_train, the tests and the benchmarks alike."""
    if depth < 1:
        raise UserError(f"depth={depth}: expected a positive number of layers")
    model_dim = 64 * depth
    num_heads = max(1, (model_dim + 127) // 128)
    if model_dim % num_heads != 0:
        raise UserError(f"depth={depth} gives model_dim={model_dim}, which does not split into {num_heads} heads of equal "
                        f"size (heads are ~128 wide); use an even depth (or 1, 3, 7)")
    return dict(n_layer=depth, n_head=num_heads, n_kv_head=num_heads, n_embd=model_dim)


def keep_freed_cpu_memory():
    """Have glibc keep freed memory for reuse instead of handing large blocks back to the kernel; for CPU training.
    A step allocates and frees the same large buffers every time (the logits and their gradient: B*T*vocab values,
    268 MB in fp32 at 2,048 tokens and vocab 32K); by default glibc maps each block > 32 MB fresh and unmaps it on
    free, so every step page-faults all of it back in (~170K faults a step at d4, ~20% of its time). The price: the
    process's resident memory stays at its peak. Returns whether the setting took (False off Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
        # no mmap'd blocks (glibc still falls back to mmap when the heap cannot grow), and never trim the heap
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def norm(x):
    """RMSNorm without a learnable scale: the blocks' own weights absorb any scale they need."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """A bias-free Linear whose fp32 master weight is cast to the activations' dtype at use."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


def unembed(x, weight):
    """x @ weight.T for the lm_head. On CPU in fp32, MKL multiplies a few rows by the wide vocabulary weight on a slow
    path, and the same product taken transposed (weight @ x.T) on a fast one: d4, vocab 32K, 2 cores, 8 rows 6.1 ->
    2.3 ms, 2 rows 8.7 -> 1.0 ms, and a lone row, doubled (one row is a slow matrix-vector product either way), 4.1 ->
    1.0 ms. That is every decode step: the lm_head was over half of the engine's fp32 step at batch 1. Elsewhere
    (bf16, CUDA, training's many rows) the plain product is as fast or faster."""
    rows = x.reshape(-1, x.size(-1))
    if x.device.type != "cpu" or x.dtype != torch.float32 or rows.size(0) > 64:
        return F.linear(x, weight)
    few = rows.expand(2, -1).contiguous() if rows.size(0) == 1 else rows
    return (weight @ few.t()).t()[:rows.size(0)].reshape(*x.shape[:-1], weight.size(0))


def softcap(logits, cap=15):
    """cap * tanh(logits / cap): logits bounded to (-15, 15), which keeps them from running away early in training.
    Written with sigmoid (tanh(z) = 2 sigmoid(2z) - 1): the same function to fp32 rounding, but on CPU a vectorized
    sigmoid is ~6x cheaper than tanh, and this runs over B*T*vocab values in the forward and again in the backward
    (d4, vocab 32K, bf16, CPU: softcap + cross-entropy went from 28% to 15% of a training step). Monotonic: the
    largest logits stay the largest, so a sampler may cap only the ones it keeps."""
    return (2 * cap) * torch.sigmoid(logits * (2 / cap)) - cap


def apply_rotary_emb(x, cos, sin):
    """Rotate each (first half, second half) pair of channels of x (B, T, H, D) by the position's angle."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_attention_explicit(q, k, v):
    """Causal attention written out (scores, mask, softmax, weighted sum) for q, k, v (B, H, T, D), grouped-query
    k, v allowed. The full forward uses it for bf16 on CPU at T <= 512, where it measured 1.2-3x faster than
    SDPA's CPU flash kernel (fwd+bwd 57 vs 90 ms a layer at B 8, T 512, one thread: ~13% of a demo step) at the
    same accuracy (scores and softmax in fp32); in fp32 the two are equally fast, so fp32 keeps SDPA. Past T 512
    the T x T fp32 scores cost more than they save (B 4, T 1000, one thread: forward 87 vs 35 ms, fwd+bwd 113 vs
    101 ms), which long CORE prompts hit."""
    if k.size(1) != q.size(1):  # grouped-query: each key/value head serves n_head / n_kv_head query heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    T = q.size(2)
    scores = (q @ k.transpose(-1, -2)).float() * q.size(-1) ** -0.5  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).to(v.dtype)
    return weights @ v


GATE_CHANNELS = 16  # the value-embedding and smear gates read this many leading channels of their input: a cheap
# summary of the token, enough to decide how much to mix in


def has_value_embed(layer_idx, config):
    """Value embeddings go to alternating layers, the last one included (or to every layer)."""
    return config.value_embeds and (config.value_embeds_every_layer or layer_idx % 2 == (config.n_layer - 1) % 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_scale = config.qk_scale
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.ve_gate = Linear(GATE_CHANNELS, self.n_kv_head) if has_value_embed(layer_idx, config) else None

    def forward(self, x, value_embed, cos, sin, kv_cache, positions, attn_mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if self.ve_gate is not None:  # value_embed (B, T, n_kv_head * head_dim): this layer's row of the token
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :GATE_CHANNELS]))  # (B, T, n_kv_head) in (0, 2), 1 at init
            v = v + gate.unsqueeze(-1) * value_embed.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)  # QK-norm (after rotary): bounded attention logits, stabler training
        if self.qk_scale != 1.0:  # QK-norm fixes the logits' scale; this sets it
            q, k = q * self.qk_scale, k * self.qk_scale
        if kv_cache is not None:
            # the new keys/values go into the cache; attend to everything cached so far, as far as attn_mask allows
            # (no mask: the cache was empty, so the T new keys are all there is)
            k, v = kv_cache.insert(self.layer_idx, k, v, positions, T if attn_mask is None else attn_mask.size(-1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D) for SDPA
        if attn_mask is None and q.device.type == "cpu" and q.dtype == torch.bfloat16 and T <= 512:
            y = causal_attention_explicit(q, k, v)  # faster there (see its docstring)
        elif attn_mask is None:  # keys == queries (training, a full forward, a prefill from empty): plain causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # a sliding window, or a chunk on top of a cache: the mask says who sees whom
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        y = y.transpose(1, 2)  # (B, T, H, D)
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())  # relu^2: sparse like relu, smoother gradients


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, value_embed, cos, sin, kv_cache, positions, attn_mask):
        x = x + self.attn(norm(x), value_embed, cos, sin, kv_cache, positions, attn_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.n_embd % config.n_head or config.n_head % config.n_kv_head:
            raise ValueError(f"n_embd={config.n_embd}, n_head={config.n_head}, n_kv_head={config.n_kv_head}: n_embd must "
                             f"be a multiple of n_head and n_head a multiple of n_kv_head")
        check_window_pattern(config.window_pattern)
        self.config = config
        # The embedding/lm_head rows are padded to a multiple of 64 (aligned matmuls, even sharding across ranks);
        # the extra logits are sliced off in forward, so nothing ever predicts or sees a padding id.
        self.padded_vocab_size = -(-config.vocab_size // 64) * 64
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(self.padded_vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(config.n_embd, self.padded_vocab_size)  # untied from wte
        # per layer, how many keys before itself a query sees: -1 = all of them
        short = -(-config.sequence_len // 4)
        pattern = config.window_pattern
        self.windows = [short if pattern[i % len(pattern)] == "S" else -1 for i in range(config.n_layer - 1)] + [-1]
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(self.padded_vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embed(i, config)})
        if config.layer_lambdas:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        if config.smear:
            self.smear_gate = Linear(GATE_CHANNELS, 1)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if config.backout:
            self.backout_lambda = nn.Parameter(torch.zeros(1))
        # Rotary tables for 10x the training length (room for long generations); not saved in checkpoints,
        # (re)computed by init_weights, which is why loading a checkpoint calls init_weights first.
        self.rotary_seq_len = 10 * config.sequence_len
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len)
        self.register_buffer("cos", cos, persistent=False)  # (rotary_seq_len, head_dim / 2)
        self.register_buffer("sin", sin, persistent=False)

    @classmethod
    def create(cls, config, device):
        """A GPT of this config with freshly initialized weights on device: built on the meta device (shapes only),
        then allocated on device and initialized there, so a large model is never first made on the CPU."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights()
        return model

    @torch.no_grad()
    def init_weights(self):
        """All real initialization (the model is built on the meta device, where __init__'s values are fake).
        The scheme is the original's Jan-2026 one, not the Nov-2025 fan-in/fan-out normal one: lm_head starts
        small but non-zero (N(0, 0.001)), so every weight gets a gradient from the first step (a zero lm_head
        blocks all gradient to the blocks and the embedding on step one), and the uniform init has no outliers.
        The output projections start at zero, so each block starts as the identity on the residual stream."""
        config = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=config.wte_std)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3) / math.sqrt(config.n_embd)  # uniform with std 1/sqrt(fan_in), fan_in n_embd for all four
        for block in self.transformer.h:
            for linear, gain in ((block.attn.c_q, 1), (block.attn.c_k, 1), (block.attn.c_v, 1),
                                 (block.mlp.c_fc, config.c_fc_gain)):
                nn.init.uniform_(linear.weight, -bound * gain, bound * gain)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        # The recipe's parts, drawn after the seed's (whose draws stay the same). The gates start at zero: x 1.
        for table in self.value_embeds.values():
            nn.init.uniform_(table.weight, -bound, bound)  # like c_v: values of the same scale
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        if config.layer_lambdas:  # more of the stream and of the embedding early, less deep
            self.resid_lambdas.copy_(torch.linspace(1.15, 1.05, config.n_layer))
            self.x0_lambdas.copy_(torch.linspace(0.20, 0.05, config.n_layer))
        if config.smear:  # no smear at the start; learned
            nn.init.zeros_(self.smear_gate.weight)
            nn.init.zeros_(self.smear_lambda)
        if config.backout:
            nn.init.constant_(self.backout_lambda, 0.2)
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len)

    def _precompute_rotary_embeddings(self, seq_len):
        head_dim = self.config.n_embd // self.config.n_head
        device = self.transformer.wte.weight.device
        base = self.config.rope_base
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        return angles.cos().to(COMPUTE_DTYPE), angles.sin().to(COMPUTE_DTYPE)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_scaling_params(self, embedding=True):
        """Parameters counted for the tokens:params horizon: the blocks' and the lm_head's, and the token embedding's
        unless embedding=False (the original's count, which its batch-size law and its ratio of ~12 tokens per
        parameter are fit to: its dev/LOG.md, Jan 27 2026); never the value-embedding tables nor the scalars."""
        count = sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()
        return count + self.transformer.wte.weight.numel() * embedding

    def estimate_flops(self):
        """Training FLOPs per token: 6 per weight that multiplies (every Linear; not the embedding lookups nor the
        scalars) plus attention's QK^T and AV over the keys each layer sees, its context or window (PaLM appendix B)."""
        config = self.config
        H, D, T = config.n_head, config.n_embd // config.n_head, config.sequence_len
        linear_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * linear_weights + 12 * H * D * sum(T if window < 0 else min(window, T) for window in self.windows)

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0, scalar_lr=0.5,
                         muon=None):
        """One MuonAdamW (nanochat/optim.py): AdamW for the lm_head, the embeddings and the scalars, Muon for every
        matrix in the blocks; across the ranks of a process group when one is up (it also averages the gradients:
        there is no DDP wrapper). weight_decay applies to the AdamW groups of the lm_head and the embeddings, as in
        the original; muon: settings of every Muon group (MUON_DEFAULTS of nanochat/optim.py where absent)."""
        # AdamW LRs were tuned at n_embd 768; scale them as 1/sqrt(width) for other widths
        lr_scale = (self.config.n_embd / 768) ** -0.5
        adamw = dict(kind="adamw", betas=(0.8, 0.95), eps=1e-10)
        groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * lr_scale, weight_decay=weight_decay, **adamw),
                  dict(params=[self.transformer.wte.weight], lr=embedding_lr * lr_scale, weight_decay=weight_decay,
                       **adamw)]
        if self.config.value_embeds:
            groups.append(dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * lr_scale / 2,
                               weight_decay=weight_decay, **adamw))
        if self.config.layer_lambdas:  # the residual scales move slowly: x -> 1.1 x compounds over the layers
            groups += [dict(params=[self.resid_lambdas], lr=scalar_lr / 100, **adamw),
                       dict(params=[self.x0_lambdas], lr=scalar_lr, **adamw)]
        gates = [p for name, p in self.named_parameters() if name.startswith(("smear_", "backout_"))]
        if gates:
            groups.append(dict(params=gates, lr=scalar_lr * 0.4, **adamw))
        groups += muon_groups(self.transformer.h.parameters(), lr=matrix_lr, momentum=0.95, **(muon or {}))
        assert sum(len(group["params"]) for group in groups) == len(list(self.parameters()))
        return MuonAdamW(groups)

    def attention_masks(self, T, positions, attn_mask):
        """Each layer's attention mask: attn_mask (None = plain causal) where it sees the whole context; for a window
        of `left` keys, also no key more than `left` positions before the query. positions: (B, T) with a KV cache."""
        masks = {-1: attn_mask}
        for left in set(self.windows) - {-1}:
            if positions is None:  # (T, T)
                distance = torch.arange(T, device=self.cos.device)[:, None] - torch.arange(T, device=self.cos.device)
            else:  # (B, 1, T, keys): each query's absolute position against every cached key's
                keys = T if attn_mask is None else attn_mask.size(-1)
                distance = (positions[:, :, None] - torch.arange(keys, device=positions.device))[:, None]
            masks[left] = (distance >= 0) & (distance <= left)
        return [masks[left] for left in self.windows]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", logits_from=0, compiled=None):
        """idx (B, T) token ids. Returns the loss (a scalar, or (B, T) for loss_reduction="none") when targets are
        given, else fp32 logits (B, T, vocab_size). With kv_cache, idx continues each row's cached tokens.
        logits_from: logits of positions logits_from.. only, (B, T - logits_from, vocab_size); -1 = the last one.
        A prefill needs only the last, a scorer only its answer spans, and the lm_head over every position costs as
        much as the rest of the forward (d4, vocab 32K: 8.4M multiply-adds a position against 3.1M for the four
        blocks).
        compiled: (blocks, head) to run in place of self.transformer.h and self.head, from compile_regions."""
        assert not (logits_from and targets is not None), "logits_from gives logits; the loss needs every position"
        B, T = idx.size()
        if kv_cache is None:
            assert T <= self.rotary_seq_len, f"{T} tokens: longer than the rotary table ({self.rotary_seq_len})"
            positions = attn_mask = None
            cos, sin = self.cos[None, :T, None, :], self.sin[None, :T, None, :]  # (1, T, 1, D/2)
        else:
            if kv_cache.dtype != COMPUTE_DTYPE:
                raise ValueError(f"KVCache dtype {kv_cache.dtype} != the model's compute dtype {COMPUTE_DTYPE}")
            # keys 0..attend_len-1 are read; the length is known on the host, so nothing is read back from the device
            attend_len = kv_cache.attend_len(T)
            assert attend_len <= self.rotary_seq_len, f"position {attend_len}: past the rotary table ({self.rotary_seq_len})"
            positions = kv_cache.pos[:, None] + torch.arange(T, device=idx.device)  # (B, T) absolute positions
            cos, sin = self.cos[positions][:, :, None, :], self.sin[positions][:, :, None, :]  # (B, T, 1, D/2)
            # query at position p sees keys 0..p: the whole prefix plus causal within the chunk; for one token,
            # everything cached. Per-row positions make it (B, 1, T, attend_len), broadcast over heads.
            if attend_len == T:  # every row starts at 0 (a prompt into an empty cache): plain causal, no mask, and
                attn_mask = None  # SDPA's causal kernel skips the masked half, which an explicit mask makes it compute
            else:
                key_positions = torch.arange(attend_len, device=idx.device)
                attn_mask = (key_positions[None, None, :] <= positions[:, :, None])[:, None]
        blocks, head = compiled or (self.transformer.h, self.head)
        config = self.config
        masks = self.attention_masks(T, positions, attn_mask)
        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))  # (B, T, C)
        if config.smear:  # plus a share of the previous token's embedding, gated by the current token
            previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # (B, T, C): none at position 0
            if kv_cache is not None:  # the first new token's previous one is in the cache (none at position 0)
                before = norm(self.transformer.wte(kv_cache.token_before(idx, positions)).to(COMPUTE_DTYPE))
                previous = torch.cat([(before * (positions[:, :1] > 0))[:, None], x[:, :-1]], dim=1)
            x = x + self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :GATE_CHANNELS])) * previous
        x0 = x
        for i, block in enumerate(blocks):
            if config.layer_lambdas:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            value_embed = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, value_embed, cos, sin, kv_cache, positions, masks[i])
            if i == config.n_layer // 2:
                x_mid = x
        if config.backout:  # take out some of the mid-depth stream: features the head need not see
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        if kv_cache is not None:
            kv_cache.advance(T)
        return head(x[:, logits_from:], targets, loss_reduction)

    def decode_weights(self):
        """decode_step's weights, per layer (qkv, proj, fc, fc_out), each in COMPUTE_DTYPE and laid out for x @ w:
        c_q, c_k and c_v fused into one copy; the others transposed views of the weights themselves (copies too when
        the masters are in another dtype, as in RL training). Copies are refreshed in place when their weights change
        (an optimizer step between two rollouts), so that a captured CUDA graph keeps reading the right memory. None
        when decode_step does not cover this model's architecture. Called every decode step: when no weight has moved
        or changed (one look at each), the same list again."""
        # a GPTConfig field that decode_step does not know (a new architecture option) turns it off, and the engine
        # decodes through forward instead (slower, never wrong)
        if {f.name for f in fields(self.config)} != {*SHAPE_FIELDS, *SEED_ARCHITECTURE}:
            return None
        if not hasattr(self, "_decode_weights"):
            self._decode_weights, self._decode_layers, self._decode_state = {}, None, None
            self._decode_groups = [((b.attn.c_q.weight, b.attn.c_k.weight, b.attn.c_v.weight), (b.attn.c_proj.weight,),
                                    (b.mlp.c_fc.weight,), (b.mlp.c_proj.weight,)) for b in self.transformer.h]
        state = [(w.data_ptr(), w.dtype, w._version) for groups in self._decode_groups for group in groups for w in group]
        if state != self._decode_state:
            self._decode_layers = [tuple(self._decode_weight((i, j), group) for j, group in enumerate(groups))
                                   for i, groups in enumerate(self._decode_groups)]
            self._decode_state = state
        return self._decode_layers

    @torch.no_grad()
    def _decode_weight(self, key, group):
        """The weights of `group` stacked, in COMPUTE_DTYPE, transposed: kept under `key`, rebuilt when a weight has
        moved, refreshed in place when one has changed."""
        identity = [(w.data_ptr(), w.dtype) for w in group]
        versions = [w._version for w in group]
        entry = self._decode_weights.get(key)
        if entry is None or entry[0] != identity:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: refreshable in or out of inference mode
                if len(group) == 1 and group[0].dtype == COMPUTE_DTYPE:
                    entry = [identity, versions, None, group[0].t()]  # a view: it never needs refreshing
                else:
                    copy = torch.cat(group).to(COMPUTE_DTYPE)
                    entry = [identity, versions, copy, copy.t()]
            self._decode_weights[key] = entry
        elif entry[2] is not None and entry[1] != versions:
            entry[2].copy_(torch.cat(group))
            entry[1] = versions
        return entry[3]

    def decode_step(self, idx, kv_cache, weights, capped=True):
        """Logits (B, vocab_size) of one new token per row, idx (B,), continuing kv_cache: what
        forward(idx[:, None], kv_cache=kv_cache)[:, -1] computes, in fewer ops (the engine's decode step; weights from
        decode_weights). Activations stay (B, C); q, k and v come from one product; rotary (as x * cos + swap(x) * sin,
        the same products and sums as apply_rotary_emb) and QK-norm run once on q and k together; the attention mask is
        additive and made once for all layers (once per window size). The architecture settings as in forward.
        capped=False: the logits before the softcap (see head)."""
        B, config = idx.size(0), self.config
        H, Hkv = config.n_head, config.n_kv_head
        D = config.n_embd // H
        length = kv_cache.attend_len(1)
        positions = kv_cache.pos  # (B,)
        cos, sin = self.cos[positions], self.sin[positions]  # (B, D/2)
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([-sin, sin], -1)[:, None]  # (B, 1, D)
        masks = {}  # additive, made once: SDPA would turn a boolean mask into this in every layer
        for window in set(self.windows):
            hidden = torch.arange(length, device=idx.device) > positions[:, None]  # (B, length)
            if window >= 0:
                hidden |= torch.arange(length, device=idx.device) < positions[:, None] - window
            attn_mask = torch.zeros(hidden.shape, dtype=COMPUTE_DTYPE, device=idx.device)
            masks[window] = attn_mask.masked_fill_(hidden, -math.inf)[:, None, None]  # (B, 1, 1, length)
        positions = positions[:, None]  # (B, 1)
        x = norm(self.transformer.wte(idx).to(COMPUTE_DTYPE))  # (B, C)
        if config.smear:
            before = norm(self.transformer.wte(kv_cache.token_before(idx[:, None], positions)).to(COMPUTE_DTYPE))
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, :GATE_CHANNELS]))  # (B, 1)
            x = x + gate * before * (positions > 0)
        x0 = x
        for i, (attn, (qkv_weight, proj, fc, fc_out)) in enumerate(zip([b.attn for b in self.transformer.h], weights)):
            if config.layer_lambdas:
                x = self.resid_lambdas[i].to(x.dtype) * x + self.x0_lambdas[i].to(x.dtype) * x0
            h = norm(x)
            qkv = torch.mm(h, qkv_weight).view(B, H + 2 * Hkv, D)
            qk, v = qkv[:, :H + Hkv], qkv[:, H + Hkv:]
            if attn.ve_gate is not None:
                gate = 2 * torch.sigmoid(attn.ve_gate(h[:, :GATE_CHANNELS]))[..., None]  # (B, Hkv, 1)
                v = v + gate * self.value_embeds[str(i)](idx).to(x.dtype).view(B, Hkv, D)
            halves_swapped = qk.view(B, H + Hkv, 2, D // 2).flip(2).view(B, H + Hkv, D)
            qk = norm(qk * cos + halves_swapped * sin)  # rotary, then QK-norm
            if attn.qk_scale != 1.0:
                qk = qk * attn.qk_scale
            keys, values = kv_cache.insert(i, qk[:, None, H:], v[:, None], positions, length)
            y = F.scaled_dot_product_attention(qk[:, :H, None], keys.transpose(1, 2), values.transpose(1, 2),
                                               attn_mask=masks[self.windows[i]], enable_gqa=True)  # (B, H, 1, D)
            x = x + torch.mm(y.view(B, -1), proj)
            x = x + torch.mm(F.relu(torch.mm(norm(x), fc)).square(), fc_out)
            if i == config.n_layer // 2:
                x_mid = x
        if config.backout:
            x = x - self.backout_lambda.to(x.dtype) * x_mid
        kv_cache.advance(1)
        return self.head(x[:, None], None, None, capped)[:, 0]

    def head(self, x, targets, loss_reduction, capped=True):
        """The last blocks' output (B, T, C) -> fp32 logits (B, T, vocab_size), or the loss when targets are given.
        capped=False: the logits before the softcap (a sampler that needs only a few of them caps those)."""
        B, T, _ = x.size()
        x = norm(x)
        logits = unembed(x, self.lm_head.weight.to(x.dtype))[..., :self.config.vocab_size]
        logits = logits.float()  # fp32 before the squashing (bf16 is coarse)
        if targets is None:
            return softcap(logits) if capped else logits
        logits = softcap(logits)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)
        return loss.view(B, T) if loss_reduction == "none" else loss

    def compile_regions(self):
        """A callable like this model's forward for full sequences (idx, targets=None, loss_reduction="mean"), with
        every block and the head torch.compile'd as separate regions; the model itself stays uncompiled (for
        sampling, the KV cache path and state_dict). Blocks of one shape share one compiled graph, so compile time
        does not grow with depth: cold, d4 on 2 CPU cores, 17-24 s against 22-30 s for torch.compile of the whole
        model, at the same step time (within run-to-run noise; dev/BENCHMARKS.md)."""
        blocks = [torch.compile(block, dynamic=False) for block in self.transformer.h]
        head = torch.compile(self.head, dynamic=False)

        def forward(idx, targets=None, loss_reduction="mean"):
            return self(idx, targets, loss_reduction=loss_reduction, compiled=(blocks, head))
        return forward

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Yield max_tokens sampled token ids continuing the list `tokens`, one full forward per token (no cache:
        slow, but the plain reference that the engine's cached sampling is tested against). temperature 0 = greedy."""
        assert isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
        device = self.get_device()
        generator = torch.Generator(device=device).manual_seed(seed)
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, vocab_size)
            if top_k is not None and top_k > 0:
                threshold = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
            if temperature > 0:
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            else:
                next_id = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()


class KVCache:
    """Keys and values of the tokens seen so far, for every layer, preallocated at full length so decoding writes in
    place and never reallocates.

    k, v: one (batch_size, seq_len, num_heads, head_dim) tensor per layer (separate tensors, so that a compiled step
    writes each in place); ids: (batch_size, seq_len) the token of each slot, written only by a model with smear;
    pos: (batch_size,) tokens cached per row, on the device. Rows may sit at different positions
    (prompts of different lengths): each row writes at its own pos and the attention mask hides every slot past it,
    so a row may also be rewound by lowering its position. max_pos is the host's upper bound of pos: it sizes the
    attention (keys 0..max_pos) without reading pos back from the device. rows(start, stop) is a view of some rows;
    with fixed_len=n it always attends to its first n slots, masked by pos, and keeps no host state, so that a
    compiled or CUDA-graph-captured decode step sees the same shapes at every token.
    Protocol per forward (GPT.forward does it): attend_len(T) -> insert() in every layer -> advance(T).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device="cpu", dtype=COMPUTE_DTYPE):
        shape = (batch_size, seq_len, num_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)  # each slot's token (for smear)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_pos = 0
        self.start, self.stop, self.fixed_len = 0, batch_size, None  # the rows of k and v this cache covers
        self.row_index = torch.arange(batch_size, device=device)[:, None]  # (B, 1): the rows of a write, made once

    @property
    def batch_size(self):
        return self.stop - self.start

    @property
    def seq_len(self):
        return self.k[0].size(1)

    @property
    def dtype(self):
        return self.k[0].dtype

    def rows(self, start, stop, fixed_len=None):
        """A KVCache over rows [start, stop), sharing this cache's storage: a forward on it reads and writes those
        rows in place (their pos too). fixed_len: attend to that many slots at every forward (see the class)."""
        if fixed_len is not None and not 0 < fixed_len <= self.seq_len:
            raise ValueError(f"fixed_len={fixed_len}: must be in [1, {self.seq_len}]")
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.ids, view.pos = self.k, self.v, self.ids, self.pos[start:stop]
        view.start, view.stop = self.start + start, self.start + stop
        view.row_index = self.row_index[start:stop]
        view.max_pos, view.fixed_len = self.max_pos, fixed_len
        return view

    def set_positions(self, positions):
        """Set every row's position (a list of ints, one per row): rows keep their first positions[i] tokens."""
        if len(positions) != self.batch_size or not all(0 <= p <= self.seq_len for p in positions):
            raise ValueError(f"positions {positions}: expected {self.batch_size} ints in [0, {self.seq_len}]")
        self.pos.copy_(torch.tensor(positions, dtype=torch.long))
        self.max_pos = max(positions)

    def reset(self):
        self.pos.zero_()
        self.max_pos = 0

    def attend_len(self, num_new):
        """How many key slots the next forward of num_new tokens per row reads."""
        if self.fixed_len is not None:
            return self.fixed_len
        length = self.max_pos + num_new
        if length > self.seq_len:
            raise ValueError(f"KV cache full: {self.max_pos} tokens cached + {num_new} new > seq_len {self.seq_len}")
        return length

    def insert(self, layer_idx, k, v, positions, length):
        """Write k, v (B, T, H, D) at `positions` (B, T) of layer layer_idx; return that layer's keys and values
        (B, length, H, D) for attention."""
        keys, values = self.k[layer_idx], self.v[layer_idx]
        keys.index_put_((self.row_index, positions), k)  # into the layer's whole tensor: in place when compiled
        values.index_put_((self.row_index, positions), v)
        return keys[self.start:self.stop, :length], values[self.start:self.stop, :length]

    def token_before(self, idx, positions):
        """Record the token ids idx (B, T) at `positions` (B, T); return each row's token before its first new one
        (B,): a model that mixes in the previous token's embedding (smear) needs it. Row at position 0: any token."""
        self.ids.index_put_((self.row_index, positions), idx)
        return self.ids[self.start:self.stop].gather(1, (positions[:, :1] - 1).clamp_min(0))[:, 0]

    def advance(self, num_tokens):
        self.pos += num_tokens
        if self.fixed_len is None:
            self.max_pos += num_tokens

    def prefill(self, other, rows=None):
        """Copy another cache's contents and positions into this one: row i gets other's row rows[i] (rows: a list
        of ints or a long tensor; None = other's rows one to one, or its single row into every row). E.g. a prompt
        prefilled once with batch 1, then decoded as batch_size samples; or shared prefixes, one per group of rows."""
        if (len(other.k), other.k[0].shape[2:]) != (len(self.k), self.k[0].shape[2:]):
            raise ValueError(f"cannot prefill a cache of {len(self.k)} layers of {tuple(self.k[0].shape[2:])} heads "
                             f"from one of {len(other.k)} of {tuple(other.k[0].shape[2:])}: they must match")
        if rows is None and other.batch_size not in (1, self.batch_size):
            raise ValueError(f"cannot prefill batch size {self.batch_size} from batch size {other.batch_size} "
                             f"(must be 1 or equal, or name the rows)")
        length = other.max_pos
        if length > self.seq_len:
            raise ValueError(f"cannot prefill {length} positions into a cache of seq_len {self.seq_len}")
        if rows is None:  # a batch of 1 broadcasts to every row
            rows = slice(other.start, other.stop)
            self.pos.copy_(other.pos.expand_as(self.pos))
        else:
            rows = torch.as_tensor(rows, dtype=torch.long).to(self.pos.device)
            if rows.shape != (self.batch_size,):
                raise ValueError(f"rows: expected one row of the other cache per row ({self.batch_size}), "
                                 f"got shape {tuple(rows.shape)}")
            self.pos.copy_(other.pos[rows])
            rows = rows + other.start
        for mine, theirs in zip(self.k + self.v + [self.ids], other.k + other.v + [other.ids]):
            mine[self.start:self.stop, :length] = theirs[rows, :length]
        self.max_pos = length

    def copy_row(self, source, target, length):
        """Row target becomes a copy of row source's first `length` slots and its position, e.g. to share one prefilled
        prompt between samples, or to move a row when compacting a batch."""
        for tensor in self.k + self.v + [self.ids]:
            tensor[self.start + target, :length] = tensor[self.start + source, :length]
        self.pos[target] = self.pos[source]
