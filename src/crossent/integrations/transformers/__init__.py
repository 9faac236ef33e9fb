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

Data parallelism: under DDP the patched forward runs inside DDP's (``apply``, ``unpatch`` and
``is_patched`` on a ``DistributedDataParallel`` act on the model it wraps). Under FSDP2
(``fully_shard`` per decoder layer and at the root, before or after ``apply``) the output
embedding belongs to the root, whose forward has gathered it when the loss reads it; a head
wrapped by a ``fully_shard`` of its own is called to compute the loss, so that its own hooks
gather it and reduce-scatter its gradient.

Only public transformers behaviour is relied on (``get_output_embeddings()``, the forward's
keyword arguments, ``ModelOutput`` being a mapping); nothing is imported from transformers'
internals. Tested with transformers 5.23 (the ``crossent[transformers]`` extra declares
``>=5.0,<6``).

The package: :mod:`._transforms` (the logit transforms and their folding into the hidden-state
scale and soft-cap), :mod:`._recording` (the deferred logits), :mod:`._loss` (the loss from the
hidden states and the head, :func:`lm_head_loss`), and here the patching of an instance.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from crossent import _checks
from crossent.integrations._distillation import lm_head_distillation_loss
from crossent.integrations.transformers._loss import _sharded_by_fsdp, lm_head_loss
from crossent.integrations.transformers._recording import (
    UnsupportedModelError,
    _Call,
    _DeferredLogits,
)
from crossent.integrations.transformers._transforms import _Transform
from crossent.linear import linear_cross_entropy as linear_cross_entropy  # where it was

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


def _inner(model: nn.Module) -> nn.Module:
    """The model a ``DistributedDataParallel`` wraps (whose forward calls that model), or
    ``model``: patching the inner model is patching the wrapper."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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
            most ``*ForConditionalGeneration``), wrapped by ``fully_shard`` or not, or a
            ``DistributedDataParallel`` wrapping one (the wrapped model is patched).
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
    if _inner(model) is not model:
        apply(
            _inner(model),
            chunk_size=chunk_size,
            z_loss=z_loss,
            label_smoothing=label_smoothing,
            strict=strict,
        )
        return model
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
    if _inner(model) is not model:
        unpatch(_inner(model))
        return model
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
    patch = _inner(model).__dict__.get(_STATE)
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
    plain = type(weight) in (Tensor, nn.Parameter) or _sharded_by_fsdp(head)
    if weight.device.type == "meta" or not plain:
        # A sharded (DTensor), offloaded or quantised weight: the module's own call gathers
        # or dequantises it, a direct read would not. Under fully_shard the weight is plain
        # here when the root owns it (its forward has gathered it); a head sharded on its own
        # is called to compute the loss (_loss._in_head_call).
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
