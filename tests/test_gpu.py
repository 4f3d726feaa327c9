"""The GPU set: what only CUDA can show. Skipped where torch finds no CUDA GPU; run them alone with
`uv run pytest -m gpu`. The rest of the suite pins the CPU (AUTORESEARCH_DEVICE=cpu in conftest)."""
import re

import pytest
import torch

from autoresearch import hardware, runtime
import train
from conftest import run_script

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch finds none here)")]

CUDA = torch.device("cuda")


def tiny_model(pattern="SL", T=256):
    torch.manual_seed(0)
    return train.build_model(train.GPTConfig(sequence_len=T, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2,
                                             n_embd=256, window_pattern=pattern), CUDA)


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def test_compiled_model_matches_eager_forward_and_backward():
    eager = tiny_model()
    compiled_copy = tiny_model()
    compiled_copy.load_state_dict(eager.state_dict())
    compiled = hardware.compile_model(compiled_copy, CUDA)
    x = torch.randint(0, 512, (4, 256), device=CUDA)
    with hardware.autocast(CUDA):
        loss_eager, loss_compiled = eager(x, x), compiled(x, x)
    loss_eager.backward()
    loss_compiled.backward()
    assert loss_compiled.item() == pytest.approx(loss_eager.item(), rel=1e-2)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_copy.parameters()):
        if p_eager.grad is not None and p_eager.grad.norm() > 0:
            assert relative_error(p_compiled.grad, p_eager.grad) < 0.05, name  # bf16 rounding in other places


def test_flex_attention_matches_sdpa_with_an_explicit_mask():
    torch.manual_seed(0)
    T, window = 512, 128
    q, k, v = (torch.randn(2, T, 4, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = train.block_masks(T, (window, T), CUDA)[window]
    flex = torch.compile(train.attention, dynamic=False)
    out_flex = flex(q, k, v, window, mask)
    grads_flex = torch.autograd.grad(out_flex.float().square().sum(), (q, k, v))
    out_ref = train.attention(q, k, v, window, None)  # SDPA with the boolean window mask written out
    grads_ref = torch.autograd.grad(out_ref.float().square().sum(), (q, k, v))
    assert relative_error(out_flex, out_ref) < 1e-2
    for g_flex, g_ref in zip(grads_flex, grads_ref):
        assert relative_error(g_flex, g_ref) < 2e-2


def test_compiled_optimizer_matches_eager():
    models = [tiny_model(pattern="L"), tiny_model(pattern="L")]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [m.setup_optimizer(0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95)) for m in models]
    optimizers[1]._adamw, optimizers[1]._muon = train.adamw_step, train.muon_step  # eager steps
    torch.manual_seed(1)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, optimizers):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert relative_error(a, b) < 1e-2, name


def test_tiny_training_run_on_cuda_names_its_attention_kernels(prepared):
    script = ("import train; train.DEPTH = 2; train.DEVICE_BATCH_SIZE = 8; train.TOTAL_BATCH_SIZE = 8 * 128; "
              "train.WINDOW_PATTERN = 'SL'; train.main()")  # one windowed layer (Flex), one full (cuDNN)
    proc = run_script(["-c", script], env={"AUTORESEARCH_DEVICE": "cuda", "AUTORESEARCH_TIME_BUDGET": "20"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = re.search(r"^attention \(profiled step 1\): (.*)$", proc.stdout, flags=re.M).group(1)
    assert "cuDNN SDPA" in line and "FlexAttention" in line, line
    values = dict(re.findall(r"^(\w+): +(\S.*)$", proc.stdout.split("\n---\n")[1], flags=re.M))
    assert values["device"] == "cuda" and float(values["peak_vram_mb"]) > 0
    assert int(values["num_steps"]) > runtime.CUDA_WARMUP_STEPS and float(values["val_bpb"]) > 0
