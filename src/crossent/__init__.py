"""crossent: the cross-entropy family of losses with exact PyTorch semantics.

``crossent.functional`` (re-exported here) mirrors ``torch.nn.functional``; ``crossent.nn``
mirrors ``torch.nn``'s loss modules; ``crossent.reference`` is a NumPy float64 reference that
reads like the formulas. Attributes are resolved lazily, so ``import crossent.reference`` does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_FUNCTIONAL = (
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "nll_loss",
)
_SUBMODULES = ("functional", "nn", "reference", "distributed", "linear", "distillation")

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "nll_loss",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from crossent.distillation import linear_distillation_loss
    from crossent.functional import (
        binary_cross_entropy,
        binary_cross_entropy_with_logits,
        cross_entropy,
        nll_loss,
    )
    from crossent.linear import linear_cross_entropy


def __getattr__(name: str) -> Any:
    if name in _FUNCTIONAL:
        return getattr(importlib.import_module("crossent.functional"), name)
    if name == "linear_cross_entropy":
        return importlib.import_module("crossent.linear").linear_cross_entropy
    if name == "linear_distillation_loss":
        return importlib.import_module("crossent.distillation").linear_distillation_loss
    if name in _SUBMODULES:
        return importlib.import_module(f"crossent.{name}")
    raise AttributeError(f"module 'crossent' has no attribute {name!r}")
