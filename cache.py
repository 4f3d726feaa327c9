"""The machinery that builds and guards the cache. DO NOT CHANGE: prepare.py drives it, train.py only checks it.

Parquet shards (read, verify, write), atomic writes, the manifest (where the data came from, every cached file's
size and checksum), the one-writer lock, the hub download and the --source import. Imports no torch. The layout
is in constants.py; the tokenizer, the loader and the metric are in prepare.py.
"""
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import threading
import time
import zipfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import urllib3

try:
    import fcntl  # POSIX file locks, shared and exclusive
except ImportError:  # Windows: an exclusive lock through filelock (a torch dependency) instead, see cache_lock
    fcntl = None

from constants import (CACHE_DIR, DATA_DIR, HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN, LOADER_BUFFER_DOCS, LOCK_PATH,
                       MANIFEST_PATH, VAL_SHARD, shard_name, shard_url)

PREPARE_HINT = "run `uv run prepare.py` (or `uv run prepare.py --source DIR` for a local corpus) first"


class SetupError(SystemExit):
    """A user-facing problem (missing data, bad input, a damaged cache): the program exits with one line on
    stderr, `error: <message>`, and no traceback. `message` holds the line without its prefix."""

    def __init__(self, message):
        self.message = message
        super().__init__(f"error: {message}")


def repair_command(source):
    """The command that rebuilds a cache from its recorded source ({"kind": "hub"|"local", ...})."""
    if source and source.get("kind") == "local":
        return f"uv run prepare.py --source {shlex.quote(source['path'])}"
    return "uv run prepare.py"


def describe_source(source):
    """A cache's source in words: the --source folder, or the dataset and the hub it came from."""
    if source.get("kind") == "local":
        return f"--source {source['path']}"
    return f"{source.get('dataset')} from {source.get('endpoint')}"


class FileProblem(SetupError):
    """A file that cannot be used, with its parts as data: `path`, what is wrong with it (`problem`) and what to
    do about it (`fix`, may be empty)."""

    def __init__(self, path, problem, fix=""):
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path} {problem}" + (f": {fix}" if fix else ""))


