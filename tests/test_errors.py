"""User mistakes, as a user meets them: every script, run as a subprocess, answers a mistyped setting, a bad value
and a missing tokenizer/checkpoint/data with exactly one line containing `error: ` on stderr, no traceback, and a
non-zero exit. Also: the pipelines (speedrun.sh, run1000.sh, dev/runcpu.sh) pass only settings their stage scripts
know, so a renamed setting breaks a test here instead of hour three of a speedrun. Scripts not written yet are
skipped."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model_setup import make_chat_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

# script: (a mistyped setting, (a bad value, the checkpoint source it needs first or None, text the error names),
#          arguments that get as far as the missing tokenizer/checkpoint/data in an empty base dir)
CASES = {
    "tok_train": ("--vocab_sise=1024", ("--vocab_size=100", None, "vocab_size=100"), []),
    "tok_eval": ("--num_doc=5", ("--num_docs=-1", None, "num_docs=-1"), []),
    "base_train": ("--dept=4", ("--total_batch_size=1000", "base", "total_batch_size=1,000"), ["--depth=2"]),
    "base_loss": ("--split_token=1", ("--split_tokens=1", "base", "split_tokens=1"), []),
    "base_eval": ("--max_per_tsk=5", ("--bundle_dir=/nonexistent/bundle", "base", "bundle_dir='/nonexistent/bundle'"), []),
    "chat_eval": ("-i sft --sorce=sft", ("-i sft -a Nonsense", None, "Nonsense"), ["-i", "sft"]),
    "chat_cli": ("--temprature=0.5", ("-t -1", None, "temperature=-1"), ["-p", "hello"]),
    "mid_train": ("--device_batch=2", ("--warmdown_ratio=2.0", None, "warmdown_ratio=2.0"), []),
    "chat_sft": ("--num_iteration=2", ("--source=rl", None, "source=rl"), []),
    "chat_rl": ("--tsk=GSM8K", ("--task=MATH", None, "task=MATH"), []),
    "chat_web": ("--prot=8000", ("--num_gpus=2 --device_type=cpu", None, "num_gpus=2"), ["--device_type=cpu"]),
}
# What the missing-file message must name: the thing missing, and the command that makes it
MISSING = {
    "tok_train": "nanochat.dataset", "tok_eval": "nanochat.dataset", "base_train": "scripts.tok_train",
    "base_loss": "scripts.base_train", "base_eval": "scripts.base_train", "chat_eval": "scripts.chat_sft",
    "chat_cli": "scripts.chat_sft", "mid_train": "scripts.base_train", "chat_sft": "scripts.mid_train",
    "chat_rl": "scripts.chat_sft", "chat_web": "scripts.chat_sft",
}


def run_script(name, args, base_dir, timeout=300):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "NANOCHAT_DATA_DIR": str(base_dir / "no_tasks"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", f"scripts.{name}", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(result, *needles):
    error_lines = [line for line in result.stderr.splitlines() if "error: " in line]
    assert result.returncode != 0, f"exit 0; stderr:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(error_lines) == 1, f"expected one error line, got {error_lines}\n{result.stderr[-2000:]}"
    for needle in needles:
        assert needle in error_lines[0], f"{needle!r} not in {error_lines[0]!r}"
    return error_lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_mistyped_setting_is_one_error_line(name, tmp_path):
    args = CASES[name][0].split()
    result = run_script(name, args, tmp_path / "base")
    assert_one_error_line(result, args[-1].split("=")[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_value_is_one_error_line_naming_it(name, tmp_path):
    args, source, needle = CASES[name][1]
    base_dir = tmp_path / "base"
    if source is not None:
        make_chat_checkpoint(base_dir, source=source, model_tag="d2")
    result = run_script(name, args.split(), base_dir)
    assert_one_error_line(result, needle)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_missing_tokenizer_checkpoint_or_data_is_one_error_line_naming_the_fix(name, tmp_path):
    result = run_script(name, CASES[name][2], tmp_path / "empty_base")
    assert_one_error_line(result, MISSING[name])


def test_a_quick_sample_of_the_above_runs_in_every_suite(tmp_path):
    # the slow matrix above is the full story; this one case keeps the mechanism covered in a `-m "not slow"` run
    result = run_script("base_loss", [], tmp_path / "empty_base")
    assert_one_error_line(result, "scripts.base_train")


def test_a_real_bug_still_shows_its_traceback(tmp_path):
    code = "import nanochat.common\nraise KeyError('a bug, not a user mistake')"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" in result.stderr and "KeyError" in result.stderr


# -----------------------------------------------------------------------------
# The pipelines pass only settings their stage scripts know

PIPELINES = ["speedrun.sh", "dev/runcpu.sh"]  # run1000.sh runs speedrun.sh with its own numbers (test_speedrun.py)


def script_settings(name):
    """The `--name` flags a script accepts: configure()-style settings (module-level `name = value` lines above the
    configure call) and argparse options."""
    source = (REPO_ROOT / "scripts" / f"{name}.py").read_text(encoding="utf-8")
    settings_block = source.split("configure(globals())")[0]
    flags = {f"--{m}" for m in re.findall(r"^\s*([a-z_][a-z0-9_]*) = ", settings_block, re.M)}
    for options in re.findall(r"add_argument\(([^)]*)\)", source):
        flags |= set(re.findall(r"""["'](-{1,2}[a-zA-Z][\w-]*)["']""", options))
    return flags


def stage_commands(path):
    """(script name, [flags]) for every `-m scripts.X ...` in a shell script (line continuations joined)."""
    text = (REPO_ROOT / path).read_text(encoding="utf-8").replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #")[0]
        for match in re.finditer(r"-m scripts\.(\w+)((?:\s+(?:--|-\w|--?[\w-]+(?:=\S*)?|\"[^\"]*\"|'[^']*'|[^\s;&|]+))*)", line):
            flags = re.findall(r"(?:^|\s)(--?[a-zA-Z][\w-]*)", match.group(2))
            commands.append((match.group(1), flags))
    return commands


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_pipelines_pass_only_settings_the_stage_scripts_know(pipeline):
    commands = stage_commands(pipeline)
    assert commands, f"no `-m scripts.X` stages found in {pipeline}"
    for name, flags in commands:
        assert (REPO_ROOT / "scripts" / f"{name}.py").exists(), f"{pipeline} runs scripts.{name}, which does not exist"
        unknown = [flag for flag in flags if flag not in script_settings(name)]
        assert not unknown, f"{pipeline}: scripts.{name} does not know {unknown}"
