"""Shared test set-up: every test gets its own empty NANOCHAT_BASE_DIR, and the real data under
../shared/data (beside the repo) is reachable through the `shared_data` fixture."""

from pathlib import Path

import pytest

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
