"""Prepare the data once, and the fixed ground truth that train.py imports. DO NOT CHANGE.

    uv run prepare.py                      # download 10 training shards + the validation shard, train the tokenizer
    uv run prepare.py --num-shards 40      # more training data (-1 = all 6542 training shards)
    uv run prepare.py --source DIR         # offline: a local corpus (.parquet/.jsonl, text and source code)
    uv run prepare.py --remove-old         # ... and remove the builds other than this one

The ground truth comes first in this file: the tokenizer, the cache check train.py starts with (check_cache), the
packing loader (make_dataloader) and the metric (evaluate_bpb). Then the command: the data (the hub's shards, or a
--source corpus) and a build of it (autoresearch/cache.py, docs/DATA.md). torch is imported only where needed.
"""
import argparse
import base64
import bisect
import errno
import itertools
import json
import math
import os
import shutil
import time

import numpy as np
import rustbpe
import tiktoken

import constants

from autoresearch import record
from autoresearch.cache import (BUILD_FORMAT, BUILDS_DIR, PREPARE_HINT, TOKENIZER_RELS, Build, FileProblem,
                                build_id, current_build, describe_source, file_sha256, list_shards, make_cache_folder,
                                new_build_folder, point_at, publish, read_parquet_texts, remove_old_builds, token_rels)
from autoresearch.download import fetch_hub_shards
from autoresearch.errors import UserError, sigterm_as_error
from autoresearch.source import TEXT_EXTENSIONS, check_source_folder, parse_extensions, read_source, split_source
from constants import (BOS_TOKEN, CACHE_DIR, DATA_DIR, DATASET_REPO, DEFAULT_NUM_SHARDS, HF_ENDPOINT,
                       LOADER_BUFFER_DOCS, LOADER_REFILL_DOCS, MAX_SHARD, POINTER_PATH, SPECIAL_TOKENS, SPLIT_PATTERN,
                       TOKENIZER_MAX_CHARS, TOKENIZER_MAX_DOC_CHARS, VAL_SHARD, VOCAB_SIZE, shard_name)

# ---------------------------------------------------------------------------------------------------------------
# The tokenizer


