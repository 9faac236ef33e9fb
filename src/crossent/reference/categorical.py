"""Negative log likelihood and cross entropy over C classes, with analytic gradients.

Reference semantics: torch 2.13 ``F.nll_loss`` and ``F.cross_entropy`` (``docs/reference.md``
lists the fine print). Shapes, as in torch:

================================  ===================================  ======================
input                              class-index target                   ``'none'`` output
================================  ===================================  ======================
``(C,)``                           ``()`` (or ``(1,)``, a torch quirk)  ``()``
``(N, C)``                         ``(N,)``                             ``(N,)``
``(N, C, d1, ..., dk)``            ``(N, d1, ..., dk)``                 ``(N, d1, ..., dk)``
================================  ===================================  ======================

Every function first moves the class axis last and flattens the rest, so that the math is
written once, on ``M`` rows of ``C`` classes: one row per prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._common import (
    Reduction,
    check_ignore_index,
    check_reduction,
    float_array,
    ieee_semantics,
    reduce_loss,
    upstream_grad,
)
from .numerics import log_softmax

__all__ = [
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_target_grad",
    "nll_loss",
    "nll_loss_grad",
]

FloatArray = NDArray[np.floating]
IntArray = NDArray[np.int64]


# --------------------------------------------------------------------------------------------
# Shapes: one row per prediction
# --------------------------------------------------------------------------------------------


def _class_dim(ndim: int) -> int:
    """The class axis: 0 for unbatched ``(C,)`` input, else 1."""
    return 0 if ndim == 1 else 1


def _to_rows(x: FloatArray, class_dim: int) -> FloatArray:
    """``(N, C, d1..dk)`` -> ``(N·d1···dk, C)``: classes last, one row per prediction."""
    classes_last = np.moveaxis(x, class_dim, -1)
    num_rows = int(np.prod(classes_last.shape[:-1]))  # explicit, so that C = 0 works too
    return classes_last.reshape(num_rows, x.shape[class_dim])


def _from_rows(rows: FloatArray, shape: tuple[int, ...], class_dim: int) -> FloatArray:
    """Inverse of :func:`_to_rows`: ``(M, C)`` rows back to the input's ``shape``."""
    classes_last = shape[:class_dim] + shape[class_dim + 1 :] + (shape[class_dim],)
    return np.moveaxis(rows.reshape(classes_last), -1, class_dim)


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
# Argument checks (exception types as torch's; messages say what was expected and given)
# --------------------------------------------------------------------------------------------


def _index_target(input_shape: tuple[int, ...], target: ArrayLike, fn: str) -> IntArray:
    """Validate a class-index target against the input's shape; return it as int64."""
    target = np.asarray(target)
    if len(input_shape) == 0:
        raise ValueError(
            f"{fn}: Expected 1 or more dimensions (got 0): the input needs a class dimension, "
            "(C,), (N, C) or (N, C, d1, ..., dk)"
        )
    if len(input_shape) == 1:
        if target.ndim == 1 and target.shape[0] != 1:
            raise ValueError(
                f"{fn}: For 1D input, 1D target must have size 1, but got target size: "
                f"{target.shape[0]} (an unbatched (C,) input takes a 0-d target)"
            )
        if target.ndim > 1:
            raise RuntimeError(
                f"{fn}: 0D or 1D target tensor expected, multi-target not supported: input "
                f"shape {input_shape} needs a 0-d target, got shape {target.shape}"
            )
    else:
        target_batch = target.shape[0] if target.ndim > 0 else 0
        if target_batch != input_shape[0]:
            raise ValueError(
                f"{fn}: Expected input batch_size ({input_shape[0]}) to match target batch_size "
                f"({target_batch}): input shape {input_shape}, target shape {target.shape}"
            )
        expected = (input_shape[0],) + tuple(input_shape[2:])
        if target.shape != expected:
            raise RuntimeError(
                f"{fn}: Expected target size {expected} for input of shape {input_shape} "
                f"(the input without its class dimension 1), got {target.shape}"
                + (" (multi-target not supported)" if len(input_shape) == 2 else "")
            )
    if not np.issubdtype(target.dtype, np.integer):
        raise RuntimeError(
            f"{fn}: expected target dtype to be Long or Byte (integer class indices), but got "
            f"{target.dtype}; probability targets must have the input's shape {input_shape}"
        )
    return target.astype(np.int64)


def _class_weight(
    weight: ArrayLike | None, num_classes: int, dtype: DTypeLike, prefix: str = ""
) -> FloatArray:
    """``weight`` as a ``(C,)`` array (all ones when None)."""
    if weight is None:
        return np.ones(num_classes, dtype)
    weight = float_array(weight, dtype)
    if weight.shape != (num_classes,):
        raise RuntimeError(
            f"{prefix}weight tensor should be defined either for all {num_classes} classes or no "
            f"classes but got weight tensor of shape: {list(weight.shape)} (expected shape "
            f"({num_classes},))"
        )
    return weight


def _label_smoothing(label_smoothing: float) -> float:
    """torch checks ``ε <= 1`` only when ``ε > 0``; a negative ``ε`` (or NaN) means no smoothing."""
    if label_smoothing > 0.0:
        if label_smoothing > 1.0:
            raise RuntimeError(
                f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
            )
        return float(label_smoothing)
    return 0.0