def refuse(path, problem, source):
    """Raise the one-line refusal of a cache file: what is wrong with it and the command that repairs it."""
    raise FileProblem(path, problem, f"run `{repair_command(source)}` to repair the cache")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; when the block succeeds it becomes `path` (replacing a file, or a
    folder, under that name: the name is the cache's), when it fails it is removed. A file under its final name
    is therefore always whole."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------------------------
# Parquet shards

SHARD_RE = re.compile(r"shard_(\d{5})\.parquet")


def split_shard_names(names, split):
    """The shard names among `names` that belong to a split, sorted: val is the pinned shard, train the rest."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    val = shard_name(VAL_SHARD)
    return sorted(n for n in names if SHARD_RE.fullmatch(n) and (n == val) == (split == "val"))


def list_shards(split, data_dir=DATA_DIR):
    """Sorted paths of a split's parquet shards present in data_dir."""
    names = os.listdir(data_dir) if os.path.isdir(data_dir) else []
    return [os.path.join(data_dir, n) for n in split_shard_names(names, split)]


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
    """Yield the `text` column of a parquet file as one list of str per row group, in order (null -> "").
    A file that is not such a parquet file is a FileProblem naming it."""
    try:
        pf = pq.ParquetFile(path)
        problem = _text_column_problem(pf.schema_arrow)
        if problem:
            raise FileProblem(path, problem)
        for rg in range(pf.num_row_groups):
            yield [t or "" for t in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()]
    except (pa.ArrowException, OSError) as e:
        raise FileProblem(path, f"is not a readable parquet file ({e})")


def parquet_problem(path):
    """Why a parquet file is not a whole shard, or None: its footer reads, its `text` column holds strings and
    every row group decodes (the check before a downloaded file gets its final name)."""
    try:
        for _ in read_parquet_texts(path):
            pass
        return None
    except FileProblem as e:
        return e.problem


def write_parquet(texts, path):
    """Write documents as a shard (one `text` column, zstd, row groups of 1024), atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=1024,
                       compression="zstd")


# ---------------------------------------------------------------------------------------------------------------
# The manifest: where the cache came from, and every file's size and checksum, so that nothing is used that does
# not match what wrote it. Plain JSON in CACHE_DIR/manifest.json:
#   {"format": 1, "source": {...}, "tokenizer": fingerprint or null,
#    "files": {"data/shard_00000.parquet": {"size", "sha256", "mtime_ns"}, "tokenizer/ranks.txt": {"size", ..},
#              "tokens/<fingerprint>/shard_00000.tokens.npy": {"size", "sha256", "sample", "from", "n_tokens",
#              "n_docs", "dtype"}, "tokens/<fingerprint>/shard_00000.index.npz": {"size", "sha256"}}}
# source: {"kind": "hub", "dataset": .., "endpoint": ..} or {"kind": "local", "path": .., "digest": ..}.

MANIFEST_FORMAT = 1
SAMPLE_BLOCKS, SAMPLE_BLOCK_BYTES = 64, 4096  # a spot checksum: 64 blocks of 4 KB spread over the file
TOKENIZER_RELS = ("tokenizer/ranks.txt", "tokenizer/tokenizer.json")


def file_sha256(path):
    """SHA-256 of a whole file, hex."""
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


class Manifest:
    """The cache's record of itself: `source`, `files` ({path relative to the cache: record}) and the tokenizer's
    fingerprint in data["tokenizer"]."""

    def __init__(self, source, cache_dir=CACHE_DIR):
        self.cache_dir = cache_dir
        self.data = {"format": MANIFEST_FORMAT, "source": source, "tokenizer": None, "files": {}}

    @property
    def source(self):
        """Where the data came from: {"kind": "hub", "dataset", "endpoint"} or {"kind": "local", "path", "digest"}."""
        return self.data["source"]

    @property
    def files(self):
        """{path relative to the cache: its record (size, sha256, and per kind mtime_ns, sample, from, ...)}."""
        return self.data["files"]

    @classmethod
    def load(cls, path=MANIFEST_PATH):
        """The manifest at path, None when there is none; a SetupError when it cannot be read."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise FileProblem(path, f"cannot be read ({e})", "rerun prepare.py to rebuild the cache")
        if (not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT
                or not isinstance(data.get("files"), dict) or not isinstance(data.get("source"), dict)):
            raise FileProblem(path, "is not a manifest this version wrote", "rerun prepare.py to rebuild the cache")
        manifest = cls(data["source"], os.path.dirname(path))
        manifest.data = data
        return manifest

    @classmethod
    def load_required(cls):
        """The cache's manifest, or a SetupError pointing at prepare.py when there is none (for readers)."""
        manifest = cls.load()
        if manifest is None:
            raise SetupError(f"no prepared cache in {CACHE_DIR} (no manifest.json): {PREPARE_HINT}")
        return manifest

    def save(self):
        """Write the manifest to CACHE_DIR/manifest.json, atomically."""
        with atomic_path(os.path.join(self.cache_dir, os.path.basename(MANIFEST_PATH))) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.data, f, indent=1, sort_keys=True)

    def path(self, rel):
        """The absolute path of a manifest path."""
        return os.path.join(self.cache_dir, rel)

    def rel(self, path):
        """The manifest path (relative, with /) of a file in the cache."""
        return os.path.relpath(path, self.cache_dir).replace(os.sep, "/")

    def shards(self, split):
        """Sorted names of the split's parquet shards that the manifest records."""
        return split_shard_names([rel[len("data/"):] for rel in self.files if rel.startswith("data/")], split)

    def record(self, path, **extra):
        """Record a file as it is now: its size, its sha256 and the extra fields given."""
        self.files[self.rel(path)] = {"size": os.path.getsize(path), "sha256": file_sha256(path), **extra}

    def forget(self, prefix):
        """Drop the records of every file whose manifest path starts with prefix."""
        for rel in [r for r in self.files if r.startswith(prefix)]:
            del self.files[rel]

    def problem(self, rel, check="sha256"):
        """Why the file does not match its record, or None. check: 'stat' (size, and the mtime where recorded: a
        cheap sign of a rewrite), 'spot' ('stat' and the spot checksum where recorded), 'sha256' (size and the
        whole file's checksum, which decides alone: a file that was only touched still matches)."""
        assert check in ("stat", "spot", "sha256"), f"unknown check {check!r}"
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
            if check != "sha256" and "mtime_ns" in entry and st.st_mtime_ns != entry["mtime_ns"]:
                return "was modified after prepare.py recorded it"
            if check == "spot" and "sample" in entry and sample_sha256(path) != entry["sample"]:
                return "does not match its checksum"
            if check == "sha256" and file_sha256(path) != entry["sha256"]:
                return "does not match its checksum"
        except FileNotFoundError:
            return "is missing"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        return None

    def require(self, rel, check="sha256"):
        """A SetupError naming the file and the command that repairs the cache, unless the file matches."""
        problem = self.problem(rel, check)
        if problem:
            refuse(self.path(rel), problem, self.source)


