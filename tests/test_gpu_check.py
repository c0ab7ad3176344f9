"""dev/gpu_check.sh on the CPU. --dry_run runs every stage of the GPU check (the miniature speedrun, the model tests,
the measurements) at tiny sizes, so the script is known to work before a GPU is lent; the other tests check what a
failure looks like: a missing GPU, a failing stage, a spent time budget. tests/test_e2e.py covers the pipeline's
quality (dev/runcpu.sh); these check the GPU check itself."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ["environment", "data", "tokenizer", "perf_tokenizer", "base_train", "model_tests", "base_loss", "base_eval",
          "mid_train", "chat_eval_mid", "chat_sft", "chat_eval_sft", "chat_web", "chat_rl", "chat_eval_rl", "report",
          "d12_mfu", "d20_memory", "engine"]


def gpu_check(tmp_path, *args, env=None):
    """Run dev/gpu_check.sh; returns (exit status, the summary from its last line, all output)."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(["bash", "dev/gpu_check.sh", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=4000)  # ends only a check that hangs: its budget is the limit
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    return result.returncode, summary, result.stdout + result.stderr


@pytest.mark.slow
def test_the_dry_run_goes_through_every_stage_and_prints_one_json_summary(tmp_path):
    # the 8 minutes are a GPU's budget; on a CPU under load the dry run may take longer, and that is no failure
    code, summary, output = gpu_check(tmp_path, "--dry_run", "--budget_s=3600")
    stages = summary["stages"]
    assert code == 0 and summary["ok"], json.dumps(stages, indent=1)[-4000:]
    assert list(stages) == STAGES and all(stage["status"] == "ok" for stage in stages.values())
    assert summary["dry_run"] is True and summary["failed"] == summary["skipped"] == summary["out_of_time"] == []
    environment = stages["environment"]
    assert environment["check_cuda"].startswith("device_type=cpu, as asked")
    assert environment["imports"]["nanochat.server"] == "ok" and environment["why_this_python"]
    assert stages["tokenizer"] == {**stages["tokenizer"], "vocab_size": 512, "kind": "tok_train"}
    train = stages["base_train"]
    assert train["steps"] == 12 and train["loss_first_last"][1] < train["loss_first_last"][0]
    assert train["tok_per_s_median"] > 0 and train["mfu_percent_median"] > 0 and "val_bpb" in train
    assert stages["base_loss"]["val_bpb"] > 0 and stages["base_eval"]["label"] == "CORE over 3 of 22 tasks"
    for source in ("mid", "sft", "rl"):  # the six ChatCORE tasks after each stage
        assert len(stages[f"chat_eval_{source}"]["tasks"]) == 6 and "chatcore" in stages[f"chat_eval_{source}"]
    web = stages["chat_web"]
    assert web["openai"]["completion_tokens"] >= 1 and web["openai_stream"]["chunks"] >= 2
    assert web["native_stream_events"] >= 2
    assert stages["model_tests"]["passed"] >= 2
    for name in ("d12_mfu", "d20_memory"):
        assert stages[name]["steps"] >= 3 and stages[name]["peak_memory"].endswith("(process RSS)")
    assert stages["engine"]["command"].startswith("python -m dev.bench.engine --depths=2")
    assert stages["engine"]["results"][0]["batches"]["1"]["tokens_per_s"] > 0
    logs = (tmp_path / "out" / "gpu_check_logs.txt").read_text()
    for name in ("base_train", "mid_train", "chat_web", "d20", "engine"):
        assert f"===== {name}.log" in logs
    assert "start d20_memory (alone)" in output


def test_a_failing_stage_is_named_with_its_log_and_the_exit_status_is_1(tmp_path):
    # base_train alone in an empty work directory: there is no tokenizer to train with
    code, summary, _ = gpu_check(tmp_path, "--dry_run", f"--work_dir={tmp_path / 'work'}", "--stages=base_train")
    assert code == 1 and summary["ok"] is False and summary["failed"] == ["base_train"]
    failed = summary["stages"]["base_train"]
    assert "tokenizer" in failed["error"] and failed["log"] == "base_train.log"
    assert summary["logs"] == str(tmp_path / "work" / "logs")  # kept: --work_dir is never removed
    assert "tokenizer" in (tmp_path / "work" / "logs" / "base_train.log").read_text()
    assert "===== base_train.log" in (tmp_path / "out" / "gpu_check_logs.txt").read_text()
    assert {summary["stages"][name]["why"] for name in STAGES if name != "base_train"} == {"not selected"}


def test_without_a_gpu_the_environment_stage_fails_and_nothing_else_runs(tmp_path):
    code, summary, _ = gpu_check(tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    environment = summary["stages"]["environment"]
    assert code == 1 and summary["failed"] == ["environment"]
    assert "no GPU" in environment["error"] or "CUDA" in environment["error"], environment
    assert summary["skipped"] == STAGES[1:]
    assert summary["stages"]["data"]["why"] == "needs environment"


def test_no_stage_starts_once_the_time_budget_is_spent(tmp_path):
    code, summary, _ = gpu_check(tmp_path, "--dry_run", "--budget_s=0")
    assert code == 1 and summary["out_of_time"] == STAGES
    assert {stage["why"] for stage in summary["stages"].values()} == {"the time was up before it could start"}
