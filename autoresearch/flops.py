"""What the compute budget counts. DO NOT CHANGE: it decides what a run's FLOPs are.

    with flops.counting() as meter:      # runtime.main: from the start of train() to evaluate_bpb's start
        ...                              # meter.total: the FLOPs computed so far, in every thread
    meter.problems()                     # why the count may miss work (the run then compares with no other)

Every torch op that runs while counting is accounted for, in every thread train.py starts: an op with a FLOP
formula (matmuls, attention, RNNs, bilinear, FFTs, linear algebra, int and sparse matmuls) adds its FLOPs; an op
known to cost nothing next to them (elementwise, reductions, views, copies, fills, lookups, random draws) adds none,
except an elementwise op that broadcasts its inputs into more elements than any of them holds (an outer product,
`kron`, a matmul written as a broadcast product), which adds one per output element; any other op is noted, and
makes the run comparable with no other. Work done outside torch (numpy, plain Python) is not seen: code written to
dodge the count can (docs/RUN.md, 'What this cannot prevent'). Compiled code runs compiled: the counter sees the
library calls it makes (cuBLAS matmuls, SDPA's kernels) but not the kernels the compiler writes itself, so the fixed
code keeps its own attention on library kernels under the compute budget (hardware.py).
"""
import contextlib
import math
import sys
import threading

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten


def _sdpa(q, k, v, *args, out_shape=None, **kwargs):
    """Attention forward, q: [B, H, Tq, D], k: [B, KV, Tk, D], v: [.., Dv]: scores and weighted sum, every key."""
    b, h, tq, d = q
    return 2 * b * h * tq * k[-2] * (d + v[-1])


def _sdpa_backward(grad, q, k, v, *args, out_shape=None, **kwargs):
    """Attention backward: the scores again, then the gradients of the weights, V, Q and K."""
    b, h, tq, d = q
    return 2 * b * h * tq * k[-2] * (3 * d + 2 * v[-1])


def _prod(sizes):
    return math.prod(int(s) for s in sizes)


def _operand(n):
    """2 FLOPs per element of operand n: a matrix-vector (mv, addmv's second) or a vector-vector product (dot)."""
    return lambda *shapes, out_shape=None, **kwargs: 2 * _prod(shapes[n])


def _int_mm(a, b, *args, out_shape=None, **kwargs):
    return 2 * a[0] * a[1] * b[1]


def _trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim, *args, out_shape=None, **kwargs):
    """F.bilinear's op: 2 FLOPs per point of the three inputs' broadcast space (size-1 dims at `expand`)."""
    spaces = []
    for shape, expand in ((i1, expand1), (i2, expand2), (i3, expand3)):
        shape = list(shape)
        for dim in sorted(expand):
            shape.insert(dim, 1)
        spaces.append(shape)
    return 2 * _prod(max(sizes) for sizes in zip(*spaces))


def _rnn(input, weights, *, tokens_dim=-1):
    """An RNN layer stack: each token meets every weight matrix once (input and recurrent, each direction)."""
    tokens = _prod(input) // input[tokens_dim]
    return 2 * tokens * sum(_prod(w) for w in weights if len(w) == 2)


def _fft(x, dim, *args, out_shape=None, **kwargs):
    """An FFT over `dim`: 5 n log2(n) per transformed signal of n points (the usual count of a radix-2 FFT)."""
    shape = out_shape if out_shape is not None and _prod(out_shape) > _prod(x) else x
    n = _prod(shape[d] for d in dim)
    return 5 * _prod(shape) * math.log2(max(n, 2))


def _linalg(cost):
    """A formula from cost(m, n, k) per m x n matrix (k: a right-hand side's columns), times the batch."""
    def formula(a, *args, out_shape=None, **kwargs):
        m, n = a[-2], a[-1]
        rhs = next((s for s in args if isinstance(s, (list, tuple, torch.Size)) and len(s) >= 2), None)
        k = rhs[-1] if rhs is not None else n
        return _prod(a[:-2]) * cost(m, n, k)
    return formula


