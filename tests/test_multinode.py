"""Multi-node training, on one machine: base_train launched as two single-process "nodes" (two torchrun launchers,
--nnodes=2 --nproc_per_node=1, rendezvous over 127.0.0.1), each with its own NANOCHAT_BASE_DIR as two machines
would have, trains exactly like one torchrun with 2 processes. The static rendezvous (--node_rank) is the
README's recipe; c10d (ranks assigned at rendezvous) works the same."""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from pretraining_setup import REPO_ROOT, make_aligned_base_dir, read_curve, run_base_train

# as in test_base_train's two-process tests: every row group packs into 4 rows of 65 tokens
SETTINGS = ["--depth=2", "--max_seq_len=64", "--device_batch_size=4", "--total_batch_size=512", "--num_iterations=6",
            "--eval_every=3", "--eval_tokens=1024", "--sample_every=-1", "--core_metric_every=-1"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_aligned_base_dir(tmp_path_factory.mktemp("multinode_data"), rows_per_row_group=4, row_len=65)


@pytest.fixture(scope="module")
def one_node_reference(data, tmp_path_factory):
    base_dir = tmp_path_factory.mktemp("one_node") / "base"
    shutil.copytree(data, base_dir)
    run_base_train(base_dir, *SETTINGS, nproc=2)
    return read_curve(base_dir)


def launch_node(node_rank, base_dir, backend, port):
    rendezvous = [f"--rdzv_endpoint=127.0.0.1:{port}"]
    if backend == "static":
        rendezvous += [f"--node_rank={node_rank}"]
    else:
        rendezvous += ["--rdzv_backend=c10d", "--rdzv_id=nanochat_test"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", *rendezvous,
               "-m", "scripts.base_train", "--", *SETTINGS]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_two_single_process_nodes_train_like_one_two_process_node(backend, data, one_node_reference, tmp_path):
    nodes = [tmp_path / f"node{i}" for i in range(2)]
    for node in nodes:
        shutil.copytree(data, node)  # each "machine" has its own copy of the data and tokenizer
    port = free_port()
    launchers = [launch_node(i, node, backend, port) for i, node in enumerate(nodes)]
    outputs = []
    for launcher in launchers:
        try:
            outputs.append(launcher.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for other in launchers:
                other.kill()
            raise
    for launcher, output in zip(launchers, outputs):
        assert launcher.returncode == 0, output[-4000:]

    # rank 0 (node 0 with --node_rank; whichever node c10d made rank 0 otherwise) logs, reports and saves the model
    leaders = [node for node in nodes if (node / "report" / "base_train_curve.json").exists()]
    assert len(leaders) == 1, "exactly one node holds rank 0's report"
    leader, follower = leaders[0], next(node for node in nodes if node != leaders[0])
    if backend == "static":
        assert leader == nodes[0]
    assert any("2 process(es) x 1 micro-step(s)" in output for output in outputs)
    curve = read_curve(leader)
    assert curve["step"] == one_node_reference["step"]
    # the same two ranks doing the same math over a TCP rendezvous instead of a local one
    assert curve["loss"] == pytest.approx(one_node_reference["loss"], rel=1e-6)
    assert curve["val_bpb"] == pytest.approx(one_node_reference["val_bpb"], rel=1e-6)
    assert all(loss == loss and loss < 100 for loss in curve["loss"])  # finite
    # every rank saves its own optimizer shard on its own machine; model and meta come from rank 0
    assert sorted(os.listdir(leader / "base_checkpoints" / "d2")) == [
        "meta_000006.json", "model_000006.pt", "optim_000006_rank0.pt"]
    assert sorted(os.listdir(follower / "base_checkpoints" / "d2")) == ["optim_000006_rank1.pt"]
