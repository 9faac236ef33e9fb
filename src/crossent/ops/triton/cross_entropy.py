# Cross entropy on given logits: per-row softmax statistics (forward) and their gradient (backward).
# - reads:  logits (N, V) in any float dtype and any strides, target (N,) int64, optional class
#           weight (V,); the backward also reads the saved shift and logsum (N,) and the upstream
#           gradients of the three differentiable statistics, (N,) each.
# - writes: forward: shift, logsum, target logit and (with label smoothing) the class-weighted
#           logit sum, all relative to the shift, (N,) each, in float32 (float64 for float64
#           logits). Backward: a NEW gradient tensor (N, V) in the logits dtype; the logits are
#           never written.
# - assumes: one program per row, online softmax over vocabulary blocks of BLOCK_V; targets were
#           validated by the caller (an out-of-range target only makes its target logit read as 0);
#           rows are addressed with 64-bit offsets, so N*V may exceed 2**31.
"""Triton kernels for cross entropy on logits with index targets.

The forward computes, per row ``i`` of the (soft-capped) logits ``z``, with ``m_i`` the row max::

    shift_i   = m_i                                   (0 if the row is all -inf)
    logsum_i  = log Σ_c exp(z_ic - m_i)               (online: running max, rescaled sum)
    zt_i      = z_{i, t_i} - m_i                      (the target logit)
    smooth_i  = Σ_c w_c (z_ic - m_i)                  (label smoothing only; w_c = 1 unweighted)

so that ``lse_i = m_i + logsum_i`` is kept as an unevaluated sum (a double-float): the loss
``lse - z_t = logsum - zt`` and the softmax ``exp((z - m) - logsum)`` then carry no rounding of
``m + logsum``, which would cost up to half an ulp of ``m`` (5e-4 relative at logits of 1e4),
and the smoothing sum cannot overflow or cancel (each term is <= 0, as in torch's
``log_softmax``). The shift is treated as a constant (no gradient): every quantity built from the
statistics depends on ``z - m`` only through these differences, so that is exact.

Every loss option (class weight on the target term, ignore_index, label smoothing, z-loss, all
reductions) is a few elementwise torch ops on these (N,) vectors, in ``_ops.loss_from_stats``;
autograd differentiates those ops and hands the backward kernel ``g_logsum``, ``g_zt``,
``g_smooth``, from which::

    dL/dz_ic = g_logsum_i * softmax(z)_ic + g_zt_i * [c == t_i] + g_smooth_i * w_c
    dL/dx_ic = dL/dz_ic * sech(x_ic / cap)**2             (soft-capping: z = cap*tanh(x/cap))

Only shift and logsum (2N floats: the row's lse) are kept for the backward, which recomputes the
softmax. An ignored row has ``g_logsum = 0``, so its gradient is ``0 * softmax``: NaN where its
logits are NaN or +inf, exactly as torch's ``log_softmax`` backward gives (``g - softmax * Σg``
with ``g = 0``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._helpers import softcap_slope, softcap_tanh
from ._runtime import compute_dtype, interpreting, tl_dtype


@triton.jit
def _forward_kernel(
    logits_ptr,
    stride_row,
    stride_col,
    target_ptr,
    stride_target,
    class_weight_ptr,
    shift_ptr,
    logsum_ptr,
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
    shift = tl.full((), 0.0, COMPUTE)
    running_sum = tl.full((), 0.0, COMPUTE)  # Σ exp(z - shift) over the blocks so far
    smooth = tl.full((), 0.0, COMPUTE)  # Σ w (z - shift) over the blocks so far
    weight_sum = tl.full((), 0.0, COMPUTE)  # Σ w over the blocks so far
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
        new_shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - new_shift) + tl.sum(
            tl.exp(z - new_shift), 0
        )
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
            else:
                w = tl.where(mask, 1.0, 0.0).to(COMPUTE)
            # Re-base the sum on the new shift: every term stays <= 0, nothing cancels.
            smooth = smooth - (new_shift - shift) * weight_sum
            smooth += tl.sum(tl.where(mask, w * (z - new_shift), 0.0), 0)
            weight_sum += tl.sum(w, 0)
        running_max = new_max
        shift = new_shift
    # All -inf: log(0) = -inf. A +inf logit: the sum is NaN, so logsum is NaN (torch too).
    logsum = tl.log(running_sum)

    t = tl.load(target_ptr + row * stride_target)
    t_valid = (t >= 0) & (t < n_classes)
    zt = tl.load(row_ptr + tl.where(t_valid, t, 0) * stride_col, mask=t_valid, other=0.0)
    zt = zt.to(COMPUTE)
    if HAS_SOFTCAP:
        zt = softcap_tanh(zt, softcap)

    tl.store(shift_ptr + row, shift)
    tl.store(logsum_ptr + row, logsum)
    tl.store(target_logit_ptr + row, zt - shift)
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
    shift_ptr,
    logsum_ptr,
    grad_logsum_ptr,
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

    shift = tl.load(shift_ptr + row).to(COMPUTE)
    logsum = tl.load(logsum_ptr + row).to(COMPUTE)
    g_logsum = tl.load(grad_logsum_ptr + row).to(COMPUTE)
    g_zt = tl.load(grad_target_logit_ptr + row).to(COMPUTE)
    t = tl.load(target_ptr + row * stride_target)
    if HAS_SMOOTHING:
        g_smooth = tl.load(grad_smooth_ptr + row).to(COMPUTE)
    for start in range(0, n_classes, BLOCK_V):
        offs = start + cols
        mask = offs < n_classes
        x = tl.load(row_ptr + offs.to(tl.int64) * stride_col, mask=mask, other=0.0).to(COMPUTE)
        if HAS_SOFTCAP:
            z = softcap_tanh(x, softcap)
        else:
            z = x
        grad = g_logsum * tl.exp((z - shift) - logsum) + tl.where(offs == t, g_zt, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
                grad += g_smooth * w
            else:
                grad += g_smooth
        if HAS_SOFTCAP:
            grad = grad * softcap_slope(x, softcap)
        tl.store(out_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _launch_config(n_classes: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Small blocks under the interpreter so tests cross block edges.

    On the GPU: up to 8192 classes per iteration (16 KB of bf16 per row and step), enough bytes
    in flight per program to stream at bandwidth; 2048 for float64, whose soft-capped backward
    spilled 704 bytes of stack at 8192. To be re-tuned with benchmarks/bench_gpu.py.
    """
    if interpreting():
        return 32, 1
    cap = 2048 if dtype == torch.float64 else 8192
    block = min(cap, triton.next_power_of_2(max(n_classes, 1)))
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    softcap: float,
    with_smoothing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (shift, logsum, target logit, weighted logit sum) of ``softcap(logits)``.

    See the module docstring for the definitions (the last three are relative to the shift).

    Args:
        logits: (N, V) floating, any strides.
        target: (N,) int64 class indices (ignored rows may hold anything).
        class_weight: (V,) contiguous, or None.
        softcap: the cap ``c`` of ``c * tanh(x / c)``, or 0.0 for none.
        with_smoothing: compute the fourth statistic (else it is returned as zeros).

    Returns:
        Four (N,) tensors in float32 (float64 for float64 logits).
    """
    n_rows, n_classes = logits.shape
    shift, logsum, target_logit, smooth = (
        torch.zeros(n_rows, dtype=compute_dtype(logits.dtype), device=logits.device)
        for _ in range(4)
    )
    if n_rows == 0:
        return shift, logsum, target_logit, smooth
    block, num_warps = _launch_config(n_classes, logits.dtype)
    _forward_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        target,
        target.stride(0),
        class_weight if class_weight is not None else shift,
        shift,
        logsum,
        target_logit,
        smooth,
        n_classes,
        float(softcap),
        HAS_SOFTCAP=softcap != 0.0,
        HAS_SMOOTHING=with_smoothing,
        HAS_WEIGHT=class_weight is not None,
        COMPUTE=tl_dtype(shift.dtype),
        BLOCK_V=block,
        num_warps=num_warps,
    )
    return shift, logsum, target_logit, smooth


def backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    shift: torch.Tensor,
    logsum: torch.Tensor,
    grad_logsum: torch.Tensor,
    grad_target_logit: torch.Tensor,
    grad_smooth: torch.Tensor,
    softcap: float,
    with_smoothing: bool,
) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` given the gradients of the statistics (see module doc).

    Returns:
        A new contiguous (N, V) tensor in the logits dtype.
    """
    n_rows, n_classes = logits.shape
    grad_logits = torch.empty((n_rows, n_classes), dtype=logits.dtype, device=logits.device)
    if n_rows == 0 or n_classes == 0:
        return grad_logits
    block, num_warps = _launch_config(n_classes, logits.dtype)
    _backward_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        target,
        target.stride(0),
        class_weight if class_weight is not None else logsum,
        shift,
        logsum,
        grad_logsum.contiguous(),
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
