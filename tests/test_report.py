"""nanochat/report.py: section files, the header, report.md in pipeline order with its summary table, and the
no-op report of non-zero ranks."""

import re
from pathlib import Path

import pytest

from nanochat.report import DummyReport, Report, get_report, read_metric, slugify


@pytest.fixture
def report(tmp_path):
    return Report(str(tmp_path / "report"))


def test_log_writes_a_markdown_section_with_formatted_values(report, tmp_path):
    path = report.log("Base model training", [{"depth": 20, "tokens": 11_219_763_200, "val_bpb": 0.812345678, "run": "dummy"},
                                              "free text, verbatim"])
    assert path.endswith("base-model-training.md")
    text = open(path, encoding="utf-8").read()
    assert text.startswith("## Base model training\ntimestamp: ")
    assert "- depth: 20\n- tokens: 11,219,763,200\n- val_bpb: 0.8123\n- run: dummy\nfree text, verbatim\n" in text


def test_slugs_of_the_pipeline_sections():
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert slugify("Base model loss") == "base-model-loss"


def test_reset_clears_the_previous_run_and_writes_the_header(report):
    report.log("Chat SFT", [{"loss": 1.0}])
    report.log_curve("base_train", {"step": [1], "loss": [2.0]})
    report.reset()
    assert sorted(p.name for p in Path(report.report_dir).iterdir()) == ["header.md"]
    header = open(f"{report.report_dir}/header.md", encoding="utf-8").read()
    for needle in ["### Git", "- Commit: ", "### Hardware", "- CPU: ", "- Memory: ", "- Python: ", "- PyTorch: ",
                   "### Bloat", "- Lines: ", "- Dependencies (uv.lock lines): ", "Run started: "]:
        assert needle in header
    assert int(re.search(r"- Files: ([\d,]+)", header).group(1).replace(",", "")) > 10


def test_generate_orders_sections_by_pipeline_and_fills_the_summary_table(report):
    report.reset()
    report.log("Chat evaluation sft", [{"ARC-Easy": 0.41, "GSM8K": 0.05, "ChatCORE": 0.0884}])
    report.log("Base model evaluation", [{"CORE": 0.2219}])
    report.log("Tokenizer training", [{"vocab_size": 65536}])
    report.log("Something extra", ["kept, after the pipeline's sections"])
    text = open(report.generate(), encoding="utf-8").read()
    positions = [text.index(f"## {s}") for s in ["Tokenizer training", "Base model evaluation", "Chat evaluation sft",
                                                 "Something extra", "Summary"]]
    assert positions == sorted(positions)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| Metric")}
    assert rows["CORE"] == ["0.2219", "-", "-", "-"]
    assert rows["ARC-Easy"] == ["-", "-", "0.4100", "-"]
    assert rows["ChatCORE"] == ["-", "-", "0.0884", "-"]
    assert rows["MMLU"] == ["-", "-", "-", "-"]
    assert re.search(r"Total wall clock time: \d+h\d+m", text)


def test_generate_plots_the_training_curve_and_links_it(report):
    report.reset()
    report.log("Base model training", [{"depth": 4}])
    report.log_curve("base_train", {"step": [1, 2, 3], "loss": [5.0, 4.0, 3.5], "val_step": [0, 3], "val_bpb": [3.0, 2.2]})
    text = open(report.generate(), encoding="utf-8").read()
    assert "![base model training curve](base_train_curve.png)" in text
    with open(f"{report.report_dir}/base_train_curve.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_read_metric_matches_whole_keys_only():
    section = "## Chat evaluation mid\n- ARC-Easy: 0.3900\n- ARC-Challenge: 0.2800\n"
    assert read_metric(section, "ARC-Easy") == "0.3900"
    assert read_metric(section, "ARC") is None


def test_only_rank_zero_writes(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert isinstance(get_report(), DummyReport)
    monkeypatch.setenv("RANK", "0")
    assert isinstance(get_report(), Report)
