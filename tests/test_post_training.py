"""Post-training: mid_train, chat_sft and chat_rl on tiny random models (byte-level tokenizer, d2, 64 wide) and the
repo's own offline task data (data/tasks, data/identity). Each stage runs as a subprocess with one thread; the
losses, LR multipliers and token counts are read back from the curves the scripts write to the report folder."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model_setup import make_chat_checkpoint

from nanochat.checkpoint_manager import CHECKPOINT_DIRS, save_checkpoint
from nanochat.dataloader import masked_batch
from nanochat.engine import Engine

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "data" / "tasks"
CHAT_FILE = DATA_DIR / "chat" / "chatterbot_corpus_english.jsonl"
# mid_train / chat_sft sources that are not in data/tasks, or are slow to load for a test
MID_SKIP = "mmlu_aux,gsm8k"
SFT_SKIP = "arc_easy,arc_challenge,gsm8k"


def run_script(base_dir, module, *args, nproc=1, timeout=1800, check=True):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                   module, "--", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{module} exited with {result.returncode}:\n{result.stdout[-5000:]}")
    return result


def read_curve(base_dir, name):
    with open(Path(base_dir) / "report" / f"{name}_curve.json", encoding="utf-8") as f:
        return json.load(f)


def mid_args(num_iterations=24):
    return [f"--skip={MID_SKIP}", f"--smoltalk_file={CHAT_FILE}", "--max_seq_len=128", "--device_batch_size=4",
            "--total_batch_size=1024", f"--num_iterations={num_iterations}", "--eval_every=-1", "--eval_tokens=1024",
            "--simple_spelling_size=400", "--spelling_bee_size=400"]


def sft_args(num_iterations=12):
    return [f"--skip={SFT_SKIP}", f"--smoltalk_file={CHAT_FILE}", "--max_seq_len=256", "--device_batch_size=4",
            "--target_examples_per_step=8", f"--num_iterations={num_iterations}", "--eval_every=-1", "--eval_steps=2",
            "--eval_metrics_every=-1", "--init_lr_frac=0.5"]


def assert_never_increases(values):
    assert all(b <= a for a, b in zip(values, values[1:])), values


# -----------------------------------------------------------------------------
# Midtraining


def test_mid_train_loss_falls_and_lr_decays_to_zero(tmp_path):
    make_chat_checkpoint(tmp_path, source="base", model_tag="d2")
    result = run_script(tmp_path, "scripts.mid_train", *mid_args())
    curve = read_curve(tmp_path, "mid_train")
    losses, lrms = curve["loss"], curve["lrm"]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < 0.8 * losses[0]
    assert lrms[0] == 1.0 and lrms[-1] < 0.25
    assert_never_increases(lrms)
    assert (tmp_path / "mid_checkpoints" / "d2" / "meta_000024.json").exists()
    section = (tmp_path / "report" / "midtraining.md").read_text()
    assert "- Skipped sources: mmlu_aux, gsm8k" in section
    assert "skipped: mmlu_aux, gsm8k" in result.stdout


def test_mid_train_names_a_missing_source_and_how_to_skip_it(tmp_path):
    make_chat_checkpoint(tmp_path, source="base", model_tag="d2")
    result = run_script(tmp_path, "scripts.mid_train", f"--smoltalk_file={CHAT_FILE}", check=False)
    assert result.returncode == 1
    error_lines = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "Traceback" not in result.stdout
    assert "'mmlu_aux' is not available" in error_lines[0] and "--skip=mmlu_aux" in error_lines[0]


def test_mid_train_rejects_an_unknown_source_name(tmp_path):
    make_chat_checkpoint(tmp_path, source="base", model_tag="d2")
    result = run_script(tmp_path, "scripts.mid_train", "--skip=mmlu", check=False)
    assert result.returncode == 1
    assert "error: --skip=mmlu: unknown source 'mmlu'; the sources are smoltalk, mmlu_aux" in result.stdout


# -----------------------------------------------------------------------------
# SFT


def test_sft_loss_is_the_mean_over_exactly_the_assistant_tokens(tmp_path):
    """Two conversations in one step. Supervised (byte-level tokens): "ok" + <|assistant_end|> = 3 in the first;
    "4" + end = 2 and "you are welcome" (15 bytes) + end = 16 in the second: 21 tokens. The BOS, the user turns,
    <|assistant_start|> and the padding of the shorter row count for nothing."""
    model, tokenizer = make_chat_checkpoint(tmp_path, source="mid", model_tag="d2")
    conversations = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
        [{"role": "user", "content": "what is 2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome"}],
    ]
    data_file = tmp_path / "two.jsonl"
    data_file.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    run_script(tmp_path, "scripts.chat_sft", "--skip=arc_easy,arc_challenge,gsm8k,smoltalk,simple_spelling,spelling_bee",
               f"--identity_file={data_file}", "--device_batch_size=2", "--target_examples_per_step=2",
               "--num_iterations=1", "--eval_every=-1", "--eval_steps=1", "--eval_metrics_every=-1")
    curve = read_curve(tmp_path, "chat_sft")
    assert curve["tokens"] == [21]

    token_losses = []
    with torch.no_grad():
        for messages in conversations:
            ids, mask = tokenizer.render_conversation({"messages": messages})
            logits = model(torch.tensor([ids[:-1]]))[0]  # (T - 1, V)
            losses = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            token_losses += [loss for loss, supervised in zip(losses.tolist(), mask[1:]) if supervised]
    assert len(token_losses) == 21
    assert curve["loss"][0] == pytest.approx(sum(token_losses) / 21, rel=2e-3)


def test_sft_loss_falls_and_lr_decays_linearly_in_optimizer_steps(tmp_path):
    make_chat_checkpoint(tmp_path, source="mid", model_tag="d2")
    run_script(tmp_path, "scripts.chat_sft", *sft_args(num_iterations=12))
    curve = read_curve(tmp_path, "chat_sft")
    assert curve["lrm"] == pytest.approx([1 - step / 12 for step in range(12)])  # 2 micro-steps each, counted once
    assert sum(curve["loss"][-3:]) / 3 < sum(curve["loss"][:3]) / 3
    assert (tmp_path / "chatsft_checkpoints" / "d2" / "meta_000012.json").exists()


def test_sft_rejects_a_batch_that_does_not_divide_the_step(tmp_path):
    make_chat_checkpoint(tmp_path, source="mid", model_tag="d2")
    result = run_script(tmp_path, "scripts.chat_sft", "--device_batch_size=3", "--target_examples_per_step=8", check=False)
    assert result.returncode == 1
    assert "error: target_examples_per_step=8 is not a multiple of device_batch_size * world_size = 3 * 1" in result.stdout


@pytest.mark.slow
def test_lr_schedules_are_the_same_on_two_ranks(tmp_path):
    make_chat_checkpoint(tmp_path, source="base", model_tag="d2")
    make_chat_checkpoint(tmp_path, source="mid", model_tag="d2")
    # mid: the epoch ends (1,000 conversations) before num_iterations; the ranks must agree on when
    args = [arg for arg in mid_args(num_iterations=1000) if "spelling" not in arg]
    result = run_script(tmp_path, "scripts.mid_train", *args, "--simple_spelling_size=300", "--spelling_bee_size=300",
                        "--skip=mmlu_aux,gsm8k,smoltalk", nproc=2)
    assert "LR multipliers identical on all 2 ranks" in result.stdout
    lrms = read_curve(tmp_path, "mid_train")["lrm"]
    assert_never_increases(lrms)
    assert 1 < len(lrms) < 1000 and lrms[-1] < 0.5
    result = run_script(tmp_path, "scripts.chat_sft", *sft_args(num_iterations=6), nproc=2)
    assert "LR multipliers identical on all 2 ranks" in result.stdout
    assert read_curve(tmp_path, "chat_sft")["lrm"] == pytest.approx([1 - step / 6 for step in range(6)])


# -----------------------------------------------------------------------------
# SFT and RL batches: what is learned


def test_masked_batch_targets_leave_out_the_prompt_the_forced_tokens_and_the_padding():
    # prompt 10 11 12 | sampled 20 21 | forced 30 31 | sampled 22 ; a shorter second row
    sequences = [[10, 11, 12, 20, 21, 30, 31, 22], [10, 11, 12, 23]]
    masks = [[0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1]]
    inputs, targets = masked_batch(sequences, masks, pad_id=99)
    assert inputs.tolist() == [[10, 11, 12, 20, 21, 30, 31], [10, 11, 12, 99, 99, 99, 99]]
    assert targets.tolist() == [[-1, -1, 20, 21, -1, -1, 22], [-1, -1, 23, -1, -1, -1, -1]]


def test_masked_targets_get_zero_loss_and_zero_gradient_in_the_model():
    """chat_rl's loss is -sum(advantage * log p) over GPT.forward's per-token losses: the prompt, the forced tokens
    and the padding (targets -1) must contribute nothing, to the value or to the gradient."""
    from model_setup import build_tiny_model, tiny_config
    model = build_tiny_model(tiny_config(vocab_size=100)).train()
    sequences = [[10, 11, 12, 20, 21, 30, 31, 22], [10, 11, 12, 23]]
    masks = [[0, 0, 0, 1, 1, 0, 0, 1], [0, 0, 0, 1]]
    inputs, targets = masked_batch(sequences, masks, pad_id=99)
    nll = model(inputs, targets, loss_reduction="none")  # (2, 7)
    trained = targets >= 0
    assert torch.all(nll[~trained] == 0) and torch.all(nll[trained] > 0)
    logits = model(inputs).detach()
    log_probs = torch.log_softmax(logits, -1)
    expected = [log_probs[0, 2, 20], log_probs[0, 3, 21], log_probs[0, 6, 22], log_probs[1, 2, 23]]
    torch.testing.assert_close(-nll[trained], torch.stack(expected), atol=1e-5, rtol=1e-5)
    advantages = torch.tensor([0.5, -0.5])
    (-(-nll * advantages[:, None]).sum() / 4).backward()  # chat_rl's loss for this batch
    assert all(p.grad is not None for p in model.parameters())


def test_engine_rollouts_mask_the_calculator_output(tmp_path):
    """The masks chat_rl trains with come from the engine: the tool's forced tokens are 0, so masked_batch drops them."""
    model, tokenizer = make_chat_checkpoint(tmp_path, source="sft", model_tag="d2")
    special = tokenizer.encode_special
    script = [special("<|python_start|>"), *tokenizer.encode("6*7"), special("<|python_end|>")]
    forced = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]

    class Scripted(torch.nn.Module):  # emits the python call, then whatever; the engine forces the output
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.calls = model, model.config, 0

        def get_device(self):
            return torch.device("cpu")

        def forward(self, idx, kv_cache=None, logits_from=0):
            logits = self.inner(idx, kv_cache=kv_cache, logits_from=logits_from)
            if self.calls < len(script):
                logits[:, -1, :] = -1e9
                logits[:, -1, script[self.calls]] = 1e9
            self.calls += 1
            return logits

    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "6 times 7?"},
                                                           {"role": "assistant", "content": "42"}]})
    results, masks = Engine(Scripted(), tokenizer).generate_batch(prompt, num_samples=1, max_tokens=len(script) + len(forced) + 2,
                                                                  temperature=0.0)
    answer, answer_mask = results[0][len(prompt):], masks[0][len(prompt):]
    assert answer[:len(script) + len(forced)] == script + forced
    assert answer_mask[:len(script) + len(forced)] == [1] * len(script) + [0] * len(forced)
    _, targets = masked_batch(results, masks, pad_id=0)
    forced_positions = range(len(prompt) + len(script) - 1, len(prompt) + len(script) + len(forced) - 1)
    assert all(targets[0, t] == -1 for t in forced_positions)


