"""Hugging Face transformers: a causal LM trains through linear cross entropy, one call.

``apply(model)`` patches *this instance's* ``forward`` (never the class) so that a training
forward with ``labels`` computes its loss with :func:`crossent.linear_cross_entropy` from the
hidden states and the output embedding, and never holds the N×V logits. ``unpatch(model)``
undoes it. ``lm_head_loss(...)`` is the same loss for hand-written training loops;
``lm_head_distillation_loss(...)`` (from ``crossent.integrations._distillation``) distils a
teacher's head into a student's with the same label shift.

How the patched forward works. It runs the model's own ``forward`` (so the backbone call, the
MoE auxiliary loss, ``num_items_in_batch``, ``shift_labels`` and every other keyword stay the
model's), with one change: while it runs, the output embedding returns *deferred logits* — a
tensor that has the logits' shape, dtype and device but no storage. The deferred logits record
what the forward does to them:

- scalar multiplies and divides (Cohere's ``logit_scale``, Granite's ``logits_scaling``) and one
  ``tanh`` between them (Gemma 2/3's ``final_logit_softcapping``: ``tanh(z / c) * c``);
- a leading slice of the vocabulary (a padded embedding trimmed to the real vocabulary);
- reshapes and indexing of the token dimensions (``ForCausalLMLoss``'s ``view(-1, V)``, a
  vision-language model's masking), applied at once to the hidden states;
- dtype casts (``logits.float()``) and ``contiguous()``.

When they reach ``F.cross_entropy(logits, target, ...)`` — where ``ForCausalLMLoss`` and
nearly every custom causal-LM loss end — the loss is computed by ``linear_cross_entropy`` on the
hidden states: a soft-cap ``B tanh(A z)`` becomes ``softcap=B`` on hidden states scaled by
``A B``, a plain scale ``F z`` becomes hidden states scaled by ``F`` (``(F x) W^T = F (x W^T)``,
exact up to rounding). Anything else done to the logits (an unknown transform, a loss that
does not go through ``F.cross_entropy``) raises :class:`UnsupportedModelError` naming the model
type under ``strict=True``; with ``strict=False`` the logits are computed there and then (the
original forward's result, with a warning). Either way the loss is never silently different.

The output of a patched training step has ``logits=None``. Evaluation (``model.eval()``),
``generate``, a forward without ``labels``, ``logits_to_keep`` and ``return_dict=False`` run the
original forward untouched.

Only public transformers behaviour is relied on (``get_output_embeddings()``, the forward's
keyword arguments, ``ModelOutput`` being a mapping); nothing is imported from transformers'
internals. Tested with transformers 5.23 (the ``crossent[transformers]`` extra declares
``>=5.0,<6``).
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossent import _checks
from crossent.integrations._distillation import lm_head_distillation_loss
from crossent.linear import linear_cross_entropy

__all__ = [
    "apply",
    "unpatch",
    "lm_head_loss",
    "lm_head_distillation_loss",
    "is_patched",
    "UnsupportedModelError",
]

SUPPORTED_TRANSFORMERS = ">=5.0,<6"
_STATE = "_crossent_patch"  # instance attribute holding the patch (not in state_dict)
_MISSING = object()


class UnsupportedModelError(NotImplementedError):
    """The model's forward does something crossent cannot reproduce exactly without the logits."""


class _NotFoldable(Exception):
    """A recorded transform that linear_cross_entropy's softcap and a scale cannot express."""


# --------------------------------------------------------------------------------------------
# What the forward does to the logits: an ordered list of elementwise ops, folded into the
# hidden-state scale and soft-cap that linear_cross_entropy takes.


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


# --------------------------------------------------------------------------------------------
# The loss itself, shared by the patched forward and lm_head_loss.


