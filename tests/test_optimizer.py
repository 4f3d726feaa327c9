"""MuonAdamW: AdamW against torch.optim.AdamW, the reference's numerics against a plain implementation written
from SPEC.md, Polar Express, NorMuon, cautious weight decay; the schedules."""
import pytest
import torch

import train


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    torch.manual_seed(0)
    p_ours = torch.nn.Parameter(torch.randn(7, 5))
    p_ref = torch.nn.Parameter(p_ours.detach().clone())
    group = dict(kind="adamw", lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    ours = train.MuonAdamW([dict(params=[p_ours], **group)])
    ref = torch.optim.AdamW([p_ref], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay)
    for _ in range(6):
        g = torch.randn(7, 5)
        p_ours.grad, p_ref.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert torch.allclose(p_ours, p_ref, atol=1e-6, rtol=1e-5)


def test_polar_express_singular_values_near_one():
    torch.manual_seed(0)
    for shape in [(3, 64, 64), (2, 128, 32), (2, 32, 128)]:
        k = min(shape[1:])  # singular values spread over two decades on purpose
        u, _ = torch.linalg.qr(torch.randn(shape[0], shape[1], k))
        v, _ = torch.linalg.qr(torch.randn(shape[0], shape[2], k))
        g = u @ torch.diag_embed(torch.logspace(0, -2, k).expand(shape[0], k)) @ v.mT
        out = train.polar_express(g, 5, torch.bfloat16).float()
        assert out.shape == g.shape
        s = torch.linalg.svdvals(out)
        assert s.min() > 0.8 and s.max() < 1.2, (shape, s.min(), s.max())
        # it orthogonalizes: same singular vectors as the exact polar factor U V^T
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        assert torch.nn.functional.cosine_similarity(out.flatten(1), (u @ vh).flatten(1)).min() > 0.97


def muon_update(params, grads, weight_decay, lr=0.1):
    p = params.clone()
    momentum = torch.zeros_like(p)
    second = torch.zeros(p.size(0), p.size(1), 1) if p.size(-2) >= p.size(-1) else torch.zeros(p.size(0), 1, p.size(2))
    train.muon_step(p, grads.clone(), momentum, second, torch.tensor(lr), torch.tensor(0.9),
                    torch.tensor(weight_decay), torch.tensor(0.95), 5, torch.float32)
    return p


@pytest.mark.parametrize("shape", [(2, 16, 8), (2, 8, 16)])
def test_cautious_weight_decay_only_where_update_and_weight_agree(shape):
    torch.manual_seed(0)
    params, grads, lr, wd = torch.randn(shape), torch.randn(shape), 0.1, 0.5
    no_decay = muon_update(params, grads, 0.0, lr)
    decayed = muon_update(params, grads, wd, lr)
    update = (params - no_decay) / lr  # what Muon applied, before any decay
    agree = update * params > 0
    assert 0.2 < agree.float().mean() < 0.8  # both cases occur
    extra = no_decay - decayed
    assert torch.allclose(extra[agree], lr * wd * params[agree], atol=1e-6)
    assert torch.all(extra[~agree] == 0)


def test_normuon_keeps_the_update_norm():
    torch.manual_seed(0)
    params, grads = torch.randn(1, 32, 16), torch.randn(1, 32, 16)
    u = (params - muon_update(params, grads, 0.0, lr=1.0))
    orth = train.polar_express(grads.lerp(grads * 0.1, 0.9), 5, torch.float32)  # Nesterov of a fresh buffer
    assert u.norm().item() == pytest.approx(orth.norm().item(), rel=1e-3)


def test_muon_groups_stack_same_shaped_matrices():
    model = train.GPT(train.GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2,
                                      n_embd=64, low_dtype=torch.float32), "cpu")
    model.init_weights()
    opt = model.setup_optimizer(0.004, 0.6, 0.04, 0.5, 0.2, (0.8, 0.95))
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    assert sorted(tuple(g["params"][0].shape) for g in muon) == [(2, 32), (64, 64), (64, 256), (256, 64)]
    assert sum(len(g["params"]) for g in muon) == len(list(model.transformer.h.parameters()))
    scale = (64 / 768) ** -0.5
    lrs = [g["lr"] for g in opt.param_groups if g["kind"] == "adamw"]
    assert lrs == pytest.approx([0.004 * scale, 0.6 * scale, 0.6 * scale, 0.005, 0.5])


def test_lr_schedule_boundaries(monkeypatch):
    assert train.get_lr_multiplier(0.0) == 1.0
    assert train.get_lr_multiplier(0.4999) == 1.0
    assert train.get_lr_multiplier(0.5) == pytest.approx(1.0)
    assert train.get_lr_multiplier(0.75) == pytest.approx(0.5)
    assert train.get_lr_multiplier(1.0) == pytest.approx(0.0)
    monkeypatch.setattr(train, "WARMUP_RATIO", 0.1)
    monkeypatch.setattr(train, "FINAL_LR_FRAC", 0.1)
    assert train.get_lr_multiplier(0.05) == pytest.approx(0.5)
    assert train.get_lr_multiplier(1.0) == pytest.approx(0.1)


