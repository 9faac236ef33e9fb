"""Test-session set-up shared by every test module.

Triton decides at import time whether ``@triton.jit`` kernels run compiled (GPU) or under its
CPU interpreter, so ``TRITON_INTERPRET`` must be set before *any* module imports triton —
including test modules that only import crossent. Without a CUDA device the kernels can only
run interpreted, which is how CI tests them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
