"""The quality-per-FLOP harness (dev/bench/quality.py): its own logic, not the training runs. How configurations
are read, how FLOPs and steps are counted, how the validation text becomes batches and bits per byte, and how the
table decides what is real."""

import math
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from dev.bench import quality
from nanochat import common
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.gpt import GPT, GPTConfig, dims_for_depth
from pretraining_setup import corpus_text, install_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def build_gpt(config):
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    return model


# -----------------------------------------------------------------------------
# Configurations

def test_configs_are_a_name_then_training_settings_then_harness_options():
    configs = quality.parse_configs("ours; orig +codebase=orig; ve --value_embeds=True --matrix_lr=0.03 "
                                    "+fractions=1,0.7")
    assert [c.name for c in configs] == ["ours", "orig", "ve"]
    assert [c.codebase for c in configs] == ["ours", "orig", "ours"]
    assert configs[2].args == ("--value_embeds=True", "--matrix_lr=0.03")
    assert configs[2].fractions == (1.0, 0.7)  # descending
    assert configs[0].fractions == (1.0,)


def test_configs_take_the_default_fractions_unless_they_name_their_own():
    configs = quality.parse_configs("a; b +fractions=0.5", default_fractions="0.85,1")
    assert configs[0].fractions == (1.0, 0.85)
    assert configs[1].fractions == (0.5,)


@pytest.mark.parametrize("text, message", [
    ("a --depth=6", "harness sets"),
    ("a --max-seq-len=1024", "harness sets"),  # the original's dashed spelling too
    ("a --num_iterations=5", "harness sets"),
    ("a +codebase=theirs", "codebase=.theirs.; expected one of ours, orig"),
    ("a +speed=2", "unknown harness option"),
    ("a +fractions=0", "fractions"),
    ("a +fractions=x", "fractions"),
    ("a; a", "used twice"),
    ("a depth=6", "cannot parse"),
    ("a/b", "configuration name"),
    (" ; ", "no configurations"),
])
def test_bad_configs_are_refused_with_the_reason(text, message):
    with pytest.raises(ValueError, match=message):
        quality.parse_configs(text)


# -----------------------------------------------------------------------------
# FLOPs and steps

# The compute dtype picks the attention kernel (SDPA in fp32; on CPU in bf16 the explicit path, plain matmuls), and
# the default dtype is the machine's: both are pinned here so that neither depends on the CPU the test runs on.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_flop_count_of_our_model_is_what_torch_counts_for_its_matmuls_and_attention(dtype, compute_dtype):
    compute_dtype(dtype)
    config = GPTConfig(sequence_len=64, vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    model = build_gpt(config)
    tokens = torch.randint(0, 320, (1, 64))
    with FlopCounterMode(display=False) as counter:
        model(tokens, tokens).backward()
    counts = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    total, linear_weights, attention = quality.count_flops_per_token(model, 64)
    # every Linear: a forward and two backward matmuls (input and weight gradients), 2 FLOPs a multiply-add each
    assert counts["aten.mm"] == 6 * linear_weights * 64
    # attention: 4 T d FLOPs a token forward per layer, 3 times that in training. SDPA: its forward op times 3
    # (torch's count of its backward includes a recomputation); the explicit path: 2 batched matmuls forward, 4 back
    attention_forward = sum(flops for op, flops in counts.items() if "attention" in op and "backward" not in op)
    assert (attention_forward > 0) == (dtype == torch.float32) and ("aten.bmm" in counts) == (dtype == torch.bfloat16)
    assert 3 * attention_forward + counts.get("aten.bmm", 0) == attention * 64
    assert total == 6 * linear_weights + attention


def test_the_budget_unit_is_the_seed_architecture_as_our_model_builds_it():
    for depth, seq_len, vocab_size in [(2, 64, 320), (4, 512, 4096), (6, 512, 4096), (2, 128, 300)]:
        config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, **dims_for_depth(depth))
        with torch.device("meta"):
            model = GPT(config)
        assert quality.seed_flops_per_token(depth, seq_len, vocab_size) == \
            quality.count_flops_per_token(model, seq_len)[0]
    # the demo's size: 4 layers of 12 * 256^2 weights, a 256 x 4,096 lm_head, attention over 512 keys
    assert quality.seed_flops_per_token(4, 512, 4096) == 31_457_280


