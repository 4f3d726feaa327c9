"""Pretrain a small GPT for a fixed time budget and report val_bpb. The one file the research agent edits.

    uv run train.py

Top to bottom: the model (GPT with value embeddings, sliding-window attention, ReLU^2 MLP), the MuonAdamW
optimizer, the hyperparameters, the training loop, the summary. Data, tokenizer and the metric come from
prepare.py (fixed). Runs on CUDA (torch.compile, cuDNN/Flex attention, no kernel downloads), and small
configurations run on Apple MPS or the CPU in plain eager mode.
"""
import contextlib
import functools
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import constants
import prepare
from constants import EVAL_TOKENS, MAX_SEQ_LEN, TIME_BUDGET
from prepare import check_cache, evaluate_bpb, get_device, make_dataloader

# ---------------------------------------------------------------------------------------------------------------
# Model


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"
    loss_chunk_rows: int = 0  # 0: plain loss; > 0: SoftcapCrossEntropy over chunks of this many rows


def norm(x):
    """RMSNorm with no learned gain."""
    return F.rms_norm(x, (x.size(-1),))


SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP)


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of soft-capped logits, SOFTCAP * tanh(x @ W^T / SOFTCAP), computed over chunks of
    rows so that the [N, V] fp32 logits (8.6 GB for the baseline's 128 x 2048 x 8192) never exist at once;
    the backward pass recomputes each chunk's logits from x and W. Targets of -1 are ignored (loss 0).
    x: [N, C] in the matmul dtype (bf16 under autocast); weight: [V, C]; targets: [N] -> losses [N] fp32."""

    @staticmethod
    def _chunk_logits(x, w, cap):
        t = torch.tanh((x @ w.t()).float() / cap)
        return cap * t, t

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        w = weight.to(x.dtype)
        losses = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
        lse = torch.empty_like(losses)
        for i in range(0, x.size(0), chunk_rows):
            z, _ = SoftcapCrossEntropy._chunk_logits(x[i:i + chunk_rows], w, SOFTCAP)
            t = targets[i:i + chunk_rows]
            lse[i:i + chunk_rows] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, t.clamp_min(0)[:, None]).squeeze(1)
            losses[i:i + chunk_rows] = torch.where(t >= 0, lse[i:i + chunk_rows] - picked, 0.0)
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        x, weight, targets, lse = ctx.saved_tensors
        w, n = weight.to(x.dtype), ctx.chunk_rows
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for i in range(0, x.size(0), n):
            xc, t = x[i:i + n], targets[i:i + n]
            z, tanh = SoftcapCrossEntropy._chunk_logits(xc, w, SOFTCAP)
            dz = torch.exp(z - lse[i:i + n, None])  # softmax
            dz.scatter_add_(1, t.clamp_min(0)[:, None], torch.full_like(dz[:, :1], -1.0))  # minus one-hot
            scale = torch.where(t >= 0, grad_losses[i:i + n], 0.0)
            dz = (dz * scale[:, None] * (1 - tanh.square())).to(x.dtype)  # through the soft cap
            grad_x[i:i + n] = dz @ w
            grad_w += (dz.t() @ xc).float()
        return grad_x, grad_w.to(weight.dtype), None, None


def has_value_embedding(layer_idx, n_layer):
    """Alternating layers, always including the last one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    """x: [B, T, H, D]; cos, sin: [1, T, 1, D/2]. Rotates the two halves of the head dimension."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=3)


def window_sizes(config):
    """Per-layer attention window from the pattern (L = full sequence, S = half), the last layer always L."""
    pattern = config.window_pattern.upper()
    assert pattern and set(pattern) <= {"S", "L"}, f"WINDOW_PATTERN must use only S and L, got {pattern!r}"
    full, short = config.sequence_len, config.sequence_len // 2
    sizes = [full if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = full
    return sizes


def sliding_window_mask(window):
    """FlexAttention mask_mod: causal, and a query sees at most `window` keys back (FA3's left window)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return mask_mod


@torch.compiler.disable  # built eagerly, outside any compiled graph, once per (T, windows, device)
@functools.lru_cache(maxsize=None)
def block_masks(T, windows, device):
    """FlexAttention block masks {window: BlockMask} for the windows shorter than the sequence length T actually
    seen, so a shorter sequence (a warm-up, an eval) or another window pattern needs no change elsewhere."""
    return {w: create_block_mask(sliding_window_mask(w), None, None, T, T, device=device)
            for w in sorted(set(windows)) if w < T}


def attention(q, k, v, window, block_mask):
    """Causal attention. q: [B, T, H, D], k, v: [B, T, KV, D] -> [B, T, H, D].

    CUDA: full-window layers use SDPA (cuDNN backend preferred, see main()); windowed layers use FlexAttention
    with a block mask from block_masks(), so no T x T mask is ever materialized. Elsewhere (CPU, MPS): SDPA with an
    explicit boolean mask, simple and correct for small runs."""
    T = q.size(1)
    gqa = q.size(2) != k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif block_mask is not None:
        y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    else:
        i = torch.arange(T, device=q.device)
        diff = i[:, None] - i[None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(diff >= 0) & (diff <= window), enable_gqa=gqa)
    return y.transpose(1, 2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_head % config.n_kv_head == 0, "n_head must be a multiple of n_kv_head"
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = (nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer_idx, config.n_layer) else None)

    def forward(self, x, ve, cos, sin, window, block_mask):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding, gated per head: 2*sigmoid(0) = 1 at init
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # [B, T, KV]
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = norm(apply_rotary_emb(q, cos, sin)), norm(apply_rotary_emb(k, cos, sin))
        y = attention(q, k, v, window, block_mask)
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, block_mask):
        x = x + self.attn(norm(x), ve, cos, sin, window, block_mask)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Built as the reference builds it: on the `meta` device (no memory, no random draws), materialized with
    to_empty() on the training device, then init_weights(), so the first random draws after the seed are
    init_weights' own and the initial weights equal the reference's at the same seed (see build_model)."""

    def __init__(self, config, device="meta"):
        super().__init__()
        self.config = config
        with torch.device(device):
            self.transformer = nn.ModuleDict({
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            })
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
            kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
            self.value_embeds = nn.ModuleDict({
                str(i): nn.Embedding(config.vocab_size, kv_dim)
                for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
            head_dim = config.n_embd // config.n_head
            rotary_shape = (1, config.sequence_len, 1, head_dim // 2)  # filled by init_weights
            self.register_buffer("cos", torch.empty(rotary_shape, dtype=torch.bfloat16), persistent=False)
            self.register_buffer("sin", torch.empty(rotary_shape, dtype=torch.bfloat16), persistent=False)
        self.windows = window_sizes(config)

    @torch.no_grad()
    def init_weights(self):
        s = 3 ** 0.5 * self.config.n_embd ** -0.5  # uniform(-s, s) has the std of N(0, 1/dim)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        head_dim = self.config.n_embd // self.config.n_head  # rotary tables, base 10000, stored in bf16
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=self.cos.device)
                                    / head_dim))
        freqs = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=self.cos.device),
                            inv_freq)
        self.cos.copy_(freqs.cos()[None, :, None, :])
        self.sin.copy_(freqs.sin()[None, :, None, :])
        # The embedding tables live in bf16: half the memory and bandwidth of their lookups.
        self.transformer.wte.to(dtype=torch.bfloat16)
        for ve in self.value_embeds.values():
            ve.to(dtype=torch.bfloat16)

    def param_counts(self):
        wte = self.transformer.wte.weight.numel()
        value_embeds = sum(p.numel() for p in self.value_embeds.parameters())
        lm_head = self.lm_head.weight.numel()
        matrices = sum(p.numel() for p in self.transformer.h.parameters())
        scalars = self.resid_lambdas.numel() + self.x0_lambdas.numel()
        total = sum(p.numel() for p in self.parameters())
        assert total == wte + value_embeds + lm_head + matrices + scalars, "a parameter is in no group"
        return dict(wte=wte, value_embeds=value_embeds, lm_head=lm_head, matrices=matrices, scalars=scalars,
                    total=total)

    def estimate_flops(self):
        """Training FLOPs per token: 6 x the parameters used as matmuls (not the embedding lookups or scalars),
        plus attention's 12 x n_head x head_dim x (keys seen) per layer."""
        c = self.param_counts()
        dense = c["total"] - c["wte"] - c["value_embeds"] - c["scalars"]
        head_dim = self.config.n_embd // self.config.n_head
        T = self.config.sequence_len
        attn = sum(12 * self.config.n_head * head_dim * min(w, T) for w in self.windows)
        return 6 * dense + attn

    def setup_optimizer(self, unembedding_lr, embedding_lr, matrix_lr, scalar_lr, weight_decay, adam_betas):
        scale = (self.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at dim 768
        adam = dict(kind="adamw", betas=adam_betas, eps=1e-10, weight_decay=0.0)
        groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, **adam),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale, **adam),
            dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale, **adam),
            dict(params=[self.resid_lambdas], lr=scalar_lr * 0.01, **adam),
            dict(params=[self.x0_lambdas], lr=scalar_lr, **{**adam, "betas": (0.96, 0.95)}),
        ]
        matrices = list(self.transformer.h.parameters())
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.95, weight_decay=weight_decay))
        groups = [g for g in groups if g["params"]]
        for g in groups:
            g["initial_lr"] = g["lr"]
        return MuonAdamW(groups, fused=next(self.parameters()).device.type == "cuda")

    def forward(self, idx, targets=None, reduction="mean"):
        """idx, targets: [B, T] int64. Returns logits [B, T, V] without targets, else the cross-entropy
        (a scalar, or per-token [B, T] with reduction='none')."""
        B, T = idx.size()
        assert T <= self.config.sequence_len, f"sequence length {T} > the model's {self.config.sequence_len}"
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        masks = block_masks(T, tuple(self.windows), idx.device) if idx.device.type == "cuda" else {}
        x = norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.windows[i], masks.get(self.windows[i]))
        x = norm(x)
        if targets is not None and self.config.loss_chunk_rows > 0:
            if torch.is_autocast_enabled(x.device.type):  # the matmul dtype that autocast would pick
                x = x.to(torch.get_autocast_dtype(x.device.type))
            losses = SoftcapCrossEntropy.apply(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                               self.config.loss_chunk_rows)
            if reduction == "none":
                return losses.view(B, T)
            assert reduction == "mean", f"reduction must be 'mean' or 'none', got {reduction!r}"
            return losses.sum() / (targets >= 0).sum()
        logits = self.lm_head(x).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------------------------
