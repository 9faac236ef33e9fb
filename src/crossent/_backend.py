"""Backend selection: composed torch ops or the Triton kernels.

The environment variable ``CROSSENT_BACKEND`` forces a path. It is read at every call, so that a
test (or a user) can flip it without re-importing anything:

=========  ==========================================================================
``auto``   the default: Triton iff every tensor lives on a CUDA device, each floating
           tensor is float16, bfloat16 or float32, and ``triton`` imports; else torch.
           ``triton`` is imported only once a call passes CUDA tensors: CPU-only use never
           imports it.
``torch``  always the composed torch ops.
``triton`` always the Triton kernels. On CPU tensors this needs Triton's interpreter
           (``TRITON_INTERPRET=1`` set before the kernels are first used); without it a
           ``RuntimeError`` says so.
=========  ==========================================================================

Under ``torch.func`` transforms (``vmap``, ``grad``, ``jacrev``, ...) and forward-mode AD the
answer is always torch, whatever the variable says: the kernels are custom ops without vmap or
forward-mode rules, torch's own ops have them.

float64 stays on torch under ``auto``: the kernels compute float64 inputs in float64, but
Hopper's float64 rate is a small fraction of its float32 rate and torch's own kernels are the
safer choice there. ``CROSSENT_BACKEND=triton`` still runs them.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from crossent._checks.backend import ENV_VAR, check_backend_mode, check_triton_can_run

Backend = Literal["torch", "triton"]

_AUTO_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_triton_import_ok: list[bool] = []  # filled on the first call; a failed import does not heal


def triton_importable() -> bool:
    """Whether ``import triton`` succeeds (remembered after the first call).

    Cached by hand rather than with ``functools.cache``, which ``torch.compile`` warns about
    when it traces ``select_backend``.
    """
    if not _triton_import_ok:
        try:
            import triton  # noqa: F401

            _triton_import_ok.append(True)
        except Exception:  # ImportError, or a broken install raising anything else on import
            _triton_import_ok.append(False)
    return _triton_import_ok[0]


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is on (``TRITON_INTERPRET``), read now, not at import.

    Parsed here, with the values triton 3.9 counts as true (1/true/on/yes, any case), rather than
    through ``triton.knobs``, whose C++ getenv ``torch.compile`` cannot trace.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _under_transform(tensors: list[torch.Tensor]) -> bool:
    """Whether a tensor is wrapped by a torch.func transform (vmap, grad, ...) or carries a
    forward-mode AD tangent: the kernels' custom ops have no vmap/jvp rules, torch's ops do."""
    if torch.compiler.is_compiling():  # fake tensors while tracing; transforms trace through
        return False
    import torch.autograd.forward_ad as forward_ad

    return any(
        torch._C._functorch.is_functorch_wrapped_tensor(t)
        or forward_ad.unpack_dual(t).tangent is not None
        for t in tensors
    )


def backend_mode() -> str:
    """The value of ``CROSSENT_BACKEND`` (default ``auto``), validated.

    Raises:
        ValueError: if the variable holds anything but ``auto``, ``torch`` or ``triton``.
    """
    return check_backend_mode(os.environ.get(ENV_VAR, "auto"))


def select_backend(*tensors: torch.Tensor | None) -> Backend:
    """Pick the implementation for a call on ``tensors`` (``None`` entries are skipped).

    Only devices, dtypes and autograd wrappers are looked at, never values, so this never
    synchronises with the device.

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
    if mode == "auto" and any(t.device.type != "cuda" for t in present):
        return "torch"  # the common CPU case, decided before the costlier looks below
    if _under_transform(present):
        return "torch"
    if mode == "triton":
        check_triton_can_run(present, triton_importable(), triton_interpreting())
        return "triton"
    # auto: devices and dtypes first, so that a process that only ever passes CPU tensors never
    # imports triton (about 90 MB of resident memory and a noticeable import time).
    if not present:
        return "torch"
    for t in present:
        if t.device.type != "cuda":
            return "torch"
        if t.is_floating_point() and t.dtype not in _AUTO_DTYPES:
            return "torch"
    return "triton" if triton_importable() else "torch"
