"""Benchmarks on the prepared cache, printed as one table; and the benchmark corpus they run on.

    uv run -m autoresearch.bench loader     # this project's loader vs a plain single-threaded one (any machine)
    uv run -m autoresearch.bench attention  # attention kernels alone, forward + backward (CUDA)
    uv run -m autoresearch.bench run        # one full `train.py` run, its summary (CUDA, ~6 minutes)
    uv run -m autoresearch.bench startup    # start-up and eval time: as is, again, after lr, DEPTH, ASPECT_RATIO edits
    uv run -m autoresearch.bench profile    # where a steady step's time goes, by category (kernels on CUDA)
    uv run -m autoresearch.bench gpu        # the GPU check: tests, attention, an 80-s run, start-up, profile (CUDA)
    uv run -m autoresearch.bench all
    python3 -m autoresearch.bench corpus [DIR]  # the benchmark corpus, offline, from the installed packages' text

`plain_batches` is the straightforward form of the packing algorithm (stream parquet row groups, batch-encode
128 documents at a time, scan the buffer in Python for every placement). It is the speed baseline here and
an independent reference for the tests: prepare.make_dataloader must produce the very same rows.
"""
import argparse
import contextlib
import os
import re
import subprocess
import sys
import time

from autoresearch import record
from autoresearch.cache import current_build, read_parquet_texts
from constants import DATA_DIR, LOADER_BUFFER_DOCS, LOADER_REFILL_DOCS, MAX_SEQ_LEN
from prepare import check_cache, make_dataloader


def plain_batches(tokenizer, B, T, split):
    """Yield (rows [B, T+1] as lists, epoch): best-fit packing with a linear scan, tokenizing on the fly."""
    def shard_texts(build, name):  # the hub's parquet; a corpus is kept only as tokens: decoded, in its chunks
        if build.source.get("kind") != "local":
            for texts in read_parquet_texts(os.path.join(DATA_DIR, name)):
                yield from (texts[i:i + LOADER_REFILL_DOCS] for i in range(0, len(texts), LOADER_REFILL_DOCS))
            return
        tokens, offsets, chunk_ends = build.open_tokens(name)
        for start, end in zip([0] + chunk_ends.tolist(), chunk_ends.tolist()):
            yield [tokenizer.decode(tokens[offsets[i] + 1:offsets[i + 1]].tolist()) for i in range(start, end)]

    def doc_batches():
        epoch = 1
        while True:
            build = tokenizer.build or current_build()
            for name in build.shards(split):
                yield from ((texts, epoch) for texts in shard_texts(build, name))
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
    tokenizer = check_cache()
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
    from torch.nn.attention.flex_attention import flex_attention

    from autoresearch import hardware
    assert torch.cuda.is_available(), "bench.py attention needs a CUDA GPU"
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    window = T // 2
    mask = hardware.block_masks(T, (window,), torch.device("cuda"))[window]
    explicit = hardware.window_mask(T, window, torch.device("cuda"))

    def sdpa(backend):
        def f():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return f

    candidates = [("SDPA cuDNN, full causal", sdpa(SDPBackend.CUDNN_ATTENTION), T),
                  ("SDPA flash, full causal", sdpa(SDPBackend.FLASH_ATTENTION), T),
                  ("SDPA mem-efficient, full causal", sdpa(SDPBackend.EFFICIENT_ATTENTION), T),
                  (f"FlexAttention, window {window}", lambda: flex(q, k, v, block_mask=mask), window),
                  (f"SDPA, window {window} as an explicit mask (the compute budget's)",
                   lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=explicit), window)]
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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(source=None, budget=None, log=None, timeout=None, env=None, profile_step=None):
    """Run train.py (or `source`, an edited copy of it) as `uv run train.py` does, in a temporary folder (its
    run.json never replaces an agent's), with AUTORESEARCH_TIME_BUDGET=budget when given and the variables in
    `env`, profiling step `profile_step` when given (run_profiled); the output goes to the file `log` when given.
    Returns (exit status, {summary key: value}, the output)."""
    import tempfile
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    if budget is not None:
        env["AUTORESEARCH_TIME_BUDGET"] = str(budget)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(ROOT, "train.py")
        if source is not None:
            path = os.path.join(folder, "train.py")
            with open(path, "w", encoding="utf-8") as f:
                f.write(source)
        command = [sys.executable, path] if profile_step is None else [
            sys.executable, "-c",
            f"from autoresearch.bench import run_profiled; run_profiled({path!r}, {profile_step})"]
        status, out = run_logged(command, folder, env, timeout, log)
        data = record.read(os.path.join(folder, record.RECORD_NAME)) if status == 0 else None
    return status, (data or {}).get("summary") or {}, out


