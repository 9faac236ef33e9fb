# Cross entropy on given logits: per-row softmax statistics (forward) and their gradient (backward).
# - reads:  logits (N, V) in any float dtype and any strides, target (N,) int64, optional class
#           weight (V,); the backward also reads lse (N,) and the upstream gradients of the three
#           statistics (N,) each.
# - writes: forward: lse, target logit and (with label smoothing) the class-weighted logit sum,
#           (N,) each, in the statistics dtype (float32; float64 for float64 logits). Backward: a
#           NEW gradient tensor (N, V) in the logits dtype; the logits are never written.
# - assumes: one program per row, online softmax over vocabulary blocks of BLOCK_V; targets were
#           validated by the caller (an out-of-range target only makes its target logit read as 0);
#           rows are addressed with 64-bit offsets, so N*V may exceed 2**31.
"""Triton kernels for cross entropy on logits with index targets.

The forward computes three statistics per row ``i`` of the (soft-capped) logits ``z``::

    lse_i    = log Σ_c exp(z_ic)                    (online: running max and rescaled sum)
    zt_i     = z_{i, t_i}                           (the target logit)
    smooth_i = Σ_c w_c z_ic                         (only with label smoothing; w_c = 1 unweighted)

Every loss option (class weight on the target term, ignore_index, label smoothing, z-loss, all
reductions) is a few elementwise torch ops on these (N,) vectors, in ``_ops.loss_from_stats``;
autograd differentiates those ops and hands the backward kernel ``g_lse``, ``g_zt``, ``g_smooth``,
from which::

    dL/dz_ic = g_lse_i * softmax(z)_ic + g_zt_i * [c == t_i] + g_smooth_i * w_c
    dL/dx_ic = dL/dz_ic * (1 - (z_ic / cap)**2)                 (soft-capping: z = cap*tanh(x/cap))

Only ``lse`` (N floats) is kept for the backward, which recomputes the softmax. An ignored row has
``g_lse = 0``, so its gradient is ``0 * softmax``: NaN where its logits are NaN or +inf, exactly as
torch's ``log_softmax`` backward gives (``g - softmax * Σg`` with ``g = 0``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import softcap_tanh
from ._runtime import compute_dtype, interpreting, tl_dtype


@triton.jit
def _forward_kernel(
    logits_ptr,
    stride_row,
    stride_col,
    target_ptr,
    stride_target,
    class_weight_ptr,
    lse_ptr,
    target_logit_ptr,
    smooth_ptr,
    n_classes,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    running_max = tl.full((), float("-inf"), COMPUTE)
    running_sum = tl.full((), 0.0, COMPUTE)
    smooth = tl.full((), 0.0, COMPUTE)
    for start in range(0, n_classes, BLOCK_V):
        offs = start + cols
        mask = offs < n_classes
        z = tl.load(row_ptr + offs.to(tl.int64) * stride_col, mask=mask, other=0.0).to(COMPUTE)
        if HAS_SOFTCAP:
            z = softcap_tanh(z, softcap)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, 0))
        # A block (or a whole row so far) of -inf logits leaves the max at -inf; shifting by 0
        # then keeps exp(-inf - shift) = 0 instead of exp(-inf + inf) = NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), 0)
        running_max = new_max
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
                smooth += tl.sum(tl.where(mask, w * z, 0.0), 0)
            else:
                smooth += tl.sum(tl.where(mask, z, 0.0), 0)
    # All -inf: -inf + log(0) = -inf. A +inf logit: the sum is NaN, so lse is NaN (torch too).
    lse = running_max + tl.log(running_sum)

    t = tl.load(target_ptr + row * stride_target)
    t_valid = (t >= 0) & (t < n_classes)
    zt = tl.load(row_ptr + tl.where(t_valid, t, 0) * stride_col, mask=t_valid, other=0.0)
    zt = zt.to(COMPUTE)
    if HAS_SOFTCAP:
        zt = softcap_tanh(zt, softcap)

    tl.store(lse_ptr + row, lse)
    tl.store(target_logit_ptr + row, zt)
    if HAS_SMOOTHING:
        tl.store(smooth_ptr + row, smooth)


@triton.jit
def _backward_kernel(
    logits_ptr,
    stride_row,
    stride_col,
    target_ptr,
    stride_target,
    class_weight_ptr,
    lse_ptr,
    grad_lse_ptr,
    grad_target_logit_ptr,
    grad_smooth_ptr,
    grad_logits_ptr,
    n_classes,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_logits_ptr + row * n_classes
    cols = tl.arange(0, BLOCK_V)

    lse = tl.load(lse_ptr + row).to(COMPUTE)
    g_lse = tl.load(grad_lse_ptr + row).to(COMPUTE)
    g_zt = tl.load(grad_target_logit_ptr + row).to(COMPUTE)
    t = tl.load(target_ptr + row * stride_target)
    if HAS_SMOOTHING:
        g_smooth = tl.load(grad_smooth_ptr + row).to(COMPUTE)
    for start in range(0, n_classes, BLOCK_V):
        offs = start + cols
        mask = offs < n_classes
        z = tl.load(row_ptr + offs.to(tl.int64) * stride_col, mask=mask, other=0.0).to(COMPUTE)
        if HAS_SOFTCAP:
            z = softcap_tanh(z, softcap)
        grad = g_lse * tl.exp(z - lse) + tl.where(offs == t, g_zt, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
                grad += g_smooth * w
            else:
                grad += g_smooth
        if HAS_SOFTCAP:
            tanh = z / softcap
            grad = grad * (1.0 - tanh * tanh)
        tl.store(out_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_classes: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Small blocks under the interpreter so tests cross block edges.

    On the GPU: up to 8192 classes per iteration (16 KB of bf16 per row and step), enough bytes
    in flight per program to stream at bandwidth; to be re-tuned with benchmarks/bench_gpu.py.
    """
    if interpreting():
        return 32, 1
    block = min(8192, triton.next_power_of_2(max(n_classes, 1)))
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    softcap: float,
    with_smoothing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (lse, target logit, weighted logit sum) of ``softcap(logits)``; see module doc.

    Args:
        logits: (N, V) floating, any strides.
        target: (N,) int64 class indices (ignored rows may hold anything).
        class_weight: (V,) or None.
        softcap: the cap ``c`` of ``c * tanh(x / c)``, or 0.0 for none.
        with_smoothing: compute the third statistic (else it is returned as zeros).

    Returns:
        Three (N,) tensors in float32 (float64 for float64 logits).
    """
    n_rows, n_classes = logits.shape
    stats_dtype = compute_dtype(logits.dtype)
    lse = torch.empty(n_rows, dtype=stats_dtype, device=logits.device)
    target_logit = torch.empty_like(lse)
    smooth = torch.zeros_like(lse)  # stays zero without label smoothing
    if n_rows == 0:
        return lse, target_logit, smooth
    block, num_warps = _launch_config(n_classes)
    _forward_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        target,
        target.stride(0),
        class_weight if class_weight is not None else lse,
        lse,
        target_logit,
        smooth,
        n_classes,
        float(softcap),
        HAS_SOFTCAP=softcap != 0.0,
        HAS_SMOOTHING=with_smoothing,
        HAS_WEIGHT=class_weight is not None,
        COMPUTE=tl_dtype(stats_dtype),
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return lse, target_logit, smooth


def backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_target_logit: torch.Tensor,
    grad_smooth: torch.Tensor,
    softcap: float,
    with_smoothing: bool,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` given the gradients of the three statistics (see module doc).

    Returns:
        A new contiguous (N, V) tensor in the logits dtype.
    """
    n_rows, n_classes = logits.shape
    grad_logits = torch.empty((n_rows, n_classes), dtype=logits.dtype, device=logits.device)
    if n_rows == 0 or n_classes == 0:
        return grad_logits
    block, num_warps = _launch_config(n_classes)
    _backward_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        target,
        target.stride(0),
        class_weight if class_weight is not None else lse,
        lse,
        grad_lse.contiguous(),
        grad_target_logit.contiguous(),
        grad_smooth.contiguous(),
        grad_logits,
        n_classes,
        float(softcap),
        HAS_SOFTCAP=softcap != 0.0,
        HAS_SMOOTHING=with_smoothing,
        HAS_WEIGHT=class_weight is not None,
        COMPUTE=tl_dtype(compute_dtype(logits.dtype)),
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return grad_logits
