"""dev/gpu_check.sh end to end on the CPU (--dry_run): every step of the GPU check runs with tiny sizes and the one
JSON summary it prints (and writes to $OUT) says so. The real run needs a GPU; this keeps the script working."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_goes_through_every_step_and_prints_one_json_summary(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "dev/gpu_check.sh", "--dry_run"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    steps = summary["steps"]
    assert list(steps) == ["environment", "data", "tokenizer", "cuda_tests", "base_train", "engine", "chat_web"]
    assert summary["failed"] == [] and summary["ok"] is True, json.dumps(steps, indent=1)[-3000:]
    assert steps["tokenizer"]["vocab_size"] == 512
    assert steps["cuda_tests"]["builtin"]["ok"] is True
    train = steps["base_train"]
    assert train["steps_logged"] == 12 and train["tok_per_s_median"] > 0 and train["mfu_percent_median"] > 0
    assert train["loss_first_last"][1] < train["loss_first_last"][0]
    assert steps["engine"]["batch16"]["tokens"] > 0
    if steps["chat_web"]["status"] == "ok":
        assert steps["chat_web"]["native_stream"]["done"] is True
    assert "===== base_train.log" in (tmp_path / "out" / "gpu_check_logs.txt").read_text()


def test_a_missing_gpu_is_a_recorded_failure_not_a_crash(tmp_path):
    # without --dry_run on a machine with no GPU: the environment step fails, the rest still run or are skipped,
    # and the summary names what failed
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "dev/gpu_check.sh", "--budget_s=0"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"]["environment"]["status"] == "failed"
    assert "no CUDA GPU" in summary["steps"]["environment"]["error"]
    assert all(step["status"] == "skipped" for name, step in summary["steps"].items() if name != "environment")
    assert summary["ok"] is False and summary["failed"] == ["environment"]