# Optimizer: AdamW for embeddings, head and scalars; Muon (Polar Express orthogonalization + NorMuon variance
# normalization + cautious weight decay) for the 2-D matrices inside the blocks.

# Polar Express coefficients (Amsel et al. 2025), one (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update of p in place (decoupled weight decay, bias correction); the moments are fp32."""
    g = grad.float()
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.lerp_(g.square(), 1 - beta2)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    update = (exp_avg / bias1) / ((exp_avg_sq / bias2).sqrt() + eps)
    new = p.float() * (1 - lr * weight_decay) - lr * update
    p.copy_(new)


def polar_express(g, steps):
    """Approximate orthogonalization U V^T of each matrix in g: [K, rows, cols], in bf16."""
    x = g.bfloat16()
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    wide = x.size(-2) <= x.size(-1)
    if not wide:
        x = x.mT  # iterate on the wide orientation: X X^T is the smaller Gram matrix
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x if wide else x.mT


def muon_step(params, grads, momentum_buf, second_moment, lr, momentum, weight_decay, beta2, ns_steps):
    """One Muon update of a stack of same-shape matrices. params, grads, momentum_buf: [K, rows, cols]."""
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp(momentum_buf, momentum)  # Nesterov
    u = polar_express(g, ns_steps).float()
    # NorMuon: normalize each row (tall matrices) or column (wide) by a running second moment, then rescale so
    # the update keeps its overall norm.
    red_dim = -1 if u.size(-2) >= u.size(-1) else -2
    v_mean = u.square().mean(dim=red_dim, keepdim=True)
    n = u.size(red_dim)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((v_mean * n) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    u = u * step_size * (norm_before / norm_after.clamp_min(1e-10))
    # Cautious weight decay: only where the update and the weight agree in sign.
    decay = (u * params > 0).to(u.dtype) * params
    params.sub_(lr * (u + weight_decay * decay))


class MuonAdamW(torch.optim.Optimizer):
    """Each group has kind 'adamw' (per parameter) or 'muon' (all matrices of one shape, updated as one stack).
    fused=True compiles each step function into a few kernels (CUDA); hyperparameters go in as 0-D tensors
    so changing them every step does not recompile."""

    def __init__(self, param_groups, fused=False):
        super().__init__(param_groups, defaults={})
        wrap = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if fused else (lambda f: f)
        self._adamw, self._muon = wrap(adamw_step), wrap(muon_step)
        self._scalars = {}

    def _t(self, name, value):
        """A persistent 0-D CPU tensor holding a hyperparameter (a fixed input for the compiled steps)."""
        t = self._scalars.get(name)
        if t is None:
            t = self._scalars[name] = torch.tensor(0.0, dtype=torch.float32)
        t.fill_(value)
        return t

    @torch.no_grad()
    def step(self):
        for gi, group in enumerate(self.param_groups):
            if group["kind"] == "adamw":
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state["step"] = 0
                        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    state["step"] += 1
                    self._adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], self._t("step", state["step"]),
                                self._t(f"lr{gi}", group["lr"]), self._t(f"b1_{gi}", beta1),
                                self._t(f"b2_{gi}", beta2), self._t(f"eps{gi}", group["eps"]),
                                self._t(f"wd{gi}", group["weight_decay"]))
            else:
                params = [p for p in group["params"] if p.grad is not None]
                if not params:
                    continue
                state = self.state[params[0]]
                stacked = torch.stack(params)
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(stacked)
                    rows, cols = stacked.shape[-2:]
                    shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                    state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=stacked.device)
                rows, cols = stacked.shape[-2:]
                lr = group["lr"] * max(1.0, rows / cols) ** 0.5
                self._muon(stacked, torch.stack([p.grad for p in params]), state["momentum_buffer"],
                           state["second_moment"], self._t(f"lr{gi}", lr), self._t(f"mom{gi}", group["momentum"]),
                           self._t(f"wd{gi}", group["weight_decay"]), self._t(f"b2_{gi}", group["beta2"]),
                           group["ns_steps"])
                torch._foreach_copy_(params, list(stacked.unbind(0)))


# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters (the agent's knobs). Sizes derive from DEPTH.

DEPTH = 8                   # transformer layers; model_dim = DEPTH * ASPECT_RATIO rounded up to HEAD_DIM
ASPECT_RATIO = 64           # model_dim per layer
HEAD_DIM = 128              # attention head size; n_head = model_dim / HEAD_DIM
WINDOW_PATTERN = "SSSL"     # per-layer attention window, repeated: L = full context, S = half (last layer is L)
TOTAL_BATCH_SIZE = 2 ** 19  # tokens per optimizer step (gradient accumulation makes up the difference)
DEVICE_BATCH_SIZE = 128     # rows per forward/backward; lower it if memory runs out
EMBEDDING_LR = 0.6          # AdamW lr of the token and value embeddings (scaled by (dim/768)^-0.5)
UNEMBEDDING_LR = 0.004      # AdamW lr of lm_head (scaled by (dim/768)^-0.5)
MATRIX_LR = 0.04            # Muon lr of the block matrices
SCALAR_LR = 0.5             # AdamW lr of x0_lambdas (resid_lambdas get 1% of it)
WEIGHT_DECAY = 0.2          # Muon cautious weight decay, decayed linearly to 0 over the budget
ADAM_BETAS = (0.8, 0.95)    # AdamW betas
WARMUP_RATIO = 0.0          # fraction of the budget spent warming the lr up
WARMDOWN_RATIO = 0.5        # fraction of the budget at the end spent decaying the lr
FINAL_LR_FRAC = 0.0         # lr multiplier at the very end
LOSS_CHUNK_ROWS = 0         # 0: plain loss; >0 (e.g. 32768): chunked, never holds all fp32 logits (untimed on GPU)
SEED = 42
LOG_EVERY_SECONDS = 5.0     # progress line interval when stdout is a file (a terminal gets one live line)

