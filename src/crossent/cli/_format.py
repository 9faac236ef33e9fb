"""Text output helpers: number formatting, aligned tables, JSON-safe values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike, NDArray

__all__ = ["exact", "jsonable", "short", "table", "vector"]


def exact(value: float, dtype: DTypeLike = np.float64) -> str:
    """The shortest decimal that reads back as the same ``dtype`` number (``1.2200143``)."""
    return str(np.dtype(dtype).type(value))


def short(value: float, digits: int = 6) -> str:
    """A value for the step-by-step display: ``digits`` significant digits."""
    return f"{float(value):.{digits}g}"


def vector(values: NDArray, limit: int = 8, digits: int = 4) -> str:
    """``[1.2, -0.5, ...]``: a 1-D array with at most ``limit`` entries shown."""
    flat = np.asarray(values).reshape(-1)
    shown = ", ".join(f"{float(v):.{digits}g}" for v in flat[:limit])
    more = f", … ({flat.size - limit} more)" if flat.size > limit else ""
    return f"[{shown}{more}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Lines of an aligned table: the first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return [line(headers), rule, *(line(r) for r in rows)]


def _json_float(value: float) -> float | str:
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def jsonable(value: object) -> object:
    """Convert arrays and numpy scalars to plain JSON values.

    Arrays become (nested) lists. Non-finite floats become the strings ``"nan"``, ``"inf"`` and
    ``"-inf"``, so that the output is strict JSON (``json.dumps`` would otherwise write the
    non-standard ``NaN`` / ``Infinity``).
    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return jsonable(value.item())
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _json_float(value)
    return value
