"""The cache's files and their guards. DO NOT CHANGE: prepare.py writes the cache with them, train.py checks it.

Parquet shards (read, verify, write), atomic writes, the manifest (where the data came from, every cached file's
size and checksum), token files, the read-write lock (one prepare.py writing, or any number of train.py reading)
and the cache's own files. The layout is in constants.py; fetching shards is download.py's job, a local corpus
source.py's; the tokenizer, the loader and the metric are in prepare.py. Imports no torch.
"""
import contextlib
import hashlib
import json
import os
import re
import shlex
import sqlite3
import stat
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from autoresearch.errors import UserError
from autoresearch.record import atomic_path
from constants import CACHE_DIR, DATA_DIR, LOCK_PATH, MANIFEST_PATH, VAL_SHARD, shard_name

PREPARE_HINT = "run `uv run prepare.py` (or `uv run prepare.py --source DIR` for a local corpus) first"

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


class FileProblem(UserError):
    """A file that cannot be used, with its parts as data: `path`, what is wrong with it (`problem`) and what to
    do about it (`fix`, may be empty)."""

    def __init__(self, path, problem, fix=""):
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path} {problem}" + (f": {fix}" if fix else ""))


def refuse(path, problem, source):
    """Raise the one-line refusal of a cache file: what is wrong with it and the command that repairs it."""
    raise FileProblem(path, problem, f"run `{repair_command(source)}` to repair the cache")


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
    """The cache's account of itself: `source`, `files` ({path relative to the cache: entry}) and the tokenizer's
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
        """{path relative to the cache: its entry (size, sha256, and per kind mtime_ns, sample, from, ...)}."""
        return self.data["files"]

    @classmethod
    def load(cls, path=MANIFEST_PATH):
        """The manifest at path, None when there is none; a UserError when it cannot be read."""
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
        """The cache's manifest, or a UserError pointing at prepare.py when there is none (for readers)."""
        manifest = cls.load()
        if manifest is None:
            raise UserError(f"no prepared cache in {CACHE_DIR} (no manifest.json): {PREPARE_HINT}")
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

    def add(self, path, **extra):
        """Record a file as it is now: its size, its sha256 and the extra fields given."""
        self.files[self.rel(path)] = {"size": os.path.getsize(path), "sha256": file_sha256(path), **extra}

    def forget(self, prefix):
        """Drop the entries of every file whose manifest path starts with prefix."""
        for rel in [r for r in self.files if r.startswith(prefix)]:
            del self.files[rel]

    def problem(self, rel, check="sha256"):
        """Why the file does not match its entry, or None. check: 'stat' (size, and the mtime where kept: a
        cheap sign of a rewrite), 'spot' ('stat' and the spot checksum where kept), 'sha256' (size and the
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
        """A UserError naming the file and the command that repairs the cache, unless the file matches."""
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
    the manifest, and the tokens were made from that parquet; else a UserError naming the file and the repair."""
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
# The lock: one prepare.py writing, or any number of train.py reading, never both. filelock's ReadWriteLock (a
# SQLite database used only for its locks) on every OS, native Windows included; the OS drops a killed process's
# hold.

SQLITE_MAGIC = b"SQLite format 3\x00"  # how a SQLite file (the lock) begins; an empty file becomes one


def _read_write_lock(path):
    """filelock's read-write lock at path. A path that is not a lock (a folder, a file of other bytes) is one line
    naming it and the fix, never a database error."""
    import filelock
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        head = b""
    except IsADirectoryError:
        head = None
    except OSError:  # (unreadable: taking the lock says what follows)
        head = b""
    if head is None or (head and head != SQLITE_MAGIC):
        raise UserError(f"{path} is not the cache's lock ({'a folder' if head is None else 'other bytes'}): remove "
                        "it (prepare.py and train.py make a new one)")
    return filelock.ReadWriteLock(path, is_singleton=False)


