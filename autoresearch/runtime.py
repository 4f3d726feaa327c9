"""The fixed bookkeeping of a run. DO NOT CHANGE: it decides what a run's numbers mean. train.py calls:

    device = hardware.get_device()         # CUDA, else MPS, else the CPU (AUTORESEARCH_DEVICE insists on one)
    run = Run(device, flops_per_token, tokens_per_step, t_start, globals())
    while not run.done:
        run.begin_step()
        ...                                # forward/backward, lr from run.progress, optimizer step
        run.end_step(loss, lrm, epoch)     # waits for the step, counts its FLOPs and time, prints progress
    run.summary(val_bpb, num_params, depth)

and runs train() through main(): the run's record (record.py), and every stop as one line. At the end it checks
what an agent's slip leaves behind (docs/RUN.md). Every time here comes from one clock, time.perf_counter.
"""
import contextlib
import gc
import math
import os
import sys
import time
import types

import torch

import constants
from autoresearch import flops, record
from autoresearch.errors import UserError, Watchdog, sigterm_as_error
from autoresearch.hardware import can_compile, peak_flops, synchronize

_clock = time.perf_counter  # every time this module counts (bound here: see the module's docstring)
# The metric's constants as this process read them at import: what every check compares with.
FIXED = types.MappingProxyType(dict(constants.RESOLVED))
LOG_EVERY_SECONDS = 5.0  # progress line interval when stdout is a file (a terminal gets one live line)
CUDA_WARMUP_STEPS = 11  # where the model compiles (CUDA) the first steps compile: not timed, nor counted under time
FEW_STEPS = 20  # a budget that holds fewer steps than this is said at the first counted step
# A run in which no training step ends for this long (start-up included) stops itself as a hang. A busy machine does
# not trip it: the small preset's step takes ~0.8 s on a quiet 2-core CPU and ~8 s at a load of 16; a cold compile of
# the standard model on a GPU ~60 s. (Not under AUTORESEARCH_FORCE, whose steps take hours.)
STALL_SECONDS = 600.0

# ---------------------------------------------------------------------------------------------------------------
# What ran, and whether the run compares with standard ones


def modified_constants(train_globals):
    """The metric's constants that differ now from what this process read at start, as notes."""
    notes = []
    places = [("constants.py", vars(constants)), ("train.py", train_globals),
              ("prepare.py", vars(sys.modules["prepare"]) if "prepare" in sys.modules else {}),
              ("autoresearch/runtime.py", globals())]
    for name, value in FIXED.items():
        for where, namespace in places:
            if name in namespace and namespace[name] != value:
                notes.append(f"{name} = {namespace[name]} set in {where} at run time (the fixed value is {value})")
    return notes


_meter = None  # the compute budget's count (flops.counting) of the run in progress: main() counts around train()
_watchdog = None  # this run's Watchdog (runtime.main), told of every step's end


