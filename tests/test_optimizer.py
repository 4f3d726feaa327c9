"""MuonAdamW: AdamW against torch.optim.AdamW, the reference's numerics against a plain implementation written
from the reference's description, Polar Express, NorMuon, cautious weight decay; the schedules."""
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
# The reference's numerics, written out plainly from its description: eager, in the
# reference's order with its casts; and compiled with inductor, as the reference runs on the GPU, where the
# compiler computes inside a fused kernel in fp32 and drops the intermediate bf16 casts that the eager code writes.

PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]
BF16 = torch.bfloat16


def spec_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    """Moments in p's dtype, the update in place in p's dtype, the step as one add-with-alpha (one rounding);
    hyperparameters fp32 0-d tensors."""
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.lerp_(g * g, 1 - b2)
    denom = torch.sqrt(v / (1 - b2 ** t)) + eps
    p.add_(m / denom, alpha=-(lr / (1 - b1 ** t)))


def spec_muon(P, G, M, V, lr, mu, wd, beta2, casts=True):
    """P, G, M: [K, rows, cols] fp32 stacks of one shape group; V: fp32 second moments of the reduced shape.
    casts: the reference's eager bf16 casts of beta2 and of the NorMuon scale (which its compiled kernels drop)."""
    M.lerp_(G, 1 - mu)
    G.lerp_(M, mu)                                                     # Nesterov, in place on the gradients
    X = G.to(BF16)
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) * 1.02 + 1e-6)  # Polar Express in bf16
    rows, cols = X.shape[-2:]
    for a, b, c in PE:
        if rows > cols:
            A = X.mT @ X
            X = a * X + X @ (b * A + c * (A @ A))
        else:
            A = X @ X.mT
            X = a * X + (b * A + c * (A @ A)) @ X
    dim = -1 if rows >= cols else -2                                   # NorMuon: per row, or per column if wide
    n = X.shape[dim]
    v_mean = X.float().square().mean(dim=dim, keepdim=True)
    before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    V.lerp_(v_mean, 1 - (beta2.to(BF16) if casts else beta2))
    step = V.clamp_min(1e-10).rsqrt()
    after = ((v_mean * n) * step.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    scale = step * (before / after.clamp_min(1e-10))
    X = X * (scale.to(BF16) if casts else scale)
    lr16, wd16 = lr.to(BF16), wd.to(BF16)                              # cautious weight decay, mask >= 0
    P.sub_(lr16 * X + lr16 * wd16 * P * ((X * P) >= 0))


def spec_groups(shapes):
    """One AdamW bf16 table (an embedding on CUDA), one fp32 AdamW matrix and Muon stacks of the given shapes."""
    torch.manual_seed(0)
    table = torch.randn(64, 16).to(BF16)
    head = torch.randn(16, 64) * 0.01
    stacks = [torch.randn(shape) * 0.1 for shape in shapes]
    return table, head, stacks


def run_both(steps, compiled, shapes=((3, 48, 16), (2, 16, 48), (2, 32, 32))):  # tall, wide, square
    """Ours (MuonAdamW, compiled when `compiled`) and the reference's steps (compiled the same way; eager without the
    casts the compiler drops) over `steps` steps of random gradients, with Muon stacks of `shapes`; returns
    [(ours, spec)] of every tensor."""
    table, head, stacks = spec_groups(list(shapes))
    mine = [torch.nn.Parameter(table.clone()), torch.nn.Parameter(head.clone())]
    muon = [[torch.nn.Parameter(m.clone()) for m in stack] for stack in stacks]
    adam = dict(kind="adamw", lr=0.3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
    groups = [dict(params=[mine[0]], **adam), dict(params=[mine[1]], **{**adam, "lr": 0.004})]
    groups += [dict(kind="muon", params=ps, lr=0.04, momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=0.2)
               for ps in muon]
    opt = train.MuonAdamW(groups, fused=compiled, low=BF16)
    wrap = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compiled else (lambda f: f)
    adamw = wrap(spec_adamw)
    muon_step = wrap(lambda *a: spec_muon(*a, casts=compiled))
    spec = [table.clone(), head.clone()]
    moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in spec]
    spec_stacks = [s.clone() for s in stacks]
    spec_state = [(torch.zeros_like(s), torch.zeros((s.shape[0], s.shape[1], 1) if s.shape[1] >= s.shape[2]
                                                    else (s.shape[0], 1, s.shape[2]))) for s in spec_stacks]
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in mine]
        stack_grads = [torch.randn(s.shape, generator=gen) for s in spec_stacks]
        for p, g in zip(mine, grads):
            p.grad = g.clone()
        for ps, g in zip(muon, stack_grads):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
        opt.step()
        for (p, (m, v)), g, lr in zip(zip(spec, moments), grads, (0.3, 0.004)):
            adamw(p, g.clone(), m, v, f32(t), f32(lr), f32(0.8), f32(0.95), f32(1e-10), f32(0.0))
        for P, (M, V), g in zip(spec_stacks, spec_state, stack_grads):
            rows, cols = P.shape[-2:]
            muon_step(P, g.clone(), M, V, f32(0.04 * max(1.0, rows / cols) ** 0.5), f32(0.95), f32(0.2), f32(0.95))
    return list(zip([p.detach() for p in mine] + [torch.stack([p.detach() for p in ps]) for ps in muon],
                    spec + spec_stacks))