def _head_cross_entropy(
    hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None,
    target: Tensor,
    transform: _Transform,
    *,
    vocab: int,
    reduction: str,
    ignore_index: int,
    class_weight: Tensor | None,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int | None,
) -> Tensor:
    """``F.cross_entropy(transform(hidden @ W[:vocab]^T + b[:vocab]), target, ...)`` without
    the logits. Under autocast the head runs in the autocast dtype, as ``nn.Linear`` would."""
    num, den, softcap = transform.fold()
    weight = head_weight if vocab == head_weight.shape[0] else head_weight[:vocab]
    bias = (
        None
        if head_bias is None
        else (head_bias if vocab == head_bias.shape[0] else head_bias[:vocab])
    )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        if hidden.dtype == torch.float32:
            hidden = hidden.to(low)
        if weight.dtype == torch.float32:
            weight = weight.to(low)
        if bias is not None and bias.dtype == torch.float32:
            bias = bias.to(low)
    hidden = _scaled(hidden, num, den)
    if class_weight is not None:
        class_weight = class_weight.to(hidden.dtype)
    with torch.autocast(device_type, enabled=False):
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            linear_bias=bias,
            weight=class_weight,
            reduction=reduction,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            chunk_size=chunk_size,
        )


def _wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if torch.finfo(a).bits >= torch.finfo(b).bits and a != torch.bfloat16 else b


def lm_head_loss(
    hidden_states: Tensor,
    lm_head: nn.Linear | Tensor,
    labels: Tensor | None = None,
    *,
    shift_labels: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    config: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    r"""transformers' causal-LM loss (``ForCausalLMLoss``) of the output embedding applied to
    ``hidden_states``, without the logits.

    With logits :math:`z = \mathrm{lm\_head}(h)` transformed as ``config`` declares
    (``logit_scale``: :math:`z\alpha`; ``logits_scaling``: :math:`z/\beta`;
    ``final_logit_softcapping``: :math:`c\tanh(z/c)`), targets
    :math:`t_i` = ``labels`` shifted left by one and padded with ``ignore_index`` (or
    ``shift_labels`` as given), the loss is :math:`\sum_{t_i \ne \text{ignore}} \ell_i / n` with
    :math:`n` = ``num_items_in_batch`` when given (gradient accumulation: the count over all
    micro-batches of the optimizer step) or the number of kept tokens otherwise.

    Example::

        out = model.model(input_ids, attention_mask=mask)            # the backbone
        loss = lm_head_loss(out.last_hidden_state, model.lm_head, labels, config=model.config)

    Args:
        hidden_states: ``(..., T, D)`` final hidden states (after the last norm).
        lm_head: the output embedding (an ``nn.Linear``, bias allowed) or its ``(V, D)``
            weight.
        labels: ``(..., T)`` token ids, ``ignore_index`` for tokens without a loss (prompt,
            padding); shifted here. Not needed when ``shift_labels`` is given.
        shift_labels: ``(..., T)`` targets already aligned with ``hidden_states``.
        num_items_in_batch: divide the summed loss by this instead of the kept-token count.
        config: the model's config, for its logit transforms (``None``: no transform).
        ignore_index: target value without a loss.
        label_smoothing, z_loss, chunk_size: passed to :func:`crossent.linear_cross_entropy`.

    Returns:
        A 0-d loss in float32 (float64 for float64 hidden states), as ``ForCausalLMLoss``.

    Raises:
        ValueError: neither ``labels`` nor ``shift_labels`` given.
        Any error of :func:`crossent.linear_cross_entropy` for bad shapes, dtypes or options.
    """
    if isinstance(lm_head, Tensor):
        head_weight, head_bias = lm_head, None
    else:
        head_weight, head_bias = lm_head.weight, lm_head.bias
    if shift_labels is None:
        if labels is None:
            raise ValueError("lm_head_loss: expected labels or shift_labels, got neither")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden_states.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = _head_cross_entropy(
        hidden_states,
        head_weight,
        head_bias,
        target,
        _config_transform(config),
        vocab=head_weight.shape[0],
        reduction=reduction,
        ignore_index=ignore_index,
        class_weight=None,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_size=chunk_size,
    )
    loss = loss.to(_wider(loss.dtype, torch.float32))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# --------------------------------------------------------------------------------------------
# Deferred logits: the output embedding's stand-in during a patched training forward.

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
        logits = self._call.head_forward(self._hidden)
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
        loss = _head_cross_entropy(
            self._hidden,
            call.head.weight,
            call.head.bias,
            target,
            self._transform,
            vocab=self._vocab,
            reduction=reduction,
            ignore_index=ignore_index,
            class_weight=weight,
            label_smoothing=options["label_smoothing"] or label_smoothing,
            z_loss=options["z_loss"],
            chunk_size=options["chunk_size"],
        )
        call.loss_computed = True
        return loss.to(_wider(loss.dtype, self.dtype))


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


# --------------------------------------------------------------------------------------------
# Patching one instance.


@dataclass
class _Patch:
    original: Callable[..., Any]  # the forward before apply (a bound method)
    instance_forward: Any  # the instance attribute apply replaced, or _MISSING
    signature: inspect.Signature
    var_keyword: str
    model_type: str
    strict: bool
    options: dict[str, Any]
    function: Callable[..., Any] | None = None  # the patched forward, bound to the model
    disabled: bool = False  # unpatched while another wrapper sits on top of it


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)


