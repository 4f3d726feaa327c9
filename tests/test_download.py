"""The download path (cache.py, driven by prepare.py) against a loopback HTTP server standing in for the hub."""
import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from autoresearch import cache, download
from autoresearch.download import Downloader
from conftest import ROOT, TEST_ENV, build_docs, run_script
from constants import VAL_SHARD, shard_name


def parquet_bytes(texts):
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, row_group_size=100)
    return buf.getvalue()


class FakeHub:
    """Serves /datasets/<repo>/resolve/main/shard_NNNNN.parquet from `files`; other names give 404.
    Misbehaviour per file name: `cut[name] = n` cuts the connection half way through the body for the next n
    requests; `corrupt` names get a body with zeroed bytes in the middle (the footer still reads); `stall` names
    get headers, then nothing; `pace[name] = (bytes, seconds)` sends the body in pieces of that many bytes with
    that pause between them; `endless` names get a body without Content-Length that never ends."""

    def __init__(self, files):
        self.files, self.cut, self.requests = dict(files), {}, []
        self.corrupt, self.stall, self.pace, self.stop = set(), set(), {}, threading.Event()
        self.endless, self.authorization = set(), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                hub.requests.append(name)
                hub.authorization.append(self.headers.get("Authorization"))
                if "/datasets/karpathy/climbmix-400b-shuffle/resolve/main/" not in self.path or name not in hub.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = hub.files[name]
                if name in hub.endless:  # no Content-Length, and a body that never ends
                    self.send_response(200)
                    self.end_headers()
                    try:
                        while not hub.stop.is_set():
                            self.wfile.write(bytes(65536))
                    except OSError:
                        pass
                    return
                if name in hub.corrupt:
                    middle = len(body) // 2
                    body = body[:middle] + bytes(256) + body[middle + 256:]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                if name in hub.stall:
                    hub.stop.wait(30)
                    return
                if hub.cut.get(name, 0) > 0:
                    hub.cut[name] -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection dies mid-file
                    return
                piece, pause = hub.pace.get(name, (len(body), 0))
                try:
                    for i in range(0, len(body), piece):
                        self.wfile.write(body[i:i + piece])
                        self.wfile.flush()
                        if pause and hub.stop.wait(pause):
                            return
                except OSError:
                    return  # the client gave up

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


def random_texts(seed, n):
    """Text that compresses poorly, so that damage to a shard's body cannot decode by chance."""
    rng = random.Random(seed)
    return [" ".join(f"{rng.choice(['alpha', 'beta', 'gamma', 'delta'])}{rng.randrange(1000)}" for _ in range(60))
            for _ in range(n)]


@pytest.fixture
def hub():
    files = {shard_name(i): parquet_bytes(random_texts(i, 400)) for i in range(3)}
    files[shard_name(VAL_SHARD)] = parquet_bytes(random_texts(-1, 200))
    server = FakeHub(files)
    yield server
    server.close()


def names_in(folder):
    return sorted(os.listdir(folder))


def test_download_success(hub, tmp_path):
    failed = download.download_shards([0, 1, VAL_SHARD], str(tmp_path), Downloader(hub.endpoint), workers=3)
    assert failed == {}
    assert names_in(tmp_path) == [shard_name(0), shard_name(1), shard_name(VAL_SHARD)]
    for name in names_in(tmp_path):
        assert (tmp_path / name).read_bytes() == hub.files[name]


def test_cut_connection_is_retried_and_never_leaves_a_partial_file(hub, tmp_path):
    hub.cut[shard_name(0)] = 1  # first attempt dies half way, the retry succeeds
    result = Downloader(hub.endpoint, attempts=3, backoff=0).fetch(0, str(tmp_path))
    assert result.status == "downloaded"
    assert (tmp_path / shard_name(0)).read_bytes() == hub.files[shard_name(0)]
    assert hub.requests.count(shard_name(0)) == 2

    hub.cut[shard_name(1)] = 5  # every attempt dies: nothing under the final name, no temp file left
    result = Downloader(hub.endpoint, attempts=2, backoff=0).fetch(1, str(tmp_path))
    assert result.status == "failed" and hub.endpoint in result.detail
    assert names_in(tmp_path) == [shard_name(0)]


def test_404_fails_at_once_naming_the_url(hub, tmp_path):
    result = Downloader(hub.endpoint, attempts=5, backoff=10).fetch(5, str(tmp_path))
    assert result.status == "failed"
    assert "404" in result.detail and shard_name(5) in result.detail
    assert hub.requests == [shard_name(5)]  # a permanent error is not retried
    assert names_in(tmp_path) == []


