"""train.py end to end on the CPU: the real loop, tiny, on the prepared test corpus; its one-line errors."""
import contextlib
import io
import json
import math
import re
import subprocess
import sys
import types

import pytest
import torch

import constants
from autoresearch import hardware, runtime
import train

from conftest import run_script, set_budget

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth"]
EXTRA_KEYS = ["val_bpb_exact", "train_loss", "startup_seconds", "eval_seconds", "tok_per_sec", "flops_per_sec",
              "device", "gpu", "settings", "budget", "train_flops", "run_id"]


def summary(stdout):
    block = stdout.split("\n---\n", 1)[1]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^(\w+):( +\S.*)$", block, flags=re.M)]


def untrained_val_bpb(tokenizer):
    from prepare import evaluate_bpb
    torch.manual_seed(0)
    model = train.build_model(train.GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2,
                                              n_head=1, n_kv_head=1, n_embd=128, low_dtype=torch.float32),
                              torch.device("cpu"))
    return evaluate_bpb(model, tokenizer, 8)


TINY_KNOBS = (("DEPTH", 2), ("DEVICE_BATCH_SIZE", 8), ("TOTAL_BATCH_SIZE", 2 * 8 * 128))
STEP_SECONDS = 0.19  # what every step of a tiny run lasts on runtime's clock: a 1-s time budget ends at step 6


def stepped_clock(monkeypatch, seconds=STEP_SECONDS):
    """runtime's clock for a tiny run, so that every training step lasts exactly `seconds` on a fast, a slow or
    a busy machine: at the end of a step the clock jumps to its start + `seconds`. The budget then holds the same
    steps anywhere, and what the run learns in them never depends on the machine's load."""
    import time
    offset = {"perf": 0.0}
    clock = types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset["perf"])
    end_step = runtime.Run.end_step

    def stepped_end_step(self, *args):
        offset["perf"] += self._t0 + seconds - clock.perf_counter()
        return end_step(self, *args)

    monkeypatch.setattr(runtime, "_clock", clock.perf_counter)
    monkeypatch.setattr(runtime.Run, "end_step", stepped_end_step)


@pytest.fixture(scope="module")
def tiny_run(prepared, tmp_path_factory):
    """One tiny training run through train.main(), the real loop and eval, serving several checks: its output
    (stdout is not a terminal, as in `> run.log`) and how often torch.compile's stand-in and the raw model ran.
    Under a compute budget of 11 steps (enough to learn), on the real clock."""
    calls = {"wrapper": 0, "raw": 0}

    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper, counting what goes through it
        def __init__(self, model):
            super().__init__()
            self.inner = model
            model.register_forward_hook(lambda *a: calls.__setitem__("raw", calls["raw"] + 1))

        def forward(self, *args, **kwargs):
            calls["wrapper"] += 1
            return self.inner(*args, **kwargs)

    saved = {name: getattr(train, name) for name, _ in TINY_KNOBS}
    compile_model = hardware.compile_model
    out = io.StringIO()
    try:
        for name, value in TINY_KNOBS:
            setattr(train, name, value)
        hardware.compile_model = lambda model, device: Compiled(model)
        with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.chdir(tmp_path_factory.mktemp("tiny_run"))
            set_budget(monkeypatch, "flops", 1e11)
            train.main()
            with open("run.json", encoding="utf-8") as f:
                run_record = json.load(f)
    finally:
        hardware.compile_model = compile_model
        for name, value in saved.items():
            setattr(train, name, value)
    stdout = out.getvalue()
    rows = summary(stdout)
    return dict(stdout=stdout, rows=rows, values={k: v.strip() for k, v in rows}, calls=calls, record=run_record)


def test_tiny_run_prints_the_reference_summary(tiny_run):
    assert [k for k, _ in tiny_run["rows"]] == SUMMARY_KEYS + EXTRA_KEYS
    for key, value in tiny_run["rows"]:  # values aligned in one column, as the reference prints them
        assert len(key) + 1 + len(value) - len(value.lstrip()) == 18, key
    values = tiny_run["values"]
    assert values["depth"] == "2" and values["device"] == "cpu" and values["gpu"] == "cpu"
    assert float(values["peak_vram_mb"]) == 0 and float(values["mfu_percent"]) == 0  # not measured off CUDA


def test_tiny_run_learns(tiny_run, tokenizer):
    val_bpb = float(tiny_run["values"]["val_bpb"])
    assert math.isfinite(val_bpb) and val_bpb < untrained_val_bpb(tokenizer) - 0.3


