"""One-time data and tokenizer preparation, plus the runtime utilities train.py imports. DO NOT CHANGE the
evaluation (evaluate_bpb, get_token_bytes, the val split of make_dataloader): it is the ground truth.

    uv run prepare.py                      # download 10 training shards + the validation shard, train the tokenizer
    uv run prepare.py --num-shards 40      # more training data (-1 = all 6542 training shards)
    uv run prepare.py --source DIR         # offline: a local corpus (.parquet/.jsonl/.txt/.md) instead of the hub

Steps, each skipped when its output is already in the cache and verifies (see constants.py for the layout):
1. data: parquet shards with one `text` column, from the hub (HF_ENDPOINT) or built from --source;
2. tokenizer: byte-level BPE trained with rustbpe, stored as plain text + JSON (no pickle) and run by tiktoken;
3. tokens: every shard tokenized once into a flat uint16 array + document offsets, so the training loader
   only packs rows and never tokenizes on the hot path.
The cache's manifest.json records where the data came from and every file's size and checksum: a rerun
re-verifies everything and repairs what does not match, and train.py refuses files that do not match it.
"""
import argparse
import base64
import bisect
import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import stat
import subprocess
import threading
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken
import torch
import urllib3

try:
    import fcntl  # POSIX file locks; without them (Windows) prepare.py runs unlocked
except ImportError:
    fcntl = None

from constants import (BOS_TOKEN, CACHE_DIR, DATA_DIR, DATASET_REPO, DEFAULT_NUM_SHARDS, DEVICE, EVAL_TOKENS,
                       HF_ENDPOINT, LOADER_BUFFER_DOCS, LOADER_REFILL_DOCS, LOCK_PATH, MANIFEST_PATH, MAX_SEQ_LEN,
                       MAX_SHARD, SPECIAL_TOKENS, SPLIT_PATTERN, TOKENIZER_DIR, TOKENIZER_MAX_CHARS,
                       TOKENIZER_MAX_DOC_CHARS, TOKENS_DIR, VAL_SHARD, VOCAB_SIZE, shard_name, shard_url)

PREPARE_HINT = "run `uv run prepare.py` (or `uv run prepare.py --source DIR` for a local corpus) first"


class SetupError(SystemExit):
    """A user-facing problem (missing data, bad input): exits with one line on stderr, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------------------------------------------------------
# Device

# The oldest Linux driver each CUDA major version runs on (CUDA's minor-version compatibility; NVIDIA's CUDA
# Toolkit release notes). torch's default Linux wheels on PyPI are built with CUDA 13.0 as of torch 2.11.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
DRIVER_HELP = "see README.md, 'Older NVIDIA drivers' (or set AUTORESEARCH_DEVICE=cpu to run on the CPU anyway)"


def nvidia_driver_version(proc_file="/proc/driver/nvidia/version"):
    """The loaded NVIDIA kernel driver's version ('550.54.14'), or None where there is none: from
    /proc/driver/nvidia/version on Linux, else from nvidia-smi."""
    try:
        with open(proc_file, encoding="utf-8", errors="replace") as f:
            found = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+(?:\.\d+)+)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            return out[0] if out and re.fullmatch(r"\d+(\.\d+)+", out[0]) else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def unusable_gpu_problem(cuda_available, driver_version, torch_cuda_version, torch_version=torch.__version__):
    """One line when an NVIDIA GPU is present (a driver is loaded) but torch cannot use it, else None."""
    if cuda_available or driver_version is None:
        return None
    if torch_cuda_version is None:
        return (f"an NVIDIA GPU is present (driver {driver_version}) but torch {torch_version} is a build without "
                f"CUDA: {DRIVER_HELP}")
    need = MIN_DRIVER.get(int(torch_cuda_version.split(".")[0]))
    if need is not None and int(driver_version.split(".")[0]) < need:
        return (f"the NVIDIA driver is {driver_version}, but torch {torch_version} (CUDA {torch_cuda_version}) "
                f"needs driver >= {need}: update the driver, or install a torch built for an older CUDA: "
                f"{DRIVER_HELP}")
    return (f"an NVIDIA GPU is present (driver {driver_version}) but torch {torch_version} cannot use it "
            f"(check nvidia-smi and CUDA_VISIBLE_DEVICES): {DRIVER_HELP}")


def get_device():
    """The training device, detected at run time: AUTORESEARCH_DEVICE if set, else cuda, then mps, then cpu. An
    NVIDIA GPU that torch cannot use (an old driver, a CPU-only torch) is an error, not a silent CPU run."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if DEVICE == "cpu":
        return torch.device("cpu")
    if DEVICE == "mps" and not mps:
        raise SetupError("AUTORESEARCH_DEVICE=mps, but torch cannot use Apple's GPU here")
    if DEVICE != "mps":
        if torch.cuda.is_available():
            return torch.device("cuda")
        problem = unusable_gpu_problem(False, nvidia_driver_version(), torch.version.cuda)
        if problem:
            raise SetupError(problem)
        if DEVICE == "cuda":
            raise SetupError("AUTORESEARCH_DEVICE=cuda, but torch finds no CUDA GPU (no NVIDIA driver is loaded)")
    return torch.device("mps") if mps else torch.device("cpu")


def describe_device():
    """Which device train.py will use, in words, or why it cannot start."""
    try:
        device = get_device()
    except SetupError as e:
        return f"train.py cannot start: {str(e.code)[len('error: '):]}"
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return f"train.py will run on {device.type}{name}"


# ---------------------------------------------------------------------------------------------------------------
# Parquet shards

def _text_column_problem(schema):
    """Why a parquet schema cannot be read as documents, or None: a `text` column of strings (or all nulls)."""
    if "text" not in schema.names:
        return f"has no `text` column (columns: {', '.join(schema.names)})"
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
            or getattr(pa.types, "is_string_view", lambda t: False)(kind)):
        return f"has a `text` column of {kind}, not strings"
    return None


def read_parquet_texts(path):
    """Yield the `text` column of a parquet file as one list of str per row group, in order (null -> "")."""
    try:
        pf = pq.ParquetFile(path)
        problem = _text_column_problem(pf.schema_arrow)
        if problem:
            raise SetupError(f"{path} {problem}")
        for rg in range(pf.num_row_groups):
            yield [t or "" for t in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()]
    except (pa.ArrowException, OSError) as e:
        raise SetupError(f"{path} is not a readable parquet file ({e})")


