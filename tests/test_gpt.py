"""The GPT model: shapes and parameter counts, init, KV-cached inference equal to a full forward (MHA, GQA, MQA,
per-row positions, row views, fixed-length views, cache copies), the logit softcap, ignored targets, naive sampling, and that a tiny
model learns with the real optimizer setup in fp32 and in bf16 compute. The architecture settings (--arch presets,
old configs loading as the seed): shapes, init, gradients, windows, smear, a written-out reference forward, cached
decoding equal to a full forward with each setting on, and a checkpoint round trip."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanochat.common import COMPUTE_DTYPE, UserError
from nanochat.gpt import (SHAPE_FIELDS, GPT, GPTConfig, KVCache, arch_config, dims_for_depth, norm,
                          unembed)

REPO_ROOT = Path(__file__).resolve().parents[1]
# logits of a cached and a full forward agree to float rounding in fp32; bf16 compute rounds much more coarsely
ATOL = 1e-4 if COMPUTE_DTYPE == torch.float32 else 5e-2


def depth_config(depth, vocab_size=65536, sequence_len=2048):
    """The depth dial of scripts/base_train.py: width 64 * depth, heads of ~128."""
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, **dims_for_depth(depth))


def build(config, seed=0, perturb=0.0, device="cpu"):
    """A real model on device; perturb > 0 adds noise so that the zero-initialized projections matter too."""
    torch.manual_seed(seed)
    model = GPT.create(config, device)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb * torch.randn_like(p))
    return model


def small_config(n_head=4, n_kv_head=4, vocab_size=300, sequence_len=64, n_layer=2, n_embd=64):
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd)


# -----------------------------------------------------------------------------
# Shapes, counts, init


@pytest.mark.parametrize("depth, expected", [(2, 2 * 65536 * 128 + 12 * 2 * 128**2), (4, 36_700_160), (20, 560_988_160)])
def test_param_count_is_2Vd_plus_12Ld2(depth, expected):
    # built on meta: no memory even for d20. 36.7M (d4) and 561.0M (d20) are the original's published counts.
    with torch.device("meta"):
        model = GPT(depth_config(depth))
    d = 64 * depth
    assert expected == 2 * 65536 * d + 12 * depth * d * d
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.num_scaling_params() == expected


def test_param_count_uses_the_vocab_padded_to_a_multiple_of_64():
    with torch.device("meta"):
        model = GPT(depth_config(2, vocab_size=65000))  # 65000 -> 65024 rows in wte and lm_head
    assert model.padded_vocab_size == 65024
    assert model.num_scaling_params() == 2 * 65024 * 128 + 12 * 2 * 128**2


def test_estimate_flops_of_d20_is_6N_without_embedding_plus_attention():
    with torch.device("meta"):
        model = GPT(depth_config(20))
    expected = 6 * (560_988_160 - 65536 * 1280) + 12 * 20 * 10 * 128 * 2048
    assert model.estimate_flops() == expected
    assert round(expected / 1e9, 2) == 3.49  # the original's figure for d20


def test_forward_returns_fp32_logits_of_the_unpadded_vocab(device):
    model = build(small_config(vocab_size=300), device=device)
    logits = model(torch.randint(0, 300, (2, 10), device=device))
    assert logits.shape == (2, 10, 300) and logits.dtype == torch.float32


def test_init_zeroes_output_projections_and_starts_at_uniform_loss(device):
    model = build(small_config(vocab_size=300), device=device)
    for block in model.transformer.h:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert 0.0008 < model.lm_head.weight.std().item() < 0.0012
    idx = torch.randint(0, 300, (4, 32), device=device)
    loss = model(idx, idx)  # a near-zero lm_head predicts the uniform distribution: loss ln(V)
    assert abs(loss.item() - math.log(300)) < 0.01


def test_rotary_tables_are_not_saved_and_cover_ten_times_the_sequence():
    model = build(small_config(sequence_len=64))
    assert "cos" not in model.state_dict() and "sin" not in model.state_dict()
    assert model.cos.shape == (640, 8) and model.cos.dtype == COMPUTE_DTYPE


def test_bad_head_counts_are_rejected_with_the_values():
    with pytest.raises(ValueError, match="n_head=4, n_kv_head=3"):
        GPT(small_config(n_head=4, n_kv_head=3))


# -----------------------------------------------------------------------------
# The architecture's settings (GPTConfig fields beyond the shape; presets for base_train's --arch)

# each setting on its own (its gates and scalars perturbed away from their init, so that they act), then together
EACH_SETTING = ["seed,value_embeds=True", "seed,value_embeds=True,value_embeds_every_layer=True",
                "seed,layer_lambdas=True", "seed,smear=True", "seed,backout=True", "seed,qk_scale=1.2",
                "seed,rope_base=100000", "seed,window_pattern=SL", "seed,wte_std=0.8,c_fc_gain=0.4",
                "v2", "v2,value_embeds_every_layer=True"]


def arch_small_config(arch="v2", n_layer=4, sequence_len=64, vocab_size=300, n_head=4, n_kv_head=2, n_embd=64):
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=n_layer, n_head=n_head,
                     n_kv_head=n_kv_head, n_embd=n_embd, **arch_config(arch))


def test_arch_presets_name_every_field_and_take_overrides():
    seed, v2 = arch_config("seed"), arch_config("v2")
    assert seed.keys() == v2.keys() == {f.name for f in dataclasses.fields(GPTConfig)} - set(SHAPE_FIELDS)
    assert GPTConfig(**seed) == GPTConfig()  # the seed is the defaults
    assert arch_config("v2, smear=False, window_pattern=L") == {**v2, "smear": False, "window_pattern": "L"}
    assert arch_config("seed,rope_base=100000")["rope_base"] == 100000.0  # an int stands for a float
    with pytest.raises(UserError, match="'v3' is not one of seed, v2"):
        arch_config("v3")
    with pytest.raises(UserError, match="unknown setting --smaer"):
        arch_config("v2,smaer=True")
    with pytest.raises(UserError, match="expected a bool"):
        arch_config("v2,smear=1")
    with pytest.raises(UserError, match="window_pattern='SXL'"):
        arch_config("v2,window_pattern=SXL")
    with pytest.raises(ValueError, match="window_pattern=''"):
        GPT(dataclasses.replace(small_config(), window_pattern=""))


def test_a_config_saved_before_the_recipe_fields_is_the_seed_model():
    # the meta of a checkpoint from before issue 18 holds the shape only: it must load as the model it was
    shape_only = dict(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    assert GPTConfig(**shape_only) == GPTConfig(**shape_only, **arch_config("seed"))
    assert all(name.startswith(("transformer.", "lm_head.")) for name in GPT(GPTConfig(**shape_only)).state_dict())


def test_recipe_parameters_and_their_shapes():
    model = build(arch_small_config(n_layer=4))
    assert sorted(model.value_embeds) == ["1", "3"]  # alternating, the last layer included
    assert [block.attn.ve_gate is not None for block in model.transformer.h] == [False, True, False, True]
    assert model.value_embeds["3"].weight.shape == (320, 2 * 16)  # padded vocab x (n_kv_head * head_dim)
    assert model.transformer.h[3].attn.ve_gate.weight.shape == (2, 16)  # one gate per kv head, from 16 channels
    assert model.resid_lambdas.shape == model.x0_lambdas.shape == (4,)
    assert model.smear_gate.weight.shape == (1, 16) and model.smear_lambda.shape == (1,)
    assert model.backout_lambda.shape == (1,)
    assert model.windows == [16, 16, 16, -1]  # SSSL: a quarter of 64; the last layer full
    assert build(arch_small_config("v2,window_pattern=SL", n_layer=3)).windows == [16, -1, -1]
    every = build(arch_small_config("v2,value_embeds_every_layer=True", n_layer=3))
    assert sorted(every.value_embeds) == ["0", "1", "2"]


def test_recipe_init():
    model = build(arch_small_config(n_layer=4, vocab_size=4096, n_embd=128, n_head=2, n_kv_head=2))
    bound = math.sqrt(3 / 128)
    assert abs(model.transformer.wte.weight.std().item() - 0.8) < 0.01
    for block in model.transformer.h:
        assert block.mlp.c_fc.weight.abs().max().item() <= 0.4 * bound
        assert abs(block.mlp.c_fc.weight.std().item() - 0.4 / math.sqrt(128)) < 0.002
        assert abs(block.attn.c_q.weight.std().item() - 1 / math.sqrt(128)) < 0.002
    assert abs(model.value_embeds["3"].weight.std().item() - 1 / math.sqrt(128)) < 0.002
    assert not model.transformer.h[3].attn.ve_gate.weight.any()  # gate 2 sigmoid(0) = 1
    torch.testing.assert_close(model.resid_lambdas, torch.linspace(1.15, 1.05, 4), rtol=0, atol=0)
    torch.testing.assert_close(model.x0_lambdas, torch.linspace(0.20, 0.05, 4), rtol=0, atol=0)
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)


@pytest.mark.parametrize("arch", ["v2", "v2,value_embeds_every_layer=True"])
def test_every_recipe_parameter_gets_a_gradient(arch, device):
    model = build(arch_small_config(arch), perturb=0.02, device=device)
    model.smear_lambda.data.fill_(0.5)  # at 0 (its init) the smear gate's own weights get no gradient
    idx = torch.randint(0, 300, (2, 40), device=device)
    model(idx, idx).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_scaling_params_without_the_embedding_count_the_gates_but_not_the_tables_or_scalars():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=4096, **dims_for_depth(4), **arch_config("v2")))
    gates = 2 * 2 * 16  # layers 1 and 3, 2 kv heads x 16 channels
    assert model.num_scaling_params(embedding=False) == 12 * 4 * 256**2 + gates + 4096 * 256
    assert model.num_scaling_params() == model.num_scaling_params(embedding=False) + 4096 * 256


def test_estimate_flops_counts_the_gates_and_each_layers_window():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=65536, **dims_for_depth(20), **arch_config("v2")))
    seed_linear = 560_988_160 - 65536 * 1280  # the seed's weights that multiply: blocks and lm_head
    gates = 10 * 10 * 16 + 16  # 10 value-embedding gates (odd layers) of 10 heads x 16 channels, the smear gate
    windows = 15 * 512 + 5 * 2048  # SSSL over 20 layers (the last full): 15 windows of 512, 5 full contexts
    assert model.estimate_flops() == 6 * (seed_linear + gates) + 12 * 10 * 128 * windows


def test_sliding_window_masks_are_causal_and_at_most_left_keys_back():
    model = build(arch_small_config("v2,window_pattern=SL", n_layer=2, sequence_len=16))  # layer 0: 4 keys back
    masks = model.attention_masks(8, None, None)
    assert masks[1] is None  # the full layer: SDPA's causal kernel
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert torch.equal(masks[0], (j <= i) & (j >= i - 4))
    # with a KV cache: rows at their own positions, against every key slot
    positions = torch.tensor([[5, 6], [0, 1]])
    full = (torch.arange(7)[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, keys)
    cached = model.attention_masks(2, positions, full)
    assert torch.equal(cached[1], full)
    assert cached[0][0, 0, 1].tolist() == [False, False, True, True, True, True, True]  # position 6: keys 2..6
    assert cached[0][1, 0, 0].tolist() == [True] + [False] * 6


def test_a_windowed_layer_does_not_see_past_its_window():
    model = build(arch_small_config("seed,window_pattern=SL", n_layer=2, sequence_len=32), perturb=0.05)
    outputs = []
    model.transformer.h[0].register_forward_hook(lambda module, inputs, output: outputs.append(output))
    idx = torch.randint(0, 300, (1, 32))
    changed = idx.clone()
    changed[0, 0] = (idx[0, 0] + 1) % 300
    model(idx), model(changed)
    differs = (outputs[0] - outputs[1]).abs().amax(dim=-1)[0]  # (T,)
    assert differs[:9].min() > 0 and differs[9:].max() == 0  # window 8: position 8 is the last to see token 0


def test_smear_mixes_in_the_previous_token_only():
    model = build(arch_small_config(), perturb=0.05)
    idx = torch.randint(0, 300, (2, 10))
    changed = idx.clone()
    changed[:, 3] = (idx[:, 3] + 1) % 300
    embeddings = []
    model.transformer.h[0].register_forward_hook(lambda module, inputs, output: embeddings.append(inputs[0]))
    with torch.no_grad():
        model(idx), model(changed)
    differs = (embeddings[0] - embeddings[1]).abs().amax(dim=-1)  # (B, T): the first block's input
    assert (differs[:, 3:5] > 0).all() and (differs[:, :3] == 0).all() and (differs[:, 5:] == 0).all()


def reference_forward(model, idx):
    """The forward pass written out from the formulas, one op at a time (no SDPA, no fused norms, no cache): logits
    (B, T, vocab_size) that GPT.forward must reproduce, for the seed and for every recipe setting."""
    config = model.config
    B, T = idx.shape
    H, KV, D = config.n_head, config.n_kv_head, config.n_embd // config.n_head

    def rms(x):
        return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + torch.finfo(x.dtype).eps)

    def rotate(x, angles):  # (B, T, heads, D): pairs (i, i + D/2) rotated by the position's angle
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    angles = torch.arange(T, dtype=torch.float64)[:, None] / config.rope_base ** (torch.arange(0, D, 2) / D)
    x = rms(model.transformer.wte.weight[idx])
    if config.smear:
        gate = model.smear_lambda * torch.sigmoid(x[..., :16] @ model.smear_gate.weight.T)  # (B, T, 1)
        x = x + gate * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    x0 = x
    for i, block in enumerate(model.transformer.h):
        if config.layer_lambdas:
            x = model.resid_lambdas[i] * x + model.x0_lambdas[i] * x0
        attn, h = block.attn, rms(x)
        q = (h @ attn.c_q.weight.T).view(B, T, H, D)
        k = (h @ attn.c_k.weight.T).view(B, T, KV, D)
        v = (h @ attn.c_v.weight.T).view(B, T, KV, D)
        if str(i) in model.value_embeds:
            gate = 2 * torch.sigmoid(h[..., :16] @ attn.ve_gate.weight.T)  # (B, T, KV)
            v = v + gate[..., None] * model.value_embeds[str(i)].weight[idx].view(B, T, KV, D)
        q = rms(rotate(q, angles)) * config.qk_scale
        k = rms(rotate(k, angles)) * config.qk_scale
        k, v = k.repeat_interleave(H // KV, dim=2), v.repeat_interleave(H // KV, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        distance = torch.arange(T)[:, None] - torch.arange(T)[None, :]
        visible = (distance >= 0) & ((distance <= model.windows[i]) if model.windows[i] >= 0 else True)
        weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        y = torch.einsum("bhqk,bkhd->bqhd", weights, v)
        x = x + y.reshape(B, T, H * D) @ attn.c_proj.weight.T
        x = x + (torch.relu(rms(x) @ block.mlp.c_fc.weight.T) ** 2) @ block.mlp.c_proj.weight.T
        if i == config.n_layer // 2:
            mid = x
    if config.backout:
        x = x - model.backout_lambda * mid
    logits = rms(x) @ model.lm_head.weight.T
    return 15 * torch.tanh(logits[..., :config.vocab_size] / 15)


@pytest.mark.parametrize("arch", ["seed"] + EACH_SETTING)
def test_forward_equals_the_written_out_reference(arch, compute_dtype):
    compute_dtype(torch.float64)  # only the softcap runs in fp32
    model = build(arch_small_config(arch, n_layer=5, sequence_len=32), perturb=0.05).double()
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).double(), reference_forward(model, idx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", EACH_SETTING)
def test_cached_decoding_equals_a_full_forward_with_each_setting(arch):
    # windows of 8 (sequence_len 32) that 20 tokens run past; rows at their own positions; prefill and copied rows;
    # forward on the cache and decode_step (the engine's) alike
    config = arch_small_config(arch, n_layer=3, sequence_len=32)
    model = build(config, perturb=0.05)
    weights = model.decode_weights()
    idx = torch.randint(0, config.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(idx)
        cache, stepped = KVCache(3, 2, 24, 16, config.n_layer), KVCache(3, 2, 24, 16, config.n_layer)
        pieces = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:12], kv_cache=cache)]  # prefill in two chunks
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]  # then one token at a time
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)
        model(idx[:, :12], kv_cache=stepped)
        steps = [model.decode_step(idx[:, t], stepped, weights) for t in range(12, 20)]
        torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 12:], atol=ATOL, rtol=0)
        next_tokens = torch.tensor([5, 9, 2])
        expected = torch.stack([model(torch.cat([idx[row, :length], next_tokens[row:row + 1]])[None])[0, -1]
                                for row, length in enumerate([20, 3, 11])])
        after = model(torch.cat([idx[2, :11], next_tokens[2:], torch.tensor([7])])[None])[0, -1]

        def forward_step(tokens, kv_cache):
            return model(tokens[:, None], kv_cache=kv_cache)[:, -1]

        for step in (forward_step, lambda tokens, kv_cache: model.decode_step(tokens, kv_cache, weights)):
            rewound = KVCache(3, 2, 24, 16, config.n_layer)
            rewound.prefill(cache)
            rewound.set_positions([20, 3, 11])  # rows rewound to their own prefixes, then one more token each
            torch.testing.assert_close(step(next_tokens, rewound), expected, atol=ATOL, rtol=0)
            copied = KVCache(2, 2, 24, 16, config.n_layer)
            copied.prefill(rewound, rows=[2, 1])  # row 2's 12 tokens (and row 1's 4), then row 0 copied over row 1
            copied.copy_row(0, 1, 12)
            fixed = copied.rows(0, 2, fixed_len=24)  # the compiled step's fixed-shape view
            torch.testing.assert_close(step(torch.tensor([7, 7]), fixed), after.expand(2, -1), atol=ATOL, rtol=0)


def test_a_recipe_model_round_trips_through_a_checkpoint(isolated_base_dir):
    from nanochat.checkpoint_manager import build_model, save_checkpoint
    from pretraining_setup import install_tokenizer

    tokenizer = install_tokenizer(isolated_base_dir)
    config = arch_small_config("v2", vocab_size=tokenizer.get_vocab_size(), sequence_len=32)
    model = build(config, perturb=0.02)
    directory = isolated_base_dir / "base_checkpoints" / "d4"
    save_checkpoint(str(directory), 5, model.state_dict(), None, {"step": 5, "model_config": vars(config)})
    loaded, _, meta = build_model(str(directory), 5, "cpu", "eval")
    assert loaded.config == config and meta["model_config"]["value_embeds"] is True
    idx = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model.eval()(idx))
    # a meta with a removed setting (attn_gate, measured and dropped) loads where it was off, is an error where on
    for attn_gate in (False, True):
        save_checkpoint(str(directory), 6, model.state_dict(), None,
                        {"step": 6, "model_config": {**vars(config), "attn_gate": attn_gate}})
        if attn_gate:
            with pytest.raises(UserError, match="trained with attn_gate, a setting removed since"):
                build_model(str(directory), 6, "cpu", "eval")
        else:
            assert build_model(str(directory), 6, "cpu", "eval")[0].config == config


# -----------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_chunked_prefill_then_decode_equals_full_forward(n_kv_head, device):
    config = small_config(n_head=4, n_kv_head=n_kv_head)
    model = build(config, perturb=0.02, device=device)
    idx = torch.randint(0, config.vocab_size, (2, 20), device=device)
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(2, n_kv_head, 20, 16, config.n_layer, device=device)
        pieces = [model(idx[:, :7], kv_cache=cache), model(idx[:, 7:12], kv_cache=cache)]  # prefill in two chunks
        pieces += [model(idx[:, t:t + 1], kv_cache=cache) for t in range(12, 20)]  # then one token at a time
    assert cache.pos.tolist() == [20, 20]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=ATOL, rtol=0)


def test_logits_from_gives_the_tail_of_the_full_logits(device):
    config = small_config(n_head=4, n_kv_head=2)
    model = build(config, perturb=0.02, device=device)
    idx = torch.randint(0, config.vocab_size, (2, 12), device=device)
    with torch.no_grad():
        full = model(idx)
        torch.testing.assert_close(model(idx, logits_from=-1), full[:, -1:], atol=ATOL, rtol=0)
        torch.testing.assert_close(model(idx, logits_from=5), full[:, 5:], atol=ATOL, rtol=0)
        cache = KVCache(2, 2, 12, 16, config.n_layer, device=device)
        prefill = model(idx[:, :9], kv_cache=cache, logits_from=-1)  # the cache still gets every position
        torch.testing.assert_close(prefill, full[:, 8:9], atol=ATOL, rtol=0)
        torch.testing.assert_close(model(idx[:, 9:], kv_cache=cache), full[:, 9:], atol=ATOL, rtol=0)


def test_rows_at_different_positions_decode_like_their_own_full_forward(device):
    config = small_config(n_head=4, n_kv_head=2)
    model = build(config, perturb=0.02, device=device)
    idx = torch.randint(0, config.vocab_size, (2, 8), device=device)
    next_tokens = torch.tensor([[5], [9]], device=device)
    with torch.no_grad():
        cache = KVCache(2, 2, 16, 16, config.n_layer, device=device)
        model(idx, kv_cache=cache)
        cache.set_positions([8, 3])  # row 1's prompt is only 3 tokens long: the rest of its prefill was padding
        logits = model(next_tokens, kv_cache=cache)[:, -1]  # (2, V)
        row0 = model(torch.cat([idx[:1], next_tokens[:1]], dim=1))[0, -1]
        row1 = model(torch.cat([idx[1:, :3], next_tokens[1:]], dim=1))[0, -1]
    assert cache.pos.tolist() == [9, 4]
    torch.testing.assert_close(logits[0], row0, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1], row1, atol=ATOL, rtol=0)


def test_prefill_copies_a_batch_1_cache_into_every_row(device):
    config = small_config(n_head=4, n_kv_head=2)
    model = build(config, perturb=0.02, device=device)
    prompt = torch.randint(0, config.vocab_size, (1, 10), device=device)
    with torch.no_grad():
        single = KVCache(1, 2, 10, 16, config.n_layer, device=device)
        model(prompt, kv_cache=single)
        batch = KVCache(3, 2, 16, 16, config.n_layer, device=device)
        batch.prefill(single)
        assert batch.pos.tolist() == [10, 10, 10] and batch.max_pos == 10
        next_tokens = torch.tensor([[1], [2], [3]], device=device)
        logits = model(next_tokens, kv_cache=batch)[:, -1]
        expected = model(torch.cat([prompt.expand(3, -1), next_tokens], dim=1))[:, -1]
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_prefill_of_named_rows_then_own_positions_continues_each_rows_prefix():
    # CORE's way: each item's shared prefix once, then each of its options continues from the prefix's own length
    config = small_config(n_head=4, n_kv_head=2)
    model = build(config, perturb=0.02)
    prefixes = torch.randint(0, config.vocab_size, (2, 6))
    with torch.no_grad():
        prefix_cache = KVCache(2, 2, 6, 16, config.n_layer)
        model(prefixes, kv_cache=prefix_cache)
        cache = KVCache(3, 2, 8, 16, config.n_layer)
        cache.prefill(prefix_cache, rows=[0, 1, 1])
        cache.set_positions([6, 6, 4])  # row 2 uses only the first 4 tokens of prefix 1
        suffixes = torch.randint(0, config.vocab_size, (3, 2))
        logits = model(suffixes, kv_cache=cache)
        expected = [model(torch.cat([prefixes[0], suffixes[0]])[None])[0, -2:],
                    model(torch.cat([prefixes[1], suffixes[1]])[None])[0, -2:],
                    model(torch.cat([prefixes[1, :4], suffixes[2]])[None])[0, -2:]]
    assert cache.pos.tolist() == [8, 8, 6]
    torch.testing.assert_close(logits, torch.stack(expected), atol=ATOL, rtol=0)


def test_a_row_view_decodes_its_rows_in_place_and_a_copied_row_continues_the_same():
    config = small_config(n_head=4, n_kv_head=2)
    model = build(config, perturb=0.02)
    prompt = torch.randint(0, config.vocab_size, (1, 5))
    with torch.no_grad():
        cache = KVCache(3, 2, 12, 16, config.n_layer)
        view = cache.rows(1, 2)
        model(prompt, kv_cache=view)  # fills row 1 only
        assert cache.pos.tolist() == [0, 5, 0]
        cache.copy_row(1, 2, length=5)
        assert cache.pos.tolist() == [0, 5, 5]
        cache.set_positions([0, 5, 5])  # the host's bound (max_pos) of the whole cache: 5
        logits = model(torch.tensor([[7], [3], [3]]), kv_cache=cache)[1:, -1]
        expected = model(torch.cat([prompt, torch.tensor([[3]])], dim=1))[0, -1]
    assert cache.pos.tolist() == [1, 6, 6]
    torch.testing.assert_close(logits, expected.expand(2, -1), atol=ATOL, rtol=0)


def test_a_fixed_length_view_attends_to_the_same_keys_as_the_exact_length():
    # the compiled decode step reads all fixed_len slots, masked by each row's position: same logits
    config = small_config(n_head=4, n_kv_head=2)
    model = build(config, perturb=0.02)
    idx = torch.randint(0, config.vocab_size, (2, 9))
    with torch.no_grad():
        exact, fixed = KVCache(2, 2, 16, 16, config.n_layer), KVCache(2, 2, 16, 16, config.n_layer)
        for cache in (exact, fixed):
            model(idx[:, :6], kv_cache=cache)
            cache.set_positions([6, 2])
        fixed_view = fixed.rows(0, 2, fixed_len=16)
        for t in range(6, 9):
            torch.testing.assert_close(model(idx[:, t:t + 1], kv_cache=fixed_view),
                                       model(idx[:, t:t + 1], kv_cache=exact), atol=ATOL, rtol=0)
    assert fixed.pos.tolist() == exact.pos.tolist() == [9, 5]
    assert fixed_view.max_pos == 6  # a fixed-length view keeps no host state (its shapes never change)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_decode_step_gives_the_forward_logits_for_rows_at_different_positions(n_kv_head):
    config = small_config(n_head=4, n_kv_head=n_kv_head)
    model = build(config, perturb=0.02)
    idx = torch.randint(0, config.vocab_size, (3, 9))
    with torch.no_grad():
        caches = [KVCache(3, n_kv_head, 16, 16, config.n_layer) for _ in range(3)]
        for cache in caches:
            model(idx[:, :6], kv_cache=cache)
            cache.set_positions([6, 2, 4])
        views = [caches[0], caches[1], caches[2].rows(0, 3, fixed_len=12)]
        weights = model.decode_weights()
        for t in range(6, 9):
            expected = model(idx[:, t:t + 1], kv_cache=views[0])[:, -1]
            torch.testing.assert_close(model.decode_step(idx[:, t], views[1], weights), expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(model.decode_step(idx[:, t], views[2], weights), expected, atol=ATOL, rtol=0)
    assert [c.pos.tolist() for c in caches] == [[9, 5, 7]] * 3


def test_decode_weights_follow_in_place_updates_and_other_dtypes(compute_dtype):
    compute_dtype(torch.bfloat16)  # fp32 masters, bf16 compute: RL rollouts
    config = small_config(n_head=4, n_kv_head=2)
    model = build(config, perturb=0.02)
    qkv = model.decode_weights()[0][0]
    assert all(w.dtype == torch.bfloat16 for layer in model.decode_weights() for w in layer)
    with torch.no_grad():
        model.transformer.h[0].attn.c_k.weight.mul_(2)  # an optimizer step, in place
    # refreshed where it is (a captured CUDA graph reads it there): rows of q (64), then k (32), then v (32)
    assert model.decode_weights()[0][0] is qkv and not qkv.requires_grad
    assert torch.equal(qkv.t()[64:96], model.transformer.h[0].attn.c_k.weight.to(torch.bfloat16))
    idx = torch.randint(0, config.vocab_size, (2, 7))
    with torch.no_grad():
        caches = [KVCache(2, 2, 8, 16, config.n_layer, dtype=torch.bfloat16) for _ in range(2)]
        for cache in caches:
            model(idx[:, :6], kv_cache=cache)
        torch.testing.assert_close(model.decode_step(idx[:, 6], caches[0], model.decode_weights()),
                                   model(idx[:, 6:], kv_cache=caches[1])[:, -1], atol=5e-2, rtol=0)


def test_decode_step_is_off_for_architectures_it_does_not_know():
    @dataclasses.dataclass
    class NewConfig(GPTConfig):
        new_option: str = "x"

    assert build(NewConfig(**vars(small_config()))).decode_weights() is None


def test_a_full_cache_refuses_with_the_numbers():
    config = small_config()
    model = build(config)
    cache = KVCache(1, 4, 8, 16, config.n_layer)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match="6 tokens cached \\+ 3 new > seq_len 8"):
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="positions \\[9\\]"):
        cache.set_positions([9])
    with pytest.raises(ValueError, match="fixed_len=9"):
        cache.rows(0, 1, fixed_len=9)


# -----------------------------------------------------------------------------
# Logits and loss


def test_softcap_bounds_logits_to_15(device):
    model = build(small_config(), device=device)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 100.0)  # raw logits in the thousands
    logits = model(torch.randint(0, 300, (2, 16), device=device))
    assert logits.abs().max().item() <= 15.0
    assert logits.abs().max().item() > 14.9  # saturated, not merely small


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_explicit_causal_attention_equals_sdpa(n_kv_head):
    # the CPU bf16 training path (faster there) must compute what SDPA computes, grouped-query included
    from nanochat.gpt import causal_attention_explicit

    torch.manual_seed(0)
    q = torch.randn(2, 4, 16, 8, dtype=torch.float64)
    k, v = torch.randn(2, n_kv_head, 16, 8, dtype=torch.float64), torch.randn(2, n_kv_head, 16, 8, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(causal_attention_explicit(q, k, v).double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(1, 1), (2, 1), (8, 1), (3, 5), (4, 16), (5, 13)])
def test_unembed_is_the_plain_lm_head_product(shape):
    # the few-row fp32 CPU path (transposed, a lone row doubled) must give what F.linear gives, gradients included
    torch.manual_seed(0)
    x = torch.randn(*shape, 32, requires_grad=True)
    weight = torch.randn(640, 32, requires_grad=True)
    out = unembed(x, weight)
    assert out.shape == (*shape, 640)
    torch.testing.assert_close(out, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    F.linear(x, weight).square().sum().backward()
    torch.testing.assert_close(grads, (x.grad, weight.grad), atol=1e-4, rtol=1e-5)


def test_softcap_is_15_tanh_of_the_raw_logits():
    # written with sigmoid for speed (tanh(z) = 2 sigmoid(2z) - 1); it must stay the same function
    model = build(small_config(), perturb=0.02)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 2.0)  # raw logits spread over the soft and the saturated range
    last_block_out = []
    model.transformer.h[-1].register_forward_hook(lambda module, inputs, output: last_block_out.append(output))
    logits = model(torch.randint(0, 300, (2, 16)))
    raw = F.linear(norm(last_block_out[0]), model.lm_head.weight.to(last_block_out[0].dtype)).float()
    expected = 15 * torch.tanh(raw[..., :300] / 15)
    assert raw.abs().max().item() > 30
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_ignored_targets_add_no_loss_and_no_gradient(device):
    model = build(small_config(), perturb=0.02, device=device)
    idx = torch.randint(0, 300, (2, 12), device=device)
    targets = torch.randint(0, 300, (2, 12), device=device)
    targets[:, -1] = -1  # ignore the last position of every row
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 12) and not per_token[:, -1].any()
    loss = model(idx, targets)
    torch.testing.assert_close(loss, per_token[:, :-1].mean())
    loss.backward()
    grads_with_ignored = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # causal: dropping the last position changes no other position's output, so the gradients must be identical
    model(idx[:, :-1], targets[:, :-1]).backward()
    for with_ignored, p in zip(grads_with_ignored, model.parameters()):
        torch.testing.assert_close(with_ignored, p.grad, atol=1e-6, rtol=1e-5)


def test_compiled_regions_equal_the_eager_model_and_compile_one_graph_for_all_blocks(device):
    from torch._dynamo.utils import counters
    model = build(small_config(n_layer=3), perturb=0.02, device=device)
    idx, targets = torch.randint(0, 300, (2, 16), device=device), torch.randint(0, 300, (2, 16), device=device)
    model(idx, targets).backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counters.clear()
    forward = model.compile_regions()
    loss = forward(idx, targets)
    loss.backward()
    assert counters["stats"]["unique_graphs"] == 2  # one graph serves all three blocks, one the head
    torch.testing.assert_close(loss, model(idx, targets), atol=ATOL, rtol=0)
    for eager, p in zip(eager_grads, model.parameters()):
        torch.testing.assert_close(p.grad, eager, atol=ATOL / 10, rtol=1e-2)


# -----------------------------------------------------------------------------
# Sampling


def test_greedy_generate_follows_the_argmax_of_full_forwards(device):
    model = build(small_config(), perturb=0.05, device=device)
    tokens = [1, 2, 3]
    generated = list(model.generate(tokens, max_tokens=5, temperature=0.0))
    expected = list(tokens)
    with torch.no_grad():
        for _ in range(5):
            expected.append(model(torch.tensor([expected], device=device))[0, -1].argmax().item())
    assert generated == expected[3:]


def test_sampling_is_reproducible_per_seed(device):
    model = build(small_config(), perturb=0.05, device=device)
    first = list(model.generate([1, 2], max_tokens=10, temperature=1.0, seed=1))
    assert first == list(model.generate([1, 2], max_tokens=10, temperature=1.0, seed=1))
    assert first != list(model.generate([1, 2], max_tokens=10, temperature=1.0, seed=2))
    top1 = list(model.generate([1, 2], max_tokens=5, temperature=1.0, top_k=1, seed=3))
    assert top1 == list(model.generate([1, 2], max_tokens=5, temperature=0.0))  # top_k=1 is greedy


# -----------------------------------------------------------------------------
# Learning


def test_tiny_model_overfits_a_fixed_batch_with_the_real_optimizers(device):
    config = small_config(vocab_size=256, n_kv_head=2)
    model = build(config, device=device)
    optimizer = model.setup_optimizers()
    kinds = [group["kind"] for group in optimizer.param_groups]
    assert kinds[:2] == ["adamw", "adamw"] and set(kinds[2:]) == {"muon"}  # lm_head, wte; a group per matrix shape
    assert all("initial_lr" in group for group in optimizer.param_groups)
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (4, 32), device=device)
    targets = torch.randint(0, 256, (4, 32), device=device)  # random targets: only memorization lowers the loss
    losses = []
    for _ in range(40):
        loss = model(idx, targets)
        loss.backward()
        optimizer.update()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(256)) < 0.05
    assert losses[-1] < 0.2 * losses[0], losses


FREED_MEMORY = """
import os, sys, torch
from nanochat.gpt import keep_freed_cpu_memory
if sys.argv[1] == "keep":
    assert keep_freed_cpu_memory()
