"""The Triton kernels as torch custom ops, with fake (meta) kernels and autograd formulas.

Registered with ``torch.library.custom_op`` so that ``torch.compile(fullgraph=True)`` traces code
calling them without graph breaks: the compiler sees each op as one opaque node whose output
shapes come from the ``register_fake`` functions, and the backward as another op.

Cross entropy (on logits, or fused with the classifier matmul) is split in two layers:

* an op computing per-row statistics of the soft-capped logits ``z``: the row max ``m``,
  ``logsum = log Σ_c exp(z_c - m)`` (so ``lse = m + logsum``), the target logit and the
  class-weighted logit sum (both relative to ``m``); its backward is a kernel that turns the
  statistics' gradients into the logits' (or input's and weight's) gradients;
* :func:`loss_from_stats`, ordinary torch ops on (N,) vectors that build the loss from them
  with the conventions of ``crossent.ops._stats`` (class weights, ignore_index, label
  smoothing, z-loss and the reductions, defined there once for every path), and autograd
  differentiates them. The kernels need to know nothing about reductions.

Nothing here reads tensor values on the host: no ``.item()``, no data-dependent branches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _stats
from .._stats import compute_dtype
from ._runtime import check_runnable, kernels

# --------------------------------------------------------------------------- cross entropy
#
# Statistics per row of the soft-capped logits z (see cross_entropy.py): row_max m (the row max,
# 0 for an all -inf row; no gradient), logsum = log Σ exp(z - m), target logit z_t - m, and
# Σ_c w_c (z_c - m).


def _fake_stats(like: Tensor, n_rows) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = compute_dtype(like.dtype)
    return tuple(like.new_empty((n_rows,), dtype=dtype) for _ in range(4))


@torch.library.custom_op("crossent::ce_stats", mutates_args=())
def ce_stats(
    logits: Tensor,
    target: Tensor,
    class_weight: Tensor | None,
    softcap: float,
    with_smoothing: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(row_max, logsum, target logit, Σ_c w_c z_c) per row of ``z = softcap(logits)``."""
    check_runnable(logits, target, class_weight)
    return kernels("cross_entropy").forward(logits, target, class_weight, softcap, with_smoothing)


@ce_stats.register_fake
def _(logits, target, class_weight, softcap, with_smoothing):
    return _fake_stats(logits, logits.shape[0])


@torch.library.custom_op("crossent::ce_stats_backward", mutates_args=())
def ce_stats_backward(
    logits: Tensor,
    target: Tensor,
    class_weight: Tensor | None,
    row_max: Tensor,
    logsum: Tensor,
    grad_logsum: Tensor,
    grad_target_logit: Tensor,
    grad_smooth: Tensor,
    softcap: float,
    with_smoothing: bool,
) -> Tensor:
    """Gradient w.r.t. ``logits`` from the gradients of the statistics; a new tensor."""
    check_runnable(logits, target, class_weight, row_max, logsum, grad_logsum, grad_target_logit)
    return kernels("cross_entropy").backward(
        logits, target, class_weight, row_max, logsum, grad_logsum, grad_target_logit, grad_smooth,
        softcap, with_smoothing,
    )  # fmt: skip


@ce_stats_backward.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _stat_grads(logsum: Tensor, *grads: Tensor | None) -> tuple[Tensor, ...]:
    """The gradients of the differentiable statistics, zeros for those autograd left None."""
    return tuple(torch.zeros_like(logsum) if g is None else g for g in grads)


def _ce_setup_context(ctx, inputs, output):
    logits, target, class_weight, softcap, with_smoothing = inputs
    row_max, logsum = output[0], output[1]
    ctx.mark_non_differentiable(row_max)
    ctx.save_for_backward(logits, target, class_weight, row_max, logsum)
    ctx.softcap = softcap
    ctx.with_smoothing = with_smoothing