def parquet_problem(path):
    """Why a parquet file is not a whole shard, or None: its footer reads, its `text` column holds strings and
    every row group decodes (the check before a downloaded file gets its final name)."""
    try:
        pf = pq.ParquetFile(path)
        problem = _text_column_problem(pf.schema_arrow)
        if problem:
            return problem
        for rg in range(pf.num_row_groups):
            pf.read_row_group(rg, columns=["text"])
        return None
    except (pa.ArrowException, OSError) as e:
        return f"is not a readable parquet file ({e})"


def install(tmp, path):
    """Give a finished file its final name, replacing whatever is there (a folder too: the name is the cache's)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_parquet(texts, path):
    tmp = path + ".tmp"
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=1024,
                   compression="zstd")
    install(tmp, path)


SHARD_RE = re.compile(r"shard_(\d{5})\.parquet")


def list_shards(split, data_dir=DATA_DIR):
    """Sorted parquet paths of a split present in data_dir: val is the pinned shard, train every other shard."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    names = sorted(n for n in os.listdir(data_dir) if SHARD_RE.fullmatch(n)) if os.path.isdir(data_dir) else []
    val = shard_name(VAL_SHARD)
    names = [n for n in names if (n == val) == (split == "val")]
    return [os.path.join(data_dir, n) for n in names]


# ---------------------------------------------------------------------------------------------------------------
# The manifest: where the cache came from, and every file's size and checksum, so that nothing is used that does
# not match what wrote it. Plain JSON in CACHE_DIR/manifest.json:
#   {"format": 1, "source": {...}, "tokenizer": fingerprint or null,
#    "files": {"data/shard_00000.parquet": {"size": .., "sha256": .., "mtime_ns": ..}, "tokenizer/ranks.txt": ..,
#              "tokens/<fingerprint>/shard_00000.tokens.npy": {"size", "sha256", "sample", "from", "n_tokens",
#              "n_docs", "dtype"}, "tokens/<fingerprint>/shard_00000.index.npz": {"size", "sha256"}}}
# source: {"kind": "hub", "dataset": .., "endpoint": ..} or {"kind": "local", "path": .., "digest": ..}.

MANIFEST_FORMAT = 1
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 4096  # a spot checksum: 64 blocks of 4 KB spread over the file


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def sample_sha256(path):
    """Checksum of the file's size and 64 evenly spread 4 KB blocks: reads 256 KB whatever the file's size, so
    train.py can check every training token file at start; a truncated, swapped or rewritten file fails it."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        for i in range(SAMPLE_BLOCKS):
            f.seek(i * max(0, size - SAMPLE_BLOCK_BYTES) // (SAMPLE_BLOCKS - 1))
            h.update(f.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest()


TOKENIZER_RELS = ("tokenizer/ranks.txt", "tokenizer/tokenizer.json")


def repair_command(source):
    """The command that rebuilds a cache from its recorded source."""
    if source and source.get("kind") == "local":
        return f"uv run prepare.py --source {source['path']}"
    return "uv run prepare.py"


def describe_source(source):
    if source.get("kind") == "local":
        return f"--source {source['path']}"
    return f"{source.get('dataset')} from {source.get('endpoint')}"


class Manifest:
    """The cache's record of itself. Paths are relative to the cache folder."""

    def __init__(self, source, cache_dir=CACHE_DIR):
        self.cache_dir = cache_dir
        self.data = {"format": MANIFEST_FORMAT, "source": source, "tokenizer": None, "files": {}}

    @property
    def source(self):
        return self.data["source"]

    @property
    def files(self):
        return self.data["files"]

    @classmethod
    def load(cls, path=MANIFEST_PATH):
        """The manifest, None when there is none; SetupError when it cannot be read."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise SetupError(f"{path} cannot be read ({e}); rerun prepare.py to rebuild the cache")
        if (not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT
                or not isinstance(data.get("files"), dict) or not isinstance(data.get("source"), dict)):
            raise SetupError(f"{path} is not a manifest this version wrote; rerun prepare.py to rebuild the cache")
        manifest = cls(data["source"], os.path.dirname(path))
        manifest.data = data
        return manifest

    @classmethod
    def load_required(cls):
        """The cache's manifest, or SetupError pointing at prepare.py when there is none (for readers)."""
        manifest = cls.load()
        if manifest is None:
            raise SetupError(f"no prepared cache in {CACHE_DIR} (no manifest.json): {PREPARE_HINT}")
        return manifest

    def save(self):
        path = os.path.join(self.cache_dir, os.path.basename(MANIFEST_PATH))
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)

    def path(self, rel):
        return os.path.join(self.cache_dir, rel)

    def rel(self, path):
        return os.path.relpath(path, self.cache_dir).replace(os.sep, "/")

    def record(self, path, **extra):
        """Record a file as it is now: its size, its sha256 and the extra fields given."""
        self.files[self.rel(path)] = {"size": os.path.getsize(path), "sha256": file_sha256(path), **extra}

    def forget(self, prefix):
        for rel in [r for r in self.files if r.startswith(prefix)]:
            del self.files[rel]

    def problem(self, rel, level="full"):
        """Why the file does not match its record, or None. level: 'size' (and the mtime where recorded, a cheap
        sign of a rewrite), 'sample' (size, mtime, the spot checksum where recorded), 'full' (size and the whole
        file's sha256, which decides alone: a file only touched still matches)."""
        entry = self.files.get(rel)
        if entry is None:
            return "is not in the cache's manifest"
        path = self.path(rel)
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return "is not a regular file"
            if st.st_size != entry["size"]:
                return f"has {st.st_size} bytes, the manifest says {entry['size']}"
            if level != "full" and "mtime_ns" in entry and st.st_mtime_ns != entry["mtime_ns"]:
                return "was modified after prepare.py recorded it"
            if level == "sample" and "sample" in entry and sample_sha256(path) != entry["sample"]:
                return "does not match its checksum"
            if level == "full" and file_sha256(path) != entry["sha256"]:
                return "does not match its checksum"
        except FileNotFoundError:
            return "is missing"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        return None

    def require(self, rel, level="full"):
        """SetupError naming the file and the command that repairs the cache, unless the file matches."""
        problem = self.problem(rel, level)
        if problem:
            raise SetupError(f"{self.path(rel)} {problem}: run `{repair_command(self.source)}` to repair the cache")


