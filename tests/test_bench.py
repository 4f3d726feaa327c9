"""autoresearch.bench, the parts a CPU can check: the kernel categories of a profile, the tables, the edits of the
start-up benchmark, and the GPU check's orchestration (its steps stand in for the GPU work)."""
import os
import re

import pytest

from autoresearch import bench
from conftest import ROOT


def test_kernels_are_sorted_into_the_profiles_categories():
    kernels = [("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", 3.0), ("sm90_xmma_gemm_bf16bf16_bf16f32", 1.0),
               ("triton_tem_fused_flex_attention_backward_0", 2.0),
               ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", 0.5),
               ("triton_red_fused__to_copy_mul_rsqrt_0", 0.25), ("triton_poi_fused_relu_pow_1", 0.25),
               ("triton_per_fused__log_softmax_backward_2", 0.125), ("Memcpy HtoD (Pageable -> Device)", 0.0625),
               ("triton_poi_fused_add_mul_3", 0.03125), ("void at::native::vectorized_elementwise_kernel", 1.0)]
    got = bench.kernel_categories(kernels)
    assert got == {"matmul (GEMM)": 4.0, "attention: FlexAttention": 2.0, "attention: cuDNN SDPA": 0.5, "RMSNorm": 0.25,
                   "ReLU^2": 0.25, "cross-entropy / softmax": 0.125, "copy / fill": 0.0625,
                   "other fused elementwise (Triton)": 0.03125, "other": 1.0}


@pytest.mark.parametrize("names, expected", [
    ([("aten::_scaled_dot_product_cudnn_attention", 4), ("aten::_scaled_dot_product_cudnn_attention_backward", 4),
      ("triton_tem_fused_flex_attention_0", 12), ("aten::mm", 90)], {"cuDNN SDPA": 8, "FlexAttention": 12}),
    ([("aten::_scaled_dot_product_flash_attention", 2), ("void flash_fwd_kernel<...>", 2)], {"flash SDPA": 4}),
    ([("aten::_scaled_dot_product_attention_math", 3)], {"math SDPA (slow)": 3}),
    ([("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", 2)], {"mem-efficient SDPA": 2}),  # (not cuDNN's "fmha")
    ([("aten::mm", 5)], {}),
])
def test_attention_kernels_are_named_from_profiler_events(names, expected):
    assert bench.attention_kernels(names) == expected


def test_a_profiled_steps_kernel_time_counts_each_kernel_once():
    """The profiler's events hold CPU ops whose device time includes every kernel under them (aten::mm, the
    compiled region, the optimizer step) and the kernels themselves: only the kernels add up to the GPU time."""
    from types import SimpleNamespace as Event
    cpu, cuda = "DeviceType.CPU", "DeviceType.CUDA"
    events = [
        Event(key="CompiledFunction", count=1, device_type=cpu, device_time_total=9000.0),  # all below
        Event(key="aten::mm", count=2, device_type=cpu, device_time_total=6000.0),
        Event(key="aten::_scaled_dot_product_cudnn_attention", count=1, device_type=cpu, device_time_total=2000.0),
        Event(key="nvjet_tst_128x256_gemm", count=2, device_type=cuda, device_time_total=6000.0),
        Event(key="cudnn_generated_fort_native_sdpa_sm90", count=1, device_type=cuda, device_time_total=2000.0),
        Event(key="triton_poi_fused_add_0", count=1, device_type=cuda, device_time_total=1000.0),
        Event(key="Optimizer.step#MuonAdamW.step", count=1, device_type=cpu, device_time_total=1000.0),
    ]
    attention, kernels = bench.profile_lines(events, 1)
    assert attention == "attention (profiled step 1): cuDNN SDPA x1"
    assert kernels == ("kernels (profiled step 1): matmul (GEMM) 6.0 ms (67%); attention: cuDNN SDPA 2.0 ms (22%); "
                       "other fused elementwise (Triton) 1.0 ms (11%)")


def test_without_kernels_the_ops_count_by_their_self_time():
    """Off CUDA the profile holds ops only: each counts its self time (its children's time is theirs), so an op
    that calls others is not counted twice, and the FLOP counter's dispatch shows as its own category."""
    from types import SimpleNamespace as Event
    cpu = "DeviceType.CPU"
    events = [
        Event(key="aten::linear", count=2, device_type=cpu, self_cpu_time_total=100.0, device_time_total=0.0),
        Event(key="aten::mm", count=2, device_type=cpu, self_cpu_time_total=6000.0, device_time_total=0.0),
        Event(key="aten::_scaled_dot_product_flash_attention_for_cpu", count=1, device_type=cpu,
              self_cpu_time_total=2000.0, device_time_total=0.0),
        Event(key="aten::tanh", count=1, device_type=cpu, self_cpu_time_total=900.0, device_time_total=0.0),
        Event(key="PythonDispatchMode", count=9, device_type=cpu, self_cpu_time_total=1000.0, device_time_total=0.0),
    ]
    attention, ops = bench.profile_lines(events, 3)
    assert attention == "attention (profiled step 3): flash SDPA x1"
    assert ops == ("CPU ops (profiled step 3): matmul (GEMM) 6.0 ms (60%); attention: flash SDPA 2.0 ms (20%); "
                   "the FLOP counter (compute budget) 1.0 ms (10%); other elementwise (eager) 0.9 ms (9%); "
                   "other 0.1 ms (1%)")