def run_logged(command, cwd, env, timeout, log=None):
    """(exit status or "timeout", stdout + stderr) of a command; the output also goes to the file `log`."""
    try:
        proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        status, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = "timeout"
        out = "".join(p.decode(errors="replace") if isinstance(p, bytes) else p for p in (e.stdout, e.stderr) if p)
    if log is not None:
        with open(log, "w", encoding="utf-8") as f:
            f.write(out)
    return status, out


RUN_KEYS = ("val_bpb", "val_bpb_exact", "training_seconds", "total_seconds", "startup_seconds", "eval_seconds",
            "peak_vram_mb", "mfu_percent", "num_steps", "tok_per_sec", "flops_per_sec", "gpu")


def bench_run(budget=None, log=None):
    """One full run of train.py (a shorter one with `budget` seconds), its summary."""
    label = "train.py" + (f" ({budget:g}-s budget)" if budget else "")
    status, keys, out = run_train(budget=budget, log=log)
    if status != 0:
        return [(f"{label} run", f"failed (exit {status}): {out.strip()[-300:]}")]
    return [(f"{label}: {k}", keys[k]) for k in RUN_KEYS if k in keys]


# The edits of the start-up benchmark : the lines of train.py they change.
EDITS = [("same train.py again", None, None),
         ("after an MATRIX_LR edit", "MATRIX_LR = 0.04 ", "MATRIX_LR = 0.05 "),
         ("after a DEPTH edit (+1 layer)", "DEPTH = 2 if SMALL else 8 ", "DEPTH = 3 if SMALL else 9 "),
         ("after an ASPECT_RATIO edit (64 -> 80)", "ASPECT_RATIO = 64 ", "ASPECT_RATIO = 80 ")]


