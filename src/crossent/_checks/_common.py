"""Checks and message helpers shared by every family of losses.

Reductions (with torch's deprecated ``size_average``/``reduce``), ``ignore_index``, label
smoothing, the options crossent adds (``z_loss``, ``softcap``, ``chunk_size``), dtype and shape
names as messages print them, and the two ways a value check runs: on the host for CPU tensors,
as an asynchronous device assertion elsewhere.
"""

from __future__ import annotations

import math
import warnings
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
    return _DTYPE_NAMES.get(dtype) or dtype_repr(dtype)


def dtype_repr(dtype: torch.dtype) -> str:
    """A dtype as Python spells it without the module (``float32``, ``int64`` ...)."""
    return str(dtype).replace("torch.", "")


def shape_repr(t: torch.Tensor | torch.Size | tuple[int, ...]) -> str:
    """A tensor's shape, or a shape, as a tuple: ``(3, 4)``."""
    size = t.shape if isinstance(t, torch.Tensor) else t
    return str(tuple(size))


def first_offending_index(bad: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True element of a boolean tensor (host tensors only)."""
    flat = int(torch.nonzero(bad.reshape(-1))[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))


def can_inspect_values(t: torch.Tensor) -> bool:
    """Whether a value check may read ``t`` on the host without a device synchronisation.

    Only real CPU tensors outside of tracing qualify: on CUDA a check would stall the stream
    (and break CUDA graphs), under ``torch.compile`` it would break the graph.
    """
    if t.device.type != "cpu" or t.is_meta:
        return False
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    return not isinstance(t, torch._subclasses.FakeTensor)


def assert_on_device(ok: torch.Tensor, message: str) -> None:
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
            f"{dtype_repr(input.dtype)}"
        )


def check_not_differentiable(fn: str, name: str, t: torch.Tensor | None) -> None:
    """torch refuses a weight that requires grad where its loss has no gradient for it."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{fn}' is not differentiable with respect to argument '{name}'. "
            "This input cannot have requires_grad True."
        )


def check_same_device(input: torch.Tensor, name: str, t: torch.Tensor | None) -> None:
    """A class weight must live on the input's device (torch's words, then ours)."""
    if t is not None and t.device != input.device:
        raise RuntimeError(
            f"Tensor on device {t.device} is not on the expected device {input.device}! "
            f"({name} must be on the input's device {input.device}, got {t.device})"
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
                f"is a float in [0, 1], got a tensor of shape {shape_repr(value)} and dtype "
                f"{dtype_repr(value.dtype)}"
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


# --------------------------------------------------------------------------------------------
# Options of the linear and vocab-parallel losses (not in torch's signatures).


def check_z_loss(z_loss: object, fn: str) -> float:
    """``z_loss`` is the coefficient of lse**2: a finite real number >= 0."""
    value = check_real(z_loss, "z_loss", fn)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"{fn}: z_loss must be a finite number >= 0 (the coefficient of lse**2), got {z_loss}"
        )
    return value


def check_chunk_size(chunk_size: object, fn: str) -> int | None:
    """``chunk_size`` (rows per chunk) is None (automatic) or an int >= 1."""
    if chunk_size is None:
        return None
    _check_type(chunk_size, int, "chunk_size", "None or an int (rows per chunk)", fn)
    if chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1 (rows per chunk), got {chunk_size}")
    return chunk_size


def check_softcap(softcap: object, fn: str) -> float | None:
    """``softcap`` is None (no capping) or a finite number > 0."""
    if softcap is None:
        return None
    _check_type(softcap, Real, "softcap", "None or a real number", fn)
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(
            f"{fn}: softcap must be None or a finite number > 0 (logits become "
            f"softcap * tanh(logits / softcap)), got {softcap}"
        )
    return float(softcap)


def check_real(value: object, name: str, fn: str) -> float:
    """A real number option (not a bool), as a float."""
    _check_type(value, Real, name, "a real number", fn)
    return float(value)


def _check_type(value: object, kind: type, name: str, expected: str, fn: str) -> None:
    """An option of type ``kind``; a bool is not taken for a number."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{fn}: {name} must be {expected}, got {type(value).__name__}")