# ---------------------------------------------------------------------------------------------------------------
# Schedules, by progress = counted training time / TIME_BUDGET


def get_lr_multiplier(progress):
    if progress < WARMUP_RATIO:
        return (progress + 1e-8) / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    cooldown = (1.0 - progress) / WARMDOWN_RATIO
    return cooldown + (1 - cooldown) * FINAL_LR_FRAC


def get_muon_momentum(step):
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def get_weight_decay(progress):
    return WEIGHT_DECAY * (1 - progress)


# Peak dense bf16 tensor FLOP/s (no sparsity) from the vendors' datasheets, matched on the CUDA device name in
# this order (the first match wins, so specific names come before general ones).
PEAK_BF16_FLOPS = [
    ("gh200", 989.5e12), ("h200", 989.5e12), ("h100 pcie", 756.0e12), ("h100 nvl", 835.0e12),
    ("h100", 989.5e12), ("h800", 989.5e12), ("b200", 2250e12), ("a100", 312.0e12), ("a800", 312.0e12),
    ("l40s", 362.1e12), ("l40", 181.0e12), ("rtx 6000 ada", 364.2e12), ("l4", 121.0e12), ("a10g", 70.0e12),
    ("a10", 125.0e12), ("rtx 5090", 209.5e12), ("rtx 4090", 165.2e12), ("rtx 3090", 71.0e12),
]


