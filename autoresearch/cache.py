"""The cache: the hub's shards and immutable builds. DO NOT CHANGE: prepare.py writes it, train.py reads it.

    CACHE_DIR/data/shard_NNNNN.parquet   the hub's shards: each gets its name only whole, and is never rewritten
    CACHE_DIR/builds/<build id>/         one build: build.json, tokenizer/, tokens/ (a --source corpus: only tokens)
    CACHE_DIR/current                    the id of the build train.py reads

A build is made in a temporary folder and renamed, complete; nothing writes it again, and train.py refuses one whose
files do not match its build.json (docs/DATA.md). Imports no torch.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from autoresearch.errors import UserError
from autoresearch.record import pid_alive, read_regular, write_atomically
from constants import (BUILDS_DIR, CACHE_DIR, DATA_DIR, LOADER_REFILL_DOCS, POINTER_PATH, SPECIAL_TOKENS,
                       SPLIT_PATTERN, TOKENIZER_MAX_CHARS, TOKENIZER_MAX_DOC_CHARS, VAL_SHARD, VOCAB_SIZE, shard_name)

BUILD_FORMAT = 2  # what a build holds and how; a new format is a new build id
TOKENIZER_RELS = ("tokenizer/ranks.txt", "tokenizer/tokenizer.json")
PREPARE_HINT = "run `uv run prepare.py` (or `uv run prepare.py --source DIR` for a local corpus) first"


def prepare_command(source):
    """The command that makes a build from the same source ({"kind": "hub"|"local", ...})."""
    if source.get("kind") == "local":
        return f"uv run prepare.py --source {shlex.quote(source['path'])}"
    return "uv run prepare.py"


def describe_source(source):
    """A build's source in words: the --source folder, or the dataset and the hub it came from."""
    if source.get("kind") == "local":
        return f"--source {source['path']}"
    return f"{source.get('dataset')} from {source.get('endpoint')}"


class FileProblem(UserError):
    """A file that cannot be used: its `path`, what is wrong (`problem`) and what to do (`fix`, may be empty)."""

    def __init__(self, path, problem, fix=""):
        self.path, self.problem, self.fix = path, problem, fix
        super().__init__(f"{path} {problem}" + (f": {fix}" if fix else ""))


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
    """Yield a parquet file's `text` column, a list of str per row group; a bad file is a FileProblem."""
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
    """Why a parquet file is not a whole shard, or None: every row group of its `text` column decodes."""
    try:
        for _ in read_parquet_texts(path):
            pass
        return None
    except FileProblem as e:
        return e.problem


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Builds

def make_cache_folder():
    """The cache folder, made where missing; one line when it cannot be (a file in the way, no permission)."""
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"the cache {CACHE_DIR} is not a folder: move that file away or set AUTORESEARCH_CACHE_DIR")
    except OSError as e:
        raise UserError(f"cannot create the cache {CACHE_DIR} ({e.strerror or e}): set AUTORESEARCH_CACHE_DIR "
                        "to a writable folder")
    if not os.access(CACHE_DIR, os.W_OK | os.X_OK):
        raise UserError(f"the cache {CACHE_DIR} is not writable: fix its permissions or set AUTORESEARCH_CACHE_DIR")
    if os.path.exists(os.path.join(CACHE_DIR, "manifest.json")):  # (before builds: data/ may be a corpus's)
        raise UserError(f"{CACHE_DIR} was made by an older version (manifest.json): delete its tokenizer/, tokens/, "
                        "manifest.json and cache.lock, and data/ too if it was made with --source, then run again")


def build_id(source):
    """The build's name: a hash of everything that changes its files (not where a corpus lies, nor the mirror)."""
    made_by = [BUILD_FORMAT, VOCAB_SIZE, SPLIT_PATTERN, SPECIAL_TOKENS, TOKENIZER_MAX_DOC_CHARS, TOKENIZER_MAX_CHARS,
               LOADER_REFILL_DOCS, VAL_SHARD]
    what = {k: v for k, v in source.items() if k not in ("path", "endpoint")}
    return hashlib.sha256(json.dumps([made_by, what], sort_keys=True).encode()).hexdigest()[:16]


def token_rels(name):
    """A shard's token files in a build: (tokens.npy, index.npz)."""
    stem = f"tokens/{name[:-len('.parquet')]}"
    return stem + ".tokens.npy", stem + ".index.npz"


