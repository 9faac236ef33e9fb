"""Linear cross entropy with class-probability targets.

``crossent.linear_cross_entropy(input, linear_weight, target)`` routes here when ``target`` is
floating with shape ``(..., V)`` (``input.shape[:-1] + (V,)``). This module validates; the
work is done by ``crossent.ops.soft_chunked`` (the same streaming pass as distillation), which
never holds the N×V logits.
"""

from __future__ import annotations

from torch import Tensor

from crossent import _checks
from crossent.ops.soft_chunked import linear_cross_entropy_probs_chunked

__all__ = ["check_linear_head", "is_probability_target", "linear_cross_entropy_probs"]

_FN = "linear_cross_entropy"


def check_linear_head(
    input: Tensor, weight: Tensor, bias: Tensor | None, fn: str, names: tuple[str, str, str]
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
            f"{fn}: expected {w_name} of shape (num_classes, in_features), got "
            f"{tuple(weight.shape)}"
        )
    if input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"{fn}: expected equal {x_name} and {w_name} last dimensions (in_features), got "
            f"{input.shape[-1]} and {weight.shape[1]} ({x_name} shape {tuple(input.shape)}, "
            f"{w_name} shape {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(
            f"{fn}: expected {b_name} of shape {(weight.shape[0],)} (one value per class of "
            f"{w_name} {tuple(weight.shape)}), got {tuple(bias.shape)}"
        )
    _checks.check_floating(input, fn)
    for name, t in ((w_name, weight), (b_name, bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(
                f"{fn}: expected {name} to have {x_name}'s dtype "
                f"({_checks.scalar_type_name(input.dtype)}), got "
                f"{_checks.scalar_type_name(t.dtype)}"
            )


def is_probability_target(input: Tensor, linear_weight: Tensor, target: Tensor) -> bool:
    """Whether ``target`` reads as class probabilities: floating, shape ``(..., V)``."""
    return (
        target.is_floating_point()
        and input.dim() >= 1
        and linear_weight.dim() >= 1
        and tuple(target.shape) == (*input.shape[:-1], linear_weight.shape[0])
    )


def linear_cross_entropy_probs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    r"""``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` for a
    class-probability ``target`` of shape ``(..., V)``, without the N×V logits.

    .. math::
        \ell_n = -\sum_c w_c\, y'_{n,c} \log p_{n,c}, \qquad
        y' = (1-\varepsilon)\, y + \varepsilon / V, \qquad
        p = \operatorname{softmax}(W x_n + b)

    ``'mean'`` divides by the number of rows N (not by the class weights), ``'none'`` returns
    ``input.shape[:-1]``; the result dtype is the promotion of the input's, the target's and
    the class weight's (as torch). Gradients flow to ``input``, ``linear_weight``,
    ``linear_bias`` and ``target``.

    Raises:
        RuntimeError: a non-negative ``ignore_index`` (probability targets ignore nothing),
            head shape/dtype mismatches, a bad class weight, ``label_smoothing > 1``.
        ValueError: bad ``reduction``, ``chunk_size < 1``, ``z_loss < 0``.
        NotImplementedError: ``z_loss > 0`` or ``softcap`` with probability targets, integer
            input.
    """
    reduction = _checks.check_reduction(reduction)
    ignore_index = -100 if ignore_index is None else _checks.check_ignore_index(ignore_index, _FN)
    if ignore_index >= 0:
        raise RuntimeError(
            "ignore_index is not supported for floating point target (probability targets "
            f"ignore nothing; got ignore_index={ignore_index}, expected a negative value)"
        )
    check_linear_head(
        input, linear_weight, linear_bias, _FN, ("input", "linear_weight", "linear_bias")
    )
    n_classes = linear_weight.shape[0]
    _checks.check_class_weight(weight, n_classes, input.dtype, prefix=f"{_FN}: ")
    _checks.check_not_differentiable(_FN, "weight", weight)
    label_smoothing = _checks.check_label_smoothing(label_smoothing)
    if _checks.check_z_loss(z_loss, _FN) > 0 or softcap is not None:
        raise NotImplementedError(
            f"{_FN}: z_loss and softcap are not supported with class-probability targets "
            f"(got z_loss={z_loss}, softcap={softcap}); use them with class-index targets"
        )
    chunk_size = _checks.check_chunk_size(chunk_size, _FN)

    x2d = input.reshape(-1, input.shape[-1])  # (N, D)
    probs = target.reshape(-1, n_classes)  # (N, V)
    loss = linear_cross_entropy_probs_chunked(
        x2d,
        linear_weight,
        probs,
        bias=linear_bias,
        class_weight=weight,
        reduction=reduction,
        label_smoothing=label_smoothing,
        chunk_size=chunk_size,
    )
    return loss.reshape(input.shape[:-1]) if reduction == "none" else loss
