"""The loss: transformers' causal-LM cross entropy of the output embedding, without the logits.

:func:`_head_cross_entropy` is shared by the patched forward (when the deferred logits reach
``F.cross_entropy``) and by :func:`lm_head_loss`. It reads the head's weight where it is a
plain tensor: inside the model's forward under FSDP2 (``fully_shard``), where FSDP has gathered
the parameters the root owns; an output embedding wrapped by ``fully_shard`` of its own is
called (:func:`_in_head_call`) so that FSDP's hooks gather its weight before the loss and
reduce-scatter its gradient after backward, as for any module (no FSDP internals are used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossent.integrations.transformers._transforms import _config_transform, _scaled, _Transform
from crossent.linear import linear_cross_entropy
from crossent.ops._stats import compute_dtype

try:  # public since torch 2.6
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover - torch without distributed
    _FSDPModule = None

_MISSING = object()


def _sharded_by_fsdp(head: nn.Module) -> bool:
    """Whether ``head`` is a ``fully_shard`` module whose weight is sharded right now (a DTensor):
    its own call gathers it, a direct read would see one shard."""
    if _FSDPModule is None or not isinstance(head, _FSDPModule):
        return False
    return type(head.weight) not in (Tensor, nn.Parameter)


def _in_head_call(head: nn.Module, function: Callable[[Tensor], Any], hidden: Tensor) -> Any:
    """``function(hidden)``, run inside ``head``'s call when FSDP2 shards the head's weight.

    ``head(hidden)`` with ``function`` as its forward: FSDP's forward hooks gather the weight
    before (and reshard it after), its backward hooks gather it again and reduce-scatter the
    gradient, exactly as when the head computes logits. Otherwise ``function(hidden)``.
    """
    if not _sharded_by_fsdp(head):
        return function(hidden)
    previous = head.__dict__.get("forward", _MISSING)
    head.forward = function
    try:
        return head(hidden)
    finally:
        if previous is _MISSING:
            head.__dict__.pop("forward", None)
        else:
            head.__dict__["forward"] = previous


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
        options = dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
        return linear_cross_entropy(
            hidden,
            weight,
            target,
            linear_bias=bias,
            weight=class_weight,
            reduction=reduction,
            ignore_index=ignore_index,
            chunk_size=chunk_size,
            **options,
        )


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

    Under FSDP2, a head wrapped by a ``fully_shard`` of its own is called to compute the loss
    (its hooks gather the weight and reduce-scatter the gradient). A head the root owns is
    gathered only inside the root's forward; outside it, its weight is a vocabulary-sharded
    DTensor, which :func:`crossent.linear_cross_entropy` takes when every rank passes the same
    hidden states.

    Returns:
        A 0-d loss in float32 (float64 for float64 hidden states), as ``ForCausalLMLoss``.

    Raises:
        ValueError: neither ``labels`` nor ``shift_labels`` given.
        Any error of :func:`crossent.linear_cross_entropy` for bad shapes, dtypes or options.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("lm_head_loss: expected labels or shift_labels, got neither")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden_states.device)
    transform = _config_transform(config)
    options = dict(
        reduction="mean" if num_items_in_batch is None else "sum",
        ignore_index=ignore_index,
        class_weight=None,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        chunk_size=chunk_size,
    )
    if isinstance(lm_head, Tensor):
        loss = _head_cross_entropy(
            hidden_states, lm_head, None, target, transform, vocab=lm_head.shape[0], **options
        )
    else:
        head = lm_head

        def head_loss(hidden: Tensor) -> Tensor:
            weight = head.weight  # read here: gathered, under FSDP2
            return _head_cross_entropy(
                hidden, weight, head.bias, target, transform, vocab=weight.shape[0], **options
            )

        loss = _in_head_call(head, head_loss, hidden_states)
    loss = loss.to(compute_dtype(loss.dtype))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
