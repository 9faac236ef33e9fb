"""Text output helpers: number formatting, aligned tables, JSON-safe values, plain-ASCII text.

Text output uses a few mathematical symbols (``σ``, ``Σ``, ``ε``, ``−``). Where the output
stream cannot encode them (``PYTHONIOENCODING=ascii``, a ``C`` locale), :func:`encodable`
spells them in ASCII (``sigmoid``, ``sum``, ``eps``, ``-``); :func:`table` measures its cells
in the spelling that will be printed, so columns stay aligned.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import DTypeLike, NDArray

__all__ = [
    "ascii_output",
    "can_encode",
    "encodable",
    "exact",
    "jsonable",
    "paragraph",
    "short",
    "table",
    "vector",
]

#: Widest line of the text output (the demo, tables, wrapped prose).
LINE_WIDTH = 100

# How the symbols of the text output read in ASCII.
_ASCII_SPELLING = str.maketrans(
    {
        "−": "-",
        "·": "*",
        "×": "x",
        "σ": "sigmoid",
        "Σ": "sum",
        "ε": "eps",
        "Δ": "diff",
        "→": "->",
        "…": "...",
        "≤": "<=",
        "≥": ">=",
        "≠": "!=",
        "≈": "~",
        "∈": "in",
    }
)
_ascii_only = False


@contextlib.contextmanager
def ascii_output(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`table` and :func:`encodable` write plain ASCII if ``enabled``."""
    global _ascii_only
    before, _ascii_only = _ascii_only, enabled
    try:
        yield
    finally:
        _ascii_only = before


def encodable(text: str, encoding: str | None = None) -> str:
    """``text`` as the output stream can print it.

    With ASCII output on (or when ``encoding`` cannot encode ``text``), the known symbols are
    spelled out and anything else becomes a backslash escape (``\\u2248``), never an error.
    """
    if _ascii_only or (encoding and not can_encode(text, encoding)):
        text = text.translate(_ASCII_SPELLING)
        target = encoding if encoding and not _ascii_only else "ascii"
        text = text.encode(target, "backslashreplace").decode(target)
    return text


def paragraph(text: str, indent: str = "", hanging: str | None = None) -> list[str]:
    """``text`` wrapped to ``LINE_WIDTH`` columns (as printed, ASCII spelling included), the
    first line indented by ``indent``, the others by ``hanging`` (default: ``indent``)."""
    text = encodable(text) if _ascii_only else text
    return textwrap.wrap(
        text,
        width=LINE_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent if hanging is None else hanging,
        break_long_words=False,
        break_on_hyphens=False,
    )


def can_encode(text: str, encoding: str | None) -> bool:
    """Whether ``encoding`` (default UTF-8) can encode ``text``."""
    try:
        text.encode(encoding or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _unsigned_zero(value: float) -> float:
    """``-0.0`` reads as a negative loss; ``+ 0.0`` turns it into ``0.0`` and keeps the rest."""
    return value + 0.0


def exact(value: float, dtype: DTypeLike = np.float64) -> str:
    """The shortest decimal that reads back as the same ``dtype`` number (``1.2200143``).

    Zero prints as ``0.0`` whatever its sign (the JSON output keeps ``-0.0``).
    """
    return str(np.dtype(dtype).type(value) + np.dtype(dtype).type(0))


def short(value: float, digits: int = 6) -> str:
    """A value for the step-by-step display: ``digits`` significant digits; never ``-0``."""
    return f"{_unsigned_zero(float(value)):.{digits}g}"


def vector(values: NDArray, limit: int = 8, digits: int = 4) -> str:
    """``[1.2, -0.5, ...]``: a 1-D array with at most ``limit`` entries shown."""
    flat = np.asarray(values).reshape(-1)
    shown = ", ".join(short(v, digits) for v in flat[:limit])
    more = f", … ({flat.size - limit} more)" if flat.size > limit else ""
    return f"[{shown}{more}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Lines of an aligned table: the first column left-aligned, the others right-aligned."""
    headers = [encodable(h) for h in headers] if _ascii_only else headers
    rows = [[encodable(c) for c in row] for row in rows] if _ascii_only else rows
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