def _unsupported(model: nn.Module, strict: bool, why: str) -> bool:
    message = (
        f"crossent.integrations.transformers.apply: model type {_model_type(model)!r} "
        f"({type(model).__name__}) is not supported: {why}"
    )
    if strict:
        raise UnsupportedModelError(message)
    warnings.warn(message + "; the model is left unpatched.", RuntimeWarning, stacklevel=3)
    return True


def apply(
    model: nn.Module,
    *,
    chunk_size: int | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    strict: bool = True,
) -> nn.Module:
    """Make this model instance's training loss run through linear cross entropy.

    A forward with ``labels`` in training mode (``model.train()``, no ``logits_to_keep``, not
    ``return_dict=False``) returns the loss computed by :func:`crossent.linear_cross_entropy`
    from the hidden states and ``model.get_output_embeddings()`` (tied or not, with its bias),
    equal to the original forward's — ``num_items_in_batch``, ``shift_labels``, the logit
    transforms and MoE auxiliary losses included — and ``logits=None``. Every other call runs
    the original forward. Other instances of the class and ``state_dict`` are not touched;
    applying twice only updates the options.

    Args:
        model: a transformers ``PreTrainedModel`` with a causal-LM head (``*ForCausalLM``,
            most ``*ForConditionalGeneration``).
        chunk_size, z_loss: passed to :func:`crossent.linear_cross_entropy`.
        label_smoothing: ε passed to :func:`crossent.linear_cross_entropy` (0: the loss
            function's own).
        strict: raise :class:`UnsupportedModelError` (naming the model type) when the model's
            forward does something to the logits that crossent does not reproduce exactly;
            ``False``: compute the logits in that case (correct, no memory saved) and warn.

    Returns:
        ``model``, patched in place.

    Raises:
        UnsupportedModelError: (strict) no ``nn.Linear`` output embedding, or a forward
            without ``labels`` and ``**kwargs``; at the first training step, an unrecognised
            logit transform or a loss that bypasses ``F.cross_entropy``.
        ValueError, TypeError: bad options.
    """
    name = "crossent.integrations.transformers.apply"
    options = {
        "chunk_size": _checks.check_chunk_size(chunk_size, name),
        "z_loss": _checks.check_z_loss(z_loss, name),
        "label_smoothing": _checks.check_label_smoothing(label_smoothing, name),
    }
    _warn_untested_version()
    state = model.__dict__.get(_STATE)
    if state is not None:
        state.options, state.strict, state.disabled = options, strict, False
        return model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        _unsupported(
            model,
            strict,
            f"its output embedding is {type(head).__name__}, expected torch.nn.Linear",
        )
        return model
    original = model.forward
    signature = inspect.signature(original)
    parameters = signature.parameters.values()
    var_keyword = next((p.name for p in parameters if p.kind is p.VAR_KEYWORD), None)
    if "labels" not in signature.parameters or var_keyword is None:
        _unsupported(model, strict, "its forward does not take labels and **kwargs")
        return model
    patch = _Patch(
        original=original,
        instance_forward=model.__dict__.get("forward", _MISSING),
        signature=signature,
        var_keyword=var_keyword,
        model_type=_model_type(model),
        strict=strict,
        options=options,
    )

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _patched_forward(self, self.__dict__[_STATE], args, kwargs)

    # Bound to the model below: inspect drops the first parameter, so the function's own
    # signature starts with self (the Trainer reads **kwargs from it).
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_parameter, *signature.parameters.values()]
    )
    patch.function = forward
    model.__dict__[_STATE] = patch
    model.forward = types.MethodType(forward, model)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the forward that :func:`apply` replaced (a no-op on an unpatched model).

    If another library has since wrapped ``model.forward`` on top of crossent's (TRL's
    ``SFTTrainer`` does), that wrapper is kept and crossent's forward only passes calls through.
    """
    patch = model.__dict__.get(_STATE)
    if patch is None or patch.disabled:
        return model
    current = model.__dict__.get("forward")
    if getattr(current, "__func__", None) is not patch.function:
        patch.disabled = True
        return model
    del model.__dict__[_STATE]
    if patch.instance_forward is _MISSING:
        model.__dict__.pop("forward", None)
    else:
        model.__dict__["forward"] = patch.instance_forward
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether :func:`apply` patched this instance (and :func:`unpatch` has not undone it)."""
    patch = model.__dict__.get(_STATE)
    return patch is not None and not patch.disabled


