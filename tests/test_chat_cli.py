"""scripts/chat_cli.py as a user runs it: one-shot -p on a tiny checkpoint, an interactive session driven through
stdin (clear, quit), --help, and one `error:` line (no traceback) when there is no checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

from model_setup import make_chat_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(base_dir, *args, stdin=""):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "scripts.chat_cli", *args], cwd=REPO_ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_one_shot_prompt_prints_a_reply_and_exits(isolated_base_dir):
    make_chat_checkpoint(isolated_base_dir, source="sft", model_tag="d2")
    result = run_cli(isolated_base_dir, "-p", "Hello there", "-t", "0.5", "-k", "5", "-m", "12", "--device_type=cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Assistant: ")
    assert len(result.stdout.strip()) > len("Assistant:")  # a random model still says something
    assert "Traceback" not in result.stderr


def test_interactive_session_with_clear_and_quit(isolated_base_dir):
    make_chat_checkpoint(isolated_base_dir, source="rl", model_tag="d2", step=3)
    result = run_cli(isolated_base_dir, "--source=rl", "--model_tag=d2", "--step=3", "--temperature=0",
                     "--max_tokens=8", "--device_type=cpu", stdin="hi\nhow are you?\nclear\nagain\nquit\nnever read\n")
    assert result.returncode == 0, result.stderr
    assert "step 3" in result.stdout
    assert result.stdout.count("Assistant: ") == 3
    assert "(new conversation)" in result.stdout


def test_help_lists_the_flags(isolated_base_dir):
    result = run_cli(isolated_base_dir, "--help")
    assert result.returncode == 0
    for flag in ("--source", "--model_tag", "--step", "--prompt", "--temperature", "--top_k", "--max_tokens",
                 "--device_type"):
        assert flag in result.stdout


def test_missing_checkpoint_is_one_error_line(isolated_base_dir):
    result = run_cli(isolated_base_dir, "-p", "hi", "--device_type=cpu")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sft" in errors[0]
    assert "Traceback" not in result.stderr


def test_bad_temperature_is_one_error_line(isolated_base_dir):
    result = run_cli(isolated_base_dir, "-p", "hi", "-t", "-1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --temperature=-1.0")
