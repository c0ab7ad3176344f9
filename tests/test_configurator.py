import subprocess
import sys

import pytest

from nanochat.configurator import ConfigError, configure, parse_overrides

SETTINGS = {"depth": 20, "matrix_lr": 0.02, "run": "dummy", "compile": True}


def test_override_parses_literals_by_default_type():
    assert parse_overrides(SETTINGS, ["--depth=4", "--matrix_lr=0.05", "--compile=False"]) == {
        "depth": 4, "matrix_lr": 0.05, "compile": False}


def test_int_is_accepted_for_float_setting():
    assert parse_overrides(SETTINGS, ["--matrix_lr=1"]) == {"matrix_lr": 1.0}
    assert type(parse_overrides(SETTINGS, ["--matrix_lr=1"])["matrix_lr"]) is float


def test_str_setting_takes_raw_text():
    assert parse_overrides(SETTINGS, ["--run=my run 1"]) == {"run": "my run 1"}


def test_torchrun_separator_is_skipped():
    assert parse_overrides(SETTINGS, ["--", "--depth=2"]) == {"depth": 2}


def test_unknown_setting_suggests_close_match_and_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown setting --dept\. Did you mean --depth\? Valid settings: compile, depth"):
        parse_overrides(SETTINGS, ["--dept=4"])


def test_wrong_type_names_value_and_expected_type():
    with pytest.raises(ConfigError, match=r"--depth=4.5: expected a int like 20, got float"):
        parse_overrides(SETTINGS, ["--depth=4.5"])
    with pytest.raises(ConfigError, match=r"--compile=1: expected a bool"):
        parse_overrides(SETTINGS, ["--compile=1"])


def test_non_literal_is_rejected():
    with pytest.raises(ConfigError, match="not a Python literal"):
        parse_overrides(SETTINGS, ["--depth=four"])


def test_malformed_argument_is_rejected():
    with pytest.raises(ConfigError, match="expected --name=value"):
        parse_overrides(SETTINGS, ["depth=4"])


def test_configure_updates_globals_and_returns_all_settings():
    script_globals = {"__doc__": "doc", "depth": 20, "run": "dummy", "_private": 1, "sys": sys, "REPO_ROOT": "/x"}
    config = configure(script_globals, ["--depth=3"])
    assert script_globals["depth"] == 3
    assert config == {"depth": 3, "run": "dummy"}


def test_help_and_errors_from_a_real_script(tmp_path):
    script = tmp_path / "script.py"
    script.write_text('"""Trains a thing. Usage: python script.py --depth=4"""\n'
                      "depth = 20\nlr = 0.1\n"
                      "from nanochat.configurator import configure\nconfig = configure(globals())\nprint(config)\n",
                      encoding="utf-8")
    run = lambda *args: subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                                       cwd=str(tmp_path), env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[1])})
    out = run("--help")
    assert out.returncode == 0 and "Trains a thing" in out.stdout and "--depth = 20" in out.stdout
    out = run("--lr=abc")
    assert out.returncode == 2 and "error: --lr=abc: not a Python literal" in out.stderr
    out = run("--depth=5")
    assert out.returncode == 0 and "{'depth': 5, 'lr': 0.1}" in out.stdout
