"""Reading the numbers the user gives on the command line: inline lists, ``.npy``, ``.csv``.

Inline values are comma-separated numbers, with rows separated by ``;`` for a 2-D array
(``"1,2,3;4,5,6"`` is 2×3). Anything that is not such a list must be a path ending in ``.npy``
(read with ``numpy.load(path, allow_pickle=False)``: a file that holds pickled objects is
refused, never unpickled) or ``.csv`` (``numpy.loadtxt(path, delimiter=",")``, UTF-8 with or
without a byte-order mark).

Every problem here is a usage error (:class:`UsageError`, exit status 2); losses raise their own
errors later.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from numpy.typing import NDArray

__all__ = ["UsageError", "is_integral", "parse_inline", "read_values"]

FILE_SUFFIXES = (".npy", ".csv")

# numpy dtype kinds we accept from files: bool, signed/unsigned integers, floats.
_NUMERIC_KINDS = "biuf"


class UsageError(Exception):
    """Bad command-line input (malformed numbers, unreadable file, ...): exit status 2."""


def _parse_number(token: str, option: str, text: str) -> int | float:
    """One inline number; integers stay ``int`` so that class indices can be recognised."""
    token = token.strip()
    if not token:
        raise UsageError(
            f"{option}: empty value in {text!r}; expected comma-separated numbers such as "
            f"'0.3,0.7' (rows separated by ';')"
        )
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        raise UsageError(
            f"{option}: cannot read {token!r} as a number (in {text!r}); expected "
            f"comma-separated numbers such as '0.3,0.7', rows separated by ';', or a path to a "
            f".npy or .csv file"
        ) from None


def parse_inline(text: str, option: str) -> NDArray:
    """Parse ``"a,b,c"`` (1-D) or ``"a,b;c,d"`` (2-D) into an array.

    Args:
        text: the option's value.
        option: the option's name, for messages (``"--input"``).

    Returns:
        An int64 array if every number is written as an integer, else float64.

    Raises:
        UsageError: an empty or non-numeric entry, or rows of different lengths.
    """
    rows_text = text.split(";")
    rows = [[_parse_number(tok, option, text) for tok in row.split(",")] for row in rows_text]
    if len(rows) > 1:
        lengths = [len(r) for r in rows]
        if len(set(lengths)) != 1:
            raise UsageError(
                f"{option}: rows have different lengths {lengths} in {text!r}; every row "
                f"(separated by ';') must have the same number of values"
            )
    values = rows if len(rows) > 1 else rows[0]
    if all(isinstance(v, int) for row in rows for v in row):
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:
            pass
    return np.array(values, dtype=np.float64)


def _looks_like_path(text: str) -> bool:
    if os.path.exists(text):
        return True
    suffix = os.path.splitext(text)[1]
    return (
        os.sep in text
        or "/" in text
        or (len(suffix) > 1 and suffix[1:].isalpha() and "," not in text and ";" not in text)
    )


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"


def _load_npy(path: str, option: str) -> NDArray:
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if not magic:
        raise UsageError(
            f"{option}: {path!r} is empty (0 bytes); expected an array saved with numpy.save"
        )
    if magic != _NPY_MAGIC and not magic.startswith(_ZIP_MAGIC):
        raise UsageError(
            f"{option}: {path!r} is not a .npy file (it does not start with the .npy magic "
            f"string); save the array with numpy.save, or give a .csv file"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise UsageError(f"{option}: cannot read {path!r} as a .npy file: {exc}") from None
        # numpy says "Object arrays cannot be loaded when allow_pickle=False".
        raise UsageError(
            f"{option}: refusing to load {path!r}: it holds Python objects (dtype object), "
            f"which only unpickling could read, and crossent never unpickles files "
            f"(allow_pickle=False); save a numeric array, e.g. numpy.save(path, "
            f"array.astype('float64'))"
        ) from None
    except EOFError:  # the header promises more data than the file holds
        raise UsageError(
            f"{option}: {path!r} is truncated: it ends before the array its header announces"
        ) from None
    if not isinstance(loaded, np.ndarray):  # an .npz archive behind a .npy name
        loaded.close()
        raise UsageError(
            f"{option}: {path!r} is an .npz archive, expected a single array saved with "
            f"numpy.save (.npy)"
        )
    return loaded


def _load_csv(path: str, option: str) -> NDArray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data" for an empty file
            # utf-8-sig: a byte-order mark, as spreadsheet programs write, is not a number
            return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=1, encoding="utf-8-sig")
    except (ValueError, UnicodeDecodeError) as exc:
        reason = str(exc).rstrip(".")
        raise UsageError(
            f"{option}: cannot read {path!r} as comma-separated numbers: {reason}"
        ) from None


def read_values(text: str, option: str) -> NDArray:
    """The array an option names: inline numbers or a ``.npy`` / ``.csv`` file.

    Args:
        text: the option's value, e.g. ``"0.3,0.7"``, ``"1,2;3,4"``, ``"logits.npy"``.
        option: the option's name, for messages.

    Returns:
        A numeric array (bool, integer or floating; the caller casts it).

    Raises:
        UsageError: malformed numbers, an unknown file type, an unreadable, missing or
            pickled file, or a file whose array is not numeric.
    """
    stripped = text.strip()
    suffix = os.path.splitext(stripped)[1].lower()
    if suffix not in FILE_SUFFIXES:
        if _looks_like_path(stripped):
            raise UsageError(
                f"{option}: unknown file type {suffix or '(no suffix)'!r} for {text!r}; "
                f"expected a .npy or .csv file, or inline numbers such as '0.3,0.7'"
            )
        return parse_inline(stripped, option)
    if os.path.isdir(stripped):
        raise UsageError(f"{option}: {stripped!r} is a directory, expected a {suffix} file")
    if not os.path.isfile(stripped):
        raise UsageError(f"{option}: no such file {stripped!r}")
    try:
        array = _load_npy(stripped, option) if suffix == ".npy" else _load_csv(stripped, option)
    except OSError as exc:
        raise UsageError(f"{option}: cannot read {stripped!r}: {exc.strerror or exc}") from None
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise UsageError(
            f"{option}: {stripped!r} holds an array of dtype {array.dtype}, expected numbers "
            f"(a bool, integer or floating point array)"
        )
    return array


def is_integral(values: NDArray) -> bool:
    """Whether every value is a whole number that int64 holds exactly (class indices)."""
    if values.dtype.kind in "biu":
        return True
    return bool(np.all(np.isfinite(values) & (values == np.round(values)) & (abs(values) < 2**53)))
