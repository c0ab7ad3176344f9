"""CORE (nanochat/core_eval.py, scripts/base_eval.py): prompts, spans, the choice each task type makes (checked against
losses computed directly from the model), batching and ranks that change nothing, missing tasks, and the download."""

import http.server
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml

from nanochat import core_eval
from nanochat.common import MissingFileError
from nanochat.core_eval import (centered, evaluate_model, evaluate_task, fewshot_examples, find_bundle, load_examples,
                                load_tasks, render_prompts, token_rows)

from model_setup import build_tiny_model, make_chat_checkpoint, tiny_config
from pretraining_setup import install_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "core_eval_bundle"


@pytest.fixture
def byte_model(isolated_base_dir):
    """A byte-level tokenizer (one token per byte: spans are easy to count by hand) and a tiny random GPT."""
    tokenizer = install_tokenizer(isolated_base_dir)
    model = build_tiny_model(tiny_config(tokenizer.get_vocab_size(), sequence_len=512))
    return model, tokenizer


def read_jsonl(path, n=None):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:n] if n else rows


def span_loss(model, tokenizer, text, span_chars, window=None):
    """Mean loss of the last span_chars bytes of text, computed straight from the model (byte tokenizer), over the
    whole text or only its last `window` tokens."""
    ids = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())[-window if window else 0:]
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        losses = model(x, targets=y, loss_reduction="none")[0]  # losses[t] = loss of token t+1
    return losses[-span_chars:].mean().item()


def task(task_type, delimiter=" ", num_fewshot=0):
    return dict(label="t", task_type=task_type, delimiter=delimiter, num_fewshot=num_fewshot, baseline=0.0)


# -----------------------------------------------------------------------------
# Prompts and spans


def test_multiple_choice_prompts_share_the_context_and_end_in_each_choice():
    shots = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    item = {"query": "Question: why?", "choices": ["because", "no"], "gold": 0}
    assert render_prompts(item, "multiple_choice", "\nAnswer: ", shots) == [
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQuestion: why?\nAnswer: because",
        "Q1\nAnswer: b\n\nQ2\nAnswer: c\n\nQuestion: why?\nAnswer: no",
    ]


