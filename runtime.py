"""The fixed plumbing around train.py's loop. DO NOT CHANGE: it decides what a run's numbers mean.

The device and its precision, compiling, counting the time budget and where a step's time goes, progress lines,
the attention-kernel check, the run's settings and notes, MFU, and the summary block agents grep. train.py calls:

    device = get_device()                  # CUDA, else MPS, else the CPU (AUTORESEARCH_DEVICE insists on one)
    run = Run(device, flops_per_token, tokens_per_step, t_start, globals())
    batches = run.loader(make_dataloader(...))   # counts the wait for batches
    while not run.done:
        run.begin_step()
        ...                                # forward/backward
        run.begin_optimizer()
        ...                                # lr from run.progress, optimizer step
        run.end_step(loss, lrm, epoch)     # waits for the step, counts its time, prints progress
    run.summary(val_bpb, num_params, depth)
"""
import contextlib
import gc
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import time

import torch

import constants
from cache import SetupError, release_reader_lock
from constants import TIME_BUDGET

# ---------------------------------------------------------------------------------------------------------------
# Device

# The oldest Linux driver each CUDA major version runs on (CUDA's minor-version compatibility; NVIDIA's CUDA
# Toolkit release notes). torch's default Linux wheels on PyPI are built with CUDA 13.0 as of torch 2.11.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
DRIVER_HELP = "see README.md, 'Older NVIDIA drivers' (or set AUTORESEARCH_DEVICE=cpu to run on the CPU anyway)"


def nvidia_driver_version(proc_file="/proc/driver/nvidia/version"):
    """The loaded NVIDIA kernel driver's version ('550.54.14'), or None where there is none: from
    /proc/driver/nvidia/version on Linux, else from nvidia-smi."""
    try:
        with open(proc_file, encoding="utf-8", errors="replace") as f:
            found = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+(?:\.\d+)+)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            return out[0] if out and re.fullmatch(r"\d+(\.\d+)+", out[0]) else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def unusable_gpu_problem(cuda_available, driver_version, torch_cuda_version, torch_version=torch.__version__):
    """One line when an NVIDIA GPU is present (a driver is loaded) but torch cannot use it, else None."""
    if cuda_available or driver_version is None:
        return None
    if torch_cuda_version is None:
        return (f"an NVIDIA GPU is present (driver {driver_version}) but torch {torch_version} is a build without "
                f"CUDA: {DRIVER_HELP}")
    need = MIN_DRIVER.get(int(torch_cuda_version.split(".")[0]))
    if need is not None and int(driver_version.split(".")[0]) < need:
        return (f"the NVIDIA driver is {driver_version}, but torch {torch_version} (CUDA {torch_cuda_version}) "
                f"needs driver >= {need}: update the driver, or install a torch built for an older CUDA: "
                f"{DRIVER_HELP}")
    return (f"an NVIDIA GPU is present (driver {driver_version}) but torch {torch_version} cannot use it "
            f"(check nvidia-smi and CUDA_VISIBLE_DEVICES): {DRIVER_HELP}")


SMALL = constants.PRESET == "small"  # AUTORESEARCH_PRESET=small: train.py's size knobs take their small values


def get_device():
    """The training device, detected at run time: AUTORESEARCH_DEVICE if set, else cuda, then mps, then cpu. An
    NVIDIA GPU that torch cannot use (an old driver, a CPU-only torch) is an error, not a silent CPU run; so is
    the standard configuration off CUDA (hours per step) unless AUTORESEARCH_PRESET=small or AUTORESEARCH_FORCE=1."""
    device = detect_device()
    if device.type != "cuda" and not SMALL and not constants.FORCE:
        raise SetupError(f"no CUDA GPU: on {device.type} the standard configuration would take hours per step; run "
                         "the small preset, `AUTORESEARCH_PRESET=small uv run train.py` (README.md, 'Small machines'), "
                         "or set AUTORESEARCH_FORCE=1 to run it anyway")
    return device


