"""Benchmarks on the prepared cache, printed as one table. Builds nothing new.

    uv run -m autoresearch.bench loader     # this project's loader vs a plain single-threaded one (any machine)
    uv run -m autoresearch.bench attention  # attention kernels alone, forward + backward (CUDA)
    uv run -m autoresearch.bench run        # one full `train.py` run, its summary (CUDA, ~6 minutes)
    uv run -m autoresearch.bench startup    # start-up and eval time as is, again, after an lr and a DEPTH edit (CUDA)
    uv run -m autoresearch.bench all

`plain_batches` is the straightforward form of the packing algorithm (stream parquet row groups, batch-encode
128 documents at a time, scan the buffer in Python for every placement). It is the speed baseline here and
an independent reference for the tests: prepare.make_dataloader must produce the very same rows.
"""
import argparse
import os
import subprocess
import sys
import time

from autoresearch.cache import list_shards, read_parquet_texts
from autoresearch.results import run_summary
from constants import LOADER_BUFFER_DOCS, LOADER_REFILL_DOCS, MAX_SEQ_LEN
from prepare import Tokenizer, make_dataloader


def plain_batches(tokenizer, B, T, split):
    """Yield (rows [B, T+1] as lists, epoch): best-fit packing with a linear scan, tokenizing on the fly."""
    def doc_batches():
        epoch = 1
        while True:
            for path in list_shards(split):
                for texts in read_parquet_texts(path):
                    for i in range(0, len(texts), LOADER_REFILL_DOCS):
                        yield texts[i:i + LOADER_REFILL_DOCS], epoch
            epoch += 1

    batches, buffer, bos = doc_batches(), [], tokenizer.get_bos_token_id()
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < LOADER_BUFFER_DOCS:
                    texts, epoch = next(batches)
                    buffer.extend(tokenizer.encode(texts, prepend=bos))
                remaining = T + 1 - len(row)
                best, best_len = -1, 0
                for i, doc in enumerate(buffer):
                    if best_len < len(doc) <= remaining:
                        best, best_len = i, len(doc)
                if best >= 0:
                    row.extend(buffer.pop(best))
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(shortest)[:remaining])
            rows.append(row)
        yield rows, epoch


def bench_loader(B=32, T=MAX_SEQ_LEN, seconds=10.0):
    """Tokens per second of each loader; make_dataloader delivers to the training device (copies included)."""
    from autoresearch.hardware import detect_device, synchronize
    tokenizer = Tokenizer.from_directory()
    device = detect_device()
    out = []
    for name, batches in [("plain single-threaded loader", plain_batches(tokenizer, B, T, "train")),
                          (f"prepare.make_dataloader (to {device.type})",
                           make_dataloader(tokenizer, B, T, "train", device))]:
        next(batches)  # warm up: first shard opened, buffer filled
        n, t0 = 0, time.time()
        while time.time() - t0 < seconds:
            next(batches)
            n += 1
        synchronize(device)
        out.append((f"loader: {name}, B={B} T={T}", f"{n * B * T / (time.time() - t0) / 1e6:.2f}M tok/s"))
    return out