LINALG = {
    "linalg_cholesky_ex": lambda m, n, k: n ** 3 / 3,
    "linalg_lu_factor_ex": lambda m, n, k: m * n * n - n ** 3 / 3,
    "linalg_lu": lambda m, n, k: m * n * n - n ** 3 / 3,
    "linalg_qr": lambda m, n, k: 2 * m * n * n - 2 * n ** 3 / 3,
    "geqrf": lambda m, n, k: 2 * m * n * n - 2 * n ** 3 / 3,
    "_linalg_svd": lambda m, n, k: 4 * m * n * n + 8 * n ** 3,
    "_linalg_eigh": lambda m, n, k: 9 * n ** 3,
    "linalg_pinv": lambda m, n, k: 6 * m * n * n + 8 * n ** 3,  # (an SVD, then a product)
    "linalg_eig": lambda m, n, k: 25 * n ** 3,
    "_linalg_det": lambda m, n, k: 2 * n ** 3 / 3,
    "_linalg_slogdet": lambda m, n, k: 2 * n ** 3 / 3,
    "linalg_inv_ex": lambda m, n, k: 2 * n ** 3,
    "_linalg_solve_ex": lambda m, n, k: 2 * n ** 3 / 3 + 2 * n * n * k,
    "linalg_solve_triangular": lambda m, n, k: n * n * k,
    "triangular_solve": lambda m, n, k: n * n * k,
    "linalg_lu_solve": lambda m, n, k: 2 * n * n * k,
    "cholesky_solve": lambda m, n, k: 2 * n * n * k,
    "cholesky_inverse": lambda m, n, k: 2 * n ** 3 / 3,
    "linalg_lstsq": lambda m, n, k: 2 * m * n * n + 4 * m * n * k,
    "linalg_householder_product": lambda m, n, k: 4 * m * n * n,
    "ormqr": lambda m, n, k: 4 * m * n * k,
    "linalg_matrix_exp": lambda m, n, k: 20 * n ** 3,  # (a Pade approximant: about ten n x n products)
    "linalg_ldl_factor_ex": lambda m, n, k: n ** 3 / 3,
    "linalg_ldl_solve": lambda m, n, k: 2 * n * n * k,
}

# Ops that cost nothing next to the matmuls, beyond what their tags say (torch.Tag.pointwise, reduction, views), what
# makes a tensor from no tensor (zeros, arange, randn) and the optimizer's _foreach_ ops: creation from a tensor,
# copies, fills, indexing and lookups, random draws, softmax and losses (per-element work), norms, bookkeeping.
FREE = {
    "empty_like", "new_empty", "new_empty_strided", "zeros_like", "new_zeros", "ones_like", "new_ones", "full_like",
    "new_full", "tril", "triu", "copy_", "_to_copy", "clone", "contiguous", "_copy_from", "_copy_from_and_resize",
    "copy", "fill_", "zero_", "fill", "lift_fresh", "lift_fresh_copy", "detach", "alias", "set_", "resize_",
    "resize_as_", "_local_scalar_dense", "item", "cat", "stack", "split", "split_with_sizes", "unsafe_split",
    "unsafe_split_with_sizes", "chunk", "unbind", "index", "index_put_", "index_put", "_index_put_impl_",
    "index_select", "index_add_", "index_add", "index_copy_", "index_fill_", "gather", "scatter", "scatter_",
    "scatter_add", "scatter_add_", "scatter_reduce", "masked_fill", "masked_fill_", "masked_scatter", "masked_select",
    "embedding", "embedding_dense_backward", "embedding_backward", "_embedding_bag", "one_hot", "flip", "roll",
    "repeat", "repeat_interleave", "tile", "constant_pad_nd", "pad", "narrow_copy", "slice_scatter", "select_scatter",
    "diagonal_scatter", "as_strided_scatter", "select_backward", "slice_backward", "index_select_backward", "sort",
    "argsort", "topk", "kthvalue", "unique", "_unique2", "nonzero", "searchsorted", "bucketize", "histc", "bincount",
    "normal_", "uniform_", "bernoulli_", "bernoulli", "random_", "exponential_", "multinomial", "randn_like",
    "rand_like", "randint_like", "native_dropout", "native_dropout_backward", "_softmax", "_log_softmax",
    "_softmax_backward_data", "_log_softmax_backward_data", "_safe_softmax", "nll_loss_forward", "nll_loss_backward",
    "nll_loss2d_forward", "nll_loss2d_backward", "cross_entropy_loss", "mse_loss", "mse_loss_backward",
    "binary_cross_entropy", "binary_cross_entropy_backward", "binary_cross_entropy_with_logits", "smooth_l1_loss",
    "smooth_l1_loss_backward", "huber_loss", "huber_loss_backward", "_fused_rms_norm", "_fused_rms_norm_backward",
    "native_layer_norm", "native_layer_norm_backward", "native_group_norm", "native_group_norm_backward",
    "native_batch_norm", "native_batch_norm_backward", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "cumsum", "cumprod", "logcumsumexp",
    "cummax", "cummin", "_cummax_helper", "_cummin_helper", "linalg_vector_norm", "norm", "_linalg_check_errors",
    "_unsafe_index", "_unsafe_index_put", "_assert_async", "_assert_scalar", "sym_constrain_range_for_size",
    "_fused_sdp_choice", "is_nonzero", "equal", "allclose", "isclose", "_has_compatible_shallow_copy_type",
    "record_stream", "_pin_memory", "pin_memory", "_to_sparse_csr", "_to_dense", "to_sparse", "_to_sparse",
    "_coalesce", "coalesce", "_nested_tensor_from_mask", "view_as_real", "view_as_complex", "_conj", "_neg_view",
    "_conj_physical", "resolve_conj", "resolve_neg", "_reshape_alias", "_unsafe_view", "as_strided",
    "_nested_view_from_buffer", "dropout", "_fused_dropout", "_masked_scale",
    "_amp_foreach_non_finite_check_and_unscale_", "_amp_update_scale_",
}