class Tokenizer:
    """The runtime tokenizer: tiktoken on the trained ranks, stored as plain text + JSON (no pickle to run code)."""

    def __init__(self, enc, build=None):
        self.enc, self.build = enc, build  # build: the cache build it came with, whose token files the loader reads
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir, build=None):
        """The tokenizer in tokenizer_dir (of `build`); one line naming the fix when it is missing or corrupt."""
        ranks_path = os.path.join(tokenizer_dir, "ranks.txt")
        meta_path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not (os.path.exists(ranks_path) and os.path.exists(meta_path)):
            raise UserError(f"no tokenizer in {tokenizer_dir}: {PREPARE_HINT}")
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
            raise UserError(f"the tokenizer in {tokenizer_dir} is corrupt ({e}): run prepare.py again")
        return cls(enc, build)

    @staticmethod
    def save(mergeable_ranks, tokenizer_dir, pattern=SPLIT_PATTERN):
        """Write learned ranks [(bytes, rank), ...] and the special tokens after them (in a build folder: whole)."""
        os.makedirs(tokenizer_dir, exist_ok=True)
        n = len(mergeable_ranks)
        meta = {"pattern": pattern, "special_tokens": {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}}
        with open(os.path.join(tokenizer_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        with open(os.path.join(tokenizer_dir, "ranks.txt"), "w", encoding="ascii") as f:
            for token, rank in sorted(mergeable_ranks, key=lambda tr: tr[1]):
                f.write(f"{base64.b64encode(bytes(token)).decode('ascii')} {rank}\n")

    def get_vocab_size(self):
        """Learned tokens + special tokens (8192 unless the training text was too small)."""
        return self.enc.n_vocab

    def get_bos_token_id(self):
        """The id of <|reserved_0|>, which starts every document."""
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """Encode a str or a list of str; `prepend` (an id or special token) goes first; special text stays plain."""
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        assert isinstance(text, (list, tuple)), f"encode takes a str or a list of str, got {type(text).__name__}"
        return [head + ids for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def token_byte_lengths(self, as_reference=False):
        """Bytes each token id stands for, 0 for special tokens. Exact (the default): the token's own bytes. As the
        reference counts them (as_reference=True): the token decoded alone to text and encoded again, so a token
        holding part of a multi-byte character counts each invalid run of bytes as U+FFFD, 3 bytes (the reference's
        `token_bytes`: b'\\x80' counts 3, b'\\xbf\\xbd' 6)."""
        special = {self.enc.encode_single_token(t) for t in self.enc.special_tokens_set}
        counts = []
        for i in range(self.enc.n_vocab):
            token = b"" if i in special else self.enc.decode_single_token_bytes(i)
            counts.append(len(token.decode("utf-8", errors="replace").encode("utf-8")) if as_reference else len(token))
        return counts


# ---------------------------------------------------------------------------------------------------------------
# The cache check, the loader and the metric: what every run reads

def check_cache():
    """train.py's first step: the current build matches its build.json (docs/DATA.md); returns its tokenizer."""
    t0 = time.time()
    build = current_build()
    for rel in TOKENIZER_RELS:
        build.require(rel)
    for name in build.shards("val"):
        build.open_tokens(name, full=True)
    for name in build.shards("train"):
        build.require(token_rels(name)[0], full=False)
    tokenizer = Tokenizer.from_directory(build.path("tokenizer"), build)
    print(f"cache: build {build.id} ({describe_source(build.source)}): tokenizer, {len(build.shards('train'))} "
          f"training shard(s) and the validation shard match its build.json (checked in {time.time() - t0:.1f}s)",
          flush=True)
    return tokenizer


def get_token_bytes(device, tokenizer):
    """int64 [2, vocab] on device: each token's bytes as the reference counts them (row 0) and exactly (row 1)."""
    import torch
    return torch.tensor([tokenizer.token_byte_lengths(as_reference=True), tokenizer.token_byte_lengths()],
                        dtype=torch.int64, device=device)


def _document_chunks(split, tokenizer):
    """Yield (token arrays of a refill chunk, epoch) forever: the split's documents in file order."""
    build = tokenizer.build or current_build()
    # (the metric's data by full checksum: still exactly what was verified at start)
    shards = [build.open_tokens(name, full=split == "val") for name in build.shards(split)]
    if not any(len(offsets) > 1 for _, offsets, _ in shards):  # (no shard at all included)
        raise FileProblem(build.path("tokens"), f"hold no document of the {split} split", PREPARE_HINT)
    epoch = 1
    while True:
        for tokens, offsets, chunk_ends in shards:
            start = 0
            for end in chunk_ends.tolist():
                yield [tokens[offsets[i]:offsets[i + 1]] for i in range(start, end)], epoch
                start = end
        epoch += 1


def pack_rows(tokenizer, B, T, split):
    """Yield (rows, epoch) forever: rows is an int64 numpy array [B, T+1] of best-fit packed documents: each row
    filled from a buffer of >= LOADER_BUFFER_DOCS documents with the longest one that fits (the earliest among
    equals), and when none fits, the shortest one cropped to fill it (its rest dropped). Every row starts with BOS;
    no padding; the same rows whatever B is. The buffer is sorted (length, -arrival) keys: each choice is a bisect."""
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


def make_dataloader(tokenizer, B, T, split, device):
    """Yield (inputs, targets, epoch) forever: int64 [B, T] on device; a val loader made during a run is noted."""
    if split == "val" and record.current() is not None:
        record.note_violation("train.py made a loader of the validation split (make_dataloader(..., 'val', ...))")
    return _batches(tokenizer, B, T, split, device)


def _batches(tokenizer, B, T, split, device):  # (the metric reads the val split here: never noted)
    import torch
    device = torch.device(device)
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

    Over the first EVAL_TOKENS // MAX_SEQ_LEN rows of the val split (the constants as they are when it runs; the
    same rows whatever batch_size is; the last batch may be partial): the sum of per-token cross-entropy (nats)
    over targets that stand for at least one byte, divided by ln(2) times the sum of their bytes. Special tokens
    (BOS) as targets are excluded from both sums. The model is called as model(x, y, reduction='none') and must
    return per-token losses [B, T]; anything else is an error.

    Returns val_bpb with the bytes counted as the reference counts them, so that it compares with the reference's
    published numbers and runs; the exact count (each token's own bytes) gives val_bpb_exact in the same pass.
    Both, with the rows and tokens scored, are noted in the run's record (record.note_evaluation), from where the
    summary prints them."""
    import torch

    from autoresearch import flops
    flops.stop()  # training is over: the compute budget counts nothing from here on
    record.evaluation_starts()
    rows, seq_len = constants.EVAL_TOKENS // constants.MAX_SEQ_LEN, constants.MAX_SEQ_LEN  # (at least one row)
    device = next(model.parameters()).device
    token_bytes = get_token_bytes(device, tokenizer)  # [2, V]: as the reference counts them, exactly
    loader = _batches(tokenizer, batch_size, seq_len, "val", device)
    total_nats, total_bytes, scored, tokens, last_line = 0.0, [0, 0], 0, 0, time.time()
    with torch.no_grad():
        for start in range(0, rows, batch_size):
            if time.time() - last_line >= 30:  # a long evaluation (a small machine) shows it is alive
                print(f"eval: in progress, {start:,} of {rows:,} rows done so far", flush=True)
                last_line = time.time()
            x, y, _ = next(loader)
            x, y = x[:rows - start], y[:rows - start]
            loss = model(x, y, reduction="none")
            if not isinstance(loss, torch.Tensor) or loss.shape != y.shape:
                shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise UserError(f"the model returned a loss of shape {shape} for reduction='none': evaluate_bpb "
                                f"needs one loss per target token, {tuple(y.shape)}")
            nbytes = token_bytes[:, y.reshape(-1)]
            counted = nbytes[1] > 0
            total_nats += torch.where(counted, loss.reshape(-1).float(), 0.0).sum().item()
            reference, exact, n = torch.stack([nbytes[0].sum(), nbytes[1].sum(), counted.sum()]).tolist()  # 1 sync
            total_bytes[0], total_bytes[1], tokens = total_bytes[0] + reference, total_bytes[1] + exact, tokens + n
            scored += len(y)
    val_bpb, val_bpb_exact = (total_nats / (math.log(2) * n) for n in total_bytes)
    record.note_evaluation(dict(val_bpb=val_bpb, val_bpb_exact=val_bpb_exact, rows=scored, seq_len=seq_len,
                                tokens=tokens, bytes=total_bytes[0], bytes_exact=total_bytes[1], nats=total_nats))
    return val_bpb


# ---------------------------------------------------------------------------------------------------------------
# Building the cache: tokenizer training, tokenization, the command

def train_tokenizer(tokenizer_dir, batches):
    """Train byte-level BPE on the training documents (lists of str; each cut to 10k chars, at most 1e9 chars)."""

    def texts():
        total = 0
        for batch in batches:
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
    print(f"tokenizer: trained {tok.get_vocab_size()} tokens in {time.time() - t0:.1f}s")
    if tok.get_vocab_size() < VOCAB_SIZE:
        print(f"note: the training text holds too few distinct pieces for {VOCAB_SIZE} tokens: the tokenizer has "
              f"{tok.get_vocab_size()}, and train.py's model follows it (val_bpb still compares: it is per byte)")
    return tok


def tokenize_shard(name, batches, tokenizer, folder):
    """A shard's documents (its row groups) into token files in the loader's chunks; build.json's entry for it."""
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    parts, lengths, chunk_ends = [], [], []
    for texts in batches:
        for i in range(0, len(texts), LOADER_REFILL_DOCS):
            docs = tokenizer.encode(texts[i:i + LOADER_REFILL_DOCS], prepend=tokenizer.get_bos_token_id(),
                                    num_threads=os.cpu_count() or 1)
            lengths.extend(len(d) for d in docs)
            parts.append(np.fromiter(itertools.chain.from_iterable(docs), dtype=dtype,
                                     count=sum(len(d) for d in docs)))
            chunk_ends.append(len(lengths))
    tok_path, idx_path = (os.path.join(folder, rel) for rel in token_rels(name))
    os.makedirs(os.path.dirname(tok_path), exist_ok=True)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    with open(tok_path, "wb") as f:
        np.save(f, np.concatenate(parts) if parts else np.zeros(0, dtype))
    with open(idx_path, "wb") as f:
        np.savez(f, offsets=offsets, chunk_ends=np.array(chunk_ends, dtype=np.int64))
    return {"n_tokens": int(offsets[-1]), "n_docs": len(lengths), "dtype": np.dtype(dtype).name}


def make_build(source, shards=None, docs=None):
    """The build of `source` (the hub's `shards` or a corpus's `docs`): the made one if it verifies, else a new one."""
    name = build_id(source)
    final = os.path.join(BUILDS_DIR, name)
    if os.path.isdir(final):
        try:
            problem = Build.load(final).verify()
        except FileProblem as e:
            problem = e
        if problem is None:
            point_at(name)
            print(f"build: {name} ({describe_source(source)}) is made already and matches its build.json", flush=True)
            return Build.load(final)
        print(f"build: {name}: {problem.path} {problem.problem}: making it again", flush=True)
        aside = f"{final}.damaged-{os.getpid()}"
        os.rename(final, aside)  # (a run still reading it keeps its files until it ends)
        shutil.rmtree(aside, ignore_errors=True)
    folder = new_build_folder(name)
    try:
        if docs is not None:  # (a corpus's documents are split here, and never written but as tokens)
            split = split_source(docs)
            dropped = f" ({split.duplicates} exact duplicate(s) dropped)" if split.duplicates else ""
            print(f"source: {len(docs)} documents{dropped}: {len(split.val)} documents ({split.val_bytes / 1e6:.1f} "
                  f"MB) in the validation shard, {len(split.train)} training shard(s)", flush=True)
            texts = {shard_name(VAL_SHARD): split.val, **{shard_name(i): t for i, t in enumerate(split.train)}}
            shards = list(texts)

        def batches(shard):  # a shard's documents, a list of str per row group (a corpus's: one list)
            return [texts[shard]] if docs is not None else read_parquet_texts(os.path.join(DATA_DIR, shard))

        val = [n for n in shards if n == shard_name(VAL_SHARD)]
        train = sorted(n for n in shards if n not in val)
        try:
            tokenizer = train_tokenizer(os.path.join(folder, "tokenizer"),
                                        (batch for shard in train for batch in batches(shard)))
            tokens = {}
            for shard in val + train:
                t0 = time.time()
                tokens[shard] = tokenize_shard(shard, batches(shard), tokenizer, folder)
                print(f"tokens: {shard}: {tokens[shard]['n_docs']} documents, {tokens[shard]['n_tokens'] / 1e6:.1f}M "
                      f"tokens in {time.time() - t0:.1f}s", flush=True)
        except FileProblem as e:  # (a hub shard damaged by hand: whole when it got its name)
            if docs is not None or e.fix:
                raise
            raise FileProblem(e.path, e.problem, "remove it and run prepare.py again (it is downloaded again)")
        files = {}
        for root, _, names in os.walk(folder):
            for n in names:
                path = os.path.join(root, n)
                files[os.path.relpath(path, folder).replace(os.sep, "/")] = {"size": os.path.getsize(path),
                                                                             "sha256": file_sha256(path)}
        build = publish(folder, {"format": BUILD_FORMAT, "id": name, "source": source, "files": files,
                                 "shards": {"val": val, "train": train}, "tokens": tokens})
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # (gone already when published)
    print(f"build: {name} made in {BUILDS_DIR}", flush=True)
    return build


def main(argv=None):
    ap = argparse.ArgumentParser(description="Prepare data shards, the tokenizer and token files for train.py. "
                                             "Rerun it to verify the build; a changed source makes a new one.")
    ap.add_argument("--num-shards", type=int, default=DEFAULT_NUM_SHARDS,
                    help=f"training shards to download (default {DEFAULT_NUM_SHARDS}; -1 = all {MAX_SHARD})")
    ap.add_argument("--download-workers", type=int, default=8, help="parallel downloads (default 8)")
    ap.add_argument("--source", metavar="DIR",
                    help="build from a local corpus instead of downloading (offline; the folder is only read)")
    ap.add_argument("--extensions", metavar="EXTS",
                    help="with --source: the plain-text files to read, e.g. .py,.md (default: prose and source code, "
                         f"{' '.join(TEXT_EXTENSIONS)}); .parquet and .jsonl are always read")
    ap.add_argument("--remove-old", action="store_true",
                    help="then remove every build but this one (builds are otherwise kept, side by side)")
    args = ap.parse_args(argv)
    if args.download_workers < 1:
        raise UserError("--download-workers must be at least 1")
    if args.extensions is not None and args.source is None:
        raise UserError("--extensions goes with --source DIR (the hub's shards are parquet)")
    extensions = parse_extensions(args.extensions) if args.extensions is not None else TEXT_EXTENSIONS
    if args.source is not None:
        source_path = check_source_folder(args.source)
    elif args.num_shards == 0 or args.num_shards < -1:
        raise UserError("--num-shards must be a positive number of shards, or -1 for all")
    t0 = time.time()
    new_cache = not os.path.exists(CACHE_DIR)
    stopped = ("prepare.py was stopped (SIGTERM): whole shards are kept, and no build is half made; run it again to "
               "finish")
    try:
        with sigterm_as_error(stopped):
            make_cache_folder()
            if args.source is not None:
                docs, digest = read_source(source_path, extensions)
                source = {"kind": "local", "path": source_path, "digest": digest}
                build = make_build(source, docs=docs)
            else:
                shards = fetch_hub_shards(args.num_shards, args.download_workers)
                source = {"kind": "hub", "dataset": DATASET_REPO, "endpoint": HF_ENDPOINT, "shards": shards}
                build = make_build(source, shards=shards)
            if args.remove_old:
                print(f"cache: {remove_old_builds(build.id)} old build(s) removed", flush=True)
    except BaseException as e:
        if new_cache and not os.path.exists(POINTER_PATH) and not list_shards("train") + list_shards("val"):
            # (a first run that made nothing: no empty cache left behind)
            shutil.rmtree(CACHE_DIR, ignore_errors=True)
        if not isinstance(e, OSError):
            raise
        free = shutil.disk_usage(CACHE_DIR).free if os.path.isdir(CACHE_DIR) else None
        if e.errno == errno.ENOSPC or (free is not None and free < 64e6):
            raise UserError(f"the disk holding {CACHE_DIR} is full ({(free or 0) / 1e6:.0f} MB free): free some "
                            "space or set AUTORESEARCH_CACHE_DIR to a larger disk, then run prepare.py again "
                            "(whole shards are kept)")
        raise UserError(f"{e.filename or CACHE_DIR}: {e.strerror or e}")
    print(f"done in {time.time() - t0:.1f}s: {len(build.shards('train'))} training shard(s) + the validation shard, "
          f"tokenizer and token files in build {build.id}, which {POINTER_PATH} names")


if __name__ == "__main__":
    main()