def test_sliding_windows_count_the_keys_a_query_can_see():
    model = nn.Module()
    model.lin = nn.Linear(10, 10, bias=False)
    model.config = SimpleNamespace(n_layer=4, n_head=2, n_embd=256)
    model.window_sizes = [(128, 0), (-1, 0), (512, 0), (4096, 0)]  # short, full, as long as T, longer than T
    total, linear_weights, attention = quality.count_flops_per_token(model, 512)
    assert linear_weights == 100
    assert attention == 12 * 2 * 128 * (128 + 512 + 512 + 512)
    del model.window_sizes  # no windows: every layer sees all T keys
    assert quality.count_flops_per_token(model, 512)[2] == 12 * 2 * 128 * 4 * 512
    model.windows = [128, -1, 512, 4096]  # ours: keys before a query, -1 = all
    assert quality.count_flops_per_token(model, 512)[2] == attention


def test_our_sliding_windows_are_counted_as_our_model_counts_them():
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=512, vocab_size=4096, window_pattern="SSSL", **dims_for_depth(4)))
    total, _, attention = quality.count_flops_per_token(model, 512)
    assert attention == 12 * 2 * 128 * (3 * 128 + 512)  # three quarter-context windows, the last layer full
    assert total == model.estimate_flops()


def test_steps_round_the_budget_fraction_to_whole_steps():
    assert quality.steps_for_budget(1.0308e14, 1.0, 31_457_280, 8192) == 400
    assert quality.steps_for_budget(1.0308e14, 0.85, 31_457_280, 8192) == 340
    assert quality.steps_for_budget(1.0308e14, 1.0, 27_918_768, 8192) == 451  # fewer FLOPs a token, more steps
    with pytest.raises(ValueError, match="less than one step"):
        quality.steps_for_budget(1e9, 1.0, 31_457_280, 8192)


# -----------------------------------------------------------------------------
# The validation text

def test_val_batches_predict_every_token_after_the_first_exactly_once():
    bos = 99
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]  # stream: 99 1 2 3 99 4 5 99 6 7 8 9 10 (13 tokens)
    batches = quality.val_batches(docs, bos, seq_len=4, batch_size=2)
    assert [tuple(inputs.shape) for inputs, _ in batches] == [(2, 4), (1, 4)]
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert inputs.tolist() == [[99, 1, 2, 3], [99, 4, 5, 99], [6, 7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3, 99], [4, 5, 99, 6], [7, 8, 9, 10]]
    batches = quality.val_batches(docs, bos, seq_len=5, batch_size=8)  # 12 targets in rows of 5: padded
    inputs, targets = batches[0]
    assert targets.tolist() == [[1, 2, 3, 99, 4], [5, 99, 6, 7, 8], [9, 10, -1, -1, -1]]
    assert inputs[2].tolist() == [8, 9, 10, 99, 99]  # padding inputs are a real token id (BOS)


def test_aligned_val_batches_start_every_document_in_its_own_row_after_its_bos():
    bos = 99
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]
    batches = quality.val_batches(docs, bos, seq_len=4, batch_size=3, aligned=True)
    assert [tuple(inputs.shape) for inputs, _ in batches] == [(3, 4), (1, 4)]
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    assert inputs.tolist() == [[99, 1, 2, 3], [99, 4, 5, 99], [99, 6, 7, 8], [9, 10, 99, 99]]
    assert targets.tolist() == [[1, 2, 3, -1], [4, 5, -1, -1], [6, 7, 8, 9], [10, -1, -1, -1]]


def test_token_bytes_are_raw_bytes_and_zero_for_special_tokens():
    ranks = {bytes([i]): i for i in range(256)}
    ranks["é".encode()] = 256  # two bytes
    enc = tiktoken.Encoding(name="t", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={"<|bos|>": 257})
    counts = quality.token_byte_counts(enc)
    assert counts.tolist() == [1] * 256 + [2, 0]


def test_val_documents_are_whole_documents_from_the_start_until_enough_bytes(tmp_path):
    path = tmp_path / "val.parquet"
    pq.write_table(pa.table({"text": ["aaaa", "ééé", "bb", "cc"]}), path, row_group_size=2)
    assert quality.read_val_documents(path, 10) == ["aaaa", "ééé"]  # 4 + 6 bytes
    assert quality.read_val_documents(path, 11) == ["aaaa", "ééé", "bb"]
    with pytest.raises(ValueError, match="only 14 bytes"):
        quality.read_val_documents(path, 15)


