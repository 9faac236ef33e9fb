"""Numerically stable building blocks: ``sigmoid``, ``log_sigmoid``, ``logsumexp``, ``log_softmax``.

Each function is written in the one form that neither overflows nor loses precision, with a
comment saying why. They follow NumPy's IEEE rules (``log(0) = -inf``, ``inf - inf = nan``)
without warnings, and treat NaN and infinities exactly as the torch kernels do (noted per
function).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._common import float_array, ieee_semantics


@ieee_semantics
def sigmoid(x: ArrayLike, *, dtype: DTypeLike = np.float64) -> NDArray[np.floating]:
    r"""The logistic function, elementwise.

    .. math::

        \sigma(x) = \frac{1}{1 + e^{-x}}
                  = \begin{cases} \dfrac{1}{1 + z} & x \ge 0 \\[4pt]
                                  \dfrac{z}{1 + z} & x < 0 \end{cases}
        \qquad z = e^{-|x|}

    Args:
        x: logits, any shape.
        dtype: floating dtype to compute in (default float64).

    Returns:
        :math:`\sigma(x)`, same shape as ``x``, in ``(0, 1)`` up to rounding
        (``sigmoid(inf) = 1``, ``sigmoid(-inf) = 0``, NaN stays NaN).

    Example:
        >>> sigmoid([0.0, 1000.0, -1000.0]).tolist()
        [0.5, 1.0, 0.0]
    """
    x = float_array(x, dtype)
    # Why two branches: e^{-x} overflows to inf for x < -709 (float64). With z = e^{-|x|} the
    # exponent is never positive, so z is in (0, 1] and neither 1 + z nor z / (1 + z) overflows.
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + z), z / (1 + z))


@ieee_semantics
def log_sigmoid(x: ArrayLike, *, dtype: DTypeLike = np.float64) -> NDArray[np.floating]:
    r""":math:`\log \sigma(x)`, elementwise, in torch's form (``F.logsigmoid``).

    .. math::

        \log \sigma(x) = -\log(1 + e^{-x}) = \min(x, 0) - \operatorname{log1p}(e^{-|x|})

    The identity :math:`\log(1 - \sigma(x)) = \log \sigma(-x)` gives the other half of binary
    cross entropy without ever forming :math:`1 - \sigma(x)` (which rounds to 0 for ``x > 37``).

    Args:
        x: logits, any shape.
        dtype: floating dtype to compute in (default float64).

    Returns:
        :math:`\log\sigma(x) \le 0`, same shape as ``x`` (``-inf`` at ``x = -inf``, ``0`` at
        ``x = inf``).

    Example:
        >>> float(log_sigmoid(0.0)) == -float(np.log(2))
        True
        >>> float(log_sigmoid(-1000.0))
        -1000.0
    """
    x = float_array(x, dtype)
    # Why this form: log(1 + e^{-x}) = max(-x, 0) + log(1 + e^{-|x|}). The exponent -|x| is never
    # positive, so nothing overflows (the naive e^{-x} is inf for x < -709). And log1p(t) keeps
    # full relative precision for tiny t = e^{-|x|}, where log(1 + t) would round 1 + t to 1 and
    # return 0 for every |x| > 37.
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))


@ieee_semantics
def logsumexp(
    x: ArrayLike, axis: int = -1, *, keepdims: bool = False, dtype: DTypeLike = np.float64
) -> NDArray[np.floating]:
    r""":math:`\log \sum_c e^{x_c}` along ``axis``, shifted by the maximum.

    .. math::

        \operatorname{logsumexp}(x) = m + \log \sum_c e^{x_c - m}, \qquad m = \max_c x_c

    Args:
        x: values, any shape with at least one dimension.
        axis: the axis to reduce (the class axis).
        keepdims: keep the reduced axis with size 1.
        dtype: floating dtype to compute in (default float64).

    Returns:
        The log-sum-exp, ``x``'s shape without ``axis``. Like ``torch.logsumexp``: ``-inf`` for an
        empty axis or an all ``-inf`` slice, ``inf`` if any element is ``+inf``, NaN if any is NaN.

    Example:
        >>> float(logsumexp([1000.0, 1000.0])) == 1000.0 + float(np.log(2))
        True
    """
    x = float_array(x, dtype)
    # Why shift by the max: e^{x} overflows for x > 709. After subtracting m the largest term is
    # e^0 = 1, so the sum lies in [1, C]: it cannot overflow, and it cannot underflow to 0 (which
    # would make log return -inf) however negative the other entries are.
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    # An infinite max cannot be subtracted (inf - inf = nan); shift by 0 instead, which gives
    # log(0) = -inf for an all -inf slice and log(inf) = inf when some entry is +inf.
    m = np.where(np.isfinite(m), m, 0)
    out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


@ieee_semantics
def log_softmax(
    x: ArrayLike, axis: int = -1, *, dtype: DTypeLike = np.float64
) -> NDArray[np.floating]:
    r"""Log-probabilities :math:`\log \operatorname{softmax}(x)` along ``axis``.

    .. math::

        \log p_c = x_c - \log \sum_k e^{x_k} = (x_c - m) - \log \sum_k e^{x_k - m},
        \qquad m = \max_k x_k

    Args:
        x: logits, any shape; ``axis`` is the class axis.
        axis: the class axis.
        dtype: floating dtype to compute in (default float64).

    Returns:
        Log-probabilities, same shape as ``x``. As in torch's kernel, a slice that contains NaN or
        ``+inf``, or is all ``-inf``, comes out all NaN (``x - m`` is then ``inf - inf``).

    Example:
        >>> np.exp(log_softmax([0.0, 0.0])).tolist()
        [0.5, 0.5]
    """
    x = float_array(x, dtype)
    # Why subtract the max first: every shifted logit is then <= 0, so e^{x - m} <= 1 cannot
    # overflow, and the sum is >= 1 (the max contributes e^0 = 1), so its log is finite.
    # Why not log(softmax(x)): e^{x_c - m} underflows to 0 for x_c - m < -745, and log(0) = -inf,
    # whereas (x_c - m) - log(sum) stays finite and accurate however small the probability.
    shifted = x - np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(x: ArrayLike, axis: int = -1, *, dtype: DTypeLike = np.float64) -> NDArray[np.floating]:
    r"""Probabilities :math:`\operatorname{softmax}(x)_c = e^{x_c} / \sum_k e^{x_k}` along ``axis``.

    Computed as ``exp(log_softmax(x))``, so it inherits the max shift (no overflow).

    Args:
        x: logits, any shape; ``axis`` is the class axis.
        axis: the class axis.
        dtype: floating dtype to compute in (default float64).

    Returns:
        Probabilities, same shape as ``x``, summing to 1 along ``axis``.
    """
    return np.exp(log_softmax(x, axis, dtype=dtype))