def bench_startup(budget=20, log_dir=None, warm=False):
    """start-up and eval seconds of train.py as it is (the first run on this machine: the compile caches cold),
    again, and after the edits an agent makes most: each run a copy of train.py, with a short training budget
    (AUTORESEARCH_TIME_BUDGET) since only what comes before and after the training is timed. warm: the caches are
    warm already (another run of this train.py came first), so the first, cold run is left out."""
    source = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read()
    out = []
    for n, (label, old, new) in enumerate(([] if warm else [("train.py as it is", None, None)]) + EDITS):
        if old is not None:
            assert old in source, f"train.py no longer has {old!r}: update bench.py's EDITS"
        log = os.path.join(log_dir, f"startup-{n}.log") if log_dir else None
        status, keys, run_out = run_train(source if old is None else source.replace(old, new), budget, log)
        if status != 0 or "startup_seconds" not in keys:
            out.append((f"start-up: {label}", f"failed (exit {status}): {run_out.strip()[-300:]}"))
            continue
        out.append((f"start-up: {label}", ", ".join(f"{k} {keys[k]}" for k in (
            "startup_seconds", "eval_seconds", "total_seconds", "tok_per_sec", "num_steps"))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Profile: kernels (and profiler events) by category, the first that matches a lowered name wins, so that a profile
# names the attention that ran (a silent fallback to a slower kernel shows) and sums kernel time per category.
# Mem-efficient before cuDNN: its kernels are "fmha_cutlass...".
KERNEL_CATEGORIES = [
    ("attention: FlexAttention", ("flex_attention",)),
    ("attention: mem-efficient SDPA", ("_scaled_dot_product_efficient_attention", "fmha_cutlass",
                                       "efficient_attention")),
    ("attention: cuDNN SDPA", ("_scaled_dot_product_cudnn_attention", "cudnn", "fort_native_sdpa", "fmha")),
    ("attention: flash SDPA", ("_scaled_dot_product_flash_attention", "flash_fwd", "flash_bwd")),
    ("attention: math SDPA (slow)", ("_scaled_dot_product_attention_math",)),
    ("matmul (GEMM)", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "_mm_", "splitk", "aten::mm", "aten::addmm",
                       "aten::bmm", "aten::baddbmm")),
    ("cross-entropy / softmax", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("RMSNorm", ("rms_norm", "rsqrt")),
    ("ReLU^2", ("relu", "threshold_backward")),
    ("copy / fill", ("memcpy", "memset", "copy", "fill", "cat_")),
    ("other fused elementwise (Triton)", ("triton_",)),
    # Off CUDA (ops, not kernels): the eager elementwise ops, and the compute budget's FLOP counter (its dispatch).
    ("other elementwise (eager)", ("aten::mul", "aten::div", "aten::add", "aten::sub", "aten::tanh", "aten::pow",
                                   "aten::sqrt", "aten::exp", "aten::lerp", "aten::neg", "aten::clamp", "aten::where")),
    ("the FLOP counter (compute budget)", ("pythondispatchmode",)),
]


def kernel_category(name):
    """The category of a kernel or profiler event name, "other" where none matches."""
    lowered = name.lower()
    return next((category for category, keys in KERNEL_CATEGORIES if any(k in lowered for k in keys)), "other")


def kernel_categories(kernels):
    """{category: seconds} from (kernel name, seconds) pairs, in KERNEL_CATEGORIES' order, "other" last."""
    totals = dict.fromkeys([name for name, _ in KERNEL_CATEGORIES] + ["other"], 0.0)
    for kernel, seconds in kernels:
        totals[kernel_category(kernel)] += seconds
    return {name: t for name, t in totals.items() if t > 0}


def attention_kernels(event_names):
    """{implementation: count} of the attention that ran, from (profiler event or kernel name, count) pairs."""
    found = {}
    for name, count in event_names:
        category = kernel_category(name)
        if category.startswith("attention: "):
            label = category[len("attention: "):]
            found[label] = found.get(label, 0) + count
    return found


def profile_lines(events, step):
    """The two lines of a profiled step from the profiler's events (key_averages): the attention that ran and the
    time by kind of work. With a GPU only device-side events (the kernels) count: a CPU op's device time holds the
    kernels of every op under it, so counting ops too would count each kernel once per enclosing op. Without
    kernels, as on the CPU, the ops count by their CPU self time, which holds none of their children's."""
    kernels = [e for e in events if str(getattr(e, "device_type", "")).split(".")[-1] not in ("CPU", "")]
    counted = kernels or list(events)
    what = "kernels" if kernels else "CPU ops"
    used = attention_kernels((e.key, e.count) for e in counted)
    times = kernel_categories((e.key, (e.device_time_total if kernels else e.self_cpu_time_total) / 1e6)
                              for e in counted)
    total = sum(times.values()) or 1.0
    return [f"attention (profiled step {step}): " + (", ".join(f"{label} x{n}" for label, n in used.items())
                                                     or "no attention kernel recognized"),
            f"{what} (profiled step {step}): " + "; ".join(
                f"{name} {1000 * t:.1f} ms ({100 * t / total:.0f}%)"
                for name, t in sorted(times.items(), key=lambda kv: -kv[1]))]


@contextlib.contextmanager
def profiling(step):
    """Within it, a run's step `step` is profiled and profile_lines printed after it."""
    import torch
    from autoresearch.runtime import Run
    begin, end, profiler = Run.begin_step, Run.end_step, []
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])

    def begin_step(run):
        begin(run)
        if run.step == step:
            profiler.append(torch.profiler.profile(activities=activities, acc_events=True))
            profiler[0].start()

    def end_step(run, *args):
        end(run, *args)
        if profiler and run.step == step + 1:
            profiler[0].stop()
            print("\n".join(profile_lines(profiler[0].key_averages(), step)), flush=True)

    Run.begin_step, Run.end_step = begin_step, end_step
    try:
        yield
    finally:
        Run.begin_step, Run.end_step = begin, end


def run_profiled(path, step):
    """Run the train.py at `path` as `uv run train.py` does, with its step `step` profiled (profiling)."""
    import runpy
    sys.argv = [path]
    with profiling(step):
        runpy.run_path(path, run_name="__main__")


