"""Argument validation shared by every backend.

This is the one place that raises for bad arguments, so that behaviour cannot drift between the
CPU, GPU and distributed paths. Exception *types* follow torch 2.13 (users catch them); messages
say what was wrong, what was expected and what was given.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from numbers import Real
from typing import Literal

import numpy as np
import torch
import torch._subclasses

Reduction = Literal["none", "mean", "sum"]
_REDUCTIONS = ("none", "mean", "sum")


def reduction_from_legacy(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """Resolve torch's deprecated ``size_average``/``reduce`` pair into a reduction string.

    ``None`` counts as ``True``; if either is not ``None`` it overrides ``reduction``, with the
    same ``UserWarning`` torch gives.
    """
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if not reduce:
        result = "none"
    elif size_average:
        result = "mean"
    else:
        result = "sum"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{result}' "
        "instead.",
        UserWarning,
        stacklevel=3,
    )
    return result


def check_reduction(reduction: str) -> Reduction:
    """Validate ``reduction``; accept the deprecated ``'elementwise_mean'`` as ``'mean'``."""
    if reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            UserWarning,
            stacklevel=3,
        )
        return "mean"
    if not isinstance(reduction, str) or reduction not in _REDUCTIONS:
        raise ValueError(
            f"{reduction} is not a valid value for reduction: expected one of "
            f"'none', 'mean' or 'sum', got {reduction!r}"
        )
    return reduction  # type: ignore[return-value]


def resolve_reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> Reduction:
    """Legacy arguments first, then validation: the order torch applies them in."""
    return check_reduction(reduction_from_legacy(size_average, reduce, reduction))


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def check_ignore_index(ignore_index: object, fn: str = "cross_entropy") -> int:
    """``ignore_index`` as a Python int, accepted where torch's argument parser accepts it.

    torch takes an ``int``, a NumPy integer or a one-element integer tensor, and raises
    ``TypeError`` for ``None``, floats and bools, and ``ValueError`` for integers outside int64.
    """
    value = ignore_index
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not (
            value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
        ):
            value = int(value.item())
    elif not isinstance(value, (bool, np.bool_, int)) and isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{fn}(): argument 'ignore_index' must be int, not {type(ignore_index).__name__}"
        )
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(
            f"Overflow when unpacking long long: {fn}(): argument 'ignore_index' must fit in "
            f"int64 [-2**63, 2**63 - 1], got {value}"
        )
    return value


# --------------------------------------------------------------------------------------------
# Small formatting helpers for messages.

_DTYPE_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def scalar_type_name(dtype: torch.dtype) -> str:
    """torch's C++ name of a dtype (``Float``, ``Long`` ...), as its messages print it."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _shape(t: torch.Tensor | torch.Size | tuple[int, ...]) -> str:
    size = t.shape if isinstance(t, torch.Tensor) else t
    return str(tuple(size))