def tiny_step_flops(T=128, rows=16, dim=128, vocab=8192, layers=2):
    """The FLOPs of one step of the tiny model (2 layers, dim 128, one head, full causal attention, 16 rows of 128
    tokens in two micro-batches), by hand: every matmul's 2 x m x n x k, forward and backward (the gradients of
    the input and of the weight), attention's scores and weighted sum over every key, and Muon's orthogonalization
    (5 Polar Express iterations per stack of same-shape matrices). Elementwise work, norms and lookups count 0."""
    tokens = rows * T
    value_layers = [i for i in range(layers) if i % 2 == (layers - 1) % 2]
    linears = layers * (4 * dim * dim + 2 * 4 * dim * dim) + dim * vocab + len(value_layers) * 32 * 1
    dense = 3 * 2 * tokens * linears  # forward, grad input, grad weight
    attention = layers * rows * (4 * T * T * dim + 2 * T * T * 5 * dim)  # forward 2 bmm, backward 5 bmm

    def polar(k, rows_, cols):  # one stack [k, rows_, cols]: gram, gram @ gram, then x @ poly (or poly @ x)
        small, big = min(rows_, cols), max(rows_, cols)
        return 5 * k * (2 * small * small * big + 2 * small ** 3 + 2 * small * small * big)
    muon = polar(4 * layers, dim, dim) + polar(layers, 4 * dim, dim) + polar(layers, dim, 4 * dim)
    muon += polar(len(value_layers), 1, 32)
    return dense + attention + muon


def test_tiny_run_counts_every_step_toward_the_compute_budget(tiny_run):
    # the FLOPs the counter saw are the step's, by hand; training ends with the first step past the budget
    values, record = tiny_run["values"], tiny_run["record"]
    steps, budget = int(values["num_steps"]), record["budget"]
    assert record["budget_kind"] == "flops" and budget == 1e11 and values["budget"] == "flops 1e+11"
    rotary = 128 * 128 // 2  # before the loop: the rotary tables' outer product (positions x frequencies)
    assert record["training_flops"] == steps * tiny_step_flops() + rotary
    assert steps == math.ceil(budget / tiny_step_flops()) and steps >= 5
    assert float(values["train_flops"]) == pytest.approx(steps * tiny_step_flops(), rel=1e-4)
    assert float(values["total_tokens_M"]) == round(steps * 2048 / 1e6, 1)
    tok_per_sec = [steps * 2048 / (float(values["training_seconds"]) + d) for d in (0.05, -0.05)]
    assert math.floor(tok_per_sec[0]) <= int(values["tok_per_sec"]) <= tok_per_sec[1]  # the summary truncates
    # start-up, counted training and evaluation are disjoint parts of the run (each, and the total, rounded to 0.1 s:
    # 0.2 s of rounding at most; a fast machine starts and evaluates this tiny model in under 0.05 s: 0.0)
    parts = [float(values[key]) for key in ("startup_seconds", "training_seconds", "eval_seconds")]
    assert min(parts) >= 0 and sum(parts) <= float(values["total_seconds"]) + 0.2 + 1e-9


def test_tiny_run_log_is_fit_for_a_file(tiny_run):
    stdout, values = tiny_run["stdout"], tiny_run["values"]
    assert re.search(r"^step 00000 \(\d+\.\d%\) \| loss: \d+\.\d+ \| lrm: \d\.\d\d \| dt: \d+ms \| tok/sec: [\d,]+ \| "
                     r"mfu: \d+\.\d% \| epoch: \d+ \| remaining: \d+ steps$", stdout, flags=re.M)
    assert "\r" not in stdout
    assert max(len(line) for line in stdout.splitlines()) < 300
    progress = re.findall(r"^step (\d{5}) ", stdout, flags=re.M)
    assert progress[:2] == ["00000", "00001"] and progress[-1] == f"{int(values['num_steps']) - 1:05d}"
    assert len(progress) <= 3 + 1 + float(values["total_seconds"]) / runtime.LOG_EVERY_SECONDS + 1
    assert abs(float(values["train_loss"]) - float(re.findall(r"\| loss: (\S+) \|", stdout)[-1])) < 1e-6
    # the test corpus's training shard is smaller than the loader's look-ahead: a second pass from step 0, said once
    assert len(re.findall(r"^note: epoch \d+ from step 0: the loader has read every training document once",
                          stdout, flags=re.M)) == 1
    # the run under the small preset and overrides says so, in one line right before the summary and in its key
    before = stdout.split("\n---\n")[0].splitlines()
    assert before[-1] == f"note: settings {constants.SETTINGS}, not the standard ones: this run compares only " \
                         "with runs under the same settings"
    assert "AUTORESEARCH_PRESET=small" in values["settings"]
    assert "AUTORESEARCH_FLOP_BUDGET=1.5e+10" in values["settings"]
    assert "TIME_BUDGET" not in values["settings"]  # (the budget that did not run is not a setting)


