"""One-time data and tokenizer preparation, plus the runtime utilities train.py imports. DO NOT CHANGE the
evaluation (evaluate_bpb, get_token_bytes, the val split of make_dataloader): it is the ground truth.

    uv run prepare.py                      # download 10 training shards + the validation shard, train the tokenizer
    uv run prepare.py --num-shards 40      # more training data (-1 = all 6542 training shards)
    uv run prepare.py --source DIR         # offline: a local corpus (.parquet/.jsonl/.txt/.md) instead of the hub

Steps, each skipped when its output is already in the cache (see constants.py for the layout):
1. data: parquet shards with one `text` column, from the hub (HF_ENDPOINT) or built from --source;
2. tokenizer: byte-level BPE trained with rustbpe, stored as plain text + JSON (no pickle) and run by tiktoken;
3. tokens: every shard tokenized once into a flat uint16 array + document offsets, so the training loader
   only packs rows and never tokenizes on the hot path.
"""
import argparse
import base64
import bisect
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import rustbpe
import tiktoken
import torch

from constants import (BOS_TOKEN, DATA_DIR, DEFAULT_NUM_SHARDS, EVAL_TOKENS, HF_ENDPOINT, LOADER_BUFFER_DOCS,
                       LOADER_REFILL_DOCS, MAX_SEQ_LEN, MAX_SHARD, SPECIAL_TOKENS, SPLIT_PATTERN, TOKENIZER_DIR,
                       TOKENIZER_MAX_CHARS, TOKENIZER_MAX_DOC_CHARS, TOKENS_DIR, VAL_SHARD, VOCAB_SIZE, shard_name,
                       shard_url)

PREPARE_HINT = "run `uv run prepare.py` (or `uv run prepare.py --source DIR` for a local corpus) first"


class SetupError(SystemExit):
    """A user-facing problem (missing data, bad input): exits with one line on stderr, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------------------------------------------------------
# Device

def get_device():
    """The training device, detected at run time: cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------------------------
# Parquet shards

def read_parquet_texts(path):
    """Yield the `text` column of a parquet file as one list of str per row group, in order."""
    try:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise SetupError(f"{path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)})")
        for rg in range(pf.num_row_groups):
            yield [t or "" for t in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist()]  # null -> ""
    except (pa.ArrowException, OSError) as e:
        raise SetupError(f"{path} is not a readable parquet file ({e})")


def parquet_is_whole(path):
    """True when the parquet footer reads and the file has a `text` column (the check before a rename)."""
    try:
        return "text" in pq.ParquetFile(path).schema_arrow.names
    except (pa.ArrowException, OSError):
        return False


def write_parquet(texts, path):
    tmp = path + ".tmp"
    pq.write_table(pa.table({"text": pa.array(texts, type=pa.string())}), tmp, row_group_size=1024,
                   compression="zstd")
    os.replace(tmp, path)


