"""Checks of the categorical losses on logits or log-probabilities: ``nll_loss`` and
``cross_entropy`` with class indices or class probabilities. The class weight and class-index
target checks here serve the linear losses too."""

from __future__ import annotations

import torch

from crossent._checks._common import (
    assert_on_device,
    can_inspect_values,
    check_floating,
    check_not_differentiable,
    check_same_device,
    dtype_repr,
    first_offending_index,
    scalar_type_name,
    shape_repr,
)

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
            f"({dtype_repr(input_dtype)}), got {dtype_repr(weight.dtype)}"
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


def batch_size_error(input_batch: int, target_batch: int, detail: str) -> ValueError:
    """torch's words for an input and a target with different batch sizes, then ``detail``."""
    return ValueError(
        f"Expected input batch_size ({input_batch}) to match target batch_size "
        f"({target_batch}){detail}"
    )


def multi_target_error(detail: str) -> RuntimeError:
    """torch's words for a target with too many dimensions, then ``detail``."""
    return RuntimeError(f"0D or 1D target tensor expected, multi-target not supported{detail}")


def check_unbatched_target(target: torch.Tensor, detail: str) -> None:
    """Unbatched input takes a 0-d target or a 1-D target of size 1."""
    if target.dim() == 1 and target.shape[0] != 1:
        raise ValueError(
            f"For 1D input, 1D target must have size 1, but got target size: "
            f"{target.shape[0]}{detail}"
        )


def check_nll_shapes(input: torch.Tensor, target: torch.Tensor) -> None:
    """Shape rules of ``nll_loss_nd`` (also used by cross entropy with index targets)."""
    if input.dim() < 1:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    if input.dim() != 1:
        target_batch = target.shape[0] if target.dim() > 0 else 0
        if input.shape[0] != target_batch:
            raise batch_size_error(
                input.shape[0],
                target_batch,
                f". (input shape {shape_repr(input)}, target shape {shape_repr(target)})",
            )
    if input.dim() == 1:
        check_unbatched_target(target, "")
        if target.dim() > 1:
            raise multi_target_error(
                f" (input shape {shape_repr(input)}, target shape {shape_repr(target)})"
            )
    elif input.dim() == 2:
        if target.dim() != 1:
            raise multi_target_error(
                f" (input shape {shape_repr(input)}: expected a target of shape "
                f"({input.shape[0]},), got {shape_repr(target)})"
            )
    elif input.dim() == 4:
        if target.dim() != 3:
            raise RuntimeError(
                "only batches of spatial targets supported (3D tensors) but got targets of "
                f"dimension: {target.dim()} (input shape {shape_repr(input)}, expected target "
                f"shape {shape_repr((input.shape[0], *input.shape[2:]))})"
            )
        if target.shape[1:] != input.shape[2:]:
            raise RuntimeError(
                f"size mismatch (got input: {list(input.shape)} , target: {list(target.shape)}: "
                f"expected target shape {shape_repr((input.shape[0], *input.shape[2:]))})"
            )
    else:
        expected = [input.shape[0], *input.shape[2:]]
        if list(target.shape) != expected:
            raise RuntimeError(
                f"Expected target size {expected}, got {list(target.shape)} "
                f"(input shape {shape_repr(input)})"
            )


def check_target_range(target: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """Every non-ignored class index must lie in [0, n_classes)."""
    t = target.long() if target.dtype != torch.int64 else target
    bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
    if can_inspect_values(t):
        if t.numel() and bool(bad.any()):
            idx = first_offending_index(bad)
            value = int(t[idx]) if t.dim() else int(t)
            noun = "class" if n_classes == 1 else "classes"
            where = f" at position {idx}" if idx else ""
            raise IndexError(
                f"Target {value} is out of bounds: the input has {n_classes} {noun}, so class "
                f"indices must lie in [0, {n_classes}), but the target holds {value}{where}"
                + (f" (ignore_index is {ignore_index})" if ignore_index != -100 else "")
            )
    else:
        assert_on_device(
            ~bad.any(), f"Target is out of bounds: class indices must lie in [0, {n_classes})"
        )


def check_cross_entropy_prob(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int
) -> None:
    """Probability targets (``input.shape == target.shape``)."""
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got "
            f"{scalar_type_name(target.dtype)} (the target has the input's shape "
            f"{shape_repr(input)}, so it is read as class probabilities; class indices need shape "
            f"{shape_repr((input.shape[0], *input.shape[2:])) if input.dim() > 1 else '()'})"
        )
    if input.dim() == 0:
        raise IndexError(
            "Dimension specified as 1 but tensor has no dimensions: cross_entropy needs input "
            "of shape (C,), (N, C) or (N, C, d1, ...), got a 0-d tensor"
        )
    check_probability_ignore_index(ignore_index)
    n_classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    check_class_weight(weight, n_classes, input.dtype, prefix="cross_entropy: ")
    check_floating(input, "log_softmax_lastdim_kernel_impl")


def check_probability_ignore_index(ignore_index: int) -> None:
    """Probability targets ignore nothing: torch refuses a non-negative ``ignore_index``."""
    if ignore_index >= 0:
        raise RuntimeError(
            "ignore_index is not supported for floating point target (probability targets "
            f"ignore nothing; got ignore_index={ignore_index}, expected a negative value)"
        )


def check_index_targets(
    input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, kernel: str
) -> int:
    """The checks of ``nll_loss_nd``, in torch's order, but the target range (checked by
    torch's kernels, or before crossent's own); returns the number of classes."""
    check_nll_shapes(input, target)
    check_floating(input, kernel)
    check_index_target_dtype(target)
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    check_class_weight(weight, n_classes, input.dtype)
    check_same_device(input, "weight", weight)
    check_not_differentiable("nll_loss_forward", "weight", weight)
    return n_classes
