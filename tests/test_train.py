"""train.py end to end on the CPU: the real loop, tiny, on the prepared test corpus."""
import math
import re

import pytest
import torch

import constants
import runtime
import train

from conftest import run_script

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth"]
EXTRA_KEYS = ["train_loss", "startup_seconds", "eval_seconds", "tok_per_sec", "device", "gpu"]
TINY = "import train; train.DEPTH = 2; train.DEVICE_BATCH_SIZE = 8; train.TOTAL_BATCH_SIZE = 2 * 8 * 128; "


def summary(stdout):
    block = stdout.split("\n---\n", 1)[1]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^(\w+):( +\S.*)$", block, flags=re.M)]


def untrained_val_bpb(tokenizer):
    import train
    from prepare import evaluate_bpb
    torch.manual_seed(0)
    model = train.build_model(train.GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2,
                                              n_head=1, n_kv_head=1, n_embd=128), torch.device("cpu"))
    return evaluate_bpb(model, tokenizer, 8)


def test_tiny_run_end_to_end(prepared, tokenizer):
    proc = run_script(["-c", TINY + "train.main()"])  # stdout is a pipe here, as in `> run.log`
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = summary(proc.stdout)
    assert [k for k, _ in rows] == SUMMARY_KEYS + EXTRA_KEYS
    for key, value in rows:  # values aligned in one column, as the reference prints them
        assert len(key) + 1 + len(value) - len(value.lstrip()) == 18, key
    values = {k: v.strip() for k, v in rows}
    val_bpb = float(values["val_bpb"])
    assert math.isfinite(val_bpb)
    assert val_bpb < untrained_val_bpb(tokenizer) - 0.3
    # every step counts on the CPU (nothing compiles): the budget is spent by the counted steps, and the last
    # step is the first one past it
    steps = int(values["num_steps"])
    assert steps >= 2 and values["depth"] == "2" and values["device"] == "cpu"
    assert float(values["training_seconds"]) >= 4.0
    assert float(values["total_tokens_M"]) == round(steps * 2048 / 1e6, 1)
    assert int(values["tok_per_sec"]) == pytest.approx(steps * 2048 / float(values["training_seconds"]), rel=0.05)
    assert re.search(r"^step 00000 \(\d+\.\d%\) \| loss: \d+\.\d+ \| lrm: ", proc.stdout, flags=re.M)
    # a log fit for a file: newline-terminated lines, none long, progress at a bounded rate, the summary last
    assert "\r" not in proc.stdout
    assert max(len(line) for line in (proc.stdout + proc.stderr).splitlines()) < 300
    progress = re.findall(r"^step (\d{5}) ", proc.stdout, flags=re.M)
    assert progress[:2] == ["00000", "00001"] and progress[-1] == f"{int(values['num_steps']) - 1:05d}"
    assert len(progress) <= 3 + 1 + float(values["total_seconds"]) / runtime.LOG_EVERY_SECONDS + 1
    assert float(values["startup_seconds"]) > 0 and float(values["eval_seconds"]) > 0
    assert float(values["startup_seconds"]) + float(values["training_seconds"]) <= float(values["total_seconds"])
    assert abs(float(values["train_loss"]) - float(re.findall(r"\| loss: (\S+) \|", proc.stdout)[-1])) < 1e-6
    # the run under overrides says so, in one line right before the summary
    before = proc.stdout.split("\n---\n")[0].splitlines()
    assert before[-1].startswith("note: not comparable with standard runs: ")
    assert "AUTORESEARCH_TIME_BUDGET=4" in before[-1] and "AUTORESEARCH_MAX_SEQ_LEN=128" in before[-1]
    assert "attention: SDPA in eager mode on cpu" in proc.stdout


