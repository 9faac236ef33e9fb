"""Checks of the linear losses, which take a classifier head instead of logits: linear cross
entropy (class indices or class probabilities) and linear distillation (a student and a teacher
head). The class weight, class-index target and option checks they share with the other
losses come from the sibling modules."""

from __future__ import annotations

import math

import torch

from crossent._checks._common import (
    check_floating,
    check_ignore_index,
    check_real,
    check_z_loss,
    dtype_repr,
    scalar_type_name,
    shape_repr,
)
from crossent._checks.categorical import (
    batch_size_error,
    check_index_target_dtype,
    check_target_range,
    check_unbatched_target,
    multi_target_error,
)

LINEAR_CROSS_ENTROPY = "linear_cross_entropy"
LINEAR_DISTILLATION = "linear_distillation_loss"


def check_linear_ignore_index(ignore_index: object, fn: str = LINEAR_CROSS_ENTROPY) -> int:
    """``ignore_index`` of the linear losses: as :func:`check_ignore_index`, and ``None`` means
    -100 (torch's ``F.linear_cross_entropy`` convention)."""
    return -100 if ignore_index is None else check_ignore_index(ignore_index, fn)


# --------------------------------------------------------------------------------------------
# linear_cross_entropy, class-index targets (torch's words from F.linear / nll_loss first)


def check_linear_shapes(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    fn: str = LINEAR_CROSS_ENTROPY,
) -> None:
    """The head's shapes, then the class-index target's dtype and shape ``input.shape[:-1]``."""
    if input.dim() < 1:
        raise RuntimeError(
            f"{fn}: expected input with dimensionality 1 or more, (..., in_features), got "
            f"{input.dim()} (shape {shape_repr(input)})"
        )
    if linear_weight.dim() < 2:
        raise RuntimeError(
            f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}: "
            f"{fn} needs linear_weight of shape (num_classes, in_features), got "
            f"{shape_repr(linear_weight)}"
        )
    if linear_weight.dim() > 2:
        raise NotImplementedError(
            f"{fn}: K-dimensional loss (linear_weight of shape (C, d1, ..., in_features)) is "
            f"not supported by crossent; expected (num_classes, in_features), got "
            f"{shape_repr(linear_weight)}. torch.nn.functional.linear_cross_entropy supports it."
        )
    if input.shape[-1] != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), got "
            f"{input.shape[-1]} and {linear_weight.shape[-1]}, respectively (input shape "
            f"{shape_repr(input)}, linear_weight shape {shape_repr(linear_weight)})"
        )
    n_classes = linear_weight.shape[0]
    if linear_bias is not None and tuple(linear_bias.shape) != (n_classes,):
        raise RuntimeError(
            f"expected linear_bias shape {(n_classes,)}, got {shape_repr(linear_bias)}: the "
            f"bias holds one value per class of linear_weight {shape_repr(linear_weight)}"
        )
    expected = tuple(input.shape[:-1])
    check_index_target_dtype(target)
    if input.dim() == 1:
        # Unbatched (in_features,): torch accepts a 0-d target, or a 1-D target of size 1.
        check_unbatched_target(target, f" (input shape {shape_repr(input)})")
        if target.dim() > 1:
            raise multi_target_error(
                f" (input shape {shape_repr(input)}: expected a 0-d target, got shape "
                f"{shape_repr(target)})"
            )
        return
    if tuple(target.shape) != expected:
        message = (
            f"expected target of shape input.shape[:-1] = {expected} (input shape "
            f"{shape_repr(input)}), got {shape_repr(target)}"
        )
        if target.dim() > len(expected):
            raise multi_target_error(f": {message}")
        batch = target.shape[0] if target.dim() > 0 else 0
        if batch != input.shape[0]:
            raise batch_size_error(input.shape[0], batch, f": {message}")
        raise ValueError(f"target shape mismatch: {message}")


def check_linear_dtypes(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: torch.Tensor | None,
    fn: str = LINEAR_CROSS_ENTROPY,
) -> None:
    """Floating input; ``linear_weight`` and ``linear_bias`` in the input's dtype."""
    check_floating(input, fn)
    if linear_weight.dtype != input.dtype:
        raise RuntimeError(
            f"expected m1 and m2 to have the same dtype, but got: {dtype_repr(input.dtype)} != "
            f"{dtype_repr(linear_weight.dtype)}: linear_weight must have the input's dtype "
            f"({dtype_repr(input.dtype)}), got {dtype_repr(linear_weight.dtype)}"
        )
    if linear_bias is not None and linear_bias.dtype != input.dtype:
        raise RuntimeError(
            f"self and mat2 must have the same dtype, but got "
            f"{scalar_type_name(linear_bias.dtype)} and "
            f"{scalar_type_name(input.dtype)}: linear_bias must have the input's dtype "
            f"({dtype_repr(input.dtype)}), got {dtype_repr(linear_bias.dtype)}"
        )


