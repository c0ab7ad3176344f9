"""The chat tasks: they load the real datasets (../shared/data through NANOCHAT_DATA_DIR, and the hub code path with
datasets pointed at a local file), render as valid conversations, score reference answers right and wrong answers
wrong, slice and mix deterministically, and name what is missing."""

import json
import re
from pathlib import Path
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import datasets
import numpy as np
import pytest

from nanochat.common import MissingFileError, UserError
from nanochat.engine import use_calculator
from pretraining_setup import corpus_text, install_tokenizer
from tasks.arc import ARC, eval_split
from tasks.common import Task, TaskMixture, held_out, render_mc, shuffled
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer, official_answer, rule_disagreements
from tasks.humaneval import HumanEval, build_program, extract_code, extract_imports
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee, spell_counting



class Numbers(Task):
    """A task whose example i is {"value": offset + i}: slicing and mixing are visible in the values."""

    def __init__(self, n, offset=0, **kwargs):
        super().__init__(**kwargs)
        self.n, self.offset = n, offset

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"value": self.offset + index}


def values(task):
    return [task[i]["value"] for i in range(len(task))]


@pytest.fixture
def data_dir(shared_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(shared_data))
    return shared_data


@pytest.fixture
def tokenizer(tmp_path):
    return install_tokenizer(tmp_path / "tok")


def full_text(conversation):
    """The assistant's final message as the model would write it (parts joined)."""
    content = conversation["messages"][-1]["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


# -----------------------------------------------------------------------------
# Task, TaskMixture, render_mc


def test_slicing_selects_start_stop_step():
    assert values(Numbers(10)) == list(range(10))
    assert values(Numbers(10, start=2, stop=8, step=3)) == [2, 5]
    assert values(Numbers(10, stop=100)) == list(range(10))  # stop clipped to the dataset
    assert len(Numbers(10, start=20)) == 0
    task = Numbers(10, start=1, step=2)
    assert task[-1] == {"value": 9}
    with pytest.raises(IndexError):
        task[5]


def test_bad_slice_names_the_value():
    with pytest.raises(UserError, match="step must be an int >= 1, got 0"):
        Numbers(10, step=0)
    with pytest.raises(UserError, match="stop must be None or an int >= start"):
        Numbers(10, start=5, stop=2)


def test_mixture_is_a_deterministic_shuffle_covering_every_example_once():
    tasks = [Numbers(30), Numbers(20, offset=100)]
    mixture = TaskMixture(tasks)
    assert values(mixture) == values(TaskMixture(tasks))
    assert sorted(values(mixture)) == list(range(30)) + list(range(100, 120))
    assert values(mixture) != values(TaskMixture(tasks, seed=7))
    head = values(mixture)[:20]
    assert any(v < 100 for v in head) and any(v >= 100 for v in head)  # interleaved, not one task after the other


def test_mixture_oversamples_a_task_passed_twice():
    small, big = Numbers(5, offset=100), Numbers(20)
    counts = np.bincount(values(TaskMixture([big, small, small])))
    assert len(TaskMixture([big, small, small])) == 30
    assert all(counts[100:105] == 2) and all(counts[:20] == 1)


def test_mixture_of_sliced_tasks():
    mixture = TaskMixture([Numbers(10, stop=4), Numbers(10, offset=50, start=8)], stop=3)
    assert len(mixture) == 3 and set(values(TaskMixture([Numbers(10, stop=4)]))) == {0, 1, 2, 3}


def test_render_mc_puts_the_letter_right_after_each_choice():
    text = render_mc("What is 2+2?", ["A", "B"], ["3", "4"])
    assert text == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n\n"
                    "Respond only with the letter of the correct answer.")


def test_shuffled_order_is_datasets_shuffle_order():
    rows = [{"x": i} for i in range(257)]
    assert shuffled(rows) == list(datasets.Dataset.from_list(rows).shuffle(seed=42))


# -----------------------------------------------------------------------------
# Every task on the real data


