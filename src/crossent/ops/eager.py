"""Portable implementations of the four losses on torch primitives (any device).

Contract of this module:
- reads validated arguments only (``crossent._checks`` has run; nothing here raises for bad
  input, except that torch's own kernels still raise for the value checks that
  ``crossent.functional`` leaves to them, and it re-words), with ``reduction`` already one of
  ``'none' | 'mean' | 'sum'``;
- never writes into a caller's tensor; in-place ops touch only tensors allocated here;
- calls torch's fused loss kernels (``torch._C._nn``, below ``torch.nn.functional``'s Python
  layer) wherever their values are torch's by definition and nothing of crossent's is faster
  or leaner: binary cross entropy, binary cross entropy with logits, NLL, cross entropy with
  probability targets, and cross entropy with class indices on small logits. These give
  torch's values, dtypes, gradients (input and target), double backward, forward-mode AD,
  ``torch.func`` transforms and ``torch.compile`` support by construction. The tests compare
  them with torch *and* with the float64 NumPy reference (``crossent.reference``), so torch is
  not the only oracle of its own kernels.

crossent's own path is :class:`CrossEntropyIndex`, for cross entropy with class indices on
large logits (many classes: LM vocabularies, segmentation with many classes). torch saves an
N×C log-softmax in forward and allocates two more N×C tensors in backward; this Function keeps
only per-row statistics, recomputes the softmax in backward, and writes the gradient once,
block by block. It is used where it measures faster than torch's kernel (``benchmarks/
bench_matrix.py``), see :func:`blocked_cross_entropy_pays`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crossent.ops import _budget, _stats

_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}

# Block budgets (see crossent.ops._budget); read at each call, so that tests can shrink them.
_BYTES_PER_THREAD = _budget.BLOCK_BYTES_PER_THREAD
_MIN_BLOCK_BYTES = _budget.BLOCK_MIN_BYTES
_MAX_BLOCK_BYTES = _budget.BLOCK_MAX_BYTES

# The blocked cross-entropy Function is used from this many classes and this many bytes of
# logits on; below, torch's fused kernel is as fast and its N×C buffers are small (measured,
# see blocked_cross_entropy_pays).
_BLOCKED_MIN_CLASSES = 128
_BLOCKED_MIN_BYTES = 4 << 20


def _index_target(target: Tensor, logits: Tensor) -> Tensor:
    """Class indices in the form every torch kernel takes, with the same values.

    uint8 as int64: torch 2.13 accepts uint8 targets in its checks but some of its kernels
    reject them (the label-smoothing gather, the K-dim NLL). A ``(1,)`` target of ``(C,)``
    input as ``()``: torch accepts it, then fails in the backward (and in the forward with
    label smoothing) on the shape.
    """
    if target.dtype == torch.uint8:
        target = target.long()
    if logits.dim() == 1 and target.dim() == 1:
        target = target.reshape(())
    return target


# --------------------------------------------------------------------------------------------
# torch's fused kernels.


def binary_cross_entropy(x: Tensor, y: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    """torch's kernel: gradient ``(x - y) / max(x(1 - x), 1e-12)`` w.r.t. the input and
    ``-logit(x)`` w.r.t. the target; torch raises for values outside [0, 1]."""
    if weight is not None:
        weight = weight.expand(y.shape)
    return torch._C._nn.binary_cross_entropy(x, y, weight, _REDUCTION_ENUM[reduction])


def binary_cross_entropy_with_logits(
    x: Tensor, y: Tensor, weight: Tensor | None, pos_weight: Tensor | None, reduction: str
) -> Tensor:
    """torch's kernel, whose result has the *target's* dtype; with a float16/bfloat16 target
    and a float32 input it rounds to the target's dtype after each of its ops, as torch does."""
    return torch.binary_cross_entropy_with_logits(
        x, y, weight, pos_weight, _REDUCTION_ENUM[reduction]
    )


def nll_loss(
    log_probs: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str
) -> Tensor:
    """torch's kernel: ``l_i = -w[t_i]·x[i, t_i]`` (0 where ignored); 'mean' divides by
    Σ w[t_i] over kept i (NaN when that is 0 or nothing is kept); torch raises IndexError for
    a kept target outside [0, C)."""
    return torch._C._nn.nll_loss_nd(
        log_probs,
        _index_target(target, log_probs),
        weight,
        _REDUCTION_ENUM[reduction],
        ignore_index,
    )


