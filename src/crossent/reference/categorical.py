"""Cross entropy over C classes, on class-index or class-probability targets, with gradients.

Reference semantics: torch 2.13 ``F.cross_entropy`` (``docs/reference.md`` lists the fine
print). Shapes and the row form (class axis last, one row per prediction) are as for
:func:`~crossent.reference.nll_loss`. Class-index targets reuse NLL's gather, loss and
gradient (``crossent.reference.nll``) on the log-softmax; probability targets are written
here.
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
    check_label_smoothing,
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
from .nll import IndexTargets, gather_index_targets, index_grad_log_probs, index_loss
from .numerics import log_softmax

FloatArray = NDArray[np.floating]


def _log_softmax_backward(grad_log_probs: FloatArray, log_probs: FloatArray) -> FloatArray:
    r"""Chain rule through :math:`\log p = x - \operatorname{logsumexp}(x)`, row by row.

    .. math::

        \frac{\partial L}{\partial x_c} = \frac{\partial L}{\partial \log p_c}
            - p_c \sum_k \frac{\partial L}{\partial \log p_k}

    As in torch, a row whose probabilities are NaN gives NaN here even when its upstream gradient
    is 0 (an ignored row with NaN logits).
    """
    probs = np.exp(log_probs)
    return grad_log_probs - probs * np.sum(grad_log_probs, axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


@dataclass
class _ProbTargets:
    """A probability-target problem in row form."""

    log_probs: FloatArray  # (M, C)
    target: FloatArray  # (M, C): smoothed targets y' = y (1 - ε) + ε / C
    class_weight: FloatArray  # (C,)
    label_smoothing: float  # ε (0 when the given value was <= 0)
    denominator: FloatArray  # 'mean' divides by numel(input) / C = N·d1···dk
    loss_shape: tuple[int, ...]  # input shape without the class dim
    class_dim: int


def _prob_targets(
    logits: FloatArray,
    target: NDArray,
    weight: ArrayLike | None,
    ignore_index: int,
    label_smoothing: float,
    dtype: DTypeLike,
) -> _ProbTargets:
    """Validate probability targets (torch's order of checks) and build the row form."""
    if not np.issubdtype(target.dtype, np.floating):
        raise RuntimeError(
            "Expected floating point type for target with class probabilities, got "
            f"{target.dtype}: a target with the input's shape {logits.shape} is read as class "
            "probabilities; class indices must have the input's shape without the class dim"
        )
    if ignore_index >= 0:
        raise RuntimeError(
            "ignore_index is not supported for floating point target: probability targets "
            f"ignore nothing, so ignore_index must be negative, got {ignore_index}"
        )
    if logits.ndim == 0:
        raise IndexError(
            "cross_entropy: Dimension specified as 1 but tensor has no dimensions: a 0-d input "
            "has no class dimension; use shape (C,), (N, C) or (N, C, d1, ..., dk)"
        )
    class_dim = class_dim_of(logits.ndim)
    num_classes = logits.shape[class_dim]
    class_weight = check_class_weight(weight, num_classes, dtype, prefix="cross_entropy: ")
    eps = check_label_smoothing(label_smoothing)
    target_rows = to_rows(float_array(target, dtype), class_dim)  # (M, C)
    if eps > 0.0:
        # ε / C as an array so that C = 0 gives inf, as torch, not ZeroDivisionError.
        target_rows = target_rows * (1 - eps) + np.asarray(eps, target_rows.dtype) / num_classes
    return _ProbTargets(
        log_probs=to_rows(log_softmax(logits, class_dim, dtype=dtype), class_dim),
        target=target_rows,
        class_weight=class_weight,
        label_smoothing=eps,
        # numel / C (= N·d1···dk, but nan when C = 0, as torch computes it)
        denominator=np.asarray(logits.size, logits.dtype) / num_classes,
        loss_shape=logits.shape[:class_dim] + logits.shape[class_dim + 1 :],
        class_dim=class_dim,
    )


def _ce_args(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    dtype: DTypeLike,
) -> tuple[_ProbTargets | IndexTargets, Reduction, float, tuple[int, ...]]:
    """Pick the path as torch does (probabilities iff shapes are equal), validate, build rows."""
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index, "cross_entropy")
    logits = float_array(input, dtype)
    target = np.asarray(target)
    if target.shape == logits.shape:
        problem = _prob_targets(logits, target, weight, ignore_index, label_smoothing, dtype)
        return problem, reduction, problem.label_smoothing, logits.shape
    eps = check_label_smoothing(label_smoothing)
    target = check_index_target(logits.shape, target, "cross_entropy")
    if eps > 0.0:
        reject_unbatched_target_of_size_1(logits.ndim, target, "label_smoothing > 0")
    log_probs = log_softmax(logits, class_dim_of(logits.ndim), dtype=dtype)
    problem = gather_index_targets(log_probs, target, weight, ignore_index, dtype)
    return problem, reduction, eps, logits.shape


