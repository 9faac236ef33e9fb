"""Deferred logits: the output embedding's stand-in during a patched training forward.

:class:`_DeferredLogits` has the logits' shape, dtype and device and no storage. It records
what the forward does to it (scalar multiplies and divides, one ``tanh``, a leading slice of
the vocabulary, reshapes and indexing of the token dimensions, casts) and, reaching
``F.cross_entropy``, computes the loss with linear cross entropy on the hidden states
(:func:`crossent.integrations.transformers._loss._head_cross_entropy`). Any other use goes
through :func:`_fallback`: refused under ``strict``, or the real logits computed there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from crossent.integrations.transformers._loss import _head_cross_entropy, _in_head_call
from crossent.integrations.transformers._transforms import _NotFoldable, _Transform


class UnsupportedModelError(NotImplementedError):
    """The model's forward does something crossent cannot reproduce exactly without the logits."""

    __module__ = "crossent.integrations.transformers"


_METADATA = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "ndim",
        "requires_grad",
        "is_cuda",
        "layout",
        "is_sparse",
        "is_quantized",
        "is_meta",
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "is_floating_point",
        "is_complex",
        "element_size",
        "__len__",
    }
)
_MUL = frozenset({"mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"})
_DIV = frozenset({"div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"})
_SAME = frozenset({"contiguous", "clone"})
_CASTS = {
    "float": torch.float32,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
    "half": torch.float16,
}


@dataclass
class _Call:
    """One patched training forward: the head, the options, and what happened."""

    model_type: str
    head: nn.Linear
    head_forward: Callable[..., Tensor]
    strict: bool
    options: dict[str, Any]
    loss_computed: bool = False
    fell_back: list[str] = field(default_factory=list)

    def refuse(self, what: str) -> None:
        message = (
            f"crossent.integrations.transformers: the forward of model type "
            f"{self.model_type!r} {what}; crossent cannot reproduce its loss exactly without "
            "the logits. Leave this model unpatched (crossent.integrations.transformers."
            "unpatch(model)), or apply(model, strict=False) to compute the logits in that case."
        )
        if self.strict:
            raise UnsupportedModelError(message)
        if what not in self.fell_back:
            self.fell_back.append(what)
            warnings.warn(message.replace("cannot", "will not"), RuntimeWarning, stacklevel=4)


