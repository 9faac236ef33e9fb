"""What every reference loss shares: array conversion, reductions, upstream gradients, checks.

Kept in one place (tinygrad's ``_do_reduction`` pattern) so no loss re-implements them; the
formulas themselves stay in each loss's module. The argument checks (``check_*``) mirror
``crossent._checks`` (same rules, same exception types); they are repeated here because
``crossent._checks`` imports torch and this package must not. For the class losses (NLL, cross
entropy) this module also holds their row form: the class axis moved last and the other axes
flattened, so that their math is written once, on ``M`` rows of ``C`` classes.
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
    "check_class_weight",
    "check_ignore_index",
    "check_index_target",
    "check_label_smoothing",
    "check_reduction",
    "class_dim_of",
    "float_array",
    "from_rows",
    "ieee_semantics",
    "reduce_loss",
    "reject_unbatched_target_of_size_1",
    "to_rows",
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


# --------------------------------------------------------------------------------------------
# Class losses (NLL, cross entropy): row form and argument checks
# --------------------------------------------------------------------------------------------


def class_dim_of(ndim: int) -> int:
    """The class axis: 0 for unbatched ``(C,)`` input, else 1."""
    return 0 if ndim == 1 else 1


def to_rows(x: NDArray, class_dim: int) -> NDArray:
    """``(N, C, d1..dk)`` -> ``(N·d1···dk, C)``: classes last, one row per prediction."""
    classes_last = np.moveaxis(x, class_dim, -1)
    num_rows = int(np.prod(classes_last.shape[:-1]))  # explicit, so that C = 0 works too
    return classes_last.reshape(num_rows, x.shape[class_dim])


def from_rows(rows: NDArray, shape: tuple[int, ...], class_dim: int) -> NDArray:
    """Inverse of :func:`to_rows`: ``(M, C)`` rows back to the input's ``shape``."""
    classes_last = shape[:class_dim] + shape[class_dim + 1 :] + (shape[class_dim],)
    return np.moveaxis(rows.reshape(classes_last), -1, class_dim)


def check_index_target(input_shape: tuple[int, ...], target: ArrayLike, fn: str) -> NDArray:
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


def check_class_weight(
    weight: ArrayLike | None, num_classes: int, dtype: DTypeLike, prefix: str = ""
) -> NDArray[np.floating]:
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


def check_label_smoothing(label_smoothing: float) -> float:
    """torch checks ``ε <= 1`` only when ``ε > 0``; a negative ``ε`` (or NaN) means no smoothing."""
    if label_smoothing > 0.0:
        if label_smoothing > 1.0:
            raise RuntimeError(
                f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"
            )
        return float(label_smoothing)
    return 0.0


def reject_unbatched_target_of_size_1(input_ndim: int, target: NDArray, what: str) -> None:
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