def test_the_optimizer_eager_follows_the_spec_order_bitwise():
    for ours, spec in run_both(20, compiled=False):
        assert ours.dtype == spec.dtype and torch.equal(ours, spec), (ours - spec).abs().max()


def test_the_compiled_optimizer_computes_the_compiled_references_numbers_bitwise():
    """Through torch.compile on the CPU (inductor), as the reference runs: 20 steps, bitwise equal, the bf16 table's
    AdamW included (its last line adds with one rounding) and Muon's NorMuon scale kept in fp32. One Muon shape (a
    wide one: the eager test covers the others; every shape compiles graphs of its own, ~5 s each here)."""
    pytest.importorskip("torch._inductor")
    for ours, spec in run_both(20, compiled=True, shapes=[(2, 16, 48)]):
        assert ours.dtype == spec.dtype and torch.equal(ours, spec), (ours - spec).abs().max()


def test_the_comparison_sees_one_rounding_more(monkeypatch):
    """What the tests above would catch: the AdamW step rounded to bf16 before it is added, or the NorMuon scale
    applied in bf16 (this project's code before 2026-11-29) moves the numbers."""
    def two_roundings(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
        p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.lerp_(grad.square(), 1 - beta2)
        p.sub_((lr / (1 - beta1 ** step)) * exp_avg / ((exp_avg_sq / (1 - beta2 ** step)).sqrt() + eps))

    monkeypatch.setattr(train, "adamw_step", two_roundings)
    pairs = run_both(5, compiled=False)
    assert not torch.equal(*pairs[0])  # the bf16 table
    monkeypatch.undo()

    def bf16_scale(params, grads, momentum_buf, second_moment, lr, momentum, weight_decay, beta2, ns_steps, low):
        momentum_buf.lerp_(grads, 1 - momentum)
        g = train.polar_express(grads.lerp_(momentum_buf, momentum), ns_steps, low)
        red_dim = -1 if g.size(-2) >= g.size(-1) else -2
        n = g.size(red_dim)
        v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
        norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
        second_moment.lerp_(v_mean, 1 - beta2)
        step_size = second_moment.clamp_min(1e-10).rsqrt()
        norm_after = ((v_mean * n) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        g = g * (step_size * (norm_before / norm_after.clamp_min(1e-10))).to(low)  # <- the scale in bf16
        lr, wd = lr.to(low), weight_decay.to(low)
        params.sub_(lr * g + lr * wd * params * ((g * params) >= 0))

    monkeypatch.setattr(train, "muon_step", bf16_scale)
    assert not any(torch.equal(ours, spec) for ours, spec in run_both(5, compiled=False)[2:])