# --------------------------------------------------------------------------------------------
# A head of the probability-target and distillation losses (crossent's words).


def check_linear_head(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fn: str,
    names: tuple[str, str, str],
) -> None:
    """A head ``input (..., D) @ weight (V, D).T + bias (V,)``: dims, shapes and dtypes.

    Raises ``RuntimeError`` (as ``F.linear``) for mismatched shapes or dtypes and
    ``NotImplementedError`` (as torch's kernels) for integer input. ``names`` are the
    arguments' names for the messages.
    """
    x_name, w_name, b_name = names
    if input.dim() < 1:
        raise RuntimeError(
            f"{fn}: expected {x_name} with dimensionality 1 or more, (..., in_features), got a "
            f"0-d tensor"
        )
    if weight.dim() != 2:
        raise RuntimeError(
            f"{fn}: expected {w_name} of shape (num_classes, in_features), got {shape_repr(weight)}"
        )
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"{fn}: expected equal {x_name} and {w_name} last dimensions (in_features), got "
            f"{input.shape[-1]} and {weight.shape[1]} ({x_name} shape {shape_repr(input)}, "
            f"{w_name} shape {shape_repr(weight)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(
            f"{fn}: expected {b_name} of shape {(weight.shape[0],)} (one value per class of "
            f"{w_name} {shape_repr(weight)}), got {shape_repr(bias)}"
        )
    check_floating(input, fn)
    for name, t in ((w_name, weight), (b_name, bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(
                f"{fn}: expected {name} to have {x_name}'s dtype "
                f"({scalar_type_name(input.dtype)}), got {scalar_type_name(t.dtype)}"
            )


def check_probability_target_options(z_loss: object, softcap: object, fn: str) -> None:
    """Probability targets take neither a z-loss nor a soft-cap (``z_loss`` is checked first)."""
    if check_z_loss(z_loss, fn) > 0 or softcap is not None:
        raise NotImplementedError(
            f"{fn}: z_loss and softcap are not supported with class-probability targets "
            f"(got z_loss={z_loss}, softcap={softcap}); use them with class-index targets"
        )


# --------------------------------------------------------------------------------------------
# linear_distillation_loss


def check_distillation_options(
    beta: object, temperature: object, hard_weight: object, soft_weight: object
) -> tuple[float, float, float, float]:
    """β in [0, 1], τ > 0, the two term weights finite and >= 0; as floats."""
    fn = LINEAR_DISTILLATION
    beta = check_real(beta, "beta", fn)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(
            f"{fn}: beta must lie in [0, 1] (0: forward KL(teacher ‖ student), 1: reverse "
            f"KL(student ‖ teacher), in between: generalized JSD), got {beta}"
        )
    temperature = check_real(temperature, "temperature", fn)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"{fn}: temperature must be a finite number > 0 (both heads' logits are divided "
            f"by it), got {temperature}"
        )
    weights = []
    for name, value in (("hard_weight", hard_weight), ("soft_weight", soft_weight)):
        value = check_real(value, name, fn)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value}")
        weights.append(value)
    return beta, temperature, weights[0], weights[1]


def check_distillation_heads(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
) -> None:
    """Each head on its own, then the two together: one row per token, one vocabulary."""
    fn = LINEAR_DISTILLATION
    for side, x, w, b in (
        ("student", student_input, student_weight, student_bias),
        ("teacher", teacher_input, teacher_weight, teacher_bias),
    ):
        check_linear_head(x, w, b, fn, (f"{side}_input", f"{side}_weight", f"{side}_bias"))
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise RuntimeError(
            f"{fn}: student_input and teacher_input must have the same leading shape (one "
            f"row per token), got {shape_repr(student_input)} and "
            f"{shape_repr(teacher_input)} (leading {shape_repr(student_input.shape[:-1])} != "
            f"{shape_repr(teacher_input.shape[:-1])})"
        )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise RuntimeError(
            f"{fn}: the student and teacher heads must share the vocabulary: "
            f"student_weight has {student_weight.shape[0]} classes "
            f"{shape_repr(student_weight)}, teacher_weight {teacher_weight.shape[0]} "
            f"{shape_repr(teacher_weight)}"
        )


def check_distillation_target(
    target: torch.Tensor | None,
    leading: torch.Size,
    n_classes: int,
    ignore_index: int,
    hard_weight: float,
) -> None:
    """The optional class-index target: needed by a hard term, shape ``leading``, in range."""
    fn = LINEAR_DISTILLATION
    if target is None:
        if hard_weight > 0:
            raise ValueError(
                f"{fn}: hard_weight={hard_weight} needs a target (class indices) for its cross "
                "entropy term, got target=None"
            )
        return
    check_index_target_dtype(target)
    if target.shape != leading:
        raise ValueError(
            f"{fn}: expected target of shape student_input.shape[:-1] = {shape_repr(leading)}, "
            f"got {shape_repr(target)}"
        )
    check_target_range(target, n_classes, ignore_index)
