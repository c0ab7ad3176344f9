"""Runs scripts.tok_train and scripts.tok_eval the way a user does (subprocesses, a fresh base dir holding the
embedded corpus), and checks what they write and print, including their --help and bad-setting errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.tokenizer import SPECIAL_TOKENS, RustBPETokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TIKTOKEN = REPO_ROOT.parent / "shared" / "data" / "tiktoken"
SHIPPED_TIKTOKEN = REPO_ROOT / "data" / "tiktoken"
# any download through requests fails at once: nothing listens on port 9 (discard) of this host
NO_NETWORK = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
              "http_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


def run(module, *args, env):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("tok_scripts") / "base"
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    for module, args in (("nanochat.dataset", ["--embedded"]),
                         ("scripts.tok_train", ["--max_chars=3000000", "--vocab_size=1024"])):
        result = run(module, *args, env=env)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return base_dir, env, result.stdout


def test_tok_train_saves_a_loadable_tokenizer_with_token_bytes(trained):
    base_dir, _, stdout = trained
    tokenizer = RustBPETokenizer.from_directory(str(base_dir / "tokenizer"))
    assert tokenizer.get_vocab_size() == 1024
    token_bytes = torch.load(base_dir / "tokenizer" / "token_bytes.pt", weights_only=True)
    assert token_bytes.shape == (1024,)
    assert token_bytes[-len(SPECIAL_TOKENS):].eq(0).all() and token_bytes[:256].eq(1).all()
    assert "train_chars: 3,00" in stdout or "train_chars: 300" in stdout  # stops at max_chars (+ one document)


def test_tok_train_writes_its_report_section(trained):
    base_dir, _, _ = trained
    section = (base_dir / "report" / "tokenizer-training.md").read_text()
    assert section.startswith("## Tokenizer training")
    assert "- vocab_size: 1024" in section.replace(",", "")


def test_the_shipped_rank_files_are_tiktokens_own():
    import hashlib

    expected = {"r50k_base": "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
                "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"}
    for name, digest in expected.items():
        assert hashlib.sha256((SHIPPED_TIKTOKEN / f"{name}.tiktoken").read_bytes()).hexdigest() == digest
        assert digest in (SHIPPED_TIKTOKEN / "README.md").read_text()
    assert "MIT License" in (SHIPPED_TIKTOKEN / "README.md").read_text()


def test_tok_eval_compares_with_gpt2_and_gpt4_from_the_shipped_files_without_network(trained, tmp_path):
    base_dir, env, _ = trained
    env = {k: v for k, v in env.items() if k != "NANOCHAT_TIKTOKEN_DIR"}
    env.update(NO_NETWORK, TIKTOKEN_CACHE_DIR=str(tmp_path / "cache"))
    result = run("scripts.tok_eval", "--num_docs=5", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Compression vs gpt2" in result.stdout and "Compression vs gpt4" in result.stdout
    assert "warning" not in result.stdout
    assert "gpt2 50,257" in result.stdout and "gpt4 100,277" in result.stdout
    for text in ("news", "korean", "code", "math", "science", "train", "val"):
        assert f"| {text} |" in result.stdout
    section = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "### Our tokenizer" in section
    assert "### Comparison with GPT-2" in section and "### Comparison with GPT-4" in section


@pytest.mark.skipif(not SHARED_TIKTOKEN.is_dir(), reason=f"GPT-2/GPT-4 rank files not found at {SHARED_TIKTOKEN}")
def test_tok_eval_reads_the_rank_files_from_nanochat_tiktoken_dir(trained, tmp_path):
    _, env, _ = trained
    env = {**env, **NO_NETWORK, "NANOCHAT_TIKTOKEN_DIR": str(SHARED_TIKTOKEN), "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache")}
    result = run("scripts.tok_eval", "--num_docs=5", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Compression vs gpt2" in result.stdout and "Compression vs gpt4" in result.stdout


def test_tok_eval_without_the_rank_files_still_evaluates_ours(trained, tmp_path):
    base_dir, env, _ = trained
    empty = tmp_path / "no_rank_files"
    empty.mkdir()
    env = {**env, **NO_NETWORK, "NANOCHAT_TIKTOKEN_DIR": str(empty), "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache")}
    result = run("scripts.tok_eval", "--num_docs=5", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "warning: skipping the gpt2 comparison" in result.stdout
    assert "warning: skipping the gpt4 comparison" in result.stdout
    assert "ours 1,024" in result.stdout
    assert "Our tokenizer (1,024 tokens)" in result.stdout and "| news |" in result.stdout
    section = (base_dir / "report" / "tokenizer-evaluation.md").read_text()
    assert "### Our tokenizer" in section and "| val |" in section
    assert "Comparison with" not in section and "- baselines: none" in section


@pytest.mark.parametrize("module", ["scripts.tok_train", "scripts.tok_eval", "scripts.base_train",
                                    "scripts.base_loss"])
def test_help_lists_the_settings(module):
    result = run(module, "--help", env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "=" in result.stdout and "Usage" in result.stdout


def test_a_bad_setting_is_a_clear_error():
    result = run("scripts.tok_train", "--vocab_size=big", env=dict(os.environ))
    assert result.returncode != 0
    assert "vocab_size" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("module, arg, expected", [
    ("scripts.tok_train", "--vocab_size=100", "vocab_size=100 is too small"),
    ("scripts.tok_train", "--max_chars=0", "--max_chars=0: must be positive"),
    ("scripts.tok_eval", "--num_docs=-1", "--num_docs=-1: must be >= 0"),
])
def test_a_bad_value_is_one_error_line(trained, module, arg, expected):
    _, env, _ = trained
    result = run(module, arg, env=env)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stderr
