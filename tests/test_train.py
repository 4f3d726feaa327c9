"""train.py end to end on the CPU: the real loop, tiny, on the prepared test corpus."""
import math
import re

import pytest
import torch

from conftest import run_script

SUMMARY_KEYS = ["val_bpb", "training_seconds", "total_seconds", "peak_vram_mb", "mfu_percent", "total_tokens_M",
                "num_steps", "num_params_M", "depth"]
TINY = "import train; train.DEPTH = 2; train.DEVICE_BATCH_SIZE = 8; train.TOTAL_BATCH_SIZE = 2 * 8 * 128; "


def summary(stdout):
    block = stdout.split("\n---\n", 1)[1]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^(\w+):( +\S.*)$", block, flags=re.M)]


def untrained_val_bpb(tokenizer):
    import train
    from prepare import evaluate_bpb
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=128, vocab_size=tokenizer.get_vocab_size(), n_layer=2,
                                      n_head=1, n_kv_head=1, n_embd=128), "cpu")
    model.init_weights()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return evaluate_bpb(model, tokenizer, 8)


def test_tiny_run_end_to_end(prepared, tokenizer):
    proc = run_script(["-c", TINY + "train.main()"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = summary(proc.stdout)
    assert [k for k, _ in rows][:len(SUMMARY_KEYS)] == SUMMARY_KEYS
    for key, value in rows:  # values aligned in one column, as the reference prints them
        assert len(key) + 1 + len(value) - len(value.lstrip()) == 18, key
    values = {k: v.strip() for k, v in rows}
    val_bpb = float(values["val_bpb"])
    assert math.isfinite(val_bpb)
    assert val_bpb < untrained_val_bpb(tokenizer) - 0.3
    assert 4.0 <= float(values["training_seconds"]) < 20
    assert int(values["num_steps"]) > 11 and values["depth"] == "2" and values["device"] == "cpu"
    assert float(values["total_tokens_M"]) == round(int(values["num_steps"]) * 2048 / 1e6, 1)
    assert re.search(r"step 00011 \(\d+\.\d%\) \| loss: \d+\.\d+ \| lrm: ", proc.stdout)


def test_without_data_one_line_points_at_prepare(tmp_path):
    proc = run_script(["train.py"], env={"AUTORESEARCH_CACHE_DIR": str(tmp_path)})
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
    proc = run_script(["-c", "import train, prepare, constants; print('ok')"],
                      env={"AUTORESEARCH_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0 and proc.stdout == "ok\n"
    assert not (tmp_path / "cache").exists()


def test_cpu_run_of_the_baseline_says_how_to_shrink_it(prepared):
    # the baseline on a CPU: the note comes first; stop the run right after it
    proc = run_script(["-c", "import train, builtins\n"
                             "real_print = builtins.print\n"
                             "def stop_after_note(*a, **k):\n"
                             "    real_print(*a, **k)\n"
                             "    if a and str(a[0]).startswith('note: no CUDA'): raise SystemExit(3)\n"
                             "builtins.print = stop_after_note\n"
                             "train.main()"])
    assert proc.returncode == 3, proc.stderr[-2000:]
    note = [line for line in proc.stdout.splitlines() if line.startswith("note: no CUDA")]
    assert len(note) == 1
    for knob in ("DEPTH", "DEVICE_BATCH_SIZE", "TOTAL_BATCH_SIZE", "AUTORESEARCH_TIME_BUDGET"):
        assert knob in note[0]


def test_out_of_memory_is_one_line_naming_the_knob(monkeypatch):
    import train

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    message = str(exit_info.value.code).strip()
    assert "\n" not in message and "DEVICE_BATCH_SIZE" in message