def test_a_profiled_run_is_train_py_as_users_run_it_with_the_profile_after_its_step(prepared):
    """run_profiled runs train.py itself, to its summary, and prints the profile's two lines after the
    step asked for; on the CPU they name the CPU's attention and its ops' time, adding up to 100%. The summary
    bench reads is the run's record's."""
    status, summary, out = bench.run_train(profile_step=0)
    assert status == 0, out[-4000:]
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("attention (profiled step 0): "))
    assert lines[at].startswith("attention (profiled step 0): flash SDPA x")
    assert any(line.startswith("step 00000 ") for line in lines[:at])
    parts = dict(re.fullmatch(r"(.*) \S+ ms \((\d+)%\)", part).groups()
                 for part in lines[at + 1].removeprefix("CPU ops (profiled step 0): ").split("; "))
    assert "matmul (GEMM)" in parts and "the FLOP counter (compute budget)" in parts  # (the compute budget counts)
    assert 100 - len(parts) <= sum(map(int, parts.values())) <= 100 + len(parts)  # (each rounded)
    assert f"val_bpb:          {summary['val_bpb']}\n" in out.split("\n---\n")[1]
    assert summary["device"] == "cpu" and int(summary["num_steps"]) >= 1


def test_a_summary_printed_without_a_run_is_not_one():
    # bench reads the run's record, never the text a train.py printed
    status, summary, out = bench.run_train(source='print("---\\nval_bpb:          0.100000")\n')
    assert status == 0 and "val_bpb:          0.100000" in out and summary == {}


def test_table_rows_are_read_back_from_a_table():
    text = "noise\n| measurement (host, torch 2.11) | result |\n|---|---|\n| a | 1 ms |\n| b | x, y |\nmore\n"
    assert bench.table_rows(text) == [("a", "1 ms"), ("b", "x, y")]


def test_the_gpu_check_runs_every_step_logs_it_and_prints_one_table(tmp_path, monkeypatch, capsys):
    outputs = {"gpu-tests": (0, "....\n4 passed in 80.1s\n"),
               "attention": (0, "| measurement (h, torch) | result |\n|---|---|\n| attention: cuDNN | 1.42 ms |\n"),
               "profile": (1, "Traceback ...\nRuntimeError: boom\n"),
               "run-80s": (0, "| measurement (h, t) | result |\n|---|---|\n"
                              "| train.py (80-s budget): val_bpb | 0.57 |\n"),
               "startup": ("timeout", "")}
    seen, clock = [], {"now": 0.0}

    def fake_step(args, log, timeout):  # each step takes 100 s (the check's clock), or all it is given
        name = os.path.basename(log)[:-len(".log")]
        seen.append((name, args, timeout))
        clock["now"] += min(100.0, timeout)
        status, out = outputs[name]
        open(log, "w").write(out)
        return status, out

    monkeypatch.setattr(bench, "run_step", fake_step)
    monkeypatch.setattr(bench.time, "monotonic", lambda: clock["now"])
    rows = bench.bench_gpu(str(tmp_path / "gpu"))
    assert [name for name, _, _ in seen] == [name for name, _, _ in bench.GPU_STEPS]
    assert clock["now"] <= 9 * 60  # the whole check fits in 9 minutes (one device call of at most 10)
    assert rows == [("GPU tests (pytest -m gpu)", "4 passed in 80.1s"), ("attention: cuDNN", "1.42 ms"),
                    ("train.py (80-s budget): val_bpb", "0.57"), ("startup step", "exit timeout: see startup.log"),
                    ("profile step", "exit 1: see profile.log")]
    table = (tmp_path / "gpu" / "table.md").read_text()
    assert table == capsys.readouterr().out and table.count("\n") == 2 + len(rows)
    assert sorted(os.listdir(tmp_path / "gpu")) == sorted([f"{n}.log" for n, _, _ in bench.GPU_STEPS] + ["table.md"])


def test_the_gpu_check_stops_within_its_minutes(tmp_path, monkeypatch, capsys):
    clock = {"now": 0.0}

    def slow_step(args, log, timeout):  # every step runs into its timeout
        clock["now"] += timeout
        return "timeout", ""

    monkeypatch.setattr(bench, "run_step", slow_step)
    monkeypatch.setattr(bench.time, "monotonic", lambda: clock["now"])
    rows = bench.bench_gpu(str(tmp_path), minutes=9)
    assert clock["now"] <= 9 * 60 and rows[-1] == ("profile step", "not run: the check's 9 minutes are spent")


