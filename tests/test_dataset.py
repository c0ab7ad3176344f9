"""nanochat/dataset.py: the embedded corpus, the train/val split rule, reading row groups, and the shard
downloader against a local HTTP server that fails, truncates and answers with HTML error pages."""

import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset
from nanochat.dataset import VAL_FILENAME

EMBEDDED = Path(dataset.EMBEDDED_DIR)


def write_shard(path, docs, row_group_size):
    pq.write_table(pa.table({"text": docs}), str(path), row_group_size=row_group_size)


@pytest.fixture(scope="module")
def real_docs():
    """120 real documents from the embedded corpus, cropped small so shards stay tiny."""
    docs = pq.read_table(EMBEDDED / "shard_00000.parquet").column("text").to_pylist()
    return [doc[: 200 + 37 * i % 300] for i, doc in enumerate(docs[:120])]


@pytest.fixture
def data_dir(isolated_base_dir):
    return Path(isolated_base_dir) / "base_data"


# -----------------------------------------------------------------------------
# Embedded corpus


def test_embedded_corpus_matches_the_checksums_in_its_readme():
    readme = (EMBEDDED / "README.md").read_text(encoding="utf-8")
    listed = dict(re.findall(r"^\| `([\w.]+\.parquet)` \|.*`([0-9a-f]{64})` \|$", readme, re.M))
    on_disk = sorted(p.name for p in EMBEDDED.glob("*.parquet"))
    assert sorted(listed) == on_disk and len(on_disk) == 8
    for name, digest in listed.items():
        assert hashlib.sha256((EMBEDDED / name).read_bytes()).hexdigest() == digest, name


def test_install_embedded_puts_its_validation_shard_under_the_pinned_name(data_dir):
    dataset.install_embedded()
    val = dataset.list_parquet_files(split="val")
    assert val == [str(data_dir / VAL_FILENAME)] and VAL_FILENAME == "shard_01822.parquet"
    assert (data_dir / VAL_FILENAME).read_bytes() == (EMBEDDED / "shard_00006.parquet").read_bytes()
    train = [os.path.basename(p) for p in dataset.list_parquet_files(split="train")]
    assert train == ["fineweb_edu_150.parquet"] + [f"shard_0000{i}.parquet" for i in range(6)]
    assert (data_dir / dataset.EMBEDDED_MARKER).exists()
    assert len(dataset.list_row_groups("train")) == 6 * 5 + 1 and len(dataset.list_row_groups("val")) == 5


def test_install_embedded_twice_is_harmless(data_dir):
    dataset.install_embedded()
    assert len(dataset.install_embedded()) == 8
    assert not [name for name in os.listdir(data_dir) if ".tmp" in name]


def test_install_embedded_refuses_to_mix_with_downloaded_shards(data_dir, real_docs):
    data_dir.mkdir(parents=True)
    write_shard(data_dir / "shard_00000.parquet", real_docs[:5], 5)
    with pytest.raises(RuntimeError, match="not the embedded corpus"):
        dataset.install_embedded()


# -----------------------------------------------------------------------------
# Listing and reading


def test_missing_data_dir_error_says_what_to_run(data_dir):
    with pytest.raises(FileNotFoundError, match=r"python -m nanochat.dataset -n 8.*--embedded"):
        dataset.list_parquet_files()


def test_missing_validation_shard_is_an_error(data_dir, real_docs):
    data_dir.mkdir(parents=True)
    write_shard(data_dir / "shard_00000.parquet", real_docs[:5], 5)
    assert len(dataset.list_parquet_files(split="train")) == 1
    with pytest.raises(FileNotFoundError, match="shard_01822.parquet"):
        dataset.list_parquet_files(split="val")


def test_only_a_validation_shard_means_no_training_data(data_dir, real_docs):
    data_dir.mkdir(parents=True)
    write_shard(data_dir / VAL_FILENAME, real_docs[:5], 5)
    with pytest.raises(FileNotFoundError, match="no training shards"):
        dataset.list_parquet_files(split="train")


def test_unknown_split_is_an_error(data_dir):
    dataset.install_embedded()
    with pytest.raises(ValueError, match="'test'"):
        dataset.list_parquet_files(split="test")


def test_shard_without_text_column_is_rejected_by_name(data_dir):
    data_dir.mkdir(parents=True)
    pq.write_table(pa.table({"content": ["a", "b"]}), str(data_dir / "shard_00000.parquet"))
    with pytest.raises(ValueError, match=r"shard_00000.parquet has no 'text' column.*content"):
        dataset.list_row_groups("train")


def test_empty_shard_is_rejected_by_name(data_dir):
    data_dir.mkdir(parents=True)
    write_shard(data_dir / "shard_00003.parquet", pa.array([], pa.string()), 10)
    with pytest.raises(ValueError, match=r"shard_00003.parquet is an empty shard"):
        dataset.list_row_groups("train")


def test_iter_batched_yields_row_groups_in_order(data_dir, real_docs):
    data_dir.mkdir(parents=True)
    write_shard(data_dir / "shard_00000.parquet", real_docs[:10], 4)  # row groups of 4, 4, 2
    write_shard(data_dir / "shard_00001.parquet", real_docs[10:13], 4)  # one row group of 3
    assert list(dataset.parquets_iter_batched("train")) == [real_docs[0:4], real_docs[4:8], real_docs[8:10], real_docs[10:13]]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_rank_striding_reads_every_row_group_exactly_once(data_dir, real_docs, world_size):
    data_dir.mkdir(parents=True)
    for i in range(3):
        write_shard(data_dir / f"shard_{i:05d}.parquet", real_docs[i * 20 : i * 20 + 20], 6)  # 4 row groups each
    seen = [doc for rank in range(world_size) for batch in dataset.parquets_iter_batched("train", rank, world_size) for doc in batch]
    assert sorted(seen) == sorted(real_docs[:60]) and len(seen) == 60


