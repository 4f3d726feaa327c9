"""Fetching shards from the hub (or a mirror, HF_ENDPOINT). DO NOT CHANGE: prepare.py drives it.

Parallel downloads, several attempts each with back-off, a body streamed to a temporary file that gets the shard's
name only when its size matches and every row group decodes; stalls, endless bodies and unreachable hosts each end
in one line. HF_HUB_OFFLINE and HF_TOKEN follow the hub's conventions.
"""
import dataclasses
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Optional

import requests
import urllib3

from autoresearch.cache import list_shards, parquet_problem
from autoresearch.errors import UserError
from autoresearch.record import atomic_path, pid_alive
from constants import DATA_DIR, HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN, MAX_SHARD, VAL_SHARD, shard_name, shard_url


class HubUnreachable(Exception):
    """No connection could be made: retrying other shards cannot help either."""


@dataclasses.dataclass
class Fetched:
    """What became of one shard: 'downloaded', 'present' or 'failed', with detail in words."""
    status: str
    detail: str
    missing: bool = False  # the hub answered that the file is not there (HTTP 404, 410): asking again cannot help


@dataclasses.dataclass
class Downloader:
    """How shards are fetched: attempts with back-off, and limits on connecting, stalls and size."""
    endpoint: str = HF_ENDPOINT
    attempts: int = 5
    backoff: float = 1.0
    stall: float = 60.0  # seconds without a byte (requests' read timeout)
    connect_timeout: float = 10.0
    max_bytes: int = 1 << 30  # a shard of the hub's dataset is far smaller
    on_bytes: Callable[[int], None] = lambda n: None
    cancel: Optional[threading.Event] = None  # when set, downloads in progress stop at their next piece
    offline: bool = HF_HUB_OFFLINE  # never download (HF_HUB_OFFLINE=1): only verify what is already there
    token: str = HF_TOKEN  # sent as a bearer token (HF_TOKEN), for gated datasets and private mirrors

    def fetch(self, index, data_dir=DATA_DIR):
        """Fetch one shard unless it is here; it gets its name only whole (size and every row group checked)."""
        final = os.path.join(data_dir, shard_name(index))
        if os.path.exists(final):
            return Fetched("present", "already present")
        url = shard_url(index, self.endpoint)
        if self.offline:
            return Fetched("failed", "not downloaded: HF_HUB_OFFLINE is set")
        error = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            t0 = time.time()
            try:
                with atomic_path(final) as tmp:
                    size = self._download(url, tmp)
                return Fetched("downloaded", f"{size / 1e6:.1f} MB in {time.time() - t0:.1f}s")
            except PermanentHTTPError as e:
                return Fetched("failed", str(e), missing=e.missing)  # retrying cannot help
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
                error = f"{type(e).__name__} for {url}: {e}"
                if self.cancel is not None and self.cancel.is_set():
                    break
                if attempt < self.attempts:
                    print(f"{shard_name(index)}: attempt {attempt} failed ({error}); retrying", flush=True)
                    time.sleep(self.backoff * 2 ** (attempt - 1))
        return Fetched("failed", f"{self.attempts} attempts, last: {error}")

    def _download(self, url, path):
        """One attempt: stream url's body into path and check it; returns its size. Raises on any failure."""
        headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        try:
            r = requests.get(url, stream=True, timeout=(self.connect_timeout, self.stall), headers=headers)
        except requests.ConnectionError as e:  # refused, unknown host, no route, connect timeout
            reason = getattr(e.args[0], "reason", None) if e.args else None
            if isinstance(e, requests.exceptions.ConnectTimeout) or isinstance(
                    reason, urllib3.exceptions.ConnectTimeoutError):
                raise HubUnreachable(f"cannot connect to {url} ({reason or e})")
            raise
        with r:
            if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                missing = r.status_code in (404, 410)
                raise PermanentHTTPError(f"HTTP {r.status_code} for {url}" + (
                    ": the file is not there" if missing else
                    ": access refused (a gated or private dataset needs HF_TOKEN)" if r.status_code in (401, 403)
                    else ""), missing)
            r.raise_for_status()
            expected = r.headers.get("Content-Length")
            limit = int(expected) if expected and expected.isdigit() else self.max_bytes
            with open(path, "wb") as f:
                size = self._stream(r, f, limit)
        if expected is not None and size != int(expected):
            raise OSError(f"got {size} of {expected} bytes")
        problem = parquet_problem(path)
        if problem:
            raise OSError(f"the downloaded file {problem}")
        return size

    def _stream(self, r, f, limit):
        """Copy a body into f, abandoning one that grows past `limit` (a stop is requests' read timeout)."""
        size = 0
        while chunk := r.raw.read1(1 << 20):
            f.write(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(f"the body grew past {limit:,} bytes (its Content-Length, or the limit for a shard)")
            if self.cancel is not None and self.cancel.is_set():
                raise OSError("cancelled")
            self.on_bytes(len(chunk))
        return size


class PermanentHTTPError(Exception):
    """A 4xx answer other than 408/429: asking again cannot help. `missing`: the file is not there (404, 410)."""

    def __init__(self, message, missing=False):
        super().__init__(message)
        self.missing = missing


def download_shards(indices, data_dir=DATA_DIR, downloader=None, workers=8, progress_every=30.0):
    """Download shards in parallel, with progress lines; returns {name: Fetched} of those that failed."""
    downloader = downloader or Downloader()
    os.makedirs(data_dir, exist_ok=True)
    for name in os.listdir(data_dir):  # what an interrupted prepare.py left (not another one's, still going)
        left = re.fullmatch(r"shard_\d{5}\.parquet\.(\d+)\.\d+\.tmp", name)
        if left and not pid_alive(left.group(1)):
            os.remove(os.path.join(data_dir, name))
    counts, failed = {"downloaded": 0, "present": 0, "failed": 0}, {}
    received, lock, unreachable, cancel = [0], threading.Lock(), [], threading.Event()

    def count_bytes(n):
        with lock:
            received[0] += n

    counting = dataclasses.replace(downloader, on_bytes=count_bytes, cancel=cancel)

    def fetch_one(index):
        if unreachable or cancel.is_set():
            return None  # not attempted: the hub cannot be reached
        try:
            return counting.fetch(index, data_dir)
        except HubUnreachable as e:
            unreachable.append(str(e))
            return Fetched("failed", str(e))

    t0 = last_line = time.time()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = {pool.submit(fetch_one, index): index for index in indices}
        try:
            while pending:
                done, _ = wait(pending, timeout=progress_every, return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda fu: pending[fu]):
                    index = pending.pop(future)
                    attempted = future.result()
                    result = attempted or Fetched("failed", "not attempted")
                    counts[result.status] += 1
                    if result.status == "failed":
                        failed[shard_name(index)] = result
                    if attempted is not None and not (unreachable and result.status == "failed"):
                        print(f"[{sum(counts.values())}/{len(indices)}] {shard_name(index)}: {result.status} "
                              f"({result.detail})", flush=True)
                        last_line = time.time()
                if time.time() - last_line >= progress_every:
                    elapsed = time.time() - t0
                    print(f"data: {sum(counts.values())}/{len(indices)} shards done, {received[0] / 1e6:.0f} MB "
                          f"received in {elapsed:.0f}s ({received[0] / 1e6 / elapsed:.1f} MB/s)", flush=True)
                    last_line = time.time()
        except BaseException:
            cancel.set()
            raise
    if unreachable:  # (one line: the shards' own failures all say the same)
        raise UserError(f"{unreachable[0]}: check the network or HF_ENDPOINT and run prepare.py again "
                        f"({counts['failed']} of {len(indices)} shards not fetched; whole shards are kept), or "
                        "prepare offline from text you have, e.g. Python's standard library (README.md, 'Quick "
                        "start'): `uv run prepare.py --source DIR`")
    print(f"data: {counts['downloaded']} downloaded, {counts['present']} already present, {counts['failed']} failed",
          flush=True)
    return failed


def fetch_hub_shards(num_shards, workers):
    """Download training shards 0..num_shards-1 (-1: all) and the validation shard; returns all names."""
    n = MAX_SHARD if num_shards == -1 else min(num_shards, MAX_SHARD)
    have = {int(os.path.basename(p)[6:11]) for p in list_shards("train")}
    indices = sorted(set(range(n)) | have) + [VAL_SHARD]
    extra = len(indices) - 1 - n
    print(f"data: {len(indices)} shards ({n} training{f' + {extra} already here' if extra else ''} + the "
          f"validation shard) from {HF_ENDPOINT} into {DATA_DIR}", flush=True)
    failed = download_shards(indices, downloader=Downloader(), workers=workers)
    if failed:
        names = sorted(failed)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        if HF_HUB_OFFLINE:
            why = ("HF_HUB_OFFLINE=1 forbids downloading them: unset it, or prepare from text of your own with "
                   "`uv run prepare.py --source DIR`")
        elif all(f.missing for f in failed.values()):
            why = (f"{HF_ENDPOINT} does not have them (HTTP 404): a mirror that lacks them, or the wrong "
                   "HF_ENDPOINT; --num-shards fewer asks for less")
        else:
            why = "run prepare.py again to retry (whole shards are kept)"
        raise UserError(f"{len(names)} of {len(indices)} shards are missing: {shown}: {why}")
    return [shard_name(i) for i in indices]