def test_the_gpu_checks_steps_name_real_commands():
    for name, args, _ in bench.GPU_STEPS:
        if args[0] == "autoresearch.bench":
            assert args[1] in ("attention", "profile", "run", "startup"), name
        else:
            assert args[0] == "pytest" and os.path.isfile(os.path.join(ROOT, args[-1]))


def test_the_start_up_benchmark_edits_lines_train_py_has():
    source = open(os.path.join(ROOT, "train.py")).read()
    for label, old, new in bench.EDITS:
        assert old is None or (source.count(old) == 1 and old != new), label


def test_the_attention_benchmark_says_it_needs_a_gpu_on_a_cpu(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AssertionError, match="needs a CUDA GPU"):
        bench.bench_attention()


@pytest.mark.parametrize("what", ["kernels", "CPU ops"])
def test_the_profile_benchmark_reads_the_runs_profile_line(what, monkeypatch):
    asked = {}
    out = (f"step 00015 ...\n{what} (profiled step 15): matmul (GEMM) 41.0 ms (62%); attention: FlexAttention 9.5 ms "
           "(14%)\n")
    monkeypatch.setattr(bench, "run_train", lambda **kw: asked.update(kw) or (0, {}, out))
    assert bench.bench_profile() == [("profile: matmul (GEMM)", "41.0 ms (62%)"),
                                     ("profile: attention: FlexAttention", "9.5 ms (14%)")]
    assert asked["profile_step"] == 15
    monkeypatch.setattr(bench, "run_train", lambda **kw: (1, {}, "error: out of memory"))
    assert bench.bench_profile()[0][1].startswith("no profile (exit 1")


@pytest.mark.parametrize("warm", [False, True])
def test_the_start_up_benchmark_runs_each_edit_of_train_py(warm, monkeypatch):
    sources = []

    def fake_run(source=None, budget=None, log=None, timeout=None):  # (the run itself needs a GPU to mean anything)
        sources.append(source)
        return 0, {"startup_seconds": "1.0", "eval_seconds": "0.5", "total_seconds": "9", "tok_per_sec": "1",
                   "num_steps": "3"}, ""

    monkeypatch.setattr(bench, "run_train", fake_run)
    rows = bench.bench_startup(10, warm=warm)
    original = open(os.path.join(ROOT, "train.py")).read()
    labels = [label for label, _, _ in bench.EDITS]
    assert [r[0] for r in rows] == [f"start-up: {label}" for label in ([] if warm else ["train.py as it is"]) + labels]
    assert sources[:2 - warm] == [original] * (2 - warm)  # as it is (unless warm), and again
    assert all(s != original for s in sources[2 - warm:]) and len(set(sources[2 - warm:])) == len(labels) - 1


def test_the_benchmark_corpus_is_laid_out_as_the_hubs_and_named_by_its_digest(tmp_path):
    import hashlib
    import pyarrow.parquet as pq
    root = tmp_path / "site"
    (root / "pkg" / "sub").mkdir(parents=True)
    paragraph = "def f():\n    return 1  # " + "x" * 300
    (root / "pkg" / "a.py").write_text("\n\n".join([paragraph] * 40))  # ~13,000 chars: three documents
    (root / "pkg" / "sub" / "b.md").write_text("# notes\n\n" + "words " * 100)
    (root / "pkg" / "copy.py").write_text("\n\n".join([paragraph] * 40))  # an exact duplicate: dropped
    (root / "pkg" / "short.txt").write_text("too short")
    (root / "pkg" / "data.bin").write_text("not text " * 100)
    out = tmp_path / "data"
    docs, size, digest = bench.write_corpus(str(out), [str(root)])
    assert sorted(os.listdir(out)) == ["shard_00000.parquet", "shard_06542.parquet"]
    train = pq.read_table(out / "shard_00000.parquet").column("text").to_pylist()
    val = pq.read_table(out / "shard_06542.parquet").column("text").to_pylist()
    assert docs == len(train) + len(val) == 4 and len(val) == 1  # the validation shard: at most a fifth
    assert all(len(d) <= bench.CORPUS_DOC_CHARS for d in train + val)
    assert size == sum(len(d.encode()) for d in train + val)
    shuffled = train + val[::-1]  # (validation takes the shuffle's last documents)
    assert digest == hashlib.sha256(b"".join(hashlib.sha1(d.encode()).digest() for d in shuffled)).hexdigest()[:16]
    assert bench.write_corpus(str(tmp_path / "again"), [str(root)])[2] == digest  # the same text, the same corpus
