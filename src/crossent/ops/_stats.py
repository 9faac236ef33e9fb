"""The loss conventions of cross entropy with class indices, in one place (torch, any device).

Every path that computes cross entropy with class indices (the blocked eager Function, the
chunked linear cross entropy, the Triton kernels, the vocab-parallel losses) reduces each row
of logits to a few statistics and hands them to the functions below, which turn them into the
loss and into the per-row gradient coefficients. The NumPy reference (``crossent.reference``)
keeps its own copy of these formulas on purpose: it is the independent oracle.

Glossary (one name per quantity; the code uses these names)::

    z          a row of logits (N rows, V classes; C and V name the same count)
    row_max    m, the shift the statistics are taken relative to: the row's largest logit
               (any finite value works; a path that already holds the log-sum-exp uses
               m = lse, one that holds absolute logits uses m = 0)
    logsum     L = log Σ_c exp(z_c - m)
    lse        the row's log-sum-exp, lse = row_max + logsum
    target     t, the class index; ``keep`` = [t != ignore_index] (None: every row kept)
    target_logit   z_t - m
    smooth     the smoothing sum S = Σ_c w_c (z_c - m): logits minus the row max, so S <= 0
               for non-negative weights. This is the one sign convention.
    w, w_t     the class weight (all ones when absent) and its value at the target
    W          Σ_c w_c, the total class weight (V without weights)
    ε          label smoothing, in [0, 1]
    ζ          the z-loss coefficient (the loss adds ζ·lse²)
    nll        -log p_t = L - (z_t - m)
    smooth_nll -Σ_c w_c log p_c = W·L - S

Per kept row, and 0 on an ignored row (even for NaN logits)::

    loss_i = (1-ε)·w_t·nll_i + (ε/V)·smooth_nll_i + ζ·lse_i²
    ∂loss_i/∂z_c = a_i·p_c - (1-ε)·w_t·[c = t] - (ε/V)·w_c
    a_i = (1-ε)·w_t + (ε/V)·W + 2ζ·lse_i          (the row factor)

``'mean'`` divides by the denominator Σ over kept rows of w_t (their count without class
weights), the same for both the target term and the smoothing and z-loss terms; the two
quotients are taken separately, as ``F.cross_entropy`` does, so that when the denominator is 0
(every row ignored, or every kept target of class weight 0) the first is 0/0 and the mean NaN,
whatever the second holds. The gradient of a row is scaled by ``σ_i``
(:func:`row_scale`): ``grad_output`` (per row for ``'none'``), divided by the denominator for
``'mean'``, exactly 0 on ignored rows.

Statistics and losses are computed in the compute dtype (:func:`compute_dtype`): float64 stays
float64, everything else (float32, float16, bfloat16) computes in float32.

Everything here is plain torch on whatever tensors it is given: it works on any device, on
meta tensors, under ``torch.compile`` and ``vmap``, and never reads a value back to the host.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "compute_dtype",
    "grad_coefficients",
    "is_low_precision",
    "loss_from_stats",
    "mean_denominator",
    "nll_from_stats",
    "reduce_loss",
    "row_factor",
    "row_loss",
    "row_scale",
    "target_factor",
    "target_weight",
    "total_weight",
]


# --------------------------------------------------------------------------------------------
# Dtypes.


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype statistics, losses and accumulations are computed in: float64 if any of
    ``dtypes`` is float64, else float32 (float16/bfloat16 are widened)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def is_low_precision(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float16 or bfloat16 (computed in float32 by every path)."""
    return dtype in (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Class weights.


def target_weight(class_weight: Tensor | None, target: Tensor) -> Tensor | None:
    """``w_t`` per row (None without class weights). ``target`` must hold valid class indices
    on every row (ignored rows replaced by any class, e.g. 0)."""
    return None if class_weight is None else class_weight.index_select(0, target)


def total_weight(class_weight: Tensor | None, n_classes: int) -> Tensor | float:
    """``W = Σ_c w_c``: a 0-d tensor, or ``float(n_classes)`` without class weights."""
    return float(n_classes) if class_weight is None else class_weight.sum()


# --------------------------------------------------------------------------------------------
# Statistics -> loss.


def nll_from_stats(
    logsum: Tensor, target_logit: Tensor, smooth: Tensor | None, total: Tensor | float
) -> tuple[Tensor, Tensor | None]:
    """``(nll, smooth_nll)`` = ``(L - (z_t - m), W·L - S)`` from the statistics (glossary);
    ``smooth_nll`` is None when ``smooth`` is."""
    nll = logsum - target_logit
    return nll, None if smooth is None else total * logsum - smooth


def _per_class(label_smoothing: float, n_classes: int) -> float:
    """``ε/V``, the smoothing mass on each class; inf without classes (as torch's division)."""
    return label_smoothing / n_classes if n_classes else math.inf


def row_loss(
    nll: Tensor,
    smooth_nll: Tensor | None,
    lse: Tensor | None,
    w_t: Tensor | None,
    keep: Tensor | None,
    *,
    n_classes: int,
    label_smoothing: float,
    z_loss: float,
) -> tuple[Tensor, Tensor | None]:
    """The per-row loss in two terms: ``(1-ε)·w_t·nll`` and the rest, ``(ε/V)·smooth_nll +
    ζ·lse²`` (None when ε = ζ = 0), both 0 on rows where ``keep`` is False.

    They stay apart so that :func:`reduce_loss` can divide each by the 'mean' denominator on
    its own (see the module docstring). ``smooth_nll`` is needed when ε > 0, ``lse`` when
    ζ > 0.
    """
    main = nll if w_t is None else w_t * nll
    extra = None
    if label_smoothing > 0.0:
        main = (1.0 - label_smoothing) * main
        # Masked before the factor, as torch does: without classes ε/V is inf and 0·inf NaN.
        masked = smooth_nll if keep is None else torch.where(keep, smooth_nll, 0.0)
        extra = _per_class(label_smoothing, n_classes) * masked
    if z_loss != 0.0:
        z_term = z_loss * lse.square()
        if keep is not None:
            z_term = torch.where(keep, z_term, 0.0)
        extra = z_term if extra is None else extra + z_term
    if keep is not None:
        main = torch.where(keep, main, 0.0)
    return main, extra


def mean_denominator(
    keep: Tensor | None,
    w_t: Tensor | None,
    *,
    n_rows: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
) -> Tensor:
    """The 'mean' denominator as a 0-d tensor: Σ over kept rows of ``w_t``, or the number of
    kept rows without class weights (``n_rows`` when ``keep`` is None)."""
    if w_t is None:
        if keep is None:
            return torch.tensor(float(n_rows), dtype=dtype, device=device)
        return keep.sum().to(dtype)
    if keep is not None:
        w_t = torch.where(keep, w_t, 0.0)
    return w_t.sum()


def reduce_loss(
    main: Tensor, extra: Tensor | None, reduction: str, denominator: Tensor | None = None
) -> Tensor:
    """Reduce the two per-row terms of :func:`row_loss`: ``'none'`` adds them, ``'sum'``
    sums them, ``'mean'`` divides each sum by ``denominator`` separately (torch's order)."""
    if reduction == "none":
        return main if extra is None else main + extra
    if reduction == "sum":
        total = main.sum()
        return total if extra is None else total + extra.sum()
    mean = main.sum() / denominator
    return mean if extra is None else mean + extra.sum() / denominator


def loss_from_stats(
    row_max: Tensor,
    logsum: Tensor,
    target_logit: Tensor,
    smooth: Tensor | None,
    keep: Tensor | None,
    w_t: Tensor | None,
    total: Tensor | float,
    *,
    n_classes: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
) -> Tensor:
    """The loss from the per-row statistics (glossary), reduced as asked, compute dtype.

    ``w_t`` must be the target's class weight on every row (any value on ignored rows),
    ``total`` = W (:func:`total_weight`); ``smooth`` is needed when ε > 0.
    """
    nll, smooth_nll = nll_from_stats(logsum, target_logit, smooth, total)
    lse = None if z_loss == 0.0 else row_max + logsum
    main, extra = row_loss(
        nll, smooth_nll, lse, w_t, keep,
        n_classes=n_classes, label_smoothing=label_smoothing, z_loss=z_loss,
    )  # fmt: skip
    denominator = None
    if reduction == "mean":
        denominator = mean_denominator(
            keep, w_t, n_rows=logsum.shape[0], dtype=logsum.dtype, device=logsum.device
        )
    return reduce_loss(main, extra, reduction, denominator)


# --------------------------------------------------------------------------------------------
# Gradient coefficients.


def row_scale(
    grad_output: Tensor,
    *,
    reduction: str,
    denominator: Tensor | None,
    keep: Tensor | None,
    n_rows: int,
) -> Tensor:
    """``σ`` (n_rows,): the per-row scale of the gradient.

    ``grad_output`` is 0-d for ``'mean'``/``'sum'`` (divided by ``denominator`` for
    ``'mean'``) and (n_rows,) for ``'none'``; rows where ``keep`` is False get exactly 0 (not
    a product with 0, so that an all-ignored mean gives zero gradients rather than 0·inf).
    """
    sigma = grad_output / denominator if reduction == "mean" else grad_output
    if sigma.dim() == 0:
        sigma = sigma.expand(n_rows)
    if keep is not None:
        sigma = torch.where(keep, sigma, 0.0)
    return sigma.contiguous()


def row_factor(
    w_t: Tensor | None,
    total: Tensor | float,
    lse: Tensor | None,
    *,
    n_classes: int,
    label_smoothing: float,
    z_loss: float,
) -> Tensor | float:
    """``a = (1-ε)·w_t + (ε/V)·W + 2ζ·lse``, the factor of ``p`` in ``∂loss_i/∂z`` (a float
    when neither ``w_t`` nor the z-loss makes it per row)."""
    eps = label_smoothing
    a = target_factor(w_t, eps)
    if eps > 0.0:
        a = a + _per_class(eps, n_classes) * total
    if z_loss != 0.0:
        a = a + (2 * z_loss) * lse
    return a


def target_factor(w_t: Tensor | None, label_smoothing: float) -> Tensor | float:
    """``(1-ε)·w_t``, subtracted from ``∂loss_i/∂z`` at the target class."""
    return (1.0 - label_smoothing) if w_t is None else (1.0 - label_smoothing) * w_t


def grad_coefficients(
    sigma: Tensor, w_t: Tensor | None, total: Tensor | float, lse: Tensor | None, **options
) -> tuple[Tensor, Tensor]:
    """``(σ·a, σ·(1-ε)·w_t)``, per row: the gradient of ``Σ_i σ_i·loss_i`` w.r.t. row i's
    logits is ``(σ·a)_i·p - (σ·(1-ε)·w_t)_i·e_t - σ_i·(ε/V)·w``. ``options``: the keywords
    of :func:`row_factor` (``n_classes``, ``label_smoothing``, ``z_loss``)."""
    a = row_factor(w_t, total, lse, **options)
    return sigma * a, sigma * target_factor(w_t, options["label_smoothing"])