# ---------------------------------------------------------------------------------------------------------------
# Token files: TOKENS_DIR/<tokenizer fingerprint>/shard_NNNNN.tokens.npy holds a shard's documents back to back
# (BOS first in each), shard_NNNNN.index.npz their offsets and the refill chunks the loader reads them in. Written
# by prepare.py, recorded in the manifest with the checksum of the parquet they were made from.

def token_rels(name, fingerprint):
    """Manifest paths of a shard's token files: (tokens.npy, index.npz)."""
    stem = f"tokens/{fingerprint}/{name[:-len('.parquet')]}"
    return stem + ".tokens.npy", stem + ".index.npz"


def check_token_files(manifest, name, fingerprint, check="stat"):
    """A shard's parquet (size, mtime) and token files (tokens.npy by `check`, the small index in full) match
    the manifest, and the tokens were made from that parquet; else a SetupError naming the file and the repair."""
    tok_rel, idx_rel = token_rels(name, fingerprint)
    manifest.require(f"data/{name}", "stat")
    manifest.require(tok_rel, check)
    manifest.require(idx_rel, "sha256")
    if manifest.files[tok_rel].get("from") != manifest.files[f"data/{name}"]["sha256"]:
        refuse(manifest.path(tok_rel), f"was made from another version of {name}", manifest.source)