@ieee_semantics
def cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Cross entropy between logits and class-index or class-probability targets.

    With :math:`\log p = \operatorname{log\_softmax}(x)` over the class dimension (dim 0 for
    ``(C,)`` input, else dim 1), class weights :math:`w` (1 if absent) and smoothing
    :math:`ε` (a negative ε means 0; ε > 1 is an error). The path is chosen as torch does:
    **probability targets iff** ``target.shape == input.shape``.

    *Class-index targets* :math:`t_i`, with :math:`k_i = [t_i \ne \text{ignore\_index}]`:

    .. math::

        \ell_i = k_i \left[ -(1 - ε)\, w_{t_i} \log p_{i, t_i}
                 - \frac{ε}{C} \sum_c w_c \log p_{ic} \right], \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_i k_i \, w_{t_i}}

    Both terms share the NLL denominator; the mean is NaN when nothing counts (all ignored,
    empty). Without smoothing this is exactly :func:`nll_loss` of :math:`\log p`.

    *Probability targets* :math:`y` (not validated: any real values), smoothed to
    :math:`y' = (1 - ε)\, y + ε / C`:

    .. math::

        \ell_n = -\sum_c w_c \, y'_{nc} \log p_{nc}, \qquad
        \text{mean} = \frac{\sum_n \ell_n}{N d_1 \cdots d_k}

    Here the weighted mean divides by the number of predictions, **not** by weights, so with
    class weights a one-hot probability target and its index target give different means
    (torch issue #61309).

    Args:
        input: logits, ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: integer class indices (the input's shape without the class dim) or float class
            probabilities (the input's shape).
        weight: optional per-class weight of shape ``(C,)``.
        ignore_index: index-target value whose rows are dropped; must be negative with
            probability targets.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        label_smoothing: :math:`ε \in [0, 1]`; PyTorch's convention (ε/C on every class).
        dtype: floating dtype to compute in (default float64).

    Returns:
        The loss: 0-d for ``'mean'``/``'sum'``, the input's shape without the class dim for
        ``'none'``.

    Raises:
        ValueError, RuntimeError, IndexError, TypeError: as :func:`nll_loss` for index targets;
            RuntimeError for ``label_smoothing > 1``, a non-floating probability target,
            ``ignore_index >= 0`` with probability targets, a wrongly shaped ``weight``;
            IndexError for a 0-d input with a 0-d float target.

    Example:
        >>> float(cross_entropy([[0.0, 0.0]], [1])) == float(np.log(2))
        True
        >>> float(cross_entropy([[0.0, 0.0]], [[0.0, 1.0]])) == float(np.log(2))
        True

    Reference: torch.nn.functional.cross_entropy (torch 2.13); label smoothing: Szegedy et al.,
    "Rethinking the Inception Architecture for Computer Vision" (2016).
    """
    problem, reduction, eps, _ = _ce_args(
        input, target, weight, ignore_index, reduction, label_smoothing, dtype
    )
    if isinstance(problem, IndexTargets):
        return index_loss(problem, eps, reduction)
    # Σ_c w_c y'_c log p_c per prediction; the loss is its negative. Negating after the reduction
    # keeps torch's sign of zero (an empty 'sum' is -0.).
    weighted = np.sum(problem.class_weight * problem.target * problem.log_probs, axis=1)
    return -reduce_loss(weighted.reshape(problem.loss_shape), reduction, problem.denominator)


@ieee_semantics
def cross_entropy_grad(
    input: ArrayLike,
    target: ArrayLike,
    grad_output: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Gradient of :func:`cross_entropy` with respect to ``input`` (the logits).

    With :math:`p = \operatorname{softmax}(x)` and :math:`g_i` = ``grad_output`` (divided by
    the mean's denominator for ``'mean'``), index targets give

    .. math::

        \frac{\partial L}{\partial x_{ic}} = g_i k_i \left[ (1-ε) w_{t_i} (p_{ic} - [c = t_i])
            + \frac{ε}{C} \Bigl(p_{ic} \sum_k w_k - w_c\Bigr) \right]

    and probability targets give

    .. math::

        \frac{\partial L}{\partial x_{nc}} = g_n \Bigl(p_{nc} \sum_k w_k y'_{nk} - w_c y'_{nc}\Bigr)

    Both are computed as torch does: :math:`\partial L/\partial \log p` first, then the
    log-softmax backward :math:`\partial L/\partial x_c = \partial L/\partial \log p_c
    - p_c \sum_k \partial L/\partial \log p_k` (so an ignored row with NaN logits gets NaN).

    Args:
        input, target, weight, ignore_index, reduction, label_smoothing, dtype: as for
            :func:`cross_entropy`.
        grad_output: upstream gradient; a scalar for ``'mean'``/``'sum'``, the loss's shape
            (or a scalar) for ``'none'``.

    Returns:
        :math:`\partial L / \partial x`, the input's shape.

    Raises:
        As :func:`cross_entropy`; RuntimeError for a wrongly shaped ``grad_output``, and for a
        ``(C,)`` input with a ``(1,)`` target (torch 2.13's backward rejects it).
    """
    problem, reduction, eps, input_shape = _ce_args(
        input, target, weight, ignore_index, reduction, label_smoothing, dtype
    )
    dtype = problem.log_probs.dtype
    if isinstance(problem, IndexTargets):
        reject_unbatched_target_of_size_1(
            len(input_shape), np.asarray(target), "the cross_entropy gradient"
        )
        upstream = upstream_grad(
            grad_output, reduction, problem.loss_shape, problem.total_weight, dtype
        )
        grad_log_probs = index_grad_log_probs(problem, eps, upstream)
    else:
        upstream = upstream_grad(
            grad_output, reduction, problem.loss_shape, problem.denominator, dtype
        )
        g = upstream.reshape(-1, 1)  # (M, 1)
        grad_log_probs = -g * problem.class_weight * problem.target  # (M, C)
    grad = _log_softmax_backward(grad_log_probs, problem.log_probs)
    return from_rows(grad, input_shape, problem.class_dim)


@ieee_semantics
def cross_entropy_target_grad(
    input: ArrayLike,
    target: ArrayLike,
    grad_output: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Gradient of :func:`cross_entropy` with respect to probability targets.

    .. math::

        \frac{\partial L}{\partial y_{nc}} = -g_n \, (1 - ε) \, w_c \log p_{nc}

    with :math:`g_n` = ``grad_output`` (divided by :math:`N d_1 \cdots d_k` for ``'mean'``).
    Class-index targets are integers and have no gradient.

    Args:
        input, target, weight, ignore_index, reduction, label_smoothing, dtype: as for
            :func:`cross_entropy`; ``target`` must have the input's shape.
        grad_output: as for :func:`cross_entropy_grad`.

    Returns:
        :math:`\partial L / \partial y`, the target's (= input's) shape.

    Raises:
        ValueError: ``target`` is not a probability target (its shape differs from the input's).
        Otherwise as :func:`cross_entropy_grad`.
    """
    if np.shape(target) != np.shape(input):
        raise ValueError(
            "cross_entropy_target_grad needs probability targets (target.shape == input.shape); "
            f"got input shape {np.shape(input)} and target shape {np.shape(target)}, i.e. "
            "class indices, which are integers and have no gradient"
        )
    problem, reduction, _, input_shape = _ce_args(
        input, target, weight, ignore_index, reduction, label_smoothing, dtype
    )
    assert isinstance(problem, _ProbTargets)  # guaranteed by the shape test above
    upstream = upstream_grad(
        grad_output, reduction, problem.loss_shape, problem.denominator, problem.log_probs.dtype
    )
    g = upstream.reshape(-1, 1)  # (M, 1)
    # dy'/dy = 1 - ε
    grad = -g * (1 - problem.label_smoothing) * problem.class_weight * problem.log_probs
    return from_rows(grad, input_shape, problem.class_dim)
