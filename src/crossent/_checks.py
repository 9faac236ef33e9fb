"""Argument validation shared by every backend.

This is the one place that raises for bad arguments, so that behaviour cannot drift between the
CPU, GPU and distributed paths. Exception *types* follow torch 2.13 (users catch them); messages
say what was wrong, what was expected and what was given.
"""

from __future__ import annotations

import warnings
from typing import Literal

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")


def reduction_from_legacy(
    size_average: bool | None, reduce: bool | None, reduction: str
) -> str:
    """Resolve torch's deprecated ``size_average``/``reduce`` pair into a reduction string.

    ``None`` counts as ``True``; if either is not ``None`` it overrides ``reduction``, with the
    same ``UserWarning`` torch gives.
    """
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        result = "none"
    elif size_average:
        result = "mean"
    else:
        result = "sum"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{result}' "
        "instead.",
        UserWarning,
        stacklevel=3,
    )
    return result


def check_reduction(reduction: str) -> Reduction:
    """Validate ``reduction``; accept the deprecated ``'elementwise_mean'`` as ``'mean'``."""
    if reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            UserWarning,
            stacklevel=3,
        )
        return "mean"
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(
            f"{reduction} is not a valid value for reduction: expected one of "
            f"'none', 'mean' or 'sum', got {reduction!r}"
        )
    return reduction  # type: ignore[return-value]


def resolve_reduction(
    size_average: bool | None, reduce: bool | None, reduction: str
) -> Reduction:
    """Legacy arguments first, then validation: the order torch applies them in."""
    return check_reduction(reduction_from_legacy(size_average, reduce, reduction))


def check_ignore_index(ignore_index: object, fn: str = "cross_entropy") -> int:
    """``ignore_index`` must be an int (torch raises TypeError for None or floats)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(
            f"{fn}(): argument 'ignore_index' must be int, not {type(ignore_index).__name__}"
        )
    return ignore_index