# Ops with a formula here (shapes in, FLOPs out), beside torch's own registry (mm, addmm, bmm, baddbmm, convolutions,
# CUDA's SDPA kernels): the attention kernels torch lacks, then the common ops that compute without one.
_EXTRA = {
    "_scaled_dot_product_flash_attention_for_cpu": _sdpa,
    "_scaled_dot_product_flash_attention_for_cpu_backward": _sdpa_backward,
    "mv": _operand(0), "addmv": _operand(1), "dot": _operand(0), "vdot": _operand(0), "_int_mm": _int_mm,
    "_trilinear": _trilinear,
    # RNN layers (mkldnn's one at a time: input, w_ih, w_hh); backward: the gradients of the input and the weights
    "mkldnn_rnn_layer": lambda input, w0, w1, *args, **kwargs: _rnn(input, [w0, w1]),
    "mkldnn_rnn_layer_backward": lambda input, w1, w2, *args, **kwargs: 2 * _rnn(input, [w1, w2]),
    "_cudnn_rnn": lambda input, weights, *args, **kwargs: _rnn(input, weights),
    "_cudnn_rnn_backward": lambda input, weights, *args, **kwargs: 2 * _rnn(input, weights),
    "_fft_r2c": _fft, "_fft_c2r": _fft, "_fft_c2c": _fft,
    **{name: _linalg(cost) for name, cost in LINALG.items()},
}
# Matmuls with a sparse operand: 2 FLOPs per stored element and column of the dense one (not the dense count).
SPARSE_MATMULS = {"mm", "addmm", "_sparse_mm", "_sparse_addmm", "sspaddmm", "bmm", "_sparse_sparse_matmul"}


def formulas():
    """{op packet: formula}: torch's registry, with FlexAttention's and this module's."""
    from torch.utils.flop_counter import flop_registry, shape_wrapper
    table = dict(flop_registry)
    for name, formula in _EXTRA.items():
        packet = getattr(aten, name, None)
        if packet is not None:
            table[packet] = shape_wrapper(formula)
    table[torch.ops.higher_order.flex_attention] = shape_wrapper(_sdpa)
    table[torch.ops.higher_order.flex_attention_backward] = shape_wrapper(
        lambda q, k, v, out, lse, grad, *rest, **kw: _sdpa_backward(grad, q, k, v))
    return table


def costs_nothing(func, args=()):
    """Whether an op costs nothing: pointwise, a reduction, a view, _foreach_, FREE, a profiler mark, no tensor in."""
    if getattr(func, "namespace", "") == "profiler":
        return True
    tags = getattr(func, "tags", ())
    if {torch.Tag.pointwise, torch.Tag.reduction, torch.Tag.view_copy, torch.Tag.inplace_view} & set(tags):
        return True
    if getattr(func, "is_view", False) or not any(isinstance(t, torch.Tensor) for t in tree_leaves(args)):
        return True
    name = getattr(getattr(func, "_overloadpacket", None), "__name__", "")
    return name in FREE or name.startswith("_foreach_")