def bench_profile(step=15, budget=20, log=None):
    """Where a steady training step of train.py spends its time: a run of train.py (`budget` seconds under the time
    budget; under the small preset its whole compute budget, as long as its run: 70-190 s on 2-core VMs) that
    profiles step `step` (on CUDA the first 11 compile), time by category: the GPU's kernels on CUDA, the ops' CPU
    time elsewhere."""
    status, _, out = run_train(budget=budget, log=log, profile_step=step)
    found = re.search(r"^(?:kernels|CPU ops) \(profiled step \d+\): (.*)$", out, flags=re.M)
    if not found:
        return [("profile", f"no profile (exit {status}): {out.strip()[-300:]}")]
    return [(f"profile: {name}", time) for name, time in
            (re.match(r"(.*) (\S+ ms \(\d+%\))$", part).groups() for part in found.group(1).split("; "))]


# The GPU check: one command, one table, every log in one folder, at most 9 minutes on an H100/H200 (estimated
# from the 2026-11-29 H200 figures: tests ~100 s, attention ~40 s, the 80-s run ~160 s with its cold compile, the
# start-up runs ~230 s; the profile runs in what is left).
GPU_STEPS = [  # (name, arguments after `python -m`, timeout in seconds)
    ("gpu-tests", ["pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"], 180),
    ("attention", ["autoresearch.bench", "attention"], 90),
    ("run-80s", ["autoresearch.bench", "run", "--budget", "80"], 240),
    ("startup", ["autoresearch.bench", "startup", "--budget", "10", "--warm"], 300),
    ("profile", ["autoresearch.bench", "profile"], 150),
]


def table_rows(text):
    """The (measurement, result) rows of the tables in a text (lines `| a | b |`, headers and rules left out)."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and not cells[0].startswith(("measurement", "---")):
            rows.append((cells[0], cells[1]))
    return rows


def run_step(args, log, timeout):
    """One step of the GPU check: `python -m <args>` from the repository, its output into the file `log`; returns
    (exit status or "timeout", output)."""
    return run_logged([sys.executable, "-m", *args], ROOT, {**os.environ, "PYTHONPATH": ROOT}, timeout, log)


def bench_gpu(out_dir, steps=GPU_STEPS, minutes=9.0):
    """The GPU check (docs/PERF_NOTES.md): the GPU tests, the attention kernels, a profile of steady steps, an
    80-s baseline run and the start-up after the edits an agent makes, each a step with its log in out_dir, all
    within `minutes` (a step gets at most what is left; one that fails is said in the table and the next one
    runs). Returns the table's rows and writes out_dir/table.md."""
    os.makedirs(out_dir, exist_ok=True)
    rows, deadline = [], time.monotonic() + 60 * minutes
    for name, args, timeout in steps:
        left = deadline - time.monotonic()
        if left < 30:
            rows.append((f"{name} step", f"not run: the check's {minutes:g} minutes are spent"))
            continue
        status, out = run_step(args, os.path.join(out_dir, f"{name}.log"), min(timeout, left))
        found = table_rows(out)
        if name == "gpu-tests":
            last = out.strip().splitlines()[-1] if out.strip() else "no output"
            found = [("GPU tests (pytest -m gpu)", last.strip("= "))]
        rows += found
        if status != 0 or not found:
            rows.append((f"{name} step", f"exit {status}: see {name}.log"))
    write_table(rows, os.path.join(out_dir, "table.md"))
    return rows


def write_table(rows, path=None):
    """Print the rows as one markdown table (and write it to path)."""
    import platform
    try:
        import torch
        version = torch.__version__
    except ImportError:
        version = "?"
    text = f"| measurement ({platform.node()}, torch {version}) | result |\n|---|---|\n" + "".join(
        f"| {name} | {value} |\n" for name, value in rows)
    print(text, end="")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


# The benchmark corpus: real text already on any machine with Python, laid out as the hub's shards, so that a GPU
# machine without network gets a cache (`prepare.py --num-shards 8` then adopts the shards offline) and two machines
# with the same digest train on the same documents. The figures in docs/PERF_NOTES.md were measured on the corpus
# of the GPU machines' image: 94,523 documents, 396.2 MB, digest a72dc38cbe6b466c.
CORPUS_EXTENSIONS = (".py", ".md", ".rst", ".txt")
CORPUS_DOC_CHARS = 5000  # a document: paragraphs joined up to this many characters, about a web page
CORPUS_MIN_CHARS = 200  # files shorter than this are skipped, and so is a file's short last piece
CORPUS_SEED = 1337  # the documents' shuffle
CORPUS_VAL_BYTES, CORPUS_SHARD_BYTES = 80e6, 40e6  # the validation shard (at most a fifth); each training shard


