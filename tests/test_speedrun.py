"""speedrun.sh and run1000.sh. The CUDA check they run after set-up (nanochat.common.check_cuda and `python -m
nanochat.common`): before a GPU run spends money it stops with one clear error when CUDA cannot do the job, and lets
a CPU run through only when asked. No GPU is needed: the CUDA facts (torch's build, the driver's version,
torch.cuda's answers) are simulated. And the two tiers are one pipeline: run1000.sh only changes its numbers."""

import ctypes
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nanochat.common as common
from nanochat.common import DriverTooOld, UserError, check_cuda

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def machine(monkeypatch):
    """A simulated machine: torch built for CUDA 13.2, a driver for 13.2, eight H100s. Tests change one fact."""
    facts = {"torch_cuda": "13.2", "driver": (13, 2), "init_error": None, "gpus": 8}

    def init():
        if facts["init_error"]:
            raise RuntimeError(facts["init_error"])

    monkeypatch.setattr(torch, "__version__", "2.15.0+cu132")
    monkeypatch.setattr(common, "cuda_driver_version", lambda: facts["driver"])
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: facts["gpus"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "NVIDIA H100 80GB HBM3")

    def set_facts(**changes):
        facts.update(changes)
        monkeypatch.setattr(torch.version, "cuda", facts["torch_cuda"])

    set_facts()
    return set_facts


def test_a_working_machine_passes_with_a_line_naming_the_gpus(machine):
    line = check_cuda("cuda", 8)
    assert line.startswith("CUDA works: 8 GPU(s), NVIDIA H100 80GB HBM3, driver CUDA 13.2, torch 2.15.0+cu132")


def test_fewer_gpus_than_the_run_needs_is_refused_with_both_counts(machine, monkeypatch):
    machine(gpus=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(UserError, match=r"needs 8 GPUs \(NPROC_PER_NODE=8\) but torch sees 4 "
                                        r"\(CUDA_VISIBLE_DEVICES=0,1,2,3\): set NPROC_PER_NODE=4"):
        check_cuda("cuda", 8)
    assert check_cuda("cuda", 4).startswith("CUDA works: 4 GPU(s)")


def test_no_driver_means_no_gpu_and_names_the_cpu_switch(machine):
    machine(driver=None)
    with pytest.raises(UserError, match=r"no GPU: .*libcuda.so.1.*--device_type=cpu"):
        check_cuda("cuda", 1)


def test_a_torch_built_without_cuda_is_refused(machine):
    machine(torch_cuda=None)
    with pytest.raises(UserError, match=r"torch 2.15.0\+cu132 is a build without CUDA: `uv sync --frozen`"):
        check_cuda("cuda", 1)


def test_a_driver_older_than_the_torch_build_gets_the_command_for_the_matching_build(machine):
    machine(driver=(13, 0), init_error="The NVIDIA driver on your system is too old (found version 13000).")
    with pytest.raises(DriverTooOld) as refused:
        check_cuda("cuda", 8)
    command = ["uv", "pip", "install", "--reinstall-package", "torch", "torch==2.15.0+cu130",
               "--index-url", "https://download.pytorch.org/whl/cu130"]
    assert refused.value.command == command
    message = str(refused.value)
    assert "supports CUDA up to 13.0, older than the CUDA 13.2 this torch 2.15.0+cu132 was built for" in message
    assert " ".join(command) in message


def test_cuda_failing_with_a_new_enough_driver_reports_torchs_own_words(machine):
    machine(init_error="CUDA error: out of memory\nmore details")
    with pytest.raises(UserError, match=r"CUDA does not start \(torch 2.15.0\+cu132 built for CUDA 13.2, driver "
                                        r"supports 13.2\): CUDA error: out of memory") as refused:
        check_cuda("cuda", 1)
    assert not isinstance(refused.value, DriverTooOld)


def test_a_cpu_run_goes_through_only_when_asked(machine):
    machine(driver=None, torch_cuda=None, gpus=0)
    assert check_cuda("cpu", 8) == "device_type=cpu, as asked: 8 process(es) on the CPU, no GPU used"
    with pytest.raises(UserError, match="no GPU|without CUDA"):
        check_cuda("cuda", 8)
    with pytest.raises(UserError, match=r"device_type='mps': expected cuda, or cpu"):
        check_cuda("mps", 1)


def test_the_driver_version_is_read_from_the_driver_library(monkeypatch):
    class Libcuda:
        def cuDriverGetVersion(self, version):
            version._obj.value = 12080
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libcuda())
    assert common.cuda_driver_version() == (12, 8)

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert common.cuda_driver_version() is None


