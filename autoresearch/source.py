"""Building the cache's shards from a local corpus: `prepare.py --source DIR`. DO NOT CHANGE: prepare.py drives it.

The folder is only read. Its documents are split into a validation shard and training shards (source.py's
split_source says how), so that the metric's rows come from documents never trained on.
"""
import collections
import hashlib
import json
import os
import re
import stat

from autoresearch.cache import read_parquet_texts
from autoresearch.errors import UserError
from constants import CACHE_DIR, LOADER_BUFFER_DOCS

# Plain-text files read by default (prose and source code): each is split into documents at blank lines. .parquet
# (a `text` column) and .jsonl (a `text` field) are always read, their documents as they are.
TEXT_EXTENSIONS = (
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".ipynb", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".cu",
    ".rs", ".go", ".java", ".kt", ".scala", ".js", ".mjs", ".ts", ".tsx", ".jsx", ".rb", ".php", ".pl", ".lua",
    ".sh", ".bash", ".r", ".jl", ".swift", ".m", ".cs", ".fs", ".hs", ".ml", ".ex", ".exs", ".erl", ".clj", ".sql",
    ".html", ".css", ".scss", ".yaml", ".yml", ".toml", ".ini", ".cfg")
DATA_EXTENSIONS = (".parquet", ".jsonl")
DOC_CHARS = 2000  # a plain-text file is split at blank lines into documents of at most this many characters (about
# 500 tokens of code: a 2048-token row packs several, a 256-token row (the small preset) sees the first half)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_extensions(text):
    """The --extensions value ('.py,.txt' or 'py txt') as lower-case extensions with their dot."""
    names = tuple(sorted({("." + e.strip().lstrip(".")).lower() for e in re.split(r"[,\s]+", text) if e.strip()}))
    if not names or any(n == "." or n in DATA_EXTENSIONS for n in names):
        raise UserError(f"--extensions {text!r}: give plain-text extensions such as .py,.md (.parquet and .jsonl "
                        "are always read)")
    return names


def split_document(text, max_chars=DOC_CHARS):
    """A text as documents of at most max_chars (cut at blank lines, else line ends): a row sees them all."""
    pieces = []  # (separator before the piece, piece)
    for para in text.split("\n\n"):
        sep = "\n\n"
        for line in [para] if len(para) <= max_chars else para.split("\n"):
            for start in range(0, max(len(line), 1), max_chars):
                pieces.append((sep, line[start:start + max_chars]))
                sep = ""
            sep = "\n"
    docs, doc = [], ""
    for sep, piece in pieces:
        if doc and len(doc) + len(sep) + len(piece) <= max_chars:
            doc += sep + piece
        else:
            if doc.strip():
                docs.append(doc)
            doc = piece
    if doc.strip():
        docs.append(doc)
    return docs


def replace_lone_surrogates(text):
    """A str that encodes as UTF-8: lone surrogates (possible in JSON escapes) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)


def check_source_folder(source, cache_dir=CACHE_DIR):
    """The --source folder as an absolute path: an existing folder that does not overlap the cache."""
    if not source or not source.strip():
        raise UserError("--source needs a folder (got an empty string)")
    if not os.path.exists(source):
        raise UserError(f"--source folder {source} does not exist")
    if not os.path.isdir(source):
        raise UserError(f"--source {source} is a file, not a folder: give the folder that holds it")
    real, cache = os.path.realpath(source), os.path.realpath(cache_dir)
    if real == cache or real.startswith(cache + os.sep) or cache.startswith(real + os.sep):
        raise UserError(f"--source {source} and the cache {cache_dir} overlap: choose a folder outside the cache "
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
                raise UserError(f"{path}:{lineno} is not a JSON object with a `text` field")
            if text is not None and not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: `text` is a {type(text).__name__}, not a string")
            if text:
                yield replace_lone_surrogates(text)


def iter_source_documents(source, skipped=None, extensions=TEXT_EXTENSIONS):
    """A corpus's documents in path order (docs/DATA.md); what is skipped is counted in `skipped`."""
    skipped = {} if skipped is None else skipped

    def unreadable(error):
        skipped["unreadable folders"] = skipped.get("unreadable folders", 0) + 1

    for root, dirs, files in os.walk(source, onerror=unreadable):
        dirs.sort()
        for name in sorted(files):
            ext = os.path.splitext(name)[1].lower()
            if ext not in DATA_EXTENSIONS and ext not in extensions:
                kind = f"{ext or 'extensionless'} files"
                skipped[kind] = skipped.get(kind, 0) + 1
                continue
            path = os.path.join(root, name)
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:
                regular = False  # a broken link
            if not regular or not os.access(path, os.R_OK):
                skipped["not readable regular files"] = skipped.get("not readable regular files", 0) + 1
            elif ext == ".parquet":
                for texts in read_parquet_texts(path):
                    yield from (t for t in texts if t)
            elif ext == ".jsonl":
                yield from _jsonl_documents(path)
            else:
                with open(path, encoding="utf-8-sig", errors="replace") as f:
                    yield from split_document(f.read())


def read_source(source, extensions=TEXT_EXTENSIONS):
    """(documents, digest) of a local corpus; the digest identifies exactly what was read."""
    skipped = {}
    docs = list(iter_source_documents(source, skipped, extensions))
    digest = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    shown = " ".join(extensions) if len(extensions) <= 8 else f"{len(extensions)} plain-text extensions (--extensions)"
    read = f".parquet, .jsonl and {shown} files (text split at blank lines into documents of <= {DOC_CHARS:,} chars)"
    if skipped:
        ranked = sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{n} {what}" for what, n in ranked[:6])
        if len(ranked) > 6:
            shown += f" and {sum(n for _, n in ranked[6:])} files of {len(ranked) - 6} other kinds"
        print(f"source: read {read}; skipped {shown} in {source}")
    else:
        print(f"source: read {read} in {source}")
    if len(docs) < 2:
        raise UserError(f"--source {source} holds {len(docs)} document(s) in .parquet/.jsonl files and files of the "
                        "plain-text extensions read; need at least 2 (one for validation, one for training): "
                        "--extensions names others")
    return docs, digest.hexdigest()


SourceSplit = collections.namedtuple("SourceSplit", "val train val_bytes duplicates")  # val: [str], train: [[str]]


def split_source(docs, val_fraction=0.1, max_val_bytes=80e6, shard_bytes=40e6):
    """The documents, deduplicated, as the validation shard's and training shards' (docs/DATA.md): a SourceSplit."""
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
    train, shard, size = [], [], 0
    for i, doc in enumerate(docs):
        if i in val:
            continue
        shard.append(doc)
        size += sizes[i]
        if size >= shard_bytes:
            train.append(shard)
            shard, size = [], 0
    if shard:
        train.append(shard)
    return SourceSplit([docs[i] for i in sorted(val)], train, val_bytes, duplicates)