def all_tasks(shared_data):
    return {
        "ARC-Easy": ARC("ARC-Easy", "validation"),
        "ARC-Challenge": ARC("ARC-Challenge", "validation"),
        "MMLU-test": MMLU("all", "test"),
        "MMLU-dev": MMLU("all", "dev"),
        "GSM8K-train": GSM8K("main", "train"),
        "GSM8K-val": GSM8K("main", "val"),
        "GSM8K-test": GSM8K("main", "test"),
        "HumanEval": HumanEval(),
        "SmolTalk": SmolTalk("train", filepath=str(shared_data / "chat" / "chatterbot_corpus_english.jsonl")),
        "CustomJSON": CustomJSON(str(shared_data / "chat" / "fastchat_identity_messages.jsonl")),
        "SpellingBee": SpellingBee(50, "train"),
        "SpellingBee-val": SpellingBee(50, "val"),
        "SimpleSpelling": SimpleSpelling(50, "test"),
    }


def test_every_task_loads_the_real_files_and_renders(data_dir, tokenizer):
    expected_sizes = {"ARC-Easy": 570, "ARC-Challenge": 299, "MMLU-test": 14042, "MMLU-dev": 285,
                      "GSM8K-train": 7473 - 799, "GSM8K-val": 799, "GSM8K-test": 1319, "HumanEval": 164,
                      "CustomJSON": 500, "SpellingBee": 50, "SpellingBee-val": 50, "SimpleSpelling": 50}
    assistant_start = tokenizer.encode_special("<|assistant_start|>")
    for name, task in all_tasks(data_dir).items():
        assert len(task) == expected_sizes.get(name, len(task)), name
        for i in list(range(10)) + [len(task) - 1]:
            conversation = task[i]
            ids, mask = tokenizer.render_conversation(conversation, max_tokens=100_000)
            assert ids[0] == tokenizer.get_bos_token_id() and sum(mask) > 0, name
            prompt = tokenizer.render_for_completion(conversation)
            assert prompt[-1] == assistant_start and prompt == ids[:len(prompt)], name
            # the tokens after the prompt decode to the assistant's message
            content = conversation["messages"][-1]["content"]
            first_text = content if isinstance(content, str) else content[0]["text"]
            assert tokenizer.decode(ids[len(prompt):]).startswith(first_text), name


def test_categorical_conversations_carry_letters_and_a_letter_answer(data_dir):
    for task in (ARC("ARC-Easy", "validation"), ARC("ARC-Challenge", "validation"), MMLU("all", "dev")):
        assert task.eval_type == "categorical"
        for i in range(len(task)):
            conversation = task[i]
            answer = conversation["messages"][1]["content"]
            assert answer in conversation["letters"]
            assert f"={answer}\n" in conversation["messages"][0]["content"]
            assert task.evaluate(conversation, answer) and task.evaluate(conversation, f" {answer}\n")
            wrong = next(letter for letter in conversation["letters"] if letter != answer)
            assert not task.evaluate(conversation, wrong)


def test_mmlu_reads_subjects_and_zero_based_answers(data_dir):
    # first row of anatomy_dev.csv: answer 3 -> D ("The second and third pharyngeal arches")
    task = MMLU("all", "dev")
    anatomy = [task[i] for i in range(len(task)) if "hyoid bone" in task[i]["messages"][0]["content"]]
    assert len(anatomy) == 1 and anatomy[0]["subject"] == "anatomy"
    assert anatomy[0]["messages"][1]["content"] == "D"
    assert "- The second and third pharyngeal arches=D\n" in anatomy[0]["messages"][0]["content"]


def test_arc_eval_split_is_validation_when_only_that_is_local(data_dir, tmp_path, monkeypatch):
    assert eval_split("ARC-Easy") == "validation"
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    assert eval_split("ARC-Easy") == "test"


# -----------------------------------------------------------------------------
# GSM8K


def test_gsm8k_calculator_annotations_become_python_parts(data_dir):
    task = GSM8K("main", "test")
    raw = {row["question"]: row["answer"] for row in map(json.loads, open(data_dir / "gsm8k" / "test.jsonl"))}
    for i in range(len(task)):
        conversation = task[i]
        parts = conversation["messages"][1]["content"]
        rebuilt, k = "", 0
        while k < len(parts):
            if parts[k]["type"] == "python":
                assert parts[k + 1]["type"] == "python_output"
                rebuilt += f"<<{parts[k]['text']}={parts[k + 1]['text']}>>"
                k += 2
            else:
                rebuilt += parts[k]["text"]
                k += 1
        assert rebuilt == raw[conversation["messages"][0]["content"]]
    example = next(task[i] for i in range(len(task)) if task[i]["messages"][0]["content"].startswith("Janet’s ducks"))
    assert example["messages"][1]["content"][:3] == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"},
        {"type": "python_output", "text": "9"},
    ]