def test_schema_prompts_vary_the_context_and_keep_the_continuation():
    shots = [{"context_options": ["A x", "A y"], "continuation": "ran.", "gold": 1}]
    item = {"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}
    assert render_prompts(item, "schema", " ", shots) == ["A y ran.\n\nThe cat barked.", "A y ran.\n\nThe dog barked."]


def test_language_modeling_prompts_trim_the_context_and_strip_the_bare_prompt():
    shots = [{"context": " The country of Paris is ", "continuation": "France"}]
    item = {"context": "The capital of Italy is\n", "continuation": "Rome"}
    without, with_continuation = render_prompts(item, "language_modeling", " ", shots)
    assert without == "The country of Paris is France\n\nThe capital of Italy is"
    assert with_continuation == "The country of Paris is France\n\nThe capital of Italy is Rome"


def test_yaml_delimiter_defaults_to_a_space(shared_data):
    tasks = {t["label"]: t for t in load_tasks(shared_data / BUNDLE)}
    assert len(tasks) == 22
    assert tasks["copa"]["delimiter"] == " " and tasks["bigbench_qa_wikidata"]["delimiter"] == " "
    assert tasks["arc_easy"]["delimiter"] == "\nAnswer: " and tasks["jeopardy"]["delimiter"] == "\nAnswer: "
    assert (tasks["boolq"]["baseline"], tasks["bigbench_language_identification"]["baseline"]) == (62.0, 9.1)


def test_examples_are_shuffled_with_seed_1337_then_cropped(shared_data):
    path = shared_data / BUNDLE / "eval_data/commonsense_reasoning/copa.jsonl"
    rows = read_jsonl(path)
    random.Random(1337).shuffle(rows)
    assert load_examples(path, max_per_task=7) == rows[:7]
    assert load_examples(path) == rows and len(rows) == 100


def test_fewshot_examples_are_drawn_per_item_with_seed_1234_plus_index_and_never_the_item():
    data = [{"query": f"q{i}"} for i in range(30)]
    for idx in (0, 7, 29):
        shots = fewshot_examples(data, idx, 10)
        expected = random.Random(1234 + idx).sample([i for i in range(30) if i != idx], 10)
        assert shots == [data[i] for i in expected]
        assert data[idx] not in shots
    assert fewshot_examples(data, 3, 10) == fewshot_examples(data, 3, 10)  # reproducible
    assert fewshot_examples(data, 3, 10) != fewshot_examples(data, 4, 10)  # each item has its own


def test_fewshot_count_is_clamped_to_the_other_items_that_exist():
    data = [{"query": f"q{i}"} for i in range(4)]
    assert len(fewshot_examples(data, 0, 10)) == 3  # a tiny max_per_task leaves 3 others, not 10
    assert fewshot_examples(data[:1], 0, 10) == []
    assert fewshot_examples(data, 0, 0) == []


def test_spans_cover_the_choice_the_shared_suffix_and_the_continuation():
    bos = 0
    rows, spans = token_rows("multiple_choice", [[bos, 5, 6, 7, 8], [bos, 5, 6, 9], [bos, 5, 6, 7, 1, 2]])
    assert spans == [(3, 5), (3, 4), (3, 6)]  # after the common prefix [bos, 5, 6]
    rows, spans = token_rows("schema", [[bos, 1, 2, 8, 9], [bos, 3, 8, 9]])
    assert spans == [(3, 5), (2, 4)]  # the common suffix [8, 9]
    rows, spans = token_rows("language_modeling", [[bos, 4, 5], [bos, 4, 5, 6, 7]])
    assert rows == [[bos, 4, 5, 6, 7]] and spans == [(3, 5)]  # only the prompt with the continuation runs


def test_long_rows_lose_tokens_on_the_left_and_keep_their_span():
    rows, spans = token_rows("language_modeling", [list(range(10)), list(range(13))], max_len=8)
    assert rows == [list(range(5, 13))] and spans == [(5, 8)]  # tokens 10..12 still scored
    rows, spans = token_rows("language_modeling", [[0, 1], list(range(20))], max_len=4)
    assert rows == [[16, 17, 18, 19]] and spans == [(1, 4)]  # a continuation longer than the context: all that fits


# -----------------------------------------------------------------------------
# The choice each task type makes, against losses computed directly


def test_multiple_choice_picks_the_choice_with_the_lowest_mean_loss(byte_model, shared_data):
    model, tokenizer = byte_model
    item = read_jsonl(shared_data / BUNDLE / "eval_data/commonsense_reasoning/copa.jsonl", 1)[0]
    choices = item["choices"]  # "the toilet filled with water." / "water flowed from the spout.": no shared first byte
    assert choices[0][0] != choices[1][0]
    losses = [span_loss(model, tokenizer, f"{item['query']} {choice}", len(choice.encode())) for choice in choices]
    best = losses.index(min(losses))
    assert abs(losses[0] - losses[1]) > 1e-3  # a clear decision
    for gold, expected in ((best, 1.0), (1 - best, 0.0)):
        data = [dict(item, gold=gold)]
        assert evaluate_task(model, tokenizer, data, task("multiple_choice"), "cpu") == expected


def test_rows_longer_than_the_context_are_scored_whole_not_cropped_to_it(isolated_base_dir, shared_data):
    """The original never crops a row that fits the rotary table (10x sequence_len), so neither do we: a choice is
    made from the losses of the whole row, also where the training context's window would choose differently."""
    tokenizer = install_tokenizer(isolated_base_dir)
    model = build_tiny_model(tiny_config(tokenizer.get_vocab_size(), sequence_len=32))
    with torch.no_grad():  # attention outputs that weigh as much as in a trained model: far context moves the losses
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.5)
    assert model.rotary_seq_len == 320
    checked = decided_by_the_window = 0
    for item in read_jsonl(shared_data / BUNDLE / "eval_data/commonsense_reasoning/openbook_qa.jsonl", 60):
        texts = [f"{item['query']} {choice}" for choice in item["choices"]]
        spans = [len(choice.encode()) for choice in item["choices"]]
        lengths = [len(text.encode()) + 1 for text in texts]  # + BOS
        if len({choice[0] for choice in item["choices"]}) < len(spans) or max(spans) >= 32 or max(lengths) > 320:
            continue  # the span must be exactly the choice, fit the window, and the row the rotary table
        if min(lengths) <= 32:
            continue  # every row longer than sequence_len
        whole = [span_loss(model, tokenizer, text, span) for text, span in zip(texts, spans)]
        window = [span_loss(model, tokenizer, text, span, window=32) for text, span in zip(texts, spans)]
        best = whole.index(min(whole))
        decided_by_the_window += best != window.index(min(window))
        for gold in range(len(spans)):
            data = [dict(item, gold=gold)]
            assert evaluate_task(model, tokenizer, data, task("multiple_choice"), "cpu") == float(gold == best)
        checked += 1
    assert checked >= 10 and decided_by_the_window > 0  # cropping to sequence_len would have got these wrong