def list_shards(split, data_dir=DATA_DIR):
    """Sorted parquet paths of a split: val is the pinned shard, train every other shard present."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    names = sorted(n for n in os.listdir(data_dir) if n.startswith("shard_") and n.endswith(".parquet")) \
        if os.path.isdir(data_dir) else []
    val = shard_name(VAL_SHARD)
    names = [n for n in names if (n == val) == (split == "val")]
    return [os.path.join(data_dir, n) for n in names]


# ---------------------------------------------------------------------------------------------------------------
# Download

def download_shard(index, data_dir=DATA_DIR, endpoint=HF_ENDPOINT, attempts=5, backoff=1.0):
    """Fetch one shard unless a whole copy is already there. Returns (status, detail); status in ok/skip/fail.

    The body streams to a temporary file that is renamed only after its byte count matches Content-Length
    and its parquet footer reads, so a file under its final name is always whole."""
    final = os.path.join(data_dir, shard_name(index))
    if os.path.exists(final):
        if parquet_is_whole(final):
            return "skip", "already present"
        os.remove(final)  # truncated or corrupt (e.g. copied in by hand): fetch it again
    url = shard_url(index, endpoint)
    tmp = f"{final}.{os.getpid()}.part"
    error = "no attempt made"
    for attempt in range(1, attempts + 1):
        t0, size = time.time(), 0
        try:
            with requests.get(url, stream=True, timeout=(15, 120)) as r:
                if 400 <= r.status_code < 500 and r.status_code not in (408, 429):
                    return "fail", f"HTTP {r.status_code} for {url}"  # permanent: retrying cannot help
                r.raise_for_status()
                expected = r.headers.get("Content-Length")
                with open(tmp, "wb") as f:
                    for chunk in r.iter_content(chunk_size=1 << 20):
                        f.write(chunk)
                        size += len(chunk)
            if expected is not None and size != int(expected):
                raise OSError(f"got {size} of {expected} bytes")
            if not parquet_is_whole(tmp):
                raise OSError("the downloaded file is not a readable parquet file with a `text` column")
            os.replace(tmp, final)
            return "ok", f"{size / 1e6:.1f} MB in {time.time() - t0:.1f}s"
        except (requests.RequestException, OSError) as e:
            error = f"{type(e).__name__} for {url}: {e}"
            if os.path.exists(tmp):
                os.remove(tmp)
            if attempt < attempts:
                time.sleep(backoff * 2 ** (attempt - 1))
    return "fail", f"{attempts} attempts, last: {error}"


def download_shards(indices, data_dir=DATA_DIR, endpoint=HF_ENDPOINT, workers=8, **kwargs):
    """Download shards in parallel, one progress line each. Returns the names of the shards that failed."""
    os.makedirs(data_dir, exist_ok=True)
    for name in os.listdir(data_dir):  # leftovers of an interrupted run
        if name.endswith(".part"):
            os.remove(os.path.join(data_dir, name))
    failed, counts = [], {"ok": 0, "skip": 0, "fail": 0}

    def one(index):
        return index, download_shard(index, data_dir, endpoint, **kwargs)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, (status, detail) in pool.map(one, indices):
            counts[status] += 1
            print(f"[{sum(counts.values())}/{len(indices)}] {shard_name(index)}: {status} ({detail})", flush=True)
            if status == "fail":
                failed.append(shard_name(index))
    print(f"data: {counts['ok']} downloaded, {counts['skip']} already present, {counts['fail']} failed", flush=True)
    return failed


# ---------------------------------------------------------------------------------------------------------------
# A local corpus (--source)

def iter_source_documents(source):
    """Documents of a local corpus, files in sorted path order: .parquet (`text` column), .jsonl (`text` field),
    .txt / .md (one document per file)."""
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
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
                        if text:
                            yield str(text)
            elif name.endswith((".txt", ".md")):
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                if text:
                    yield text


def build_from_source(source, data_dir=DATA_DIR, val_fraction=0.1, max_val_bytes=80e6, shard_bytes=40e6):
    """Turn a local corpus into shards in the cache layout. The validation shard holds the documents with the
    smallest content hashes (about val_fraction of the bytes, at most max_val_bytes): the split depends only
    on the documents, not on how files are named or ordered. The rest become training shards, in order."""
    if not os.path.isdir(source):
        raise SetupError(f"--source folder {source} does not exist")
    docs = list(iter_source_documents(source))
    if len(docs) < 2:
        raise SetupError(f"--source {source} holds {len(docs)} document(s) in .parquet/.jsonl/.txt/.md files; "
                         "need at least 2 (one for validation, one for training)")
    sizes = [len(d.encode("utf-8")) for d in docs]
    by_hash = sorted(range(len(docs)), key=lambda i: hashlib.sha1(docs[i].encode("utf-8")).digest())
    target = min(val_fraction * sum(sizes), max_val_bytes)
    val, val_bytes = set(), 0
    for i in by_hash[:-1]:  # leave at least one document for training
        if val and val_bytes >= target:
            break
        val.add(i)
        val_bytes += sizes[i]
    if os.path.isdir(data_dir):
        shutil.rmtree(data_dir)
    os.makedirs(data_dir)
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
    print(f"source: {len(docs)} documents, {sum(sizes) / 1e6:.1f} MB from {source}: {len(val)} documents "
          f"({val_bytes / 1e6:.1f} MB) in the validation shard, {n} training shard(s)")
    return n


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
            raise SetupError(f"the tokenizer in {tokenizer_dir} is corrupt ({e}); delete that folder and "
                             "run prepare.py again")
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
    assert tok.decode(tok.encode(sample)) == sample, "tokenizer round trip failed: delete the tokenizer folder and retry"
    print(f"tokenizer: trained {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s -> {tokenizer_dir}")
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Token files: each shard tokenized once. TOKENS_DIR/<tokenizer fingerprint>/shard_NNNNN.tokens.npy holds the
# documents back to back (BOS first in each), shard_NNNNN.index.npz their offsets, the refill chunks the loader
# reads them in (LOADER_REFILL_DOCS at a time within a parquet row group, as if streaming the parquet), and the
# parquet's size and mtime, so a replaced shard is never read through stale tokens.

def _token_paths(parquet_path, tokenizer):
    stem = os.path.join(TOKENS_DIR, tokenizer.fingerprint, os.path.basename(parquet_path)[:-len(".parquet")])
    return stem + ".tokens.npy", stem + ".index.npz"


def _source_stamp(parquet_path):
    st = os.stat(parquet_path)
    return np.array([st.st_size, st.st_mtime_ns], dtype=np.int64)


def tokens_are_current(parquet_path, tokenizer):
    tok_path, idx_path = _token_paths(parquet_path, tokenizer)
    if not (os.path.exists(tok_path) and os.path.exists(idx_path)):
        return False
    with np.load(idx_path, allow_pickle=False) as idx:
        return np.array_equal(idx["source"], _source_stamp(parquet_path))


def tokenize_shard(parquet_path, tokenizer):
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
    tok_path, idx_path = _token_paths(parquet_path, tokenizer)
    os.makedirs(os.path.dirname(tok_path), exist_ok=True)
    with open(tok_path + ".tmp", "wb") as f:
        np.save(f, np.concatenate(parts) if parts else np.zeros(0, dtype))
    os.replace(tok_path + ".tmp", tok_path)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with open(idx_path + ".tmp", "wb") as f:
        np.savez(f, offsets=offsets, chunk_ends=np.array(chunk_ends, dtype=np.int64),
                 source=_source_stamp(parquet_path))
    os.replace(idx_path + ".tmp", idx_path)  # last: its presence means the shard's tokens are complete
    return int(offsets[-1]), len(lengths)


def tokenize_all(tokenizer, data_dir=DATA_DIR):
    """Tokenize every shard that has no current token file; drop token files of other tokenizers."""
    keep = tokenizer.fingerprint
    if os.path.isdir(TOKENS_DIR):
        for name in os.listdir(TOKENS_DIR):
            if name != keep:
                shutil.rmtree(os.path.join(TOKENS_DIR, name), ignore_errors=True)
    for path in list_shards("val", data_dir) + list_shards("train", data_dir):
        if tokens_are_current(path, tokenizer):
            continue
        t0 = time.time()
        n_tokens, n_docs = tokenize_shard(path, tokenizer)
        print(f"tokens: {os.path.basename(path)}: {n_docs} documents, {n_tokens / 1e6:.1f}M tokens "
              f"in {time.time() - t0:.1f}s", flush=True)


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
    paths = list_shards(split)
    if not paths:
        raise SetupError(f"no {split} shard in {DATA_DIR}: {PREPARE_HINT}")
    for path in paths:
        if not tokens_are_current(path, tokenizer):
            raise SetupError(f"{os.path.basename(path)} has no current token file: {PREPARE_HINT}")
    epoch = 1
    while True:
        for path in paths:
            tok_path, idx_path = _token_paths(path, tokenizer)
            tokens = np.load(tok_path, mmap_mode="r", allow_pickle=False)
            with np.load(idx_path, allow_pickle=False) as idx:
                offsets, chunk_ends = idx["offsets"], idx["chunk_ends"]
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

def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare data shards, the tokenizer and token files for train.py.")
    ap.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS,
                    help=f"training shards to download (default {DEFAULT_NUM_SHARDS}; -1 = all {MAX_SHARD})")
    ap.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    ap.add_argument("--source", metavar="DIR",
                    help="build the shards from a local corpus instead of downloading (offline); replaces the "
                         "cached data, tokenizer and token files")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.source:
        build_from_source(args.source)
        shutil.rmtree(TOKENIZER_DIR, ignore_errors=True)  # new data: the old tokenizer no longer fits it
    else:
        if args.num_shards == 0 or args.num_shards < -1:
            raise SetupError("--num-shards must be a positive number of shards, or -1 for all")
        n = MAX_SHARD if args.num_shards == -1 else min(args.num_shards, MAX_SHARD)
        indices = list(range(n)) + [VAL_SHARD]
        print(f"data: {len(indices)} shards ({n} training + the validation shard) from {HF_ENDPOINT} "
              f"into {DATA_DIR}", flush=True)
        failed = download_shards(indices, workers=args.download_workers)
        if failed:
            raise SetupError(f"{len(failed)} of {len(indices)} shards failed to download: {', '.join(failed)} "
                             "(run prepare.py again to retry; whole shards are kept)")
    if os.path.exists(os.path.join(TOKENIZER_DIR, "ranks.txt")):
        tokenizer = Tokenizer.from_directory()
        print(f"tokenizer: {tokenizer.get_vocab_size()} tokens already in {TOKENIZER_DIR}")
    else:
        tokenizer = train_tokenizer()
    tokenize_all(tokenizer)
    n_train = len(list_shards("train"))
    print(f"done in {time.time() - t0:.1f}s: {n_train} training shard(s) + the validation shard, "
          f"tokenizer and token files in {os.path.dirname(DATA_DIR)}")


if __name__ == "__main__":
    main()