def test_momentum_and_weight_decay_schedules():
    assert train.get_muon_momentum(0) == pytest.approx(0.85)
    assert train.get_muon_momentum(150) == pytest.approx(0.90)
    assert train.get_muon_momentum(300) == pytest.approx(0.95)
    assert train.get_muon_momentum(10_000) == pytest.approx(0.95)
    assert train.get_weight_decay(0.0) == pytest.approx(0.2)
    assert train.get_weight_decay(0.5) == pytest.approx(0.1)
    assert train.get_weight_decay(1.0) == 0.0


# ---------------------------------------------------------------------------------------------------------------
# The reference's numerics (SPEC.md, "Optimizer numerics"), written out plainly, one matrix at a time

PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def spec_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    """Moments in p's dtype, the update in place in p's dtype; hyperparameters fp32 0-d tensors."""
    p *= 1 - lr * wd
    m.lerp_(g, 1 - b1)
    v.lerp_(g * g, 1 - b2)
    p -= (lr / (1 - b1 ** t)) * m / (torch.sqrt(v / (1 - b2 ** t)) + eps)


def spec_muon(P, G, M, V, lr, mu, wd, beta2):
    """P, G, M: lists of fp32 matrices; V: fp32 second moments of the reduced shape."""
    for i in range(len(P)):
        M[i].lerp_(G[i], 1 - mu)
        g = G[i].lerp(M[i], mu)                                   # Nesterov
        X = g.to(torch.bfloat16)
        X = X / (1.02 * torch.linalg.matrix_norm(X) + 1e-6)       # Polar Express in bf16
        rows, cols = X.shape
        for a, b, c in PE:
            if rows > cols:
                A = X.T @ X
                X = a * X + X @ (b * A + c * (A @ A))
            else:
                A = X @ X.T
                X = a * X + (b * A + c * (A @ A)) @ X
        dim = 1 if rows >= cols else 0                             # NorMuon: per row, or per column if wide
        v_mean = (X.float() ** 2).mean(dim=dim, keepdim=True)
        V[i].lerp_(v_mean, 1 - beta2)
        step = torch.rsqrt(torch.clamp(V[i], min=1e-10))
        n = X.shape[dim]
        before = torch.sqrt((v_mean * n).sum())
        after = torch.sqrt((v_mean * n * step ** 2).sum())
        X = X * (step * before / after).to(torch.bfloat16)
        lr16, wd16 = lr.to(torch.bfloat16), wd.to(torch.bfloat16)  # cautious weight decay, mask >= 0
        P[i] -= lr16 * X + lr16 * wd16 * P[i] * ((X * P[i]) >= 0)


def test_adamw_follows_the_references_dtypes():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(64, 16).bfloat16())  # an embedding table, bf16 as on CUDA
    mine = torch.nn.Parameter(table.detach().clone())
    opt = train.MuonAdamW([dict(params=[mine], kind="adamw", lr=0.3, betas=(0.8, 0.95), eps=1e-10,
                                weight_decay=0.0)])
    p, m, v = table.detach().clone(), torch.zeros_like(table), torch.zeros_like(table)
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    for t in range(1, 5):
        g = torch.randn(64, 16).bfloat16()
        mine.grad = g.clone()
        opt.step()
        spec_adamw(p, g, m, v, f32(t), f32(0.3), f32(0.8), f32(0.95), f32(1e-10), f32(0.0))
        assert opt.state[mine]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(mine.detach(), p), t


def test_muon_follows_the_references_dtypes():
    torch.manual_seed(0)
    for shape in [(3, 48, 16), (2, 16, 48), (2, 32, 32)]:  # tall, wide, square
        params = torch.randn(shape) * 0.1
        P, M = list(params.clone()), [torch.zeros(shape[1:]) for _ in range(shape[0])]
        reduced = (shape[1], 1) if shape[1] >= shape[2] else (1, shape[2])
        V = [torch.zeros(reduced) for _ in range(shape[0])]
        mine = {low: params.clone() for low in (torch.bfloat16, torch.float32)}
        state = {low: (torch.zeros(shape), torch.zeros((shape[0],) + reduced)) for low in mine}
        hp = [torch.tensor(v, dtype=torch.float32) for v in (0.02, 0.9, 0.2, 0.95)]
        for _ in range(3):
            grads = torch.randn(shape)
            spec_muon(P, list(grads.clone()), M, V, *hp)
            for low, p in mine.items():
                train.muon_step(p, grads.clone(), *state[low], *hp, 5, low)
        spec = torch.stack(P)
        gap = {low: (p - spec).abs().max().item() for low, p in mine.items()}
        assert gap[torch.bfloat16] < 1e-6, (shape, gap)  # the reference's numbers
        assert gap[torch.float32] > 100 * max(gap[torch.bfloat16], 1e-8), (shape, gap)  # (the dtypes show)
