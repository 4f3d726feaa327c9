"""Regional compilation (hardware.compile_model), checked on the CPU with dynamo alone: a counting backend sees
every graph dynamo makes, and no code is generated. What a CPU can show: the number of compiled graphs does not
grow with DEPTH, and nothing recompiles across steps, learning-rate changes or the switch to evaluation."""
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from autoresearch import hardware
import train

CPU = torch.device("cpu")


def compiled_tiny(depth, pattern):
    torch._dynamo.reset()
    counter = CompileCounter()
    torch.manual_seed(0)
    model = train.build_model(train.GPTConfig(sequence_len=64, vocab_size=128, n_layer=depth, n_head=2, n_kv_head=2,
                                              n_embd=64, window_pattern=pattern, low_dtype=torch.float32), CPU)
    return hardware.compile_regions(model, backend=counter), counter


def train_steps(model, steps, start=0):
    optimizer = model.setup_optimizer(0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95))
    torch.manual_seed(1)
    for step in range(start, start + steps):
        x = torch.randint(0, 128, (2, 64))
        model(x, x).backward()
        for group in optimizer.param_groups:  # a new learning rate every step, as the schedules do
            group["lr"] = group["initial_lr"] * (1 - step / 10)
        optimizer.step()
        model.zero_grad(set_to_none=True)


def evaluate(model):
    with torch.no_grad():
        x = torch.randint(0, 128, (2, 64))
        return model(x, x, reduction="none")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("pattern, depths", [("SL", (2, 4)), ("SSSL", (4, 8))])
def test_the_number_of_graphs_does_not_grow_with_depth(pattern, depths):
    counts = []
    for depth in depths:
        model, counter = compiled_tiny(depth, pattern)
        train_steps(model, 2)
        evaluate(model)
        counts.append(counter.frame_count)
    assert counts[0] == counts[1] > 0, counts


def test_nothing_recompiles_across_steps_learning_rates_and_evaluation():
    model, counter = compiled_tiny(4, "SSSL")
    train_steps(model, 1)
    after_first_step = counter.frame_count
    # the kinds of block (windowed or full, with or without a value embedding) and the head: 3 + 1 graphs
    assert after_first_step == 4
    train_steps(model, 3, start=1)
    assert counter.frame_count == after_first_step
    evaluate(model)  # no_grad and reduction='none': the evaluation's own graphs, once
    after_eval = counter.frame_count
    evaluate(model)
    train_steps(model, 1, start=4)
    assert counter.frame_count == after_eval


def test_regional_compilation_computes_what_eager_computes():
    torch.manual_seed(0)
    config = train.GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                             window_pattern="SL", low_dtype=torch.float32)
    eager, compiled = train.build_model(config, CPU), train.build_model(config, CPU)
    compiled.load_state_dict(eager.state_dict())
    hardware.compile_regions(compiled, backend="eager")
    x = torch.randint(0, 128, (2, 64))
    assert torch.allclose(eager(x, x), compiled(x, x))
    assert torch.equal(eager(x, x, reduction="none"), compiled(x, x, reduction="none"))


def test_matrices_outside_the_compiled_regions_are_said(capsys):
    model, _ = compiled_tiny(2, "SL")
    assert hardware.uncompiled_modules(model, model.compiled_regions()) == []  # the baseline: none
    assert "compiled_regions()" not in capsys.readouterr().out
    torch.manual_seed(0)
    model = train.build_model(train.GPTConfig(sequence_len=64, vocab_size=128, n_layer=2, n_head=2, n_kv_head=2,
                                              n_embd=64, window_pattern="SL", low_dtype=torch.float32), CPU)
    model.adapter = torch.nn.Linear(64, 64, bias=False)  # an agent's addition, outside every region
    hardware.compile_regions(model, backend=CompileCounter())
    assert "outside compiled_regions() run eagerly, slower: adapter (add them" in capsys.readouterr().out


def test_the_gpu_tests_name_only_what_exists():
    """The GPU tests run only where a GPU is lent, rarely: every name they take from the project's modules exists
    here, so they cannot fail on a renamed helper (an AttributeError would spend the GPU's time)."""
    import ast
    import importlib
    path = os.path.join(os.path.dirname(__file__), "test_gpu.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    modules = {"train": "train", "hardware": "autoresearch.hardware", "runtime": "autoresearch.runtime",
               "flops": "autoresearch.flops"}
    used = {(node.value.id, node.attr) for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules}
    assert len(used) >= 8
    missing = [f"{m}.{a}" for m, a in sorted(used) if not hasattr(importlib.import_module(modules[m]), a)]
    assert missing == []
