"""What every reference loss shares: array conversion, reductions, upstream gradients, checks.

Kept in one place (tinygrad's ``_do_reduction`` pattern) so no loss re-implements them.
``check_reduction`` and ``check_ignore_index`` mirror ``crossent._checks`` (same rules, same
exception types); they are repeated here because ``crossent._checks`` imports torch and this
package must not.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

__all__ = [
    "Reduction",
    "check_broadcasts_to",
    "check_ignore_index",
    "check_reduction",
    "float_array",
    "ieee_semantics",
    "reduce_loss",
    "upstream_grad",
]

F = TypeVar("F", bound=Callable[..., object])
Reduction = Literal["none", "mean", "sum"]


def check_reduction(reduction: str) -> Reduction:
    """Validate ``reduction`` as torch does; ``'elementwise_mean'`` is a deprecated ``'mean'``.

    Raises:
        ValueError: ``reduction`` is not ``'none'``, ``'mean'`` or ``'sum'``.
    """
    if reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            UserWarning,
            stacklevel=5,  # user -> wrapper -> loss -> _args -> here
        )
        return "mean"
    if not isinstance(reduction, str) or reduction not in ("none", "mean", "sum"):
        raise ValueError(
            f"{reduction} is not a valid value for reduction: expected one of 'none', 'mean' or "
            f"'sum', got {reduction!r}"
        )
    return reduction  # type: ignore[return-value]


def check_ignore_index(ignore_index: object, fn: str) -> int:
    """``ignore_index`` must be an int (torch raises TypeError for None, floats and bools)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(
            f"{fn}(): argument 'ignore_index' must be int, not {type(ignore_index).__name__}"
        )
    return int(ignore_index)


def ieee_semantics(fn: F) -> F:
    """Run ``fn`` with NumPy's divide/invalid/overflow warnings off.

    The losses rely on IEEE arithmetic exactly as torch does: ``log(0) = -inf`` (clamped to
    -100 in BCE), ``0 / 0 = nan`` (the mean of an empty or all-ignored batch), ``inf * 0 = nan``.
    Those are results, not accidents, so NumPy should not warn about them.
    """

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def float_array(x: ArrayLike, dtype: DTypeLike) -> NDArray[np.floating]:
    """``np.asarray(x, dtype)`` for a floating ``dtype``; never copies needlessly, never writes."""
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"dtype must be a floating dtype such as np.float64, got {dtype}")
    return np.asarray(x, dtype=dtype)


def check_broadcasts_to(name: str, shape: tuple[int, ...], target_shape: tuple[int, ...]) -> None:
    """Raise RuntimeError unless ``shape`` broadcasts (right-aligned) to ``target_shape``.

    torch multiplies ``weight``/``pos_weight`` into a loss of the input's shape, so they must
    broadcast *to* that shape: equal or size-1 trailing dimensions, and no extra leading ones.
    """
    try:
        broadcast = np.broadcast_shapes(shape, target_shape)
    except ValueError:
        broadcast = None
    if broadcast != target_shape:
        raise RuntimeError(
            f"{name} of shape {tuple(shape)} must broadcast to the input shape "
            f"{tuple(target_shape)} (right-aligned: each trailing dimension equal or 1, no extra "
            f"leading dimensions); broadcasting gives "
            f"{'no common shape' if broadcast is None else tuple(broadcast)}"
        )


def reduce_loss(
    loss: NDArray[np.floating], reduction: Reduction, denominator: ArrayLike
) -> NDArray[np.floating]:
    r"""Apply a reduction to per-element losses :math:`\ell`.

    .. math::

        \text{none}: \ell \qquad \text{sum}: \sum_i \ell_i \qquad
        \text{mean}: \frac{\sum_i \ell_i}{D}

    ``D`` is the loss's own denominator: the element count for BCE, the summed target weights
    for NLL / index cross entropy, ``N·d1…dk`` for probability targets. ``0 / 0`` gives NaN, as
    in torch (mean of an empty or all-ignored batch).

    Returns:
        ``loss`` itself for ``'none'``, else a 0-d array.
    """
    if reduction == "none":
        return loss
    total = np.sum(loss)
    if reduction == "sum":
        return np.asarray(total)
    return np.asarray(total / denominator)


def upstream_grad(
    grad_output: ArrayLike,
    reduction: Reduction,
    loss_shape: tuple[int, ...],
    denominator: ArrayLike,
    dtype: DTypeLike,
) -> NDArray[np.floating]:
    r"""``dL/dℓ_i``: the upstream gradient seen by each unreduced loss element :math:`\ell_i`.

    With :math:`g` = ``grad_output``:

    .. math::

        \text{none}: g_i \qquad \text{sum}: g \qquad \text{mean}: g / D

    Args:
        grad_output: a scalar for ``'mean'``/``'sum'``; for ``'none'`` an array of the loss's
            shape (a scalar is also accepted there and means the same ``g`` for every element).
        reduction: the loss's reduction.
        loss_shape: shape of the unreduced loss.
        denominator: ``D`` of the mean (see :func:`reduce_loss`).
        dtype: floating dtype to compute in.

    Returns:
        An array of ``loss_shape``.

    Raises:
        RuntimeError: ``grad_output`` has the wrong shape (torch's autograd raises RuntimeError
            for a mismatched ``grad_outputs`` too).
    """
    g = float_array(grad_output, dtype)
    if reduction == "none":
        if g.ndim != 0 and g.shape != tuple(loss_shape):
            raise RuntimeError(
                f"grad_output must have the loss's shape {tuple(loss_shape)} for "
                f"reduction='none' (or be a scalar), got shape {g.shape}"
            )
        return np.broadcast_to(g, loss_shape)
    if g.ndim != 0:
        raise RuntimeError(
            f"grad_output must be a scalar for reduction='{reduction}' (the loss is a scalar), "
            f"got shape {g.shape}"
        )
    if reduction == "mean":
        g = g / denominator
    return np.broadcast_to(g, loss_shape)
