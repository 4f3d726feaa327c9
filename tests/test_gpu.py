"""The GPU set: what only CUDA can show. Skipped where torch finds no CUDA GPU; run them alone with
`uv run pytest -m gpu`. The rest of the suite pins the CPU (AUTORESEARCH_DEVICE=cpu in conftest).

bf16 computations that should agree never agree bitwise when computed in another order (a fused kernel keeps
fp32 where eager code rounds to bf16). So each comparison here measures both sides against an fp32 truth of the
same computation and asserts the side under test is about as close to it as the side it replaces: its error at
most ERROR_RATIO times the other's, plus an absolute floor of a few bf16 roundings of the whole tensor's norm
(U = 2**-8 is bf16's unit roundoff) for tensors, such as near-zero gradients, that bf16 cannot resolve at all. A
real bug (a wrong mask, a missing term, a wrong moment) moves a tensor by a sizable fraction of its norm and fails.
"""
import re

import pytest
import torch

import train
from autoresearch import flops, hardware, runtime
from conftest import run_script

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch finds none here)")]

CUDA = torch.device("cuda")
U = 2.0 ** -8  # bf16's unit roundoff
ERROR_RATIO = 3.0  # the side under test may be this many times further from the fp32 truth than the other side
FLOOR_ROUNDINGS = 4  # ... plus this many roundings of the tensor's norm (tensors bf16 cannot resolve)


def tiny_model(pattern="SL", T=256, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return train.build_model(train.GPTConfig(sequence_len=T, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2,
                                             n_embd=256, window_pattern=pattern, low_dtype=dtype), CUDA)


def error(a, truth):
    return (a.double() - truth.double()).norm().item()


def assert_as_close(tested, other, truth, name):
    """tested is as close to truth as other is, within ERROR_RATIO, plus FLOOR_ROUNDINGS roundings of its norm."""
    bound = ERROR_RATIO * error(other, truth) + FLOOR_ROUNDINGS * U * truth.double().norm().item()
    assert error(tested, truth) <= bound, (name, error(tested, truth), error(other, truth), bound)


def grads(model, x, precise):
    """(loss, {name: grad}) of one forward and backward: bf16 autocast, or fp32 without it (the truth)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not precise):
        loss = model(x, x)
    loss.backward()
    return loss.detach().float(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


def test_compiled_model_matches_eager_forward_and_backward():
    """The compiled regions (hardware.compile_model) against the eager model, both in bf16 autocast, each measured
    against the same model in fp32 (tables in fp32 too): loss and every gradient."""
    eager, compiled_copy, truth_model = tiny_model(), tiny_model(), tiny_model(dtype=torch.float32)
    compiled_copy.load_state_dict(eager.state_dict())
    truth_model.load_state_dict({k: v.float() for k, v in eager.state_dict().items()})
    compiled = hardware.compile_model(compiled_copy, CUDA)
    x = torch.randint(0, 512, (4, 256), device=CUDA)
    loss_truth, g_truth = grads(truth_model, x, precise=True)
    loss_eager, g_eager = grads(eager, x, precise=False)
    loss_compiled, g_compiled = grads(compiled, x, precise=False)
    assert_as_close(loss_compiled, loss_eager, loss_truth, "loss")
    assert g_compiled.keys() == g_eager.keys() == g_truth.keys()
    for name in g_truth:
        assert_as_close(g_compiled[name], g_eager[name], g_truth[name], name)


def attention_run(base, fn, dtype):
    """[output, dq, dk, dv] of fn(q, k, v) on copies of the `base` tensors in dtype (a sum of squares as loss)."""
    q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in base)
    out = fn(q, k, v)
    return [out.detach()] + list(torch.autograd.grad(out.float().square().sum(), (q, k, v)))


def assert_window_as_close(fn, base, window):
    """fn (bf16) is as close to SDPA under the explicit window mask in fp32 as that SDPA in bf16 is: output and
    the gradients of q, k, v."""
    explicit = lambda q, k, v: hardware.attention(q, k, v, window, None)  # noqa: E731
    tested, other = attention_run(base, fn, torch.bfloat16), attention_run(base, explicit, torch.bfloat16)
    truth = attention_run(base, explicit, torch.float32)
    for name, a, b, t in zip(("out", "dq", "dk", "dv"), tested, other, truth):
        assert_as_close(a, b, t, name)


def test_flex_attention_matches_sdpa_with_an_explicit_mask():
    """FlexAttention's sliding window (compiled, bf16) against SDPA with the boolean window mask written out."""
    torch.manual_seed(0)
    T, window = 512, 128
    base = [torch.randn(2, T, 4, 64, device=CUDA) for _ in range(3)]
    mask = hardware.block_masks(T, (window, T), CUDA)[window]
    flex = torch.compile(lambda q, k, v: hardware.attention(q, k, v, window, mask), dynamic=False)
    assert_window_as_close(flex, base, window)


def test_compiled_optimizer_matches_eager():
    """The compiled MuonAdamW (fused steps, as a run uses it) against its eager steps, both with the bf16 tables and
    bf16 Polar Express, measured against the eager steps in fp32 (low=fp32, fp32 tables): every parameter after
    three steps of the same gradients."""
    models = [tiny_model(pattern="L"), tiny_model(pattern="L"), tiny_model(pattern="L", dtype=torch.float32)]
    models[1].load_state_dict(models[0].state_dict())
    models[2].load_state_dict({k: v.float() for k, v in models[0].state_dict().items()})
    optimizers = [m.setup_optimizer(0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95)) for m in models]
    for optimizer in optimizers[1:]:
        optimizer._adamw, optimizer._muon = train.adamw_step, train.muon_step  # eager steps
    assert optimizers[2].low == torch.float32
    torch.manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, device=CUDA) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.to(p.dtype)
            optimizer.step()
    for (name, tested), other, truth in zip(models[0].named_parameters(), models[1].parameters(),
                                            models[2].parameters()):
        assert_as_close(tested.detach(), other.detach(), truth.detach(), name)