@pytest.mark.filterwarnings("ignore:'nanochat.common' found in sys.modules")  # runpy runs the imported module anew
def test_the_entry_installs_the_matching_build_then_checks_again_in_a_fresh_process(monkeypatch, capsys):
    class Libcuda:  # the entry runs the module afresh, so the driver is simulated at the ctypes level
        def cuDriverGetVersion(self, version):
            version._obj.value = 13000
            return 0

    def init():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 13000).")

    class ExecvCalled(Exception):
        pass

    def execv(path, argv):
        raise ExecvCalled(argv)

    installs = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libcuda())
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    monkeypatch.setattr(torch, "__version__", "2.15.0+cu132")
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(subprocess, "run", lambda command, check: installs.append(command))
    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setattr(sys, "argv", ["common.py", "--nproc_per_node=8", "--install_torch"])
    with pytest.raises(ExecvCalled) as rerun:
        runpy.run_module("nanochat.common", run_name="__main__")
    assert installs == [["uv", "pip", "install", "--reinstall-package", "torch", "torch==2.15.0+cu130",
                         "--index-url", "https://download.pytorch.org/whl/cu130"]]
    assert rerun.value.args[0][1:] == ["-m", "nanochat.common", "--device_type=cuda", "--nproc_per_node=8"]
    assert "installing it now" in capsys.readouterr().out


def test_the_entry_prints_one_error_line_without_a_gpu_and_passes_a_cpu_run():
    # this machine has no NVIDIA driver (the test suite runs on CPUs); CUDA_VISIBLE_DEVICES="" hides any GPU
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    refused = subprocess.run([sys.executable, "-m", "nanochat.common", "--nproc_per_node=2"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), refused.stderr
    passed = subprocess.run([sys.executable, "-m", "nanochat.common", "--device_type=cpu", "--nproc_per_node=2"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.strip() == "device_type=cpu, as asked: 2 process(es) on the CPU, no GPU used"


# -----------------------------------------------------------------------------
# The two tiers are one pipeline


def test_run1000_is_speedrun_with_its_own_numbers():
    wrapper = (REPO_ROOT / "run1000.sh").read_text(encoding="utf-8")
    pipeline = (REPO_ROOT / "speedrun.sh").read_text(encoding="utf-8")
    settings = dict(re.findall(r"(\w+)=(\S+)", re.search(r"^export (.+)$", wrapper, re.M).group(1)))
    assert settings["DEPTH"] == "32" and settings["DEVICE_BATCH_SIZE"] == "8"
    for name, value in settings.items():
        if name == "PIPELINE":
            continue
        default = re.search(rf'^{name}="\$\{{{name}:-(\S+)\}}"', pipeline, re.M)
        assert default, f"run1000.sh sets {name}, which speedrun.sh does not read as a setting"
        assert default.group(1) != value, f"{name}={value} is already speedrun.sh's default"
    assert re.search(r'^exec bash "\$\(dirname "\$0"\)/speedrun.sh" "\$@"$', wrapper, re.M)


@pytest.mark.parametrize("script", ["speedrun.sh", "run1000.sh"])
def test_an_unknown_argument_stops_the_pipeline_before_any_set_up(script, tmp_path):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "never")}
    result = subprocess.run(["bash", script, "--device_type=mps"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip() == (f"error: {script}: unknown argument '--device_type=mps'; the one argument is "
                                     "--device_type=cpu (to run without a GPU); settings come from the environment "
                                     "(see the top of speedrun.sh)")
    assert not (tmp_path / "never").exists()
