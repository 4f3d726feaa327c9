"""prepare.py's download path against a loopback HTTP server standing in for the hub (HF_ENDPOINT)."""
import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import run_script
from constants import VAL_SHARD, shard_name


def parquet_bytes(texts):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


class FakeHub:
    """Serves /datasets/<repo>/resolve/main/shard_NNNNN.parquet from `files`. `cut[name] = n` cuts the
    connection half way through the body for the next n requests of that file; `missing` names give 404."""

    def __init__(self, files):
        self.files, self.cut, self.requests = dict(files), {}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                hub.requests.append(name)
                if "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/" not in self.path or name not in hub.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = hub.files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if hub.cut.get(name, 0) > 0:
                    hub.cut[name] -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection dies mid-file
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    files = {shard_name(i): parquet_bytes([f"document {i}.{j} " * 50 for j in range(200)]) for i in range(3)}
    files[shard_name(VAL_SHARD)] = parquet_bytes([f"validation text {j} " * 40 for j in range(100)])
    server = FakeHub(files)
    yield server
    server.close()


def names_in(folder):
    return sorted(os.listdir(folder))


def test_download_success(hub, tmp_path):
    failed = prepare.download_shards([0, 1, VAL_SHARD], str(tmp_path), hub.endpoint, workers=3)
    assert failed == []
    assert names_in(tmp_path) == [shard_name(0), shard_name(1), shard_name(VAL_SHARD)]
    for name in names_in(tmp_path):
        assert (tmp_path / name).read_bytes() == hub.files[name]


def test_cut_connection_is_retried_and_never_leaves_a_partial_file(hub, tmp_path):
    hub.cut[shard_name(0)] = 1  # first attempt dies half way, the retry succeeds
    status, _ = prepare.download_shard(0, str(tmp_path), hub.endpoint, attempts=3, backoff=0)
    assert status == "ok"
    assert (tmp_path / shard_name(0)).read_bytes() == hub.files[shard_name(0)]
    assert hub.requests.count(shard_name(0)) == 2

    hub.cut[shard_name(1)] = 5  # every attempt dies: nothing under the final name, no temp file left
    status, detail = prepare.download_shard(1, str(tmp_path), hub.endpoint, attempts=2, backoff=0)
    assert status == "fail" and hub.endpoint in detail
    assert names_in(tmp_path) == [shard_name(0)]


def test_404_fails_at_once_naming_the_url(hub, tmp_path):
    status, detail = prepare.download_shard(5, str(tmp_path), hub.endpoint, attempts=5, backoff=10)
    assert status == "fail"
    assert "404" in detail and shard_name(5) in detail
    assert hub.requests == [shard_name(5)]  # a permanent error is not retried
    assert names_in(tmp_path) == []


def test_resume_after_an_interrupted_run(hub, tmp_path):
    hub.cut[shard_name(1)] = 2
    failed = prepare.download_shards([0, 1, 2], str(tmp_path), hub.endpoint, workers=2, attempts=2, backoff=0)
    assert failed == [shard_name(1)]
    assert names_in(tmp_path) == [shard_name(0), shard_name(2)]
    (tmp_path / f"{shard_name(1)}.999.part").write_bytes(b"left by a killed run")
    hub.requests.clear()
    failed = prepare.download_shards([0, 1, 2], str(tmp_path), hub.endpoint, workers=2, attempts=2, backoff=0)
    assert failed == []
    assert hub.requests == [shard_name(1)]  # whole shards are not fetched again
    assert names_in(tmp_path) == [shard_name(0), shard_name(1), shard_name(2)]


def test_a_truncated_shard_under_its_final_name_is_fetched_again(hub, tmp_path):
    (tmp_path / shard_name(0)).write_bytes(hub.files[shard_name(0)][:1000])
    status, _ = prepare.download_shard(0, str(tmp_path), hub.endpoint, backoff=0)
    assert status == "ok"
    assert (tmp_path / shard_name(0)).read_bytes() == hub.files[shard_name(0)]


def test_cli_downloads_then_trains_the_tokenizer(hub, tmp_path):
    cache = tmp_path / "cache"
    proc = run_script(["prepare.py", "--num-shards", "2", "--download-workers", "2"],
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stderr
    assert names_in(cache / "data") == [shard_name(0), shard_name(1), shard_name(VAL_SHARD)]
    assert names_in(cache / "tokenizer") == ["ranks.txt", "tokenizer.json"]
    assert proc.stdout.count("shard_") >= 3  # one progress line per shard
    assert "data: 3 downloaded, 0 already present, 0 failed" in proc.stdout


def test_cli_exits_non_zero_naming_the_failed_shards(hub, tmp_path):
    proc = run_script(["prepare.py", "--num-shards", "4"],  # shard 3 is not on the hub
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert shard_name(3) in proc.stderr.strip().splitlines()[-1]
    assert shard_name(3) not in names_in(tmp_path / "data")


def test_cli_without_network_says_which_url_failed(tmp_path):
    proc = run_script(["prepare.py", "--num-shards", "1"],
                      env={"HF_ENDPOINT": "http://127.0.0.1:9", "AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "http://127.0.0.1:9/datasets/" in proc.stdout + proc.stderr