def _first_offending_index(bad: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True element of a boolean tensor (host tensors only)."""
    flat = int(torch.nonzero(bad.reshape(-1))[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))


def _can_inspect_values(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t`` on the host without a device synchronisation.

    Only real CPU tensors outside of tracing qualify: on CUDA a check would stall the stream
    (and break CUDA graphs), under ``torch.compile`` it would break the graph.
    """
    if t.device.type != "cpu" or t.is_meta:
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not isinstance(t, torch._subclasses.FakeTensor)


def _assert_on_device(ok: torch.Tensor, message: str) -> None:
    """Asynchronous check for tensors we cannot read on the host (CUDA, tracing)."""
    if ok.is_meta or isinstance(ok, torch._subclasses.FakeTensor):
        return
    if torch._C._are_functorch_transforms_active():
        return  # a batched (vmap) tensor has no single truth value; gather still bounds-checks
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        return
    torch._assert_async(ok, message)


# --------------------------------------------------------------------------------------------
# Shared tensor checks.


def check_floating(input: torch.Tensor, kernel: str) -> None:
    """torch raises NotImplementedError for integer inputs, naming its kernel and the dtype."""
    if not input.is_floating_point():
        raise NotImplementedError(
            f"\"{kernel}\" not implemented for '{scalar_type_name(input.dtype)}': the input must "
            f"be a floating point tensor (float16, bfloat16, float32 or float64), got "
            f"{_short(input.dtype)}"
        )


def check_not_differentiable(fn: str, name: str, t: torch.Tensor | None) -> None:
    """torch refuses a weight that requires grad where its loss has no gradient for it."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{fn}' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
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
                f"{torch_words(a, b, k)}: {name} of shape {_shape(other)} does not broadcast "
                f"with the input of shape {_shape(input_shape)}: its size {b} at dimension "
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
            f"{list(full)}: {name} of shape {_shape(other)} would enlarge the input of shape "
            f"{_shape(input_shape)}; it must broadcast to the input's shape"
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
            f"({_short(input.dtype)}), got {_short(target.dtype)}"
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
        if _can_inspect_values(t):
            if t.numel() and not bool(ok_elems.all()):
                idx = _first_offending_index(~ok_elems)
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
            _assert_on_device(ok_elems.all(), message)


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
            f"got {_short(target.dtype)}"
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


# --------------------------------------------------------------------------------------------
# nll_loss and cross_entropy (class-index targets)


def check_class_weight(
    weight: torch.Tensor | None, n_classes: int, input_dtype: torch.dtype, prefix: str = ""
) -> None:
    if weight is None:
        return
    if weight.dim() != 1 or weight.numel() != n_classes:
        raise RuntimeError(
            f"{prefix}weight tensor should be defined either for all {n_classes} classes or no "
            f"classes but got weight tensor of shape: {list(weight.shape)} (expected a 1-D class "
            f"weight of shape ({n_classes},))"
        )
    if not prefix and weight.dtype != input_dtype:
        raise RuntimeError(
            f"expected scalar type {scalar_type_name(input_dtype)} but found "
            f"{scalar_type_name(weight.dtype)}: the class weight must have the input's dtype "
            f"({_short(input_dtype)}), got {_short(weight.dtype)}"
        )


def check_index_target_dtype(target: torch.Tensor) -> None:
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(
            f"expected target dtype to be Long or Byte, but got "
            f"{scalar_type_name(target.dtype)}: class-index targets must be int64 or uint8"
            + (
                " (a floating target is read as class probabilities only when it has the "
                "input's shape)"
                if target.is_floating_point()
                else ""
            )
        )


def check_nll_shapes(input: torch.Tensor, target: torch.Tensor) -> None:
    """Shape rules of ``nll_loss_nd`` (also used by cross entropy with index targets)."""
    if input.dim() < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    if input.dim() != 1:
        target_batch = target.shape[0] if target.dim() > 0 else 0
        if input.shape[0] != target_batch:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                f"({target_batch}). (input shape {_shape(input)}, target shape {_shape(target)})"
            )
    if input.dim() == 1:
        if target.dim() == 1 and target.shape[0] != 1:
            raise ValueError(
                f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}"
            )
        if target.dim() > 1:
            raise RuntimeError(
                "0D or 1D target tensor expected, multi-target not supported "
                f"(input shape {_shape(input)}, target shape {_shape(target)})"
            )
    elif input.dim() == 2:
        if target.dim() != 1:
            raise RuntimeError(
                "0D or 1D target tensor expected, multi-target not supported "
                f"(input shape {_shape(input)}: expected a target of shape ({input.shape[0]},), "
                f"got {_shape(target)})"
            )
    elif input.dim() == 4:
        if target.dim() != 3:
            raise RuntimeError(
                "only batches of spatial targets supported (3D tensors) but got targets of "
                f"dimension: {target.dim()} (input shape {_shape(input)}, expected target shape "
                f"{_shape((input.shape[0], *input.shape[2:]))})"
            )
        if target.shape[1:] != input.shape[2:]:
            raise RuntimeError(
                f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)}: "
                f"expected target shape {_shape((input.shape[0], *input.shape[2:]))})"
            )
    else:
        expected = [input.shape[0], *input.shape[2:]]
        if list(target.shape) != expected:
            raise RuntimeError(
                f"Expected target size {expected}, got {list(target.shape)} "
                f"(input shape {_shape(input)})"
            )


def check_target_range(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Every non-ignored class index must lie in [0, n_classes)."""
    t = target.long() if target.dtype != torch.int64 else target
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if _can_inspect_values(t):
        if t.numel() and bool(bad.any()):
            idx = _first_offending_index(bad)
            value = int(t[idx]) if t.dim() else int(t)
            noun = "class" if n_classes == 1 else "classes"
            where = f" at position {idx}" if idx else ""
            raise IndexError(
                f"Target {value} is out of bounds: the input has {n_classes} {noun}, so class "
                f"indices must lie in [0, {n_classes}), but the target holds {value}{where}"
                + (f" (ignore_index is {ignore_index})" if ignore_index != -100 else "")
            )
    else:
        _assert_on_device(
            ~bad.any(), f"Target is out of bounds: class indices must lie in [0, {n_classes})"
        )


def check_label_smoothing(label_smoothing: object, fn: str = "cross_entropy_loss") -> float:
    """ε as a float; torch checks only ``ε <= 1`` (inside ``ε > 0``): negative (and NaN) ε mean
    no smoothing.

    Like torch's argument parser, this takes a real number (``int``, ``float``, ``bool``, NumPy
    scalars) or a 0-d real tensor, and raises ``TypeError`` for anything else (``"0.1"``,
    ``None``, complex numbers).
    """
    value = label_smoothing
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex():
            raise TypeError(
                f"{fn}(): argument 'label_smoothing' must be float, not Tensor: label smoothing "
                f"is a float in [0, 1], got a tensor of shape {_shape(value)} and dtype "
                f"{_short(value.dtype)}"
            )
        value = float(value.item())
    elif isinstance(value, Real):
        value = float(value)
    else:
        raise TypeError(
            f"{fn}(): argument 'label_smoothing' must be float, not {type(value).__name__}: "
            f"label smoothing is a float in [0, 1], got {value!r}"
        )
    if value > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {value}")
    return value if value > 0.0 else 0.0


def check_same_device(input: torch.Tensor, name: str, t: torch.Tensor | None) -> None:
    """A class weight must live on the input's device (torch's words, then ours)."""
    if t is not None and t.device != input.device:
        raise RuntimeError(
            f"Tensor on device {t.device} is not on the expected device {input.device}! "
            f"({name} must be on the input's device {input.device}, got {t.device})"
        )


def check_cross_entropy_prob(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int
) -> None:
    """Probability targets (``input.shape == target.shape``)."""
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got "
            f"{scalar_type_name(target.dtype)} (the target has the input's shape "
            f"{_shape(input)}, so it is read as class probabilities; class indices need shape "
            f"{_shape((input.shape[0], *input.shape[2:])) if input.dim() > 1 else '()'})"
        )
    if input.dim() == 0:
        raise IndexError(
            "Dimension specified as 1 but tensor has no dimensions: cross_entropy needs input "
            "of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor"
        )
    if ignore_index >= 0:
        raise RuntimeError(
            "ignore_index is not supported for floating point target (probability targets "
            f"ignore nothing; got ignore_index={ignore_index}, expected a negative value)"
        )
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    check_class_weight(weight, n_classes, input.dtype, prefix="cross_entropy: ")
    check_floating(input, "log_softmax_lastdim_kernel_impl")


# --------------------------------------------------------------------------------------------
# Options of the linear and vocab-parallel losses (not in torch's signatures).


def check_z_loss(z_loss: object, fn: str) -> float:
    """``z_loss`` is the coefficient of lse**2: a finite real number >= 0."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, Real):
        raise TypeError(f"{fn}: z_loss must be a real number, got {type(z_loss).__name__}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(
            f"{fn}: z_loss must be a finite number >= 0 (the coefficient of lse**2), got {z_loss}"
        )
    return float(z_loss)


def check_chunk_size(chunk_size: object, fn: str) -> int | None:
    """``chunk_size`` (rows per chunk) is None (automatic) or an int >= 1."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"{fn}: chunk_size must be None or an int (rows per chunk), got "
            f"{type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1 (rows per chunk), got {chunk_size}")
    return chunk_size