@contextlib.contextmanager
def cache_lock(cache_dir=CACHE_DIR):
    """Hold the cache exclusively for the whole of prepare.py: refused at once while another prepare.py writes
    it or a train.py reads it."""
    import filelock
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"the cache {cache_dir} is not a folder: move that file away or set AUTORESEARCH_CACHE_DIR")
    except OSError as e:
        raise UserError(f"cannot create the cache {cache_dir} ({e.strerror or e}): set AUTORESEARCH_CACHE_DIR "
                        "to a writable folder")
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise UserError(f"the cache {cache_dir} is not writable: fix its permissions or set AUTORESEARCH_CACHE_DIR")
    check_no_links(cache_dir)
    path = os.path.join(cache_dir, os.path.basename(LOCK_PATH))
    try:
        lock = _read_write_lock(path)
        lock.acquire_write(blocking=False)
    except filelock.Timeout:
        probe = _read_write_lock(path)  # readers share: a read that succeeds means the holders are readers
        try:
            probe.acquire_read(blocking=False)
        except filelock.Timeout:
            raise UserError(f"another prepare.py is working on {cache_dir}: wait for it to finish") from None
        probe.release(force=True)
        raise UserError(f"a train.py is reading the cache {cache_dir}: prepare.py never changes the data under a "
                        "running experiment; run it again when the run has ended") from None
    except (OSError, sqlite3.Error) as e:  # (after Timeout, an OSError too)
        raise UserError(f"cannot take the cache's lock {path} ({e}): remove that file and run again") from None
    try:
        yield
    finally:
        lock.release(force=True)


@contextlib.contextmanager
def reading(cache_dir=CACHE_DIR):
    """Hold the cache shared for the block (runtime.main: a whole train.py run): refused at once while a
    prepare.py writes it; while held, no prepare.py can start. Where there is no cache folder, or the lock cannot
    be taken (a read-only cache shared by several users: said in one note), the block runs unlocked: the cache check
    that follows says what is missing, and the metric re-checks the validation tokens it scores. A lock file that
    is not a lock is one line."""
    import filelock
    path = os.path.join(cache_dir, os.path.basename(LOCK_PATH))
    if not os.path.isdir(cache_dir) or os.path.islink(path):
        yield
        return
    try:
        lock = _read_write_lock(path)
        lock.acquire_read(blocking=False)
    except filelock.Timeout:
        raise UserError(f"prepare.py is writing the cache {cache_dir}: wait for it to finish, then run again") \
            from None
    except (OSError, sqlite3.Error) as e:
        print(f"note: the cache's lock cannot be taken ({e}): running unlocked (a read-only cache needs none; a "
              "writable one is then not guarded against a prepare.py during this run)", flush=True)
        yield
        return
    try:
        yield
    finally:
        lock.release(force=True)


def check_no_links(cache_dir=CACHE_DIR):
    """Refuse a cache whose own folders or lock file are symbolic links: prepare.py writes only inside the cache,
    and through a link it would write (or truncate) files elsewhere. (The cache folder itself may be a link.)"""
    own = ["data", "tokenizer", "tokens", os.path.basename(LOCK_PATH), os.path.basename(MANIFEST_PATH)]
    tokens = os.path.join(cache_dir, "tokens")
    if os.path.isdir(tokens) and not os.path.islink(tokens):
        own += [os.path.join("tokens", name) for name in sorted(os.listdir(tokens))]
    for rel in own:
        if os.path.islink(os.path.join(cache_dir, rel)):
            raise UserError(f"{os.path.join(cache_dir, rel)} is a symbolic link: prepare.py writes only inside "
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
            raise UserError(f"{DATA_DIR} holds {len(shards)} shard(s) that no manifest records (copied in by "
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
        raise UserError(f"the cache {CACHE_DIR} holds data from {describe_source(old)}: run "
                         f"`{repair_command(old)}` to repair it, or delete {CACHE_DIR} to use the hub's data")
    print(f"cache: replacing the data from {describe_source(old)} with {describe_source(source)}", flush=True)
    clear_cache()
    return Manifest(source)


