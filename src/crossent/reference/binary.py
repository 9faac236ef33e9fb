"""Binary cross entropy on probabilities and on logits, with analytic gradients.

Reference semantics: torch 2.13 ``F.binary_cross_entropy`` and
``F.binary_cross_entropy_with_logits`` (``docs/reference.md`` lists the fine print).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._common import (
    Reduction,
    check_broadcasts_to,
    check_reduction,
    float_array,
    ieee_semantics,
    reduce_loss,
    upstream_grad,
)
from .numerics import log_sigmoid, sigmoid

FloatArray = NDArray[np.floating]

# torch clamps each log at -100 so that 0 * log(0) never becomes 0 * -inf = nan.
LOG_CLAMP = -100.0
# torch's floor for x(1 - x) in the BCE gradient. It is the C++ float literal 1e-12f, so in
# float64 it is float32(1e-12) = 9.999999960041972e-13, not 1e-12 (a 4e-9 relative difference at
# the boundaries). In float16 it underflows to 0, so the boundary gradient is ±inf there.
GRAD_EPS = float(np.float32(1e-12))


# --------------------------------------------------------------------------------------------
# Binary cross entropy on probabilities
# --------------------------------------------------------------------------------------------


def _first_outside_unit_interval(values: FloatArray) -> str:
    """Describe the first element outside [0, 1] (NaN counts as outside)."""
    bad = np.argwhere(~((values >= 0) & (values <= 1)))[0]
    return f"{float(values[tuple(bad)])!r} at index {tuple(int(i) for i in bad)}"


def _bce_args(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None,
    reduction: str,
    dtype: DTypeLike,
) -> tuple[FloatArray, FloatArray, FloatArray, Reduction]:
    """Convert and validate BCE's arguments, in torch's order; ``weight`` defaults to 1."""
    reduction = check_reduction(reduction)
    probs = float_array(input, dtype)
    target = float_array(target, dtype)
    if target.shape != probs.shape:
        raise ValueError(
            f"binary_cross_entropy: target shape {target.shape} must equal input shape "
            f"{probs.shape}; input and target are not broadcast against each other"
        )
    weight = np.ones((), dtype) if weight is None else float_array(weight, dtype)
    check_broadcasts_to("binary_cross_entropy: weight", weight.shape, probs.shape)
    if not np.all((probs >= 0) & (probs <= 1)):
        raise RuntimeError(
            "all elements of input should be between 0 and 1 (they are probabilities; use "
            "binary_cross_entropy_with_logits for logits), got "
            + _first_outside_unit_interval(probs)
        )
    if not np.all((target >= 0) & (target <= 1)):
        raise RuntimeError(
            "all elements of target should be between 0 and 1, got "
            + _first_outside_unit_interval(target)
        )
    return probs, target, weight, reduction


@ieee_semantics
def binary_cross_entropy(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Binary cross entropy between probabilities ``input`` and targets ``target``.

    For each element, with :math:`x` the predicted probability, :math:`y` the target and
    :math:`w` the (broadcast) weight:

    .. math::

        \ell = -w \left[ y \max(\log x, -100) + (1 - y) \max(\log(1 - x), -100) \right]

    The clamp at -100 is torch's: it keeps :math:`0 \cdot \log 0` finite, so ``x = 0, y = 0``
    gives 0 and ``x = 0, y = 1`` gives 100. Reductions: ``'none'`` keeps the input's shape,
    ``'sum'`` is :math:`\sum \ell`, ``'mean'`` is :math:`\sum \ell / \text{numel}` (weights do
    not renormalise the mean; an empty input gives NaN).

    Args:
        input: probabilities :math:`x \in [0, 1]`, any shape.
        target: targets :math:`y \in [0, 1]`, the input's shape.
        weight: optional rescaling weight that broadcasts (right-aligned) to the input's shape.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        dtype: floating dtype to compute in (default float64).

    Returns:
        The loss: a 0-d array for ``'mean'``/``'sum'``, the input's shape for ``'none'``.

    Raises:
        ValueError: target shape differs from input shape; invalid ``reduction``.
        RuntimeError: ``weight`` does not broadcast to the input's shape; an input or target
            element is outside ``[0, 1]`` (NaN included).

    Example:
        >>> float(binary_cross_entropy([0.5, 1.0], [1.0, 0.0], reduction="sum"))
        100.69314718055995

    Reference: torch.nn.functional.binary_cross_entropy (torch 2.13).
    """
    probs, target, weight, reduction = _bce_args(input, target, weight, reduction, dtype)
    log_p = np.maximum(np.log(probs), LOG_CLAMP)
    # log1p(-x) rather than log(1 - x): exact for small x, where 1 - x loses x's low bits.
    log_1mp = np.maximum(np.log1p(-probs), LOG_CLAMP)
    loss = (target - 1) * log_1mp - target * log_p
    loss = loss * weight
    return reduce_loss(loss, reduction, probs.size)


