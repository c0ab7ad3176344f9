"""scripts/chat_eval.py: categorical scoring reads the answer letters' logits at the last prompt position (the same
batched as one at a time), generative scoring is pass@k over completions decoded together across problems (greedy
ones equal to Engine.generate_batch's one problem at a time, sampled ones independent of the batch), ChatCORE needs
all six tasks, and the script evaluates a real (tiny, random) checkpoint on the real data and writes its report section.

Exactness tests run the model in fp32 (the `fp32` fixture): in bf16, batched and single-row matmuls round apart
enough to flip a near-tie greedy choice of a random model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanochat.engine as engine_module
import nanochat.gpt as gpt_module
from model_setup import make_chat_checkpoint
from pretraining_setup import install_tokenizer
from scripts.chat_eval import (CHATCORE_BASELINES, categorical_predictions, chatcore, decide_problems, load_engine,
                               run_categorical_eval, run_generative_eval)
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


@pytest.fixture
def one_thread():
    # the tiny models gain nothing from a thread pool, and on a busy 2-core machine its spinning costs seconds
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fp32(monkeypatch, one_thread):
    monkeypatch.setattr(gpt_module, "COMPUTE_DTYPE", torch.float32)
    monkeypatch.setattr(engine_module, "COMPUTE_DTYPE", torch.float32)


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


def test_greedy_completions_batched_across_problems_equal_one_problem_at_a_time(data_dir, fp32, isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    engine = load_engine(model, tokenizer)
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


def test_sampled_completions_depend_on_the_seed_and_sample_not_on_the_batch(data_dir, fp32, isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    engine = load_engine(model, tokenizer)
    task = SpellingBee(4, "test")
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(len(task))]
    settings = dict(num_samples=3, max_new_tokens=12, temperature=1.0, top_k=50)
    alone = completions_of(engine, prompts, gen_batch=1, **settings)  # one row: samples finish in order
    assert completions_of(engine, prompts, gen_batch=12, **settings) == alone
    assert completions_of(engine, prompts[2:], gen_batch=5, **settings) == {
        (problem - 2, sample): tokens for (problem, sample), tokens in alone.items() if problem >= 2}
    assert alone[0, 0] != alone[0, 1]  # seed + sample: the samples of a problem differ
    assert completions_of(engine, prompts, gen_batch=12, seed=7, **settings) != alone


def test_a_problem_passes_when_any_sample_is_right_and_its_other_samples_stop(data_dir, fp32, isolated_base_dir):
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="sft")
    engine = load_engine(model, tokenizer)
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
    task, engine = SpellingBee(4, "test"), load_engine(model, tokenizer)
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


def run_chat_eval_script(base_dir, data_dir, *args, nproc=1):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "NANOCHAT_DATA_DIR": str(data_dir),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run([sys.executable, *launcher, "-m", "scripts.chat_eval", *args], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def report_scores(base_dir, source="sft"):
    section = (Path(base_dir) / "report" / f"chat-evaluation-{source}.md").read_text()
    return {name: float(value) for name, value in re.findall(r"^- ([A-Za-z-]+): ([0-9.]+)$", section, re.M)
            if name != "temperature"}


def test_script_evaluates_a_checkpoint_and_writes_the_report_section(shared_data, isolated_base_dir):
    make_chat_checkpoint(isolated_base_dir, source="sft")
    result = run_chat_eval_script(isolated_base_dir, shared_data, "-i", "sft", "-a", "ARC-Easy|SpellingBee",
                                  "-x", "8", "-m", "48", "--device_type", "cpu")
    assert result.returncode == 0, result.stdout
    section = (isolated_base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert section.startswith("## Chat evaluation sft")
    scores = report_scores(isolated_base_dir)
    assert set(scores) == {"ARC-Easy", "SpellingBee"} and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "- ChatCORE:" not in section and "ChatCORE: not computed" in section


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