def test_schema_picks_the_context_under_which_the_continuation_is_likeliest(byte_model, shared_data):
    model, tokenizer = byte_model
    item = read_jsonl(shared_data / BUNDLE / "eval_data/language_understanding/winograd_wsc.jsonl", 1)[0]
    contexts, continuation = item["context_options"], item["continuation"]
    assert contexts[0][-1] != contexts[1][-1]  # so the shared suffix is exactly " " + continuation
    span = len(f" {continuation}".encode())
    losses = [span_loss(model, tokenizer, f"{context} {continuation}", span) for context in contexts]
    best = losses.index(min(losses))
    assert abs(losses[0] - losses[1]) > 1e-4
    for gold, expected in ((best, 1.0), (1 - best, 0.0)):
        assert evaluate_task(model, tokenizer, [dict(item, gold=gold)], task("schema"), "cpu") == expected


class SuccessorModel(torch.nn.Module):
    """A stub language model that knows one string of distinct characters: after each of its bytes it predicts
    (greedily) the byte that follows it there."""

    def __init__(self, text, vocab_size):
        super().__init__()
        self.successor = torch.zeros(vocab_size, dtype=torch.long)
        for a, b in zip(text.encode(), text.encode()[1:]):
            self.successor[a] = b
        self.vocab_size = vocab_size

    def forward(self, idx, logits_from=0):
        return torch.nn.functional.one_hot(self.successor[idx[:, logits_from:]], self.vocab_size).float() * 10


def test_language_modeling_is_right_only_when_greedy_decoding_reproduces_the_continuation(isolated_base_dir):
    tokenizer = install_tokenizer(isolated_base_dir)
    model = SuccessorModel("Q: abcd", tokenizer.get_vocab_size())
    # prompt "Q:" + delimiter " " + continuation; a byte tokenizer scores the delimiter's space too (" abcd")
    right = {"context": "Q: ", "continuation": "abcd"}
    wrong_last = {"context": "Q:", "continuation": "abce"}
    wrong_first = {"context": "Q:", "continuation": "xbcd"}
    lm = task("language_modeling")
    assert evaluate_task(model, tokenizer, [right], lm, "cpu") == 1.0
    assert evaluate_task(model, tokenizer, [wrong_last], lm, "cpu") == 0.0
    assert evaluate_task(model, tokenizer, [wrong_first], lm, "cpu") == 0.0
    assert evaluate_task(model, tokenizer, [right, wrong_last, right, wrong_first], lm, "cpu") == 0.5
    assert evaluate_task(model, tokenizer, [right], task("language_modeling", delimiter=" - "), "cpu") == 0.0


