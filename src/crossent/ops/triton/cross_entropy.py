# Cross entropy on given logits: per-row softmax statistics (forward) and their gradient (backward).
# - reads:  logits (N, V) in any float dtype and any strides, target (N,) int64, optional class
#           weight (V,); the backward also reads the saved row_max and logsum (N,) and the upstream
#           gradients of the three differentiable statistics, (N,) each.
# - writes: forward: row_max, logsum, target logit and (with label smoothing) the class-weighted
#           logit sum, all relative to row_max, (N,) each, in float32 (float64 for float64
#           logits). Backward: a NEW gradient tensor (N, V) in the logits dtype; the logits are
#           never written.
# - assumes: one program per row, online softmax over vocabulary blocks of BLOCK_V; targets were
#           validated by the caller (an out-of-range target only makes its target logit read as 0);
#           rows are addressed with 64-bit offsets, so N*V may exceed 2**31.
"""Triton kernels for cross entropy on logits with index targets.

The forward computes, per row ``i`` of the (soft-capped) logits ``z``, with ``m_i`` the row max::

    row_max_i = m_i                                   (0 if the row is all -inf)
    logsum_i  = log Σ_c exp(z_ic - m_i)               (online: running max, rescaled sum)
    zt_i      = z_{i, t_i} - m_i                      (the target logit)
    smooth_i  = Σ_c w_c (z_ic - m_i)                  (label smoothing only; w_c = 1 unweighted)

so that ``lse_i = m_i + logsum_i`` is kept as an unevaluated sum (a double-float): the loss
``lse - z_t = logsum - zt`` and the softmax ``exp((z - m) - logsum)`` then carry no rounding of
``m + logsum``, which would cost up to half an ulp of ``m`` (5e-4 relative at logits of 1e4),
and the smoothing sum cannot overflow or cancel (each term is <= 0, as in torch's
``log_softmax``). The row max is treated as a constant (no gradient): every quantity built from the
statistics depends on ``z - m`` only through these differences, so that is exact.

Every loss option (class weight on the target term, ignore_index, label smoothing, z-loss, all
reductions) is a few elementwise torch ops on these (N,) vectors, defined once in
``crossent.ops._stats`` (applied by ``_ops.loss_from_stats``); autograd differentiates those ops
and hands the backward kernel ``g_logsum``, ``g_zt``, ``g_smooth``, from which::

    dL/dz_ic = g_logsum_i * softmax(z)_ic + g_zt_i * [c == t_i] + g_smooth_i * w_c

The kernels hold no loss convention: ``_stats``' row factor ``(1-ε)·w_t + (ε/V)·W + 2ζ·lse``
reaches them only as ``g_logsum``, ``-(1-ε)·w_t`` as ``g_zt`` and ``-(ε/V)`` as ``g_smooth`` (each
times the reduction's row scale), so a change in ``_stats`` needs no kernel change.
    dL/dx_ic = dL/dz_ic * sech(x_ic / cap)**2             (soft-capping: z = cap*tanh(x/cap))

Only row_max and logsum (2N floats: the row's lse) are kept for the backward, which recomputes the
softmax. An ignored row has ``g_logsum = 0``, so its gradient is ``0 * softmax``: NaN where its
logits are NaN or +inf, exactly as torch's ``log_softmax`` backward gives (``g - softmax * Σg``
with ``g = 0``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._stats import compute_dtype
from ._helpers import softcap_slope, softcap_tanh
from ._launch import ce_block, option_flags
from ._runtime import tl_dtype


@triton.jit
def _forward_kernel(
    logits_ptr, stride_row, stride_col, target_ptr, stride_target, class_weight_ptr,
    row_max_ptr, logsum_ptr, target_logit_ptr, smooth_ptr,  # outputs, (N,) each
    n_classes, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    running_max = tl.full((), float("-inf"), COMPUTE)
    shift = tl.full((), 0.0, COMPUTE)  # the running max, 0 while it is -inf
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

    tl.store(row_max_ptr + row, shift)
    tl.store(logsum_ptr + row, logsum)
    tl.store(target_logit_ptr + row, zt - shift)
    if HAS_SMOOTHING:
        tl.store(smooth_ptr + row, smooth)


@triton.jit
def _backward_kernel(
    logits_ptr, stride_row, stride_col, target_ptr, stride_target, class_weight_ptr,
    row_max_ptr, logsum_ptr,  # saved by the forward
    grad_logsum_ptr, grad_target_logit_ptr, grad_smooth_ptr,  # upstream, (N,) each
    grad_logits_ptr,  # output, (N, V)
    n_classes, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    out_ptr = grad_logits_ptr + row * n_classes
    cols = tl.arange(0, BLOCK_V)

    row_max = tl.load(row_max_ptr + row).to(COMPUTE)
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
        grad = g_logsum * tl.exp((z - row_max) - logsum) + tl.where(offs == t, g_zt, 0.0)
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
                grad += g_smooth * w
            else:
                grad += g_smooth
        if HAS_SOFTCAP:
            grad = grad * softcap_slope(x, softcap)
        tl.store(out_ptr + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _launch(
    kernel,
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    buffers: tuple[torch.Tensor, ...],
    softcap: float,
    with_smoothing: bool,
) -> None:
    """Run ``kernel`` (either of the two above) with one program per row.

    ``buffers`` are the kernel's arguments between ``class_weight_ptr`` and ``n_classes``; the
    first of them stands in for an absent class weight (never read then).
    """
    n_rows, n_classes = logits.shape
    block, num_warps = ce_block(n_classes, logits.dtype)
    kernel[(n_rows,)](
        logits,
        logits.stride(0),
        logits.stride(1),
        target,
        target.stride(0),
        class_weight if class_weight is not None else buffers[0],
        *buffers,
        n_classes,
        float(softcap),
        **option_flags(softcap, with_smoothing, class_weight is not None),
        COMPUTE=tl_dtype(compute_dtype(logits.dtype)),
        BLOCK_V=block,
        num_warps=num_warps,
    )


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    softcap: float,
    with_smoothing: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (row_max, logsum, target logit, weighted logit sum) of ``softcap(logits)``.

    See the module docstring for the definitions (the last three are relative to row_max).

    Args:
        logits: (N, V) floating, any strides.
        target: (N,) int64 class indices (ignored rows may hold anything).
        class_weight: (V,) contiguous, or None.
        softcap: the cap ``c`` of ``c * tanh(x / c)``, or 0.0 for none.
        with_smoothing: compute the fourth statistic (else it is returned as zeros).

    Returns:
        Four (N,) tensors in float32 (float64 for float64 logits).
    """
    n_rows = logits.shape[0]
    stats = tuple(
        torch.zeros(n_rows, dtype=compute_dtype(logits.dtype), device=logits.device)
        for _ in range(4)
    )
    if n_rows > 0:
        _launch(_forward_kernel, logits, target, class_weight, stats, softcap, with_smoothing)
    return stats


def backward(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_weight: torch.Tensor | None,
    row_max: torch.Tensor,
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
    grads = (grad_logsum.contiguous(), grad_target_logit.contiguous(), grad_smooth.contiguous())
    buffers = (row_max, logsum, *grads, grad_logits)
    _launch(_backward_kernel, logits, target, class_weight, buffers, softcap, with_smoothing)
    return grad_logits
