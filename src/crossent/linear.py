"""Linear cross entropy: ``cross_entropy(input @ linear_weight.T + linear_bias, target)``
without ever holding the N×V logits.

Public API: :func:`linear_cross_entropy` (re-exported as ``crossent.linear_cross_entropy`` and
``crossent.functional.linear_cross_entropy``) and :class:`LinearCrossEntropyLoss`
(``crossent.nn.LinearCrossEntropyLoss``). Arguments shared with torch 2.13's
``F.linear_cross_entropy`` mean the same; ``z_loss``, ``softcap`` and ``chunk_size`` are ours.
This module validates; the work is done by ``crossent.ops.chunked`` (any device) or, for CUDA
tensors, by the Triton kernels (``crossent.ops.triton``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from crossent import _checks, _dtensor
from crossent._backend import select_backend
from crossent.linear_probs import is_probability_target, linear_cross_entropy_probs
from crossent.nn import module_options, options_repr
from crossent.ops import triton as triton_ops
from crossent.ops.chunked import linear_cross_entropy_chunked

__all__ = ["linear_cross_entropy", "LinearCrossEntropyLoss"]

_FN = "linear_cross_entropy"
# The module's options, passed to linear_cross_entropy as they are named there.
_MODULE_OPTIONS = (
    "reduction", "ignore_index", "label_smoothing", "z_loss", "softcap", "chunk_size"
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Public API.


def linear_cross_entropy(
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
    r"""Cross entropy of the linear projection ``input @ linear_weight.T + linear_bias``.

    Equal to ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)``
    (plus the soft-cap and z-loss terms below) but computed in token chunks, so neither the
    N×V logits nor their gradient is ever held. With logits :math:`z = W x_i + b`:

    .. math::
        s = c \tanh(z / c) \ \text{(if softcap } c\text{, Gemma 2)}, \qquad
        \mathrm{lse}_i = \log \sum_v e^{s_v}

        \ell_i = (1-\varepsilon)\, w_{t_i} (\mathrm{lse}_i - s_{t_i})
               + \frac{\varepsilon}{V} \sum_v w_v (\mathrm{lse}_i - s_v)
               + \zeta\, \mathrm{lse}_i^2 \ \text{(z-loss, PaLM)}

    for tokens whose target is not ``ignore_index`` (ignored tokens give 0 and cost no matmul
    work on CPU). ``'mean'`` divides :math:`\sum_i \ell_i` by :math:`\sum_{i\,\text{kept}}
    w_{t_i}` (the number of kept tokens without class weights) — the z-loss term included; class
    weights scale the cross-entropy terms only. All-ignored input gives NaN for ``'mean'`` (0/0,
    as torch) and zero gradients.

    Gradients w.r.t. ``input``, ``linear_weight`` and ``linear_bias`` are exact and
    accumulated in float32 (float64 for float64 input) whatever the input dtype, then cast to
    the parameter's dtype. For ``'mean'``/``'sum'`` they are computed during the forward (the
    backward only scales them); ``'none'`` recomputes the chunks in its backward. Double
    backward raises ``RuntimeError``.

    Args:
        input: hidden states ``(..., D)`` (torch's function takes ``(D,)`` or ``(N, D)``).
        linear_weight: classifier weight ``(V, D)``, the input's dtype.
        target: class indices of shape ``input.shape[:-1]``, int64 or uint8, in ``[0, V)`` or
            equal to ``ignore_index``; or class probabilities of shape ``(..., V)`` (floating),
            treated as ``cross_entropy`` treats probability targets (``'mean'`` divides by the
            number of rows; no z-loss or soft-cap there).
        linear_bias: optional ``(V,)`` bias, the input's dtype.
        weight: optional ``(V,)`` class weight (the input's dtype, not differentiable).
        reduction: ``'none' | 'mean' | 'sum'``.
        ignore_index: target value to skip; ``None`` means -100 (torch's convention).
        label_smoothing: ε in [0, 1], PyTorch's convention (ε/V on every class); negative
            values mean no smoothing, as in torch.
        z_loss: ζ >= 0, weight of the :math:`\mathrm{lse}^2` penalty.
        softcap: c > 0 to soft-cap the logits, or None.
        chunk_size: tokens per chunk; None sizes chunks by work per thread on the host (256
            rows per torch thread, at most 64 MiB of scratch) and from a 32 MiB budget
            elsewhere (``crossent.ops.chunked``).

    Returns:
        The loss in the input's dtype: 0-d for ``'mean'``/``'sum'``, ``target``'s shape for
        ``'none'`` (0-d for unbatched input).

    Raises:
        RuntimeError: wrong ``linear_weight``/``linear_bias`` shapes or dtypes, a 2-D+ target
            for 2-D input, a non-int64/uint8 target, a bad class weight (shape, dtype,
            ``requires_grad``), ``label_smoothing > 1``, double backward.
        ValueError: target shape other than ``input.shape[:-1]``, bad ``reduction``,
            ``z_loss < 0``, ``softcap <= 0``, ``chunk_size < 1``.
        IndexError: a kept target outside ``[0, V)`` (checked on the host for CPU tensors).
        TypeError: non-integer ``ignore_index`` or ``chunk_size``, non-numeric options.
        NotImplementedError: integer input, K-dimensional weights, z-loss or soft-cap with
            probability targets.
    """
    given = dict(
        linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, chunk_size=chunk_size,
    )  # fmt: skip
    if has_torch_function_variadic(input, linear_weight, target, linear_bias, weight):
        return handle_torch_function(
            linear_cross_entropy,
            (input, linear_weight, target, linear_bias, weight),
            input,
            linear_weight,
            target,
            **given,
        )
    if _dtensor.involved(input, linear_weight, target, linear_bias, weight):
        return _dtensor.linear_cross_entropy(input, linear_weight, target, **given)
    if is_probability_target(input, linear_weight, target):
        # Class probabilities, shape (..., V): the soft-target pass (crossent.linear_probs).
        return linear_cross_entropy_probs(input, linear_weight, target, **given)
    reduction = _checks.check_reduction(reduction)
    ignore_index = _checks.check_linear_ignore_index(ignore_index, _FN)
    _checks.check_linear_shapes(input, linear_weight, target, linear_bias, _FN)
    _checks.check_linear_dtypes(input, linear_weight, linear_bias, _FN)
    n_classes = linear_weight.shape[0]
    _checks.check_class_weight(weight, n_classes, input.dtype)
    _checks.check_not_differentiable(_FN, "weight", weight)
    label_smoothing = _checks.check_label_smoothing(label_smoothing)
    z_loss = _checks.check_z_loss(z_loss, _FN)
    softcap = _checks.check_softcap(softcap, _FN)
    chunk_size = _checks.check_chunk_size(chunk_size, _FN)
    _checks.check_target_range(target, n_classes, ignore_index)

    # (N, D), a view when it can be; N spelled out, since -1 is ambiguous when D = 0
    x2d = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    t1d = target.reshape(-1)
    if t1d.dtype != torch.int64:
        t1d = t1d.long()
    out_shape = () if input.dim() == 1 else tuple(target.shape)
    options = dict(
        linear_bias=linear_bias,
        weight=weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )

    if select_backend(input, linear_weight, target, linear_bias, weight) == "triton":
        # CUDA tensors (or CROSSENT_BACKEND=triton): tiles in SRAM, chunk_size does not apply.
        loss = triton_ops.linear_cross_entropy(x2d, linear_weight, t1d, **options)
    else:
        loss = linear_cross_entropy_chunked(
            x2d, linear_weight, t1d, chunk_size=chunk_size, **options
        )
    return loss.reshape(out_shape) if reduction == "none" else loss


class LinearCrossEntropyLoss(torch.nn.LinearCrossEntropyLoss):
    """Module form of :func:`linear_cross_entropy`, owning the classifier ``nn.Linear``.

    Subclasses ``torch.nn.LinearCrossEntropyLoss`` with its constructor's shared arguments, so
    ``self.linear`` (``weight`` of shape ``(num_classes, in_features)``, optional ``bias``), the
    ``weight`` class-weight buffer, ``state_dict`` keys and ``isinstance`` checks are torch's.
    torch's ``out_features`` (K-dimensional loss) and ``options`` are not offered; ``z_loss``,
    ``softcap`` and ``chunk_size`` are added.

    Args:
        in_features: D, size of each input sample.
        num_classes: V, number of classes.
        bias: whether the linear layer has a learnable bias.
        device, dtype: of the linear layer's parameters.
        reduction: ``'none' | 'mean' | 'sum'``.
        weight: optional ``(num_classes,)`` class weight.
        ignore_index: target value to skip (None means -100).
        label_smoothing: ε in [0, 1].
        z_loss: ζ >= 0.
        softcap: c > 0 or None.
        chunk_size: tokens per chunk, or None.

    Raises:
        RuntimeError: ``weight`` not of shape ``(num_classes,)``, ``label_smoothing`` outside
            [0, 1] (torch's constructor checks).
        ValueError, TypeError: bad ``z_loss``, ``softcap`` or ``chunk_size``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            in_features,
            num_classes,
            bias=bias,
            device=device,
            dtype=dtype,
            reduction=reduction,
            weight=weight,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )
        self.z_loss = _checks.check_z_loss(z_loss, _FN)
        self.softcap = _checks.check_softcap(softcap, _FN)
        self.chunk_size = _checks.check_chunk_size(chunk_size, _FN)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """Loss of ``self.linear(input)`` against ``target``; see :func:`linear_cross_entropy`."""
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            **module_options(self, _MODULE_OPTIONS),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, " + options_repr(self, _MODULE_OPTIONS)
        )