def test_centered_accuracy_rescales_chance_to_zero_and_perfect_to_one():
    assert centered(0.25, 25) == 0.0 and centered(1.0, 25) == 1.0 and centered(0.5, 50) == 0.0
    assert centered(0.4, 0) == 0.4
    assert abs(centered(0.552294, 62) - -0.178175) < 5e-6  # GPT-2's boolq row in the reference results (6 digits)


# -----------------------------------------------------------------------------
# Whole runs on the real files: ranges, determinism, batching


def test_accuracies_are_in_range_and_identical_across_runs_batch_sizes_and_prefix_sharing(byte_model, shared_data):
    model, tokenizer = byte_model
    modes = [dict(batch_tokens=8192), dict(batch_tokens=8192), dict(batch_tokens=0), dict(batch_tokens=700),
             dict(batch_tokens=0, share_prefix=False), dict(batch_tokens=8192, share_prefix=False)]
    runs = [evaluate_model(model, tokenizer, "cpu", max_per_task=5, bundle_dir=str(shared_data / BUNDLE), **mode)
            for mode in modes]
    first = runs[0]
    assert first["num_tasks"] == 20 and first["total_tasks"] == 22
    assert all(0.0 <= acc <= 1.0 for acc in first["results"].values())
    assert all(c <= 1.0 for c in first["centered_results"].values())
    expected_core = sum(first["centered_results"].values()) / 20
    assert abs(first["core_metric"] - expected_core) < 1e-12
    # one example per forward (0), several (8192), a budget in between (700); options' shared prefix run once
    # (default) or every option's full prompt run as its own row (share_prefix=False)
    for run in runs[1:]:
        assert run["results"] == first["results"] and run["core_metric"] == first["core_metric"]


def test_rows_are_whole_up_to_the_rotary_table_and_cropped_and_counted_beyond(isolated_base_dir):
    tokenizer = install_tokenizer(isolated_base_dir)
    model = build_tiny_model(tiny_config(tokenizer.get_vocab_size(), sequence_len=8))
    assert model.rotary_seq_len == 80
    filler = "The cat sat on the mat and looked at the door for a long time, then it went to sleep there. " * 2

    def item(row_length, gold=0):  # BOS + query + " " + a 2-byte choice: row_length tokens with a byte tokenizer
        return {"query": filler[:row_length - 4], "choices": ["ab", "cd"], "gold": gold}

    mc = task("multiple_choice")
    for row_length, cropped in ((79, 0), (80, 0), (81, 1), (120, 1)):
        text = item(row_length)["query"]
        window = 80 if cropped else None
        losses = [span_loss(model, tokenizer, f"{text} {choice}", 2, window=window) for choice in ("ab", "cd")]
        best = losses.index(min(losses))
        data = [item(row_length, gold=best), item(row_length, gold=1 - best)]
        correct, num_cropped = core_eval.score_examples(model, tokenizer, data, mc, "cpu", batch_tokens=0)
        assert correct.tolist() == [1.0, 0.0] and num_cropped == 2 * cropped, row_length

    # a batch may not reach past the table either: a long shared prefix + short choices beside a short prefix +
    # long choices is 77 + 77 positions, though every row is 80; they go into separate forwards
    long_choices = {"query": "Q:", "choices": ["a" + filler[:75], "b" + filler[:75]], "gold": 0}
    data = [item(80), long_choices, item(80, gold=1)]
    batched = core_eval.score_examples(model, tokenizer, data, mc, "cpu", batch_tokens=8192)
    one_at_a_time = core_eval.score_examples(model, tokenizer, data, mc, "cpu", batch_tokens=0)
    assert batched[0].tolist() == one_at_a_time[0].tolist() and batched[1] == one_at_a_time[1] == 0


