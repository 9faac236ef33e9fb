# Linear cross entropy: logits = input @ linear_weight.T + bias, fused with the softmax statistics.
# - reads:  input (N, D), linear_weight (V, D), optional bias (V,), target (N,) int64, optional
#           class weight (V,); the backward also reads the saved row_max and logsum (N,) and the
#           upstream gradients of the three differentiable statistics, (N,) each.
# - writes: forward: per-(row, vocabulary slice) partial statistics (N, S), merged on the host
#           into row_max, logsum, target logit and weighted logit sum, (N,) each. Backward:
#           gradients w.r.t. input, linear_weight and bias, accumulated with atomic adds into
#           zeroed float32 buffers (float64 for float64 data), cast to the parameters' dtypes.
# - assumes: logit tiles of BLOCK_N x BLOCK_V live only in registers (N x V logits never reach
#           global memory); tl.dot accumulates in float32; 64-bit row/column offsets; rows whose
#           target is ignore_index are skipped in the backward: they add nothing to any
#           gradient, not even NaN from a non-finite hidden state (their input rows are never
#           loaded into the weight-gradient products and their input-gradient rows stay 0).
"""Triton kernels for linear cross entropy (a classifier layer fused with cross entropy).

The statistics are those of ``cross_entropy.py`` (see its docstring): per row ``row_max`` ``m``,
``logsum = log Σ exp(z - m)`` (so ``lse = m + logsum``, unevaluated), the target logit and the
class-weighted logit sum relative to ``m``.

Forward, per program (a block of BLOCK_N rows, one of S slices of the vocabulary): for each
vocabulary tile, ``acc = X[rows] @ W[cols].T`` is accumulated over BLOCK_D slices of the hidden
dimension (``tl.dot``, float32 accumulator), the bias is added and the soft-cap applied, and the
tile is folded into a running max / rescaled sum of exponentials (online softmax), the target
logit (picked out of the same tile, so it has exactly the precision of the log-sum-exp) and the
class-weighted logit sum. The S partial results per row are merged on the host with a few
(N, S) torch ops; S is chosen so that enough programs exist to fill the GPU.

Backward, per program (one BLOCK_N x BLOCK_V tile, grouped so that concurrent programs share
input rows and weight tiles in L2): recompute the logit tile, form ::

    dz = g_logsum * softmax(z) + g_zt * onehot(t) + g_smooth * w    (times 1 - tanh^2 with softcap)

then, for each BLOCK_D slice, ``dX[rows] += dz @ W[cols]`` and ``dW[cols] += dz.T @ X[rows]``
(``tl.dot``, then atomic adds into float32 buffers) and ``db[cols] += Σ_rows dz``. No gradient
filtering: every tile is computed, so the gradients are exact up to float32 rounding; the order
of the atomic additions is not fixed, so the last bits may vary from run to run on a GPU.

As in ``cross_entropy.py``, the kernels hold no loss convention (``crossent.ops._stats`` does,
and reaches them only through ``g_logsum``, ``g_zt``, ``g_smooth``). The tile sizes and launch
options are chosen in ``_launch.py`` (:func:`~._launch.lce_tiles`, :func:`~._launch.dot_flags`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._stats import compute_dtype
from ._helpers import dot_acc, softcap_slope, softcap_tanh
from ._launch import dot_flags, lce_tiles, option_flags
from ._runtime import sm_count, tl_dtype


@triton.jit
def _logit_tile(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
    rows64, row_mask, v_start, v_end, D,
    HAS_BIAS: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """The (BLOCK_N, BLOCK_V) tile of X @ W.T + b at classes ``v_start + [0, BLOCK_V)`` in COMPUTE
    precision (before soft-capping), with its classes ``cols``, ``cols64`` and ``col_mask``
    (classes below ``v_end``)."""
    cols = v_start + tl.arange(0, BLOCK_V)
    col_mask = cols < v_end
    cols64 = cols.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=COMPUTE)
    dims = tl.arange(0, BLOCK_D)
    for d_start in range(0, D, BLOCK_D):
        d_offs = d_start + dims
        d_mask = d_offs < D
        x_tile = tl.load(
            x_ptr + rows64[:, None] * stride_xn + d_offs[None, :] * stride_xd,
            mask=row_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        w_tile = tl.load(
            w_ptr + cols64[None, :] * stride_wv + d_offs[:, None] * stride_wd,
            mask=col_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_V): W transposed by addressing
        acc = dot_acc(x_tile, w_tile, acc, UPCAST_DOT, IEEE_DOT)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols64 * stride_b, mask=col_mask, other=0.0).to(COMPUTE)
        acc += bias[None, :]
    return acc, cols, cols64, col_mask


@triton.jit
def _forward_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
    target_ptr, class_weight_ptr,
    part_max_ptr, part_sum_ptr, part_target_ptr, part_smooth_ptr, part_weight_sum_ptr,  # (N, S)
    N, V, D, softcap, tiles_per_split, n_splits,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    target = tl.load(target_ptr + rows64, mask=row_mask, other=-1)

    running_max = tl.full((BLOCK_N,), float("-inf"), COMPUTE)
    shift = tl.zeros((BLOCK_N,), dtype=COMPUTE)  # the running max, 0 while it is -inf
    running_sum = tl.zeros((BLOCK_N,), dtype=COMPUTE)  # Σ exp(z - shift)
    target_logit = tl.zeros((BLOCK_N,), dtype=COMPUTE)  # raw z_t (0 if not in this slice)
    smooth = tl.zeros((BLOCK_N,), dtype=COMPUTE)  # Σ w (z - shift)
    weight_sum = tl.zeros((), dtype=COMPUTE)  # Σ w over this slice's classes so far
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_begin + tiles_per_split * BLOCK_V)
    for v_start in range(v_begin, v_end, BLOCK_V):
        z, cols, cols64, col_mask = _logit_tile(
            x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
            rows64, row_mask, v_start, v_end, D,
            HAS_BIAS, UPCAST_DOT, IEEE_DOT, COMPUTE, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        if HAS_SOFTCAP:
            z = softcap_tanh(z, softcap)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, 1))
        new_shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - new_shift) + tl.sum(
            tl.exp(z - new_shift[:, None]), 1
        )
        target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + cols64, mask=col_mask, other=0.0).to(COMPUTE)
            else:
                w = tl.where(col_mask, 1.0, 0.0).to(COMPUTE)
            smooth = smooth - (new_shift - shift) * weight_sum  # re-base: terms stay <= 0
            rel = tl.where(col_mask[None, :], w[None, :] * (z - new_shift[:, None]), 0.0)
            smooth += tl.sum(rel, 1)
            weight_sum += tl.sum(w, 0)
        running_max = new_max
        shift = new_shift

    out = rows64 * n_splits + split
    tl.store(part_max_ptr + out, running_max, mask=row_mask)
    tl.store(part_sum_ptr + out, running_sum, mask=row_mask)
    tl.store(part_target_ptr + out, target_logit, mask=row_mask)
    if HAS_SMOOTHING:
        tl.store(part_smooth_ptr + out, smooth, mask=row_mask)
        tl.store(
            part_weight_sum_ptr + out, tl.zeros((BLOCK_N,), COMPUTE) + weight_sum, mask=row_mask
        )


@triton.jit
def _backward_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
    target_ptr, class_weight_ptr,
    row_max_ptr, logsum_ptr,  # saved by the forward
    grad_logsum_ptr, grad_target_logit_ptr, grad_smooth_ptr,  # upstream, (N,) each
    grad_x_ptr, grad_w_ptr, grad_b_ptr,  # outputs, zeroed accumulators
    N, V, D, ignore_index, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, NEED_GRAD_X: tl.constexpr, NEED_GRAD_W: tl.constexpr,
    NEED_GRAD_B: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):  # fmt: skip
    # Grouped tile order: GROUP_N row blocks sweep the vocabulary together, so the programs
    # running at one time share their input rows and weight tiles in L2.
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_col_blocks = tl.cdiv(V, BLOCK_V)
    tiles_per_group = GROUP_N * n_col_blocks
    first_row_block = (pid // tiles_per_group) * GROUP_N
    group_size = tl.minimum(n_row_blocks - first_row_block, GROUP_N)
    pid_n = first_row_block + (pid % tiles_per_group) % group_size
    pid_v = (pid % tiles_per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    target = tl.load(target_ptr + rows64, mask=row_mask, other=0)
    active = row_mask & (target != ignore_index)
    if tl.sum(active.to(tl.int32), 0) > 0:  # a tile of ignored (or padding) rows does nothing
        z, cols, cols64, col_mask = _logit_tile(
            x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, b_ptr, stride_b,
            rows64, row_mask, pid_v * BLOCK_V, V, D,
            HAS_BIAS, UPCAST_DOT, IEEE_DOT, COMPUTE, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        if HAS_SOFTCAP:
            raw = z
            z = softcap_tanh(raw, softcap)
        row_max = tl.load(row_max_ptr + rows64, mask=row_mask, other=0.0).to(COMPUTE)
        logsum = tl.load(logsum_ptr + rows64, mask=row_mask, other=0.0).to(COMPUTE)
        g_logsum = tl.load(grad_logsum_ptr + rows64, mask=row_mask, other=0.0).to(COMPUTE)
        g_zt = tl.load(grad_target_logit_ptr + rows64, mask=row_mask, other=0.0).to(COMPUTE)
        dz = g_logsum[:, None] * tl.exp((z - row_max[:, None]) - logsum[:, None])
        dz += tl.where(cols[None, :] == target[:, None], g_zt[:, None], 0.0)
        if HAS_SMOOTHING:
            g_smooth = tl.load(grad_smooth_ptr + rows64, mask=row_mask, other=0.0).to(COMPUTE)
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + cols64, mask=col_mask, other=0.0).to(COMPUTE)
                dz += g_smooth[:, None] * w[None, :]
            else:
                dz += g_smooth[:, None]
        if HAS_SOFTCAP:
            dz = dz * softcap_slope(raw, softcap)
        dz = tl.where(active[:, None] & col_mask[None, :], dz, 0.0)

        if NEED_GRAD_B:
            tl.atomic_add(grad_b_ptr + cols64, tl.sum(dz, 0), mask=col_mask, sem="relaxed")
        dz_op = dz.to(x_ptr.dtype.element_ty)  # matmul operands in the data dtype, as torch
        dims = tl.arange(0, BLOCK_D)
        for d_start in range(0, D, BLOCK_D):
            d_offs = d_start + dims
            d_mask = d_offs < D
            if NEED_GRAD_X:
                w_tile = tl.load(
                    w_ptr + cols64[:, None] * stride_wv + d_offs[None, :] * stride_wd,
                    mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )  # (BLOCK_V, BLOCK_D)
                part = dot_acc(
                    dz_op, w_tile, tl.zeros((BLOCK_N, BLOCK_D), COMPUTE), UPCAST_DOT, IEEE_DOT
                )
                tl.atomic_add(
                    grad_x_ptr + rows64[:, None] * D + d_offs[None, :],
                    part,
                    mask=active[:, None] & d_mask[None, :],  # ignored rows stay 0
                    sem="relaxed",
                )
            if NEED_GRAD_W:
                # Ignored rows load as 0: their dz is 0, but 0 * NaN would still be NaN.
                x_tile = tl.load(
                    x_ptr + rows64[:, None] * stride_xn + d_offs[None, :] * stride_xd,
                    mask=active[:, None] & d_mask[None, :],
                    other=0.0,
                )  # (BLOCK_N, BLOCK_D)
                part = dot_acc(
                    tl.trans(dz_op), x_tile, tl.zeros((BLOCK_V, BLOCK_D), COMPUTE),
                    UPCAST_DOT, IEEE_DOT,
                )  # fmt: skip
                tl.atomic_add(
                    grad_w_ptr + cols64[:, None] * D + d_offs[None, :],
                    part,
                    mask=col_mask[:, None] & d_mask[None, :],
                    sem="relaxed",
                )


def _operands(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
) -> tuple:
    """The kernels' first ten arguments, ``x_ptr`` to ``class_weight_ptr`` (the input stands in
    for an absent bias or class weight; never read then)."""
    return (
        input,
        input.stride(0),
        input.stride(1),
        linear_weight,
        linear_weight.stride(0),
        linear_weight.stride(1),
        linear_bias if linear_bias is not None else input,
        linear_bias.stride(0) if linear_bias is not None else 0,
        target,
        class_weight if class_weight is not None else input,
    )


def _constexprs(
    input: torch.Tensor,
    linear_bias: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    softcap: float,
    with_smoothing: bool,
    backward: bool,
) -> dict:
    """The launch keywords both kernels take: option flags, dot flags, tiles, warps, stages."""
    return dict(
        HAS_BIAS=linear_bias is not None,
        **option_flags(softcap, with_smoothing, class_weight is not None),
        COMPUTE=tl_dtype(compute_dtype(input.dtype)),
        **dot_flags(input.dtype),
        **lce_tiles(input.dtype, backward=backward, softcap=softcap != 0.0),
    )


def forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    softcap: float,
    with_smoothing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (row_max, logsum, target logit, weighted logit sum) of ``softcap(x @ W.T + b)``.

    The statistics of ``cross_entropy.forward`` (see that module's docstring): ``lse = row_max +
    logsum`` as an unevaluated sum, the last two relative to row_max.

    Args:
        input: (N, D) floating, any strides.
        linear_weight: (V, D), same dtype as ``input``, any strides.
        linear_bias: (V,) or None.
        target: (N,) int64, contiguous.
        class_weight: (V,) contiguous, or None.
        softcap: cap of ``c * tanh(x / c)``, 0.0 for none.
        with_smoothing: compute the weighted logit sum (else zeros).

    Returns:
        Four (N,) tensors in float32 (float64 for float64 data).
    """
    n_rows, hidden = input.shape
    n_classes = linear_weight.shape[0]
    stats_dtype = compute_dtype(input.dtype)
    device = input.device
    options = (softcap, with_smoothing)
    constexprs = _constexprs(input, linear_bias, class_weight, *options, backward=False)
    n_row_blocks = triton.cdiv(n_rows, constexprs["BLOCK_N"])
    n_col_tiles = triton.cdiv(n_classes, constexprs["BLOCK_V"])
    if n_rows == 0 or n_classes == 0:
        zeros = [torch.zeros(n_rows, dtype=stats_dtype, device=device) for _ in range(4)]
        zeros[1].fill_(float("-inf"))  # logsum of no classes
        return tuple(zeros)
    # Split the vocabulary so that about two programs per SM exist even for short batches.
    splits = max(1, min(n_col_tiles, triton.cdiv(2 * sm_count(device), n_row_blocks)))
    tiles_per_split = triton.cdiv(n_col_tiles, splits)
    splits = triton.cdiv(n_col_tiles, tiles_per_split)
    parts = tuple(torch.zeros((n_rows, splits), dtype=stats_dtype, device=device) for _ in range(5))
    part_max, part_sum, part_target, part_smooth, part_weight_sum = parts
    _forward_kernel[(n_row_blocks, splits)](
        *_operands(input, linear_weight, linear_bias, target, class_weight),
        *parts,
        n_rows,
        n_classes,
        hidden,
        float(softcap),
        tiles_per_split,
        splits,
        **constexprs,
    )
    # Merge the vocabulary slices onto the row's overall max (each slice's sums are relative to
    # its own shift, its max or 0; a slice of -inf logits has max -inf, shift 0 and sums 0).
    overall_max = part_max.amax(dim=1)
    row_max = torch.where(overall_max == float("-inf"), 0.0, overall_max)
    part_shift = torch.where(part_max == float("-inf"), 0.0, part_max)
    logsum = (part_sum * torch.exp(part_max - row_max[:, None])).sum(dim=1).log()
    target_logit = part_target.sum(dim=1) - row_max
    smooth = (part_smooth - (row_max[:, None] - part_shift) * part_weight_sum).sum(dim=1)
    return row_max, logsum, target_logit, smooth