def _wants_linear_loss(model: nn.Module, patch: _Patch, args: tuple, kwargs: dict) -> bool:
    if patch.disabled or not model.training:
        return False
    try:
        bound = patch.signature.bind(*args, **kwargs)
    except TypeError:
        return False  # let the original forward raise its own error
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop(patch.var_keyword, {}))
    if arguments.get("labels") is None:
        return False
    keep = arguments.get("logits_to_keep", 0)
    if not (isinstance(keep, int) and keep == 0):
        return False
    return_dict = arguments.get("return_dict")
    if return_dict is None:
        return_dict = getattr(getattr(model, "config", None), "return_dict", True)
    return bool(return_dict)


def _patched_forward(model: nn.Module, patch: _Patch, args: tuple, kwargs: dict) -> Any:
    if not _wants_linear_loss(model, patch, args, kwargs):
        return patch.original(*args, **kwargs)
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise UnsupportedModelError(
            f"crossent.integrations.transformers: the output embedding of model type "
            f"{patch.model_type!r} is now {type(head).__name__}, expected torch.nn.Linear; "
            "unpatch the model before replacing its head"
        )
    weight = head.weight
    if weight.device.type == "meta" or type(weight) not in (Tensor, nn.Parameter):
        # A sharded (DTensor), offloaded or quantised weight: the module's own call gathers
        # or dequantises it, a direct read would not.
        what = (
            f"has an output embedding whose weight is a {type(weight).__name__} on {weight.device}"
        )
        _Call(patch.model_type, head, head.forward, patch.strict, patch.options).refuse(what)
        return patch.original(*args, **kwargs)
    head_forward = head.forward
    call = _Call(patch.model_type, head, head_forward, patch.strict, patch.options)

    def deferred_head(*head_args: Any, **head_kwargs: Any) -> Tensor:
        if len(head_args) != 1 or head_kwargs or not isinstance(head_args[0], Tensor):
            call.refuse("calls its output embedding with other arguments than the hidden states")
            return head_forward(*head_args, **head_kwargs)
        hidden = head_args[0]
        dtype = head.weight.dtype
        if torch.is_autocast_enabled(hidden.device.type) and dtype == torch.float32:
            dtype = torch.get_autocast_dtype(hidden.device.type)
        return _DeferredLogits(call, hidden, _Transform(), head.weight.shape[0], dtype)

    previous = head.__dict__.get("forward", _MISSING)
    head.forward = deferred_head
    try:
        output = patch.original(*args, **kwargs)
    finally:
        if previous is _MISSING:
            head.__dict__.pop("forward", None)
        else:
            head.__dict__["forward"] = previous
    if not call.loss_computed and not call.fell_back:
        call.refuse("does not pass its logits to torch.nn.functional.cross_entropy")
    return _without_deferred(output)


def _without_deferred(output: Any) -> Any:
    """The forward's output with deferred logits dropped (``logits=None``)."""
    if isinstance(output, Mapping):
        deferred = [k for k, v in output.items() if isinstance(v, _DeferredLogits)]
        if not deferred:
            return output
        kept = {k: v for k, v in output.items() if k not in deferred}
        try:
            return type(output)(**kept)
        except TypeError:
            return dict(kept)
    return output


def _warn_untested_version() -> None:
    try:
        import transformers
    except ImportError:  # pragma: no cover - a transformers model implies transformers
        return
    major = transformers.__version__.split(".", 1)[0]
    if major != "5":
        warnings.warn(
            f"crossent.integrations.transformers is tested with transformers "
            f"{SUPPORTED_TRANSFORMERS}; found {transformers.__version__}",
            RuntimeWarning,
            stacklevel=3,
        )
