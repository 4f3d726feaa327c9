"""The device and what it can do. DO NOT CHANGE: train.py's numbers depend on it.

Which device a run uses (CUDA, else Apple's MPS, else the CPU; AUTORESEARCH_DEVICE insists on one) and why an
NVIDIA GPU cannot be used; the precision each device runs in; compiling the model (regional compilation on CUDA,
eager elsewhere); the micro-batch that fits the GPU's memory; the GPU's peak FLOP/s for MFU; sliding-window
attention.
"""
import contextlib
import functools
import importlib.util
import re
import shutil
import subprocess

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import constants
from autoresearch.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Device

# The oldest Linux driver each CUDA major version runs on (CUDA's minor-version compatibility; NVIDIA's CUDA
# Toolkit release notes). torch's default Linux wheels on PyPI are built with CUDA 13.0 as of torch 2.11.
MIN_DRIVER = {13: 580, 12: 525, 11: 450}
DRIVER_HELP = "see docs/PLATFORMS.md, 'Older NVIDIA drivers' (or set AUTORESEARCH_DEVICE=cpu to run on the CPU anyway)"


def nvidia_driver_version(proc_file="/proc/driver/nvidia/version"):
    """The loaded NVIDIA driver's version ('550.54.14'), or None: from /proc, else nvidia-smi."""
    try:
        with open(proc_file, encoding="utf-8", errors="replace") as f:
            found = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+(?:\.\d+)+)", f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
            return out[0] if out and re.fullmatch(r"\d+(\.\d+)+", out[0]) else None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def unusable_gpu_problem(cuda_available, driver_version, torch_cuda_version, torch_version=torch.__version__):
    """One line when an NVIDIA GPU is present (a driver is loaded) but torch cannot use it, else None."""
    if cuda_available or driver_version is None:
        return None
    if torch_cuda_version is None:
        return (f"an NVIDIA GPU is present (driver {driver_version}) but torch {torch_version} is a build without "
                f"CUDA: {DRIVER_HELP}")
    need = MIN_DRIVER.get(int(torch_cuda_version.split(".")[0]))
    if need is not None and int(driver_version.split(".")[0]) < need:
        return (f"the NVIDIA driver is {driver_version}, but torch {torch_version} (CUDA {torch_cuda_version}) "
                f"needs driver >= {need}: update the driver, or install a torch built for an older CUDA: "
                f"{DRIVER_HELP}")
    return (f"an NVIDIA GPU is present (driver {driver_version}) but torch {torch_version} cannot use it "
            f"(check nvidia-smi and CUDA_VISIBLE_DEVICES): {DRIVER_HELP}")


def get_device():
    """The training device (detect_device); off CUDA only the small preset, unless AUTORESEARCH_FORCE=1."""
    device = detect_device()
    if device.type != "cuda" and not constants.SMALL and not constants.FORCE:
        raise UserError(f"no CUDA GPU: on {device.type} the standard configuration would take hours per step; run "
                        "the small preset, `AUTORESEARCH_PRESET=small uv run train.py` (docs/PLATFORMS.md, 'Small "
                        "machines'), or set AUTORESEARCH_FORCE=1 to run it anyway")
    return device


def detect_device():
    """The device present, by the rules of get_device but without its size rule (for benchmarks)."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if constants.DEVICE == "cpu":
        return torch.device("cpu")
    if constants.DEVICE == "mps" and not mps:
        raise UserError("AUTORESEARCH_DEVICE=mps, but torch cannot use Apple's GPU here")
    if constants.DEVICE != "mps":
        if torch.cuda.is_available():
            return torch.device("cuda")
        problem = unusable_gpu_problem(False, nvidia_driver_version(), torch.version.cuda)
        if problem:
            raise UserError(problem)
        if constants.DEVICE == "cuda":
            raise UserError("AUTORESEARCH_DEVICE=cuda, but torch finds no CUDA GPU (no NVIDIA driver is loaded)")
    return torch.device("mps") if mps else torch.device("cpu")


def low_precision(device):
    """bf16 on CUDA, fp32 elsewhere (CPUs without bf16 instructions run bf16 matmuls 7-9x slower)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast(device):
    """The forward pass's mixed precision: bf16 autocast on CUDA (the reference's), plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def can_compile(device):
    """torch.compile runs on CUDA where Triton is installed (not on native Windows); CPU and MPS runs are eager."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def compile_model(model, device):
    """The model to call: compiled on CUDA with Triton (by compiled_regions() when it has them), else eager."""
    if device.type == "cuda" and not can_compile(device):
        print("note: Triton is not installed (native Windows?): running eagerly, several times slower; WSL2 "
              "compiles (docs/PLATFORMS.md, 'Windows')", flush=True)
    if not can_compile(device):
        return model
    if hasattr(model, "compiled_regions"):
        return compile_regions(model)
    return torch.compile(model, dynamic=False)


def compile_regions(model, backend="inductor"):
    """Compile each of model.compiled_regions() in place: a graph per kind of region, whatever the depth."""
    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    regions = model.compiled_regions()
    outside = uncompiled_modules(model, regions)
    if outside:
        print(f"note: modules with matrices outside compiled_regions() run eagerly, slower: {', '.join(outside)} "
              "(add them to a region in train.py)", flush=True)
    for region in regions:
        region.compile(backend=backend, dynamic=False)
    return model


