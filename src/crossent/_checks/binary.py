"""Checks of the binary losses: ``binary_cross_entropy`` and
``binary_cross_entropy_with_logits``."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from crossent._checks._common import (
    assert_on_device,
    can_inspect_values,
    check_floating,
    check_not_differentiable,
    dtype_repr,
    first_offending_index,
    scalar_type_name,
    shape_repr,
)


def _broadcast_or_raise(
    input_shape: torch.Size,
    other: torch.Tensor,
    name: str,
    torch_words: Callable[[int, int, int], str],
) -> None:
    """``other`` must broadcast to exactly ``input_shape`` (right-aligned, no enlarging).

    ``torch_words(input_size, other_size, k)`` gives torch's own message for a mismatch at
    dimension ``-k``; ours follows it with what was expected and given.
    """
    in_dims, w_dims = list(input_shape), list(other.shape)
    for k in range(1, min(len(in_dims), len(w_dims)) + 1):
        a, b = in_dims[-k], w_dims[-k]
        if a != b and b != 1 and a != 1:
            raise RuntimeError(
                f"{torch_words(a, b, k)}: {name} of shape {shape_repr(other)} does not broadcast "
                f"with the input of shape {shape_repr(input_shape)}: its size {b} at dimension "
                f"{-k} must be 1 or {a}. ({name} broadcasts right-aligned, along the last "
                f"dimensions; for a per-channel {name} on (N, C, H, W) input use shape "
                "(C, 1, 1).)"
            )
    # The broadcast shape, by hand: torch.broadcast_shapes goes through torch._refs, which
    # imports sympy on first use and costs tens of microseconds a call.
    ndim = max(len(in_dims), len(w_dims))
    padded_in = [1] * (ndim - len(in_dims)) + in_dims
    padded_w = [1] * (ndim - len(w_dims)) + w_dims
    full = [a if b == 1 else b for a, b in zip(padded_in, padded_w, strict=True)]
    if full != list(input_shape):
        raise RuntimeError(
            f"output with shape {list(input_shape)} doesn't match the broadcast shape "
            f"{list(full)}: {name} of shape {shape_repr(other)} would enlarge the input of shape "
            f"{shape_repr(input_shape)}; it must broadcast to the input's shape"
        )


# --------------------------------------------------------------------------------------------
# binary_cross_entropy


def check_binary_cross_entropy(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> None:
    if target.shape != input.shape:
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size "
            f"({input.size()}) is deprecated. Please ensure they have the same size."
        )
    if weight is not None:
        _broadcast_or_raise(
            target.shape,
            weight,
            "weight",
            lambda a, b, k: (
                f"Attempting to broadcast a dimension of length {b} at {-k}! Mismatching "
                f"argument at index 1 had {weight.size()}; but expected shape should be "
                f"broadcastable to {list(target.shape)}"
            ),
        )
    check_floating(input, "binary_cross_entropy")
    if target.dtype != input.dtype:
        raise RuntimeError(
            f"Found dtype {scalar_type_name(target.dtype)} but expected "
            f"{scalar_type_name(input.dtype)}: the target must have the input's dtype "
            f"({dtype_repr(input.dtype)}), got {dtype_repr(target.dtype)}"
        )
    check_not_differentiable("binary_cross_entropy", "weight", weight)


def check_probabilities(input: torch.Tensor, target: torch.Tensor) -> None:
    """Every element of ``input`` and ``target`` must lie in [0, 1] (NaN does not).

    Reads host tensors (and raises naming the first offending value); elsewhere queues an
    asynchronous device assertion. The CPU path calls this only after torch's own kernel has
    refused the values, so that valid calls never pay for a second pass over the data.
    """
    for name, t in (("input", input), ("target", target)):
        ok_elems = (t >= 0) & (t <= 1)
        message = f"all elements of {name} should be between 0 and 1"
        if can_inspect_values(t):
            if t.numel() and not bool(ok_elems.all()):
                idx = first_offending_index(~ok_elems)
                value = t[idx].item()
                where = f" at index {idx}" if idx else ""
                raise RuntimeError(
                    f"{message}: binary_cross_entropy takes probabilities in [0, 1], but the "
                    f"{name} holds {value}{where}"
                    + (
                        " (use binary_cross_entropy_with_logits for unnormalised scores)"
                        if name == "input"
                        else ""
                    )
                )
        else:
            assert_on_device(ok_elems.all(), message)


# --------------------------------------------------------------------------------------------
# binary_cross_entropy_with_logits


def check_binary_cross_entropy_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
) -> None:
    if target.shape != input.shape:
        raise ValueError(
            f"Target size ({target.size()}) must be the same as input size ({input.size()})"
        )
    check_floating(input, "log_sigmoid_cpu")
    ndim = input.dim()
    for name, t in (("pos_weight", pos_weight), ("weight", weight)):
        if t is not None:
            ndim_all = max(ndim, t.dim())
            _broadcast_or_raise(
                input.shape,
                t,
                name,
                lambda a, b, k, n=ndim_all: (
                    f"The size of tensor a ({a}) must match the size of tensor b ({b}) at "
                    f"non-singleton dimension {n - k}"
                ),
            )
    if target.dtype == torch.bool:
        raise _bool_subtraction_error()(
            "Subtraction, the `-` operator, with two bool tensors is not supported. Use the `^` "
            "or `logical_xor()` operator instead. (binary_cross_entropy_with_logits needs a "
            "floating point target, got bool)"
        )
    if not target.is_floating_point():
        raise RuntimeError(
            f"result type {scalar_type_name(torch.result_type(input, target))} can't be cast to "
            f"the desired output type {scalar_type_name(target.dtype)}: "
            f"binary_cross_entropy_with_logits needs a floating point target (probabilities), "
            f"got {dtype_repr(target.dtype)}"
        )
    check_not_differentiable("binary_cross_entropy_with_logits", "weight", weight)
    check_not_differentiable("binary_cross_entropy_with_logits", "pos_weight", pos_weight)


@functools.cache
def _bool_subtraction_error() -> type[Exception]:
    """The type torch raises for ``bool - bool``, which its BCE with logits hits for a bool
    target: RuntimeError in torch 2.13, its subclass NotImplementedError in 2.14."""
    try:
        torch.ones(1, dtype=torch.bool) - torch.ones(1, dtype=torch.bool)
    except RuntimeError as exc:
        return type(exc)
    return RuntimeError