@contextlib.contextmanager
def cache_lock(cache_dir=CACHE_DIR):
    """Hold the cache's lock for the whole of prepare.py: one writer at a time, and train.py waits for none."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SetupError(f"the cache {cache_dir} is not a folder: move that file away or set AUTORESEARCH_CACHE_DIR")
    except OSError as e:
        raise SetupError(f"cannot create the cache {cache_dir} ({e.strerror or e}): set AUTORESEARCH_CACHE_DIR "
                         "to a writable folder")
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise SetupError(f"the cache {cache_dir} is not writable: fix its permissions or set AUTORESEARCH_CACHE_DIR")
    path = os.path.join(cache_dir, os.path.basename(LOCK_PATH))
    with open(path, "a+", encoding="utf-8") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise SetupError(f"another prepare.py (pid {f.read().strip() or '?'}) is working on {cache_dir}: "
                                 "wait for it to finish")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # the lock itself is released when the file closes


def check_not_locked(lock_path=LOCK_PATH):
    """Refuse to read the cache while a prepare.py is writing it."""
    if fcntl is None or not os.path.exists(lock_path):
        return
    try:
        with open(lock_path, encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SetupError(f"prepare.py (pid {f.read().strip() or '?'}) is writing the cache "
                                 f"{os.path.dirname(lock_path)}: wait for it to finish, then run again")
    except OSError:
        return  # an unreadable lock file: nothing can hold it through us either


# ---------------------------------------------------------------------------------------------------------------
# Download

class HubUnreachable(Exception):
    """No connection could be made: retrying other shards cannot help either."""


def _stream_to(r, f, stall, min_rate, window, on_bytes):
    """Copy a streamed response body into file f; returns (bytes, sha256 hex). read1 returns as soon as any bytes
    arrive, so a body that stops (no byte for `stall` s: the socket's read timeout) or trickles (under
    `min_rate` bytes/s over a `window` s) is abandoned instead of hanging."""
    h, size = hashlib.sha256(), 0
    window_start, window_bytes = time.monotonic(), 0
    while chunk := r.raw.read1(1 << 20):
        f.write(chunk)
        h.update(chunk)
        size += len(chunk)
        window_bytes += len(chunk)
        on_bytes(len(chunk))
        now = time.monotonic()
        if now - window_start >= window:
            if window_bytes < min_rate * (now - window_start):
                raise OSError(f"too slow: {window_bytes / (now - window_start) / 1e3:.1f} KB/s over "
                              f"{now - window_start:.0f}s (at least {min_rate / 1e3:.0f} KB/s needed)")
            window_start, window_bytes = now, 0
    return size, h.hexdigest()


def download_shard(index, data_dir=DATA_DIR, endpoint=HF_ENDPOINT, attempts=5, backoff=1.0, known=None,
                   stall=60.0, min_rate=64e3, window=60.0, connect_timeout=10.0, on_bytes=lambda n: None):
    """Fetch one shard unless a whole copy is already there. Returns (status, detail, record): status in
    ok/skip/fail, record the shard's {"size", "sha256", "mtime_ns"} (None on failure).

    known: the manifest's record of this shard; a file under the final name is kept if it matches that record
    (or, unrecorded, if every row group decodes). The body streams to a temporary file that is renamed only
    after its byte count matches Content-Length and every row group decodes, so a file under its final name is
    always whole. Raises HubUnreachable when no connection can be made."""
    final = os.path.join(data_dir, shard_name(index))
    if os.path.exists(final):
        if known is not None:
            if os.path.getsize(final) == known["size"] and file_sha256(final) == known["sha256"]:
                return "skip", "already present, checksum matches", {**known, "mtime_ns": os.stat(final).st_mtime_ns}
            detail = "does not match the manifest"
        else:
            detail = parquet_problem(final)
            if detail is None:
                st = os.stat(final)
                return "skip", "already present, whole", {"size": st.st_size, "sha256": file_sha256(final),
                                                          "mtime_ns": st.st_mtime_ns}
        print(f"{shard_name(index)}: {detail}: fetching it again", flush=True)
        os.remove(final)
    url = shard_url(index, endpoint)
    tmp = f"{final}.{os.getpid()}.{threading.get_ident()}.part"
    error = "no attempt made"
    for attempt in range(1, attempts + 1):
        t0 = time.time()
        try:
            try:
                r = requests.get(url, stream=True, timeout=(connect_timeout, stall),
                                 headers={"Accept-Encoding": "identity"})
            except requests.ConnectionError as e:  # refused, unknown host, no route, connect timeout
                reason = getattr(e.args[0], "reason", None) if e.args else None
                if isinstance(e, requests.exceptions.ConnectTimeout) or isinstance(
                        reason, urllib3.exceptions.ConnectTimeoutError):
                    raise HubUnreachable(f"cannot connect to {url} ({reason or e})")
                raise
            with r:
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    return "fail", f"HTTP {r.status_code} for {url}", None  # permanent: retrying cannot help
                r.raise_for_status()
                expected = r.headers.get("Content-Length")
                with open(tmp, "wb") as f:
                    size, sha = _stream_to(r, f, stall, min_rate, window, on_bytes)
            if expected is not None and size != int(expected):
                raise OSError(f"got {size} of {expected} bytes")
            problem = parquet_problem(tmp)
            if problem:
                raise OSError(f"the downloaded file {problem}")
            install(tmp, final)
            return "ok", f"{size / 1e6:.1f} MB in {time.time() - t0:.1f}s", {
                "size": size, "sha256": sha, "mtime_ns": os.stat(final).st_mtime_ns}
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            error = f"{type(e).__name__} for {url}: {e}"
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt < attempts:
                print(f"{shard_name(index)}: attempt {attempt} failed ({error}); retrying", flush=True)
                time.sleep(backoff * 2 ** (attempt - 1))
    return "fail", f"{attempts} attempts, last: {error}", None


def download_shards(indices, data_dir=DATA_DIR, endpoint=HF_ENDPOINT, workers=8, manifest=None,
                    progress_every=30.0, **kwargs):
    """Download shards in parallel: one line per shard as it ends, a progress line at least every
    `progress_every` seconds. With a manifest, each shard is checked against its record and recorded when whole.
    Returns the names of the shards that failed; a connection that cannot be made (refused, unknown host)
    stops the remaining shards and ends in SetupError."""
    os.makedirs(data_dir, exist_ok=True)
    for name in os.listdir(data_dir):  # leftovers of an interrupted run
        if name.endswith((".part", ".tmp")):
            os.remove(os.path.join(data_dir, name))
    counts, failed = {"ok": 0, "skip": 0, "fail": 0}, []
    received, lock, unreachable = [0], threading.Lock(), []

    def on_bytes(n):
        with lock:
            received[0] += n

    def one(index):
        if unreachable:
            return "fail", "not attempted: the hub cannot be reached", None
        rel = f"data/{shard_name(index)}"
        known = manifest.files.get(rel) if manifest is not None else None
        try:
            return download_shard(index, data_dir, endpoint, known=known, on_bytes=on_bytes, **kwargs)
        except HubUnreachable as e:
            unreachable.append(str(e))
            return "fail", str(e), None

    t0 = last_line = last_save = time.time()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = {pool.submit(one, index): index for index in indices}
        while pending:
            done, _ = wait(pending, timeout=progress_every, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=lambda fu: pending[fu]):
                index = pending.pop(future)
                status, detail, record = future.result()
                counts[status] += 1
                if status == "fail":
                    failed.append(shard_name(index))
                if not detail.startswith("not attempted"):
                    print(f"[{sum(counts.values())}/{len(indices)}] {shard_name(index)}: {status} ({detail})",
                          flush=True)
                    last_line = time.time()
                if record is not None and manifest is not None:
                    manifest.files[f"data/{shard_name(index)}"] = record
            if manifest is not None and time.time() - last_save >= 10:
                manifest.save()  # every 10 s, not per shard: 6543 records rewritten per shard add up to GBs
                last_save = time.time()
            if time.time() - last_line >= progress_every:
                elapsed = time.time() - t0
                print(f"data: {sum(counts.values())}/{len(indices)} shards done, {received[0] / 1e6:.0f} MB "
                      f"received in {elapsed:.0f}s ({received[0] / 1e6 / elapsed:.1f} MB/s)", flush=True)
                last_line = time.time()
    if manifest is not None:
        manifest.save()  # (a shard not yet recorded when a run is killed is checked whole and kept next time)
    print(f"data: {counts['ok']} downloaded, {counts['skip']} already present, {counts['fail']} failed", flush=True)
    if unreachable:
        raise SetupError(f"{unreachable[0]}: check the network or HF_ENDPOINT, then run prepare.py again "
                         f"({counts['fail']} of {len(indices)} shards not fetched; whole shards are kept)")
    return failed


# ---------------------------------------------------------------------------------------------------------------
# A local corpus (--source), read-only

SOURCE_EXTENSIONS = (".parquet", ".jsonl", ".txt", ".md")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(text):
    """A str that encodes as UTF-8: lone surrogates (possible in JSON escapes) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)


