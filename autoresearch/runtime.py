"""The fixed bookkeeping of a run. DO NOT CHANGE: it decides what a run's numbers mean.

Counting the time budget and where a step's time goes, progress lines, the run's settings and notes, MFU, and
the summary block agents grep. train.py calls:

    device = hardware.get_device()         # CUDA, else MPS, else the CPU (AUTORESEARCH_DEVICE insists on one)
    run = Run(device, flops_per_token, tokens_per_step, t_start, globals())
    batches = run.loader(make_dataloader(...))   # counts the wait for batches
    while not run.done:
        run.begin_step()
        ...                                # forward/backward
        run.begin_optimizer()
        ...                                # lr from run.progress, optimizer step
        run.end_step(loss, lrm, epoch)     # waits for the step, counts its time, prints progress
    run.summary(val_bpb, num_params, depth)

and runs train() through main(), which holds the cache for reading and turns running out of memory into one line.
"""
import gc
import math
import os
import sys
import time

import torch

import constants
from autoresearch import cache
from autoresearch.errors import UserError
from autoresearch.hardware import attention_kernels, peak_flops, synchronize
from constants import TIME_BUDGET

# ---------------------------------------------------------------------------------------------------------------
# What ran, and whether the run compares with standard ones

def modified_constants(train_globals):
    """The metric's constants changed at run time (in constants or train.py), as notes: such a run compares
    with no other. Empty for an honest run."""
    notes = []
    for name, value in constants.RESOLVED.items():
        for where, namespace in (("constants.py", vars(constants)), ("train.py", train_globals)):
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
            raise UserError(f"the training loss is {loss_f} at step {self.step}: the run diverged; lower the learning "
                            "rates or undo the change")
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


def _with_kernels(train):
    """train() with SDPA's backends in the order cuDNN, flash, mem-efficient, math on CUDA."""
    if not torch.cuda.is_available():
        return train()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # cuDNN first: on an H100, causal T=2048 head_dim 128 forward+backward, cuDNN 339 TFLOP/s, flash 208.
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                      SDPBackend.MATH], set_priority=True):
        return train()


def main(train, knobs):
    """Run train() under the fixed settings: the cache held for reading (no prepare.py may write it during the
    run), the CUDA allocator's expandable segments, SDPA's backend order (_with_kernels). Running out of memory
    (GPU or CPU) ends in one line naming `knobs` (the knobs that set memory use, e.g. "DEVICE_BATCH_SIZE=128,
    DEPTH=8")."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])  # torch 2.9 renamed the variable
    os.environ.setdefault("PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF",
                          "expandable_segments:True")  # read at the first CUDA allocation
    try:
        with cache.reading():
            _with_kernels(train)
    except (MemoryError, RuntimeError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
        gpu = isinstance(e, torch.OutOfMemoryError)
        if not (gpu or isinstance(e, MemoryError) or "can't allocate memory" in str(e)):  # CPU: DefaultCPUAllocator
            raise
        raise UserError(f"out of {'GPU memory' if gpu else 'memory'} at {knobs}: lower DEVICE_BATCH_SIZE (gradient "
                        "accumulation keeps TOTAL_BATCH_SIZE) or the model size") from None