def test_gsm8k_reference_solutions_score_100_and_perturbed_answers_0(data_dir):
    task = GSM8K("main", "test")
    correct = perturbed = 0
    for i in range(len(task)):
        conversation = task[i]
        reference = full_text(conversation)
        answer = extract_answer(reference)
        correct += task.evaluate(conversation, reference)
        assert task.reward(conversation, reference) in (0.0, 1.0)
        wrong = reference[:reference.rindex("####")] + f"#### {float(answer) + 1:g}"
        perturbed += task.evaluate(conversation, wrong)
        perturbed += task.evaluate(conversation, reference.replace("####", "answer:"))  # no "####" at all
    assert correct == len(task) and perturbed == 0


def gsm8k_conversation(reference_text):
    return {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": [{"type": "text", "text": reference_text}]}]}


def test_gsm8k_answers_compare_as_numbers():
    assert extract_answer("so #### 1,000") == "1000" and extract_answer("no answer") is None
    task, conversation = GSM8K.__new__(GSM8K), gsm8k_conversation("x\n#### 1200")
    assert task.evaluate(conversation, "#### 1,200") and task.evaluate(conversation, "#### 1200.0")
    assert task.evaluate(conversation, "#### 1200.00")  # the official rule compares strings: "1200.00" != "1200"
    assert not task.evaluate(conversation, "#### 120") and not task.evaluate(conversation, "1200")


def test_gsm8k_a_trailing_full_stop_is_not_part_of_the_number():
    task, conversation = GSM8K.__new__(GSM8K), gsm8k_conversation("x\n#### 18")
    assert extract_answer("The answer is\n#### 18.") == "18" and official_answer("#### 18.") == "18."
    assert task.evaluate(conversation, "So she makes\n#### 18.")
    assert not task.evaluate(conversation, "#### 1.8.")


def test_gsm8k_the_first_answer_counts_when_a_reply_has_two():
    task, conversation = GSM8K.__new__(GSM8K), gsm8k_conversation("x\n#### 18")
    assert extract_answer("#### 18\nWait, no:\n#### 20") == "18"
    assert task.evaluate(conversation, "#### 18\nWait, no:\n#### 20")
    assert not task.evaluate(conversation, "#### 20\nWait, no:\n#### 18")  # no rescue by a later answer


def test_gsm8k_rule_disagreements_count_replies_right_by_one_rule_only():
    references = ["#### 18", "#### 18", "#### 1,200", "#### 7", "#### 7"]
    replies = ["#### 18", "#### 18.", "#### 1200.0", "#### 8\n#### 7", "no answer"]
    assert rule_disagreements(references, replies) == {"replies": 5, "ours_only": 2, "official_only": 0}


def test_gsm8k_rules_agree_on_every_reference_solution(data_dir):
    for split in ("train", "val", "test"):
        task = GSM8K("main", split)
        conversations = [task[i] for i in range(len(task))]
        finals = [conversation["messages"][1]["content"][-1]["text"] for conversation in conversations]
        counts = rule_disagreements(finals, [full_text(conversation) for conversation in conversations])
        assert counts == {"replies": len(task), "ours_only": 0, "official_only": 0}


# -----------------------------------------------------------------------------
# SpellingBee / SimpleSpelling

def test_spellingbee_is_deterministic_per_index_and_differs_between_splits(data_dir):
    a, b = SpellingBee(200, "train"), SpellingBee(200, "train", start=100)
    assert a[150] == b[50] and a[7] == SpellingBee(200, "train")[7]
    test, val = SpellingBee(200, "test"), SpellingBee(200, "val")
    assert sum(a[i] == test[i] for i in range(200)) == sum(a[i] == val[i] for i in range(200)) == 0
    assert sum(val[i] == test[i] for i in range(200)) == 0
    simple = {split: SimpleSpelling(200, split) for split in ("train", "val", "test")}
    assert sum(simple["train"][i] == simple["test"][i] or simple["val"][i] == simple["test"][i]
               for i in range(200)) == 0
    assert len({a[i]["messages"][0]["content"] for i in range(200)}) > 190  # varied words and phrasings


def test_spellingbee_answer_asks_the_calculator_and_counts_on_its_own_when_the_call_gets_no_output(data_dir):
    task = SpellingBee(300, "test")
    letters_outside_word = own_counts = 0
    for i in range(len(task)):
        conversation = task[i]
        word, letter = conversation["word"], conversation["letter"]
        count = word.count(letter)
        parts = conversation["messages"][1]["content"]
        assert parts[0]["text"] == f"Counting '{letter}' in '{word}'. Python says:"
        assert parts[1]["text"] == f" '{word}'.count('{letter}')"
        assert str(use_calculator(parts[1]["text"])) == str(count)
        if [p["type"] for p in parts] == ["text", "python", "text"]:  # no output: the model counts
            own_counts += 1
            _, spelled, makes, answer = parts[2]["text"].split("\n")
            assert spelled == spell_counting(word, letter)
            assert re.sub(rf"/{letter}(=\d+)?", "", spelled) == f"{word}:{','.join(word)}"  # plus pairs and counts
            assert re.findall(r"=(\d+)", spelled) == [str(k) for k in range(1, count + 1)]
            assert (makes, answer) == (f"That makes {count}.", f"#### {count}")
        else:
            assert [p["type"] for p in parts] == ["text", "python", "python_output", "text"]
            assert (parts[2]["text"], parts[3]["text"]) == (str(count), f"\n#### {count}")
        reference = full_text(conversation)
        assert task.evaluate(conversation, reference) and task.reward(conversation, reference) == 1.0
        assert not task.evaluate(conversation, f"#### {count + 1}")
        letters_outside_word += letter not in word
    assert 0 < letters_outside_word < 0.25 * len(task)
    assert 0.4 * len(task) < own_counts < 0.6 * len(task)


def test_spell_counting_pairs_each_letter_with_the_asked_one_and_counts_the_matches():
    assert spell_counting("strawberry", "r") == "strawberry:s/r,t/r,r/r=1,a/r,w/r,b/r,e/r,r/r=2,r/r=3,y/r"
    assert spell_counting("cat", "z") == "cat:c/z,a/z,t/z"
    assert spell_counting("aa", "a") == "aa:a/a=1,a/a=2"


def test_spellingbee_calculator_call_tokenizes_the_word_as_the_answer_text_does(data_dir, tmp_path):
    """The model copies the word into the calculator call from the line above it. Its leading space makes the copy
    token for token: "'s" (a contraction to the tokenizer's split pattern) would otherwise split off the quote and
    the first letter of words like 'strawberry', so the call would spell the word with other tokens."""
    tokenizer = install_tokenizer(tmp_path, 512, corpus_text()[:200])
    task = SpellingBee(50, "test")
    for conversation in (task[i] for i in range(len(task))):
        parts = conversation["messages"][1]["content"]
        word_ids = tokenizer.encode(f" '{conversation['word']}")
        for text in (parts[0]["text"], parts[1]["text"]):
            ids = tokenizer.encode(text)
            assert any(ids[k:k + len(word_ids)] == word_ids for k in range(len(ids))), (text, word_ids)
    assert tokenizer.encode("'strawberry'")[:2] != tokenizer.encode(" 'strawberry'")[1:3]  # the contraction split


def test_simplespelling_spells_with_commas(data_dir):
    task = SimpleSpelling(20, "train")
    conversation = task[3]
    word = conversation["messages"][0]["content"].removeprefix("Spell the word: ")
    assert conversation["messages"][1]["content"] == f"{word}:{','.join(word)}"
    assert task.evaluate(conversation, f"{word}:{','.join(word)}\n")
    assert not task.evaluate(conversation, f"{word}:{','.join(word[::-1] + 'x')}")


# -----------------------------------------------------------------------------
# Validation splits: held out from train, never trained on


def questions(task):
    return [task[i]["messages"][0]["content"] for i in range(len(task))]


def test_train_and_val_partition_the_train_split_about_nine_to_one(data_dir):
    train, val = GSM8K("main", "train"), GSM8K("main", "val")
    raw = [json.loads(line)["question"] for line in open(data_dir / "gsm8k" / "train.jsonl", encoding="utf-8")]
    assert sorted(questions(train) + questions(val)) == sorted(raw)
    assert not set(questions(train)) & set(questions(val))
    assert len(val) == 799 and all(held_out(question) for question in questions(val))


def test_the_held_out_slice_is_the_same_in_a_local_subset(data_dir, monkeypatch):
    """data/tasks has the first 1,000 GSM8K train rows: its val rows are exactly the full file's val rows among them"""
    full_val = set(questions(GSM8K("main", "val")))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(Path(__file__).resolve().parents[1] / "data" / "tasks"))
    subset_train, subset_val = questions(GSM8K("main", "train")), questions(GSM8K("main", "val"))
    assert len(subset_train) + len(subset_val) == 1000 and set(subset_val) <= full_val
    assert not set(subset_train) & full_val


