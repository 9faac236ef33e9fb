"""GPU (Triton) implementations of cross entropy, linear cross entropy and BCE with logits.

Entry points for ``crossent.functional`` and ``crossent.linear``, which validate the arguments
with ``crossent._checks`` and reshape them first: these functions trust their inputs (2-D
logits, 1-D int64 or uint8 targets, weights of the right sizes and dtypes, a known reduction,
``label_smoothing`` a float in [0, 1], ``z_loss`` a float >= 0) and check nothing again. They
run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``), and
never read tensor values on the host, so they are safe inside CUDA graphs and
``torch.compile(fullgraph=True)``.

The loss conventions are those of ``crossent.ops._stats`` (PyTorch's). Label smoothing: ``ε/C``
on every class, and with ``reduction='mean'`` the same denominator ``Σ_i keep_i w_{t_i}`` as the
unsmoothed loss. ``z_loss`` adds ``z * lse_i**2`` for each non-ignored row (PaLM), not
class-weighted, same denominator. ``softcap`` replaces the logits by
``softcap * tanh(logits / softcap)`` before the softmax (Gemma 2).

Importing this package does not import triton; :func:`is_available` says whether the kernels can
run here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._backend import triton_importable, triton_interpreting
from . import _ops

__all__ = [
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "is_available",
    "linear_cross_entropy",
]


def is_available() -> bool:
    """Whether the kernels can run in this process.

    Returns:
        True if triton imports and either a CUDA device is present or Triton's interpreter is
        on (``TRITON_INTERPRET=1``, for CPU tensors).
    """
    if not triton_importable():
        return False
    return torch.cuda.is_available() or triton_interpreting()


def _softcap_value(softcap: float | None) -> float:
    # 0.0 tells the kernels "no soft-capping" (c * tanh(x / c) is undefined at c = 0).
    return 0.0 if softcap is None else float(softcap)


def _index_target(target: Tensor) -> Tensor:
    # uint8 class indices (which torch accepts) become int64; the kernels read int64.
    return target if target.dtype == torch.int64 else target.long()


def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross entropy of (N, V) logits against (N,) class indices, on the GPU.

    .. math::

        z = c \\tanh(x / c) \\text{ (if softcap)}, \\quad
        \\mathrm{lse}_i = \\log \\sum_c e^{z_{ic}}, \\quad
        l_i = k_i \\Big[(1-\\varepsilon) w_{t_i} (\\mathrm{lse}_i - z_{i t_i})
              + \\tfrac{\\varepsilon}{C} \\sum_c w_c (\\mathrm{lse}_i - z_{ic})
              + \\zeta\\, \\mathrm{lse}_i^2\\Big]

    with ``k_i = [t_i != ignore_index]``; 'mean' divides ``Σ l_i`` by ``Σ_i k_i w_{t_i}``.

    Args:
        logits: (N, V) float16/bfloat16/float32/float64, any strides; never written.
        target: (N,) int64 or uint8 class indices in [0, V) (or ``ignore_index``).
        weight: (V,) class weights in the logits dtype, or None.
        ignore_index: target value whose rows contribute nothing (nor to the mean's denominator).
        label_smoothing: ε in [0, 1] (``crossent._checks`` maps torch's negative ε to 0).
        z_loss: ζ, coefficient of the ``lse**2`` term; 0 for none.
        softcap: c > 0 for soft-capping, None for none.
        reduction: 'none' (shape (N,)), 'mean' or 'sum' (0-d).

    Returns:
        The loss in the logits dtype, differentiable w.r.t. ``logits`` (the gradient is a new
        tensor; only the row's log-sum-exp, as max and log-sum (2N floats), is saved besides the
        inputs).

    Raises:
        RuntimeError: triton is missing, or the tensors are on CPU without the interpreter.
    """
    target = _index_target(target)
    class_weight = weight.contiguous() if weight is not None else None
    stats = _ops.ce_stats(
        logits, target, class_weight, _softcap_value(softcap), label_smoothing > 0.0
    )
    return _ops.loss_from_stats(
        *stats, target, class_weight, n_classes=logits.shape[1], ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction,
        out_dtype=logits.dtype,
    )  # fmt: skip


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross entropy of ``input @ linear_weight.T + linear_bias`` without materialising logits.

    Same loss as :func:`cross_entropy` on ``logits = input @ linear_weight.T + linear_bias``
    (see there for the math), computed tile by tile: the (N, V) logits never exist in memory;
    the forward keeps only the rows' log-sum-exp (2N floats) and the backward recomputes the
    logit tiles.
    Gradients are exact (no filtering) and accumulated in float32.

    Args:
        input: (N, D) hidden states, float16/bfloat16/float32/float64, any strides.
        linear_weight: (V, D) classifier weight, same dtype as ``input``.
        target: (N,) int64 or uint8 class indices.
        linear_bias: (V,) or None.
        weight: (V,) class weights, or None.
        ignore_index: target value whose rows are skipped.
        label_smoothing: ε in [0, 1].
        z_loss: coefficient of the ``lse**2`` term.
        softcap: c > 0 for soft-capping the logits, None for none.
        reduction: 'none', 'mean' or 'sum'.

    Returns:
        The loss in the input dtype, differentiable w.r.t. ``input``, ``linear_weight`` and
        ``linear_bias``.

    Raises:
        RuntimeError: triton is missing, or the tensors are on CPU without the interpreter.
    """
    target = _index_target(target).contiguous()
    class_weight = weight.contiguous() if weight is not None else None
    stats = _ops.linear_ce_stats(
        input, linear_weight, linear_bias, target, class_weight, ignore_index,
        _softcap_value(softcap), label_smoothing > 0.0,
    )  # fmt: skip
    return _ops.loss_from_stats(
        *stats, target, class_weight, n_classes=linear_weight.shape[0],
        ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        reduction=reduction, out_dtype=input.dtype,
    )  # fmt: skip


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    pos_weight: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Binary cross entropy with logits, elementwise loss fused with its reduction.

    .. math::

        l = w \\big[(1 - y)\\,x - (1 + (p - 1)\\,y) \\log\\sigma(x)\\big]

    (torch 2.13's formula); 'mean' is ``Σ l / numel``, weights do not renormalise it.

    Args:
        input: logits of any shape.
        target: same shape as ``input``, floating.
        weight: broadcastable to the input shape (right-aligned), or None. Not materialised.
        pos_weight: broadcastable to the input shape (right-aligned; per class of a (B, C, H, W)
            input it is (C, 1, 1)), or None. Not materialised.
        reduction: 'none' (input shape), 'mean' or 'sum' (0-d).

    Returns:
        The loss in the **target** dtype (torch's quirk), differentiable w.r.t. ``input`` and
        ``target``.

    Raises:
        RuntimeError: triton is missing, or the tensors are on CPU without the interpreter.
    """
    return _ops.bce_with_logits(input, target, weight, pos_weight, reduction)
