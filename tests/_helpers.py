"""Test utilities shared by more than one test module."""

from __future__ import annotations

import contextlib

from crossent.ops import eager

# The size thresholds of crossent's blocked cross entropy, and the values that force it.
_BLOCKED_KNOBS = {
    "_BLOCKED_MIN_CLASSES": 1,
    "_BLOCKED_MIN_BYTES": 0,
    "_BYTES_PER_THREAD": 16,
    "_MIN_BLOCK_BYTES": 16,
}


@contextlib.contextmanager
def blocked_path(enabled: bool = True):
    """Route index-target cross entropy through crossent's blocked Function whatever the size
    (it normally takes only large logits), in blocks of a few rows so that several blocks run."""
    if not enabled:
        yield
        return
    saved = {k: getattr(eager, k) for k in _BLOCKED_KNOBS}
    for k, v in _BLOCKED_KNOBS.items():
        setattr(eager, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(eager, k, v)
