"""nanochat/chat_eval.py and scripts/chat_eval.py: categorical scoring reads the answer letters' logits at the last
prompt position (the same batched as one at a time), generative scoring is pass@k over completions decoded together
across problems (greedy ones equal to Engine.generate_batch's one problem at a time, sampled ones independent of the
batch), every score carries n, a standard error and its baseline, the calculator can be switched off, ChatCORE needs
all six tasks, and the script evaluates a real (tiny, random) checkpoint on the real data and writes its report
section.

Exactness tests run the model in fp32 (the `fp32` fixture): in bf16, batched and single-row matmuls round apart
enough to flip a near-tie greedy choice of a random model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanochat.gpt as gpt_module
from model_setup import make_chat_checkpoint
from pretraining_setup import install_tokenizer
from nanochat.chat_eval import (CHATCORE_BASELINES, Score, categorical_predictions, chatcore, decide_problems,
                                make_task, run_categorical_eval, run_generative_eval, score_chat_task)
from nanochat.common import UserError
from nanochat.engine import Engine
from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.spellingbee import SpellingBee

REPO_ROOT = Path(__file__).resolve().parents[1]


class LetterByPosition(torch.nn.Module):
    """A stand-in model whose logits at position t favour letter (t mod 4): the right answer is known for any
    prompt length, and a wrong position (e.g. a padding one) would show."""

    def __init__(self, tokenizer):
        super().__init__()
        self.letter_ids = [tokenizer.encode(letter)[0] for letter in "ABCD"]
        self.vocab_size = tokenizer.get_vocab_size()

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, logits_from=0):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        for t in range(T):
            logits[:, t, self.letter_ids[t % 4]] = 1.0
        return logits[:, logits_from:]


@pytest.fixture
def data_dir(shared_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(shared_data))
    return shared_data


def test_categorical_answer_is_the_letter_with_the_top_logit_after_the_prompt(data_dir, tmp_path):
    tokenizer = install_tokenizer(tmp_path / "tok")
    task = ARC("ARC-Easy", "validation", stop=12)
    conversations = [task[i] for i in range(len(task))]
    expected = ["ABCD"[(len(tokenizer.render_for_completion(c)) - 1) % 4] for c in conversations]
    for batch_size in (1, 5, 12):
        assert categorical_predictions(LetterByPosition(tokenizer), tokenizer, conversations, batch_size) == expected
    num_passed, total = run_categorical_eval(task, LetterByPosition(tokenizer), tokenizer, batch_size=4)
    assert total == 12
    assert num_passed == sum(c["messages"][1]["content"] == e for c, e in zip(conversations, expected))


def test_categorical_batched_equals_unbatched_on_a_real_model(data_dir, isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    task = ARC("ARC-Challenge", "validation", stop=10)
    conversations = [task[i] for i in range(len(task))]
    one_at_a_time = categorical_predictions(model, tokenizer, conversations, batch_size=1)
    assert categorical_predictions(model, tokenizer, conversations, batch_size=4) == one_at_a_time
    assert categorical_predictions(model, tokenizer, conversations, batch_size=10) == one_at_a_time


def completions_of(engine, prompts, **settings):
    """{(problem, n-th finished sample): completion tokens} as decide_problems produces them, none passing."""
    completions, finished = {}, [0] * len(prompts)

    def record(problem, completion):
        completions[problem, finished[problem]] = list(completion)
        finished[problem] += 1
        return False

    decided = list(decide_problems(engine, prompts, record, **settings))
    assert sorted(decided) == [(problem, False) for problem in range(len(prompts))]
    return completions


def test_greedy_completions_batched_across_problems_equal_one_problem_at_a_time(data_dir, fp32, one_thread,
                                                                                isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    engine = Engine(model, tokenizer)
    for task in (SpellingBee(7, "test"), GSM8K("main", "test", stop=5)):
        conversations = [task[i] for i in range(len(task))]
        prompts = [tokenizer.render_for_completion(conversation) for conversation in conversations]  # lengths differ
        one_at_a_time = [engine.generate_batch(prompt, max_tokens=20, temperature=0.0)[0][0][len(prompt):]
                         for prompt in prompts]
        for gen_batch in (3, 32):  # 3 rows: finished rows take the next problems; 32: all at once
            batched = completions_of(engine, prompts, max_new_tokens=20, gen_batch=gen_batch)
            assert [batched[problem, 0] for problem in range(len(prompts))] == one_at_a_time
        expected = [task.evaluate(c, tokenizer.decode(tokens)) for c, tokens in zip(conversations, one_at_a_time)]
        assert run_generative_eval(task, tokenizer, engine, max_new_tokens=20, gen_batch=3) == (sum(expected),
                                                                                                 len(task))


def test_sampled_completions_depend_on_the_seed_and_sample_not_on_the_batch(data_dir, fp32, one_thread,
                                                                            isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    engine = Engine(model, tokenizer)
    task = SpellingBee(4, "test")
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(len(task))]
    settings = dict(num_samples=3, max_new_tokens=12, temperature=1.0, top_k=50)
    alone = completions_of(engine, prompts, gen_batch=1, **settings)  # one row: samples finish in order
    assert completions_of(engine, prompts, gen_batch=12, **settings) == alone
    assert completions_of(engine, prompts[2:], gen_batch=5, **settings) == {
        (problem - 2, sample): tokens for (problem, sample), tokens in alone.items() if problem >= 2}
    assert alone[0, 0] != alone[0, 1]  # seed + sample: the samples of a problem differ
    assert completions_of(engine, prompts, gen_batch=12, seed=7, **settings) != alone


def test_a_problem_passes_when_any_sample_is_right_and_its_other_samples_stop(data_dir, fp32, one_thread,
                                                                              isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    engine = Engine(model, tokenizer)
    task = SpellingBee(6, "test")
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(len(task))]
    judged = [0] * len(prompts)

    def second_sample_of_even_problems_is_right(problem, completion):
        judged[problem] += 1
        return problem % 2 == 0 and judged[problem] == 2

    decided = dict(decide_problems(engine, prompts, second_sample_of_even_problems_is_right, num_samples=3,
                                   max_new_tokens=6, temperature=1.0, gen_batch=4))
    assert decided == {problem: problem % 2 == 0 for problem in range(6)}
    assert judged == [2, 3, 2, 3, 2, 3]  # a passed problem's third sample is never judged
    decided = dict(decide_problems(engine, prompts, lambda problem, completion: False, num_samples=2,
                                   max_new_tokens=6, temperature=1.0, gen_batch=4))
    assert decided == {problem: False for problem in range(6)}


def test_generative_eval_with_the_engine_is_deterministic(data_dir, one_thread, isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    task, engine = SpellingBee(4, "test"), Engine(model, tokenizer)
    first = run_generative_eval(task, tokenizer, engine, num_samples=2, max_new_tokens=8, temperature=1.0)
    assert first == run_generative_eval(task, tokenizer, engine, num_samples=2, max_new_tokens=8, temperature=1.0)
    assert first[1] == 4 and 0 <= first[0] <= 4


def test_chatcore_centres_on_the_baselines_and_needs_all_six():
    results = {name: 0.25 if base else 0.0 for name, base in CHATCORE_BASELINES.items()}
    assert chatcore(results) == 0.0
    results["MMLU"], results["GSM8K"] = 1.0, 0.6  # centred: 1.0 and 0.6, the others 0
    assert chatcore(results) == pytest.approx(1.6 / 6)
    del results["HumanEval"]
    assert chatcore(results) is None


# -----------------------------------------------------------------------------
# Scores: n, standard error, baseline; splits; the calculator switch


def test_a_score_shows_n_one_standard_error_and_its_baseline():
    score = Score(num_passed=205, total=256, baseline=151 / 256)
    assert score.accuracy == 205 / 256 and score.stderr == pytest.approx(0.024963, abs=1e-6)
    assert str(score) == "80.1 ± 2.5 (n=256, base 59.0)" and not score.near_baseline


def test_an_accuracy_within_two_standard_errors_of_its_baseline_is_marked():
    assert str(Score(151, 256, 151 / 256)) == "59.0 ± 3.1 (n=256, base 59.0)*"  # SFT without its calculator
    assert Score(166, 256, 151 / 256).near_baseline  # +5.9 points: 1.96 standard errors
    assert not Score(167, 256, 151 / 256).near_baseline  # +6.3 points: 2.10 standard errors
    assert Score(0, 164, 0.0).near_baseline and Score(3, 164, 0.0).near_baseline  # 1.75 standard errors
    assert not Score(4, 164, 0.0).near_baseline  # 2.02


def test_every_task_has_a_test_split_and_all_but_humaneval_a_validation_split(data_dir):
    assert make_task("SpellingBee", "val").split == "val" and make_task("SpellingBee").split == "test"
    assert make_task("GSM8K", "val", max_problems=5).split == "val" and len(make_task("GSM8K", "val", 5)) == 5
    with pytest.raises(UserError, match="HumanEval has no val split"):
        make_task("HumanEval", "val")
    with pytest.raises(UserError, match="split 'dev'"):
        make_task("GSM8K", "dev")


def test_the_score_carries_the_baseline_of_the_problems_scored(data_dir, one_thread, isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    score = score_chat_task("SpellingBee", model, tokenizer, Engine(model, tokenizer), max_problems=64,
                            max_new_tokens=4)
    assert (score.total, score.baseline) == (64, 33 / 64)
    score = score_chat_task("ARC-Easy", model, tokenizer, None, split="test", max_problems=10)
    task = ARC("ARC-Easy", "validation", stop=10)
    assert score.total == 10 and score.baseline == task.baseline([task[i] for i in range(10)])


class CalculatorCaller(torch.nn.Module):
    """Stands in for GPT: after the prompt it writes <|python_start|> 6*7 <|python_end|>, then "ok" and ends,
    whatever it is fed; so a calculator result in the completion can only be forced."""

    def __init__(self, tokenizer, prompt_len):
        super().__init__()
        special = tokenizer.encode_special
        self.script = [special("<|python_start|>"), *tokenizer.encode("6*7"), special("<|python_end|>"),
                       *tokenizer.encode("ok"), special("<|assistant_end|>")]
        self.prompt_len, self.vocab_size = prompt_len, tokenizer.get_vocab_size()
        self.config = gpt_module.GPTConfig(sequence_len=64, vocab_size=self.vocab_size, n_layer=1, n_head=1,
                                           n_kv_head=1, n_embd=4)
        self.rotary_seq_len = 640

    def get_device(self):
        return torch.device("cpu")

    def forward(self, idx, kv_cache, logits_from=0):
        B, T = idx.shape
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        for row, position in enumerate(kv_cache.pos.tolist()):  # tokens seen, this one included
            written = position - self.prompt_len  # tokens of the reply so far; the calculator's output counts too
            logits[row, -1, self.script[min(max(written, 0), len(self.script) - 1)]] = 10.0
        return logits[:, logits_from:]


def test_with_the_calculator_off_nothing_is_forced_into_a_reply(isolated_base_dir):
    tokenizer = install_tokenizer(isolated_base_dir / "tok")
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "6*7?"},
                                                           {"role": "assistant", "content": ""}]})
    model = CalculatorCaller(tokenizer, len(prompt))
    replies = {}
    for calculator in (True, False):
        engine = Engine(model, tokenizer, calculator=calculator)
        assert engine.calculator is calculator
        replies[calculator] = completions_of(engine, [prompt], max_new_tokens=16)[0, 0]
    special = tokenizer.encode_special
    assert tokenizer.decode(replies[False]) == "<|python_start|>6*7<|python_end|>ok"
    assert replies[True][:len(model.script) - 3] == model.script[:-3]  # the call, then its forced result:
    assert tokenizer.decode(replies[True]).startswith("<|python_start|>6*7<|python_end|><|output_start|>42")
    assert special("<|output_start|>") not in replies[False]


def run_chat_eval_script(base_dir, data_dir, *args, nproc=1):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(data_dir),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([sys.executable, *launcher, "-m", "scripts.chat_eval", *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


SCORE_LINE = re.compile(r"^- ([A-Za-z0-9-]+): ([0-9.]+) ± ([0-9.]+) \(n=(\d+), base ([0-9.]+)\)(\*?)$", re.M)


def report_scores(base_dir, section="chat-evaluation-sft"):
    """{task: (accuracy %, standard error %, n, baseline %, near-baseline mark)} of a chat_eval report section."""
    text = (Path(base_dir) / "report" / f"{section}.md").read_text()
    return {name: (float(accuracy), float(stderr), int(n), float(base), mark == "*")
            for name, accuracy, stderr, n, base, mark in SCORE_LINE.findall(text)}


def test_script_evaluates_a_checkpoint_and_writes_the_report_section(shared_data, isolated_base_dir):
    make_chat_checkpoint(isolated_base_dir, source="sft")
    result = run_chat_eval_script(isolated_base_dir, shared_data, "-i", "sft", "-a", "ARC-Easy|SpellingBee",
                                  "-x", "8", "-m", "48", "--device_type", "cpu")
    assert result.returncode == 0, result.stdout
    section = (isolated_base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert section.startswith("## Chat evaluation sft")
    scores = report_scores(isolated_base_dir)
    assert set(scores) == {"ARC-Easy", "SpellingBee"} and all(0.0 <= v[0] <= 100.0 for v in scores.values())
    assert scores["ARC-Easy"][2] == scores["SpellingBee"][2] == 8
    assert "- ChatCORE:" not in section and "ChatCORE: not computed" in section


def test_script_scores_the_val_split_without_the_calculator_in_its_own_section(shared_data, isolated_base_dir):
    make_chat_checkpoint(isolated_base_dir, source="sft")
    result = run_chat_eval_script(isolated_base_dir, shared_data, "-i", "sft", "-a", "GSM8K|SpellingBee", "-x", "4",
                                  "-m", "16", "--split=val", "--calculator=off", "--device_type", "cpu")
    assert result.returncode == 0, result.stdout
    assert "val split | calculator off" in result.stdout
    scores = report_scores(isolated_base_dir, "chat-evaluation-sft-val-no-calculator")
    assert set(scores) == {"GSM8K", "SpellingBee"} and scores["SpellingBee"][2] == 4
    section = (isolated_base_dir / "report" / "chat-evaluation-sft-val-no-calculator.md").read_text()
    assert "- split: val" in section and "- calculator: off" in section
    assert "GSM8K: the official rule (first ####, strings) disagrees on 0 of 4 replies" in section
    assert not (isolated_base_dir / "report" / "chat-evaluation-sft.md").exists()  # the reported section is untouched
    result = run_chat_eval_script(isolated_base_dir, shared_data, "-i", "sft", "-a", "HumanEval", "--split=val")
    assert result.returncode == 1 and "HumanEval has no val split" in result.stdout


def test_script_names_an_unknown_task(shared_data, isolated_base_dir):
    result = run_chat_eval_script(isolated_base_dir, shared_data, "-i", "sft", "-a", "ARC-Easy|HellaSwag")
    assert result.returncode == 1
    assert "error: -a 'ARC-Easy|HellaSwag': unknown task 'HellaSwag'; the tasks are ARC-Easy" in result.stdout


@pytest.mark.slow
def test_two_ranks_share_the_problems_and_agree_with_one(shared_data, isolated_base_dir):
    make_chat_checkpoint(isolated_base_dir, source="sft")
    args = ["-i", "sft", "-a", "ARC-Easy|SpellingBee", "-x", "7", "-m", "24", "-b", "3", "--device_type", "cpu"]
    single = run_chat_eval_script(isolated_base_dir, shared_data, *args)
    assert single.returncode == 0, single.stdout
    one_rank = report_scores(isolated_base_dir)
    double = run_chat_eval_script(isolated_base_dir, shared_data, "--", *args, nproc=2)
    assert double.returncode == 0, double.stdout
    assert report_scores(isolated_base_dir) == one_rank