def test_resume_after_an_interrupted_run(hub, tmp_path):
    hub.cut[shard_name(1)] = 2
    failed = download.download_shards([0, 1, 2], str(tmp_path), Downloader(hub.endpoint, attempts=2, backoff=0),
                                      workers=2)
    assert list(failed) == [shard_name(1)]
    assert names_in(tmp_path) == [shard_name(0), shard_name(2)]
    (tmp_path / f"{shard_name(1)}.999999999.1.tmp").write_bytes(b"left by a killed prepare.py")
    hub.requests.clear()
    failed = download.download_shards([0, 1, 2], str(tmp_path), Downloader(hub.endpoint, attempts=2, backoff=0),
                                      workers=2)
    assert failed == {}
    assert hub.requests == [shard_name(1)]  # whole shards are not fetched again
    assert names_in(tmp_path) == [shard_name(0), shard_name(1), shard_name(2)]


def test_a_shard_damaged_by_hand_is_named_and_never_rewritten(hub, tmp_path):
    """A shard gets its name only whole, so one under its name is never fetched again; cut by hand, the build that
    reads it names it and says what to do."""
    data = tmp_path / "cache" / "data"
    data.mkdir(parents=True)
    (data / shard_name(0)).write_bytes(hub.files[shard_name(0)][:1000])
    proc = run_script(["prepare.py", "--num-shards", "1"],
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and str(data / shard_name(0)) in line and "remove it and run prepare.py" in line
    assert shard_name(0) not in hub.requests and (data / shard_name(0)).read_bytes() == hub.files[shard_name(0)][:1000]
    assert os.listdir(tmp_path / "cache" / "builds") == []  # no half-made build


def test_cli_downloads_then_trains_the_tokenizer(hub, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = run_script(["prepare.py", "--num-shards", "2", "--download-workers", "2"],
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 0, proc.stderr
    assert names_in(cache_dir / "data") == [shard_name(0), shard_name(1), shard_name(VAL_SHARD)]
    hub_build = (cache_dir / "current").read_text().strip()
    assert names_in(cache_dir / "builds" / hub_build / "tokenizer") == ["ranks.txt", "tokenizer.json"]
    assert proc.stdout.count("shard_") >= 3  # one progress line per shard
    assert "data: 3 downloaded, 0 already present, 0 failed" in proc.stdout
    again = run_script(["prepare.py", "--num-shards", "2"],  # a rerun verifies the build and fetches nothing
                       env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(cache_dir)})
    assert again.returncode == 0, again.stderr
    assert "data: 0 downloaded, 3 already present" in again.stdout and "is made already" in again.stdout
    # --source on a cache of hub data is a build of its own beside the hub's, whose files stay as they were
    hub_files = {n: (cache_dir / "data" / n).read_bytes() for n in names_in(cache_dir / "data")}
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.txt").write_text(f"local document number {i} " * 30)
    local = run_script(["prepare.py", "--source", str(src)], env={"AUTORESEARCH_CACHE_DIR": str(cache_dir)})
    assert local.returncode == 0, local.stderr
    build = cache.current_build(str(cache_dir))
    texts = build_docs(build, "train") + build_docs(build, "val")
    assert sorted(texts) == sorted(f"local document number {i} " * 30 for i in range(3))
    assert {n: (cache_dir / "data" / n).read_bytes() for n in names_in(cache_dir / "data")} == hub_files
    assert sorted(names_in(cache_dir / "builds")) == sorted([hub_build, cache.current_build(str(cache_dir)).id])


def test_cli_exits_non_zero_naming_the_failed_shards(hub, tmp_path):
    proc = run_script(["prepare.py", "--num-shards", "4"],  # shard 3 is not on the hub
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert shard_name(3) in proc.stderr.strip().splitlines()[-1]
    assert shard_name(3) not in names_in(tmp_path / "data")


def test_cli_without_network_names_the_url_and_the_offline_way_and_leaves_nothing(tmp_path):
    proc = run_script(["prepare.py", "--num-shards", "1"],
                      env={"HF_ENDPOINT": "http://127.0.0.1:9", "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "cannot connect to http://127.0.0.1:9/datasets/" in line and "uv run prepare.py --source DIR" in line
    assert not (tmp_path / "cache").exists()  # a first run that fetched nothing leaves nothing behind


def test_a_mirror_without_the_files_says_so_not_retry(hub, tmp_path):
    hub.files.pop(shard_name(1))
    proc = run_script(["prepare.py", "--num-shards", "2"],
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    line = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and shard_name(1) in line and "does not have them (HTTP 404)" in line
    assert "retry" not in line


def test_hf_hub_offline_downloads_nothing_and_says_so(hub, tmp_path):
    proc = run_script(["prepare.py", "--num-shards", "1"],
                      env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "1",
                           "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode != 0 and hub.requests == []
    assert "HF_HUB_OFFLINE=1 forbids downloading" in proc.stderr.strip().splitlines()[-1]


def test_hf_token_is_sent_with_every_download(hub, tmp_path):
    assert Downloader(hub.endpoint, token="hf_secret").fetch(0, str(tmp_path)).status == "downloaded"
    assert Downloader(hub.endpoint, token="").fetch(1, str(tmp_path)).status == "downloaded"
    assert hub.authorization == ["Bearer hf_secret", None]


def test_a_body_that_does_not_decode_never_gets_the_final_name(hub, tmp_path):
    hub.corrupt.add(shard_name(0))  # right length, footer fine, a row group in the middle broken
    result = Downloader(hub.endpoint, attempts=2, backoff=0).fetch(0, str(tmp_path))
    assert result.status == "failed" and "not a readable parquet file" in result.detail
    assert names_in(tmp_path) == [] and hub.requests == [shard_name(0)] * 2


def test_a_stalled_body_is_abandoned_and_retried(hub, tmp_path):
    hub.stall.add(shard_name(0))
    t0 = time.time()
    result = Downloader(hub.endpoint, attempts=2, backoff=0, stall=0.5).fetch(0, str(tmp_path))
    assert result.status == "failed" and "timed out" in result.detail.lower()
    assert time.time() - t0 < 30 and hub.requests == [shard_name(0)] * 2 and names_in(tmp_path) == []


def test_a_refused_connection_fails_fast_and_stops_the_rest(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.time()
    with pytest.raises(SystemExit) as refusal:
        download.download_shards(list(range(40)), str(tmp_path), Downloader(endpoint, backoff=10), workers=2)
    line = str(refusal.value.code)
    assert f"cannot connect to {endpoint}/datasets/" in line and "40 of 40 shards not fetched" in line
    assert time.time() - t0 < 30, "a refused connection must not be retried with back-off, shard after shard"


def test_progress_is_printed_during_a_long_download(hub, tmp_path, capsys):
    hub.pace[shard_name(0)] = (20_000, 0.1)  # takes a second or two, fast enough to finish
    failed = download.download_shards([0], str(tmp_path), Downloader(hub.endpoint), workers=1, progress_every=0.3)
    out = capsys.readouterr().out
    assert failed == {} and "MB received in" in out
    assert (tmp_path / shard_name(0)).read_bytes() == hub.files[shard_name(0)]


def test_an_endless_body_is_cut_at_the_size_limit(hub, tmp_path):
    hub.endless.add(shard_name(0))
    result = Downloader(hub.endpoint, attempts=1, max_bytes=1_000_000).fetch(0, str(tmp_path))
    assert result.status == "failed" and "grew past 1,000,000 bytes" in result.detail
    assert names_in(tmp_path) == []  # nothing kept, no temporary file left


def test_shards_copied_in_by_hand_are_kept(hub, tmp_path):
    data = tmp_path / "cache" / "data"
    data.mkdir(parents=True)
    (data / shard_name(0)).write_bytes(hub.files[shard_name(0)])  # an offline machine, seeded
    proc = run_script(["prepare.py", "--num-shards", "2"],
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "data: 2 downloaded, 1 already present" in proc.stdout
    assert shard_name(0) not in hub.requests and (data / shard_name(0)).read_bytes() == hub.files[shard_name(0)]


def test_a_file_of_the_users_behind_a_linked_data_folder_is_never_rewritten(hub, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / shard_name(0)).write_bytes(b"the user's own file")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    os.symlink(mine, cache_dir / "data")
    proc = run_script(["prepare.py", "--num-shards", "1"],
                      env={"HF_ENDPOINT": hub.endpoint, "AUTORESEARCH_CACHE_DIR": str(cache_dir)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert str(cache_dir / "data" / shard_name(0)) in proc.stderr and "is not a readable parquet file" in proc.stderr
    assert (mine / shard_name(0)).read_bytes() == b"the user's own file" and shard_name(0) not in hub.requests


def test_sigterm_stops_prepare_with_a_line_and_no_partial_file(hub, tmp_path):
    hub.pace[shard_name(0)] = (2000, 0.05)  # a slow download to interrupt
    proc = subprocess.Popen([sys.executable, "prepare.py", "--num-shards", "1"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **TEST_ENV, "HF_ENDPOINT": hub.endpoint,
                                 "AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.stdout.readline().startswith("data: ")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "stopped (SIGTERM)" in err.strip().splitlines()[-1]
    for name in names_in(tmp_path / "cache" / "data"):  # whole shards only (the fast one may have finished)
        assert (tmp_path / "cache" / "data" / name).read_bytes() == hub.files[name]
    assert shard_name(0) not in names_in(tmp_path / "cache" / "data")