def open_token_shard(manifest, name, fingerprint, check="stat"):
    """(tokens, offsets, chunk_ends) of one shard, after check_token_files (tokens.npy by `check`) and a check
    of their structure, so that a truncated, emptied, swapped or stale file is refused with one line naming it,
    never read."""
    check_token_files(manifest, name, fingerprint, check)
    tok_rel, idx_rel = token_rels(name, fingerprint)
    try:
        tokens = np.load(manifest.path(tok_rel), mmap_mode="r", allow_pickle=False)
        with np.load(manifest.path(idx_rel), allow_pickle=False) as idx:
            offsets, chunk_ends = idx["offsets"], idx["chunk_ends"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        refuse(manifest.path(tok_rel), f"or its index cannot be read ({e})", manifest.source)
    entry = manifest.files[tok_rel]
    n_docs = entry["n_docs"]
    sound = (tokens.ndim == 1 and tokens.dtype.name == entry["dtype"] and len(tokens) == entry["n_tokens"]
             and offsets.ndim == 1 and len(offsets) == n_docs + 1 and offsets[0] == 0
             and offsets[-1] == len(tokens) and bool(np.all(np.diff(offsets) >= 1))
             and chunk_ends.ndim == 1 and (n_docs == 0 or (len(chunk_ends) > 0 and chunk_ends[-1] == n_docs))
             and bool(np.all(np.diff(chunk_ends, prepend=0) >= 1)))
    if not sound:
        refuse(manifest.path(tok_rel), "and its index are inconsistent (offsets, sizes or dtype)", manifest.source)
    return tokens, offsets, chunk_ends


# ---------------------------------------------------------------------------------------------------------------
# The lock (one prepare.py at a time, no train.py while one writes) and the cache's own files

def _prepare_running(cache_dir, pid="", reader=False):
    """The refusal while a prepare.py holds the cache's lock (its pid when the lock file says it), to another
    prepare.py or to a reader (train.py)."""
    who = f"prepare.py (pid {pid})" if pid else "prepare.py"
    if reader:
        return SetupError(f"{who} is writing the cache {cache_dir}: wait for it to finish, then run again")
    return SetupError(f"another {who} is working on {cache_dir}: wait for it to finish")


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
    check_no_links(cache_dir)
    path = os.path.join(cache_dir, os.path.basename(LOCK_PATH))
    if fcntl is None:  # (Windows) no shared locks: train.py checks this lock at start instead of holding it
        import filelock
        lock = filelock.FileLock(path)
        try:
            lock.acquire(timeout=2)  # (a starting train.py holds it for an instant to check it)
        except filelock.Timeout:
            raise _prepare_running(cache_dir) from None
        try:
            yield
        finally:
            lock.release()
        return
    with open(path, "a+", encoding="utf-8") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip()
                if _pid_alive(pid):
                    raise _prepare_running(cache_dir, pid)
                raise SetupError(f"a train.py is reading the cache {cache_dir}: prepare.py never changes the data "
                                 "under a running experiment; run it again when the run has ended")
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # the lock itself is released when the file closes


_reader_lock = None  # the open lock file through which this process holds its shared lock, or None


def hold_reader_lock(lock_path=LOCK_PATH):
    """Refuse to read the cache while a prepare.py is writing it; then hold a shared lock on it until
    release_reader_lock() or the end of the process, so that no prepare.py starts writing under a running
    experiment (prepare.py takes the lock exclusively). A cache without a lock file runs unlocked. Without POSIX
    locks (Windows) the refusal holds but nothing is held: a prepare.py started during the run is not refused,
    and the metric's own check of the validation tokens is what stops it from scoring changed data."""
    global _reader_lock
    release_reader_lock()
    if fcntl is None:
        if os.path.exists(lock_path):
            import filelock
            lock = filelock.FileLock(lock_path)
            try:
                lock.acquire(timeout=0)
            except filelock.Timeout:
                raise _prepare_running(os.path.dirname(lock_path), reader=True) from None
            lock.release()
        return
    try:
        f = open(lock_path, encoding="utf-8")
    except OSError:
        return  # no lock file: nothing was prepared here (the checks after this say so)
    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = f.read().strip()
        f.close()
        raise _prepare_running(os.path.dirname(lock_path), pid, reader=True)
    except OSError:
        f.close()
        return
    _reader_lock = f


def release_reader_lock():
    """Give up this process's shared lock on the cache (closing the file releases it)."""
    global _reader_lock
    if _reader_lock is not None:
        _reader_lock.close()
        _reader_lock = None


def _pid_alive(text):
    try:
        os.kill(int(text), 0)
        return True
    except (ValueError, OSError):
        return False


def check_no_links(cache_dir=CACHE_DIR):
    """Refuse a cache whose own folders or lock file are symbolic links: prepare.py writes only inside the cache,
    and through a link it would write (or truncate) files elsewhere. (The cache folder itself may be a link.)"""
    own = ["data", "tokenizer", "tokens", os.path.basename(LOCK_PATH), os.path.basename(MANIFEST_PATH)]
    tokens = os.path.join(cache_dir, "tokens")
    if os.path.isdir(tokens) and not os.path.islink(tokens):
        own += [os.path.join("tokens", name) for name in sorted(os.listdir(tokens))]
    for rel in own:
        if os.path.islink(os.path.join(cache_dir, rel)):
            raise SetupError(f"{os.path.join(cache_dir, rel)} is a symbolic link: prepare.py writes only inside "
                             "the cache; replace the link with a real folder (or file), or point "
                             "AUTORESEARCH_CACHE_DIR at the folder itself")


# The names prepare.py writes, per folder of the cache: nothing else is ever deleted there.
OWN_FILES = {"data": r"shard_\d{5}\.parquet(\..*)?", "tokenizer": r"(ranks\.txt|tokenizer\.json)(\..*\.tmp)?",
             "tokens/*": r"shard_\d{5}\.(tokens\.npy|index\.npz)(\..*\.tmp)?"}


def _remove_own_files(folder, pattern):
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if re.fullmatch(pattern, name):
                os.remove(os.path.join(folder, name))
        with contextlib.suppress(OSError):
            os.rmdir(folder)  # only when empty


def clear_token_files(cache_dir=CACHE_DIR, keep=None):
    """Remove the token files of every tokenizer fingerprint but `keep` (all of them when keep is None)."""
    tokens_dir = os.path.join(cache_dir, "tokens")
    if os.path.isdir(tokens_dir):
        for fingerprint in os.listdir(tokens_dir):
            if fingerprint != keep and re.fullmatch(r"[0-9a-f]{16}", fingerprint):
                _remove_own_files(os.path.join(tokens_dir, fingerprint), OWN_FILES["tokens/*"])


def clear_cache(cache_dir=CACHE_DIR):
    """Remove what prepare.py writes (shards, tokenizer, token files, manifest) and nothing else: the cache
    folder may be one the user chose, holding files of their own."""
    _remove_own_files(os.path.join(cache_dir, "data"), OWN_FILES["data"])
    _remove_own_files(os.path.join(cache_dir, "tokenizer"), OWN_FILES["tokenizer"])
    clear_token_files(cache_dir)
    with contextlib.suppress(OSError):
        os.rmdir(os.path.join(cache_dir, "tokens"))
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cache_dir, os.path.basename(MANIFEST_PATH)))