def test_options_share_the_prefix_ahead_of_every_span(byte_model):
    model, tokenizer = byte_model
    mc = {"query": "Pick:", "choices": ["red", "green"], "gold": 0}
    items = core_eval.prepare_items([mc], [0], task("multiple_choice"), tokenizer, max_len=None)
    # BOS + "Pick: " is common, and the prediction at its last token (the choice's first) is scored
    assert items[0]["shared"] == 1 + len("Pick: ") - 1
    schema = {"context_options": ["The cat", "The dog"], "continuation": "barked.", "gold": 1}
    items = core_eval.prepare_items([schema], [0], task("schema"), tokenizer, max_len=None)
    assert items[0]["shared"] == 1 + len("The ")  # the contexts part at "c"/"d", well before the span " barked."
    lm = {"context": "Q:", "continuation": "abcd"}
    assert core_eval.prepare_items([lm], [0], task("language_modeling"), tokenizer, None)[0]["shared"] == 0


def test_missing_tasks_are_skipped_and_the_result_says_core_over_n_of_22(byte_model, shared_data, tmp_path):
    model, tokenizer = byte_model
    full = load_tasks(shared_data / BUNDLE)
    assert sorted(t["label"] for t in full if t["path"] is None) == ["coqa", "squad"]
    assert sorted(t["label"] for t in full if t["fallback"]) == ["hellaswag", "hellaswag_zeroshot"]

    # a bundle of three tasks, one of whose files is missing
    bundle = tmp_path / "bundle"
    shutil.copytree(shared_data / BUNDLE, bundle, ignore=shutil.ignore_patterns("*.jsonl", "reference_results"))
    def entry(label, uri, shots, task_type):
        return {"label": label, "dataset_uri": uri, "num_fewshot": [shots], "icl_task_type": task_type}
    config = {"icl_tasks": [entry("copa", "commonsense_reasoning/copa.jsonl", 0, "multiple_choice"),
                            entry("squad", "reading_comprehension/squad.jsonl", 10, "language_modeling"),
                            entry("hellaswag", "language_understanding/hellaswag.jsonl", 10, "multiple_choice")]}
    (bundle / "core.yaml").write_text(yaml.safe_dump(config))
    for name in ("eval_data/commonsense_reasoning/copa.jsonl", "eval_data_fallback/hellaswag_val_olmes1000.jsonl"):
        shutil.copyfile(shared_data / BUNDLE / name, bundle / name)

    result = evaluate_model(model, tokenizer, "cpu", max_per_task=4, bundle_dir=str(bundle))
    assert sorted(result["results"]) == ["copa", "hellaswag"] and list(result["skipped"]) == ["squad"]
    assert "squad.jsonl" in result["skipped"]["squad"]
    assert result["num_tasks"] == 2 and result["fallback_tasks"] == ["hellaswag"]
    assert result["label"] == "CORE over 2 of 22 tasks (hellaswag on the HellaSwag fallback subset)"

    result = evaluate_model(model, tokenizer, "cpu", max_per_task=4, bundle_dir=str(bundle), use_fallback=False)
    assert sorted(result["skipped"]) == ["hellaswag", "squad"] and result["label"] == "CORE over 1 of 22 tasks"


def test_a_bundle_dir_without_core_yaml_is_a_user_error(tmp_path):
    with pytest.raises(MissingFileError, match="has no core.yaml"):
        find_bundle(str(tmp_path))


# -----------------------------------------------------------------------------
# An independent implementation of the DCLM rules, and the same numbers from ours