def detect_device():
    """The device present, by the rules of get_device but without its size rule (for benchmarks and prepare.py)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if constants.DEVICE == "cpu":
        return torch.device("cpu")
    if constants.DEVICE == "mps" and not mps:
        raise SetupError("AUTORESEARCH_DEVICE=mps, but torch cannot use Apple's GPU here")
    if constants.DEVICE != "mps":
        if torch.cuda.is_available():
            return torch.device("cuda")
        problem = unusable_gpu_problem(False, nvidia_driver_version(), torch.version.cuda)
        if problem:
            raise SetupError(problem)
        if constants.DEVICE == "cuda":
            raise SetupError("AUTORESEARCH_DEVICE=cuda, but torch finds no CUDA GPU (no NVIDIA driver is loaded)")
    return torch.device("mps") if mps else torch.device("cpu")


def describe_device():
    """Which device train.py will use, in words, or why it cannot start."""
    try:
        device = detect_device()
    except SetupError as e:
        return f"train.py cannot start: {e.message}"
    if device.type != "cuda":
        return f"train.py will run on {device.type}, with AUTORESEARCH_PRESET=small (README.md, 'Small machines')"
    return f"train.py will run on cuda ({torch.cuda.get_device_name(device)})"


def low_precision(device):
    """The dtype for what the reference keeps in bf16 (embedding and rotary tables, Muon's orthogonalization):
    bf16 on CUDA, fp32 elsewhere (CPUs without bf16 instructions run bf16 matmuls 7-9x slower than fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device):
    """The forward pass's mixed precision: bf16 autocast on CUDA (the reference's), plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def can_compile(device):
    """torch.compile runs on CUDA where Triton is installed (not on native Windows); CPU and MPS runs are eager."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def compile_model(model, device):
    """torch.compile where can_compile(device), eager elsewhere; returns the model to call. A model with a
    compiled_regions() method is compiled region by region (PyTorch's regional compilation: a graph per kind of
    region, reused by every region of that kind, so compile time does not grow with depth); any other model
    whole. On CUDA nothing else is ever called, so an uncompiled FlexAttention (full score matrices) never runs."""
    if device.type == "cuda" and not can_compile(device):
        print("note: Triton is not installed (native Windows?): running eagerly, several times slower; WSL2 "
              "compiles (README.md, 'Windows')", flush=True)
    if not can_compile(device):
        return model
    if hasattr(model, "compiled_regions"):
        return compile_regions(model)
    return torch.compile(model, dynamic=False)


def compile_regions(model, backend="inductor"):
    """Compile each of model.compiled_regions() in place (nn.Module.compile) and return the model. Graphs are
    cached per region kind and grad mode (training, evaluation), so the recompile limit is raised above the
    few kinds a model has."""
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for region in model.compiled_regions():
        region.compile(backend=backend, dynamic=False)
    return model


# GPU memory: the baseline's peak on the reference's H100 run (DEVICE_BATCH_SIZE 128, T 2048, 8 layers of 512,
# vocab 8192) was 45,060 MiB. Per token of a micro-batch that is 180 KB: about 10 bytes per vocab entry (fp32
# logits and their soft cap) and 24 bytes per layer and model dimension (the activations kept for backward).
BYTES_PER_TOKEN_VOCAB, BYTES_PER_TOKEN_LAYER_DIM = 10, 24
BYTES_PER_PARAM = 16  # fp32 weight and gradient, two optimizer moments


def estimate_memory(num_params, n_layer, n_embd, vocab_size, seq_len):
    """(fixed bytes, bytes per row of a micro-batch) of a training step, from the reference's measured peak."""
    per_token = BYTES_PER_TOKEN_VOCAB * vocab_size + BYTES_PER_TOKEN_LAYER_DIM * n_layer * n_embd
    return BYTES_PER_PARAM * num_params, per_token * seq_len


def largest_fitting_rows(rows, total_rows, fixed_bytes, row_bytes, budget_bytes):
    """The largest power of two <= rows that divides total_rows and whose estimated peak fits in budget_bytes
    (rows itself when it fits), or 0 when not even one row fits."""
    fits = lambda r: fixed_bytes + r * row_bytes <= budget_bytes and total_rows % r == 0  # noqa: E731
    if fits(rows):
        return rows
    r = 1 << (rows.bit_length() - 1)
    while r >= 1 and not fits(r):
        r //= 2
    return r


def fit_device_batch(device, rows, total_rows, fixed_bytes, row_bytes):
    """DEVICE_BATCH_SIZE as it fits this GPU: `rows` when its estimated peak fits in 90% of the free memory
    (AUTORESEARCH_GPU_MEMORY_GB overrides what is free), else the largest power of two that does, said in one
    line (gradient accumulation keeps TOTAL_BATCH_SIZE, so results stay comparable). Off CUDA: `rows`."""
    if device.type != "cuda":
        return rows
    budget = constants.GPU_MEMORY_GB * 1e9 if constants.GPU_MEMORY_GB else torch.cuda.mem_get_info(device)[0]
    fitted = largest_fitting_rows(rows, total_rows, fixed_bytes, row_bytes, 0.9 * budget)
    if fitted == 0:
        raise SetupError(f"not even one row of the model fits in the {budget / 1e9:.1f} GB of GPU memory free "
                         f"(estimated {(fixed_bytes + row_bytes) / 1e9:.1f} GB): make the model smaller (DEPTH)")
    if fitted != rows:
        print(f"note: DEVICE_BATCH_SIZE {rows} needs about {(fixed_bytes + rows * row_bytes) / 1e9:.0f} GB, more than "
              f"the {budget / 1e9:.1f} GB free: {fitted} rows per micro-batch instead (TOTAL_BATCH_SIZE kept)",
              flush=True)
    return fitted


def flex_kernel_options(device, head_dim):
    """FlexAttention's Triton block sizes for this GPU: None (the defaults) unless its shared memory per block is
    too small for the default backward kernel, as on consumer cards (about 100 KB: sm86, sm89, sm120) with heads
    over 128 wide (pytorch/pytorch#133254, #198224); then smaller blocks."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return flex_options_for(getattr(props, "shared_memory_per_block_optin", 0), head_dim)


def flex_options_for(shared_memory_bytes, head_dim):
    """The decision of flex_kernel_options, from the figures (testable without the GPU)."""
    if shared_memory_bytes == 0 or shared_memory_bytes >= 160 * 1024 or head_dim <= 128:
        return None
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}


def synchronize(device):
    """Wait for the device's queued work (so a step's wall time is its real time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# MFU: peak dense bf16 tensor FLOP/s (no sparsity) from the vendors' datasheets, matched on the CUDA device name in
# this order (the first match wins, so specific names come before general ones).

PEAK_BF16_FLOPS = [
    ("gh200", 989.5e12), ("h200", 989.5e12), ("h100 pcie", 756.0e12), ("h100 nvl", 835.0e12),
    ("h100", 989.5e12), ("h800", 989.5e12), ("b200", 2250e12), ("a100", 312.0e12), ("a800", 312.0e12),
    ("l40s", 362.1e12), ("l40", 181.0e12), ("rtx 6000 ada", 364.2e12), ("l4", 121.0e12), ("a10g", 70.0e12),
    ("a10", 125.0e12), ("rtx 5090", 209.5e12), ("rtx 4090", 165.2e12), ("rtx 3090", 71.0e12),
]


def lookup_peak_flops(gpu_name):
    """Peak bf16 FLOP/s of a GPU by its CUDA name, or 0.0 when it is not in the table."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in gpu_name.lower()), 0.0)


def peak_flops(device):
    """(peak bf16 FLOP/s or 0.0, device name, note: why MFU is 0, or "")."""
    if device.type != "cuda":
        return 0.0, device.type, f"MFU is not computed on {device.type}"
    name = torch.cuda.get_device_name(device)
    flops = lookup_peak_flops(name)
    return flops, name, "" if flops else f"{name} is not in runtime.py's PEAK_BF16_FLOPS table: MFU reported as 0"


# ---------------------------------------------------------------------------------------------------------------
# What ran, and whether the run compares with standard ones

ATTENTION_KINDS = [("cuDNN SDPA", ("_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa")),
                   ("flash SDPA", ("_scaled_dot_product_flash_attention", "flash_fwd", "flash_bwd")),
                   ("mem-efficient SDPA", ("_scaled_dot_product_efficient_attention", "fmha_cutlass")),
                   ("math SDPA (slow)", ("_scaled_dot_product_attention_math",)),
                   ("FlexAttention", ("flex_attention",))]


def attention_kernels(event_names):
    """{implementation: count} of the attention that ran, from (profiler event or kernel name, count) pairs, so
    a silent fallback to a slower kernel shows in run.log."""
    found = {}
    for name, count in event_names:
        lowered = name.lower()
        for label, keys in ATTENTION_KINDS:
            if any(key in lowered for key in keys):
                found[label] = found.get(label, 0) + count
                break
    return found


def modified_constants(train_globals):
    """The metric's constants changed at run time (in constants, prepare or train.py), as notes: such a run compares
    with no other. Empty for an honest run."""
    import prepare
    notes = []
    for name, value in constants.RESOLVED.items():
        for where, namespace in (("constants.py", vars(constants)), ("prepare.py", vars(prepare)),
                                 ("train.py", train_globals)):
            if name in namespace and namespace[name] != value:
                notes.append(f"{name} = {namespace[name]} set in {where} at run time")
    return notes


# ---------------------------------------------------------------------------------------------------------------
# The run

LOG_EVERY_SECONDS = 5.0  # progress line interval when stdout is a file (a terminal gets one live line)
CUDA_WARMUP_STEPS = 11  # on CUDA the first steps compile: they do not count toward the budget (elsewhere none)


def summary_line(key, value):
    """`key:` padded to 18 characters, then the value: the reference's aligned summary format."""
    return f"{key + ':':<18}{value}"


class Run:
    """The fixed bookkeeping of one training run: which steps count toward TIME_BUDGET, their time and where it
    goes, progress lines, the end of training, and the summary. On CUDA the first 11 steps (compilation) are not
    counted and step 1 is profiled to name the attention kernels that ran; elsewhere every step counts. Training
    ends with the first step that brings the counted time to TIME_BUDGET. A step's time is split into
    forward/backward, optimizer (GPU time on CUDA) and the wait for batches from loader(); a first counted step
    so slow that the budget holds few steps is said at once, and a budget overshot at the end is said too."""

    def __init__(self, device, flops_per_token, tokens_per_step, t_start, train_globals=None):
        self.device, self.flops_per_token, self.tokens_per_step = device, flops_per_token, tokens_per_step
        self.t_start, self.train_globals = t_start, train_globals or {}
        self.cuda = device.type == "cuda"
        self.warmup = CUDA_WARMUP_STEPS if self.cuda else 0
        self.peak, self.gpu_name, mfu_note = peak_flops(device)
        self.step, self.training_seconds, self.startup_seconds = 0, 0.0, 0.0
        self.smooth_loss, self.train_loss, self.done = 0.0, float("nan"), False
        self.phase_seconds = {"forward_backward": 0.0, "optimizer": 0.0, "data_wait": 0.0}  # counted steps
        self.tty, self._last_log, self._profiler, self._t_trained = sys.stdout.isatty(), 0.0, None, None
        self._data_wait, self._marks = 0.0, []
        print(f"device: {device} ({self.gpu_name}), torch {torch.__version__}; settings: {constants.SETTINGS}")
        if mfu_note:
            print(f"note: {mfu_note}")
        if not self.cuda:  # (the CUDA build of torch prints an error when profiling without a GPU)
            print(f"attention: SDPA in eager mode on {device.type} (kernels are profiled on CUDA only)", flush=True)

    @property
    def counted_steps(self):
        """The steps that counted toward the budget so far: every step after the warm-up."""
        return max(0, self.step - self.warmup)

    @property
    def progress(self):
        """Counted training time / TIME_BUDGET, in [0, 1]: what the schedules follow."""
        return min(self.training_seconds / TIME_BUDGET, 1.0)

    def loader(self, batches):
        """Wrap the training loader: the time spent waiting for its batches is counted as data wait."""
        while True:
            t0 = time.perf_counter()
            batch = next(batches)
            self._data_wait += time.perf_counter() - t0
            yield batch

    def _mark(self):
        """The time now: a CUDA event (the GPU's own clock, no sync) on CUDA, the wall clock elsewhere."""
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def begin_step(self):
        """Call at the start of every step: waits for the device and starts the step's clock."""
        synchronize(self.device)
        self._t0 = time.time()
        self._data_wait, self._marks = 0.0, [self._mark()]
        if self.step == self.warmup:  # the first counted step: everything before it is start-up
            self.startup_seconds = self._t0 - self.t_start
        if self.step == 1 and self.cuda:  # compiled by now: record the kernels that run
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                torch.profiler.ProfilerActivity.CUDA],
                                                    acc_events=True)
            self._profiler.start()

    def begin_optimizer(self):
        """Call between the forward/backward passes and the optimizer step (splits the step's time)."""
        self._marks.append(self._mark())

    def end_step(self, loss, lrm, epoch):
        """Call at the end of every step with its last micro-batch's loss (a tensor), the lr multiplier and the
        loader's epoch: waits for the step, stops the program with FAIL on a NaN or exploding loss, counts the
        step's time, prints progress, and sets `done` when the budget is spent."""
        self._marks.append(self._mark())
        loss_f = loss.item()  # waits for the step
        if self._profiler is not None:
            self._profiler.stop()
            used = attention_kernels((e.key, e.count) for e in self._profiler.key_averages())
            self._profiler = None
            print(("\n" if self.tty else "") + "attention (profiled step 1): " + (
                ", ".join(f"{label} x{n}" for label, n in used.items()) or "no attention kernel recognized"))
        if not math.isfinite(loss_f) or loss_f > 100:
            print(f"\nFAIL: loss is {loss_f} at step {self.step}", flush=True)
            sys.exit(1)
        synchronize(self.device)
        dt = time.time() - self._t0
        phases = self._phases()
        if self.step >= self.warmup:
            self.training_seconds += dt
            for name, seconds in phases.items():
                self.phase_seconds[name] += seconds
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss_f
        self.train_loss = self.smooth_loss / (1 - 0.9 ** (self.step + 1))
        self.done = self.step >= self.warmup and self.training_seconds >= TIME_BUDGET
        self._print_progress(dt, lrm, epoch, phases)
        if self.step == self.warmup and dt > TIME_BUDGET / 20 and not self.done:
            print(f"note: one step takes {dt:.1f}s, so the {TIME_BUDGET:.0f}s budget holds about "
                  f"{max(1, round(TIME_BUDGET / dt))} steps and the run ends with the first step past it: make "
                  "steps smaller (TOTAL_BATCH_SIZE, DEPTH) or use the small preset", flush=True)
        if self.step == 0:  # Python's GC pauses show up as slow steps; nothing cyclic is allocated after step 0
            gc.collect()
            gc.freeze()
            gc.disable()
        elif self.step % 5000 == 0:  # as the reference: a collection now and then on very long runs
            gc.collect()
        self.step += 1
        if self.done:
            self._t_trained = time.time()
            if self.tty:
                print()

    def _phases(self):
        """Seconds of the step just ended: forward/backward, optimizer, data wait (the host's wait for batches)."""
        if len(self._marks) != 3:
            return {"forward_backward": 0.0, "optimizer": 0.0, "data_wait": self._data_wait}
        start, middle, end = self._marks
        if self.cuda:
            fb, opt = start.elapsed_time(middle) / 1000, middle.elapsed_time(end) / 1000
        else:
            fb, opt = middle - start - self._data_wait, end - middle
        return {"forward_backward": fb, "optimizer": opt, "data_wait": self._data_wait}

    def _print_progress(self, dt, lrm, epoch, phases):
        mfu = 100 * self.flops_per_token * self.tokens_per_step / dt / self.peak if self.peak else 0.0
        split = "/".join(f"{1000 * phases[k]:.0f}" for k in ("forward_backward", "optimizer", "data_wait"))
        line = (f"step {self.step:05d} ({100 * self.progress:.1f}%) | loss: {self.train_loss:.6f} | lrm: {lrm:.2f} | "
                f"dt: {dt * 1000:.0f}ms | tok/sec: {int(self.tokens_per_step / dt):,} | mfu: {mfu:.1f}% | "
                f"epoch: {epoch} | remaining: {max(0.0, TIME_BUDGET - self.training_seconds):.0f}s | "
                f"fb/opt/data: {split}ms")
        if self.tty:
            print(f"\r{line}    ", end="", flush=True)
        elif self.step in (0, 1, self.warmup) or self.done or time.time() - self._last_log >= LOG_EVERY_SECONDS:
            print(line, flush=True)
            self._last_log = time.time()

    def summary(self, val_bpb, num_params, depth):
        """Print the run's notes (settings, a budget overshot), then `---` and the summary: the reference's nine
        keys in its order and format, then this project's (README.md lists them)."""
        t_end = time.time()
        counted_tokens = self.counted_steps * self.tokens_per_step
        mfu = (100 * self.flops_per_token * counted_tokens / self.training_seconds / self.peak
               if self.peak and self.training_seconds else 0.0)
        over = self.training_seconds - TIME_BUDGET
        if self.counted_steps and over > 0.05 * TIME_BUDGET:
            print(f"note: training overshot the {TIME_BUDGET:.0f}s budget by {over:.1f}s: its last step took "
                  f"{over:.1f}s or more, and a run ends with the first step past the budget")
        modified = modified_constants(self.train_globals)
        settings = constants.SETTINGS + (" (modified at run time)" if modified else "")
        if modified:
            print(f"note: not comparable with any run: {'; '.join(modified)}")
        elif constants.SETTINGS != "standard":
            print(f"note: settings {constants.SETTINGS}, not the standard ones: this run compares only with runs "
                  "under the same settings")
        peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if self.cuda else 0.0
        print("---")
        for key, value in [
            ("val_bpb", f"{val_bpb:.6f}"), ("training_seconds", f"{self.training_seconds:.1f}"),
            ("total_seconds", f"{t_end - self.t_start:.1f}"), ("peak_vram_mb", f"{peak_vram_mb:.1f}"),
            ("mfu_percent", f"{mfu:.2f}"), ("total_tokens_M", f"{self.step * self.tokens_per_step / 1e6:.1f}"),
            ("num_steps", f"{self.step}"), ("num_params_M", f"{num_params / 1e6:.1f}"), ("depth", f"{depth}"),
            ("train_loss", f"{self.train_loss:.6f}"), ("startup_seconds", f"{self.startup_seconds:.1f}"),
            ("eval_seconds", f"{t_end - (self._t_trained or t_end):.1f}"),
            ("tok_per_sec", f"{int(counted_tokens / self.training_seconds) if self.training_seconds else 0}"),
            ("fwd_bwd_seconds", f"{self.phase_seconds['forward_backward']:.1f}"),
            ("optim_seconds", f"{self.phase_seconds['optimizer']:.1f}"),
            ("data_seconds", f"{self.phase_seconds['data_wait']:.1f}"),
            ("device", self.device.type), ("gpu", self.gpu_name), ("settings", settings),
        ]:
            print(summary_line(key, value))
        gc.enable()