def _distinct(t):
    """The elements a tensor holds, not counting broadcast (stride-0) copies."""
    return _prod(s for s, st in zip(t.shape, t.stride()) if st != 0) if t.layout == torch.strided else t.numel()


def broadcast_flops(args, out):
    """One FLOP per output element of an elementwise op that broadcasts into more than any input holds."""
    inputs = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    if len(inputs) < 2 or not outputs:
        return 0
    made = max(o.numel() for o in outputs)
    return made if made > max(_distinct(t) for t in inputs) else 0


def sparse_flops(args):
    """2 x stored elements x columns of the dense operand, for a matmul with a sparse operand (else None)."""
    tensors = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor)]
    sparse = [t for t in tensors if t.layout != torch.strided]
    if not sparse:
        return None
    dense = [t for t in tensors if t.layout == torch.strided and t.dim() >= 2]
    cols = dense[-1].shape[-1] if dense else 1
    return 2 * sum(t._nnz() if t.layout == torch.sparse_coo else t.values().numel() for t in sparse) * cols


class Meter:
    """The FLOPs of the training phase, counted by a FlopCount in each thread; what the count may miss."""

    def __init__(self):
        self.total = 0.0
        self.on = True  # False once the evaluation starts: nothing after it counts
        self.uncounted = {}  # op name -> calls: ops with no formula that are not known to cost nothing
        self.lock = threading.Lock()
        self.table = formulas()

    def add(self, flops):
        with self.lock:
            self.total += flops

    def problems(self):
        """Why the count may miss work, in words (empty for an honest run)."""
        said = []
        if self.uncounted:
            ops = ", ".join(f"{name} (x{n})" for name, n in sorted(self.uncounted.items()))
            said.append(f"ops the FLOP counter has no formula for ran in training: {ops}")
        return said


class FlopCount(TorchDispatchMode):
    """Counts into a Meter the FLOPs of this thread's ops; compiled code stays compiled (its library calls count)."""

    supports_higher_order_operators = True  # (FlexAttention reaches __torch_dispatch__ as one op)

    @classmethod
    def ignore_compile_internals(cls):
        return True

    def __init__(self, meter=None):
        super().__init__()
        self.meter = meter or Meter()

    @property
    def total(self):
        return self.meter.total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        meter = self.meter
        if not meter.on:
            return out
        packet = getattr(func, "_overloadpacket", func)
        name = getattr(packet, "__name__", str(func))
        flops = sparse_flops(args) if name in SPARSE_MATMULS else None
        if flops is None:
            formula = meter.table.get(packet)
            if formula is not None:
                flops = formula(*args, **kwargs, out_val=out)
            elif torch.Tag.pointwise in getattr(func, "tags", ()):
                flops = broadcast_flops(args, out)
            elif costs_nothing(func, args):
                flops = 0
        if flops is None:
            key = f"aten.{name}" if isinstance(func, torch._ops.OpOverload) and func.namespace == "aten" else str(func)
            with meter.lock:
                meter.uncounted[key] = meter.uncounted.get(key, 0) + 1
        elif flops:
            meter.add(flops)
        return out


_active = None  # the Meter of the counting in progress (one per process)
_mode = None  # the counting thread's FlopCount, while it is on that thread's mode stack


def _count_thread(frame, event, arg):
    """threading's profile hook: a thread started while counting counts into the same meter, for its whole life."""
    sys.setprofile(None)
    meter = _active
    if meter is not None and meter.on:
        FlopCount(meter).__enter__()  # (the mode stack is the thread's own: it ends with the thread)


@contextlib.contextmanager
def counting():
    """Count the FLOPs of the block, in this thread and every thread started in it; yields the Meter."""
    global _active, _mode
    meter = Meter()
    previous_hook = threading.getprofile()
    _active = meter
    threading.setprofile(_count_thread)
    _mode = FlopCount(meter)
    _mode.__enter__()
    try:
        yield meter
    finally:
        meter.on = False
        _active = None
        if _mode is not None:
            _mode.__exit__(None, None, None)
            _mode = None
        threading.setprofile(previous_hook)


def stop():
    """End the counting in progress (the metric calls it as the evaluation starts)."""
    global _active, _mode
    if _active is not None:
        _active.on = False
        _active = None
    if _mode is not None and _get_current_dispatch_mode() is _mode:
        _mode.__exit__(None, None, None)
        _mode = None