class _DeferredLogits(Tensor):
    """The logits ``transform(hidden @ W[:vocab]^T + b[:vocab])`` of shape ``(..., vocab)``,
    not computed: only shape, dtype and device exist (a wrapper tensor without storage)."""

    _call: _Call
    _hidden: Tensor
    _transform: _Transform
    _vocab: int

    @staticmethod
    def __new__(
        cls,
        call: _Call,
        hidden: Tensor,
        transform: _Transform,
        vocab: int,
        dtype: torch.dtype,
    ) -> _DeferredLogits:
        shape = (*hidden.shape[:-1], vocab)
        self = Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=hidden.device)
        self._call, self._hidden, self._transform, self._vocab = call, hidden, transform, vocab
        return self

    def _with(self, **changes: Any) -> _DeferredLogits:
        fields = {
            "call": self._call,
            "hidden": self._hidden,
            "transform": self._transform,
            "vocab": self._vocab,
            "dtype": self.dtype,
        }
        fields.update(changes)
        return _DeferredLogits(**fields)

    def materialize(self) -> Tensor:
        """The real logits, as the original forward computes them."""
        head = self._call.head
        logits = _in_head_call(head, self._call.head_forward, self._hidden)
        if self._vocab != head.weight.shape[0]:
            logits = logits[..., : self._vocab]
        return self._transform.replay(logits).to(self.dtype)

    def __repr__(self, *, tensor_contents: Any = None) -> str:  # type: ignore[override]
        return (
            f"DeferredLogits(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"transform={self._transform.ops}) — not computed (crossent)"
        )

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _METADATA:
            return super().__torch_function__(func, types, args, kwargs)
        if name == "__repr__":
            return args[0].__repr__()
        deferred = args[0] if args and isinstance(args[0], _DeferredLogits) else None
        if deferred is None:
            deferred = next((a for a in args if isinstance(a, _DeferredLogits)), None)
            if name in _MUL and deferred is not None and len(args) == 2:
                args = (deferred, args[0])  # scalar * logits
            else:
                return _fallback(func, name, args, kwargs, "passes the logits to " + name)
        result = deferred._op(name, args[1:], kwargs)
        if result is NotImplemented:
            return _fallback(func, name, args, kwargs, f"applies {name} to the logits")
        return result

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # type: ignore[override]
        # Every entry point is caught by __torch_function__; reaching here is a bug of ours.
        raise RuntimeError(f"crossent: deferred logits reached {func} without being computed")

    def _op(self, name: str, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if name in _MUL and len(rest) == 1 and not kwargs and _is_scalar(rest[0], self):
            return self._with(transform=self._transform.then("mul", rest[0]))
        if name in _DIV and len(rest) == 1 and not kwargs and _is_scalar(rest[0], self):
            return self._with(transform=self._transform.then("div", rest[0]))
        if name in ("tanh", "tanh_") and not rest and not kwargs:
            if self._transform.has_tanh:
                return NotImplemented
            return self._with(transform=self._transform.then("tanh"))
        if name in _SAME and not rest and not kwargs:
            return self._with()
        if name in _CASTS and not rest and not kwargs:
            return self._with(dtype=_CASTS[name])
        if name == "to":
            return self._to(rest, kwargs)
        if name in ("view", "reshape") and not kwargs:
            return self._reshape(rest)
        if name == "__getitem__" and len(rest) == 1 and not kwargs:
            return self._getitem(rest[0])
        if name == "cross_entropy":
            return self._cross_entropy(*rest, **kwargs)
        return NotImplemented

    def _to(self, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        dtype = kwargs.get("dtype")
        device = kwargs.get("device")
        for arg in rest:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            else:
                return NotImplemented
        if set(kwargs) - {"dtype", "device", "non_blocking", "copy"}:
            return NotImplemented
        if device is not None and torch.device(device) != self.device:
            if not (
                torch.device(device).index is None and torch.device(device).type == self.device.type
            ):
                return NotImplemented
        if dtype is not None and not dtype.is_floating_point:
            return NotImplemented
        return self._with(dtype=dtype or self.dtype)

    def _reshape(self, rest: tuple[Any, ...]) -> Any:
        shape = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if not shape or not all(isinstance(s, int) for s in shape) or shape[-1] != self._vocab:
            return NotImplemented
        lead = shape[:-1]
        try:
            hidden = self._hidden.reshape(*lead, self._hidden.shape[-1])
        except RuntimeError:
            return NotImplemented
        return self._with(hidden=hidden)

    def _getitem(self, index: Any) -> Any:
        items = index if isinstance(index, tuple) else (index,)
        # A leading slice of the vocabulary: logits[..., :n] or logits[:, :, :n].
        last = items[-1] if items else None
        full = [i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items[:-1]]
        ellipses = sum(i is Ellipsis for i in items)
        addresses_last = (len(items) == 2 and items[0] is Ellipsis) or (
            len(items) == self.dim() and ellipses == 0
        )
        if isinstance(last, slice) and all(full) and addresses_last and last != slice(None):
            start, stop, step = last.indices(self._vocab)
            if start == 0 and step == 1 and stop >= 1:
                return self._with(vocab=stop)
            return NotImplemented
        # Indexing of the token dimensions only: the same index on the hidden states.
        try:
            hidden = self._hidden[index]
            probe = self._hidden.new_empty(()).expand(*self.shape[:-1], self._hidden.shape[-1] + 1)
            probed = probe[index]
        except (IndexError, RuntimeError, TypeError):
            return NotImplemented
        if hidden.dim() == 0 or tuple(probed.shape) != (*hidden.shape[:-1], hidden.shape[-1] + 1):
            return NotImplemented
        if hidden.shape[-1] != self._hidden.shape[-1]:
            return NotImplemented
        return self._with(hidden=hidden)

    def _cross_entropy(
        self,
        target: Tensor,
        weight: Tensor | None = None,
        size_average: Any = None,
        ignore_index: int = -100,
        reduce: Any = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
    ) -> Any:
        if self.dim() not in (1, 2) or size_average is not None or reduce is not None:
            return NotImplemented  # class dimension not last, or legacy reduction arguments
        if not isinstance(target, Tensor) or target.is_floating_point():
            return NotImplemented  # class-probability targets
        if isinstance(weight, _DeferredLogits) or isinstance(target, _DeferredLogits):
            return NotImplemented
        call = self._call
        options = call.options
        try:
            self._transform.fold()
        except _NotFoldable:
            return NotImplemented
        head, transform, vocab = call.head, self._transform, self._vocab

        def head_loss(hidden: Tensor) -> Tensor:
            return _head_cross_entropy(
                hidden,
                head.weight,  # read here: gathered, under FSDP2
                head.bias,
                target,
                transform,
                vocab=vocab,
                reduction=reduction,
                ignore_index=ignore_index,
                class_weight=weight,
                label_smoothing=options["label_smoothing"] or label_smoothing,
                z_loss=options["z_loss"],
                chunk_size=options["chunk_size"],
            )

        loss = _in_head_call(head, head_loss, self._hidden)
        call.loss_computed = True
        return loss.to(torch.promote_types(loss.dtype, self.dtype))


def _is_scalar(value: Any, like: Tensor) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, Real):
        return math.isfinite(value) and value != 0
    return (
        isinstance(value, Tensor)
        and not isinstance(value, _DeferredLogits)
        and value.dim() == 0
        and value.is_floating_point()
        and value.device == like.device
    )


def _fallback(func: Callable, name: str, args: tuple, kwargs: dict, what: str) -> Any:
    """An op crossent does not reproduce: refuse (strict) or compute the logits it needs."""
    found = [a for a in (*args, *kwargs.values()) if isinstance(a, _DeferredLogits)]
    found[0]._call.refuse(what)

    def real(value: Any) -> Any:
        if isinstance(value, _DeferredLogits):
            return value.materialize()
        if isinstance(value, (tuple, list)):
            return type(value)(real(v) for v in value)
        return value

    return func(*real(args), **{k: real(v) for k, v in kwargs.items()})
