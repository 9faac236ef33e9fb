"""Negative log likelihood of class-index targets, with its analytic gradient.

Reference semantics: torch 2.13 ``F.nll_loss`` (``docs/reference.md`` lists the fine print).
Shapes, as in torch (and for :func:`~crossent.reference.cross_entropy` with class indices):

================================  ===================================  ======================
input                              class-index target                   ``'none'`` output
================================  ===================================  ======================
``(C,)``                           ``()`` (or ``(1,)``, a torch quirk)  ``()``
``(N, C)``                         ``(N,)``                             ``(N,)``
``(N, C, d1, ..., dk)``            ``(N, d1, ..., dk)``                 ``(N, d1, ..., dk)``
================================  ===================================  ======================

Every function first moves the class axis last and flattens the rest, so that the math is
written once, on ``M`` rows of ``C`` classes: one row per prediction. The class-index part
(gather each row's target entry, the loss with optional label smoothing, its gradient with
respect to the log-probabilities) is shared with cross entropy, which is NLL of the
log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._common import (
    Reduction,
    check_class_weight,
    check_ignore_index,
    check_index_target,
    check_reduction,
    class_dim_of,
    float_array,
    from_rows,
    ieee_semantics,
    reduce_loss,
    reject_unbatched_target_of_size_1,
    to_rows,
    upstream_grad,
)

FloatArray = NDArray[np.floating]
IntArray = NDArray[np.int64]


# --------------------------------------------------------------------------------------------
# Class-index targets: shared by nll_loss and cross_entropy
# --------------------------------------------------------------------------------------------


@dataclass
class IndexTargets:
    """An index-target problem in row form, with the gathered target entries."""

    log_probs: FloatArray  # (M, C): log-probabilities, one row per prediction
    target: IntArray  # (M,): class index per row (may equal ignore_index)
    class_weight: FloatArray  # (C,)
    keep: NDArray[np.bool_]  # (M,): target != ignore_index
    target_log_prob: FloatArray  # (M,): log_probs[i, target[i]] for kept rows, 0 for ignored
    target_weight: FloatArray  # (M,): class_weight[target[i]] for kept rows, 0 for ignored
    loss_shape: tuple[int, ...]  # () for unbatched input, else target.shape = (N, d1..dk)
    class_dim: int

    @property
    def total_weight(self) -> FloatArray:
        """Denominator of ``'mean'``: the summed weights of the non-ignored targets."""
        return np.sum(self.target_weight)


def gather_index_targets(
    log_probs: FloatArray,
    target: IntArray,
    weight: ArrayLike | None,
    ignore_index: int,
    dtype: DTypeLike,
) -> IndexTargets:
    """Row form of ``log_probs`` (input's shape) and ``target``; gather each row's target entry."""
    class_dim = class_dim_of(log_probs.ndim)
    num_classes = log_probs.shape[class_dim]
    class_weight = check_class_weight(weight, num_classes, dtype)
    rows = to_rows(log_probs, class_dim)  # (M, C)
    target_rows = target.reshape(-1)  # (M,)
    keep = target_rows != ignore_index
    # Only non-ignored targets must be valid class indices (ignore_index itself may be anything).
    invalid = keep & ((target_rows < 0) | (target_rows >= num_classes))
    if np.any(invalid):
        bad = int(target_rows[np.argmax(invalid)])
        raise IndexError(
            f"Target {bad} is out of bounds: class indices must satisfy 0 <= target < "
            f"{num_classes} (the input has {num_classes} classes), or equal "
            f"ignore_index={ignore_index}"
        )
    kept = np.nonzero(keep)[0]
    target_log_prob = np.zeros(len(target_rows), rows.dtype)
    target_log_prob[kept] = rows[kept, target_rows[kept]]  # gather
    target_weight = np.zeros(len(target_rows), rows.dtype)
    target_weight[kept] = class_weight[target_rows[kept]]  # gather
    return IndexTargets(
        log_probs=rows,
        target=target_rows,
        class_weight=class_weight,
        keep=keep,
        target_log_prob=target_log_prob,
        target_weight=target_weight,
        loss_shape=() if log_probs.ndim == 1 else target.shape,
        class_dim=class_dim,
    )


def index_loss(p: IndexTargets, label_smoothing: float, reduction: Reduction) -> FloatArray:
    r"""The loss :math:`(1-ε) \cdot \mathrm{reduce(nll)} + (ε/C) \cdot \mathrm{reduce(smooth)}`.

    Each part is reduced on its own, over the same denominator, and then combined, as torch does;
    this order matters only when the summed target weight is 0 (then torch's ``-inf + inf`` is
    NaN). Ignored rows contribute 0 to both parts.
    """
    nll = np.zeros(len(p.target), p.log_probs.dtype)
    nll[p.keep] = -p.target_weight[p.keep] * p.target_log_prob[p.keep]
    loss = reduce_loss(nll.reshape(p.loss_shape), reduction, p.total_weight)
    if label_smoothing == 0.0:
        return loss
    smooth = np.zeros(len(p.target), p.log_probs.dtype)
    smooth[p.keep] = -np.sum(p.class_weight * p.log_probs[p.keep], axis=1)
    smooth_loss = reduce_loss(smooth.reshape(p.loss_shape), reduction, p.total_weight)
    # ε / C as an array so that C = 0 gives inf (then nan), as torch, not ZeroDivisionError.
    eps_per_class = np.asarray(label_smoothing, p.log_probs.dtype) / p.log_probs.shape[1]
    return (1 - label_smoothing) * loss + smooth_loss * eps_per_class


def index_grad_log_probs(
    p: IndexTargets, label_smoothing: float, upstream: FloatArray
) -> FloatArray:
    r""":math:`\partial L / \partial \log p` in row form ``(M, C)``; zero rows where ignored.

    .. math::

        \frac{\partial L}{\partial \log p_{ic}} = -g_i \left[ (1-ε)\, w_{t_i} [c = t_i]
            + \frac{ε}{C} w_c \right] \quad \text{for kept rows } i
    """
    g = upstream.reshape(-1)  # (M,) dL/dloss_i
    grad = np.zeros_like(p.log_probs)
    kept = np.nonzero(p.keep)[0]
    grad[kept, p.target[kept]] = -(1 - label_smoothing) * p.target_weight[kept] * g[kept]
    if label_smoothing != 0.0:
        eps_per_class = np.asarray(label_smoothing, p.log_probs.dtype) / p.log_probs.shape[1]
        grad[kept] -= eps_per_class * g[kept, None] * p.class_weight
    return grad


# --------------------------------------------------------------------------------------------
# nll_loss
# --------------------------------------------------------------------------------------------


def _nll_args(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None,
    ignore_index: int,
    reduction: str,
    dtype: DTypeLike,
) -> tuple[IndexTargets, Reduction, tuple[int, ...]]:
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index, "nll_loss")
    log_probs = float_array(input, dtype)
    target = check_index_target(log_probs.shape, target, "nll_loss")
    problem = gather_index_targets(log_probs, target, weight, ignore_index, dtype)
    return problem, reduction, log_probs.shape


@ieee_semantics
def nll_loss(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Negative log likelihood of class-index targets, given log-probabilities.

    For each prediction :math:`i` with target class :math:`t_i`, class weights :math:`w`
    (1 if absent) and :math:`k_i = [t_i \ne \text{ignore\_index}]`:

    .. math::

        \ell_i = -k_i \, w_{t_i} \, x_{i, t_i}, \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_i k_i \, w_{t_i}}

    The weighted mean divides by the summed weights of the targets, not by N. When no target
    counts (all ignored, empty batch, or weights summing to 0) the mean is :math:`0/0 =` NaN, as
    in torch; ``'sum'`` is then 0. ``ignore_index`` may be any integer: a valid class index
    (those rows are dropped) or a value outside ``[0, C)`` such as -100 or 255.

    Args:
        input: log-probabilities, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: integer class indices, ``()`` (or ``(1,)``), ``(N,)`` or ``(N, d1, ..., dk)``.
        weight: optional per-class weight of shape ``(C,)`` (negative values are allowed).
        ignore_index: target value whose rows contribute neither loss nor weight.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        dtype: floating dtype to compute in (default float64).

    Returns:
        The loss: 0-d for ``'mean'``/``'sum'``, the target-batch shape for ``'none'``.

    Raises:
        ValueError: 0-d input; batch size mismatch; a 1-D target of size != 1 for 1-D input;
            invalid ``reduction``.
        RuntimeError: wrong target shape or non-integer target; ``weight`` not of shape ``(C,)``.
        IndexError: a non-ignored target outside ``[0, C)``.
        TypeError: ``ignore_index`` not an int.

    Example:
        >>> logp = np.log([[0.5, 0.5], [0.25, 0.75]])
        >>> float(nll_loss(logp, [0, 1], reduction="sum")) == -float(np.log(0.5 * 0.75))
        True

    Reference: torch.nn.functional.nll_loss (torch 2.13).
    """
    problem, reduction, _ = _nll_args(input, target, weight, ignore_index, reduction, dtype)
    return index_loss(problem, 0.0, reduction)


@ieee_semantics
def nll_loss_grad(
    input: ArrayLike,
    target: ArrayLike,
    grad_output: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Gradient of :func:`nll_loss` with respect to ``input`` (the log-probabilities).

    .. math::

        \frac{\partial L}{\partial x_{ic}} = -g_i \, k_i \, w_{t_i} \, [c = t_i]

    a scatter of :math:`-w_t g` into the target entries, with :math:`g_i` = ``grad_output``
    (divided by :math:`\sum_i k_i w_{t_i}` for ``'mean'``). Ignored rows get 0, also when every
    row is ignored; non-ignored rows whose weights sum to 0 get :math:`\pm\infty`/NaN, as in torch.

    Args:
        input, target, weight, ignore_index, reduction, dtype: as for :func:`nll_loss`.
        grad_output: upstream gradient; a scalar for ``'mean'``/``'sum'``, the loss's shape
            (or a scalar) for ``'none'``.

    Returns:
        :math:`\partial L / \partial x`, the input's shape.

    Raises:
        As :func:`nll_loss`; RuntimeError for a wrongly shaped ``grad_output``, and for a
        ``(C,)`` input with a ``(1,)`` target (torch 2.13's backward rejects it).
    """
    problem, reduction, input_shape = _nll_args(
        input, target, weight, ignore_index, reduction, dtype
    )
    reject_unbatched_target_of_size_1(len(input_shape), np.asarray(target), "the nll_loss gradient")
    upstream = upstream_grad(
        grad_output, reduction, problem.loss_shape, problem.total_weight, problem.log_probs.dtype
    )
    grad = index_grad_log_probs(problem, 0.0, upstream)
    return from_rows(grad, input_shape, problem.class_dim)