@ieee_semantics
def binary_cross_entropy_grad(
    input: ArrayLike,
    target: ArrayLike,
    grad_output: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Gradient of :func:`binary_cross_entropy` with respect to ``input``, as torch computes it.

    .. math::

        \frac{\partial L}{\partial x} = g \, w \, \frac{x - y}{\max(x (1 - x), \epsilon)},
        \qquad \epsilon = \texttt{float32}(10^{-12})

    where :math:`g` is ``grad_output`` (divided by numel for ``'mean'``). This is torch's
    formula, **not** the derivative of the clamped forward: at ``x = 0, y = 1`` the forward is
    flat (clamped at 100) but the gradient is :math:`-1/\epsilon \approx -10^{12}`. Where
    ``x = y`` it is 0. :math:`\epsilon` is torch's C++ ``1e-12f``, a float32 constant even for
    float64 inputs.

    Args:
        input, target, weight, reduction, dtype: as for :func:`binary_cross_entropy`.
        grad_output: upstream gradient; a scalar for ``'mean'``/``'sum'``, the input's shape
            (or a scalar) for ``'none'``.

    Returns:
        :math:`\partial L / \partial x`, the input's shape.

    Raises:
        As :func:`binary_cross_entropy`; RuntimeError for a wrongly shaped ``grad_output``.
    """
    probs, target, weight, reduction = _bce_args(input, target, weight, reduction, dtype)
    g = upstream_grad(grad_output, reduction, probs.shape, probs.size, probs.dtype)
    return g * weight * (probs - target) / np.maximum(probs * (1 - probs), GRAD_EPS)


@ieee_semantics
def binary_cross_entropy_target_grad(
    input: ArrayLike,
    target: ArrayLike,
    grad_output: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Gradient of :func:`binary_cross_entropy` with respect to ``target``.

    .. math::

        \frac{\partial L}{\partial y} = g \, w \, \bigl(\log(1 - x) - \log x\bigr)
                                      = -g \, w \, \operatorname{logit}(x)

    Unclamped, as in torch: :math:`+\infty` at ``x = 0``, :math:`-\infty` at ``x = 1``.
    :math:`g` is ``grad_output`` (divided by numel for ``'mean'``).

    Args:
        input, target, grad_output, weight, reduction, dtype: as for
            :func:`binary_cross_entropy_grad`.

    Returns:
        :math:`\partial L / \partial y`, the target's shape.

    Raises:
        As :func:`binary_cross_entropy_grad`.
    """
    probs, target, weight, reduction = _bce_args(input, target, weight, reduction, dtype)
    g = upstream_grad(grad_output, reduction, probs.shape, probs.size, probs.dtype)
    # torch computes -logit(x) = -log(x / (1 - x)) in one log.
    return -g * weight * np.log(probs / (1 - probs))


# --------------------------------------------------------------------------------------------
# Binary cross entropy on logits
# --------------------------------------------------------------------------------------------


def _bce_logits_args(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None,
    reduction: str,
    pos_weight: ArrayLike | None,
    dtype: DTypeLike,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray | None, Reduction]:
    """Convert and validate BCE-with-logits' arguments; ``weight`` defaults to 1."""
    reduction = check_reduction(reduction)
    logits = float_array(input, dtype)
    target = float_array(target, dtype)
    if target.shape != logits.shape:
        raise ValueError(
            f"binary_cross_entropy_with_logits: target shape {target.shape} must equal input "
            f"shape {logits.shape}; input and target are not broadcast against each other"
        )
    weight = np.ones((), dtype) if weight is None else float_array(weight, dtype)
    check_broadcasts_to("binary_cross_entropy_with_logits: weight", weight.shape, logits.shape)
    if pos_weight is not None:
        pos_weight = float_array(pos_weight, dtype)
        check_broadcasts_to(
            "binary_cross_entropy_with_logits: pos_weight", pos_weight.shape, logits.shape
        )
    return logits, target, weight, pos_weight, reduction


def _log_weight(target: FloatArray, pos_weight: FloatArray | None) -> FloatArray:
    """:math:`1 + (p - 1) y`, the factor on :math:`-\\log\\sigma(x)` (1 without pos_weight)."""
    if pos_weight is None:
        return np.ones_like(target)
    return 1 + (pos_weight - 1) * target


@ieee_semantics
def binary_cross_entropy_with_logits(
    input: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Binary cross entropy on logits, with optional positive-class weight.

    For each element, with logit :math:`x`, target :math:`y`, weight :math:`w` and positive
    weight :math:`p` (both broadcast right-aligned to the input's shape; :math:`p = 1` if absent):

    .. math::

        \ell = -w \left[ p \, y \log \sigma(x) + (1 - y) \log(1 - \sigma(x)) \right]
             = w \left[ (1 - y) \, x - \bigl(1 + (p - 1) y\bigr) \log \sigma(x) \right]

    The second form is what torch computes. It uses :math:`\log(1 - \sigma(x)) = \log\sigma(x) - x`
    and the stable :func:`~crossent.reference.log_sigmoid`, so large logits (``|x| = 10^4``) stay
    finite. Infinite logits give NaN where a :math:`0 \cdot \infty` appears (``x = +\infty, y = 1``
    and ``x = -\infty, y = 0``), exactly as torch. Targets are not range-checked (torch does not).
    ``'mean'`` is :math:`\sum \ell / \text{numel}`: neither weight renormalises it.

    A per-class ``pos_weight`` for an ``(N, C, H, W)`` input has shape ``(C, 1, 1)``; shape
    ``(C,)`` would apply along the last dimension ``W``.

    Args:
        input: logits, any shape.
        target: targets, the input's shape (usually in ``[0, 1]``).
        weight: optional rescaling weight, broadcasts to the input's shape.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        pos_weight: optional weight of positive examples, broadcasts to the input's shape.
        dtype: floating dtype to compute in (default float64).

    Returns:
        The loss: a 0-d array for ``'mean'``/``'sum'``, the input's shape for ``'none'``.

    Raises:
        ValueError: target shape differs from input shape; invalid ``reduction``.
        RuntimeError: ``weight`` or ``pos_weight`` does not broadcast to the input's shape.

    Example:
        >>> float(binary_cross_entropy_with_logits([0.0], [1.0])) == float(np.log(2))
        True

    Reference: torch.nn.functional.binary_cross_entropy_with_logits (torch 2.13).
    """
    logits, target, weight, pos_weight, reduction = _bce_logits_args(
        input, target, weight, reduction, pos_weight, dtype
    )
    log_sig = log_sigmoid(logits, dtype=logits.dtype)
    loss = (1 - target) * logits - _log_weight(target, pos_weight) * log_sig
    loss = loss * weight
    return reduce_loss(loss, reduction, logits.size)


@ieee_semantics
def binary_cross_entropy_with_logits_grad(
    input: ArrayLike,
    target: ArrayLike,
    grad_output: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Gradient of :func:`binary_cross_entropy_with_logits` with respect to ``input``.

    .. math::

        \frac{\partial L}{\partial x}
            = g \, w \left[ \bigl(1 + (p - 1) y\bigr) \sigma(x) - p\,y \right]
        \qquad (= g\,w\,(\sigma(x) - y) \text{ without pos\_weight})

    :math:`g` is ``grad_output`` (divided by numel for ``'mean'``).

    Args:
        input, target, weight, reduction, pos_weight, dtype: as for
            :func:`binary_cross_entropy_with_logits`.
        grad_output: upstream gradient; a scalar for ``'mean'``/``'sum'``, the input's shape
            (or a scalar) for ``'none'``.

    Returns:
        :math:`\partial L / \partial x`, the input's shape.

    Raises:
        As :func:`binary_cross_entropy_with_logits`; RuntimeError for a wrongly shaped
        ``grad_output``.
    """
    logits, target, weight, pos_weight, reduction = _bce_logits_args(
        input, target, weight, reduction, pos_weight, dtype
    )
    g = upstream_grad(grad_output, reduction, logits.shape, logits.size, logits.dtype)
    p_y = target if pos_weight is None else pos_weight * target
    return g * weight * (_log_weight(target, pos_weight) * sigmoid(logits, dtype=dtype) - p_y)


@ieee_semantics
def binary_cross_entropy_with_logits_target_grad(
    input: ArrayLike,
    target: ArrayLike,
    grad_output: ArrayLike = 1.0,
    weight: ArrayLike | None = None,
    reduction: str = "mean",
    pos_weight: ArrayLike | None = None,
    *,
    dtype: DTypeLike = np.float64,
) -> FloatArray:
    r"""Gradient of :func:`binary_cross_entropy_with_logits` with respect to ``target``.

    .. math::

        \frac{\partial L}{\partial y} = g \, w \left[ \log\sigma(-x) - p \log\sigma(x) \right]
        \qquad (= -g\,w\,x \text{ without pos\_weight})

    (Differentiate :math:`(1-y)x - (1 + (p-1)y)\log\sigma(x)` and use
    :math:`\log\sigma(-x) = \log\sigma(x) - x`.) :math:`g` is ``grad_output`` (divided by numel
    for ``'mean'``). torch computes the two cases by these two forms; so does this function.

    Args:
        input, target, grad_output, weight, reduction, pos_weight, dtype: as for
            :func:`binary_cross_entropy_with_logits_grad`.

    Returns:
        :math:`\partial L / \partial y`, the target's shape.

    Raises:
        As :func:`binary_cross_entropy_with_logits_grad`.
    """
    logits, target, weight, pos_weight, reduction = _bce_logits_args(
        input, target, weight, reduction, pos_weight, dtype
    )
    g = upstream_grad(grad_output, reduction, logits.shape, logits.size, logits.dtype)
    if pos_weight is None:
        d_target = -logits
    else:
        d_target = log_sigmoid(-logits, dtype=dtype) - pos_weight * log_sigmoid(logits, dtype=dtype)
    return g * weight * d_target
