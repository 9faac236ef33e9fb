"""Drop-in ``torch.nn`` loss modules backed by :mod:`crossent.functional`.

Each class subclasses its ``torch.nn`` counterpart, so the constructor signature, the
``weight``/``pos_weight`` buffers (``.to()``, ``state_dict()``), ``repr`` and ``isinstance``
checks are exactly torch's; only ``forward`` is crossent's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crossent import functional as F

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "NLLLoss",
    "LinearCrossEntropyLoss",  # noqa: F822 (lazy, see __getattr__)
    "LinearDistillationLoss",  # noqa: F822 (lazy, see __getattr__)
]


class BCELoss(torch.nn.BCELoss):
    """Binary cross entropy on probabilities; see :func:`crossent.binary_cross_entropy`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """Binary cross entropy on logits; see :func:`crossent.binary_cross_entropy_with_logits`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Cross entropy on logits; see :func:`crossent.cross_entropy`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
        )  # fmt: skip


class NLLLoss(torch.nn.NLLLoss):
    """Negative log likelihood; see :func:`crossent.nll_loss`."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.nll_loss(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction,
        )  # fmt: skip


def module_options(module: torch.nn.Module, names: tuple[str, ...]) -> dict[str, object]:
    """The options a loss module holds, by the names its functional form takes them under."""
    return {name: getattr(module, name) for name in names}


def options_repr(module: torch.nn.Module, names: tuple[str, ...]) -> str:
    """``name=value, ...`` of a loss module's options, for ``extra_repr``."""
    return ", ".join(f"{name}={getattr(module, name)}" for name in names)


def __getattr__(name: str):
    if name == "LinearCrossEntropyLoss":
        from crossent.linear import LinearCrossEntropyLoss

        return LinearCrossEntropyLoss
    if name == "LinearDistillationLoss":
        from crossent.distillation import LinearDistillationLoss

        return LinearDistillationLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
