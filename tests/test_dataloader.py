"""nanochat/dataloader.py: packing, epochs, rank striding and exact resume, on tiny shards of real text with a
byte-level tokenizer (token = UTF-8 byte, BOS = 256) so expected rows can be written down directly."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataset
from nanochat.dataloader import pack_rows, tokenizing_distributed_data_loader, tokenizing_distributed_data_loader_with_state

BOS = 256
B, T = 4, 64


class ByteTokenizer:
    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None, num_threads=None):
        return [[prepend] + list(text.encode("utf-8")) for text in texts]


def write_shard(path, docs, row_group_size):
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=row_group_size)


@pytest.fixture
def docs():
    """90 real documents of 20..420 characters (some shorter than T, some longer)."""
    texts = pq.read_table(Path(dataset.EMBEDDED_DIR) / "shard_00001.parquet").column("text").to_pylist()
    return [text[: 20 + (53 * i) % 400] for i, text in enumerate(texts[:90])]


@pytest.fixture
def data_dir(isolated_base_dir, docs):
    """Train: 3 shards x 3 row groups of 8 docs (+ a short last one); val: one shard of 2 row groups."""
    data_dir = Path(isolated_base_dir) / "base_data"
    data_dir.mkdir(parents=True)
    for i in range(3):
        write_shard(data_dir / f"shard_{i:05d}.parquet", docs[i * 20 : i * 20 + 20], 8)
    write_shard(data_dir / dataset.VAL_FILENAME, docs[60:90], 16)
    return data_dir


def loader(split="train", **kwargs):
    kwargs = {"B": B, "T": T, "split": split, "tokenizer": ByteTokenizer(), **kwargs}
    return tokenizing_distributed_data_loader_with_state(**kwargs)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def rows_of(batches):
    """The (T+1)-token rows a list of batches was cut from."""
    return torch.cat([torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in batches])


def expected_rows(row_groups, bos_aligned=False):
    """Rows packed directly from the documents of the given row groups, in order."""
    tokenizer = ByteTokenizer()
    packed = [pack_rows(tokenizer.encode(dataset.read_row_group(path, rg), prepend=BOS), T + 1, bos_aligned)
              for path, rg in row_groups]
    return torch.cat(packed)


# -----------------------------------------------------------------------------
# Batches and packing


def test_batches_are_int64_with_targets_shifted_by_one(data_dir):
    inputs, targets, state = next(loader())
    assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert inputs.is_contiguous() and targets.is_contiguous()
    json.dumps(state)  # the state must be storable as JSON


def test_plain_rows_are_the_bos_prefixed_documents_concatenated(data_dir, docs):
    stream = []
    for doc in docs[:8]:  # the first row group
        stream += [BOS] + list(doc.encode("utf-8"))
    rows = rows_of(take(loader(), 2))
    assert rows.flatten().tolist() == stream[: 2 * B * (T + 1)]


def test_pack_rows_best_fit_takes_the_longest_that_fits_then_crops_the_shortest():
    docs = [[BOS, 1, 1, 1, 1], [BOS, 2, 2], [BOS, 3], [BOS, 4, 4, 4, 4, 4, 4, 4, 4, 4], [BOS, 5, 5, 5, 5, 5, 5]]
    rows = pack_rows(docs, 8, bos_aligned=True).tolist()
    assert rows == [
        [BOS, 5, 5, 5, 5, 5, 5, BOS],  # the 7-token doc, then nothing fits 1 token: the shortest ([BOS, 3]) cropped
        [BOS, 1, 1, 1, 1, BOS, 2, 2],  # the 5-token doc, then the 3-token doc fills the row exactly
        [BOS, 4, 4, 4, 4, 4, 4, 4],  # the 10-token doc never fits: cropped to the row
    ]


def test_pack_rows_plain_drops_only_the_incomplete_last_row():
    rows = pack_rows([[BOS, 1, 2], [BOS, 3, 4, 5], [BOS, 6]], 4).tolist()
    assert rows == [[BOS, 1, 2, BOS], [3, 4, 5, BOS]]  # the leftover [6] is dropped


def test_bos_aligned_rows_start_with_bos_and_hold_whole_documents(data_dir, docs):
    rows = rows_of(take(loader(bos_aligned=True), 20))
    doc_tokens = {tuple([BOS] + list(doc.encode("utf-8"))) for doc in docs}
    assert (rows[:, 0] == BOS).all()
    for row in rows.tolist():
        starts = [i for i, token in enumerate(row) if token == BOS] + [len(row)]
        pieces = [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]
        assert all(piece in doc_tokens for piece in pieces[:-1])  # all but the last are whole documents
        assert any(doc[: len(pieces[-1])] == pieces[-1] for doc in doc_tokens)  # the last may be cropped


def test_val_split_reads_only_the_validation_shard(data_dir):
    val_row_groups = dataset.list_row_groups("val")
    rows = rows_of(take(loader("val"), 3))
    assert torch.equal(rows, expected_rows(val_row_groups)[: 3 * B])


# -----------------------------------------------------------------------------
# Epochs and ranks


def test_loader_loops_over_epochs_and_counts_them(data_dir):
    one_epoch = expected_rows(dataset.list_row_groups("train"))
    batches = take(loader(B=1), 2 * len(one_epoch) + 1)
    assert torch.equal(rows_of(batches), torch.cat([one_epoch, one_epoch, one_epoch[:1]]))
    assert [state["epoch"] for _, _, state in batches[:: len(one_epoch)]] == [1, 2, 3]


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_reads_its_strided_row_groups_and_together_they_cover_all_once(data_dir, world_size):
    all_row_groups = dataset.list_row_groups("train")
    mine = [all_row_groups[rank::world_size] for rank in range(world_size)]
    assert sorted(rg for part in mine for rg in part) == sorted(all_row_groups)
    for rank in range(world_size):
        epoch = expected_rows(mine[rank])
        rows = rows_of(take(loader(B=1, rank=rank, world_size=world_size), len(epoch)))
        assert torch.equal(rows, epoch)


def test_rank_and_world_size_default_to_the_torchrun_environment(data_dir, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from_env = take(loader(), 3)
    explicit = take(loader(rank=1, world_size=2), 3)
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(from_env, explicit))
    assert (from_env[0][2]["rank"], from_env[0][2]["world_size"]) == (1, 2)


# -----------------------------------------------------------------------------
# Exact resume


def assert_resume_is_exact(first, then, **kwargs):
    uninterrupted = take(loader(**kwargs), first + then)
    saved = json.loads(json.dumps(uninterrupted[first - 1][2]))  # through JSON, as a checkpoint would store it
    resumed = take(loader(resume_state_dict=saved, **kwargs), then)
    for (x, y, state), (rx, ry, rstate) in zip(uninterrupted[first:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry) and state == rstate
    return [state for _, _, state in uninterrupted]


@pytest.mark.parametrize("bos_aligned", [False, True])
@pytest.mark.parametrize("first", [1, 7, 16])
def test_resume_continues_with_identical_batches(data_dir, bos_aligned, first):
    assert_resume_is_exact(first, 6, bos_aligned=bos_aligned)


@pytest.mark.parametrize("bos_aligned", [False, True])
def test_resume_is_exact_for_each_of_two_ranks(data_dir, bos_aligned):
    for rank in range(2):
        assert_resume_is_exact(5, 6, rank=rank, world_size=2, bos_aligned=bos_aligned)


@pytest.mark.parametrize("bos_aligned", [False, True])
def test_resume_is_exact_across_an_epoch_boundary(data_dir, bos_aligned):
    rows_per_epoch = len(expected_rows(dataset.list_row_groups("train")[1::2], bos_aligned))
    first = rows_per_epoch // B - 1  # saved just before the end of epoch 1, resumed batches run into epoch 2
    states = assert_resume_is_exact(first, 4, rank=1, world_size=2, bos_aligned=bos_aligned)
    assert states[first - 1]["epoch"] == 1 and states[-1]["epoch"] == 2


def test_resume_may_change_the_batch_size(data_dir):
    uninterrupted = rows_of(take(loader(B=4), 6))
    _, _, state = take(loader(B=4), 2)[-1]
    resumed = rows_of(take(loader(B=2, resume_state_dict=state), 8))
    assert torch.equal(resumed, uninterrupted[2 * 4 :])


def test_plain_wrapper_yields_the_same_batches_without_state(data_dir):
    with_state = take(loader(), 3)
    plain = take(tokenizing_distributed_data_loader(B, T, "train", tokenizer=ByteTokenizer()), 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(with_state, plain))


def test_real_bpe_tokenizer_threads_give_the_same_rows(data_dir, shared_data):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding("r50k", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                            mergeable_ranks=load_tiktoken_bpe(str(shared_data / "tiktoken" / "r50k_base.tiktoken")),
                            special_tokens={"<|endoftext|>": 50256})

    class Gpt2:
        def get_bos_token_id(self):
            return 50256

        def encode(self, texts, prepend=None, num_threads=None):
            return [[prepend] + ids for ids in enc.encode_ordinary_batch(texts, num_threads=num_threads)]

    batches = take(loader(tokenizer=Gpt2(), tokenizer_threads=2, tokenizer_batch_size=3), 2)
    path, rg = dataset.list_row_groups("train")[0]
    stream = [token for doc in dataset.read_row_group(path, rg) for token in [50256] + enc.encode_ordinary(doc)]
    assert rows_of(batches).flatten().tolist() == stream[: 2 * B * (T + 1)]


# -----------------------------------------------------------------------------
# Errors people can act on


def test_no_data_says_what_to_run(isolated_base_dir):
    with pytest.raises(FileNotFoundError, match="python -m nanochat.dataset"):
        loader()


def test_rank_outside_world_size_is_an_error(data_dir):
    with pytest.raises(ValueError, match="rank=2 with world_size=2"):
        loader(rank=2, world_size=2)


def test_more_ranks_than_row_groups_is_an_error(data_dir):
    with pytest.raises(ValueError, match="fewer than world_size=3"):
        loader("val", rank=2, world_size=3)


def test_sequence_longer_than_any_row_group_is_an_error(data_dir):
    with pytest.raises(ValueError, match="use a smaller T"):
        next(loader(T=100_000))


def test_state_of_another_rank_is_refused(data_dir):
    _, _, state = next(loader(rank=0, world_size=2))
    with pytest.raises(ValueError, match="rank=0 but this loader has rank=1"):
        loader(rank=1, world_size=2, resume_state_dict=state)


def test_state_with_another_packing_is_refused(data_dir):
    _, _, state = next(loader())
    with pytest.raises(ValueError, match="bos_aligned=False but this loader has bos_aligned=True"):
        loader(bos_aligned=True, resume_state_dict=state)


def test_state_pointing_at_a_vanished_shard_is_refused(data_dir):
    _, _, state = next(loader())
    os.remove(data_dir / state["shard"])
    with pytest.raises(ValueError, match="shards in base_data changed"):
        loader(resume_state_dict=state)


def test_unknown_split_is_an_error(data_dir):
    with pytest.raises(ValueError, match="'valid'"):
        loader("valid")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_batches_arrive_on_the_gpu_equal_to_the_cpu_ones(data_dir):
    cpu = take(loader(), 3)
    gpu = take(loader(device="cuda"), 3)
    for (x, y, _), (gx, gy, _) in zip(cpu, gpu):
        assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
