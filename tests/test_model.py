"""train.py's model: the baseline's size and FLOPs by hand from the reference's description, shapes, attention
paths, learning."""
import math

import pytest
import torch
import torch.nn.functional as F

from autoresearch import hardware
import train


def baseline():
    return train.GPT(train.GPTConfig(sequence_len=2048, vocab_size=8192, n_layer=8, n_head=4, n_kv_head=4,
                                     n_embd=512, window_pattern="SSSL"), "meta")


def test_baseline_parameter_count_by_hand():
    V, C, L, F4 = 8192, 512, 8, 4 * 512
    ve_layers = [i for i in range(L) if i % 2 == (L - 1) % 2]
    assert ve_layers == [1, 3, 5, 7]
    wte = lm_head = V * C
    value_embeds = len(ve_layers) * V * C
    per_layer = 4 * C * C + 2 * C * F4  # q, k, v, proj; fc and proj of the MLP
    gates = len(ve_layers) * 32 * 4
    scalars = 2 * L
    expected = wte + lm_head + value_embeds + L * per_layer + gates + scalars
    assert expected == 50_332_176
    counts = baseline().param_counts()
    assert counts == dict(wte=wte, value_embeds=value_embeds, lm_head=lm_head, matrices=L * per_layer + gates,
                          scalars=scalars, total=expected)


def test_baseline_flops_per_token():
    model = baseline()
    assert model.windows == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]
    dense = 50_332_176 - 8192 * 512 - 4 * 8192 * 512 - 16
    attn = 12 * 4 * 128 * (6 * 1024 + 2 * 2048)
    assert model.estimate_flops() == 6 * dense + attn == 239_078_400


def test_window_pattern_last_layer_is_always_full():
    cfg = train.GPTConfig(sequence_len=64, n_layer=3, window_pattern="S")
    assert train.window_sizes(cfg) == [32, 32, 64]


def tiny(T=32, V=96, layers=2, pattern="SL", kv=2):
    torch.manual_seed(0)
    return train.build_model(train.GPTConfig(sequence_len=T, vocab_size=V, n_layer=layers, n_head=2, n_kv_head=kv,
                                             n_embd=64, window_pattern=pattern,
                                             low_dtype=torch.float32), torch.device("cpu"))


def test_forward_shapes_and_init():
    model = tiny()
    x = torch.randint(0, 96, (3, 32))
    with hardware.autocast(torch.device("cpu")):  # how train.py and the eval call the model (fp32 on the CPU)
        logits, loss, per_token = model(x), model(x, x), model(x, x, reduction="none")
    assert logits.shape == (3, 32, 96) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15  # soft cap
    assert loss.shape == () and per_token.shape == (3, 32)
    # the tables the reference keeps in bf16 are bf16 on CUDA, fp32 where bf16 is slow (the CPU)
    assert hardware.low_precision(torch.device("cuda")) == torch.bfloat16
    low = hardware.low_precision(torch.device("cpu"))
    assert model.transformer.wte.weight.dtype == low and model.cos.dtype == low
    assert all(ve.weight.dtype == low for ve in model.value_embeds.values())
    assert model.transformer.h[0].attn.ve_gate is None and model.transformer.h[1].attn.ve_gate is not None
    # zero-initialized output projections: at init every block is the identity on the residual stream
    assert all(b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0
               for b in model.transformer.h)
    # a near-zero lm_head: the initial loss is close to ln(V)
    assert loss.item() == pytest.approx(math.log(96), abs=0.05)


def reference_attention(q, k, v, window):
    """Attention written out with an explicit score matrix: [B, T, H, D] in and out."""
    T, rep = q.size(1), q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.size(-1))
    i = torch.arange(T)
    allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] <= window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [3, 8, 32])
def test_attention_matches_the_explicit_formula(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 32, 4, 16), torch.randn(2, 32, 2, 16), torch.randn(2, 32, 2, 16)
    out = hardware.attention(q, k, v, window, block_mask=None)
    assert torch.allclose(out, reference_attention(q, k, v, window), atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_block_mask_is_the_same_window():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    mask = create_block_mask(hardware.sliding_window_mask(9), None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    out = flex_attention(q, k, v, block_mask=mask)
    ref = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 9).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)


def test_loss_falls_on_real_text(tokenizer):
    from prepare import make_dataloader
    torch.manual_seed(0)
    model = train.GPT(train.GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=1,
                                      n_kv_head=1, n_embd=128, window_pattern="L", low_dtype=torch.float32), "cpu")
    model.init_weights()
    opt = model.setup_optimizer(0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95))
    loader = make_dataloader(tokenizer, 8, 64, "train", device="cpu")
    losses = []
    for step in range(25):
        x, y, _ = next(loader)
        loss = model(x, y)
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.5e12), ("NVIDIA GH200 480GB", 989.5e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362.1e12), ("NVIDIA L4", 121e12), ("NVIDIA A10G", 70e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
    ("NVIDIA B200", 2250e12), ("Some Future GPU", 0.0),
])
def test_peak_flops_table(name, flops):
    assert hardware.lookup_peak_flops(name) == flops


