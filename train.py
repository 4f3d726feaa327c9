"""Pretrain a small GPT for a fixed budget (5 minutes on a GPU, a fixed number of FLOPs under the small preset) and
report val_bpb. The one file the research agent edits.

    uv run train.py

Top to bottom: the hyperparameters, the model (GPT with value embeddings, sliding-window attention, ReLU^2 MLP),
the MuonAdamW optimizer, the schedules and the training loop. Everything here is the agent's to change. The fixed
parts it calls: prepare.py (tokenizer, loader, the metric evaluate_bpb) and the harness in autoresearch/:
hardware.py (device, precision, compiling, memory) and runtime.py (the budget, progress lines, the summary).
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoresearch import hardware, runtime
from autoresearch.errors import UserError
from constants import MAX_SEQ_LEN, SMALL
from prepare import check_cache, evaluate_bpb, make_dataloader

# ---------------------------------------------------------------------------------------------------------------
# Hyperparameters (the agent's knobs). Sizes derive from DEPTH.

# With AUTORESEARCH_PRESET=small (a CPU, Apple silicon, a small GPU: docs/PLATFORMS.md) the sizes take their small
# value, the first in `X if SMALL else Y`.
DEPTH = 2 if SMALL else 8   # transformer layers; model_dim = DEPTH * ASPECT_RATIO rounded up to HEAD_DIM
ASPECT_RATIO = 64           # model_dim per layer
HEAD_DIM = 128              # attention head size; n_head = model_dim / HEAD_DIM
WINDOW_PATTERN = "L" if SMALL else "SSSL"  # per-layer window, repeated: L = full context, S = half (last is L)
TOTAL_BATCH_SIZE = 2 ** 12 if SMALL else 2 ** 19  # tokens per optimizer step (gradient accumulation fills it)
DEVICE_BATCH_SIZE = 8 if SMALL else 128  # rows per forward/backward; lower it if memory runs out
EMBEDDING_LR = 0.6          # AdamW lr of the token and value embeddings (scaled by (dim/768)^-0.5)
UNEMBEDDING_LR = 0.004      # AdamW lr of lm_head (scaled by (dim/768)^-0.5)
MATRIX_LR = 0.04            # Muon lr of the block matrices
SCALAR_LR = 0.5             # AdamW lr of x0_lambdas (resid_lambdas get 1% of it)
WEIGHT_DECAY = 0.2          # Muon cautious weight decay, decayed linearly to 0 over the budget
ADAM_BETAS = (0.8, 0.95)    # AdamW betas
WARMUP_RATIO = 0.0          # fraction of the budget (FLOPs or time) spent warming the lr up
WARMDOWN_RATIO = 0.5        # fraction of the budget at the end spent decaying the lr
FINAL_LR_FRAC = 0.0         # lr multiplier at the very end
SEED = 42

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
    low_dtype: torch.dtype = torch.bfloat16  # embedding and rotary tables, Muon's orthogonalization (fp32 off CUDA)


def norm(x):
    """RMSNorm with no learned gain."""
    return F.rms_norm(x, (x.size(-1),))


SOFTCAP = 15.0  # logits = SOFTCAP * tanh(logits / SOFTCAP)


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
    pattern = config.window_pattern.upper()  # (checked by check_config)
    full, short = config.sequence_len, config.sequence_len // 2
    sizes = [full if pattern[i % len(pattern)] == "L" else short for i in range(config.n_layer)]
    sizes[-1] = full
    return sizes


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
        y = hardware.attention(q, k, v, window, block_mask)  # FlexAttention with a mask, else SDPA (hardware.py)
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

    def forward(self, x, x0, resid_lambda, x0_lambda, ve, cos, sin, window, block_mask):
        """x, x0: [B, T, C]; resid_lambda, x0_lambda: this layer's 0-d mixing weights (inputs, so that every
        block runs the same compiled code)."""
        x = resid_lambda * x + x0_lambda * x0
        x = x + self.attn(norm(x), ve, cos, sin, window, block_mask)
        return x + self.mlp(norm(x))


class SoftcapHead(nn.Linear):
    """The untied lm_head with what follows it: final RMSNorm, logits in fp32 soft-capped to +-SOFTCAP, and the
    cross-entropy (compiled as one region: the [B, T, V] fp32 logits are never kept whole in several copies)."""

    def forward(self, x, targets=None, reduction="mean"):
        logits = super().forward(norm(x)).float()
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss


class GPT(nn.Module):
    """The model; build it with build_model() (the reference's construction, so its initial weights)."""

    def __init__(self, config, device="meta"):
        super().__init__()
        self.config = config
        # Tables from empty tensors: nn.Embedding's own init (normal_) on `meta` imports torch's Python reference
        # kernels, ~8 s on a small CPU. init_weights fills every parameter anyway.
        table = lambda rows, cols: nn.Embedding.from_pretrained(torch.empty(rows, cols), freeze=False)  # noqa: E731
        with torch.device(device):
            self.transformer = nn.ModuleDict({
                "wte": table(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            })
            self.lm_head = SoftcapHead(config.n_embd, config.vocab_size, bias=False)
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.full((config.n_layer,), 0.1))
            kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
            self.value_embeds = nn.ModuleDict({
                str(i): table(config.vocab_size, kv_dim)
                for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
            head_dim = config.n_embd // config.n_head
            rotary_shape = (1, config.sequence_len, 1, head_dim // 2)  # filled by init_weights
            self.register_buffer("cos", torch.empty(rotary_shape), persistent=False)
            self.register_buffer("sin", torch.empty(rotary_shape), persistent=False)
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
        head_dim = self.config.n_embd // self.config.n_head  # rotary tables, base 10000
        device = self.cos.device
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=device), inv_freq)
        # The rotary and embedding tables live in low_dtype: bf16 on CUDA (half the memory and bandwidth of lookups).
        low = self.config.low_dtype
        self.cos, self.sin = freqs.cos()[None, :, None, :].to(low), freqs.sin()[None, :, None, :].to(low)
        self.transformer.wte.to(dtype=low)
        for ve in self.value_embeds.values():
            ve.to(dtype=low)

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
        device = next(self.parameters()).device
        return MuonAdamW(groups, fused=device.type == "cuda", low=self.config.low_dtype)

    def forward(self, idx, targets=None, reduction="mean"):
        """idx, targets: [B, T] int64. Returns logits [B, T, V] without targets, else the cross-entropy
        (a scalar, or per-token [B, T] with reduction='none')."""
        B, T = idx.size()
        assert T <= self.config.sequence_len, f"sequence length {T} > the model's {self.config.sequence_len}"
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        masks = hardware.attention_masks(T, self.windows, idx.device)  # {window: FlexAttention mask}, or {}
        x0 = norm(self.transformer.wte(idx))
        x = x0.clone()  # (x aliasing x0 would make the first block a compiled graph of its own)
        for i, block in enumerate(self.transformer.h):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, cos, sin, self.windows[i],
                      masks.get(self.windows[i]))
        return self.lm_head(x, targets, reduction)

    def compiled_regions(self):
        """What hardware.compile_model compiles, one region at a time: the blocks (one compiled graph serves every
        block of a kind: with or without a value embedding, full or windowed attention; DEPTH adds none) and the
        head with its loss. The embeddings in between run eagerly (a few small kernels)."""
        return list(self.transformer.h) + [self.lm_head]


def build_model(config, device):
    """The reference's construction: on `meta` (no memory, no random draws), materialized on the device with
    to_empty(), then init_weights(): after torch.manual_seed(SEED) the first random draws are init_weights'."""
    model = GPT(config, device="meta")
    model.to_empty(device=device)
    model.init_weights()
    return model


# ---------------------------------------------------------------------------------------------------------------
# Optimizer: AdamW for embeddings, head and scalars; Muon (Polar Express orthogonalization + NorMuon variance
# normalization + cautious weight decay) for the 2-D matrices inside the blocks. The numerics are the compiled
# reference's (docs/DESIGN.md); `low` is bf16 on CUDA as there, fp32 on the CPU.

# Polar Express coefficients (Amsel et al. 2025), one (a, b, c) per iteration.
POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW update of p in place, in p's dtype (the moments are like p: bf16 for the embedding tables on
    CUDA): decoupled weight decay, bias-corrected moments, the step added with one rounding (add with alpha).
    Hyperparameters are fp32 0-d CPU tensors."""
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2)
    bias1, bias2 = 1 - beta1 ** step, 1 - beta2 ** step
    p.add_(exp_avg / ((exp_avg_sq / bias2).sqrt() + eps), alpha=-(lr / bias1))


def polar_express(g, steps, low):
    """Approximate orthogonalization U V^T of each matrix in g: [K, rows, cols], computed and returned in `low`."""
    x = g.to(low)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        gram = x.mT @ x if tall else x @ x.mT  # the smaller Gram matrix
        poly = b * gram + c * (gram @ gram)
        x = a * x + (x @ poly if tall else poly @ x)
    return x


def muon_step(params, grads, momentum_buf, second_moment, lr, momentum, weight_decay, beta2, ns_steps, low):
    """One Muon update of a stack of same-shape matrices. params, grads, momentum_buf: [K, rows, cols] fp32;
    second_moment: fp32 with the reduced dim of size 1. Overwrites grads."""
    momentum_buf.lerp_(grads, 1 - momentum)
    g = polar_express(grads.lerp_(momentum_buf, momentum), ns_steps, low)  # Nesterov, then orthogonalize
    # NorMuon: normalize each row (tall or square) or column (wide) by a running second moment, then rescale so
    # the update keeps its overall norm. The scale is computed and applied in fp32, as the compiled reference does.
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    n = g.size(red_dim)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment.lerp_(v_mean, 1 - beta2)
    step_size = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((v_mean * n) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (norm_before / norm_after.clamp_min(1e-10)))
    # Cautious weight decay: only where the update and the weight agree in sign (or either is zero).
    lr, wd = lr.to(low), weight_decay.to(low)
    params.sub_(lr * g + lr * wd * params * ((g * params) >= 0))


class MuonAdamW(torch.optim.Optimizer):
    """Each group has kind 'adamw' (per parameter) or 'muon' (all matrices of one shape, updated as one stack).
    fused=True compiles each step function into a few kernels (CUDA); hyperparameters go in as 0-D tensors
    so changing them every step does not recompile. `low`: the dtype of Muon's orthogonalized update."""

    def __init__(self, param_groups, fused=False, low=torch.bfloat16):
        super().__init__(param_groups, defaults={})
        wrap = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if fused else (lambda f: f)
        self._adamw, self._muon, self.low = wrap(adamw_step), wrap(muon_step), low
        self._scalars = {}

    def _t(self, name, value):
        """A persistent 0-D fp32 CPU tensor holding a hyperparameter (a fixed input for the compiled steps)."""
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
                        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    state["step"] += 1
                    self._adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"], self._t("step", state["step"]),
                                self._t(f"lr{gi}", group["lr"]), self._t(f"b1_{gi}", beta1),
                                self._t(f"b2_{gi}", beta2), self._t(f"eps{gi}", group["eps"]),
                                self._t(f"wd{gi}", group["weight_decay"]))
                continue
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            state = self.state[params[0]]
            stacked = torch.stack(params)
            rows, cols = stacked.shape[-2:]
            if not state:
                reduced = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                state.update(momentum_buffer=torch.zeros_like(stacked),
                             second_moment=torch.zeros(reduced, dtype=stacked.dtype, device=stacked.device))
            lr = group["lr"] * max(1.0, rows / cols) ** 0.5
            self._muon(stacked, torch.stack([p.grad for p in params]), state["momentum_buffer"],
                       state["second_moment"], self._t(f"lr{gi}", lr), self._t(f"mom{gi}", group["momentum"]),
                       self._t(f"wd{gi}", group["weight_decay"]), self._t(f"b2_{gi}", group["beta2"]),
                       group["ns_steps"], self.low)
            torch._foreach_copy_(params, list(stacked.unbind(0)))