def check_source_folder(source, cache_dir=CACHE_DIR):
    """The --source folder as an absolute path, or SetupError: it must be an existing folder that neither holds
    the cache nor lies inside it (the cache's own shards would be read back, or deleted)."""
    if not source or not source.strip():
        raise SetupError("--source needs a folder (got an empty string)")
    if not os.path.exists(source):
        raise SetupError(f"--source folder {source} does not exist")
    if not os.path.isdir(source):
        raise SetupError(f"--source {source} is a file, not a folder: give the folder that holds it")
    real, cache = os.path.realpath(source), os.path.realpath(cache_dir)
    if real == cache or real.startswith(cache + os.sep) or cache.startswith(real + os.sep):
        raise SetupError(f"--source {source} and the cache {cache_dir} overlap: choose a folder outside the cache "
                         "that does not contain it (or set AUTORESEARCH_CACHE_DIR elsewhere)")
    return real


def iter_source_documents(source, skipped=None):
    """Documents of a local corpus, files in sorted path order: .parquet (`text` column), .jsonl (`text` field),
    .txt / .md (one document per file). Opens files for reading only. Entries that are not readable regular files
    (FIFOs, sockets, broken links, no permission) are skipped and counted in `skipped` (a dict)."""
    skipped = {} if skipped is None else skipped
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(SOURCE_EXTENSIONS):
                skipped["other file types"] = skipped.get("other file types", 0) + 1
                continue
            path = os.path.join(root, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = False  # a broken link
            if not regular or not os.access(path, os.R_OK):
                skipped["not readable regular files"] = skipped.get("not readable regular files", 0) + 1
                continue
            if name.endswith(".parquet"):
                for texts in read_parquet_texts(path):
                    yield from (t for t in texts if t)
            elif name.endswith(".jsonl"):
                with open(path, encoding="utf-8", errors="replace") as f:
                    for lineno, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)["text"]
                        except (ValueError, KeyError, TypeError):
                            raise SetupError(f"{path}:{lineno} is not a JSON object with a `text` field")
                        if text is not None and not isinstance(text, str):
                            raise SetupError(f"{path}:{lineno}: `text` is a {type(text).__name__}, not a string")
                        if text:
                            yield _clean(text)
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if text:
                    yield text


def read_source(source):
    """(documents, digest) of a local corpus; the digest identifies exactly what was read."""
    skipped = {}
    docs = list(iter_source_documents(source, skipped))
    digest = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    if skipped:
        print(f"source: skipped {', '.join(f'{n} {what}' for what, n in sorted(skipped.items()))} in {source}")
    if len(docs) < 2:
        raise SetupError(f"--source {source} holds {len(docs)} document(s) in .parquet/.jsonl/.txt/.md files; "
                         "need at least 2 (one for validation, one for training)")
    return docs, digest.hexdigest()