def test_without_data_one_line_points_at_prepare(tmp_path):
    proc = run_script(["-c", TINY + "train.main()"], env={"AUTORESEARCH_CACHE_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "uv run prepare.py" in proc.stderr.strip().splitlines()[-1]


def test_a_diverging_run_prints_fail_and_exits_non_zero(prepared):
    proc = run_script(["-c", TINY + "train.EMBEDDING_LR = float('inf'); train.main()"])
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "val_bpb" not in proc.stdout


def test_bad_batch_sizes_get_a_message_not_a_crash(prepared):
    proc = run_script(["-c", TINY + "train.TOTAL_BATCH_SIZE = 1000; train.main()"])
    assert proc.returncode != 0
    assert "TOTAL_BATCH_SIZE" in proc.stderr


def test_importing_train_does_nothing(tmp_path):
    proc = run_script(["-c", "import sys, train, prepare, constants; print('ok', 'torch._dynamo' in sys.modules)"],
                      env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0 and proc.stdout == "ok False\n"  # nothing run, no compiler stack imported
    assert not (tmp_path / "cache").exists()


def test_cpu_run_of_the_baseline_says_how_to_shrink_it(prepared):
    # the baseline on a CPU: the note comes first; stop the run right after it
    proc = run_script(["-c", "import train, builtins\n"
                             "real_print = builtins.print\n"
                             "def stop_after_note(*a, **k):\n"
                             "    real_print(*a, **k)\n"
                             "    if a and str(a[0]).startswith('note: for a small run'): raise SystemExit(3)\n"
                             "builtins.print = stop_after_note\n"
                             "train.main()"], env={"AUTORESEARCH_EVAL_TOKENS": str(2 ** 22)})
    assert proc.returncode == 3, proc.stderr[-2000:]
    note = [line for line in proc.stdout.splitlines() if line.startswith("note: no CUDA")]
    assert len(note) == 1
    advice = proc.stdout.split(note[0], 1)[1]
    for knob in ("DEPTH", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE", "AUTORESEARCH_TIME_BUDGET"):
        assert knob in advice


def test_out_of_memory_is_one_line_naming_the_knob(monkeypatch):
    import train

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    message = str(exit_info.value.code).strip()
    assert "\n" not in message and "DEVICE_BATCH_SIZE" in message


def tiny_in_process(monkeypatch):
    for name, value in (("DEPTH", 2), ("DEVICE_BATCH_SIZE", 8), ("TOTAL_BATCH_SIZE", 2 * 8 * 128)):
        monkeypatch.setattr(train, name, value)
    return train.GPTConfig(sequence_len=128, vocab_size=8192, n_layer=2, n_head=1, n_kv_head=1, n_embd=128)


class Stop(Exception):
    pass


def test_training_starts_from_the_references_initial_weights(prepared, monkeypatch):
    config = tiny_in_process(monkeypatch)
    seen = []

    def first_step(optimizer):  # the weights as the loop hands them to the first update
        seen.extend(p.detach().clone() for group in optimizer.param_groups for p in group["params"])
        raise Stop

    monkeypatch.setattr(train.MuonAdamW, "step", first_step)
    with pytest.raises(Stop):
        train.train()
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


def test_the_compiled_model_is_what_trains_and_evaluates(prepared, monkeypatch, capsys):
    tiny_in_process(monkeypatch)
    calls = {"wrapper": 0, "raw": 0}

    class Compiled(torch.nn.Module):  # stands in for torch.compile's wrapper, counting what goes through it
        def __init__(self, model):
            super().__init__()
            self.inner = model
            model.register_forward_hook(lambda *a: calls.__setitem__("raw", calls["raw"] + 1))

        def forward(self, *args, **kwargs):
            calls["wrapper"] += 1
            return self.inner(*args, **kwargs)

    monkeypatch.setattr(runtime, "compile_model", lambda model, device: Compiled(model))
    train.train()
    steps = int(re.search(r"^num_steps: +(\d+)$", capsys.readouterr().out, flags=re.M).group(1))
    eval_batches = constants.EVAL_TOKENS // (8 * 128)
    assert calls["wrapper"] == calls["raw"] == 2 * steps + eval_batches  # nothing called the raw model directly


def test_nonstandard_settings_name_overrides_and_constants_changed_at_run_time(monkeypatch):
    import constants
    import prepare
    monkeypatch.setattr(constants, "METRIC_OVERRIDES", {})
    monkeypatch.setattr(constants, "RESOLVED", dict(constants.DEFAULTS))
    standard = {name: value for name, value in constants.DEFAULTS.items()}
    for name, value in standard.items():
        monkeypatch.setattr(constants, name, value)
        monkeypatch.setattr(prepare, name, value, raising=False)
    assert runtime.nonstandard_settings(standard) == []
    monkeypatch.setattr(prepare, "EVAL_TOKENS", 1000)
    notes = runtime.nonstandard_settings({**standard, "TIME_BUDGET": 600})
    assert sorted(notes) == ["EVAL_TOKENS = 1000 set in prepare.py at run time",
                             "TIME_BUDGET = 600 set in train.py at run time"]
    monkeypatch.setattr(constants, "METRIC_OVERRIDES", {"AUTORESEARCH_TIME_BUDGET": "60"})
    assert runtime.nonstandard_settings(standard)[0] == "AUTORESEARCH_TIME_BUDGET=60"


@pytest.mark.parametrize("names, expected", [
    ([("aten::_scaled_dot_product_cudnn_attention", 4), ("aten::_scaled_dot_product_cudnn_attention_backward", 4),
      ("triton_tem_fused_flex_attention_0", 12), ("aten::mm", 90)], {"cuDNN SDPA": 8, "FlexAttention": 12}),
    ([("aten::_scaled_dot_product_flash_attention", 2), ("void flash_fwd_kernel<...>", 2)], {"flash SDPA": 4}),
    ([("aten::_scaled_dot_product_attention_math", 3)], {"math SDPA (slow)": 3}),
    ([("aten::mm", 5)], {}),
])
def test_attention_kernels_are_named_from_profiler_events(names, expected):
    assert runtime.attention_kernels(names) == expected