def _ce_backward(ctx, grad_row_max, grad_logsum, grad_target_logit, grad_smooth):
    logits, target, class_weight, row_max, logsum = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grads = _stat_grads(logsum, grad_logsum, grad_target_logit, grad_smooth)
        grad_logits = ce_stats_backward(
            logits, target, class_weight, row_max, logsum, *grads, ctx.softcap, ctx.with_smoothing
        )
    return grad_logits, None, None, None, None


ce_stats.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def _ce_grad_torch(
    logits, logsum, grad_logsum, grad_target_logit, grad_smooth, target, class_weight, row_max,
    softcap, with_smoothing,
):  # fmt: skip
    """What ``ce_stats_backward`` computes, in differentiable torch ops (N x V temporaries)."""
    z = logits.to(logsum.dtype)
    if softcap != 0.0:
        z = softcap * torch.tanh(z / softcap)
    probs = torch.exp((z - row_max[:, None]) - logsum[:, None])
    classes = torch.arange(logits.shape[1], device=logits.device)
    grad = grad_logsum[:, None] * probs
    grad = grad + torch.where(classes == target[:, None], grad_target_logit[:, None], 0.0)
    if with_smoothing:
        w = class_weight.to(logsum.dtype) if class_weight is not None else 1.0
        grad = grad + grad_smooth[:, None] * w
    if softcap != 0.0:
        grad = grad * (1.0 - (z / softcap).square())
    return grad.to(logits.dtype)


def _ce_backward_setup_context(ctx, inputs, output):
    *tensors, softcap, with_smoothing = inputs
    ctx.save_for_backward(*tensors)
    ctx.softcap = softcap
    ctx.with_smoothing = with_smoothing


def _ce_double_backward(ctx, grad_grad_logits):
    """Double backward: differentiate the backward, re-expressed in torch ops.

    Only second order: the results are not differentiable again (a third-order request raises).
    """
    logits, target, class_weight, row_max, logsum, g_logsum, g_zt, g_smooth = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (logits, logsum, g_logsum, g_zt, g_smooth)]
        out = _ce_grad_torch(
            *leaves, target, class_weight, row_max.detach(), ctx.softcap, ctx.with_smoothing
        )
        grads = torch.autograd.grad(out, leaves, grad_grad_logits, allow_unused=True)
    d_logits, d_logsum, d_g_logsum, d_g_zt, d_g_smooth = grads
    return d_logits, None, None, None, d_logsum, d_g_logsum, d_g_zt, d_g_smooth, None, None


ce_stats_backward.register_autograd(_ce_double_backward, setup_context=_ce_backward_setup_context)


# --------------------------------------------------------------------------- linear cross entropy


