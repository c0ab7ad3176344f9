"""nanochat/report.py: section files, the header, report.md in pipeline order with its summary table, and the
no-op report of non-zero ranks."""

import re
from pathlib import Path

import pytest

from nanochat.report import NEAR_BASELINE_LEGEND, DummyReport, Report, get_report, read_metric, slugify


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
    assert re.search(r"Total wall clock time: (\d+h\d\dm|\d+m\d\ds|\d+s)$", text, re.M)


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


def summary_rows(text):
    summary = text[text.index("## Summary"):]
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in summary.splitlines()
            if line.startswith("| ") and not line.startswith(("| Metric", "| Stage", "| --"))}


def test_a_partial_core_is_labelled_with_its_number_of_tasks(report):
    report.reset()
    report.log("Base model evaluation", [{"CORE": "0.1234 (over 19 of 22 tasks)", "CORE label": "CORE over 19 of 22 tasks"}])
    rows = summary_rows(open(report.generate(), encoding="utf-8").read())
    assert rows["CORE (over 19 of 22 tasks)"] == ["0.1234", "-", "-", "-"]
    assert "CORE" not in rows


def test_the_summary_has_every_stage_and_chat_metric(report):
    report.reset()
    for stage, scale in (("mid", 1), ("sft", 2), ("rl", 3)):
        report.log(f"Chat evaluation {stage}", [{"ARC-Easy": 0.1 * scale, "SpellingBee": 0.05 * scale, "GSM8K": 0.01 * scale}])
    report.log("Base model evaluation", [{"CORE": 0.2219}])
    rows = summary_rows(open(report.generate(), encoding="utf-8").read())
    assert list(rows)[:9] == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee",
                              "SimpleSpelling", "ChatCORE"]
    assert rows["SpellingBee"] == ["-", "0.0500", "0.1000", "0.1500"]
    assert rows["GSM8K"] == ["-", "0.0100", "0.0200", "0.0300"]
    assert rows["ChatCORE"] == ["-", "-", "-", "-"]


def test_chat_scores_keep_n_and_baseline_in_the_summary_and_a_near_baseline_mark_gets_a_legend(report):
    report.reset()
    report.log("Chat evaluation sft", [{"SpellingBee": "80.1 ± 2.5 (n=256, base 59.0)"}])
    text = open(report.generate(), encoding="utf-8").read()
    assert summary_rows(text)["SpellingBee"] == ["-", "-", "80.1 ± 2.5 (n=256, base 59.0)", "-"]
    assert NEAR_BASELINE_LEGEND not in text
    report.log("Chat evaluation rl", [{"SpellingBee": "59.0 ± 3.1 (n=256, base 59.0)*"}])
    text = open(report.generate(), encoding="utf-8").read()
    assert summary_rows(text)["SpellingBee"][3] == "59.0 ± 3.1 (n=256, base 59.0)*"
    summary = text[text.index("## Summary"):]
    assert summary.index("| SpellingBee") < summary.index(NEAR_BASELINE_LEGEND)
    assert NEAR_BASELINE_LEGEND.startswith("* within two standard errors of its baseline")


def test_each_training_curve_is_plotted_after_its_own_section(report):
    report.reset()
    report.log("Midtraining", [{"steps": 3}])
    report.log("Chat SFT", [{"steps": 3}])
    report.log("Chat RL", [{"steps": 3}])
    report.log("Chat evaluation rl", [{"SpellingBee": 0.5}])
    report.log_curve("mid_train", {"step": [1, 2, 3], "loss": [3.0, 2.5, 2.0], "val_step": [3], "val_bpb": [1.5]})
    report.log_curve("chat_sft", {"step": [1, 2, 3], "loss": [2.0, 1.5, 1.2], "val_step": [3], "val_loss": [1.4]})
    report.log_curve("chat_rl", {"step": [1, 2, 3], "reward": [0.1, 0.3, 0.4], "eval_step": [0, 3], "pass@1": [0.1, 0.4]})
    text = open(report.generate(), encoding="utf-8").read()
    for section, image, next_section in (("Midtraining", "mid_train_curve.png", "Chat SFT"),
                                         ("Chat SFT", "chat_sft_curve.png", "Chat RL"),
                                         ("Chat RL", "chat_rl_curve.png", "Chat evaluation rl")):
        assert text.index(f"## {section}") < text.index(f"]({image})") < text.index(f"## {next_section}")
        with open(f"{report.report_dir}/{image}", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "base_train_curve.png" not in text  # no curve file, no plot


def test_a_section_without_a_curve_file_gets_no_plot(report):
    report.reset()
    report.log("Chat SFT", [{"steps": 3}])
    text = open(report.generate(), encoding="utf-8").read()
    assert "chat_sft_curve.png" not in text and "## Chat SFT" in text


def test_wall_clock_runs_to_the_last_section_and_each_stage_gets_its_time(report):
    report.reset()
    header = Path(report.report_dir, "header.md")
    text = re.sub(r"Run started: .*", "Run started: 2026-01-01 10:00:00", header.read_text())
    header.write_text(text.replace("- GPUs: none", "- GPUs: 8 x H100\n- Hourly cost estimate: $24.00/h (8 x NVIDIA H100 at $3.00/h)"))
    for section, stamp in (("Tokenizer training", "10:05:00"), ("Base model training", "13:05:00"), ("Chat SFT", "13:50:00")):
        path = report.log(section, [{"x": 1}])
        Path(path).write_text(re.sub(r"timestamp: .*", f"timestamp: 2026-01-01 {stamp}", Path(path).read_text()))
    text = open(report.generate(), encoding="utf-8").read()
    assert "| tokenizer-training | 10:05:00 | 5m00s |" in text
    assert "| base-model-training | 13:05:00 | 3h00m |" in text
    assert "| chat-sft | 13:50:00 | 45m00s |" in text
    assert "Total wall clock time: 3h50m" in text
    assert "Estimated cost: $92.00 (8 x NVIDIA H100 at $3.00/h, for 3h50m)" in text


def test_without_gpus_the_cost_line_says_so(report):
    report.reset()
    report.log("Tokenizer training", [{"x": 1}])
    if "Hourly cost estimate" not in Path(report.report_dir, "header.md").read_text():
        assert "Estimated cost: - (no GPUs in this run)" in open(report.generate(), encoding="utf-8").read()