def reference_dclm_correct(model, tokenizer, data, task):
    """Whether the model gets each example right, by the DCLM rules written out plainly: one example at a time,
    each of its rows run whole through the model (no batching, padding, shared prefix, KV cache or cropping).
    Few-shot examples: num_fewshot others drawn with Random(1234 + index), each followed by a blank line. Multiple
    choice: query + delimiter + choice per row, the choice scored (the tokens after the rows' common prefix) by
    mean loss, lowest wins. Schema: context option + delimiter + continuation per row, the continuation scored
    (the rows' common suffix) the same way. Language modeling: right when greedy decoding reproduces every token of
    the continuation (those after the common prefix of the prompt without and with it)."""
    bos, delimiter = tokenizer.get_bos_token_id(), task["delimiter"]
    correct = []
    for index, item in enumerate(data):
        others = [i for i in range(len(data)) if i != index]
        shots = [data[i] for i in random.Random(1234 + index).sample(others, min(task["num_fewshot"], len(others)))]
        if task["task_type"] == "multiple_choice":
            context = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
            texts = [f"{context}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
        elif task["task_type"] == "schema":
            context = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
            texts = [f"{context}{option}{delimiter}{item['continuation']}" for option in item["context_options"]]
        else:
            context = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
            prompt = f"{context}{item['context'].strip()}{delimiter}"
            texts = [prompt.rstrip(), prompt + item["continuation"]]
        rows = [[bos] + tokenizer.encode(text) for text in texts]
        common = 0  # tokens shared by every row from the start (schema: from the end)
        ordered = rows if task["task_type"] != "schema" else [row[::-1] for row in rows]
        while common < min(map(len, ordered)) and len({row[common] for row in ordered}) == 1:
            common += 1
        with torch.no_grad():
            if task["task_type"] == "language_modeling":
                row = rows[1]
                logits = model(torch.tensor([row]))[0]  # (T, V): position t predicts token t + 1
                start = min(common, len(row) - 1)  # at least one token is scored
                correct.append(logits[start - 1:len(row) - 1].argmax(-1).tolist() == row[start:])
                continue
            losses = []
            for row in rows:
                start = common if task["task_type"] == "multiple_choice" else len(row) - common
                start = max(1, min(start, len(row) - 1))
                token_losses = model(torch.tensor([row[:-1]]), targets=torch.tensor([row[1:]]),
                                     loss_reduction="none")[0]  # token_losses[t] = loss of token t + 1
                losses.append(token_losses[start - 1:].mean().item())
            correct.append(losses.index(min(losses)) == item["gold"])
    return correct


@pytest.mark.slow  # a BPE tokenizer to train, ~700-token rows run one by one: ~25 s on a busy 2-core machine
def test_per_task_numbers_equal_an_independent_implementation_of_the_dclm_rules(isolated_base_dir, shared_data):
    """A BPE tokenizer (so spans are whole tokens, as with a real one), a random GPT whose 96-token context is shorter
    than most rows (but its 960-token rotary table is not), and real tasks of every type, zero- and few-shot. (A
    random model never reproduces a continuation, so language modeling is right-checked by the SuccessorModel test.)"""
    model, tokenizer = make_chat_checkpoint(isolated_base_dir, source="base", vocab_size=512, sequence_len=96)
    with torch.no_grad():  # attention outputs that weigh as much as in a trained model: far context moves the losses
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.5)
    tasks = {t["label"]: t for t in load_tasks(shared_data / BUNDLE)}
    longer_than_the_context = 0
    for label in ("copa", "piqa", "winograd", "lambada_openai", "jeopardy", "bigbench_dyck_languages"):
        data = load_examples(tasks[label]["path"], max_per_task=8)
        expected = reference_dclm_correct(model, tokenizer, data, tasks[label])
        correct, cropped = core_eval.score_examples(model, tokenizer, data, tasks[label], "cpu")
        assert correct.tolist() == [float(right) for right in expected], label
        assert cropped == 0
        assert evaluate_task(model, tokenizer, data, tasks[label], "cpu") == sum(expected) / len(expected)
        items = core_eval.prepare_items(data, range(len(data)), tasks[label], tokenizer, max_len=None)
        longer_than_the_context += sum(max(map(len, item["rows"])) > 96 for item in items)
    assert longer_than_the_context > 20


# -----------------------------------------------------------------------------
# Download of the bundle


def make_bundle_zip(path, shared_data, top_folder="eval_bundle/"):
    with zipfile.ZipFile(path, "w") as archive:
        for name in ("core.yaml", "eval_meta_data.csv", "eval_data/commonsense_reasoning/copa.jsonl"):
            archive.write(shared_data / BUNDLE / name, top_folder + name)


