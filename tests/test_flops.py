"""The compute budget's counter (autoresearch/flops.py): every op accounted for, in every thread, compiled code left
compiled; and the run's bookkeeping charging work before the loop, between steps and in threads. FLOPs by hand."""
import threading

import pytest
import torch
import torch.nn.functional as F

from autoresearch import flops, runtime


def counted(fn):
    """(FLOPs, problems) of fn() run under a fresh counting."""
    with flops.counting() as meter:
        fn()
    return meter.total, meter.problems()


@pytest.mark.parametrize("what, fn, expected", [
    ("mv", lambda: torch.mv(torch.randn(6, 5), torch.randn(5)), 2 * 6 * 5),
    ("dot", lambda: torch.dot(torch.randn(7), torch.randn(7)), 2 * 7),
    ("bilinear", lambda: F.bilinear(torch.randn(3, 4), torch.randn(3, 5), torch.randn(6, 4, 5)), 2 * 3 * 6 * 4 * 5),
    ("kron", lambda: torch.kron(torch.randn(3, 4), torch.randn(5, 6)), 3 * 4 * 5 * 6),  # one product per element
    ("outer", lambda: torch.outer(torch.randn(9), torch.randn(7)), 9 * 7),
    ("a matmul as a broadcast product", lambda: (torch.randn(4, 8, 1) * torch.randn(1, 8, 3)).sum(1), 4 * 8 * 3),
    ("the same through expand", lambda: (torch.randn(4, 8, 1).expand(4, 8, 3) * torch.randn(8, 3).expand(4, 8, 3)),
     4 * 8 * 3),
    ("int8 matmul", lambda: torch._int_mm(torch.ones(32, 16, dtype=torch.int8), torch.ones(16, 24, dtype=torch.int8)),
     2 * 32 * 16 * 24),
    ("sparse matmul", lambda: torch.sparse.mm(torch.eye(8).to_sparse(), torch.randn(8, 3)), 2 * 8 * 3),
    ("sparse @", lambda: torch.eye(8).to_sparse() @ torch.randn(8, 3), 2 * 8 * 3),
    ("rfft", lambda: torch.fft.rfft(torch.randn(4, 16)), 5 * 4 * 16 * 4),
    ("cholesky", lambda: torch.linalg.cholesky(torch.eye(6) * 2), 6 ** 3 / 3),
    ("inverse", lambda: torch.linalg.inv(torch.eye(6) * 2), 2 * 6 ** 3),
])
def test_common_ops_without_a_formula_in_torch_are_counted(what, fn, expected):
    total, problems = counted(fn)
    assert total == pytest.approx(expected) and problems == [], what


def test_recurrent_layers_count_each_token_against_every_weight_matrix():
    B, T, n_in, hidden = 2, 5, 8, 16
    lstm, gru = torch.nn.LSTM(n_in, hidden, batch_first=True), torch.nn.GRU(n_in, hidden, batch_first=True)
    x = torch.randn(B, T, n_in)
    total, problems = counted(lambda: lstm(x))
    assert total == 2 * B * T * 4 * hidden * (n_in + hidden) and problems == []
    total, problems = counted(lambda: lstm(x)[0].sum().backward())  # backward: the input's and weights' gradients
    assert total == 3 * 2 * B * T * 4 * hidden * (n_in + hidden) and problems == []
    total, problems = counted(lambda: gru(x))
    assert total >= 2 * B * T * 3 * hidden * (n_in + hidden) and problems == []


def test_linear_algebra_is_counted_or_said():
    a = torch.randn(6, 6)
    s = a @ a.T + 6 * torch.eye(6)
    for fn in (torch.linalg.qr, torch.linalg.svd, torch.linalg.eigh, torch.linalg.det, torch.linalg.slogdet,
               torch.linalg.eig, torch.linalg.matrix_exp, torch.linalg.pinv, lambda m: torch.linalg.solve(m, a),
               lambda m: torch.linalg.lstsq(m, a), lambda m: torch.linalg.solve_triangular(m, a, upper=True)):
        total, problems = counted(lambda: fn(s))
        assert total > 6 ** 2 and problems == [], fn


def test_an_op_that_computes_without_a_formula_makes_the_run_compare_with_none():
    total, problems = counted(lambda: torch.cdist(torch.randn(5, 3), torch.randn(4, 3)))
    assert len(problems) == 1 and "no formula for" in problems[0] and "_cdist_forward" in problems[0]


def test_work_outside_torch_is_neither_counted_nor_a_problem():
    """docs/RUN.md: the counter sees torch's ops only; a tensor read by numpy (a logged statistic) costs nothing."""
    import numpy as np
    total, problems = counted(lambda: np.percentile(torch.randn(64, 64).numpy() @ np.ones((64, 8)), 99))
    assert total == 0 and problems == []


