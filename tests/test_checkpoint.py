"""nanochat/checkpoint_manager.py: file layout, round trips, atomicity (a process killed mid-save leaves the
previous checkpoint loadable and nothing that looks complete), discovery, and loading a real GPT back."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nanochat.checkpoint_manager import (build_model, checkpoints_root, find_largest_model, find_last_step,
                                         load_checkpoint, load_model, save_checkpoint)
from pretraining_setup import REPO_ROOT, install_tokenizer


def tiny_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()  # so the optimizer has state (exp_avg, exp_avg_sq, step)
    return model, optimizer


def save_tiny(checkpoint_dir, step, meta=None):
    model, optimizer = tiny_model_and_optimizer()
    save_checkpoint(str(checkpoint_dir), step, model.state_dict(), [optimizer.state_dict()], meta or {"step": step})
    return model, optimizer


def test_save_writes_model_optimizer_and_meta_files_named_by_step_and_rank(tmp_path):
    save_tiny(tmp_path / "d2", 5)
    assert sorted(os.listdir(tmp_path / "d2")) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]


def test_load_returns_what_was_saved(tmp_path):
    model, optimizer = save_tiny(tmp_path, 7, meta={"step": 7, "loop_state": {"smooth_train_loss": 0.1 + 0.2}})
    model_data, optimizer_data, meta = load_checkpoint(str(tmp_path), 7, "cpu", load_optimizer=True)
    assert model_data.keys() == model.state_dict().keys()
    assert all(torch.equal(model_data[k], v) for k, v in model.state_dict().items())
    saved_state = optimizer.state_dict()["state"]
    assert all(torch.equal(optimizer_data[0]["state"][i][k], saved_state[i][k]) for i in saved_state for k in saved_state[i])
    assert meta == {"step": 7, "loop_state": {"smooth_train_loss": 0.30000000000000004}}  # floats round-trip exactly


def test_load_without_optimizer_skips_the_optimizer_file(tmp_path):
    save_tiny(tmp_path, 3)
    os.remove(tmp_path / "optim_000003_rank0.pt")
    _, optimizer_data, _ = load_checkpoint(str(tmp_path), 3, "cpu")
    assert optimizer_data is None


def test_missing_optimizer_shard_of_a_rank_is_a_clear_error(tmp_path):
    save_tiny(tmp_path, 3, meta={"step": 3, "world_size": 1})
    with pytest.raises(FileNotFoundError, match=r"optim_000003_rank1\.pt is missing.*same number of ranks"):
        load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True, rank=1)


class TouchOnUnpickle:
    """A pickled object that runs code when unpickled: it creates the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_loading_weights_runs_no_pickled_code(tmp_path):
    save_tiny(tmp_path, 1)
    torch.save({"weight": torch.zeros(2), "payload": TouchOnUnpickle(tmp_path / "pwned")}, tmp_path / "model_000001.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_checkpoint(str(tmp_path), 1, "cpu")
    assert not (tmp_path / "pwned").exists()


def test_find_last_step_counts_only_checkpoints_whose_meta_exists(tmp_path):
    save_tiny(tmp_path, 4)
    save_tiny(tmp_path, 12)
    os.remove(tmp_path / "meta_000012.json")  # as if killed before the meta was written
    (tmp_path / "model_000020.pt.tmp999").write_bytes(b"half a file")
    assert find_last_step(str(tmp_path)) == 4
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint for step 12.*complete steps there: \[4\]"):
        load_checkpoint(str(tmp_path), 12, "cpu")


def test_find_last_step_in_an_empty_directory_lists_what_is_there(tmp_path):
    (tmp_path / "model_000001.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint.*model_000001\.pt"):
        find_last_step(str(tmp_path))


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    from nanochat import checkpoint_manager

    checkpoint_dir, target = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(64, 64)
    checkpoint_manager.save_checkpoint(checkpoint_dir, 1, model.state_dict(), [{"state": {}}], {"step": 1})
    real_fsync = os.fsync

    def fsync_then_die(fd):  # the file is written but not yet renamed into place: the worst moment to die
        real_fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(target):
            os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = fsync_then_die
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpoint_manager.save_checkpoint(checkpoint_dir, 2, model.state_dict(), [{"state": {}}], {"step": 2})
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to find the file being written")
@pytest.mark.parametrize("target", ["optim_000002", "model_000002", "meta_000002"])
def test_sigkill_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, target):
    result = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path), target], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == -9, result.stderr
    assert not (tmp_path / "meta_000002.json").exists()
    assert any(name.startswith(target) and ".tmp" in name for name in os.listdir(tmp_path))  # it really died mid-write
    assert find_last_step(str(tmp_path)) == 1
    model_data, _, meta = load_checkpoint(str(tmp_path), 1, "cpu", load_optimizer=True)
    assert meta == {"step": 1} and model_data["weight"].shape == (64, 64)