def test_arc_val_is_held_out_from_arc_train_on_the_hub(hub_from_local_files):
    train, val = ARC("ARC-Easy", "train"), ARC("ARC-Easy", "val")
    assert hub_from_local_files == [("allenai/ai2_arc", "ARC-Easy", "train")] * 2
    assert len(train) + len(val) == 570 and 30 < len(val) < 90  # the stand-in "train" file: 570 rows
    assert not set(questions(train)) & set(questions(val))


# -----------------------------------------------------------------------------
# Baselines: the score of answering without reading the question


def best_constant_reply(task, conversations, replies):
    """(reply, accuracy) of the best of these replies given to every conversation alike."""
    right = {reply: sum(task.evaluate(conversation, reply) for conversation in conversations) for reply in replies}
    best = max(right, key=right.get)
    return best, right[best] / len(conversations)


def test_spellingbee_baseline_is_always_answering_1(data_dir):
    for size, expected in ((64, 33 / 64), (256, 151 / 256)):  # 51.6% and 59.0%, as the audit found
        task = SpellingBee(size, "test")
        conversations = [task[i] for i in range(size)]
        reply, accuracy = best_constant_reply(task, conversations, [f"#### {k}" for k in range(12)])
        assert reply == "#### 1" and accuracy == task.baseline(conversations) == expected