def test_the_time_budget_counts_every_step_on_the_cpu(prepared, monkeypatch, capsys):
    # nothing compiles on the CPU, so every step counts; training ends with the first step past the budget
    tiny_in_process(monkeypatch)
    set_budget(monkeypatch, "time", 1)
    stepped_clock(monkeypatch)
    train.main()
    out = capsys.readouterr().out
    values = {k: v.strip() for k, v in summary(out)}
    assert int(values["num_steps"]) == math.ceil(1 / STEP_SECONDS) == 6
    assert values["budget"] == "time 1s" and float(values["train_flops"]) == 0
    assert float(values["training_seconds"]) == pytest.approx(6 * STEP_SECONDS, abs=0.06)
    parts = [float(values[key]) for key in ("startup_seconds", "training_seconds", "eval_seconds")]
    assert min(parts) >= 0 and sum(parts) <= float(values["total_seconds"]) + 0.2 + 1e-9


def test_the_same_code_takes_the_same_steps_under_any_load(prepared, monkeypatch, capsys):
    # the compute budget: the same code, alone and beside two busy processes, trains the same steps to the same
    # val_bpb (the CPU's arithmetic is the same whatever the load)
    tiny_in_process(monkeypatch)

    def one_run():
        train.main()
        return {k: v.strip() for k, v in summary(capsys.readouterr().out)}

    quiet = one_run()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        busy = one_run()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert busy["num_steps"] == quiet["num_steps"] and busy["train_flops"] == quiet["train_flops"]
    assert abs(float(busy["val_bpb"]) - float(quiet["val_bpb"])) <= 1e-4


def test_the_compiled_model_is_what_trains_and_evaluates(tiny_run):
    steps = int(tiny_run["values"]["num_steps"])
    eval_batches = constants.EVAL_TOKENS // (8 * 128)
    calls = tiny_run["calls"]
    assert calls["wrapper"] == calls["raw"] == 2 * steps + eval_batches  # nothing called the raw model directly