def main(train, knobs):
    """Run train() under the fixed settings: the CUDA allocator's expandable segments, SDPA's backends in the
    order cuDNN, flash, mem-efficient, math. Running out of memory (GPU or CPU) ends in one line naming `knobs`
    (the knobs that set memory use, e.g. "DEVICE_BATCH_SIZE=128, DEPTH=8")."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])  # torch 2.9 renamed the variable
    os.environ.setdefault("PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF",
                          "expandable_segments:True")  # read at the first CUDA allocation
    try:
        if torch.cuda.is_available():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            # cuDNN first: on an H100, causal T=2048 head_dim 128 forward+backward, cuDNN 339 TFLOP/s, flash 208.
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                train()
        else:
            train()
    except (MemoryError, RuntimeError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
        gpu = isinstance(e, torch.OutOfMemoryError)
        if not (gpu or isinstance(e, MemoryError) or "can't allocate memory" in str(e)):  # CPU: DefaultCPUAllocator
            raise
        sys.exit(f"\nerror: out of {'GPU memory' if gpu else 'memory'} at {knobs}: lower DEVICE_BATCH_SIZE (gradient "
                 "accumulation keeps TOTAL_BATCH_SIZE) or the model size")
    finally:
        release_reader_lock()  # (taken by check_cache: no prepare.py may write the cache during the run)