def backward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    row_max: torch.Tensor,
    logsum: torch.Tensor,
    grad_logsum: torch.Tensor,
    grad_target_logit: torch.Tensor,
    grad_smooth: torch.Tensor,
    ignore_index: int,
    softcap: float,
    with_smoothing: bool,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. input, linear_weight and bias from those of the statistics.

    Returns:
        (grad_input (N, D), grad_weight (V, D), grad_bias (V,)) in the dtypes of input,
        linear_weight and bias; a gradient not asked for is returned as an empty (0,) tensor.
    """
    n_rows, hidden = input.shape
    n_classes = linear_weight.shape[0]
    device = input.device
    acc_dtype = compute_dtype(input.dtype)
    need_grad_bias = need_grad_bias and linear_bias is not None
    grad_x = torch.zeros(
        (n_rows, hidden) if need_grad_input else (0,), dtype=acc_dtype, device=device
    )
    grad_w = torch.zeros(
        (n_classes, hidden) if need_grad_weight else (0,), dtype=acc_dtype, device=device
    )
    grad_b = torch.zeros((n_classes,) if need_grad_bias else (0,), dtype=acc_dtype, device=device)
    if n_rows > 0 and n_classes > 0 and (need_grad_input or need_grad_weight or need_grad_bias):
        options = (softcap, with_smoothing)
        constexprs = _constexprs(input, linear_bias, class_weight, *options, backward=True)
        n_tiles = triton.cdiv(n_rows, constexprs["BLOCK_N"])
        n_tiles *= triton.cdiv(n_classes, constexprs["BLOCK_V"])
        _backward_kernel[(n_tiles,)](
            *_operands(input, linear_weight, linear_bias, target, class_weight),
            row_max,
            logsum,
            grad_logsum.contiguous(),
            grad_target_logit.contiguous(),
            grad_smooth.contiguous(),
            grad_x,
            grad_w,
            grad_b,
            n_rows,
            n_classes,
            hidden,
            ignore_index,
            float(softcap),
            NEED_GRAD_X=need_grad_input,
            NEED_GRAD_W=need_grad_weight,
            NEED_GRAD_B=need_grad_bias,
            **constexprs,
        )
    return (
        grad_x.to(input.dtype),
        grad_w.to(linear_weight.dtype),
        grad_b.to(linear_bias.dtype) if linear_bias is not None else grad_b,
    )
