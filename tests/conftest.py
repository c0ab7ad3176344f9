"""Shared test set-up: every test gets its own empty NANOCHAT_BASE_DIR, the real data under ../shared/data (beside
the repo) is reachable through the `shared_data` fixture, and the model tests put their tensors on `device`."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def isolated_base_dir(tmp_path, monkeypatch):
    base_dir = tmp_path / "nanochat_base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    return base_dir


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def device():
    """Where the model tests put models and tensors: NANOCHAT_TEST_DEVICE (dev/gpu_check.sh sets cuda to run them on
    the GPU), else the CPU. Asking for a device that is not there fails the test rather than quietly using the CPU."""
    device = torch.device(os.environ.get("NANOCHAT_TEST_DEVICE") or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"NANOCHAT_TEST_DEVICE={device} but torch sees no CUDA GPU")
    return device


def pytest_collection_modifyitems(config, items):
    """With NANOCHAT_TEST_DEVICE set, run only the tests that use `device`: the rest would only repeat CPU tests."""
    if os.environ.get("NANOCHAT_TEST_DEVICE"):
        deselected = [item for item in items if "device" not in getattr(item, "fixturenames", ())]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if "device" in getattr(item, "fixturenames", ())]