def test_mfu_is_not_computed_off_cuda():
    flops, name, note = hardware.peak_flops(torch.device("cpu"))
    assert flops == 0.0 and name == "cpu" and "not computed" in note


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("T", [64, 160])
def test_block_masks_follow_the_sequence_length_actually_seen(T):
    from torch.nn.attention.flex_attention import flex_attention
    windows = (32, 32, 128)  # a model made for 128 tokens, called with 64 or 160
    masks = hardware.block_masks(T, windows, torch.device("cpu"))
    assert sorted(masks) == sorted({w for w in windows if w < T})  # a window >= T is plain causal attention
    assert hardware.block_masks(T, windows, torch.device("cpu")) is masks  # built once per (T, windows, device)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, T, 16) for _ in range(3))
    for w, mask in masks.items():
        assert mask.seq_lengths == (T, T)
        ref = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), w).transpose(1, 2)
        assert torch.allclose(flex_attention(q, k, v, block_mask=mask), ref, atol=1e-5)


def test_a_shorter_sequence_than_the_model_was_made_for_runs():
    model = tiny()
    assert model(torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16))).isfinite()
    with pytest.raises(AssertionError, match="sequence length"):
        model(torch.randint(0, 96, (1, model.config.sequence_len + 1)))


GB = 1e9


@pytest.mark.parametrize("budget_gb, expected", [(80 * 0.9, 128), (24 * 0.9, 32), (12 * 0.9, 16), (0.5, 0)])
def test_the_device_batch_is_fitted_to_the_memory_present(budget_gb, expected):
    # the baseline's estimate: ~48 GB at 128 rows (the reference measured 45,060 MiB on an H100)
    fixed, per_row = hardware.estimate_memory(50_332_176, 8, 512, 8192, 2048)
    assert 44e9 < fixed + 128 * per_row < 52e9
    rows = hardware.largest_fitting_rows(128, 2 ** 19 // 2048, fixed, per_row, budget_gb * GB)
    assert rows == expected
    if rows:
        assert (2 ** 19 // 2048) % rows == 0 and fixed + rows * per_row <= budget_gb * GB


def test_the_fitted_batch_keeps_dividing_the_total_batch():
    # 96 rows requested of a 192-row step, room for 40: 32 (a power of two that divides 192)
    assert hardware.largest_fitting_rows(96, 192, 0, 1, 40) == 32
    assert hardware.largest_fitting_rows(96, 192, 0, 1, 96) == 96  # what was asked, when it fits


def test_no_triton_means_eager_with_a_note(monkeypatch, capsys):
    cuda = torch.device("cuda")  # (only its type is looked at: no GPU needed)
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)
    assert not hardware.can_compile(cuda)
    model = torch.nn.Linear(2, 2)
    assert hardware.compile_model(model, cuda) is model
    assert "Triton is not installed" in capsys.readouterr().out
    assert not hardware.can_compile(torch.device("cpu"))


def test_flexattention_masks_only_where_flexattention_runs(monkeypatch):
    """Block masks on CUDA under the time budget; none off CUDA or under the compute budget, whose counter cannot
    see FlexAttention's compiled kernel (the windowed layers then take SDPA with the explicit mask)."""
    monkeypatch.setattr(hardware.constants, "BUDGET", "time")
    assert hardware.attention_masks(64, (32, 64), torch.device("cpu")) == {}
    monkeypatch.setattr(hardware, "block_masks", lambda T, windows, device: {w: "mask" for w in windows if w < T})
    assert hardware.attention_masks(64, [32, 64], torch.device("cuda")) == {32: "mask"}
    monkeypatch.setattr(hardware.constants, "BUDGET", "flops")
    assert hardware.attention_masks(64, [32, 64], torch.device("cuda")) == {}


def test_the_flop_counter_counts_attention_kernels_from_their_shapes():
    """SDPA on the CPU (which torch's own counter counts 0) and FlexAttention (a higher-order op, counted once from
    its shapes, not through its inner matmuls): the scores and the weighted sum, 2 x B x H x T x T x (D + Dv)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from autoresearch import flops
    B, H, T, D = 2, 2, 64, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    expected = 2 * B * H * T * T * (D + D)
    with flops.FlopCount() as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert counter.total == expected
    mask = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j <= 8), None, None, T, T, device="cpu")
    with flops.FlopCount() as counter:
        flex_attention(q, k, v, block_mask=mask)
    assert counter.total == expected
    with flops.FlopCount() as counter:  # the backward: the scores again, then 4 products
        q.requires_grad_(True)
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert counter.total == expected + 2 * B * H * T * T * (3 * D + 2 * D)