def test_elementwise_work_views_and_reductions_cost_nothing_and_are_no_problem():
    x = torch.randn(64, 32, requires_grad=True)
    total, problems = counted(lambda: (F.rms_norm(x, (32,)).relu().square() * 2 + x.T.T).softmax(-1).sum().backward())
    assert total == 0 and problems == []
    made = [torch.zeros(4), torch.arange(8.0), torch.eye(3), torch.randn(2, 2), torch.empty(3)]  # from no tensor
    total, problems = counted(lambda: [torch._foreach_lerp_(made, made, 0.5), torch._foreach_sigmoid(made),
                                       torch.full((2,), 3.0), torch.linspace(0, 1, 5)])
    assert total == 0 and problems == []


def test_work_in_a_thread_started_while_counting_is_counted():
    def work():
        torch.randn(8, 16) @ torch.randn(16, 4)

    def run():
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    total, problems = counted(run)
    assert total == 2 * 8 * 16 * 4 and problems == []
    assert threading.getprofile() is None  # (the hook is gone)


def test_compiled_code_stays_compiled_and_its_library_calls_count():
    """The counter does not make torch.compile fall back to eager (whose memory a compiled step never needs): the
    compiled graph runs, and its matmuls count, forward and backward."""
    from torch._dynamo.testing import CompileCounterWithBackend
    backend = CompileCounterWithBackend("aot_eager")
    layer = torch.nn.Linear(64, 32, bias=False)
    compiled = torch.compile(layer, backend=backend)
    x = torch.randn(8, 64, requires_grad=True)
    total, problems = counted(lambda: [compiled(x).sum().backward() for _ in range(2)])
    assert backend.frame_count == 1 and total == 2 * 3 * 2 * 8 * 64 * 32 and problems == []


def test_evaluation_counts_nothing():
    with flops.counting() as meter:
        torch.randn(4, 4) @ torch.randn(4, 4)
        flops.stop()
        torch.randn(40, 40) @ torch.randn(40, 40)
    assert meter.total == 2 * 4 * 4 * 4


class Loop:
    """A toy training loop through runtime.Run on the CPU under the compute budget: a [16, 32] x [32, 32] matmul
    per step, forward and backward (2 products: the input needs no gradient)."""
    STEP = 2 * 2 * 16 * 32 * 32

    def __init__(self, monkeypatch, budget_steps):
        from conftest import set_budget
        set_budget(monkeypatch, "flops", budget_steps * self.STEP)
        self.w = torch.randn(32, 32, requires_grad=True)
        self.run = runtime.Run(torch.device("cpu"), 1.0, 16, 0.0, {})

    def step(self, extra=None):
        run = self.run
        run.begin_step()
        loss = (torch.randn(16, 32) @ self.w).square().mean()
        loss.backward()
        if extra is not None:
            extra()
        run.end_step(loss.detach(), 1.0, 1)


def toy_matmul():
    w = torch.randn(32, 32, requires_grad=True)
    (torch.randn(16, 32) @ w).sum().backward()


def test_work_before_the_loop_and_between_steps_counts_against_the_budget(monkeypatch, capsys, in_a_run):
    for _ in range(3):  # "calibration" before the loop (before the Run, too): three steps' worth
        toy_matmul()
    loop = Loop(monkeypatch, budget_steps=6)
    steps = 0
    while not loop.run.done:
        loop.step()
        toy_matmul()  # between steps: charged to the next one
        steps += 1
    assert steps == 2 and loop.run._counted_flops == 6 * Loop.STEP  # 3 before, then 2 steps and 1 between
    assert "were computed before the first step" in capsys.readouterr().out


def test_a_thread_computing_during_the_steps_is_charged(monkeypatch, in_a_run):
    loop = Loop(monkeypatch, budget_steps=4)
    steps = 0
    while not loop.run.done:
        thread = threading.Thread(target=toy_matmul)  # extra micro-batches in a thread, during each step
        loop.step(extra=lambda: (thread.start(), thread.join()))
        steps += 1
    assert steps == 2 and loop.run._counted_flops == 4 * Loop.STEP


def test_where_the_model_compiles_every_flop_counts_but_the_compiling_steps_are_not_speed(monkeypatch, in_a_run):
    """The CUDA branch of the step accounting, on the CPU: under the compute budget on a device that compiles, step
    0 is counted like every other (no eager step: its memory would be the uncompiled model's), and the first
    CUDA_WARMUP_STEPS steps (compiling) are start-up, not training time or speed."""
    monkeypatch.setattr(runtime, "can_compile", lambda device: True)
    steps = runtime.CUDA_WARMUP_STEPS + 2
    loop = Loop(monkeypatch, budget_steps=steps)
    import time
    ends = []
    while not loop.run.done:
        loop.step()
        ends.append(time.perf_counter())
    run = loop.run
    assert len(ends) == steps and run._counted_flops == steps * Loop.STEP and run.warmup == 0
    assert run.startup_seconds > 0 and run._counted_seconds < ends[-1] - ends[runtime.CUDA_WARMUP_STEPS - 2]