# -----------------------------------------------------------------------------
# RL end to end, with a model that calls the calculator


def make_calculator_model(base_dir, steps=150):
    """A tiny sft model taught (in-process, a few seconds) to answer every question with the same calculator call
    "'ab'.count('a')", so that RL rollouts go through the tool."""
    model, tokenizer = make_chat_checkpoint(base_dir, source="sft", model_tag="d2")
    answer = [{"type": "python", "text": "'ab'.count('a')"}, {"type": "python_output", "text": "1"},
              {"type": "text", "text": "#### 1"}]
    questions = ["How many a in ab?", "count the letter r in strawberry", "How many e are in the word geese?", "hi"]
    rows = [tokenizer.render_conversation({"messages": [{"role": "user", "content": question},
                                                        {"role": "assistant", "content": answer}]}) for question in questions]
    inputs, targets = masked_batch(*zip(*rows), pad_id=0)  # the same layout: the mask picks the answer's tokens
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    meta = {"step": 0, "model_config": vars(model.config), "user_config": {}, "world_size": 1}
    save_checkpoint(str(Path(base_dir) / CHECKPOINT_DIRS["sft"] / "d2"), 0, model.state_dict(), None, meta)
    return loss.item()


def test_rl_runs_end_to_end_with_the_calculator(tmp_path):
    final_loss = make_calculator_model(tmp_path)
    assert final_loss < 0.05
    run_script(tmp_path, "scripts.chat_rl", "--task=SpellingBee", "--examples_per_step=2", "--num_samples=4",
               "--device_batch_size=2", "--max_new_tokens=32", "--num_iterations=2", "--eval_every=-1",
               "--eval_examples=2", "--eval_num_samples=2", "--temperature=0.5")
    curve = read_curve(tmp_path, "chat_rl")
    assert curve["step"] == [1, 2]
    assert all(tokens > 0 for tokens in curve["calculator_tokens"])  # the tool answered every step
    assert all(0.0 <= reward <= 1.0 for reward in curve["reward"])
    assert curve["lrm"] == [1.0, 0.5]
    assert (tmp_path / "chatrl_checkpoints" / "d2" / "meta_000002.json").exists()
    section = (tmp_path / "report" / "chat-rl.md").read_text()
    assert "Mean reward per step: " in section and "- pass@1 after: " in section
    assert re.search(r"- Change in pass@1: [+-]\d+\.\d ± \d+\.\d points \(paired, the same 2 validation questions\): "
                     r"(two standard errors or more|within two standard errors)", section), section


