"""Shared test set-up: every test gets its own empty NANOCHAT_BASE_DIR, the real data under ../shared/data (beside
the repo) is reachable through the `shared_data` fixture, the model tests put their tensors on `device`, and
`compute_dtype` / `one_thread` set how a test's model computes."""

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


@pytest.fixture
def compute_dtype(monkeypatch):
    """A setter for the dtype the model computes in, for one test. COMPUTE_DTYPE is fixed at import (bf16 on CPUs with
    native bf16) and each module that uses it holds its own copy, so every copy is switched; call it before building
    the model (the rotary tables and the KV cache take it at construction)."""
    import nanochat.engine
    import nanochat.gpt
    import nanochat.optim

    def set_compute_dtype(dtype):
        for module in (nanochat.gpt, nanochat.engine, nanochat.optim):
            monkeypatch.setattr(module, "COMPUTE_DTYPE", dtype)
    return set_compute_dtype


@pytest.fixture
def fp32(compute_dtype):
    """The model in fp32: the exactness tests compare batched with one-row results, which bf16 rounds apart."""
    compute_dtype(torch.float32)


@pytest.fixture
def one_thread():
    """One torch thread: tiny models gain nothing from a thread pool, and on a busy 2-core machine its spinning costs
    seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """With NANOCHAT_TEST_DEVICE set, run only the tests that use `device`: the rest would only repeat CPU tests."""
    if os.environ.get("NANOCHAT_TEST_DEVICE"):
        deselected = [item for item in items if "device" not in getattr(item, "fixturenames", ())]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if "device" in getattr(item, "fixturenames", ())]