class Run:
    """One run's bookkeeping: the steps that count, their FLOPs or time, progress lines, the end, the summary.
    Under the compute budget every FLOP from train()'s start counts; under the time budget, the wall clock; where the
    model compiles (CUDA) the first 11 steps are start-up. t_start: time.perf_counter() when train() began."""

    def __init__(self, device, flops_per_token, tokens_per_step, t_start, train_globals=None):
        self.device, self.flops_per_token, self.tokens_per_step = device, flops_per_token, tokens_per_step
        self.t_start, self.train_globals = t_start, train_globals or {}
        self.cuda = device.type == "cuda"
        self._record = record.current()
        if self._record is None:  # (where train() runs outside main(), compute before the Run would be free)
            raise UserError("train() ran outside runtime.main: keep train.py's main() calling runtime.main(train, "
                            "...), where the run's record and its compute count begin")
        modified = modified_constants(self.train_globals)
        if modified:
            raise UserError(f"the metric's constants are fixed: {'; '.join(modified)}: remove that assignment")
        self.kind = FIXED["BUDGET"]
        self._budget = FIXED["FLOP_BUDGET"] if self.kind == "flops" else FIXED["TIME_BUDGET"]
        # Where the model compiles, its first steps compile: their time is start-up, never speed; under the time
        # budget they are not counted either (the reference's rule). Under the compute budget every FLOP counts.
        self._timed_from = CUDA_WARMUP_STEPS if can_compile(device) else 0
        self._warmup = self._timed_from if self.kind == "time" else 0
        self._steps, self._counted_seconds, self._done, self._late_steps = 0, 0.0, False, 0
        self._counted_flops, self._step_flops, self._flops_seen = 0.0, 0.0, 0.0
        self._meter = _meter if self.kind == "flops" else None
        assert self._meter is not None or self.kind == "time", "main() counts FLOPs under the compute budget"
        self._violations = []  # what train.py did to the fixed rules during the run, in words
        self.peak, self.gpu_name, mfu_note = peak_flops(device)
        self._record.data["gpu"] = self.gpu_name  # (results.py files the run under its GPU model, crash or not)
        self._record.save()
        self.startup_seconds, self.smooth_loss, self.train_loss = 0.0, 0.0, float("nan")
        self.tty, self._last_log, self._t_trained = sys.stdout.isatty(), 0.0, None
        self._t0, self._epoch_said = None, False
        self._after_eval, self._flops_before = False, 0.0
        print(f"device: {device} ({self.gpu_name}), torch {torch.__version__}; settings: {constants.SETTINGS}")
        code = self._record.data["code"]
        if code["committed"] is False:
            print(f"note: train.py differs from the commit it is on ({code['commit'][:7]}): commit it before "
                  "recording this run, or results.py will refuse it", flush=True)
        if mfu_note:
            print(f"note: {mfu_note}")

    # -- the counts (read-only) --

    @property
    def step(self):
        """Steps ended so far (the index of the next step)."""
        return self._steps

    @property
    def done(self):
        """True once a counted step brought the counted FLOPs or time to the budget: the loop must end."""
        return self._done

    @property
    def warmup(self):
        """The uncounted first steps (11 on CUDA under the time budget: they compile); read-only."""
        return self._warmup

    @property
    def progress(self):
        """Counted FLOPs / FLOP_BUDGET or counted time / TIME_BUDGET, in [0, 1]: what the schedules follow."""
        counted = self._counted_flops if self.kind == "flops" else self._counted_seconds
        return min(counted / self._budget, 1.0)

    def begin_step(self):
        """Call at the start of every step: waits for the device and starts the step's clock."""
        if self._done:
            self._late_steps += 1
        synchronize(self.device)
        self._t0 = _clock()
        if self.step == self._timed_from:  # the first timed step: everything before it is start-up
            self.startup_seconds = self._t0 - self.t_start
        if self.step == 0 and self._meter is not None:
            self._flops_before = self._meter.total
        if self._meter is not None and not self._meter.on and not self._after_eval:
            self._after_eval = True
            self._violations.append("a training step ran after the evaluation began (evaluate_bpb), where no FLOP "
                                    "is counted")

    def end_step(self, loss, lrm, epoch):
        """Wait for the step, stop on a NaN or exploding loss, count its FLOPs and time, print progress."""
        loss_f = loss.item()  # waits for the step
        if self._meter is not None:  # this step's FLOPs: all counted since the last step ended (or since start)
            total = self._meter.total
            self._step_flops, self._flops_seen = total - self._flops_seen, total
            if not self._step_flops and self.step == 0:  # (nothing counted would never end the run)
                raise UserError(f"torch's FLOP counter saw no matmul in step {self.step}: the compute budget cannot "
                                "count it (run the model between run.begin_step() and run.end_step())")
        if not math.isfinite(loss_f) or loss_f > 100:
            print(f"\nFAIL: loss is {loss_f} at step {self.step}", flush=True)
            raise UserError(f"the training loss is {loss_f} at step {self.step}: the run diverged; lower the learning "
                            "rates or undo the change")
        synchronize(self.device)
        dt = _clock() - self._t0
        counted = self.step >= self._warmup
        if self.step >= self._timed_from:
            self._counted_seconds += dt
        if counted:
            self._counted_flops += self._step_flops
        self._steps += 1
        if _watchdog is not None:
            _watchdog.last = time.monotonic()
        step = self.step - 1  # the step just ended
        self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss_f
        self.train_loss = self.smooth_loss / (1 - 0.9 ** (step + 1))
        if counted and self.progress >= 1.0:
            self._done = True
        self._print_progress(step, dt, lrm, epoch)
        self._notes(step, dt, epoch)
        if step == 0:  # Python's GC pauses show up as slow steps; nothing cyclic is allocated after step 0
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:  # as the reference: a collection now and then on very long runs
            gc.collect()
        if self._done and self._t_trained is None:
            self._t_trained = _clock()
            if self.tty:
                print()

    def _notes(self, step, dt, epoch):
        """The notes a step may call for, each said once."""
        cost = self._step_flops if self.kind == "flops" else dt
        if step == 0 and self._flops_before > 0.01 * cost:
            print(f"note: {self._flops_before:.3g} FLOPs were computed before the first step (train.py's work before "
                  "the loop): they count against the budget, in step 0's share", flush=True)
        if step == self._warmup and cost > self._budget / FEW_STEPS and not self._done:
            smaller = "make steps smaller (TOTAL_BATCH_SIZE, DEPTH)" + (
                "" if constants.PRESET == "small" else " or use the small preset")
            said = (f"computes {cost:.3g} FLOPs, so the {self._budget:.3g}-FLOP budget" if self.kind == "flops"
                    else f"takes {dt:.1f}s, so the {self._budget:.0f}s budget")
            print(f"note: one step {said} holds about {max(1, round(self._budget / cost))} steps and the run ends "
                  f"with the first step past it: {smaller}", flush=True)
        if isinstance(epoch, int) and epoch > 1 and not self._epoch_said:
            self._epoch_said = True
            print(f"note: epoch {epoch} from step {step}: the loader has read every training document once and "
                  "now reads them again (more data: `prepare.py --num-shards`, or a bigger --source corpus)",
                  flush=True)

    def _print_progress(self, step, dt, lrm, epoch):
        mfu = 100 * self.flops_per_token * self.tokens_per_step / dt / self.peak if self.peak else 0.0
        line = (f"step {step:05d} ({100 * self.progress:.1f}%) | loss: {self.train_loss:.6f} | lrm: {lrm:.2f} | "
                f"dt: {dt * 1000:.0f}ms | tok/sec: {int(self.tokens_per_step / dt):,} | mfu: {mfu:.1f}% | "
                f"epoch: {epoch} | remaining: {self._remaining()}")
        if self.tty:
            print(f"\r{line}    ", end="", flush=True)
        elif (step in (0, 1, self._warmup) or self._done
              or _clock() - self._last_log >= LOG_EVERY_SECONDS):
            print(line, flush=True)
            self._last_log = _clock()

    def _remaining(self):
        """What the budget has left: steps at the last step's FLOPs, or seconds."""
        if self.kind == "flops":
            left = max(0.0, self._budget - self._counted_flops)
            return f"{math.ceil(left / self._step_flops) if self._step_flops else '?'} steps"
        return f"{max(0.0, self._budget - self._counted_seconds):.0f}s"

    def _check(self, val_bpb, evaluation):
        """Why this run compares with no other (empty for an honest run), checked at its end."""
        problems = modified_constants(self.train_globals) + self._violations + self._record.noted
        if self._meter is not None:
            problems += self._meter.problems()
            after = self._meter.total - self._flops_seen
            if after > 0:
                problems.append(f"{after:.3g} FLOPs were computed after the last step, before the evaluation, "
                                "outside every step's count")
        if self._late_steps:
            problems.append(f"{self._late_steps} step(s) begun after the budget ran out (run.done was True)")
        if evaluation is None:
            problems.append("val_bpb did not come from prepare.evaluate_bpb")
        elif not (val_bpb == evaluation["val_bpb"] or (math.isnan(val_bpb) and math.isnan(evaluation["val_bpb"]))):
            problems.append(f"the val_bpb given to summary() ({val_bpb}) is not what evaluate_bpb computed "
                            f"({evaluation['val_bpb']})")
        return problems

    def budget_text(self):
        """The budget that ran, as the summary says it: `flops 1.4e+12` or `time 60s`."""
        return f"flops {self._budget:.4g}" if self.kind == "flops" else f"time {self._budget:g}s"

    def summary(self, val_bpb, num_params, depth):
        """Print the notes, `---` and the summary keys (docs/RUN.md); write the record, or end in one `error:` line."""
        t_end = _clock()
        evaluations = self._record.data["evaluations"]
        evaluation = evaluations[-1] if evaluations else None
        violations = self._check(float(val_bpb), evaluation)
        metric = evaluation["val_bpb"] if evaluation is not None else float(val_bpb)
        exact = evaluation["val_bpb_exact"] if evaluation is not None else float("nan")
        timed_tokens = max(0, self.step - self._timed_from) * self.tokens_per_step
        flops_per_sec = self.flops_per_token * timed_tokens / self._counted_seconds if self._counted_seconds else 0.0
        mfu = 100 * flops_per_sec / self.peak if self.peak else 0.0
        over = self._counted_seconds - self._budget
        if self.kind == "time" and self.step > self._warmup and over > 0.05 * self._budget:
            print(f"note: training overshot the {self._budget:.0f}s budget by {over:.1f}s: its last step took "
                  f"{over:.1f}s or more, and a run ends with the first step past the budget")
        settings = constants.SETTINGS + (" (modified at run time)" if violations else "")
        if violations:
            print(f"note: not comparable with any run: {'; '.join(violations)}")
        elif constants.SETTINGS != "standard":
            print(f"note: settings {constants.SETTINGS}, not the standard ones: this run compares only with runs "
                  "under the same settings")
        if self.step <= self._warmup:
            raise UserError(f"no step counted toward the {self.budget_text()} budget ({self.step} step(s) run, "
                            f"{self._warmup} uncounted): the loop ended before training did")
        if not math.isfinite(metric):
            raise UserError(f"val_bpb is {metric}: the model's losses on the validation rows are not finite (weights "
                            "or logits overflowed after the last step?); a run without a finite metric is a crash")
        peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if self.cuda else 0.0
        values = [
            ("val_bpb", f"{metric:.6f}"), ("training_seconds", f"{self._counted_seconds:.1f}"),
            ("total_seconds", f"{t_end - self.t_start:.1f}"), ("peak_vram_mb", f"{peak_vram_mb:.1f}"),
            ("mfu_percent", f"{mfu:.2f}"), ("total_tokens_M", f"{self.step * self.tokens_per_step / 1e6:.1f}"),
            ("num_steps", f"{self.step}"), ("num_params_M", f"{num_params / 1e6:.1f}"), ("depth", f"{depth}"),
            ("val_bpb_exact", f"{exact:.6f}"), ("train_loss", f"{self.train_loss:.6f}"),
            ("startup_seconds", f"{self.startup_seconds:.1f}"),
            ("eval_seconds", f"{t_end - (self._t_trained or t_end):.1f}"),
            ("tok_per_sec", f"{int(timed_tokens / self._counted_seconds) if self._counted_seconds else 0}"),
            ("flops_per_sec", f"{flops_per_sec:.4e}"),
            ("device", self.device.type), ("gpu", self.gpu_name), ("settings", settings),
            ("budget", self.budget_text()), ("train_flops", f"{self._counted_flops:.4e}"),
            ("run_id", self._record.run_id),
        ]
        print("---")
        for key, value in values:
            print(f"{key + ':':<18}{value}")  # (the reference's aligned format)
        sys.stdout.flush()
        self._record.finish(dict(values), violations, val_bpb=metric, val_bpb_exact=exact,
                            training_seconds=self._counted_seconds, budget=self._budget, budget_kind=self.kind,
                            training_flops=self._counted_flops, steps=self.step,
                            uncounted_steps=min(self.step, self._warmup), late_steps=self._late_steps,
                            model_flops_per_sec=flops_per_sec, peak_vram_mb=peak_vram_mb)
        gc.enable()