def test_gsm8k_and_simplespelling_baselines_are_their_best_constant_answer(data_dir):
    task = GSM8K("main", "test", stop=300)
    conversations = [task[i] for i in range(len(task))]
    answers = {full_text(conversation).rsplit("#### ", 1)[1] for conversation in conversations}
    _, accuracy = best_constant_reply(task, conversations, [f"#### {answer}" for answer in answers])
    assert task.baseline(conversations) == accuracy > 0
    task = SimpleSpelling(256, "test")
    conversations = [task[i] for i in range(len(task))]
    _, accuracy = best_constant_reply(task, conversations, {full_text(c) for c in conversations})
    assert task.baseline(conversations) == accuracy <= 2 / 256


def test_categorical_baseline_is_chance_over_the_choices_each_question_has(data_dir):
    task = ARC("ARC-Challenge", "validation")
    conversations = [task[i] for i in range(len(task))]
    by_choices = Counter(len(conversation["letters"]) for conversation in conversations)
    assert by_choices == {4: 295, 3: 3, 5: 1}
    assert task.baseline(conversations) == pytest.approx((295 / 4 + 3 / 3 + 1 / 5) / 299)
    assert MMLU("all", "dev").baseline([MMLU("all", "dev")[0]]) == 0.25
    assert HumanEval(stop=5).baseline([HumanEval()[0]]) == 0.0  # no constant reply passes (see its docstring)


# -----------------------------------------------------------------------------
# HumanEval


def test_humaneval_program_has_imports_first_code_block_tests_and_check(data_dir):
    task = HumanEval()
    conversation = next(task[i] for i in range(len(task)) if "import" in task[i]["messages"][0]["content"])
    completion = "Here you go:\n```python\ndef f():\n    return 1\n```\nand\n```python\nignored\n```"
    program = build_program(conversation, completion)
    imports = [l for l in conversation["messages"][0]["content"].splitlines() if l.startswith(("import", "from"))]
    assert program.startswith(imports[0]) and "def f():\n    return 1\n" in program and "ignored" not in program
    assert program.rstrip().endswith(f"check({conversation['entry_point']})")
    assert conversation["test"] in program
    assert extract_code("def g(): pass") == "def g(): pass"


