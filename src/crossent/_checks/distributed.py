"""Local argument checks of the vocab-parallel losses (each rank, before any communication).

Each rank checks its own arguments with these; :mod:`crossent.distributed` then exchanges what
they raised (or a summary of the call) so that every rank raises the same exception or none
does. What can only be checked across ranks (the vocabulary size, replication of the target and
of the class weight) lives in ``crossent.distributed._agreement``. Messages name the public
function the user called, ``fn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crossent._checks import (
    Reduction,
    check_chunk_size,
    check_floating,
    check_ignore_index,
    check_index_target_dtype,
    check_label_smoothing,
    check_not_differentiable,
    check_reduction,
    check_z_loss,
    scalar_type_name,
)

#: The logits/input dtypes the vocab-parallel losses compute in; the index is the dtype's code
#: in the cross-rank summary.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Options:
    """The validated scalar options of one call."""

    reduction: Reduction
    ignore_index: int
    label_smoothing: float  # clamped at 0, as torch does for negative values
    z_loss: float
    chunk_size: int | None


def check_options(
    fn: str,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int | None,
) -> Options:
    """The scalar options of ``fn`` (``vocab_parallel_cross_entropy`` or its linear variant)."""
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index, fn)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(
            f"{fn}: label_smoothing must be a float, got {type(label_smoothing).__name__}"
        )
    label_smoothing = check_label_smoothing(label_smoothing, fn)  # > 1 raises, < 0 means 0
    z_loss = check_z_loss(z_loss, fn)
    chunk_size = check_chunk_size(chunk_size, fn)
    return Options(reduction, ignore_index, label_smoothing, z_loss, chunk_size)


def _require_tensor(value: object, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def _check_rows(rows: Tensor, name: str, last_dim: str, fn: str) -> None:
    """``rows`` (the logits shard or the input): a floating tensor of a supported dtype, with
    at least one dimension (``last_dim`` names the last one)."""
    _require_tensor(rows, name)
    check_floating(rows, fn)
    if rows.dtype not in FLOAT_DTYPES:  # float8 and friends
        raise NotImplementedError(
            f"{fn} is not implemented for {rows.dtype} {name}; "
            "expected float16, bfloat16, float32 or float64"
        )
    if rows.dim() < 1:
        raise ValueError(
            f"Expected {name} with 1 or more dimensions (*, {last_dim}), got a 0-d tensor"
        )


def _check_target(target: Tensor, rows: Tensor, name: str) -> None:
    """A class-index target of shape ``rows.shape[:-1]`` on the device of ``rows``."""
    _require_tensor(target, "target")
    check_index_target_dtype(target)
    expected_shape = rows.shape[:-1]
    if target.shape != expected_shape:
        raise ValueError(
            f"Expected target of shape {name}.shape[:-1] = {list(expected_shape)}, "
            f"got target of shape {list(target.shape)} (the class dimension is the last one)"
        )
    if target.device != rows.device:
        raise RuntimeError(f"target is on {target.device}, expected {rows.device} like {name}")


def check_logits_target(logits_shard: Tensor, target: Tensor, fn: str) -> None:
    """``(*, V_r)`` logits of this rank's classes and the ``(*)`` global class indices."""
    _check_rows(logits_shard, "logits_shard", "V_r", fn)
    _check_target(target, logits_shard, "logits_shard")


def check_linear(
    input: Tensor,
    linear_weight_shard: Tensor,
    linear_bias_shard: Tensor | None,
    target: Tensor,
    fn: str,
) -> None:
    """``(*, D)`` input, ``(V_r, D)`` classifier rows and ``(V_r,)`` bias of this rank, one dtype
    and device, and the ``(*)`` global class indices."""
    _require_tensor(input, "input")
    _require_tensor(linear_weight_shard, "linear_weight_shard")
    _check_rows(input, "input", "D", fn)
    hidden = input.shape[-1]
    if linear_weight_shard.dim() != 2 or linear_weight_shard.shape[1] != hidden:
        raise RuntimeError(
            f"linear_weight_shard must have shape (V_r, D) with D = input.shape[-1] = {hidden}, "
            f"got {list(linear_weight_shard.shape)}"
        )
    if linear_weight_shard.dtype != input.dtype:
        raise RuntimeError(
            f"linear_weight_shard has dtype {linear_weight_shard.dtype}, expected the input's "
            f"{input.dtype}"
        )
    if linear_weight_shard.device != input.device:
        raise RuntimeError(
            f"linear_weight_shard is on {linear_weight_shard.device}, expected the input's "
            f"{input.device}"
        )
    bias = linear_bias_shard
    if bias is not None:
        _require_tensor(bias, "linear_bias_shard")
        if bias.shape != linear_weight_shard.shape[:1]:
            raise RuntimeError(
                "linear_bias_shard must have shape (V_r,) = "
                f"{list(linear_weight_shard.shape[:1])}, got {list(bias.shape)}"
            )
        if bias.dtype != input.dtype or bias.device != input.device:
            raise RuntimeError(
                f"linear_bias_shard is {bias.dtype} on {bias.device}, expected the input's "
                f"{input.dtype} on {input.device}"
            )
    _check_target(target, input, "input")


def check_class_weight(weight: Tensor | None, reference: Tensor, fn: str) -> None:
    """Dtype, device and differentiability; the size ``V`` is checked once it is known."""
    if weight is None:
        return
    _require_tensor(weight, "weight")
    if weight.dim() != 1:
        raise RuntimeError(
            "weight tensor should be defined either for all V classes or no classes: expected a "
            f"1-D class weight of shape (V,), got weight tensor of shape: {list(weight.shape)}"
        )
    if weight.dtype != reference.dtype:
        raise RuntimeError(
            f"expected scalar type {scalar_type_name(reference.dtype)} but found "
            f"{scalar_type_name(weight.dtype)}: the class weight must have the logits' dtype "
            f"({reference.dtype}), got {weight.dtype}"
        )
    if weight.device != reference.device:
        raise RuntimeError(f"weight is on {weight.device}, expected {reference.device}")
    check_not_differentiable(fn, "weight", weight)