def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(16 * 2**20)  # 64 MB, like a step's logits
before = resident_bytes()
del x
print(before - resident_bytes())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_cpu_training_keeps_freed_memory_for_the_next_step(mode):
    # By default glibc maps every block > 32 MB fresh and unmaps it on free (so the next step page-faults all of it
    # back in); kept, a freed buffer stays in the process for reuse: its pages are still resident after the free.
    result = subprocess.run([sys.executable, "-c", FREED_MEMORY, mode], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    released_mb = int(result.stdout.strip().splitlines()[-1]) / 2**20
    if mode == "keep":
        assert released_mb < 8, released_mb
    else:
        assert released_mb > 56, released_mb


BF16_TRAINING = """
import math, torch
import nanochat.gpt as gpt_module
from nanochat.common import COMPUTE_DTYPE
from nanochat.gpt import GPT, GPTConfig
assert COMPUTE_DTYPE == torch.bfloat16
torch.manual_seed(0)
model = GPT.create(GPTConfig(sequence_len=32, vocab_size=256, n_layer=2, n_head=2, n_kv_head=2, n_embd=64), "cpu")
optimizer = model.setup_optimizers()
assert optimizer.ns_dtype == torch.bfloat16
idx, targets = torch.randint(0, 256, (4, 32)), torch.randint(0, 256, (4, 32))
assert model(idx).dtype == torch.float32 and model.cos.dtype == torch.bfloat16
losses = []
for _ in range(30):
    loss = model(idx, targets)
    loss.backward()
    optimizer.update()
    losses.append(loss.item())
assert all(p.dtype == torch.float32 for p in model.parameters())
print(losses[0], losses[-1])
assert all(math.isfinite(x) for x in losses) and losses[-1] < 0.5 * losses[0], losses
"""


def test_bf16_compute_on_cpu_trains():
    env = dict(os.environ, NANOCHAT_DTYPE="bfloat16", PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", BF16_TRAINING], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