def remove_empty_cache(cache_dir=CACHE_DIR):
    """After a first prepare.py that failed: remove what it made if no shard came of it (clear_cache, then the
    lock and the empty folder itself); a file of anyone else's keeps the folder."""
    data = os.path.join(cache_dir, "data")
    if list_shards("train", data) + list_shards("val", data):
        return
    clear_cache(cache_dir)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(cache_dir, os.path.basename(LOCK_PATH)))
    with contextlib.suppress(OSError):
        os.rmdir(cache_dir)  # only when empty


def load_or_reset_manifest(source):
    """The manifest prepare.py builds on: the cache's own when it comes from the same source. Otherwise the cache
    is CLEARED (saying so) and a new manifest started, except that a hub run on a cache built from --source is
    refused (the user's own data is not thrown away by a plain `prepare.py`)."""
    try:
        manifest = Manifest.load()
    except FileProblem as e:
        print(f"cache: {e.path} {e.problem}: rebuilding the cache", flush=True)
        clear_cache()
        return Manifest(source)
    if manifest is None:  # a new cache, one of an older version, or shards copied in by hand: never deleted
        shards = list_shards("train") + list_shards("val")
        if shards and source["kind"] == "local":
            raise SetupError(f"{DATA_DIR} holds {len(shards)} shard(s) that no manifest records (copied in by "
                             "hand?): --source would replace them; move them away first, or run `uv run "
                             "prepare.py` to verify and keep them")
        if shards:
            print(f"cache: no manifest in {CACHE_DIR}: the {len(shards)} shard(s) there are verified and kept",
                  flush=True)
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


# ---------------------------------------------------------------------------------------------------------------
# Download from the hub (or a mirror: HF_ENDPOINT)

class HubUnreachable(Exception):
    """No connection could be made: retrying other shards cannot help either."""


@dataclasses.dataclass
class Fetched:
    """What became of one shard: status 'downloaded', 'present' (a whole copy was already there) or 'failed';
    detail in words; record: the shard's {"size", "sha256", "mtime_ns"} for the manifest (None when failed)."""
    status: str
    detail: str
    record: Optional[dict] = None
    missing: bool = False  # the hub answered that the file is not there (HTTP 404, 410): asking again cannot help


