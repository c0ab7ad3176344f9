import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nanochat.common import download_file, download_file_with_lock, get_base_dir, get_peak_flops

PAYLOAD = b"real bytes " * 1000


class FlakyHandler(BaseHTTPRequestHandler):
    """/ok: the payload; /flaky: 500 twice, then the payload; /truncated: a short body once;
    /missing: 404; /html: a 200 with an HTML error page."""
    hits = {}

    def do_GET(self):
        count = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/missing":
            self.send_error(404)
        elif self.path == "/flaky" and count <= 2:
            self.send_error(500)
        elif self.path == "/truncated" and count == 1:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:100])
        elif self.path == "/html":
            body = b"<html>rate limited</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    FlakyHandler.hits = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def reject_html(path):
    with open(path, "rb") as f:
        if f.read(6) == b"<html>":
            raise ValueError("got an HTML page, not data")


def test_base_dir_comes_from_env(isolated_base_dir):
    assert get_base_dir() == str(isolated_base_dir) and isolated_base_dir.is_dir()


def test_download_retries_server_errors(server, tmp_path):
    path = download_file(f"{server}/flaky", str(tmp_path / "f"), backoff=0.01)
    assert open(path, "rb").read() == PAYLOAD and FlakyHandler.hits["/flaky"] == 3


def test_download_retries_truncated_body(server, tmp_path):
    path = download_file(f"{server}/truncated", str(tmp_path / "f"), backoff=0.01)
    assert open(path, "rb").read() == PAYLOAD


def test_download_missing_file_fails_at_once_naming_url(server, tmp_path):
    with pytest.raises(RuntimeError, match=r"/missing failed after 1 attempt"):
        download_file(f"{server}/missing", str(tmp_path / "f"), backoff=0.01)
    assert os.listdir(tmp_path) == []


def test_download_rejected_body_leaves_no_file(server, tmp_path):
    with pytest.raises(RuntimeError, match="HTML page"):
        download_file(f"{server}/html", str(tmp_path / "f"), attempts=2, validate=reject_html, backoff=0.01)
    assert os.listdir(tmp_path) == [] and FlakyHandler.hits["/html"] == 2


def test_download_with_lock_fetches_once(server, isolated_base_dir):
    for _ in range(2):
        path = download_file_with_lock(f"{server}/ok", "thing.bin")
    assert open(path, "rb").read() == PAYLOAD and FlakyHandler.hits["/ok"] == 1


def test_cpu_peak_flops_is_measured_not_zero():
    assert 1e8 < get_peak_flops("cpu", torch.float32) < 1e14


def test_compute_dtype_env_override():
    code = "from nanochat.common import COMPUTE_DTYPE; print(COMPUTE_DTYPE)"
    env = dict(os.environ, NANOCHAT_DTYPE="bfloat16")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "torch.bfloat16"
    env["NANOCHAT_DTYPE"] = "int8"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "NANOCHAT_DTYPE='int8' is not one of" in out.stderr
