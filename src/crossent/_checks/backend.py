"""Checks of the ``CROSSENT_BACKEND`` setting: its value, and whether a forced Triton backend
can run the call it is asked to (see ``crossent._backend``)."""

from __future__ import annotations

import os

import torch

ENV_VAR = "CROSSENT_BACKEND"
MODES = ("auto", "torch", "triton")


def check_backend_mode(raw: str) -> str:
    """The value of ``CROSSENT_BACKEND``, stripped and lower-cased, if it is a mode."""
    mode = raw.strip().lower()
    if mode not in MODES:
        raise ValueError(
            f"{ENV_VAR} must be one of 'auto', 'torch' or 'triton' (case-insensitive), got {raw!r}"
        )
    return mode


def check_triton_can_run(tensors: list[torch.Tensor], importable: bool, interpreting: bool) -> None:
    """``CROSSENT_BACKEND=triton`` needs triton, and CUDA tensors or Triton's interpreter."""
    if not importable:
        raise RuntimeError(
            f"{ENV_VAR}=triton but the triton package cannot be imported; install it "
            "(pip install 'crossent[gpu]') or set CROSSENT_BACKEND to 'auto' or 'torch'"
        )
    off_gpu = sorted({str(t.device) for t in tensors if t.device.type != "cuda"})
    if off_gpu and not interpreting:
        raise RuntimeError(
            f"{ENV_VAR}=triton with tensors on {', '.join(off_gpu)}: Triton kernels need "
            "CUDA tensors, or Triton's interpreter for CPU tensors (set TRITON_INTERPRET=1 "
            "before the first call); got TRITON_INTERPRET="
            f"{os.environ.get('TRITON_INTERPRET', '<unset>')!r}"
        )