def write_source_shards(docs, data_dir=DATA_DIR, val_fraction=0.1, max_val_bytes=80e6, shard_bytes=40e6):
    """Write documents as shards in the cache layout, replacing the shards already in data_dir. The validation
    shard holds the documents with the smallest content hashes (about val_fraction of the bytes, at most
    max_val_bytes): the split depends only on the documents, not on how files are named or ordered. The rest
    become training shards, in order. Returns (number of training shards, validation documents, validation
    bytes)."""
    sizes = [len(d.encode("utf-8")) for d in docs]
    by_hash = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i].encode("utf-8")).digest())
    target = min(val_fraction * sum(sizes), max_val_bytes)
    val, val_bytes = set(), 0
    for i in by_hash[:-1]:  # leave at least one document for training
        if val and val_bytes >= target:
            break
        val.add(i)
        val_bytes += sizes[i]
    os.makedirs(data_dir, exist_ok=True)
    for name in os.listdir(data_dir):  # only the shards: a data folder may hold other files of the user's
        if SHARD_RE.fullmatch(name):
            os.remove(os.path.join(data_dir, name))
    write_parquet([docs[i] for i in sorted(val)], os.path.join(data_dir, shard_name(VAL_SHARD)))
    shard, size, n = [], 0, 0
    for i, doc in enumerate(docs):
        if i in val:
            continue
        shard.append(doc)
        size += sizes[i]
        if size >= shard_bytes:
            write_parquet(shard, os.path.join(data_dir, shard_name(n)))
            shard, size, n = [], 0, n + 1
    if shard:
        write_parquet(shard, os.path.join(data_dir, shard_name(n)))
        n += 1
    return n, len(val), val_bytes


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """The runtime tokenizer: a tiktoken Encoding built from the BPE ranks that prepare.py trained.

    On disk (TOKENIZER_DIR): `ranks.txt`, one `base64(token bytes) rank` line per learned token, and
    `tokenizer.json` with the split pattern and the special tokens. Plain data only: no pickle, so a
    tampered cache file cannot run code."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=TOKENIZER_DIR):
        ranks_path = os.path.join(tokenizer_dir, "ranks.txt")
        meta_path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not (os.path.exists(ranks_path) and os.path.exists(meta_path)):
            raise SetupError(f"no tokenizer in {tokenizer_dir}: {PREPARE_HINT}")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            ranks = {}
            with open(ranks_path, encoding="ascii") as f:
                for line in f:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
            enc = tiktoken.Encoding(name="autoresearch", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                    special_tokens={k: int(v) for k, v in meta["special_tokens"].items()})
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise SetupError(f"the tokenizer in {tokenizer_dir} is corrupt ({e}): run prepare.py again to "
                             "repair it")
        return cls(enc)

    @staticmethod
    def save(mergeable_ranks, tokenizer_dir=TOKENIZER_DIR, pattern=SPLIT_PATTERN):
        """Write learned ranks [(bytes, rank), ...] with the special tokens appended after them."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        n = len(mergeable_ranks)
        meta = {"pattern": pattern, "special_tokens": {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}}
        tmp = os.path.join(tokenizer_dir, "ranks.txt.tmp")
        with open(tmp, "w", encoding="ascii") as f:
            for token, rank in sorted(mergeable_ranks, key=lambda tr: tr[1]):
                f.write(f"{base64.b64encode(bytes(token)).decode('ascii')} {rank}\n")
        with open(os.path.join(tokenizer_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(tokenizer_dir, "ranks.txt"))  # last: its presence means "complete"

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def _prepend_id(self, prepend):
        return prepend if prepend is None or isinstance(prepend, int) else self.enc.encode_single_token(prepend)

    def encode(self, text, prepend=None, num_threads=8):
        """Encode a str (-> list of ids) or a list of str (-> list of lists). `prepend`: a token id or a special
        token string put in front of each result. Special-token text inside documents is encoded as plain text."""
        prepend = self._prepend_id(prepend)
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        assert isinstance(text, (list, tuple)), f"encode takes a str or a list of str, got {type(text).__name__}"
        return [head + ids for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_byte_lengths(self):
        """Bytes each token id stands for: its own bytes for learned tokens (a token that is part of a UTF-8
        sequence counts only its own bytes), 0 for special tokens."""
        special = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}
        return [0 if i in special else len(self.enc.decode_single_token_bytes(i)) for i in range(self.enc.n_vocab)]

    @functools.cached_property
    def fingerprint(self):
        """Identifies the tokenizer (pattern, every token's bytes), so token files made with another are never used."""
        h = hashlib.sha256(self.enc._pat_str.encode())
        for i in range(self.enc.n_vocab):
            token = self.enc.decode_single_token_bytes(i)
            h.update(len(token).to_bytes(4, "little") + token)
        return h.hexdigest()[:16]


def train_tokenizer(tokenizer_dir=TOKENIZER_DIR, data_dir=DATA_DIR):
    """Train byte-level BPE on the training shards (each document cut to 10k chars, at most 1e9 chars)."""
    paths = list_shards("train", data_dir)
    if not paths:
        raise SetupError(f"no training shards in {data_dir}: {PREPARE_HINT}")

    def texts():
        total = 0
        for path in paths:
            for batch in read_parquet_texts(path):
                for text in batch:
                    text = text[:TOKENIZER_MAX_DOC_CHARS]
                    yield text
                    total += len(text)
                    if total >= TOKENIZER_MAX_CHARS:
                        return

    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(texts(), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    Tokenizer.save(bpe.get_mergeable_ranks(), tokenizer_dir)
    tok = Tokenizer.from_directory(tokenizer_dir)
    sample = "Hello world! 12345 naïve café, 你好世界 🙂 <|reserved_0|>\n\tdone."
    assert tok.decode(tok.encode(sample)) == sample, "tokenizer round trip failed: rerun prepare.py"
    print(f"tokenizer: trained {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s -> {tokenizer_dir}")
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Token files: each shard tokenized once. TOKENS_DIR/<tokenizer fingerprint>/shard_NNNNN.tokens.npy holds the
# documents back to back (BOS first in each), shard_NNNNN.index.npz their offsets and the refill chunks the loader
# reads them in (LOADER_REFILL_DOCS at a time within a parquet row group, as if streaming the parquet). The
# manifest records both files and the checksum of the parquet they were made from.

def token_rels(name, fingerprint):
    """Manifest paths of a shard's token files: (tokens.npy, index.npz)."""
    stem = f"tokens/{fingerprint}/{name[:-len('.parquet')]}"
    return stem + ".tokens.npy", stem + ".index.npz"


def tokenize_shard(parquet_path, tokenizer, manifest):
    """Tokenize one shard and record its token files in the manifest. Returns (tokens, documents)."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    parts, lengths, chunk_ends = [], [], []
    for texts in read_parquet_texts(parquet_path):
        for i in range(0, len(texts), LOADER_REFILL_DOCS):
            docs = tokenizer.encode(texts[i:i + LOADER_REFILL_DOCS], prepend=tokenizer.get_bos_token_id(),
                                    num_threads=os.cpu_count() or 1)
            lengths.extend(len(d) for d in docs)
            parts.append(np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype,
                                     count=sum(len(d) for d in docs)))
            chunk_ends.append(len(lengths))
    name = os.path.basename(parquet_path)
    tok_path, idx_path = (manifest.path(rel) for rel in token_rels(name, tokenizer.fingerprint))
    os.makedirs(os.path.dirname(tok_path), exist_ok=True)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with open(tok_path + ".tmp", "wb") as f:
        np.save(f, np.concatenate(parts) if parts else np.zeros(0, dtype))
    install(tok_path + ".tmp", tok_path)
    with open(idx_path + ".tmp", "wb") as f:
        np.savez(f, offsets=offsets, chunk_ends=np.array(chunk_ends, dtype=np.int64))
    install(idx_path + ".tmp", idx_path)
    manifest.record(tok_path, sample=sample_sha256(tok_path), dtype=np.dtype(dtype).name,
                    n_tokens=int(offsets[-1]), n_docs=len(lengths),
                    **{"from": manifest.files[f"data/{name}"]["sha256"]})
    manifest.record(idx_path)
    return int(offsets[-1]), len(lengths)


def manifest_shards(manifest, split):
    """Sorted shard names of a split that the manifest records."""
    val = shard_name(VAL_SHARD)
    names = sorted(rel[len("data/"):] for rel in manifest.files
                   if rel.startswith("data/") and SHARD_RE.fullmatch(rel[len("data/"):]))
    return [n for n in names if (n == val) == (split == "val")]


def check_token_files(manifest, name, fingerprint, level="size"):
    """A shard's parquet (size, mtime) and token files (tokens.npy at `level`, the small index in full) match the
    manifest, and the tokens were made from that parquet; else SetupError naming the file and the repair."""
    tok_rel, idx_rel = token_rels(name, fingerprint)
    manifest.require(f"data/{name}", "size")
    manifest.require(tok_rel, level)
    manifest.require(idx_rel, "full")
    if manifest.files[tok_rel].get("from") != manifest.files[f"data/{name}"]["sha256"]:
        raise SetupError(f"{manifest.path(tok_rel)} was made from another version of {name}: run "
                         f"`{repair_command(manifest.source)}`")


def open_token_shard(manifest, name, fingerprint):
    """(tokens, offsets, chunk_ends) of one shard, after check_token_files and a check of their structure, so
    that a truncated, emptied, swapped or stale file is refused with one line naming it, never read."""
    check_token_files(manifest, name, fingerprint)
    fix = repair_command(manifest.source)
    tok_rel, idx_rel = token_rels(name, fingerprint)
    try:
        tokens = np.load(manifest.path(tok_rel), mmap_mode="r", allow_pickle=False)
        with np.load(manifest.path(idx_rel), allow_pickle=False) as idx:
            offsets, chunk_ends = idx["offsets"], idx["chunk_ends"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise SetupError(f"the token files of {name} cannot be read ({e}): run `{fix}` to repair the cache")
    entry = manifest.files[tok_rel]
    n_docs = entry["n_docs"]
    sound = (tokens.ndim == 1 and tokens.dtype.name == entry["dtype"] and len(tokens) == entry["n_tokens"]
             and offsets.ndim == 1 and len(offsets) == n_docs + 1 and offsets[0] == 0
             and offsets[-1] == len(tokens) and bool(np.all(np.diff(offsets) >= 1))
             and chunk_ends.ndim == 1 and (n_docs == 0 or (len(chunk_ends) > 0 and chunk_ends[-1] == n_docs))
             and bool(np.all(np.diff(chunk_ends, prepend=0) >= 1)))
    if not sound:
        raise SetupError(f"the token files of {name} are inconsistent (offsets, sizes or dtype): run `{fix}`")
    return tokens, offsets, chunk_ends


def check_cache():
    """train.py's first step: no prepare.py is writing the cache, and every file train.py will read matches the
    manifest: the tokenizer, the index files and the validation tokens by full checksum, the training tokens by
    size and spot checksum (a full one would read gigabytes at every start), every parquet by size and mtime.
    (The loader checks the token files' structure when it opens them.) Returns the tokenizer; anything else
    ends in one line naming the file and the command that repairs it."""
    t0 = time.time()
    check_not_locked()
    manifest = Manifest.load_required()
    fix = repair_command(manifest.source)
    for rel in TOKENIZER_RELS:
        manifest.require(rel, "full")
    tokenizer = Tokenizer.from_directory(manifest.path("tokenizer"))
    if tokenizer.fingerprint != manifest.data["tokenizer"]:
        raise SetupError(f"the tokenizer is not the one the token files were made with: run `{fix}`")
    val, train = manifest_shards(manifest, "val"), manifest_shards(manifest, "train")
    if not val or not train:
        raise SetupError(f"the cache has no {'validation' if not val else 'training'} shard: {PREPARE_HINT}")
    unknown = sorted({os.path.basename(p) for p in list_shards("train") + list_shards("val")} - set(val + train))
    if unknown:
        raise SetupError(f"{os.path.join(DATA_DIR, unknown[0])} is not in the cache's manifest: run `{fix}`")
    for name in val:
        check_token_files(manifest, name, tokenizer.fingerprint, "full")
    for name in train:
        check_token_files(manifest, name, tokenizer.fingerprint, "sample")
    print(f"cache: tokenizer, {len(train)} training shard(s) and the validation shard match the manifest "
          f"({describe_source(manifest.source)}; checked in {time.time() - t0:.1f}s)", flush=True)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Runtime utilities used by train.py

def get_token_bytes(device=None, tokenizer=None):
    """int32 tensor [vocab]: the UTF-8 bytes each token id stands for (0 for special tokens)."""
    tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_directory()
    return torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.int32,
                        device=device if device is not None else get_device())


def _document_chunks(split, tokenizer):
    """Yield (list of 1-D token arrays, epoch) forever: the split's documents in file order, in the refill
    chunks of the parquet row groups. epoch counts passes over the split, starting at 1."""
    manifest = Manifest.load_required()
    names = manifest_shards(manifest, split)
    if not names:
        raise SetupError(f"no {split} shard in {DATA_DIR}: {PREPARE_HINT}")
    if manifest.data["tokenizer"] != tokenizer.fingerprint:
        raise SetupError(f"the cache's token files were made with another tokenizer: run "
                         f"`{repair_command(manifest.source)}`")
    shards = [open_token_shard(manifest, name, tokenizer.fingerprint) for name in names]
    if not any(len(offsets) > 1 for _, offsets, _ in shards):
        raise SetupError(f"the {split} split holds no documents: run `{repair_command(manifest.source)}`")
    epoch = 1
    while True:
        for tokens, offsets, chunk_ends in shards:
            start = 0
            for end in chunk_ends.tolist():
                yield [tokens[offsets[i]:offsets[i + 1]] for i in range(start, end)], epoch
                start = end
        epoch += 1


def pack_rows(tokenizer, B, T, split):
    """Yield (rows, epoch) forever: rows is an int64 numpy array [B, T+1] of best-fit packed documents.

    Each row is filled left to right from a buffer of >= LOADER_BUFFER_DOCS documents (topped up before every
    placement): the longest document that fits in the remaining space goes next; when none fits, the shortest
    one is cropped to fill the row exactly (its rest is dropped). Every row starts with BOS; no padding.
    Ties go to the document that entered the buffer first. The buffer is a list of (length, -arrival) keys
    kept sorted, so each choice is a binary search instead of a scan."""
    chunks = _document_chunks(split, tokenizer)
    keys, docs, arrival, epoch = [], {}, 0, 1
    width = T + 1
    while True:
        rows = np.empty((B, width), dtype=np.int64)
        for r in range(B):
            pos = 0
            while pos < width:
                while len(keys) < LOADER_BUFFER_DOCS:
                    batch, epoch = next(chunks)
                    for doc in batch:
                        bisect.insort(keys, (len(doc), -arrival))
                        docs[arrival] = doc
                        arrival += 1
                remaining = width - pos
                i = bisect.bisect_right(keys, (remaining, 1)) - 1  # longest that fits, earliest among equals
                if i < 0:  # nothing fits: the shortest, earliest among equals, cropped
                    i = bisect.bisect_right(keys, (keys[0][0], 1)) - 1
                n, neg_arrival = keys.pop(i)
                doc = docs.pop(-neg_arrival)
                n = min(n, remaining)
                rows[r, pos:pos + n] = doc[:n]
                pos += n
        yield rows, epoch


def make_dataloader(tokenizer, B, T, split, device=None):
    """Yield (inputs, targets, epoch) forever: int64 tensors [B, T] on `device` (default: the training device),
    targets = inputs shifted by one. On CUDA the rows go through pinned memory with an asynchronous copy;
    PyTorch's pinned-memory allocator does not hand a block out again before the copy reading it is done,
    so a fresh pinned tensor per batch cannot race with the copy of the previous one."""
    device = torch.device(device) if device is not None else get_device()
    pin = device.type == "cuda"
    for rows, epoch in pack_rows(tokenizer, B, T, split):
        host = torch.empty((2, B, T), dtype=torch.int64, pin_memory=pin)
        rows_t = torch.from_numpy(rows)
        host[0].copy_(rows_t[:, :-1])
        host[1].copy_(rows_t[:, 1:])
        dev = host.to(device, non_blocking=pin)
        yield dev[0], dev[1], epoch


def evaluate_bpb(model, tokenizer, batch_size):
    """Validation bits per byte, the fixed metric. DO NOT CHANGE.

    Over EVAL_TOKENS // (batch_size * MAX_SEQ_LEN) batches of the val split: the sum of per-token cross-entropy
    (nats) over targets that stand for at least one byte, divided by ln(2) times the sum of their bytes.
    Special tokens (BOS) as targets are excluded from both sums. The model is called as
    model(x, y, reduction='none') and returns per-token losses."""
    steps = EVAL_TOKENS // (batch_size * MAX_SEQ_LEN)
    assert steps > 0, (f"EVAL_TOKENS={EVAL_TOKENS} is less than one eval batch ({batch_size} x {MAX_SEQ_LEN}): "
                       "raise AUTORESEARCH_EVAL_TOKENS or lower the eval batch size")
    device = next(model.parameters()).device
    token_bytes = get_token_bytes(device, tokenizer)
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    total_nats, total_bytes = 0.0, 0
    with torch.no_grad():
        for _ in range(steps):
            x, y, _ = next(loader)
            loss = model(x, y, reduction="none").reshape(-1).float()
            nbytes = token_bytes[y.reshape(-1)]
            counted = nbytes > 0
            total_nats += torch.where(counted, loss, torch.zeros_like(loss)).sum().item()
            total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------------------------------------------
# CLI

def clear_cache(cache_dir=CACHE_DIR):
    """Remove what prepare.py writes (shards, tokenizer, token files, manifest) and nothing else: the cache
    folder may be one the user chose, holding files of their own."""
    data, tokenizer, tokens = (os.path.join(cache_dir, d) for d in ("data", "tokenizer", "tokens"))
    for folder, pattern in ((data, r"shard_\d{5}\.parquet(\..*)?"),
                            (tokenizer, r"(ranks\.txt|tokenizer\.json)(\.tmp)?")):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if re.fullmatch(pattern, name):
                    os.remove(os.path.join(folder, name))
    _clear_token_files(tokens, keep=None)
    for folder in (data, tokenizer, tokens):
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only when empty
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cache_dir, os.path.basename(MANIFEST_PATH)))


def _clear_token_files(tokens_dir, keep):
    """Remove token-file folders of every tokenizer fingerprint but `keep`."""
    if not os.path.isdir(tokens_dir):
        return
    for fingerprint in os.listdir(tokens_dir):
        folder = os.path.join(tokens_dir, fingerprint)
        if fingerprint == keep or not re.fullmatch(r"[0-9a-f]{16}", fingerprint) or not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if re.fullmatch(r"shard_\d{5}\.(tokens\.npy|index\.npz)(\.tmp)?", name):
                os.remove(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def open_manifest(source):
    """The manifest to build on: the cache's own when it comes from the same source; otherwise the cache is
    cleared (saying so) or, for a hub run on a cache built from --source, refused."""
    try:
        manifest = Manifest.load()
    except SetupError as e:
        print(f"cache: {str(e.code)[len('error: '):].split(';')[0]}: rebuilding the cache", flush=True)
        clear_cache()
        return Manifest(source)
    if manifest is None:
        leftovers = [d for d in ("data", "tokenizer", "tokens") if os.path.isdir(os.path.join(CACHE_DIR, d))]
        if leftovers:
            print(f"cache: {CACHE_DIR} has no manifest (a cache of an older version, or copied by hand): "
                  "rebuilding it", flush=True)
            clear_cache()
        return Manifest(source)
    old = manifest.source
    if old.get("kind") == source["kind"] == "hub" and old.get("dataset") == source["dataset"]:
        manifest.source["endpoint"] = source["endpoint"]  # a mirror serves the same files
        return manifest
    if old.get("kind") == source["kind"] == "local" and old.get("path") == source["path"]:
        return manifest
    if source["kind"] == "hub":
        raise SetupError(f"the cache {CACHE_DIR} holds data from {describe_source(old)}: run "
                         f"`{repair_command(old)}` to repair it, or delete {CACHE_DIR} to use the hub's data")
    print(f"cache: replacing the data from {describe_source(old)} with {describe_source(source)}", flush=True)
    clear_cache()
    return Manifest(source)


def prepare_hub_data(manifest, num_shards, workers):
    n = MAX_SHARD if num_shards == -1 else min(num_shards, MAX_SHARD)
    recorded = {int(SHARD_RE.fullmatch(name).group(1)) for name in manifest_shards(manifest, "train")}
    present = {int(SHARD_RE.fullmatch(os.path.basename(p)).group(1)) for p in list_shards("train")}
    indices = sorted(set(range(n)) | recorded | present) + [VAL_SHARD]  # keep (and verify) what is already here
    extra = len(indices) - 1 - n
    print(f"data: {len(indices)} shards ({n} training{f' + {extra} already here' if extra else ''} + the "
          f"validation shard) from {HF_ENDPOINT} into {DATA_DIR}", flush=True)
    failed = download_shards(indices, workers=workers, manifest=manifest)
    if failed:
        shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise SetupError(f"{len(failed)} of {len(indices)} shards failed to download: {shown} "
                         "(run prepare.py again to retry; whole shards are kept)")


def prepare_local_data(manifest, source_path):
    """Build the shards from --source unless the source is unchanged and every shard matches the manifest.
    Returns True when the data changed (the tokenizer must then be trained again)."""
    docs, digest = read_source(source_path)
    names = manifest_shards(manifest, "val") + manifest_shards(manifest, "train")
    present = {os.path.basename(p) for p in list_shards("val") + list_shards("train")}
    if (manifest.source.get("digest") == digest and names and present == set(names)
            and not any(manifest.problem(f"data/{name}") for name in names)):
        for name in names:  # verified by checksum: a file that was only touched is recorded as it is now
            manifest.files[f"data/{name}"]["mtime_ns"] = os.stat(manifest.path(f"data/{name}")).st_mtime_ns
        manifest.save()
        print(f"source: {len(docs)} documents, unchanged since the cache was built: shards verified", flush=True)
        return False
    changed = manifest.source.get("digest") not in (None, digest)
    if changed:
        print(f"source: {source_path} changed since the cache was built: rebuilding", flush=True)
    elif names:
        print("source: the shards do not match the manifest: writing them again", flush=True)
    manifest.forget("data/")
    manifest.source.pop("digest", None)
    manifest.save()
    n, n_val, val_bytes = write_source_shards(docs, DATA_DIR)
    for path in list_shards("val") + list_shards("train"):
        manifest.record(path, mtime_ns=os.stat(path).st_mtime_ns)
    manifest.source["digest"] = digest
    manifest.save()
    print(f"source: {len(docs)} documents from {source_path}: {n_val} documents ({val_bytes / 1e6:.1f} MB) in "
          f"the validation shard, {n} training shard(s)", flush=True)
    return changed or not names


def prepare_tokenizer(manifest, retrain):
    """The verified tokenizer, trained (again) when its files are missing or do not match the manifest."""
    ok = (not retrain and manifest.data["tokenizer"] is not None
          and not any(manifest.problem(rel) for rel in TOKENIZER_RELS))
    if ok:
        tokenizer = Tokenizer.from_directory()
        if tokenizer.fingerprint == manifest.data["tokenizer"]:
            print(f"tokenizer: {tokenizer.get_vocab_size()} tokens in {TOKENIZER_DIR}, verified", flush=True)
            return tokenizer
    if not retrain and any(os.path.exists(manifest.path(rel)) for rel in TOKENIZER_RELS):
        print("tokenizer: its files do not match the manifest: training it again", flush=True)
    manifest.forget("tokenizer/")
    manifest.data["tokenizer"] = None
    manifest.save()
    for rel in TOKENIZER_RELS:
        with contextlib.suppress(FileNotFoundError):
            os.remove(manifest.path(rel))
    tokenizer = train_tokenizer()
    for rel in TOKENIZER_RELS:
        manifest.record(manifest.path(rel))
    manifest.data["tokenizer"] = tokenizer.fingerprint
    manifest.save()
    return tokenizer


def prepare_tokens(manifest, tokenizer):
    """Tokenize every shard whose token files are missing, stale or do not match the manifest; drop the token
    files of other tokenizers."""
    fingerprint, verified = tokenizer.fingerprint, 0
    _clear_token_files(TOKENS_DIR, keep=fingerprint)
    for rel in [r for r in manifest.files if r.startswith("tokens/") and not r.startswith(f"tokens/{fingerprint}/")]:
        del manifest.files[rel]
    for name in manifest_shards(manifest, "val") + manifest_shards(manifest, "train"):
        tok_rel, idx_rel = token_rels(name, fingerprint)
        entry = manifest.files.get(tok_rel)
        if (entry is not None and entry.get("from") == manifest.files[f"data/{name}"]["sha256"]
                and not manifest.problem(tok_rel) and not manifest.problem(idx_rel)):
            verified += 1
            continue
        if entry is not None:
            print(f"tokens: {name}: the token files do not match the manifest: tokenizing again", flush=True)
        t0 = time.time()
        n_tokens, n_docs = tokenize_shard(manifest.path(f"data/{name}"), tokenizer, manifest)
        manifest.save()
        print(f"tokens: {name}: {n_docs} documents, {n_tokens / 1e6:.1f}M tokens in {time.time() - t0:.1f}s",
              flush=True)
    if verified:
        print(f"tokens: {verified} shard(s) already tokenized, verified", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare data shards, the tokenizer and token files for train.py. "
                                             "Rerun it to verify the cache and repair what does not match.")
    ap.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS,
                    help=f"training shards to download (default {DEFAULT_NUM_SHARDS}; -1 = all {MAX_SHARD})")
    ap.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    ap.add_argument("--source", metavar="DIR",
                    help="build the shards from a local corpus instead of downloading (offline; the folder is "
                         "only read); replaces cached data from any other source")
    args = ap.parse_args(argv)
    if args.download_workers < 1:
        raise SetupError("--download-workers must be at least 1")
    if args.source is not None:
        source = {"kind": "local", "path": check_source_folder(args.source)}
    elif args.num_shards == 0 or args.num_shards < -1:
        raise SetupError("--num-shards must be a positive number of shards, or -1 for all")
    else:
        source = {"kind": "hub", "dataset": DATASET_REPO, "endpoint": HF_ENDPOINT}
    t0 = time.time()
    try:
        with cache_lock():
            manifest = open_manifest(source)
            manifest.save()
            if source["kind"] == "local":
                retrain = prepare_local_data(manifest, source["path"])
            else:
                prepare_hub_data(manifest, args.num_shards, args.download_workers)
                retrain = False
            tokenizer = prepare_tokenizer(manifest, retrain)
            prepare_tokens(manifest, tokenizer)
    except OSError as e:
        raise SetupError(f"{e.filename or CACHE_DIR}: {e.strerror or e}")
    print(f"done in {time.time() - t0:.1f}s: {len(manifest_shards(manifest, 'train'))} training shard(s) + the "
          f"validation shard, tokenizer and token files in {CACHE_DIR}, all matching {MANIFEST_PATH}")
    print(f"device: {describe_device()}")


if __name__ == "__main__":
    main()