@torch.library.custom_op("crossent::linear_ce_stats", mutates_args=())
def linear_ce_stats(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    ignore_index: int,
    softcap: float,
    with_smoothing: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics of ``z = softcap(input @ W.T + b)``, without materialising z (N x V)."""
    check_runnable(input, linear_weight, linear_bias, target, class_weight)
    return kernels("linear_cross_entropy").forward(
        input, linear_weight, linear_bias, target, class_weight, softcap, with_smoothing
    )


@linear_ce_stats.register_fake
def _(input, linear_weight, linear_bias, target, class_weight, ignore_index, softcap, smooth):
    return _fake_stats(input, input.shape[0])


@torch.library.custom_op("crossent::linear_ce_stats_backward", mutates_args=())
def linear_ce_stats_backward(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    row_max: Tensor,
    logsum: Tensor,
    grad_logsum: Tensor,
    grad_target_logit: Tensor,
    grad_smooth: Tensor,
    ignore_index: int,
    softcap: float,
    with_smoothing: bool,
    need_grad_input: bool,
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); one not asked for is an empty (0,) tensor."""
    check_runnable(input, linear_weight, linear_bias, target, class_weight, row_max, grad_logsum)
    return kernels("linear_cross_entropy").backward(
        input, linear_weight, linear_bias, target, class_weight, row_max, logsum, grad_logsum,
        grad_target_logit, grad_smooth, ignore_index, softcap, with_smoothing,
        need_grad_input, need_grad_weight, need_grad_bias,
    )  # fmt: skip


@linear_ce_stats_backward.register_fake
def _(input, linear_weight, linear_bias, *args):
    need_grad_input, need_grad_weight, need_grad_bias = args[-3:]
    need_grad_bias = need_grad_bias and linear_bias is not None
    bias_dtype = linear_bias.dtype if linear_bias is not None else compute_dtype(input.dtype)
    return (
        input.new_empty(input.shape if need_grad_input else (0,)),
        linear_weight.new_empty(linear_weight.shape if need_grad_weight else (0,)),
        input.new_empty((linear_weight.shape[0],) if need_grad_bias else (0,), dtype=bias_dtype),
    )


def _lce_setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, class_weight, ignore_index, softcap, smooth = inputs
    row_max, logsum = output[0], output[1]
    ctx.mark_non_differentiable(row_max)
    ctx.save_for_backward(input, linear_weight, linear_bias, target, class_weight, row_max, logsum)
    ctx.ignore_index = ignore_index
    ctx.softcap = softcap
    ctx.with_smoothing = smooth


def _lce_backward(ctx, grad_row_max, grad_logsum, grad_target_logit, grad_smooth):
    input, linear_weight, linear_bias, target, class_weight, row_max, logsum = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    grads: tuple[Tensor | None, ...] = (None, None, None)
    if need_input or need_weight or need_bias:
        grad_input, grad_weight, grad_bias = linear_ce_stats_backward(
            input, linear_weight, linear_bias, target, class_weight, row_max, logsum,
            *_stat_grads(logsum, grad_logsum, grad_target_logit, grad_smooth),
            ctx.ignore_index, ctx.softcap, ctx.with_smoothing, need_input, need_weight, need_bias,
        )  # fmt: skip
        grads = (
            grad_input if need_input else None,
            grad_weight if need_weight else None,
            grad_bias if need_bias and linear_bias is not None else None,
        )
    return (*grads, None, None, None, None, None)


linear_ce_stats.register_autograd(_lce_backward, setup_context=_lce_setup_context)


def loss_from_stats(
    row_max: Tensor,
    logsum: Tensor,
    target_logit: Tensor,
    smooth: Tensor,
    target: Tensor,
    class_weight: Tensor | None,
    *,
    n_classes: int,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    reduction: str,
    out_dtype: torch.dtype,
) -> Tensor:
    """Cross entropy from the kernels' per-row statistics, with torch's conventions.

    The conventions (class weight on the target term, ignore mask, label smoothing, z-loss,
    the 'mean' denominator) are :func:`crossent.ops._stats.loss_from_stats`'s. Here only the
    kernels' side is adapted: the class weight is taken in the statistics' dtype, ignored rows
    read the weight of class 0 (``keep`` then zeroes them), and the result is cast to
    ``out_dtype``. Autograd differentiates these torch ops and hands the backward kernels the
    gradients of ``logsum``, ``target_logit`` and ``smooth``.
    """
    if class_weight is not None:
        class_weight = class_weight.to(logsum.dtype)
    w_t = _stats.target_weight(class_weight, target.clamp(0, max(n_classes - 1, 0)))
    smoothing = label_smoothing > 0.0  # W and the smoothing sum are needed only then
    loss = _stats.loss_from_stats(
        row_max,
        logsum,
        target_logit,
        smooth if smoothing else None,
        target != ignore_index,
        w_t,
        _stats.total_weight(class_weight, n_classes) if smoothing else 0.0,
        n_classes=n_classes,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
    )
    return loss.to(out_dtype)


# --------------------------------------------------------------------------- BCE with logits


@torch.library.custom_op("crossent::bce_with_logits", mutates_args=())
def bce_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
) -> Tensor:
    """Binary cross entropy with logits, fused with its reduction; result in the target dtype."""
    check_runnable(input, target, weight, pos_weight)
    return kernels("bce_with_logits").forward(input, target, weight, pos_weight, reduction)