def cross_entropy_probs(
    logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float, reduction: str
) -> Tensor:
    """torch's kernel: ``l_n = -Σ_c w_c·y'_{n,c}·log_softmax(x)_{n,c}``, ``y' = y(1-ε) + ε/C``;
    'mean' divides by the number of rows, not by the weights (pytorch#61309)."""
    return torch._C._nn.cross_entropy_loss(
        logits, target, weight, _REDUCTION_ENUM[reduction], -100, label_smoothing
    )


def cross_entropy_index_fused(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> Tensor:
    """torch's kernel (log_softmax + NLL + smoothing term); raises IndexError for a kept
    target outside [0, C)."""
    return torch._C._nn.cross_entropy_loss(
        logits, _index_target(target, logits), weight, _REDUCTION_ENUM[reduction], ignore_index,
        label_smoothing,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Cross entropy with class indices on large logits: crossent's blocked Function.


def _safe_target(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(target as int64 with ignored entries replaced by class 0, mask of kept entries)."""
    t = target.long()
    keep = t != ignore_index
    return torch.where(keep, t, 0), keep


def _row_blocks(logits: Tensor) -> tuple[range, int]:
    """Start offsets of blocks of rows (along dim 0) and the rows per block.

    A block holds about ``_BYTES_PER_THREAD`` of float32 per thread (within
    ``[_MIN_BLOCK_BYTES, _MAX_BLOCK_BYTES]``): enough work per thread that the barrier closing
    each op is rare, little enough that the scratch block stays small beside the gradient.
    """
    rows = _budget.block_rows(
        max(1, logits[:1].numel()) * 4,
        torch.get_num_threads(),
        per_thread=_BYTES_PER_THREAD,
        min_bytes=_MIN_BLOCK_BYTES,
        max_bytes=_MAX_BLOCK_BYTES,
    )
    return range(0, logits.shape[0], rows), rows


def blocked_cross_entropy_pays(logits: Tensor) -> bool:
    """Whether :class:`CrossEntropyIndex` is used for these logits.

    It is for (N, C) float32/float64 logits with many classes (≥ 128) and ≥ 4 MB, outside of
    autograd transforms (forward AD, ``torch.func``, ``torch.compile`` take torch's kernel,
    which supports them all). Measured on 2 shared cores (benchmarks/bench_matrix.py):
    2048×32000 float32 0.4-0.65× torch's time in every mode, 0.34× its peak extra memory;
    256×128256 0.6-0.75×; 4096×1000 0.45-0.9×. Not used, measured slower than torch's kernel:
    float16/bfloat16 logits (the statistics in float32 cost a float32 scratch block and a
    conversion pass: 1.5-2.5× at 2048×32000 with all threads), K-dim logits ((4, 150, 128, 128):
    0.7× with one thread but 1.6-2.2× with two), and few classes.
    """
    if (
        logits.dim() != 2
        or logits.shape[1] < _BLOCKED_MIN_CLASSES
        or _stats.is_low_precision(logits.dtype)
    ):
        return False
    if logits.numel() * logits.element_size() < _BLOCKED_MIN_BYTES:
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return torch.autograd.forward_ad.unpack_dual(logits).tangent is None


def is_batched(t: Tensor) -> bool:
    """Whether ``t`` carries a vmap batch dimension: ``autograd.grad(..., is_grads_batched=True)``
    and gradcheck's batched-gradient check vmap over the backward with the legacy batching,
    ``torch.func`` with the functorch one."""
    functorch = torch._C._functorch
    return (
        functorch.is_legacy_batchedtensor(t)
        or functorch.is_batchedtensor(t)
        or torch._C._are_functorch_transforms_active()
    )


class CrossEntropyIndex(torch.autograd.Function):
    """Cross entropy on (N, C) float32/float64 logits and (N,) class indices (the logits
    :func:`blocked_cross_entropy_pays` admits; others take torch's kernel).

    Forward runs torch's fused log-softmax on one cache-sized block of rows at a time into a
    reused scratch buffer and keeps only what the loss needs (the target's log-probability and,
    with smoothing, the weighted row sum): no N×C tensor survives the forward. Backward
    recomputes the softmax block by block straight into the gradient it returns, then scales it
    and subtracts the one-hot term in place, while the block is still in cache, in the logits'
    dtype. With ``create_graph=True``, or under a functorch
    transform (batched gradients: ``autograd.grad(..., is_grads_batched=True)``), the backward
    switches to out-of-place differentiable ops, so double backward and vmap over the backward
    are exact.
    """

    @staticmethod
    def forward(
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ) -> tuple[Tensor, Tensor]:
        safe, keep = _safe_target(target, ignore_index)
        picked = logits.new_empty(safe.shape)  # lp[i, t_i]
        # smooth_i = Σ_c w_c·lp[i, c]
        smooth = torch.empty_like(picked) if label_smoothing > 0.0 else None
        starts, rows = _row_blocks(logits)
        scratch = logits.new_empty((min(rows, logits.shape[0]), logits.shape[1]))
        for start in starts:
            stop = start + rows
            block = logits[start:stop]
            log_probs = scratch[: block.shape[0]]
            torch.log_softmax(block, 1, out=log_probs)
            torch.gather(log_probs, 1, safe[start:stop].unsqueeze(1), out=picked[start:stop, None])
            if smooth is not None:
                if weight is None:
                    torch.sum(log_probs, 1, out=smooth[start:stop])
                else:
                    torch.mv(log_probs, weight, out=smooth[start:stop])
        # The statistics relative to m = lse (log-sum 0): nll = -lp_t, smooth_nll = -smooth.
        w_t = _stats.target_weight(weight, safe)
        main, extra = _stats.row_loss(
            -picked, None if smooth is None else -smooth, None, w_t, keep,
            n_classes=logits.shape[1], label_smoothing=label_smoothing, z_loss=0.0,
        )  # fmt: skip
        denom = _stats.mean_denominator(keep, w_t, n_rows=keep.shape[0], dtype=logits.dtype)
        return _stats.reduce_loss(main, extra, reduction, denom), denom

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        logits, target, weight, ignore_index, label_smoothing, reduction = inputs
        _, denom = output
        ctx.ignore_index = ignore_index
        ctx.label_smoothing = label_smoothing
        ctx.reduction = reduction
        ctx.save_for_backward(logits, target, weight, denom)
        ctx.mark_non_differentiable(denom)

    @staticmethod
    def backward(ctx, grad_output: Tensor, _grad_denom):  # type: ignore[override]
        logits, target, weight, denom = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        eps, reduction = ctx.label_smoothing, ctx.reduction
        n_classes = logits.shape[1]
        safe, keep = _safe_target(target, ctx.ignore_index)
        g = _stats.row_scale(
            grad_output, reduction=reduction, denominator=denom, keep=keep, n_rows=keep.shape[0]
        )
        # d l_i / d x_ij = a_i·p_j - (1-ε)·w_t·[j = t] - (ε/C)·w_j  (see crossent.ops._stats)
        p_coef, t_coef = _stats.grad_coefficients(
            g, _stats.target_weight(weight, safe), _stats.total_weight(weight, n_classes), None,
            n_classes=n_classes, label_smoothing=eps, z_loss=0.0,
        )  # fmt: skip
        p_coef = p_coef.unsqueeze(1)  # times p_j
        t_coef = (-t_coef).unsqueeze(1)  # added at j = t
        w_coef = (g * (eps / n_classes)).unsqueeze(1)  # times -w_j (only with smoothing)
        index = safe.unsqueeze(1)

        # create_graph, or vmap over this backward (batched gradients: grad_output carries a
        # batch dimension that the unbatched buffers below could not hold): out of place.
        if torch.is_grad_enabled() or is_batched(grad_output):
            grad = torch.softmax(logits, 1) * p_coef
            grad = grad.scatter_add(1, index, t_coef)
            if eps > 0.0:
                grad = grad - (1.0 if weight is None else weight) * w_coef
            return grad, None, None, None, None, None

        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        starts, rows = _row_blocks(logits)
        for start in starts:
            stop = start + rows
            work = grad[start:stop]
            torch.softmax(logits[start:stop], 1, out=work)
            work.mul_(p_coef[start:stop])
            work.scatter_add_(1, index[start:stop], t_coef[start:stop])
            if eps > 0.0:
                if weight is None:
                    work.sub_(w_coef[start:stop])
                else:
                    work.addr_(w_coef[start:stop].squeeze(1), weight, alpha=-1)
        return grad, None, None, None, None, None


def cross_entropy_index_blocked(*args) -> Tensor:
    """Index-target cross entropy through :class:`CrossEntropyIndex` ((N, C) logits), with
    the arguments of :func:`cross_entropy_index_fused`."""
    loss, _ = CrossEntropyIndex.apply(*args)
    return loss