class Build:
    """A finished build: its folder and build.json (source, shards, files with size and sha256, tokens per shard)."""

    def __init__(self, folder, data):
        self.folder, self.data = folder, data
        self.id, self.source = data["id"], data["source"]

    @classmethod
    def load(cls, folder):
        """The build in folder; a UserError naming the fix when its build.json is missing or not this format's."""
        path = os.path.join(folder, "build.json")
        try:
            data = json.loads(read_regular(path))
        except (OSError, ValueError) as e:
            raise FileProblem(path, f"cannot be read ({getattr(e, 'strerror', None) or e})", PREPARE_HINT)
        if not (isinstance(data, dict) and data.get("format") == BUILD_FORMAT and data.get("id") == os.path.basename(
                folder) and all(isinstance(data.get(k), dict) for k in ("source", "shards", "files", "tokens"))):
            raise FileProblem(path, "is not a build this version made", PREPARE_HINT)
        return cls(folder, data)

    def path(self, rel):
        return os.path.join(self.folder, rel)

    def shards(self, split):
        return list(self.data["shards"][split])

    def problem(self, rel, full=True):
        """Why a file of the build does not match build.json, or None: its size, and with `full` its checksum."""
        entry = self.data["files"].get(rel)
        if entry is None:
            return "is not in the build's build.json"
        try:
            if os.path.getsize(self.path(rel)) != entry["size"]:
                return f"has {os.path.getsize(self.path(rel))} bytes, build.json says {entry['size']}"
            if full and file_sha256(self.path(rel)) != entry["sha256"]:
                return "does not match its checksum in build.json"
        except FileNotFoundError:
            return "is missing"
        except OSError as e:
            return f"cannot be read ({e.strerror or e})"
        return None

    def require(self, rel, full=True):
        """A UserError naming the file and the command that makes the build again, unless the file matches."""
        problem = self.problem(rel, full)
        if problem:
            raise FileProblem(self.path(rel), problem, f"run `{prepare_command(self.source)}` to make the build again")

    def verify(self):
        """The first file that does not match build.json or whose token files are unsound, or None."""
        try:
            for rel in sorted(self.data["files"]):
                self.require(rel)
            for name in self.data["tokens"]:
                self.open_tokens(name)
        except FileProblem as e:
            return e
        return None

    def open_tokens(self, name, full=False):
        """(tokens, offsets, chunk_ends) of a shard, checked against build.json (`full`: tokens by sha256)."""
        tok_rel, idx_rel = token_rels(name)
        self.require(tok_rel, full)
        self.require(idx_rel)
        fix = f"run `{prepare_command(self.source)}` to make the build again"
        try:
            tokens = np.load(self.path(tok_rel), mmap_mode="r", allow_pickle=False)
            with np.load(self.path(idx_rel), allow_pickle=False) as idx:
                offsets, chunk_ends = idx["offsets"], idx["chunk_ends"]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
            raise FileProblem(self.path(tok_rel), f"or its index cannot be read ({e})", fix)
        entry = self.data["tokens"][name]
        n_docs = entry["n_docs"]
        sound = (tokens.ndim == 1 and tokens.dtype.name == entry["dtype"] and len(tokens) == entry["n_tokens"]
                 and offsets.ndim == 1 and len(offsets) == n_docs + 1 and offsets[0] == 0
                 and offsets[-1] == len(tokens) and bool(np.all(np.diff(offsets) >= 1))
                 and chunk_ends.ndim == 1 and (n_docs == 0 or (len(chunk_ends) > 0 and chunk_ends[-1] == n_docs))
                 and bool(np.all(np.diff(chunk_ends, prepend=0) >= 1)))
        if not sound:
            raise FileProblem(self.path(tok_rel), "and its index are inconsistent (offsets, sizes or dtype)", fix)
        return tokens, offsets, chunk_ends


def current_build(cache_dir=CACHE_DIR):
    """The build the pointer (CACHE_DIR/current) names; a UserError pointing at prepare.py when there is none."""
    pointer = os.path.join(cache_dir, os.path.basename(POINTER_PATH))
    try:
        name = read_regular(pointer).decode("ascii", "replace").strip()
    except FileNotFoundError:
        raise UserError(f"no prepared cache in {cache_dir} (no `current` build): {PREPARE_HINT}") from None
    except OSError as e:
        raise FileProblem(pointer, f"cannot be read ({e.strerror or e})", PREPARE_HINT) from None
    if not re.fullmatch(r"[0-9a-f]{16}", name):
        raise FileProblem(pointer, "does not name a build", PREPARE_HINT)
    folder = os.path.join(cache_dir, os.path.basename(BUILDS_DIR), name)
    if not os.path.isdir(folder):
        raise FileProblem(pointer, f"names build {name}, which is not in {os.path.dirname(folder)}", PREPARE_HINT)
    return Build.load(folder)


def new_build_folder(name):
    """A fresh temporary folder in BUILDS_DIR for build `name` (its files are written there, then published)."""
    os.makedirs(BUILDS_DIR, exist_ok=True)
    folder = os.path.join(BUILDS_DIR, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(folder, ignore_errors=True)  # (a killed prepare.py of this pid's number left it)
    os.makedirs(folder)
    return folder


def publish(folder, data):
    """Write build.json, rename the folder to its name (or keep another's same build) and point the cache at it."""
    write_atomically(os.path.join(folder, "build.json"), json.dumps(data, indent=1, sort_keys=True).encode())
    final = os.path.join(BUILDS_DIR, data["id"])
    try:
        os.rename(folder, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(folder, ignore_errors=True)
    point_at(data["id"])
    return Build.load(final)


def point_at(name):
    """Make build `name` the one train.py reads (the pointer file replaced whole)."""
    write_atomically(POINTER_PATH, (name + "\n").encode("ascii"))


def remove_old_builds(keep):
    """Remove every build but `keep`, and what a killed prepare.py left; returns how many folders went."""
    removed = 0
    for name in sorted(os.listdir(BUILDS_DIR)) if os.path.isdir(BUILDS_DIR) else []:
        tmp = re.fullmatch(r"\.tmp-[0-9a-f]{16}-(\d+)", name)
        if tmp and pid_alive(tmp.group(1)):
            continue  # (another prepare.py is making it)
        if name != keep and (tmp or re.fullmatch(r"[0-9a-f]{16}", name)):
            shutil.rmtree(os.path.join(BUILDS_DIR, name))
            removed += 1
    return removed