@bce_with_logits.register_fake
def _(input, target, weight, pos_weight, reduction):
    shape = input.shape if reduction == "none" else ()
    return input.new_empty(shape, dtype=target.dtype)


@torch.library.custom_op("crossent::bce_with_logits_backward", mutates_args=())
def bce_with_logits_backward(
    grad: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
    need_grad_input: bool,
    need_grad_target: bool,
) -> tuple[Tensor, Tensor]:
    """(grad_input, grad_target); one not asked for is an empty (0,) tensor."""
    check_runnable(grad, input, target, weight, pos_weight)
    return kernels("bce_with_logits").backward(
        grad, input, target, weight, pos_weight, reduction, need_grad_input, need_grad_target
    )


@bce_with_logits_backward.register_fake
def _(grad, input, target, weight, pos_weight, reduction, need_grad_input, need_grad_target):
    return (
        input.new_empty(input.shape if need_grad_input else (0,)),
        target.new_empty(target.shape if need_grad_target else (0,)),
    )


def _bce_setup_context(ctx, inputs, output):
    input, target, weight, pos_weight, reduction = inputs
    ctx.save_for_backward(input, target, weight, pos_weight)
    ctx.reduction = reduction


def _bce_backward(ctx, grad):
    input, target, weight, pos_weight = ctx.saved_tensors
    need_input, need_target = ctx.needs_input_grad[:2]
    grad_input = grad_target = None
    if need_input or need_target:
        grad_input, grad_target = bce_with_logits_backward(
            grad, input, target, weight, pos_weight, ctx.reduction, need_input, need_target
        )
    return (
        grad_input if need_input else None,
        grad_target if need_target else None,
        None,
        None,
        None,
    )


bce_with_logits.register_autograd(_bce_backward, setup_context=_bce_setup_context)


def _bce_grads_torch(grad, input, target, weight, pos_weight, reduction, need_input, need_target):
    """What ``bce_with_logits_backward`` computes, in differentiable torch ops."""
    dtype = compute_dtype(input.dtype, target.dtype)
    x, y, g = input.to(dtype), target.to(dtype), grad.to(dtype)
    if reduction == "mean":
        g = g / input.numel()
    if weight is not None:
        g = g * weight.to(dtype)
    p = pos_weight.to(dtype) if pos_weight is not None else None
    outputs = []
    if need_input:
        if p is not None:
            t = p * y
            dx = (t + 1.0 - y) * torch.sigmoid(x) - t
        else:
            dx = torch.sigmoid(x) - y
        outputs.append((dx * g).to(input.dtype))
    if need_target:
        dy = (1.0 - p) * torch.nn.functional.logsigmoid(x) - x if p is not None else -x
        outputs.append((dy * g).to(target.dtype))
    return outputs


def _bce_backward_setup_context(ctx, inputs, output):
    grad, input, target, weight, pos_weight, reduction, need_input, need_target = inputs
    ctx.save_for_backward(grad, input, target, weight, pos_weight)
    ctx.reduction = reduction
    ctx.need = (need_input, need_target)


def _bce_double_backward(ctx, grad_grad_input, grad_grad_target):
    """Double backward through the torch re-expression (second order only, as for CE)."""
    grad, input, target, weight, pos_weight = ctx.saved_tensors
    need_input, need_target = ctx.need
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (grad, input, target)]
        outputs = _bce_grads_torch(
            *leaves, weight, pos_weight, ctx.reduction, need_input, need_target
        )
        upstream = [g for g, need in zip((grad_grad_input, grad_grad_target), ctx.need, strict=True)
                    if need]  # fmt: skip
        pairs = [(o, u) for o, u in zip(outputs, upstream, strict=True) if u is not None]
        grads = (None, None, None)
        if pairs:
            grads = torch.autograd.grad(
                [o for o, _ in pairs], leaves, [u for _, u in pairs], allow_unused=True
            )
    return (*grads, None, None, None, None, None)


bce_with_logits_backward.register_autograd(
    _bce_double_backward, setup_context=_bce_backward_setup_context
)