def test_the_measure_worker_scores_a_uniform_model_at_log2_vocab_bits_per_token(isolated_base_dir, tmp_path,
                                                                               monkeypatch):
    """A model whose lm_head is zero predicts every token with probability 1/V, so its bits per byte on any text
    is log2(V) * text tokens / text bytes: the whole path (documents, BOS, rows, byte counts, our loss_eval on a
    checkpoint loaded by build_model) must give exactly that."""
    tokenizer = install_tokenizer(isolated_base_dir, 300, corpus_text("shard_00000.parquet")[:100])
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=1, n_head=1, n_kv_head=1, n_embd=64)
    model = build_gpt(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    checkpoint_dir = tmp_path / "checkpoint"
    save_checkpoint(str(checkpoint_dir), 7, model.state_dict(), None, {"step": 7, "model_config": vars(config)})
    docs = [doc[:3000] for doc in corpus_text("shard_00006.parquet")[:6]] + ["naïve café ✓ — 東京"]
    val_file = tmp_path / "val.parquet"
    pq.write_table(pa.table({"text": docs}), val_file)
    job = {"checkpoint_dir": str(checkpoint_dir), "step": 7, "seq_len": 64, "batch_size": 4, "eval_bytes": 10**9,
           "val_file": str(val_file), "loss_eval_path": str(quality.REPO_ROOT) + "/nanochat/loss_eval.py"}
    with pytest.raises(ValueError, match="asks for more"):  # fewer bytes in the file than asked for
        quality.worker_measure(job)
    text_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    result = quality.worker_measure({**job, "eval_bytes": text_bytes})
    text_tokens = sum(len(tokenizer.encode(doc)) for doc in docs)
    assert result["eval_bytes"] == text_bytes and result["eval_tokens"] == text_tokens
    assert result["val_bpb"] == pytest.approx(math.log2(300) * text_tokens / text_bytes, rel=1e-5)
    assert result["val_bpb_aligned"] == pytest.approx(result["val_bpb"], rel=1e-5)  # the same targets, other rows
    assert result["flops_per_token"] == result["own_flops_per_token"] == model.estimate_flops()
    # In the original's codebase `nanochat.common` is its own, without the helpers our loss_eval imports: the worker
    # gives loss_eval ours, and leaves theirs in place for everything else.
    theirs = ModuleType("nanochat.common")
    vars(theirs).update({k: v for k, v in vars(common).items() if k not in ("all_ranks_sum", "dist_rank_and_size")})
    monkeypatch.setitem(sys.modules, "nanochat.common", theirs)
    assert quality.worker_measure({**job, "eval_bytes": text_bytes})["val_bpb"] == result["val_bpb"]
    assert sys.modules["nanochat.common"] is theirs


# -----------------------------------------------------------------------------
# The table

def run(name, fraction, seed, val_bpb, flops=1e14, depth=4):
    return {"name": name, "codebase": "ours", "args": [], "depth": depth, "fraction": fraction, "seed": seed,
            "val_bpb": val_bpb, "steps": round(400 * fraction), "flops": flops * fraction, "train_wall_s": 60.0,
            "train_cpu_s": 30.0, "own_val_bpb": None}


def test_a_difference_is_real_only_when_the_seeds_do_not_overlap():
    assert quality.difference_is_real([1.70, 1.71, 1.72], [1.73, 1.75, 1.74])
    assert quality.difference_is_real([1.80, 1.81], [1.73, 1.75])
    assert not quality.difference_is_real([1.70, 1.71, 1.74], [1.73, 1.75, 1.76])
    assert not quality.difference_is_real([1.70], [1.75, 1.76])  # one seed has no spread to compare with


def test_flops_to_match_interpolates_in_log_flops_and_does_not_extrapolate():
    points = [(0.7, 1.90), (0.85, 1.80), (1.0, 1.70)]
    flops, relation = quality.flops_to_match(points, 1.75)
    assert relation == "=" and flops == pytest.approx(math.sqrt(0.85 * 1.0))  # halfway in log FLOPs
    assert quality.flops_to_match(points, 1.80) == (0.85, "=")
    assert quality.flops_to_match(points, 1.95) == (0.7, "<=")
    assert quality.flops_to_match(points, 1.60) == (1.0, ">")
    assert quality.flops_to_match(list(reversed(points)), 1.85)[1] == "="  # order does not matter


def test_summary_compares_every_configuration_with_the_baseline_at_its_full_budget():
    runs = [run("orig", 1.0, 0, 1.80), run("orig", 1.0, 1, 1.82),
            run("ours", 1.0, 0, 1.70), run("ours", 1.0, 1, 1.72),
            run("ours", 0.85, 0, 1.80), run("ours", 0.85, 1, 1.84),
            run("ours", 1.0, 0, 2.50, depth=6)]  # another depth, no baseline there
    rows, matches = quality.summarize(runs, "orig")
    by_key = {(row["depth"], row["name"], row["fraction"]): row for row in rows}
    assert "delta_vs_baseline" not in by_key[(4, "orig", 1.0)]
    assert by_key[(4, "ours", 1.0)]["delta_vs_baseline"] == pytest.approx(-0.10)
    assert by_key[(4, "ours", 1.0)]["real"] is True
    assert by_key[(4, "ours", 0.85)]["delta_vs_baseline"] == pytest.approx(0.01)
    assert by_key[(4, "ours", 0.85)]["real"] is False
    assert by_key[(4, "ours", 1.0)]["spread"] == pytest.approx(0.02)
    assert by_key[(4, "ours", 1.0)]["val_bpb"] == [1.70, 1.72]
    assert "delta_vs_baseline" not in by_key[(6, "ours", 1.0)]
    assert [(m["depth"], m["name"], m["relation"]) for m in matches] == [(4, "ours", "=")]
    # 1.81 lies 1/11 of the way from ours at 0.85x (1.82) to ours at 1x (1.71), in log FLOPs
    assert matches[0]["ratio"] == pytest.approx(math.exp(math.log(0.85) * 10 / 11))
    assert by_key[(4, "ours", 1.0)]["paired"] == pytest.approx([-0.10, -0.10])
    assert "paired" not in by_key[(4, "ours", 0.85)]  # orig has no runs at 0.85x
    table = quality.markdown_table(rows, matches, "orig")
    assert "| d4 | ours | ours | 0.85x | 340 |" in table
    assert "| -0.1000 | yes | -0.1000, -0.1000" in table
    assert "reaches orig's full-budget mean val bpb (1.8100) at 0.863x its FLOPs" in table


def test_paired_differences_match_seeds_and_give_a_t_statistic():
    base = [run("def", 1.0, seed, value) for seed, value in enumerate([1.5717, 1.5665, 1.5477, 1.5633])]
    other = [run("sb", 1.0, seed, value) for seed, value in [(3, 1.5153), (0, 1.5600), (1, 1.5455), (2, 1.4926)]]
    differences, t = quality.paired_differences(other, base)
    assert differences == pytest.approx([-0.0117, -0.0210, -0.0551, -0.0480])  # in seed order
    assert t == pytest.approx(-3.25, abs=0.01)  # mean -0.0340, standard error 0.0105
    differences, t = quality.paired_differences(other[:1] + [run("sb", 1.0, 7, 1.0)], base)  # seed 7: no partner
    assert differences == pytest.approx([1.5153 - 1.5633]) and t is None


def test_results_are_added_under_a_lock_and_none_is_lost(tmp_path):
    path = str(tmp_path / "results.json")
    assert quality.load_results(path) == {"probes": [], "runs": [], "failures": []}

    def add(worker):
        for i in range(5):
            quality.add_result(path, "runs", {"worker": worker, "i": i})
    threads = [threading.Thread(target=add, args=(w,)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    recorded = quality.load_results(path)["runs"]
    assert sorted((r["worker"], r["i"]) for r in recorded) == [(w, i) for w in range(6) for i in range(5)]


def test_a_run_another_harness_has_in_flight_is_not_claimed_until_that_harness_is_gone(tmp_path):
    log_path = str(tmp_path / "q_ours_d4_f1_s0.log")
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom dev.bench.quality import claim\n"
                               "with claim(sys.argv[1]) as ours:\n    print(ours, flush=True); sys.stdin.read()",
                               log_path], cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "True\n"
        with quality.claim(log_path) as ours:
            assert not ours
    finally:
        holder.kill()  # killed, not released: the OS drops the lock with the process
        holder.wait()
    with quality.claim(log_path) as ours:
        assert ours
        with quality.claim(log_path) as again:  # one harness, two threads: the second is refused too
            assert not again


def test_a_run_is_recognised_on_a_rerun_only_with_the_same_settings():
    config = quality.parse_configs("ours --matrix_lr=0.03")[0]
    sizes = {"depth": 4, "max_seq_len": 512, "device_batch_size": 8, "total_batch_size": 8192, "vocab_size": 4096,
             "dtype": "float32"}
    key = quality.run_key(config, sizes, 1e14, 1.0, 0, 10**6)
    assert key == quality.run_key(config, dict(sizes), 1e14, 1.0, 0, 10**6)
    assert key != quality.run_key(config, sizes, 1e14, 1.0, 1, 10**6)
    assert key != quality.run_key(quality.parse_configs("ours --matrix_lr=0.04")[0], sizes, 1e14, 1.0, 0, 10**6)
    assert key != quality.run_key(config, {**sizes, "depth": 6}, 1e14, 1.0, 0, 10**6)
