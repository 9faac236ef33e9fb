"""What a causal LM's forward does to its logits, folded into linear cross entropy's options.

The forward's elementwise ops on the logits (scalar multiplies and divides, one ``tanh``
between them) are recorded in order as a :class:`_Transform`; :meth:`_Transform.fold` turns
them into the factor that scales the hidden states and the ``softcap`` that
:func:`crossent.linear_cross_entropy` takes. :func:`_config_transform` is the same list read
from a config (for :func:`crossent.integrations.transformers.lm_head_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from torch import Tensor


class _NotFoldable(Exception):
    """A recorded transform that linear_cross_entropy's softcap and a scale cannot express."""


@dataclass(frozen=True)
class _Transform:
    """Elementwise ops applied to the logits ``z``, in order: ("mul", a), ("div", a), ("tanh",)."""

    ops: tuple[tuple[Any, ...], ...] = ()

    def then(self, *op: Any) -> _Transform:
        return _Transform((*self.ops, op))

    @property
    def has_tanh(self) -> bool:
        return any(op[0] == "tanh" for op in self.ops)

    def fold(self) -> tuple[list[Any], list[Any], float | None]:
        """``(numerators, denominators, softcap)`` with ``s = softcap·tanh(x'W/softcap)`` (or
        ``s = x'W``) for ``x' = x·Πnumerators / Πdenominators``.

        ``B tanh(A z)`` equals ``c tanh(z'/c)`` for ``c = B`` and ``z' = A B z``, so the factors
        before and after the tanh all multiply the hidden states and the factors after it also
        give the cap. Gemma's ``tanh(z / c) * c`` folds to the scale ``c / c``, exactly 1.
        """
        num: list[Any] = []
        den: list[Any] = []
        post_num: list[Any] = []
        post_den: list[Any] = []
        seen_tanh = False
        for op in self.ops:
            if op[0] == "tanh":
                seen_tanh = True
            elif op[0] == "mul":
                (post_num if seen_tanh else num).append(op[1])
            else:  # "div"
                (post_den if seen_tanh else den).append(op[1])
        if not seen_tanh:
            return num, den, None
        if any(isinstance(v, Tensor) and v.requires_grad for v in post_num + post_den):
            raise _NotFoldable("a learnable factor after the tanh")  # it would become a float
        cap = _product(post_num) / _product(post_den)
        cap = float(cap.item() if isinstance(cap, Tensor) else cap)
        if not (math.isfinite(cap) and cap != 0):
            raise _NotFoldable(f"a soft-cap of {cap}")
        # B tanh(A z) = -B tanh(-A z): the cap is |B|, the hidden-state scale A B either way.
        return num + post_num, den + post_den, abs(cap)

    def replay(self, logits: Tensor) -> Tensor:
        """The ops applied to real logits, as the forward would have applied them."""
        for op in self.ops:
            if op[0] == "mul":
                logits = logits * op[1]
            elif op[0] == "div":
                logits = logits / op[1]
            else:
                logits = torch.tanh(logits)
        return logits


def _product(values: list[Any]) -> Any:
    out: Any = 1.0
    for value in values:
        out = out * value
    return out


def _is_one(value: Any) -> bool:
    return not isinstance(value, Tensor) and value == 1.0


def _scaled(hidden: Tensor, num: list[Any], den: list[Any]) -> Tensor:
    """``hidden · Πnum / Πden``, skipped when the factor is exactly 1 (Gemma's ``c / c``)."""
    top, bottom = _product(num), _product(den)
    if not isinstance(top, Tensor) and not isinstance(bottom, Tensor) and top == bottom:
        return hidden
    if not _is_one(top):
        hidden = hidden * top
    if not _is_one(bottom):
        hidden = hidden / bottom
    return hidden


def _config_transform(config: Any) -> _Transform:
    """The logit transforms a causal-LM config declares (for :func:`lm_head_loss`)."""
    transform = _Transform()
    if config is None:
        return transform
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)  # Cohere: logits * logit_scale
    if isinstance(scale, Real) and not isinstance(scale, bool):
        transform = transform.then("mul", float(scale))
    scaling = getattr(text, "logits_scaling", None)  # Granite: logits / logits_scaling
    if isinstance(scaling, Real) and not isinstance(scaling, bool):
        transform = transform.then("div", float(scaling))
    cap = getattr(text, "final_logit_softcapping", None)  # Gemma 2/3: tanh(logits / c) * c
    if cap is not None:
        transform = transform.then("div", float(cap)).then("tanh").then("mul", float(cap))
    return transform