def _reason(error):
    """Why a run stopped, in one line, for its record."""
    if isinstance(error, UserError):
        return error.message
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(error, SystemExit):
        return f"exited with status {error.code}"
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


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
    """Run train() as one run with its record: out of memory (naming `knobs`), SIGTERM, any stop is one line."""
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # (read at the first CUDA allocation)
    run_record = record.start(train.__globals__.get("__file__", "train.py"), constants.SETTINGS, FIXED)
    print(f"run: {run_record.run_id}", flush=True)  # (the log's first line: results.py matches it to run.json)
    global _watchdog, _meter
    stopped = "train.py was stopped by SIGTERM (`timeout` ran out, or the run was killed): a crash"
    watchdog = _watchdog = Watchdog(STALL_SECONDS if not constants.FORCE else math.inf, lambda: run_record.evaluating)
    counting = flops.counting() if FIXED["BUDGET"] == "flops" else contextlib.nullcontext()
    try:
        try:
            with sigterm_as_error(stopped), watchdog, counting as _meter:  # every FLOP from here to the evaluation
                _with_kernels(train)
        except (MemoryError, RuntimeError) as e:  # (torch.OutOfMemoryError is a RuntimeError)
            gpu = isinstance(e, torch.OutOfMemoryError)
            if not (gpu or isinstance(e, MemoryError) or "can't allocate memory" in str(e)):  # CPU allocator
                raise
            raise UserError(f"out of {'GPU memory' if gpu else 'memory'} at {knobs}: lower DEVICE_BATCH_SIZE "
                            "(gradient accumulation keeps TOTAL_BATCH_SIZE) or the model size") from None
        if run_record.data["status"] == "running":
            raise UserError("train() returned without a summary (runtime.Run.summary was never reached)")
    except BaseException as e:
        if watchdog.said and isinstance(e, UserError):  # (its SIGTERM: said as the hang it is)
            run_record.fail(watchdog.said)
            raise UserError(watchdog.said) from None
        run_record.fail(_reason(e))
        raise
    finally:
        _watchdog = _meter = None
        record.stop()