@pytest.fixture
def file_server(tmp_path):
    """A local HTTP server for the files in tmp_path/www; yields its base url."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_missing_bundle_is_downloaded_validated_and_unpacked_once(byte_model, shared_data, file_server, monkeypatch,
                                                                 isolated_base_dir):
    url, root = file_server
    make_bundle_zip(root / "eval_bundle.zip", shared_data)
    monkeypatch.setattr(core_eval, "BUNDLE_URL", f"{url}/eval_bundle.zip")
    model, tokenizer = byte_model
    result = evaluate_model(model, tokenizer, "cpu", max_per_task=4)  # no bundle_dir: <base>/eval_bundle
    bundle = isolated_base_dir / "eval_bundle"
    assert (bundle / "core.yaml").is_file() and (bundle / "eval_data/commonsense_reasoning/copa.jsonl").is_file()
    assert not (isolated_base_dir / "eval_bundle.zip").exists()  # the zip is gone once unpacked
    assert list(result["results"]) == ["copa"] and result["label"] == "CORE over 1 of 22 tasks"
    (root / "eval_bundle.zip").unlink()  # a second run finds the bundle and downloads nothing
    assert find_bundle() == str(bundle)


def test_a_zip_with_core_yaml_at_its_top_unpacks_too(shared_data, file_server, isolated_base_dir):
    url, root = file_server
    make_bundle_zip(root / "flat.zip", shared_data, top_folder="")
    bundle = find_bundle(url=f"{url}/flat.zip")
    assert (Path(bundle) / "eval_data/commonsense_reasoning/copa.jsonl").is_file()


def test_a_download_that_is_not_the_bundle_is_rejected_and_leaves_nothing(file_server, isolated_base_dir):
    url, root = file_server
    (root / "error.zip").write_text("<html>Access denied</html>")
    with zipfile.ZipFile(root / "other.zip", "w") as archive:
        archive.writestr("README.txt", "not a bundle")
    for name in ("error.zip", "other.zip", "absent.zip"):
        with pytest.raises(MissingFileError, match=f"{name}.*--bundle_dir=data/core_eval"):
            find_bundle(url=f"{url}/{name}", attempts=1)
    assert sorted(os.listdir(isolated_base_dir)) == ["eval_bundle.lock", "eval_bundle.zip.lock"]


# -----------------------------------------------------------------------------
# scripts/base_eval: CSV, report, and the same numbers on 1 and 2 ranks


def run_base_eval(base_dir, *args, nproc=1):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        command = [sys.executable, "-m", "scripts.base_eval", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "scripts.base_eval", "--", *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:]
    return result.stdout


@pytest.mark.slow  # three processes: ~25 s on an idle 2-core machine
def test_base_eval_writes_csv_and_report_and_two_ranks_match_one(isolated_base_dir):
    make_chat_checkpoint(isolated_base_dir, source="base", model_tag="d2", step=7, vocab_size=512)
    args = ["--bundle_dir=data/core_eval", "--max_per_task=9"]  # the repo's demo bundle; 9: ranks get 5 and 4
    run_base_eval(isolated_base_dir, *args)
    csv_path = isolated_base_dir / "base_eval" / "d2_7.csv"
    one_rank = csv_path.read_text()
    csv_path.unlink()
    output = run_base_eval(isolated_base_dir, *args, "--batch_tokens=4096", nproc=2)  # batched; one rank: not
    assert csv_path.read_text() == one_rank
    assert "CORE over 20 of 22 tasks" in output

    lines = [line.split(",") for line in one_rank.splitlines()]
    assert [cell.strip() for cell in lines[0]] == ["Task", "Accuracy", "Centered"]
    assert len(lines) == 1 + 20 + 1
    assert lines[-1][0].startswith("CORE over 20 of 22 tasks")
    report = (isolated_base_dir / "report" / "base-model-evaluation.md").read_text()
    assert report.startswith("## Base model evaluation")
    core_line = next(line for line in report.splitlines() if line.startswith("- CORE:"))
    assert core_line == f"- CORE: {float(lines[-1][2]):.4f} (over 20 of 22 tasks)"
    assert "- Skipped: squad" in report and "- arc_easy: " in report