def lookup_peak_flops(gpu_name):
    """Peak bf16 FLOP/s of a GPU by its CUDA name, or 0.0 when it is not in the table."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in gpu_name.lower()), 0.0)


def peak_flops(device):
    """(peak bf16 FLOP/s or 0.0, device name, note)."""
    if device.type != "cuda":
        return 0.0, device.type, f"MFU is not computed on {device.type}"
    name = torch.cuda.get_device_name(device)
    flops = lookup_peak_flops(name)
    return flops, name, "" if flops else f"{name} is not in train.py's PEAK_BF16_FLOPS table: MFU reported as 0"


def alloc_conf_name():
    """torch 2.9 renamed PYTORCH_CUDA_ALLOC_CONF to PYTORCH_ALLOC_CONF."""
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 9) else "PYTORCH_CUDA_ALLOC_CONF"


def summary_line(key, value):
    return f"{key + ':':<18}{value}"


# ---------------------------------------------------------------------------------------------------------------
# Training


def build_model(config, device):
    """The reference's construction: on `meta` (no memory, no random draws), materialized on the device with
    to_empty(), then init_weights(): after torch.manual_seed(SEED) the first random draws are init_weights'."""
    model = GPT(config, device="meta")
    model.to_empty(device=device)
    model.init_weights()
    return model


def maybe_compile(model, device):
    """torch.compile on CUDA; eager elsewhere (CPU and MPS runs are small). The loop and the eval call only what
    this returns, so an uncompiled FlexAttention (full score matrices, slow) never runs on CUDA by accident."""
    return torch.compile(model, dynamic=False) if device.type == "cuda" else model


def attention_kernels(event_names):
    """{implementation: events} of the attention that ran, from profiler event and kernel names (each aten op
    and GPU kernel the step ran), so a silent fallback to a slower kernel shows in run.log."""
    kinds = [("cuDNN SDPA", ("_scaled_dot_product_cudnn_attention", "cudnn_generated_fort_native_sdpa")),
             ("flash SDPA", ("_scaled_dot_product_flash_attention", "flash_fwd", "flash_bwd")),
             ("mem-efficient SDPA", ("_scaled_dot_product_efficient_attention", "fmha_cutlass")),
             ("math SDPA (slow)", ("_scaled_dot_product_attention_math",)),
             ("FlexAttention", ("flex_attention",))]
    found = {}
    for name, count in event_names:
        lowered = name.lower()
        for label, keys in kinds:
            if any(key in lowered for key in keys):
                found[label] = found.get(label, 0) + count
                break
    return found


def nonstandard_settings(train_globals):
    """Why this run does not compare with standard ones: AUTORESEARCH_* overrides of the metric's constants, and
    those constants changed at run time in constants, prepare or train.py. Empty for a standard run."""
    notes = [f"{name}={value}" for name, value in constants.METRIC_OVERRIDES.items()]
    for name, value in constants.RESOLVED.items():
        for where, namespace in (("constants.py", vars(constants)), ("prepare.py", vars(prepare)),
                                 ("train.py", train_globals)):
            if name in namespace and namespace[name] != value:
                notes.append(f"{name} = {namespace[name]} set in {where} at run time")
    return notes


def progress_line(step, progress, loss, lrm, dt, tok_per_sec, mfu, epoch, remaining):
    return (f"step {step:05d} ({100 * progress:.1f}%) | loss: {loss:.6f} | lrm: {lrm:.2f} | dt: {dt * 1000:.0f}ms | "
            f"tok/sec: {tok_per_sec:,} | mfu: {mfu:.1f}% | epoch: {epoch} | remaining: {remaining:.0f}s")