def test_humaneval_imports_are_the_prompts_top_level_block_only(data_dir):
    prompts = {task["task_id"]: task["messages"][0]["content"] for task in map(HumanEval().__getitem__, range(164))}
    assert extract_imports(prompts["HumanEval/0"]) == ["from typing import List"]
    assert extract_imports(prompts["HumanEval/99"]) == []  # its docstring has a line "    from two integers, ..."
    assert extract_imports(prompts["HumanEval/129"]) == []  # "    from any cell, ..." in the docstring
    assert "    import math" in prompts["HumanEval/115"] and extract_imports(prompts["HumanEval/115"]) == []
    assert extract_imports("# a comment\nimport os\n\nfrom a import b\ndef f():\n    import c\nimport d\n") == [
        "import os", "from a import b"]


def completion_text(tokenizer, conversation):
    """The assistant's reply as chat_eval hands it to task.evaluate: the tokens the model would write after the
    prompt (render_for_completion), the stop token left out, decoded."""
    ids, _ = tokenizer.render_conversation(conversation, max_tokens=100_000)
    prompt = tokenizer.render_for_completion(conversation)
    assert ids[-1] == tokenizer.encode_special("<|assistant_end|>")
    return tokenizer.decode(ids[len(prompt):-1])


def test_all_164_humaneval_canonical_solutions_pass_and_wrong_completions_fail(data_dir, tokenizer):
    task = HumanEval()
    conversations = [task[i] for i in range(len(task))]
    completions = [completion_text(tokenizer, conversation) for conversation in conversations]
    assert all(completion.endswith(conversation["messages"][1]["content"][-20:])
               for conversation, completion in zip(conversations, completions))
    stub_bodies = [conversation["messages"][0]["content"] + "    pass\n" for conversation in conversations]
    jobs = [(c, text) for texts in (completions, stub_bodies) for c, text in zip(conversations, texts)]
    with ThreadPoolExecutor(4) as pool:  # one sandboxed interpreter per program: waiting, not computing
        passed = list(pool.map(lambda job: task.evaluate(*job), jobs))
    canonical, stubs = passed[:164], passed[164:]
    assert [c["task_id"] for c, ok in zip(conversations, canonical) if not ok] == []
    assert sum(stubs) == 0  # the right function with a body that does nothing
    assert not task.evaluate(conversations[0], "")
    assert not task.evaluate(conversations[0], completions[0] + "\n  )")  # a right solution, then a syntax error


# -----------------------------------------------------------------------------
# SmolTalk, CustomJSON


def test_smoltalk_file_splits_into_train_and_test_partitioning_its_rows(data_dir):
    path = data_dir / "chat" / "chatterbot_corpus_english.jsonl"
    train, test = SmolTalk("train", filepath=str(path)), SmolTalk("test", filepath=str(path))
    assert len(train) + len(test) == 2026 and len(test) == 2026 // 20
    key = lambda conversation: json.dumps(conversation["messages"])
    rows = Counter(key(json.loads(line)) for line in open(path, encoding="utf-8"))
    assert Counter(key(task[i]) for task in (train, test) for i in range(len(task))) == rows


