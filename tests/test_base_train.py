"""scripts/base_train.py and scripts/base_loss.py end to end on CPU: a tiny model learns and its checkpoint loads
back exactly; resuming (from a periodic checkpoint, or after Ctrl+C) reproduces the uninterrupted run bit for bit;
two processes under torchrun match one process accumulating the same batches. Every run is a real subprocess on a
base dir of real text; per-step losses are read from the curve the script writes."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from pretraining_setup import REPO_ROOT, make_aligned_base_dir, make_base_dir, read_curve, run_base_train

pytestmark = pytest.mark.slow

# d2 (128 wide, one head), 64-token rows, 4 rows per micro-step, 2 micro-steps per step (gradient accumulation)
TINY = ["--depth=2", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=512", "--sample_every=-1",
        "--core_metric_every=-1", "--eval_tokens=2048", "--arch=seed"]  # the default v2: RECIPE below


def final_weights(base_dir, step, tag="d2"):
    return torch.load(os.path.join(base_dir, "base_checkpoints", tag, f"model_{step:06d}.pt"), weights_only=True)


def final_meta(base_dir, step, tag="d2"):
    with open(os.path.join(base_dir, "base_checkpoints", tag, f"meta_{step:06d}.json"), encoding="utf-8") as f:
        return json.load(f)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"weights differ: {different}"


def copy_run_data(source, target, names=("base_data", "tokenizer")):
    """A fresh base dir holding source's data and tokenizer (and, with names, more of it)."""
    for name in names:
        shutil.copytree(os.path.join(source, name), os.path.join(target, name))
    return target