def train():
    t_start = time.time()
    os.environ.setdefault(alloc_conf_name(), "expandable_segments:True")  # read at the first CUDA allocation
    if EVAL_TOKENS < DEVICE_BATCH_SIZE * MAX_SEQ_LEN:  # found now, not after the whole training budget
        sys.exit(f"error: AUTORESEARCH_EVAL_TOKENS={EVAL_TOKENS} is less than one eval batch: it must be at least "
                 f"DEVICE_BATCH_SIZE x MAX_SEQ_LEN = {DEVICE_BATCH_SIZE * MAX_SEQ_LEN}")
    device = get_device()
    cuda = device.type == "cuda"
    torch.manual_seed(SEED)
    torch.set_float32_matmul_precision("high")
    autocast = torch.amp.autocast(device_type=device.type, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if cuda else (torch.mps.synchronize if device.type == "mps" else (lambda: None))
    tty = sys.stdout.isatty()  # a terminal gets one live line; a file gets a line every LOG_EVERY_SECONDS

    tokenizer = check_cache()  # every file the run reads matches the cache's manifest
    model_dim = ((DEPTH * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=DEPTH,
                       n_head=model_dim // HEAD_DIM, n_kv_head=model_dim // HEAD_DIM, n_embd=model_dim,
                       window_pattern=WINDOW_PATTERN, loss_chunk_rows=LOSS_CHUNK_ROWS)
    model = build_model(config, device)
    num_params = model.param_counts()["total"]
    flops_per_token = model.estimate_flops()
    tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
    assert TOTAL_BATCH_SIZE % tokens_per_fwdbwd == 0, (
        f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE x MAX_SEQ_LEN "
        f"({DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN} = {tokens_per_fwdbwd}): change one of them")
    grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd
    peak, gpu_name, mfu_note = peak_flops(device)
    print(f"device: {device} ({gpu_name}), torch {torch.__version__}")
    print(f"model: depth {DEPTH}, dim {model_dim}, {config.n_head} heads, windows {model.windows}, "
          f"{num_params:,} parameters, {flops_per_token:.4e} FLOPs/token")
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens/step = {DEVICE_BATCH_SIZE} rows x {MAX_SEQ_LEN} x "
          f"{grad_accum_steps} accumulation steps; budget {TIME_BUDGET:.0f}s")
    if mfu_note:
        print(f"note: {mfu_note}")
    if not cuda and (flops_per_token * TOTAL_BATCH_SIZE > 1e13 or EVAL_TOKENS > 2 ** 21):
        print(f"note: no CUDA GPU, running on {device.type}: this configuration would crawl (each step is "
              f"{flops_per_token * TOTAL_BATCH_SIZE:.1e} FLOPs, the eval {EVAL_TOKENS:,} tokens).")
        print("note: for a small run lower DEPTH, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE (and WINDOW_PATTERN='L') "
              "in train.py and set AUTORESEARCH_TIME_BUDGET, AUTORESEARCH_EVAL_TOKENS, AUTORESEARCH_MAX_SEQ_LEN",
              flush=True)

    if not cuda:  # (the CUDA build of torch prints an error when profiling on a machine without a GPU)
        print(f"attention: SDPA in eager mode on {device.type} (kernels are profiled on CUDA only)")

    optimizer = model.setup_optimizer(UNEMBEDDING_LR, EMBEDDING_LR, MATRIX_LR, SCALAR_LR, WEIGHT_DECAY, ADAM_BETAS)
    model = maybe_compile(model, device)  # the one name from here on: training and eval both call it
    train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
    x, y, epoch = next(train_loader)

    step, total_training_time, smooth_loss, counted_steps = 0, 0.0, 0.0, 0
    startup_seconds, last_log = 0.0, 0.0
    while True:
        sync()
        t0 = time.time()
        if step == 11:  # the first counted step: everything before it (setup, compile, warm-up) is start-up
            startup_seconds = t0 - t_start
        # CUDA, step 1, compiled by now: record the kernels that actually run (uncounted: the overhead is free)
        profiling = step == 1 and cuda
        with (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                 torch.profiler.ProfilerActivity.CUDA], acc_events=True)
              if profiling else contextlib.nullcontext()) as profiler:
            for _ in range(grad_accum_steps):
                with autocast:
                    loss = model(x, y)
                train_loss = loss.detach()
                (loss / grad_accum_steps).backward()
                x, y, epoch = next(train_loader)
            progress = min(total_training_time / TIME_BUDGET, 1.0)
            lrm = get_lr_multiplier(progress)
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = get_muon_momentum(step)
                    group["weight_decay"] = get_weight_decay(progress)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            train_loss_f = train_loss.item()  # waits for the step: the profile holds all of its kernels
        if profiling:
            used = attention_kernels((e.key, e.count) for e in profiler.key_averages())
            print(("\n" if tty else "") + "attention (profiled step 1): " + (
                ", ".join(f"{label} x{n}" for label, n in used.items()) or "no attention kernel recognized"))
        if not math.isfinite(train_loss_f) or train_loss_f > 100:
            print(f"\nFAIL: loss is {train_loss_f} at step {step}")
            sys.exit(1)
        sync()
        dt = time.time() - t0
        if step > 10:  # the first steps compile: they do not count toward the budget
            total_training_time += dt
            counted_steps += 1
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss_f
        debiased = smooth_loss / (1 - 0.9 ** (step + 1))
        tok_per_sec = int(TOTAL_BATCH_SIZE / dt)
        mfu = 100 * flops_per_token * TOTAL_BATCH_SIZE / dt / peak if peak else 0.0
        remaining = max(0.0, TIME_BUDGET - total_training_time)
        last = step > 10 and total_training_time >= TIME_BUDGET
        line = progress_line(step, progress, debiased, lrm, dt, tok_per_sec, mfu, epoch, remaining)
        if tty:
            print(f"\r{line}    ", end="", flush=True)
        elif step in (0, 1, 11) or last or time.time() - last_log >= LOG_EVERY_SECONDS:
            print(line, flush=True)
            last_log = time.time()
        if step == 0:  # Python's GC pauses show up as slow steps; nothing cyclic is allocated after step 0
            gc.collect()
            gc.freeze()
            gc.disable()
        elif step % 5000 == 0:  # as the reference: a collection now and then on very long runs
            gc.collect()
        step += 1
        if last:
            break
    if tty:
        print()

    model.eval()
    t_eval = time.time()
    with autocast:
        val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
    eval_seconds = time.time() - t_eval
    total_tokens = step * TOTAL_BATCH_SIZE
    counted_tokens = counted_steps * TOTAL_BATCH_SIZE
    mfu = 100 * flops_per_token * counted_tokens / total_training_time / peak if peak and total_training_time else 0
    peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if cuda else 0.0
    notes = nonstandard_settings(globals())
    if notes:
        print(f"note: not comparable with standard runs: {'; '.join(notes)}")
    t_end = time.time()
    print("---")
    for key, value in [
        ("val_bpb", f"{val_bpb:.6f}"), ("training_seconds", f"{total_training_time:.1f}"),
        ("total_seconds", f"{t_end - t_start:.1f}"), ("peak_vram_mb", f"{peak_vram_mb:.1f}"),
        ("mfu_percent", f"{mfu:.2f}"), ("total_tokens_M", f"{total_tokens / 1e6:.1f}"), ("num_steps", f"{step}"),
        ("num_params_M", f"{num_params / 1e6:.1f}"), ("depth", f"{DEPTH}"),
        ("train_loss", f"{debiased:.6f}"), ("startup_seconds", f"{startup_seconds:.1f}"),
        ("eval_seconds", f"{eval_seconds:.1f}"),
        ("tok_per_sec", f"{int(counted_tokens / total_training_time) if total_training_time else 0}"),
        ("device", device.type), ("gpu", gpu_name),
    ]:
        print(summary_line(key, value))
    gc.enable()


def main():
    try:
        if torch.cuda.is_available():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            # cuDNN first: on an H100, causal T=2048 head_dim 128 forward+backward, cuDNN 339 TFLOP/s, flash 208.
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                              SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
                train()
        else:
            train()
    except torch.OutOfMemoryError:
        sys.exit(f"\nerror: out of GPU memory at DEVICE_BATCH_SIZE={DEVICE_BATCH_SIZE}, DEPTH={DEPTH}: lower "
                 "DEVICE_BATCH_SIZE (gradient accumulation keeps TOTAL_BATCH_SIZE) or the model size")


if __name__ == "__main__":
    main()