def test_smoltalk_local_dir_reads_smoltalk_split_files(tmp_path, monkeypatch):
    (tmp_path / "smoltalk").mkdir()
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"hi {i}"},
                          {"role": "assistant", "content": "hello"}]} for i in range(5)]
    (tmp_path / "smoltalk" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    task = SmolTalk("test")
    assert sorted(task[i]["messages"][1]["content"] for i in range(5)) == [f"hi {i}" for i in range(5)]
    with pytest.raises(MissingFileError, match=re.escape(str(tmp_path / "smoltalk" / "train.jsonl"))):
        SmolTalk("train")


def test_customjson_reads_both_line_formats_and_names_a_bad_line(tmp_path):
    path = tmp_path / "conversations.jsonl"
    lines = [[{"role": "user", "content": "who are you?"}, {"role": "assistant", "content": "nanochat"}],
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    task = CustomJSON(str(path))
    assert len(task) == 2 and task[1]["messages"][1]["content"] == "hello"
    path.write_text(path.read_text() + json.dumps([{"role": "assistant", "content": "x"}]) + "\n")
    with pytest.raises(UserError, match=f"{re.escape(str(path))}:3"):
        CustomJSON(str(path))
    with pytest.raises(MissingFileError, match="identity_conversations"):
        CustomJSON(str(tmp_path / "absent.jsonl"))


# -----------------------------------------------------------------------------
# Missing data; the hub path


def test_missing_local_dataset_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    for make, path in [(lambda: ARC("ARC-Easy", "test"), tmp_path / "arc" / "ARC-Easy" / "test.jsonl"),
                       (lambda: GSM8K("main", "train"), tmp_path / "gsm8k" / "train.jsonl"),
                       (lambda: HumanEval(), tmp_path / "humaneval" / "HumanEval.jsonl.gz"),
                       (lambda: MMLU("all", "test"), tmp_path / "mmlu" / "test"),
                       (lambda: SpellingBee(5), tmp_path / "words" / "words_alpha.zip")]:
        with pytest.raises(MissingFileError, match=re.escape(str(path))):
            make()
    with pytest.raises(MissingFileError, match="only available from the Hugging Face hub"):
        MMLU("auxiliary_train", "train")
    with pytest.raises(ValueError, match="ARC split must be one of"):
        ARC("ARC-Easy", "dev")


@pytest.fixture
def hub_from_local_files(shared_data, tmp_path, monkeypatch):
    """datasets.load_dataset answering hub names with the real local files (no network), recording the calls."""
    monkeypatch.delenv("NANOCHAT_DATA_DIR", raising=False)
    files = {("allenai/ai2_arc", "ARC-Challenge", "validation"): shared_data / "arc/ARC-Challenge/validation.jsonl",
             ("allenai/ai2_arc", "ARC-Easy", "train"): shared_data / "arc/ARC-Easy/validation.jsonl",  # a stand-in
             ("openai/gsm8k", "main", "test"): shared_data / "gsm8k/test.jsonl"}
    calls, real_load_dataset = [], datasets.load_dataset

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if (path, name, split) not in files:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (offline test)")
        return real_load_dataset("json", data_files=str(files[(path, name, split)]), split="train",
                                 cache_dir=str(tmp_path / "hf_cache"))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_path_loads_by_real_name_in_the_same_order_as_local(hub_from_local_files, shared_data, monkeypatch):
    hub_arc, hub_gsm8k = ARC("ARC-Challenge", "validation"), GSM8K("main", "test")
    assert hub_from_local_files == [("allenai/ai2_arc", "ARC-Challenge", "validation"), ("openai/gsm8k", "main", "test")]
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(shared_data))
    local_arc, local_gsm8k = ARC("ARC-Challenge", "validation"), GSM8K("main", "test")
    assert [hub_arc[i] for i in range(len(hub_arc))] == [local_arc[i] for i in range(len(local_arc))]
    assert [hub_gsm8k[i] for i in range(0, 1319, 37)] == [local_gsm8k[i] for i in range(0, 1319, 37)]


def test_unreachable_hub_names_the_dataset(hub_from_local_files):
    with pytest.raises(MissingFileError, match=r"openai/openai_humaneval.*NANOCHAT_DATA_DIR"):
        HumanEval()
    with pytest.raises(MissingFileError, match=r"cais/mmlu \(all\) split 'test'"):
        MMLU("all", "test")


def test_repo_offline_copies_load_and_match_their_checksums(monkeypatch):
    import hashlib
    from pathlib import Path
    repo_data = Path(__file__).resolve().parents[1] / "data" / "tasks"
    for line in (repo_data / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        assert hashlib.sha256((repo_data / name).read_bytes()).hexdigest() == digest, name
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(repo_data))
    sizes = {"ARC-Easy": len(ARC("ARC-Easy", eval_split("ARC-Easy"))), "MMLU": len(MMLU("all", "test")),
             "GSM8K-train": len(GSM8K("main", "train")) + len(GSM8K("main", "val")),
             "GSM8K-test": len(GSM8K("main", "test")),
             "HumanEval": len(HumanEval()), "SpellingBee": len(SpellingBee(10, "test")),
             "chat": len(SmolTalk("train", filepath=str(repo_data / "chat" / "chatterbot_corpus_english.jsonl")))}
    assert sizes == {"ARC-Easy": 570, "MMLU": 570, "GSM8K-train": 1000, "GSM8K-test": 1319, "HumanEval": 164,
                     "SpellingBee": 10, "chat": 2026 - 2026 // 20}
