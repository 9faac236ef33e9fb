"""Backend selection: composed torch ops or the Triton kernels.

The environment variable ``CROSSENT_BACKEND`` forces a path. It is read at every call, so that a
test (or a user) can flip it without re-importing anything:

=========  ==========================================================================
``auto``   the default: Triton iff every tensor lives on a CUDA device, each floating
           tensor is float16, bfloat16 or float32, and ``triton`` imports; else torch.
``torch``  always the composed torch ops.
``triton`` always the Triton kernels. On CPU tensors this needs Triton's interpreter
           (``TRITON_INTERPRET=1`` set before the kernels are first used); without it a
           ``RuntimeError`` says so.
=========  ==========================================================================

float64 stays on torch under ``auto``: the kernels compute float64 inputs in float64, but
Hopper's float64 rate is a small fraction of its float32 rate and torch's own kernels are the
safer choice there. ``CROSSENT_BACKEND=triton`` still runs them.
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton"]

_ENV_VAR = "CROSSENT_BACKEND"
_MODES = ("auto", "torch", "triton")
_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (cached: a failed import does not heal mid-process)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else on import
        return False
    return True


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``), read now, not at import.

    Asks triton's own knob when triton imports, so that both agree on what counts as true.
    """
    if triton_importable():
        import triton

        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def backend_mode() -> str:
    """The value of ``CROSSENT_BACKEND`` (default ``auto``), validated.

    Raises:
        ValueError: if the variable holds anything but ``auto``, ``torch`` or ``triton``.
    """
    raw = os.environ.get(_ENV_VAR, "auto")
    mode = raw.strip().lower()
    if mode not in _MODES:
        raise ValueError(
            f"{_ENV_VAR} must be one of 'auto', 'torch' or 'triton' (case-insensitive), got {raw!r}"
        )
    return mode


def select_backend(*tensors: torch.Tensor | None) -> Backend:
    """Pick the implementation for a call on ``tensors`` (``None`` entries are skipped).

    Only devices and dtypes are looked at, never values, so this never synchronises with the
    device.

    Args:
        *tensors: every tensor argument of the loss call (input, target, weights, ...).

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: ``CROSSENT_BACKEND`` holds an unknown value.
        RuntimeError: ``CROSSENT_BACKEND=triton`` but triton does not import, or some tensor is
            not on a CUDA device while Triton's interpreter (``TRITON_INTERPRET=1``) is off.
    """
    mode = backend_mode()
    present = [t for t in tensors if isinstance(t, torch.Tensor)]
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not triton_importable():
            raise RuntimeError(
                f"{_ENV_VAR}=triton but the triton package cannot be imported; install it "
                "(pip install 'crossent[gpu]') or set CROSSENT_BACKEND to 'auto' or 'torch'"
            )
        off_gpu = sorted({str(t.device) for t in present if t.device.type != "cuda"})
        if off_gpu and not triton_interpreting():
            raise RuntimeError(
                f"{_ENV_VAR}=triton with tensors on {', '.join(off_gpu)}: Triton kernels need "
                "CUDA tensors, or Triton's interpreter for CPU tensors (set TRITON_INTERPRET=1 "
                "before the first call); got TRITON_INTERPRET="
                f"{os.environ.get('TRITON_INTERPRET', '<unset>')!r}"
            )
        return "triton"
    # auto
    if not present or not triton_importable():
        return "torch"
    for t in present:
        if t.device.type != "cuda":
            return "torch"
        if t.is_floating_point() and t.dtype not in _AUTO_DTYPES:
            return "torch"
    return "triton"