def test_tiny_training_run_on_cuda_names_its_attention_kernels(prepared):
    script = ("import train; from autoresearch import bench; train.DEPTH = 2; train.DEVICE_BATCH_SIZE = 8; "
              "train.TOTAL_BATCH_SIZE = 8 * 128; train.WINDOW_PATTERN = 'SL'\n"  # one windowed layer, one full
              "with bench.profiling(1):\n    train.main()")
    proc = run_script(["-c", script], env={"AUTORESEARCH_DEVICE": "cuda", "AUTORESEARCH_BUDGET": "time",
                                           "AUTORESEARCH_TIME_BUDGET": "20"})  # (the small preset counts FLOPs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = re.search(r"^attention \(profiled step 1\): (.*)$", proc.stdout, flags=re.M).group(1)
    assert "cuDNN SDPA" in line and "FlexAttention" in line, line  # the full layer's, the windowed layer's
    kernels = re.search(r"^kernels \(profiled step 1\): (.*)$", proc.stdout, flags=re.M).group(1)
    assert "matmul" in kernels and "attention" in kernels, kernels  # where step 1's GPU time went, by kind
    values = dict(re.findall(r"^(\w+): +(\S.*)$", proc.stdout.split("\n---\n")[1], flags=re.M))
    assert values["device"] == "cuda" and float(values["peak_vram_mb"]) > 0
    assert int(values["num_steps"]) > runtime.CUDA_WARMUP_STEPS and float(values["val_bpb"]) > 0


def test_the_flop_count_of_a_compiled_windowed_step_on_cuda_is_the_cpus(monkeypatch):
    """Under the compute budget the CUDA step runs compiled and the counter sees the library calls of its compiled
    code (matmuls, SDPA): the windowed layers on SDPA with the explicit mask count as on the CPU, every key of the
    window's T x T, so a budget means the same steps on either device."""
    monkeypatch.setattr(hardware.constants, "BUDGET", "flops")
    counts = {}
    for device in (torch.device("cpu"), CUDA):
        torch.manual_seed(0)
        model = train.build_model(train.GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2,
                                                  n_embd=256, window_pattern="SL", low_dtype=torch.float32), device)
        model = hardware.compile_model(model, device)
        x = torch.randint(0, 512, (2, 256), device=device)
        for _ in range(2):  # (the first call compiles; the count is the second's)
            with flops.FlopCount() as counter:
                model(x, x).backward()
        counts[device.type] = counter.total
    assert counts["cpu"] > 0 and counts["cuda"] == counts["cpu"], counts
