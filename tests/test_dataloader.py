"""The packing loader: the reference's invariants, and the very same rows as the plain reference implementation."""
import itertools
import os

import numpy as np
import pytest
import torch

from autoresearch import cache
import prepare
from autoresearch.bench import plain_batches
from conftest import build_docs


def split_docs(tokenizer, split):
    """The split's documents as token tuples, BOS first: the build's documents, encoded again."""
    texts = build_docs(tokenizer.build, split)
    return [tuple(d) for d in tokenizer.encode(texts, prepend=tokenizer.get_bos_token_id())]


def segments(row, bos):
    """Cut a row at its BOS tokens: each piece is one document or the cropped head of one."""
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [tuple(row[a:b]) for a, b in zip(starts, starts[1:])]


def test_rows_are_packed_documents(tokenizer):
    bos, B, T = tokenizer.get_bos_token_id(), 4, 96
    for split in ("train", "val"):
        docs = split_docs(tokenizer, split)
        whole_docs = set(docs)
        other = set(split_docs(tokenizer, "val" if split == "train" else "train")) - whole_docs
        prefixes = {d[:n] for d in docs for n in range(1, min(len(d), T + 1) + 1)}
        loader = prepare.make_dataloader(tokenizer, B, T, split, device="cpu")
        for x, y, epoch in itertools.islice(loader, 20):
            assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
            assert (x[:, 0] == bos).all(), "every row starts with BOS"
            assert torch.equal(x[:, 1:], y[:, :-1]), "targets are the inputs shifted by one"
            for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
                pieces = segments(row, bos)
                for seg in pieces:
                    assert seg in prefixes, "every token comes from a real document of this split (no padding)"
                    assert seg not in other, "a split's rows come only from its own shards"
                # all but the last piece of a row are whole documents (only the last one may be cropped)
                assert all(seg in whole_docs for seg in pieces[:-1])


def test_same_rows_as_the_plain_reference(tokenizer):
    for split, B, T in (("train", 3, 128), ("val", 5, 64)):
        plain = plain_batches(tokenizer, B, T, split)
        fast = prepare.pack_rows(tokenizer, B, T, split)
        for _ in range(60):
            (rows_a, epoch_a), (rows_b, epoch_b) = next(plain), next(fast)
            assert np.array_equal(np.array(rows_a), rows_b) and epoch_a == epoch_b


def test_epochs_advance(tokenizer):
    val_tokens = sum(len(d) for d in split_docs(tokenizer, "val"))
    loader = prepare.make_dataloader(tokenizer, 8, 64, "val", device="cpu")
    epochs = [e for _, _, e in itertools.islice(loader, 3 * val_tokens // (8 * 65) + 5)]
    # (a split smaller than the 1000-document buffer is read several times before the first row is full)
    assert epochs[0] >= 1 and epochs == sorted(epochs) and epochs[-1] >= epochs[0] + 2


def test_cut_tokens_point_at_prepare(damageable_cache, tokenizer):
    path = tokenizer.build.path(cache.token_rels(cache.shard_name(0))[0])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 2)  # a build's file cut after it was made
    with pytest.raises(SystemExit, match="uv run prepare.py"):
        next(prepare.make_dataloader(tokenizer, 2, 32, "train", device="cpu"))