# ---------------------------------------------------------------------------------------------------------------
# Schedules, by progress = the fraction of the budget done (run.progress: counted FLOPs or counted time)


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


# ---------------------------------------------------------------------------------------------------------------
# Training


def check_config():
    """Stop with one line, before the cache is touched, for a knob above that cannot work."""
    for name in ("DEPTH", "ASPECT_RATIO", "HEAD_DIM", "TOTAL_BATCH_SIZE", "DEVICE_BATCH_SIZE"):
        value = globals()[name]
        if not isinstance(value, int) or value <= 0:
            raise UserError(f"{name} = {value!r} in train.py: it must be a positive integer")
    if TOTAL_BATCH_SIZE % (DEVICE_BATCH_SIZE * MAX_SEQ_LEN):
        raise UserError(f"TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE x MAX_SEQ_LEN "
                        f"({DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN} = {DEVICE_BATCH_SIZE * MAX_SEQ_LEN}): change one")
    if not WINDOW_PATTERN or set(WINDOW_PATTERN.upper()) - {"S", "L"}:
        raise UserError(f"WINDOW_PATTERN = {WINDOW_PATTERN!r} in train.py: use only the letters S and L")


def train():
    t_start = time.perf_counter()
    check_config()
    device = hardware.get_device()
    torch.manual_seed(SEED)
    torch.set_float32_matmul_precision("high")
    autocast = hardware.autocast(device)

    tokenizer = check_cache()  # every file the run reads matches its build
    model_dim = ((DEPTH * ASPECT_RATIO + HEAD_DIM - 1) // HEAD_DIM) * HEAD_DIM
    n_head = model_dim // HEAD_DIM
    config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=DEPTH,
                       n_head=n_head, n_kv_head=n_head, n_embd=model_dim, window_pattern=WINDOW_PATTERN,
                       low_dtype=hardware.low_precision(device))
    model = build_model(config, device)
    num_params = model.param_counts()["total"]
    flops_per_token = model.estimate_flops()
    memory = hardware.estimate_memory(num_params, DEPTH, model_dim, config.vocab_size, MAX_SEQ_LEN)
    device_batch = hardware.fit_device_batch(device, DEVICE_BATCH_SIZE, TOTAL_BATCH_SIZE // MAX_SEQ_LEN, *memory)
    grad_accum_steps = TOTAL_BATCH_SIZE // (device_batch * MAX_SEQ_LEN)
    run = runtime.Run(device, flops_per_token, TOTAL_BATCH_SIZE, t_start, globals())
    print(f"model: depth {DEPTH}, dim {model_dim}, {config.n_head} heads, windows {model.windows}, "
          f"{num_params:,} parameters, {flops_per_token:.4e} FLOPs/token")
    print(f"batch: {TOTAL_BATCH_SIZE:,} tokens/step = {device_batch} rows x {MAX_SEQ_LEN} x "
          f"{grad_accum_steps} accumulation steps", flush=True)

    optimizer = model.setup_optimizer(UNEMBEDDING_LR, EMBEDDING_LR, MATRIX_LR, SCALAR_LR, WEIGHT_DECAY, ADAM_BETAS)
    model = hardware.compile_model(model, device)  # the one name from here on: training and eval both call it
    train_loader = make_dataloader(tokenizer, device_batch, MAX_SEQ_LEN, "train", device)
    x, y, epoch = next(train_loader)

    while not run.done:
        run.begin_step()
        for _ in range(grad_accum_steps):
            with autocast:
                loss = model(x, y)
            (loss / grad_accum_steps).backward()
            x, y, epoch = next(train_loader)
        progress = run.progress
        lrm = get_lr_multiplier(progress)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = get_muon_momentum(run.step)
                group["weight_decay"] = get_weight_decay(progress)
        optimizer.step()
        model.zero_grad(set_to_none=True)
        run.end_step(loss.detach(), lrm, epoch)

    model.eval()
    with autocast:
        val_bpb = evaluate_bpb(model, tokenizer, device_batch)
    run.summary(val_bpb, num_params, DEPTH)


def main():
    runtime.main(train, f"DEVICE_BATCH_SIZE={DEVICE_BATCH_SIZE}, DEPTH={DEPTH}")


if __name__ == "__main__":
    main()