def bench_attention(B=32, H=4, T=MAX_SEQ_LEN, D=128, iters=20):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from train import sliding_window_mask
    assert torch.cuda.is_available(), "bench.py attention needs a CUDA GPU"
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    window = T // 2
    mask = create_block_mask(sliding_window_mask(window), None, None, T, T, device="cuda")

    def sdpa(backend):
        def f():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return f

    candidates = [("SDPA cuDNN, full causal", sdpa(SDPBackend.CUDNN_ATTENTION), T),
                  ("SDPA flash, full causal", sdpa(SDPBackend.FLASH_ATTENTION), T),
                  ("SDPA mem-efficient, full causal", sdpa(SDPBackend.EFFICIENT_ATTENTION), T),
                  (f"FlexAttention, window {window}", lambda: flex(q, k, v, block_mask=mask), window)]
    out = []
    for name, f, w in candidates:
        try:
            for _ in range(3):
                f().sum().backward()
            torch.cuda.synchronize()
            t0 = time.time()
            for _ in range(iters):
                f().sum().backward()
            torch.cuda.synchronize()
            ms = (time.time() - t0) / iters * 1000
            pairs = sum(min(i + 1, w + 1) for i in range(T))  # query-key pairs per (batch, head)
            tflops = 4 * 3.5 * B * H * pairs * D / (ms / 1000) / 1e12  # fwd 2 matmuls, bwd 2.5x fwd
            out.append((f"attention: {name}, B={B} H={H} T={T} D={D}", f"{ms:.2f} ms fwd+bwd, {tflops:.0f} TFLOP/s"))
        except Exception as e:  # a backend this GPU or torch build lacks
            out.append((f"attention: {name}", f"unavailable ({type(e).__name__})"))
    return out


def bench_run():
    """One full run of train.py, in a temporary folder (its run.json must not replace an agent's)."""
    import tempfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as folder:
        proc = subprocess.run([sys.executable, os.path.join(root, "train.py")], capture_output=True, text=True,
                              cwd=folder, env={**os.environ, "PYTHONPATH": root})
    keys = run_summary(proc.stdout)
    if proc.returncode != 0 or "val_bpb" not in keys:
        return [("train.py run", f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")]
    return [(f"train.py: {k}", keys[k]) for k in ("val_bpb", "training_seconds", "total_seconds", "peak_vram_mb",
                                                 "mfu_percent", "total_tokens_M", "num_steps", "tok_per_sec", "gpu")]


# The edits of the start-up benchmark (issue "every experiment starts fast"): the lines of train.py they change.
EDITS = [("same train.py again", None, None),
         ("after an MATRIX_LR edit", "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 "),
         ("after a DEPTH edit (+1 layer)", "DEPTH = 2 if SMALL else 8 ", "DEPTH = 3 if SMALL else 9 ")]


def bench_startup(budget=20):
    """start-up and eval seconds of train.py as it is (first on this machine when the compile cache is cold), again,
    and after the edits an agent makes most: each run a copy of train.py in a temporary folder, with a short
    training budget (AUTORESEARCH_TIME_BUDGET) since only what comes before and after the training is timed."""
    import tempfile
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = open(os.path.join(root, "train.py"), encoding="utf-8").read()
    env = {**os.environ, "AUTORESEARCH_TIME_BUDGET": str(budget), "PYTHONPATH": root}
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for label, old, new in [("train.py as it is", None, None)] + EDITS:
            if old is not None:
                assert old in source, f"train.py no longer has {old!r}: update bench.py's EDITS"
            path = os.path.join(folder, "train.py")
            with open(path, "w", encoding="utf-8") as f:
                f.write(source if old is None else source.replace(old, new))
            proc = subprocess.run([sys.executable, path], capture_output=True, text=True, env=env, cwd=folder)
            keys = run_summary(proc.stdout)
            if proc.returncode != 0 or "startup_seconds" not in keys:
                out.append((f"start-up: {label}", f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"))
                continue
            out.append((f"start-up: {label}", ", ".join(f"{k} {keys[k]}" for k in (
                "startup_seconds", "eval_seconds", "total_seconds", "tok_per_sec", "num_steps"))))
    return out


def main():
    ap = argparse.ArgumentParser(description="Benchmarks on the prepared cache.")
    ap.add_argument("what", choices=["loader", "attention", "run", "startup", "all"])
    args = ap.parse_args()
    rows = []
    if args.what in ("loader", "all"):
        rows += bench_loader()
    if args.what in ("attention", "all"):
        rows += bench_attention()
    if args.what in ("run", "all"):
        rows += bench_run()
    if args.what in ("startup", "all"):
        rows += bench_startup()
    import torch
    print(f"| measurement ({os.uname().nodename}, torch {torch.__version__}) | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