def copy_run(source, target):
    """A fresh base dir holding source's data, tokenizer and checkpoints (not its report)."""
    return copy_run_data(source, target, ("base_data", "tokenizer", "base_checkpoints"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """16 steps with a checkpoint every 8, val bpb every 4: the reference the resumed runs must reproduce."""
    base_dir = make_base_dir(tmp_path_factory.mktemp("uninterrupted"))
    run_base_train(base_dir, *TINY, "--num_iterations=16", "--eval_every=4", "--save_every=8")
    return base_dir, read_curve(base_dir), final_weights(base_dir, 16)


# -----------------------------------------------------------------------------
# Learning, checkpoint, base_loss, report


# one_thread: the training process ran one thread; the same reduction order gives the same bits
def test_tiny_run_lowers_val_bpb_and_its_checkpoint_gives_the_same_bpb_when_loaded(tmp_path, monkeypatch, one_thread):
    base_dir = make_base_dir(tmp_path / "base", vocab_size=512, num_train_docs=96)
    result = run_base_train(base_dir, *TINY, "--num_iterations=40", "--eval_every=20")
    curve = read_curve(base_dir)
    assert curve["val_step"] == [0, 20, 40] and curve["step"] == list(range(1, 41))
    assert curve["val_bpb"][-1] < 0.8 * curve["val_bpb"][0], curve["val_bpb"]
    assert "step 00040/00040 (100.0%) | loss " in result.stdout

    # The final checkpoint, loaded by build_model in this process, reproduces the final val bpb exactly
    from nanochat.checkpoint_manager import load_model
    from nanochat.dataloader import tokenizing_distributed_data_loader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    model, tokenizer, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 40 and tokenizer.get_vocab_size() == 512
    batches = tokenizing_distributed_data_loader(4, 64, "val", rank=0, world_size=1)
    assert evaluate_bpb(model, batches, 2048 // (4 * 64), get_token_bytes()) == curve["val_bpb"][-1]


def test_base_loss_and_report_after_a_tiny_run(tmp_path):
    base_dir = make_base_dir(tmp_path / "base")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "nanochat.report", "reset"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    run_base_train(base_dir, *TINY, "--num_iterations=6", "--eval_every=3", "--sample_every=6")
    result = subprocess.run([sys.executable, "-m", "scripts.base_loss", "--device_batch_size=4", "--split_tokens=2048"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    val_bpb = float(result.stdout.split("val bpb: ")[1].split()[0])
    assert val_bpb == pytest.approx(read_curve(base_dir)["val_bpb"][-1], abs=1e-4)  # same data, same model
    assert result.stdout.count("'The capital of France is") == 1
    unigram_bpb = float(result.stdout.split(" for the unigram baseline")[0].split(" vs ")[-1])
    assert 3 < unigram_bpb < 12  # a BPE vocab of 512: ~9 bits per token, a few bytes per token

    subprocess.run([sys.executable, "-m", "nanochat.report", "generate"], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    report = (base_dir / "report" / "report.md").read_text(encoding="utf-8")
    for heading in ["## Base model training", "## Base model loss", "## Summary"]:
        assert heading in report
    assert "- Calculated number of iterations: 6" in report and "- Final validation bpb: " in report
    assert f"- unigram bpb: {unigram_bpb:.4f}" in report
    assert f"Base model val bpb: {val_bpb:.4f} (unigram baseline: {unigram_bpb:.4f})" in report.split("## Summary")[1]
    assert "![base model training curve](base_train_curve.png)" in report
    assert (base_dir / "report" / "base_train_curve.png").stat().st_size > 1000


def test_default_val_bpb_size_is_the_run_size_at_most_and_the_final_one_is_always_measured(tmp_path):
    base_dir = make_base_dir(tmp_path / "base")
    args = [a for a in TINY if not a.startswith("--eval_tokens")]  # the default size
    result = run_base_train(base_dir, *args, "--num_iterations=2", "--eval_every=-1")
    assert "Val bpb evaluations: 1,024 tokens each" in result.stdout  # 2 steps x 512 tokens, not 20 x 512
    curve = read_curve(base_dir)
    assert curve["val_step"] == [2] and len(curve["val_bpb"]) == 1


def test_unigram_baseline_counts_on_one_stream_and_scores_on_another():
    from nanochat.loss_eval import UnigramBaseline

    token_bytes = torch.tensor([0, 1, 2])  # token 0 is special: no bytes, never scored
    unigram = UnigramBaseline(token_bytes)
    train = [(None, torch.tensor([[1, 1], [1, 2]])), (None, torch.tensor([[0, -1]]))]
    assert list(unigram.count(iter(train))) == train  # the batches pass through unchanged
    val = [(None, torch.tensor([[1, 2, 0, -1]]))]
    assert list(unigram.score(iter(val))) == val
    # add-one smoothed counts over the 3 ids: [1+1, 1+3, 1+1] -> p(1) = 4/8, p(2) = 2/8; val scores 1 and 2 (3 bytes)
    assert unigram.bpb() == pytest.approx((-math.log(4 / 8) - math.log(2 / 8)) / (math.log(2) * 3))


UNIGRAM_ON_TWO_RANKS = """
import os, torch, torch.distributed as dist
from nanochat.loss_eval import UnigramBaseline
token_bytes = torch.tensor([0, 1, 2, 3])
train, val = [torch.tensor([[1, 1, 2, 3]]), torch.tensor([[1, 0, -1, 2]])], [torch.tensor([[1, 2]]), torch.tensor([[3, 0]])]
def bpb(train, val):
    unigram = UnigramBaseline(token_bytes)
    list(unigram.count(iter([(None, t) for t in train])))
    list(unigram.score(iter([(None, v) for v in val])))
    return unigram.bpb()
alone = bpb(train, val)  # before the process group exists: this process sees all the data
dist.init_process_group("gloo")
rank = dist.get_rank()
os.write(1, f"rank {rank}: {alone!r} {bpb(train[rank:rank + 1], val[rank:rank + 1])!r}\\n".encode())  # one write: lines never interleave
dist.destroy_process_group()
"""


def test_unigram_baseline_over_two_ranks_is_the_one_over_all_their_data(tmp_path):
    # each rank sees half the batches; summed across ranks (and smoothed once, not once per rank) it must be the
    # baseline of one process that saw them all
    script = tmp_path / "unigram_two_ranks.py"
    script.write_text(UNIGRAM_ON_TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 2
    for line in lines:
        alone, split = (float(value) for value in line.split(": ")[1].split())
        assert split == pytest.approx(alone, rel=1e-12)


def test_long_evaluations_print_progress_with_an_eta(capsys):
    from nanochat.loss_eval import evaluate_bpb

    def model(inputs, targets, loss_reduction):
        return torch.ones(targets.shape)  # 1 nat per token

    batches = iter([(torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))] * 3)
    bpb = evaluate_bpb(model, batches, 3, torch.tensor([0, 2]), progress_after_s=0.0, progress_every_s=0.0)
    assert bpb == pytest.approx(1 / (2 * math.log(2)))  # 1 nat per 2-byte token
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("evaluating bpb: batch 1/3 | elapsed ") and " | eta " in lines[0]
    assert len(lines) == 2  # batches 1 and 2; the last one ends the evaluation instead


# -----------------------------------------------------------------------------
# Exact resume


def test_resume_from_a_periodic_checkpoint_reproduces_the_uninterrupted_run_bit_for_bit(uninterrupted, tmp_path):
    reference_dir, reference_curve, reference_weights = uninterrupted
    base_dir = copy_run(reference_dir, tmp_path / "resumed")
    shutil.copytree(reference_dir / "report", base_dir / "report")  # the curve of steps 1..16 (truncated to 1..8 on resume)
    result = run_base_train(base_dir, *TINY, "--num_iterations=16", "--eval_every=4", "--save_every=8", "--resume_from_step=8")
    assert "Resuming from" in result.stdout and "step 00009/00016" in result.stdout
    assert "step 00008/00016" not in result.stdout  # nothing before the resume point is trained again
    curve = read_curve(base_dir)
    assert curve["loss"] == reference_curve["loss"]  # exact float equality at every step
    assert curve["val_bpb"] == reference_curve["val_bpb"]
    assert_same_weights(final_weights(base_dir, 16), reference_weights)
    meta, reference_meta = final_meta(base_dir, 16), final_meta(reference_dir, 16)
    for key in ("dataloader_state_dicts", "rng_states", "val_bpb"):
        assert meta[key] == reference_meta[key], key
    assert meta["loop_state"]["smooth_train_loss"] == reference_meta["loop_state"]["smooth_train_loss"]


def test_sigint_saves_a_checkpoint_and_resume_last_continues_bit_for_bit(uninterrupted, tmp_path):
    reference_dir, reference_curve, reference_weights = uninterrupted
    base_dir = copy_run_data(reference_dir, tmp_path / "interrupted")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *TINY, "--num_iterations=16", "--eval_every=4",
                                "--save_every=8"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 00002/00016"):
            process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 0, "".join(output)
    stopped = [line for line in output if line.startswith("Stopped at step ")]
    assert stopped, "".join(output)
    stop_step = int(stopped[0].split()[3].rstrip("."))
    assert 2 <= stop_step < 16

    run_base_train(base_dir, *TINY, "--num_iterations=16", "--eval_every=4", "--save_every=8", "--resume_from_step=last")
    curve = read_curve(base_dir)
    assert curve["loss"] == reference_curve["loss"]
    assert curve["val_bpb"] == reference_curve["val_bpb"]
    assert_same_weights(final_weights(base_dir, 16), reference_weights)


def test_resume_with_other_model_settings_is_a_clear_error(uninterrupted, tmp_path):
    base_dir = copy_run(uninterrupted[0], tmp_path / "resumed")
    args = [a for a in TINY if not a.startswith("--max_seq_len")] + ["--max_seq_len=32", "--num_iterations=16"]
    result = run_base_train(base_dir, *args, "--resume_from_step=8", "--model_tag=d2", check=False)
    assert result.returncode != 0 and "resume with the settings of the run that saved it" in result.stdout
    assert "sequence_len=64 (these settings: 32)" in result.stdout
    # a seed checkpoint resumed with the default architecture (v2): the error names the fields and --arch=seed
    args = [a for a in TINY if a != "--arch=seed"] + ["--num_iterations=16"]
    result = run_base_train(base_dir, *args, "--resume_from_step=8", "--model_tag=d2", check=False)
    assert result.returncode != 0 and "value_embeds=False (these settings: True)" in result.stdout
    assert "--arch=seed" in result.stdout


def test_a_checkpoint_saved_before_the_recipe_fields_resumes_as_the_seed(uninterrupted, tmp_path):
    from nanochat.gpt import SHAPE_FIELDS

    reference_dir, _, reference_weights = uninterrupted
    base_dir = copy_run(reference_dir, tmp_path / "old")
    meta_path = base_dir / "base_checkpoints" / "d2" / "meta_000008.json"
    meta = json.loads(meta_path.read_text())
    meta["model_config"] = {name: meta["model_config"][name] for name in SHAPE_FIELDS}  # as saved before issue 18
    meta_path.write_text(json.dumps(meta))
    run_base_train(base_dir, *TINY, "--num_iterations=16", "--eval_every=4", "--save_every=8", "--resume_from_step=8")
    assert_same_weights(final_weights(base_dir, 16), reference_weights)


# every recipe setting away from its default (the batch-size law aside: at d2 it asks for many micro-steps)
RECIPE = ["--arch=v2,value_embeds_every_layer=True", "--orthogonalizer=polar_express", "--normuon_beta2=0.9",
          "--muon_weight_decay=0.2", "--cautious_weight_decay=True", "--muon_momentum_final=0.9",
          "--warmup_ratio=0.1", "--batch_lr_scaling=True", "--count_embedding=False",
          "--num_iterations=12", "--eval_every=6", "--save_every=6"]


def test_a_recipe_run_learns_records_its_architecture_and_resumes_bit_for_bit(tmp_path):
    base_dir = make_base_dir(tmp_path / "recipe")
    run_base_train(base_dir, *TINY, *RECIPE)
    curve, weights = read_curve(base_dir), final_weights(base_dir, 12)
    assert curve["val_bpb"][-1] < curve["val_bpb"][0], curve["val_bpb"]
    config = final_meta(base_dir, 12)["model_config"]
    assert config["value_embeds_every_layer"] and config["window_pattern"] == "SSSL"
    assert "value_embeds.0.weight" in weights and "smear_gate.weight" in weights
    resumed = copy_run(base_dir, tmp_path / "resumed")
    run_base_train(resumed, *TINY, *RECIPE, "--resume_from_step=6")
    assert_same_weights(final_weights(resumed, 12), weights)


# -----------------------------------------------------------------------------
# Settings errors


def test_total_batch_size_that_does_not_divide_is_a_clear_error(tmp_path):
    result = run_base_train(tmp_path, *TINY, "--total_batch_size=1000", check=False)
    assert result.returncode != 0
    expected = "total_batch_size=1,000 is not a multiple of device_batch_size * max_seq_len * world_size = 4 * 64 * 1 = 256"
    assert expected in result.stdout


def test_depth_whose_width_does_not_split_into_heads_is_a_clear_error(tmp_path):
    result = run_base_train(tmp_path, "--depth=5", check=False)
    assert result.returncode != 0 and "depth=5 gives model_dim=320, which does not split into 3 heads" in result.stdout


# -----------------------------------------------------------------------------
# Several processes (torchrun, gloo on CPU)

# Each row group packs into exactly 4 rows: one process accumulating 2 micro-steps and 2 processes taking one
# each then train on the same 8 rows at every step (and evaluate the same val rows).
DDP = ["--depth=2", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=512", "--num_iterations=8",
       "--eval_every=4", "--eval_tokens=1024", "--sample_every=-1", "--core_metric_every=-1"]


@pytest.fixture(scope="module")
def aligned_data(tmp_path_factory):
    return make_aligned_base_dir(tmp_path_factory.mktemp("aligned"), rows_per_row_group=4, row_len=65)


def test_two_processes_match_one_process_accumulating_the_same_batches(aligned_data, tmp_path):
    single = copy_run_data(aligned_data, tmp_path / "single")
    double = copy_run_data(aligned_data, tmp_path / "double")
    run_base_train(single, *DDP)
    result = run_base_train(double, *DDP, nproc=2)
    assert "2 process(es) x 1 micro-step(s)" in result.stdout
    single_curve, double_curve = read_curve(single), read_curve(double)
    # the same math up to float rounding (the gradient sum happens in another order)
    assert double_curve["loss"] == pytest.approx(single_curve["loss"], rel=1e-3)
    assert double_curve["val_bpb"] == pytest.approx(single_curve["val_bpb"], rel=1e-3)
    assert sorted(os.listdir(double / "base_checkpoints" / "d2")) == [
        "meta_000008.json", "model_000008.pt", "optim_000008_rank0.pt", "optim_000008_rank1.pt"]


def test_two_process_resume_reproduces_the_two_process_run(aligned_data, tmp_path):
    reference = copy_run_data(aligned_data, tmp_path / "reference")
    run_base_train(reference, *DDP, "--save_every=4", nproc=2)
    resumed = copy_run(reference, tmp_path / "resumed")
    result = run_base_train(resumed, *DDP, "--save_every=4", "--resume_from_step=4", nproc=2)
    assert "step 00005/00008" in result.stdout
    resumed_curve = read_curve(resumed)  # no curve was copied: it holds the steps after the resume
    assert resumed_curve["step"] == [5, 6, 7, 8]
    assert resumed_curve["loss"] == read_curve(reference)["loss"][4:]
    assert_same_weights(final_weights(resumed, 8), final_weights(reference, 8))