def test_rl_without_the_calculator_forces_nothing_into_the_answers(tmp_path):
    make_calculator_model(tmp_path)  # every answer calls the calculator
    run_script(tmp_path, "scripts.chat_rl", "--task=SpellingBee", "--examples_per_step=2", "--num_samples=2",
               "--device_batch_size=2", "--max_new_tokens=16", "--num_iterations=2", "--eval_every=-1",
               "--eval_examples=2", "--eval_num_samples=1", "--temperature=0.5", "--calculator=False")
    curve = read_curve(tmp_path, "chat_rl")
    assert curve["calculator_tokens"] == [0, 0]
    assert len(curve["pass@1"]) == len(curve["eval_step"]) == 2  # before and after, once each with one sample


# -----------------------------------------------------------------------------
# Each stage's checkpoint loads where the user will use it


@pytest.mark.slow
def test_each_stage_checkpoint_loads_in_chat_eval_and_chat_cli(tmp_path):
    make_chat_checkpoint(tmp_path, source="base", model_tag="d2")
    run_script(tmp_path, "scripts.mid_train", *mid_args(num_iterations=2))
    run_script(tmp_path, "scripts.chat_sft", *sft_args(num_iterations=2))
    run_script(tmp_path, "scripts.chat_rl", "--task=SpellingBee", "--examples_per_step=1", "--num_samples=2",
               "--device_batch_size=2", "--max_new_tokens=8", "--num_iterations=1", "--eval_every=-1",
               "--eval_examples=1", "--eval_num_samples=1")
    for stage in ("mid", "sft", "rl"):
        result = run_script(tmp_path, "scripts.chat_eval", "-i", stage, "-a", "SpellingBee|ARC-Easy", "-x", "2", "-m", "8")
        assert "SpellingBee: " in result.stdout and "ARC-Easy: " in result.stdout
        result = run_script(tmp_path, "scripts.chat_cli", "-i", stage, "-p", "What is your name?", "-m", "8")
        assert result.returncode == 0 and "Traceback" not in result.stdout
