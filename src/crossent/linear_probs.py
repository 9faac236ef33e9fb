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

__all__ = ["is_probability_target", "linear_cross_entropy_probs"]

_FN = "linear_cross_entropy"


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
    ignore_index = _checks.check_linear_ignore_index(ignore_index, _FN)
    _checks.check_probability_ignore_index(ignore_index)
    _checks.check_linear_head(
        input, linear_weight, linear_bias, _FN, ("input", "linear_weight", "linear_bias")
    )
    n_classes = linear_weight.shape[0]
    _checks.check_class_weight(weight, n_classes, input.dtype, prefix=f"{_FN}: ")
    _checks.check_not_differentiable(_FN, "weight", weight)
    label_smoothing = _checks.check_label_smoothing(label_smoothing)
    _checks.check_probability_target_options(z_loss, softcap, _FN)
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