@dataclasses.dataclass
class Downloader:
    """How shards are fetched: from `endpoint`, `attempts` tries each with exponential back-off (`backoff` s,
    doubling), a connection that cannot be made within `connect_timeout` s raising HubUnreachable, a body that
    sends nothing for `stall` s or under `min_rate` bytes/s over `window` s abandoned, and so is an answer whose
    status line and headers take over `headers_deadline` s, or whose body grows past its Content-Length (without
    one: past `max_bytes`); on_bytes(n) is told of every piece received (for progress lines)."""
    endpoint: str = HF_ENDPOINT
    attempts: int = 5
    backoff: float = 1.0
    stall: float = 60.0
    min_rate: float = 64e3
    window: float = 60.0
    connect_timeout: float = 10.0
    headers_deadline: float = 60.0
    max_bytes: int = 1 << 30  # a shard of the hub's dataset is far smaller
    on_bytes: Callable[[int], None] = lambda n: None
    cancel: Optional[threading.Event] = None  # when set, downloads in progress stop at their next piece
    offline: bool = HF_HUB_OFFLINE  # never download (HF_HUB_OFFLINE=1): only verify what is already there
    token: str = HF_TOKEN  # sent as a bearer token (HF_TOKEN), for gated datasets and private mirrors

    def fetch(self, index, data_dir=DATA_DIR, known=None):
        """Fetch one shard into data_dir unless a whole copy is already there; returns a Fetched.

        known: the manifest's record of this shard; a file under the final name is kept if it matches that record
        (or, unrecorded, if every row group decodes). The body streams to a temporary file that gets the final
        name only after its byte count matches Content-Length and every row group decodes."""
        final = os.path.join(data_dir, shard_name(index))
        if os.path.exists(final):
            kept, problem = self._keep_existing(final, known)
            if kept is not None:
                return kept
            print(f"{shard_name(index)}: {problem}: fetching it again", flush=True)
            os.remove(final)
        url = shard_url(index, self.endpoint)
        if self.offline:
            return Fetched("failed", "not downloaded: HF_HUB_OFFLINE is set")
        error = "no attempt made"
        for attempt in range(1, self.attempts + 1):
            t0 = time.time()
            try:
                with atomic_path(final) as tmp:
                    size = self._download(url, tmp)
                return Fetched("downloaded", f"{size / 1e6:.1f} MB in {time.time() - t0:.1f}s",
                               {"size": size, "sha256": file_sha256(final), "mtime_ns": os.stat(final).st_mtime_ns})
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

    @staticmethod
    def _keep_existing(final, known):
        """(Fetched('present'), None) when the file under the final name is whole, else (None, why it is not)."""
        if known is not None:
            if os.path.getsize(final) == known["size"] and file_sha256(final) == known["sha256"]:
                return Fetched("present", "already present, checksum matches",
                               {**known, "mtime_ns": os.stat(final).st_mtime_ns}), None
            return None, "does not match the manifest"
        problem = parquet_problem(final)
        if problem is not None:
            return None, problem
        st = os.stat(final)
        return Fetched("present", "already present, whole",
                       {"size": st.st_size, "sha256": file_sha256(final), "mtime_ns": st.st_mtime_ns}), None

    def _download(self, url, path):
        """One attempt: stream url's body into path and check it; returns its size. Raises on any failure."""
        try:
            r = self._get_headers(url)
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

    def _get_headers(self, url):
        """requests.get(url, stream=True), given at most headers_deadline s for the status line and headers (the
        socket's read timeout alone lets a server that sends a byte now and then hold us forever). An abandoned
        request finishes, and is closed, in its own daemon thread."""
        result, abandoned = {}, threading.Event()

        def get():
            try:
                headers = {"Accept-Encoding": "identity"}
                if self.token:
                    headers["Authorization"] = f"Bearer {self.token}"
                result["response"] = requests.get(url, stream=True, timeout=(self.connect_timeout, self.stall),
                                                  headers=headers)
                if abandoned.is_set():
                    result["response"].close()
            except Exception as e:  # handed to the caller
                result["error"] = e

        thread = threading.Thread(target=get, daemon=True)
        thread.start()
        thread.join(self.headers_deadline)
        if thread.is_alive():
            abandoned.set()
            raise OSError(f"no status line and headers from {url} within {self.headers_deadline:.0f}s")
        if "error" in result:
            raise result["error"]
        return result["response"]

    def _stream(self, r, f, limit):
        """Copy a streamed body into file f; returns its size. read1 returns as soon as any bytes arrive, so a
        body that stops (the socket's read timeout) or trickles (under min_rate over a window) is abandoned, and
        so is one that grows past `limit` bytes."""
        size, window_start, window_bytes = 0, time.monotonic(), 0
        while chunk := r.raw.read1(1 << 20):
            f.write(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(f"the body grew past {limit:,} bytes (its Content-Length, or the limit for a shard)")
            if self.cancel is not None and self.cancel.is_set():
                raise OSError("cancelled")
            window_bytes += len(chunk)
            self.on_bytes(len(chunk))
            now = time.monotonic()
            if now - window_start >= self.window:
                if window_bytes < self.min_rate * (now - window_start):
                    raise OSError(f"too slow: {window_bytes / (now - window_start) / 1e3:.1f} KB/s over "
                                  f"{now - window_start:.0f}s (at least {self.min_rate / 1e3:.0f} KB/s needed)")
                window_start, window_bytes = now, 0
        return size


class PermanentHTTPError(Exception):
    """A 4xx answer other than 408/429: asking again cannot help. `missing`: the file is not there (404, 410)."""

    def __init__(self, message, missing=False):
        super().__init__(message)
        self.missing = missing


def download_shards(indices, data_dir=DATA_DIR, downloader=None, workers=8, manifest=None, progress_every=30.0):
    """Download shards in parallel: one line per shard as it ends, a progress line at least every
    `progress_every` seconds. With a manifest, each shard is checked against its record and recorded when whole
    (the manifest is saved every 10 s and at the end). Returns {name: Fetched} of the shards that failed; a
    connection that cannot be made (refused, unknown host) stops the remaining shards and ends in a SetupError.
    When this call ends early (an exception, SIGTERM), the downloads in progress stop at their next piece."""
    downloader = downloader or Downloader()
    os.makedirs(data_dir, exist_ok=True)
    for name in os.listdir(data_dir):  # leftovers of an interrupted run
        if name.endswith((".part", ".tmp")):
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
        known = manifest.files.get(f"data/{shard_name(index)}") if manifest is not None else None
        try:
            return counting.fetch(index, data_dir, known)
        except HubUnreachable as e:
            unreachable.append(str(e))
            return Fetched("failed", str(e))

    t0 = last_line = last_save = time.time()
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
                    if attempted is not None:
                        print(f"[{sum(counts.values())}/{len(indices)}] {shard_name(index)}: {result.status} "
                              f"({result.detail})", flush=True)
                        last_line = time.time()
                    if result.record is not None and manifest is not None:
                        manifest.files[f"data/{shard_name(index)}"] = result.record
                if manifest is not None and time.time() - last_save >= 10:
                    manifest.save()  # every 10 s, not per shard: 6543 records rewritten per shard add up to GBs
                    last_save = time.time()
                if time.time() - last_line >= progress_every:
                    elapsed = time.time() - t0
                    print(f"data: {sum(counts.values())}/{len(indices)} shards done, {received[0] / 1e6:.0f} MB "
                          f"received in {elapsed:.0f}s ({received[0] / 1e6 / elapsed:.1f} MB/s)", flush=True)
                    last_line = time.time()
        except BaseException:
            cancel.set()
            raise
        finally:
            if manifest is not None:
                manifest.save()  # (a shard not yet recorded when a run is killed is checked whole next time)
    print(f"data: {counts['downloaded']} downloaded, {counts['present']} already present, {counts['failed']} failed",
          flush=True)
    if unreachable:
        raise SetupError(f"{unreachable[0]}: check the network or HF_ENDPOINT and run prepare.py again "
                         f"({counts['failed']} of {len(indices)} shards not fetched; whole shards are kept), or "
                         "prepare offline from text of your own: `uv run prepare.py --source DIR`")
    return failed


# ---------------------------------------------------------------------------------------------------------------
# A local corpus (--source), read-only

SOURCE_EXTENSIONS = (".parquet", ".jsonl", ".txt", ".md")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_lone_surrogates(text):
    """A str that encodes as UTF-8: lone surrogates (possible in JSON escapes) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)


def check_source_folder(source, cache_dir=CACHE_DIR):
    """The --source folder as an absolute path, or a SetupError: it must be an existing folder that neither holds
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


def _jsonl_documents(path):
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # (-sig: a byte-order mark is not text)
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
                yield replace_lone_surrogates(text)


def iter_source_documents(source, skipped=None):
    """Documents of a local corpus, files in sorted path order: .parquet (`text` column), .jsonl (`text` field),
    .txt / .md (one document per file). Opens files for reading only. Entries that are not readable regular files
    (FIFOs, sockets, broken links, no permission) are skipped and counted in `skipped` (a dict)."""
    skipped = {} if skipped is None else skipped

    def unreadable(error):
        skipped["unreadable folders"] = skipped.get("unreadable folders", 0) + 1

    for root, dirs, files in os.walk(source, onerror=unreadable):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(SOURCE_EXTENSIONS):
                kind = f"{os.path.splitext(name)[1] or 'extensionless'} files"
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            path = os.path.join(root, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = False  # a broken link
            if not regular or not os.access(path, os.R_OK):
                skipped["not readable regular files"] = skipped.get("not readable regular files", 0) + 1
            elif name.endswith(".parquet"):
                for texts in read_parquet_texts(path):
                    yield from (t for t in texts if t)
            elif name.endswith(".jsonl"):
                yield from _jsonl_documents(path)
            else:
                with open(path, encoding="utf-8-sig", errors="replace") as f:
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
    read = ", ".join(f"*{ext}" for ext in SOURCE_EXTENSIONS)
    if skipped:
        print(f"source: read {read} files; skipped {', '.join(f'{n} {what}' for what, n in sorted(skipped.items()))}"
              f" in {source}")
    else:
        print(f"source: read {read} files in {source}")
    if len(docs) < 2:
        raise SetupError(f"--source {source} holds {len(docs)} document(s) in .parquet/.jsonl/.txt/.md files; "
                         "need at least 2 (one for validation, one for training)")
    return docs, digest.hexdigest()


SourceSplit = collections.namedtuple("SourceSplit", "train_shards val_docs val_bytes duplicates")


def write_source_shards(docs, data_dir=DATA_DIR, val_fraction=0.1, max_val_bytes=80e6, shard_bytes=40e6):
    """Write documents as shards in the cache layout, replacing the shards already in data_dir; returns a
    SourceSplit. Exact duplicates are dropped first (a document in both splits would be scored after being
    trained on). The validation shard takes documents in the order of their content hashes, each one that still
    fits in about val_fraction of the bytes (at most max_val_bytes), so that no single huge document becomes the
    whole validation set; the split depends only on the documents, not on how files are named or ordered.
    Then, up to a quarter of the documents, more of the small ones (each under a tenth of that byte target) until
    it holds 2 x LOADER_BUFFER_DOCS: the loader looks that far ahead, and with fewer documents its look-ahead
    wraps around the shard and the metric's rows can repeat documents. The rest become training shards, in
    order."""
    hashes, unique = {}, []
    for doc in docs:
        h = hashlib.sha1(doc.encode("utf-8")).digest()
        if h not in hashes:
            hashes[h] = len(unique)
            unique.append(doc)
    duplicates, docs = len(docs) - len(unique), unique
    keys = list(hashes)
    sizes = [len(d.encode("utf-8")) for d in docs]
    target = min(val_fraction * sum(sizes), max_val_bytes)
    val, val_bytes = set(), 0
    for i in sorted(range(len(docs)), key=keys.__getitem__):
        if len(docs) - len(val) <= 1:  # leave at least one document for training
            break
        if val_bytes + sizes[i] <= target:
            val.add(i)
            val_bytes += sizes[i]
    if not val:  # every document is larger than the target: the smallest one
        i = min(range(len(docs)), key=lambda i: (sizes[i], keys[i]))
        val, val_bytes = {i}, sizes[i]
    want = min(2 * LOADER_BUFFER_DOCS, len(docs) // 4)
    for i in sorted(range(len(docs)), key=keys.__getitem__):
        if len(val) >= want:
            break
        if i not in val and sizes[i] <= target / 10:
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
    return SourceSplit(n, len(val), val_bytes, duplicates)