def _reject_1d_target_of_size_1(input_ndim: int, target: IntArray, what: str) -> None:
    """torch 2.13 accepts a ``(1,)`` target for ``(C,)`` input in the forward only.

    Its backward raises ``size mismatch (got input: [C], target: [1])`` and its label-smoothing
    forward raises ``output with shape [] doesn't match the broadcast shape [1]``; so does the
    reference, so that it never certifies a result torch cannot produce.
    """
    if input_ndim == 1 and target.ndim == 1:
        raise RuntimeError(
            f"{what} is not supported for an unbatched (C,) input with a 1-element (1,) target "
            "(torch 2.13 raises here too); pass the class index as a 0-d target instead"
        )


# --------------------------------------------------------------------------------------------
# Class-index targets: shared by nll_loss and cross_entropy
# --------------------------------------------------------------------------------------------


@dataclass
class _IndexTargets:
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


def _gather_index_targets(
    log_probs: FloatArray,
    target: IntArray,
    weight: ArrayLike | None,
    ignore_index: int,
    dtype: DTypeLike,
) -> _IndexTargets:
    """Row form of ``log_probs`` (input's shape) and ``target``; gather each row's target entry."""
    class_dim = _class_dim(log_probs.ndim)
    num_classes = log_probs.shape[class_dim]
    class_weight = _class_weight(weight, num_classes, dtype)
    rows = _to_rows(log_probs, class_dim)  # (M, C)
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
    return _IndexTargets(
        log_probs=rows,
        target=target_rows,
        class_weight=class_weight,
        keep=keep,
        target_log_prob=target_log_prob,
        target_weight=target_weight,
        loss_shape=() if log_probs.ndim == 1 else target.shape,
        class_dim=class_dim,
    )


def _index_loss(p: _IndexTargets, label_smoothing: float, reduction: Reduction) -> FloatArray:
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


def _index_grad_log_probs(
    p: _IndexTargets, label_smoothing: float, upstream: FloatArray
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
) -> tuple[_IndexTargets, Reduction, tuple[int, ...]]:
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index, "nll_loss")
    log_probs = float_array(input, dtype)
    target = _index_target(log_probs.shape, target, "nll_loss")
    problem = _gather_index_targets(log_probs, target, weight, ignore_index, dtype)
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
    return _index_loss(problem, 0.0, reduction)


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
    _reject_1d_target_of_size_1(len(input_shape), np.asarray(target), "the nll_loss gradient")
    upstream = upstream_grad(
        grad_output, reduction, problem.loss_shape, problem.total_weight, problem.log_probs.dtype
    )
    grad = _index_grad_log_probs(problem, 0.0, upstream)
    return _from_rows(grad, input_shape, problem.class_dim)


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
    class_dim = _class_dim(logits.ndim)
    num_classes = logits.shape[class_dim]
    class_weight = _class_weight(weight, num_classes, dtype, prefix="cross_entropy: ")
    eps = _label_smoothing(label_smoothing)
    target_rows = _to_rows(float_array(target, dtype), class_dim)  # (M, C)
    if eps > 0.0:
        # ε / C as an array so that C = 0 gives inf, as torch, not ZeroDivisionError.
        target_rows = target_rows * (1 - eps) + np.asarray(eps, target_rows.dtype) / num_classes
    return _ProbTargets(
        log_probs=_to_rows(log_softmax(logits, class_dim, dtype=dtype), class_dim),
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
) -> tuple[_ProbTargets | _IndexTargets, Reduction, float, tuple[int, ...]]:
    """Pick the path as torch does (probabilities iff shapes are equal), validate, build rows."""
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index, "cross_entropy")
    logits = float_array(input, dtype)
    target = np.asarray(target)
    if target.shape == logits.shape:
        problem = _prob_targets(logits, target, weight, ignore_index, label_smoothing, dtype)
        return problem, reduction, problem.label_smoothing, logits.shape
    eps = _label_smoothing(label_smoothing)
    target = _index_target(logits.shape, target, "cross_entropy")
    if eps > 0.0:
        _reject_1d_target_of_size_1(logits.ndim, target, "label_smoothing > 0")
    log_probs = log_softmax(logits, _class_dim(logits.ndim), dtype=dtype)
    problem = _gather_index_targets(log_probs, target, weight, ignore_index, dtype)
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
    if isinstance(problem, _IndexTargets):
        return _index_loss(problem, eps, reduction)
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
    if isinstance(problem, _IndexTargets):
        _reject_1d_target_of_size_1(
            len(input_shape), np.asarray(target), "the cross_entropy gradient"
        )
        upstream = upstream_grad(
            grad_output, reduction, problem.loss_shape, problem.total_weight, dtype
        )
        grad_log_probs = _index_grad_log_probs(problem, eps, upstream)
    else:
        upstream = upstream_grad(
            grad_output, reduction, problem.loss_shape, problem.denominator, dtype
        )
        g = upstream.reshape(-1, 1)  # (M, 1)
        grad_log_probs = -g * problem.class_weight * problem.target  # (M, C)
    grad = _log_softmax_backward(grad_log_probs, problem.log_probs)
    return _from_rows(grad, input_shape, problem.class_dim)


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
    return _from_rows(grad, input_shape, problem.class_dim)