def test_without_data_one_line_points_at_prepare(tmp_path):
    # the real entry point, as `uv run train.py` starts it: one line on stderr, no traceback
    proc = run_script(["train.py"], env={"AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "uv run prepare.py" in proc.stderr.strip().splitlines()[-1]


def test_a_diverging_run_prints_fail_and_exits_non_zero(prepared, monkeypatch, capsys):
    tiny_in_process(monkeypatch)
    set_budget(monkeypatch, "flops", 2 * tiny_step_flops())  # (the loss of step 1 shows what step 0's update did)
    monkeypatch.setattr(train, "EMBEDDING_LR", float("inf"))
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    out = capsys.readouterr().out
    assert str(exit_info.value.code).startswith("error: the training loss is") and "FAIL" in out
    assert "val_bpb" not in out


@pytest.mark.parametrize("knob, value, says", [
    ("TOTAL_BATCH_SIZE", 1000, "must be a multiple of DEVICE_BATCH_SIZE"),
    ("TOTAL_BATCH_SIZE", 0, "TOTAL_BATCH_SIZE = 0 in train.py: it must be a positive integer"),
    ("DEVICE_BATCH_SIZE", 0, "DEVICE_BATCH_SIZE = 0 in train.py"),
    ("DEPTH", 0, "DEPTH = 0 in train.py"),
    ("DEPTH", 2.5, "DEPTH = 2.5 in train.py"),
    ("WINDOW_PATTERN", "SXL", "WINDOW_PATTERN = 'SXL' in train.py: use only the letters S and L"),
    ("WINDOW_PATTERN", "", "WINDOW_PATTERN = ''"),
])
def test_a_bad_knob_is_one_line_before_the_cache_is_read(knob, value, says, monkeypatch):
    tiny_in_process(monkeypatch)
    monkeypatch.setattr(train, knob, value)
    monkeypatch.setattr(train, "check_cache", lambda: pytest.fail("the cache was read before the knobs"))
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    line = str(exit_info.value.code)
    assert line.startswith("error: ") and "\n" not in line and says in line, line


def test_importing_train_does_nothing(tmp_path):
    proc = run_script(["-c", "import sys, train, prepare, constants; print('ok', 'torch._dynamo' in sys.modules)"],
                      env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0 and proc.stdout == "ok False\n"  # nothing run, no compiler stack imported
    assert not (tmp_path / "cache").exists()


class Stop(Exception):
    pass


def test_the_standard_configuration_off_cuda_is_one_line_naming_the_preset(monkeypatch):
    monkeypatch.setattr(constants, "SMALL", False)
    monkeypatch.setattr(train, "check_cache", lambda: pytest.fail("the cache was read before the device check"))
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    line = str(exit_info.value.code)
    assert "\n" not in line and "AUTORESEARCH_PRESET=small" in line and "AUTORESEARCH_FORCE=1" in line
    monkeypatch.setattr(constants, "FORCE", True)  # insisting works
    assert hardware.get_device().type == "cpu"


def test_a_step_too_slow_for_the_budget_is_said_at_once(prepared, monkeypatch, capsys):
    tiny_in_process(monkeypatch)
    set_budget(monkeypatch, "time", 4)
    stepped_clock(monkeypatch, 3.0)  # every step takes 3 s of the 4-s budget
    train.main()
    out = capsys.readouterr().out
    assert re.search(r"^note: one step takes 3\.0s, so the 4s budget holds about 1 steps", out, flags=re.M)
    assert "small preset" not in out  # (the run is under it)
    assert re.search(r"^note: training overshot the 4s budget by 2\.0s", out, flags=re.M)


def test_a_step_too_big_for_the_compute_budget_is_said_at_once(prepared, monkeypatch, capsys):
    tiny_in_process(monkeypatch)
    set_budget(monkeypatch, "flops", 3 * tiny_step_flops())
    train.main()
    out = capsys.readouterr().out
    assert re.search(r"^note: one step computes \S+ FLOPs, so the \S+-FLOP budget holds about 3 steps", out,
                     flags=re.M)
    assert re.search(r"^num_steps: +3$", out, flags=re.M) and "overshot" not in out


@pytest.mark.parametrize("error, says", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"), "out of GPU memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 8589934592 bytes"), "out of memory"),
    (MemoryError(), "out of memory"),
])
def test_out_of_memory_is_one_line_naming_the_knob(error, says, monkeypatch):
    def oom():
        raise error

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    message = str(exit_info.value.code).strip()
    assert "\n" not in message and "DEVICE_BATCH_SIZE" in message and says in message


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(train, "train", lambda: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        train.main()


def tiny_in_process(monkeypatch):
    for name, value in TINY_KNOBS:
        monkeypatch.setattr(train, name, value)
    return train.GPTConfig(sequence_len=128, vocab_size=8192, n_layer=2, n_head=1, n_kv_head=1, n_embd=128,
                           low_dtype=torch.float32)


def test_training_starts_from_the_references_initial_weights(prepared, monkeypatch):
    config = tiny_in_process(monkeypatch)
    seen = []

    def first_step(optimizer):  # the weights as the loop hands them to the first update
        seen.extend(p.detach().clone() for group in optimizer.param_groups for p in group["params"])
        raise Stop

    monkeypatch.setattr(train.MuonAdamW, "step", first_step)
    with pytest.raises(Stop):
        train.main()
    # The reference's construction, written out: seed, build on meta, materialize, init_weights().
    torch.manual_seed(train.SEED)
    with torch.device("meta"):
        reference = train.GPT(config)
    reference.to_empty(device="cpu")
    reference.init_weights()
    groups = reference.setup_optimizer(0.6, 0.004, 0.04, 0.5, 0.2, (0.8, 0.95)).param_groups
    expected = [p.detach() for group in groups for p in group["params"]]
    assert len(seen) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))
    # (built directly on the device, PyTorch's own initializers draw first and every random tensor differs)
    torch.manual_seed(train.SEED)
    direct = train.GPT(config, "cpu")
    direct.init_weights()
    assert not torch.equal(direct.transformer.wte.weight, reference.transformer.wte.weight)


def test_constants_changed_at_run_time_make_a_run_comparable_with_none(monkeypatch):
    standard = dict(constants.RESOLVED)
    EVAL, BUDGET = standard["EVAL_TOKENS"], standard["TIME_BUDGET"]
    assert runtime.modified_constants(standard) == []
    monkeypatch.setattr(constants, "EVAL_TOKENS", 1000)
    notes = runtime.modified_constants({**standard, "TIME_BUDGET": 600})
    assert sorted(notes) == [f"EVAL_TOKENS = 1000 set in constants.py at run time (the fixed value is {EVAL})",
                             f"TIME_BUDGET = 600 set in train.py at run time (the fixed value is {BUDGET})"]