def uncompiled_modules(model, regions):
    """The modules holding matrices (not embeddings) outside every region: they would run eagerly."""
    inside = {id(p) for region in regions for p in region.parameters()}
    outside = set()
    for name, param in model.named_parameters():
        owner = name.rpartition(".")[0]
        module = model.get_submodule(owner) if owner else model
        if param.ndim >= 2 and id(param) not in inside and not isinstance(module, torch.nn.Embedding):
            outside.add(owner or name)
    return sorted(outside)


# GPU memory: the baseline's peak on the reference's H100 run (DEVICE_BATCH_SIZE 128, T 2048, 8 layers of 512,
# vocab 8192) was 45,060 MiB. Per token of a micro-batch that is 180 KB: about 10 bytes per vocab entry (fp32
# logits and their soft cap) and 24 bytes per layer and model dimension (the activations kept for backward).
BYTES_PER_TOKEN_VOCAB, BYTES_PER_TOKEN_LAYER_DIM = 10, 24
BYTES_PER_PARAM = 16  # fp32 weight and gradient, two optimizer moments


def estimate_memory(num_params, n_layer, n_embd, vocab_size, seq_len):
    """(fixed bytes, bytes per row of a micro-batch) of a training step, from the reference's measured peak."""
    per_token = BYTES_PER_TOKEN_VOCAB * vocab_size + BYTES_PER_TOKEN_LAYER_DIM * n_layer * n_embd
    return BYTES_PER_PARAM * num_params, per_token * seq_len


def largest_fitting_rows(rows, total_rows, fixed_bytes, row_bytes, budget_bytes):
    """The largest power of two <= rows that divides total_rows and fits budget_bytes, or 0."""
    fits = lambda r: fixed_bytes + r * row_bytes <= budget_bytes and total_rows % r == 0  # noqa: E731
    if fits(rows):
        return rows
    r = 1 << (rows.bit_length() - 1)
    while r >= 1 and not fits(r):
        r //= 2
    return r


def fit_device_batch(device, rows, total_rows, fixed_bytes, row_bytes):
    """DEVICE_BATCH_SIZE as it fits 90% of the GPU's free memory, said when smaller; `rows` off CUDA."""
    if device.type != "cuda":
        return rows
    budget = constants.GPU_MEMORY_GB * 1e9 if constants.GPU_MEMORY_GB else torch.cuda.mem_get_info(device)[0]
    fitted = largest_fitting_rows(rows, total_rows, fixed_bytes, row_bytes, 0.9 * budget)
    if fitted == 0:
        raise UserError(f"not even one row of the model fits in the {budget / 1e9:.1f} GB of GPU memory free "
                        f"(estimated {(fixed_bytes + row_bytes) / 1e9:.1f} GB): make the model smaller (DEPTH)")
    if fitted != rows:
        print(f"note: DEVICE_BATCH_SIZE {rows} needs about {(fixed_bytes + rows * row_bytes) / 1e9:.0f} GB, more than "
              f"the {budget / 1e9:.1f} GB free: {fitted} rows per micro-batch instead (TOTAL_BATCH_SIZE kept)",
              flush=True)
    return fitted


# ---------------------------------------------------------------------------------------------------------------
# Sliding-window attention: FlexAttention on CUDA, SDPA with an explicit mask elsewhere (PyTorch's SDPA has no
# window). The compute budget's counter sees the library kernels compiled code calls, not the ones the compiler
# writes itself: FlexAttention's is one of those, so under the compute budget the windowed layers take SDPA too.

def sliding_window_mask(window):
    """FlexAttention mask_mod: causal, and a query sees at most `window` keys back (FA3's left window)."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)
    return mask_mod


@functools.lru_cache(maxsize=None)
def block_masks(T, windows, device):
    """FlexAttention block masks {window: BlockMask} for the windows shorter than T, built once."""
    return {w: create_block_mask(sliding_window_mask(w), None, None, T, T, device=device)
            for w in sorted(set(windows)) if w < T}


def attention_masks(T, windows, device):
    """{window: BlockMask} where FlexAttention runs (CUDA, time budget), else {}; called outside compiled code."""
    if device.type != "cuda" or constants.BUDGET == "flops":
        return {}
    return block_masks(T, tuple(windows), device)


def attention(q, k, v, window, block_mask=None):
    """Causal attention seeing at most `window` keys back; q: [B, T, H, D], k, v: [B, T, KV, D] -> [B, T, H, D]."""
    T = q.size(1)
    gqa = q.size(2) != k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if window >= T:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif block_mask is not None:
        y = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(T, window, q.device), enable_gqa=gqa)
    return y.transpose(1, 2)


def window_mask(T, window, device):
    """The explicit [T, T] boolean mask: causal, a query sees at most `window` keys back."""
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff <= window)


def synchronize(device):
    """Wait for the device's queued work (so a step's wall time is its real time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# MFU: peak dense bf16 tensor FLOP/s (no sparsity) from the vendors' datasheets, matched on the CUDA device name in
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
    """(peak bf16 FLOP/s or 0.0, device name, note: why MFU is 0, or "")."""
    if device.type != "cuda":
        return 0.0, device.type, f"MFU is not computed on {device.type}"
    name = torch.cuda.get_device_name(device)
    flops = lookup_peak_flops(name)
    return flops, name, "" if flops else f"{name} is not in hardware.py's PEAK_BF16_FLOPS table: MFU reported as 0"