def test_checkpoint_directories_per_source(isolated_base_dir):
    roots = {source: os.path.relpath(checkpoints_root(source), isolated_base_dir) for source in ("base", "mid", "sft", "rl")}
    assert roots == {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
                     "rl": "chatrl_checkpoints"}
    with pytest.raises(ValueError, match="source='chat'"):
        checkpoints_root("chat")


def test_find_largest_model_prefers_the_deepest_d_tag(tmp_path):
    for tag in ["d4", "d12", "d8", "custom"]:
        (tmp_path / tag).mkdir()
    assert find_largest_model(str(tmp_path)) == "d12"


def test_find_largest_model_falls_back_to_the_most_recent_tag(tmp_path):
    for i, tag in enumerate(["old", "newest", "older"]):
        (tmp_path / tag).mkdir()
        os.utime(tmp_path / tag, (1_000_000 + [10, 30, 0][i],) * 2)
    assert find_largest_model(str(tmp_path)) == "newest"


def test_load_model_without_checkpoints_says_what_to_run(isolated_base_dir):
    with pytest.raises(FileNotFoundError, match=r"no model checkpoints in .*base_checkpoints.*python -m scripts\.base_train"):
        load_model("base", "cpu", "eval")
    os.makedirs(os.path.join(checkpoints_root("sft"), "d4"))
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint.*python -m scripts\.chat_sft"):
        load_model("sft", "cpu", "eval")


# -----------------------------------------------------------------------------
# A real GPT


def tiny_gpt(vocab_size):
    from nanochat.gpt import GPT, GPTConfig

    config = dict(sequence_len=32, vocab_size=vocab_size, n_layer=2, n_head=1, n_kv_head=1, n_embd=128)
    torch.manual_seed(0)
    model = GPT.create(GPTConfig(**config), "cpu")
    with torch.no_grad():  # some weights start at zero; make every one matter for the comparison
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, config


def test_build_model_restores_a_compiled_models_weights_and_gives_identical_logits(isolated_base_dir):
    tokenizer = install_tokenizer(isolated_base_dir)
    model, config = tiny_gpt(tokenizer.get_vocab_size())
    state = {f"_orig_mod.{name}": tensor for name, tensor in model.state_dict().items()}  # as torch.compile names them
    directory = os.path.join(checkpoints_root("base"), "d2")
    save_checkpoint(directory, 10, state, None, {"step": 10, "model_config": config})

    loaded, loaded_tokenizer, meta = load_model("base", "cpu", "eval")
    assert meta["step"] == 10 and not loaded.training
    assert loaded_tokenizer.get_vocab_size() == tokenizer.get_vocab_size()
    idx = torch.tensor([tokenizer.encode("The capital of France is", prepend="<|bos|>")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))


def test_build_model_rejects_a_tokenizer_of_another_vocab_size(isolated_base_dir):
    tokenizer = install_tokenizer(isolated_base_dir)
    model, config = tiny_gpt(tokenizer.get_vocab_size() + 64)
    directory = os.path.join(checkpoints_root("base"), "d2")
    save_checkpoint(directory, 1, model.state_dict(), None, {"step": 1, "model_config": config})
    with pytest.raises(ValueError, match=r"has 265 tokens but the model .* vocab_size=329"):
        build_model(directory, 1, "cpu", "eval")