def corpus_documents(roots):
    """The documents of every .py/.md/.rst/.txt file under roots, in a fixed order (roots, folders and files
    sorted): each file read as UTF-8 (unreadable ones skipped), exact duplicates dropped, split at blank lines into
    pieces of at most CORPUS_DOC_CHARS (a paragraph longer than that is a piece of its own)."""
    import hashlib
    seen = set()
    for root in sorted(set(roots)):
        for folder, subfolders, names in sorted(os.walk(root)):
            subfolders.sort()
            for name in sorted(n for n in names if n.endswith(CORPUS_EXTENSIONS)):
                try:
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        text = f.read()
                except (OSError, UnicodeDecodeError):
                    continue
                key = hashlib.sha1(text.encode()).digest()
                if len(text) < CORPUS_MIN_CHARS or key in seen:
                    continue
                seen.add(key)
                piece = ""
                for paragraph in text.split("\n\n"):
                    if piece and len(piece) + len(paragraph) > CORPUS_DOC_CHARS:
                        yield piece
                        piece = ""
                    piece = f"{piece}\n\n{paragraph}" if piece else paragraph
                if len(piece) >= CORPUS_MIN_CHARS:
                    yield piece


def write_corpus(out, roots):
    """Write the corpus of roots to out as shard_06542.parquet (validation: the last documents of the shuffle, up
    to CORPUS_VAL_BYTES or a fifth of the text) and shard_00000.parquet, ... (the rest, CORPUS_SHARD_BYTES each);
    returns (documents, bytes, digest), the digest naming the shuffled document list."""
    import hashlib
    import random
    import pyarrow as pa
    import pyarrow.parquet as pq
    from constants import VAL_SHARD, shard_name
    docs = list(corpus_documents(roots))
    random.Random(CORPUS_SEED).shuffle(docs)
    total = sum(len(d.encode()) for d in docs)
    digest = hashlib.sha256(b"".join(hashlib.sha1(d.encode()).digest() for d in docs)).hexdigest()[:16]
    os.makedirs(out, exist_ok=True)
    write = lambda part, index: pq.write_table(pa.table({"text": part}), os.path.join(out, shard_name(index)),  # noqa
                                               row_group_size=1024, compression="zstd")
    val, size = [], 0
    while docs and size < min(CORPUS_VAL_BYTES, 0.2 * total):
        val.append(docs.pop())
        size += len(val[-1].encode())
    write(val, VAL_SHARD)
    shard, size, index = [], 0, 0
    for doc in docs:
        shard.append(doc)
        size += len(doc.encode())
        if size >= CORPUS_SHARD_BYTES:
            write(shard, index)
            shard, size, index = [], 0, index + 1
    if shard:
        write(shard, index)
    return len(val) + len(docs), total, digest


def main():
    ap = argparse.ArgumentParser(prog="uv run -m autoresearch.bench", description="Benchmarks on the prepared cache.")
    ap.add_argument("what", choices=["loader", "attention", "run", "startup", "profile", "gpu", "all", "corpus"])
    ap.add_argument("dir", nargs="?", help="corpus: where the shards go (default: the cache's data folder)")
    ap.add_argument("--roots", nargs="*", help="corpus: the folders read (default: the installed packages)")
    ap.add_argument("--budget", type=float, help="run/startup: the training budget in seconds")
    ap.add_argument("--out", default=os.path.join(ROOT, ".bench", "gpu"), help="gpu: the folder for the logs")
    ap.add_argument("--warm", action="store_true", help="startup: the compile caches are warm (no cold first run)")
    args = ap.parse_args()
    if args.what == "corpus":
        import site
        from constants import DATA_DIR
        docs, size, digest = write_corpus(args.dir or DATA_DIR, args.roots or site.getsitepackages())
        print(f"corpus: {docs} docs, {size / 1e6:.1f} MB, digest {digest} -> {args.dir or DATA_DIR}")
        return
    if args.what == "gpu":
        bench_gpu(args.out)
        return
    rows = []
    if args.what in ("loader", "all"):
        rows += bench_loader()
    if args.what in ("attention", "all"):
        rows += bench_attention()
    if args.what in ("profile", "all"):
        rows += bench_profile()
    if args.what in ("run", "all"):
        rows += bench_run(args.budget)
    if args.what in ("startup", "all"):
        rows += bench_startup(args.budget or 20, warm=args.warm)
    write_table(rows)


if __name__ == "__main__":
    main()