# -----------------------------------------------------------------------------
# Downloader, against a local server


class FlakyServer:
    """Serves files from a dict; each file's first requests misbehave as listed in `faults[name]`:
    "500", "html" (an error page with status 200), "cut" (half the body, full Content-Length) or
    "cut_unsized" (half the body, no Content-Length, so only the parquet check can notice)."""

    def __init__(self, files, faults=None):
        self.files, self.faults, self.requests = files, {k: list(v) for k, v in (faults or {}).items()}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
                body = server.files.get(name)
                if body is None or fault == "500":
                    self.send_error(404 if body is None else 500)
                    return
                if fault == "html":
                    body = b"<html><body>Rate limited, try again later</body></html>"
                self.send_response(200)
                if fault != "cut_unsized":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if fault in ("cut", "cut_unsized") else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/base"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_bytes(tmp_path, real_docs):
    """Real parquet bytes for training shards 0..3 and the validation shard."""
    files = {}
    for i in [0, 1, 2, 3, dataset.VAL_SHARD]:
        path = tmp_path / f"src_{i}.parquet"
        write_shard(path, real_docs[i % 100 : i % 100 + 15], 5)
        files[dataset.shard_filename(i)] = path.read_bytes()
    return files


@pytest.fixture
def serve():
    servers = []

    def start(files, faults=None):
        servers.append(FlakyServer(files, faults))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def assert_clean(data_dir, expected):
    names = sorted(os.listdir(data_dir))
    assert names == sorted(expected), names  # no .tmp leftovers, nothing extra
    for name, body in expected.items():
        assert (data_dir / name).read_bytes() == body


def test_download_retries_through_errors_truncation_and_html_pages(data_dir, shard_bytes, serve):
    faults = {"shard_00000.parquet": ["500", "cut", "html"], "shard_00001.parquet": ["cut_unsized", "html", "500", "cut_unsized"],
              "shard_00002.parquet": ["html"], VAL_FILENAME: ["cut", "500"]}
    server = serve(shard_bytes, faults)
    paths = dataset.download_shards(3, num_workers=3, base_url=server.url, backoff=0.001)
    assert [os.path.basename(p) for p in paths] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet", VAL_FILENAME]
    assert_clean(data_dir, {name: shard_bytes[name] for name in map(os.path.basename, paths)})
    assert sorted(server.requests).count("shard_00001.parquet") == 5  # 4 bad answers, then the good one
    assert "shard_00003.parquet" not in server.requests


def test_download_names_a_permanently_missing_shard_and_exits_nonzero(data_dir, shard_bytes, serve, capsys):
    files = dict(shard_bytes)
    del files["shard_00002.parquet"]
    server = serve(files)
    with pytest.raises(SystemExit) as exit_info:
        dataset.main(["-n", "3", "-w", "2", "--base_url", server.url])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "1 of 4 shard downloads failed" in err and "shard_00002.parquet" in err and "404" in err
    assert_clean(data_dir, {name: files[name] for name in ["shard_00000.parquet", "shard_00001.parquet", VAL_FILENAME]})
    assert server.requests.count("shard_00002.parquet") == 1  # a 404 is not retried


def test_download_keeps_shards_that_are_present_and_valid(data_dir, shard_bytes, serve):
    data_dir.mkdir(parents=True)
    (data_dir / "shard_00000.parquet").write_bytes(shard_bytes["shard_00000.parquet"])
    server = serve(shard_bytes)
    dataset.download_shards(2, base_url=server.url, backoff=0.001)
    assert sorted(server.requests) == ["shard_00001.parquet", VAL_FILENAME]


def test_download_replaces_an_invalid_existing_shard(data_dir, shard_bytes, serve):
    data_dir.mkdir(parents=True)
    good = shard_bytes["shard_00000.parquet"]
    (data_dir / "shard_00000.parquet").write_bytes(good[: len(good) // 2])  # a truncated earlier download
    server = serve(shard_bytes)
    dataset.download_shards(1, base_url=server.url, backoff=0.001)
    assert "shard_00000.parquet" in server.requests
    assert_clean(data_dir, {"shard_00000.parquet": good, VAL_FILENAME: shard_bytes[VAL_FILENAME]})


def test_download_takes_its_url_from_the_environment(data_dir, shard_bytes, serve, monkeypatch):
    server = serve(shard_bytes)
    monkeypatch.setenv("NANOCHAT_DATA_URL", server.url + "/")
    dataset.main(["-n", "1"])
    assert sorted(server.requests) == ["shard_00000.parquet", VAL_FILENAME]


def test_download_refuses_to_mix_with_the_embedded_corpus(data_dir):
    dataset.install_embedded()
    with pytest.raises(RuntimeError, match="embedded corpus"):
        dataset.download_shards(2, base_url="http://127.0.0.1:9")


def test_download_rejects_an_impossible_shard_count(data_dir):
    with pytest.raises(ValueError, match="0..1822"):
        dataset.download_shards(1823, base_url="http://127.0.0.1:9")
