"""evaluate_bpb, the fixed metric, against sums computed by hand from the same validation rows."""
import math
import os
import re

import pytest
import torch

from autoresearch import cache
import prepare
from autoresearch.bench import plain_batches
from constants import EVAL_TOKENS, MAX_SEQ_LEN, VAL_SHARD, shard_name


class TargetLoss(torch.nn.Module):
    """A stand-in model whose per-token loss is a known function of the target id; BOS targets get a huge
    loss, which must not count."""

    def __init__(self, bos):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.bos = bos

    def forward(self, x, y, reduction="mean"):
        assert reduction == "none"
        loss = (y % 7).float() * 0.25 + 0.5 + self.w
        return torch.where(y == self.bos, torch.full_like(loss, 1e6), loss)


def hand_counts(tokenizer, B):
    """(nats of TargetLoss, bytes as the reference counts them, exact bytes, rows) over the metric's rows, from the
    plain packing loader and each token's bytes decoded by hand."""
    bos = tokenizer.get_bos_token_id()
    rows = plain_batches(tokenizer, B, MAX_SEQ_LEN, "val")
    nats, reference, exact, n = 0.0, 0, 0, 0
    while n < EVAL_TOKENS // MAX_SEQ_LEN:
        batch, _ = next(rows)
        for row in batch[:EVAL_TOKENS // MAX_SEQ_LEN - n]:
            n += 1
            for t in row[1:]:
                if t == bos:
                    continue
                token = tokenizer.enc.decode_single_token_bytes(t)
                nats += (t % 7) * 0.25 + 0.5
                exact += len(token)
                reference += len(token.decode("utf-8", errors="replace").encode("utf-8"))  # U+FFFD: 3 bytes
    return nats, reference, exact, n


def test_bpb_matches_a_hand_computation_both_ways(tokenizer, in_a_run):
    B = 8
    nats, reference, exact, rows = hand_counts(tokenizer, B)
    assert reference > exact, "the test corpus has multi-byte text split inside characters"
    val_bpb = prepare.evaluate_bpb(TargetLoss(tokenizer.get_bos_token_id()), tokenizer, B)
    noted = in_a_run.data["evaluations"][-1]  # what the metric noted in the run's record
    assert val_bpb == noted["val_bpb"] == pytest.approx(nats / (math.log(2) * reference), rel=1e-6)  # as reference
    # the exact count, computed in the same pass
    assert noted["val_bpb_exact"] == pytest.approx(nats / (math.log(2) * exact), rel=1e-6)
    assert noted["val_bpb_exact"] / noted["val_bpb"] == pytest.approx(reference / exact, rel=1e-9)
    assert (noted["rows"], noted["seq_len"]) == (rows, MAX_SEQ_LEN)
    assert (noted["bytes"], noted["bytes_exact"]) == (reference, exact)


def test_a_loss_that_is_not_per_token_is_one_line(tokenizer):
    class Scalar(TargetLoss):
        def forward(self, x, y, reduction="mean"):
            return super().forward(x, y, "none").mean()  # ignores reduction='none'

    with pytest.raises(SystemExit, match=r"error: the model returned a loss of shape \(\) for reduction='none': "
                                         r"evaluate_bpb needs one loss per target token"):
        prepare.evaluate_bpb(Scalar(tokenizer.get_bos_token_id()), tokenizer, 8)


def test_uniform_model_scores_log2_vocab_bits_per_token(tokenizer, in_a_run):
    """A model that knows nothing (uniform over the vocab) pays log2(V) bits for each counted token."""
    B, V = 8, tokenizer.get_vocab_size()
    bos = tokenizer.get_bos_token_id()

    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, y, reduction="mean"):
            logits = torch.zeros(*x.shape, V) + self.w
            loss = torch.nn.functional.cross_entropy(logits.view(-1, V), y.reshape(-1), reduction=reduction)
            return loss.view(y.shape)

    rows = plain_batches(tokenizer, B, MAX_SEQ_LEN, "val")
    tokens = nbytes = 0
    for _ in range(EVAL_TOKENS // (B * MAX_SEQ_LEN)):
        for row in next(rows)[0]:
            counted = [t for t in row[1:] if t != bos]
            tokens += len(counted)
            nbytes += sum(len(tokenizer.enc.decode_single_token_bytes(t)) for t in counted)
    prepare.evaluate_bpb(Uniform(), tokenizer, B)
    assert in_a_run.data["evaluations"][-1]["val_bpb_exact"] == pytest.approx(tokens * math.log2(V) / nbytes, rel=1e-5)


def test_the_batch_size_does_not_change_what_is_scored(tokenizer):
    """The same EVAL_TOKENS // MAX_SEQ_LEN rows whatever the batch size; the last batch may be partial."""
    rows = EVAL_TOKENS // MAX_SEQ_LEN
    seen = []

    class Recording(TargetLoss):
        def forward(self, x, y, reduction="mean"):
            seen.append(y.clone())
            return super().forward(x, y, reduction)

    results = {}
    for B in (8, 5, rows, rows + 3):  # divides the rows, leaves a partial last batch, one batch, more than all
        seen.clear()
        results[B] = prepare.evaluate_bpb(Recording(tokenizer.get_bos_token_id()), tokenizer, B)
        assert sum(len(y) for y in seen) == rows
        if B == 8:
            expected_rows = torch.cat(seen)
        assert torch.equal(torch.cat(seen), expected_rows)
    assert len(set(results.values())) == 1, results


def test_the_metric_refuses_validation_data_changed_after_the_start(damageable_cache, tokenizer):
    prepare.check_cache()  # what a run verifies at start
    rel = cache.token_rels(shard_name(VAL_SHARD))[0]
    path = tokenizer.build.path(rel)
    with open(path, "r+b") as f:  # same size, one byte changed: a rewrite the start-up check did not see
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SystemExit, match=f"{re.escape(rel)} does not match its checksum"):
        prepare.evaluate_bpb(TargetLoss(tokenizer.get_bos_token_id()), tokenizer, 8)
