"""Portable implementations of the four losses from torch primitives (any device).

Contract of this module:
- reads validated arguments only (``crossent._checks`` has run; nothing here raises for bad
  input), with ``reduction`` already one of ``'none' | 'mean' | 'sum'``;
- never writes into a caller's tensor; in-place ops touch only tensors allocated here;
- never calls torch's own loss functions (``F.cross_entropy``, ``F.nll_loss``, ...): torch is
  the oracle in the tests, so it must not also be the implementation.

Two kinds of code live here. *Composed* functions are plain differentiable torch expressions:
they give double backward, forward-mode AD, ``torch.func`` transforms and ``torch.compile`` for
free. *Functions* (``torch.autograd.Function``) exist where composition cannot match torch or
costs too much: binary cross entropy (torch's gradient is not the derivative of its clamped
forward) and cross entropy with class indices (which saves the per-row log-sum-exp instead of
an N×C log-softmax and recomputes the softmax in backward, in cache-sized row blocks).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of logits processed per block in the cross-entropy fast path are chosen so that one
# block of float32 is about this many bytes: small enough to stay in the L2 cache while it is
# shifted, exponentiated and summed, large enough that the Python loop costs little.
_BLOCK_BYTES = 1 << 20

# torch's clamp of x(1-x) in the BCE gradient is the *float32* constant 1e-12f, which is
# 9.999999960041972e-13 when the arithmetic is in float64.
_BCE_GRAD_EPS = 9.999999960041972e-13


def reduce_loss(loss: Tensor, reduction: str) -> Tensor:
    """Apply ``'none' | 'mean' | 'sum'``; the mean of an empty tensor is NaN, as in torch."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


def _class_view(weight: Tensor, ndim: int) -> Tensor:
    """Shape a (C,) class weight to broadcast along dim 1 of an (N, C, d1, ...) tensor."""
    if ndim <= 1:
        return weight
    return weight.view(1, -1, *([1] * (ndim - 2)))


def _low_precision(t: Tensor) -> bool:
    return t.dtype in (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Binary cross entropy on probabilities.


def _bce_elementwise(x: Tensor, y: Tensor, weight: Tensor | None) -> Tensor:
    # Each log is clamped at -100 *before* it meets y, so x=0, y=0 gives 0 and not 0·(-inf).
    log_x = torch.log(x).clamp_min(-100.0)
    log_1mx = torch.log1p(-x).clamp_min(-100.0)
    loss = (y - 1) * log_1mx - y * log_x
    if weight is not None:
        loss = (loss * weight).to(x.dtype)
    return loss


def _bce_grads(
    grad: Tensor, x: Tensor, y: Tensor, weight: Tensor | None, reduction: str
) -> tuple[Tensor, Tensor]:
    """d(loss)/dx and d(loss)/dy times the upstream gradient, as torch defines them.

    torch's input gradient is g·(x - y) / max((1 - x)·x, 1e-12), not the derivative of the
    clamped forward; in float16 the 1e-12 rounds to 0 and the boundary gradient is ±inf, as in
    torch. The target gradient is g·(log(1 - x) - log(x)) = -g·logit(x), unclamped. Weight and
    the 1/numel of 'mean' are applied last, in torch's order.
    """
    d_x = grad * (x - y) / torch.clamp((1 - x) * x, min=_BCE_GRAD_EPS)
    d_y = grad * (torch.log1p(-x) - torch.log(x))
    if weight is not None:
        d_x = d_x * weight
        d_y = d_y * weight
    if reduction == "mean":
        d_x = d_x / x.numel()
        d_y = d_y / x.numel()
    return d_x, d_y


class BinaryCrossEntropy(torch.autograd.Function):
    """Binary cross entropy with torch's gradients (input and target), double backward
    (the backward is differentiable torch ops) and vmap."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, y: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
        return reduce_loss(_bce_elementwise(x, y, weight), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, y, weight, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(x, y, weight)
        ctx.save_for_forward(x, y, weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, y, weight = ctx.saved_tensors
        d_x, d_y = _bce_grads(grad_output, x, y, weight, ctx.reduction)
        grad_x = d_x.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_y = d_y.to(y.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_y, None, None


class BinaryCrossEntropyWithJvp(BinaryCrossEntropy):
    """Adds forward-mode AD. Kept apart because Dynamo cannot trace a Function with ``jvp``."""

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, y_t: Tensor | None, _w_t, _r):  # type: ignore[override]
        x, y, weight = ctx.saved_tensors
        # The loss is elementwise, so its forward derivative is the backward's per-element
        # gradient (with g = 1 and no 1/numel) dotted with the tangents, then reduced.
        d_x, d_y = _bce_grads(torch.ones_like(x), x, y, weight, "sum")
        tangent = torch.zeros_like(x)
        if x_t is not None:
            tangent = tangent + d_x * x_t
        if y_t is not None:
            tangent = tangent + d_y * y_t
        return reduce_loss(tangent.to(x.dtype), ctx.reduction)


def binary_cross_entropy(x: Tensor, y: Tensor, weight: Tensor | None, reduction: str) -> Tensor:
    if weight is not None:
        weight = weight.expand(y.shape)
    if torch.compiler.is_compiling():
        return BinaryCrossEntropy.apply(x, y, weight, reduction)
    return BinaryCrossEntropyWithJvp.apply(x, y, weight, reduction)


# --------------------------------------------------------------------------------------------
# Binary cross entropy with logits.


def _bce_logits_elementwise(
    x: Tensor, y: Tensor, weight: Tensor | None, pos_weight: Tensor | None
) -> Tensor:
    """``l = (1 - y)·x - (1 + (p - 1)·y)·logsigmoid(x)``, then ``l *= weight``.

    logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)) never overflows, so large logits are safe;
    this is the form torch 2.13 computes (bitwise equal in float64, and op by op in
    float16/bfloat16). The result has the *target's* dtype: torch computes the loss in place
    into a target-dtype tensor.
    """
    log_sig = torch.nn.functional.logsigmoid(x)
    if pos_weight is not None:
        log_weight = (pos_weight - 1) * y + 1
        loss = (1 - y) * x - log_weight * log_sig
    else:
        loss = (1 - y) * x - log_sig
    if weight is not None:
        loss = loss * weight
    return loss.to(y.dtype)


def _bce_logits_grads(
    grad: Tensor,
    x: Tensor,
    y: Tensor,
    weight: Tensor | None,
    pos_weight: Tensor | None,
    reduction: str,
    need: tuple[bool, bool],
) -> tuple[Tensor | None, Tensor | None]:
    """Upstream gradient times d(loss)/dx and d(loss)/dy, in torch's order of operations.

    d/dx = (p·y + 1 - y)·σ(x) - p·y   (σ(x) - y without pos_weight)
    d/dy = logsigmoid(-x) - p·logsigmoid(x)   (-x without pos_weight)
    """
    grad_x = grad_y = None
    if need[0]:
        if pos_weight is not None:
            py = pos_weight * y
            grad_x = (py + 1 - y) * torch.sigmoid(x) - py
        else:
            grad_x = torch.sigmoid(x) - y
        grad_x = grad_x * grad
        if weight is not None:
            grad_x = grad_x * weight
        if reduction == "mean":
            grad_x = grad_x / x.numel()
        grad_x = grad_x.to(x.dtype)
    if need[1]:
        if pos_weight is not None:
            log_sig = torch.nn.functional.logsigmoid
            grad_y = (log_sig(-x) - log_sig(x) * pos_weight) * grad
        else:
            grad_y = -x * grad
        if weight is not None:
            grad_y = grad_y * weight
        if reduction == "mean":
            grad_y = grad_y / y.numel()
        grad_y = grad_y.to(y.dtype)
    return grad_x, grad_y


class BinaryCrossEntropyWithLogits(torch.autograd.Function):
    """BCE with logits with torch's backward formulas (matching it op by op in float16 and
    bfloat16), differentiable backward (double backward) and vmap."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor, y: Tensor, weight: Tensor | None, pos_weight: Tensor | None, reduction: str
    ) -> Tensor:
        return reduce_loss(_bce_logits_elementwise(x, y, weight, pos_weight), reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        x, y, weight, pos_weight, reduction = inputs
        ctx.reduction = reduction
        ctx.save_for_backward(x, y, weight, pos_weight)
        ctx.save_for_forward(x, y, weight, pos_weight)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        x, y, weight, pos_weight = ctx.saved_tensors
        grad_x, grad_y = _bce_logits_grads(
            grad_output, x, y, weight, pos_weight, ctx.reduction, tuple(ctx.needs_input_grad[:2])
        )
        return grad_x, grad_y, None, None, None


class BinaryCrossEntropyWithLogitsJvp(BinaryCrossEntropyWithLogits):
    """Adds forward-mode AD (Dynamo cannot trace a Function with ``jvp``)."""

    @staticmethod
    def jvp(ctx, x_t, y_t, _w_t, _p_t, _r):  # type: ignore[override]
        x, y, weight, pos_weight = ctx.saved_tensors
        d_x, d_y = _bce_logits_grads(
            torch.ones((), dtype=y.dtype), x, y, weight, pos_weight, "sum", (True, True)
        )
        tangent = torch.zeros(x.shape, dtype=y.dtype, device=x.device)
        if x_t is not None:
            tangent = tangent + d_x * x_t
        if y_t is not None:
            tangent = tangent + d_y * y_t
        return reduce_loss(tangent.to(y.dtype), ctx.reduction)


def binary_cross_entropy_with_logits(
    x: Tensor, y: Tensor, weight: Tensor | None, pos_weight: Tensor | None, reduction: str
) -> Tensor:
    fn = BinaryCrossEntropyWithLogits
    if not torch.compiler.is_compiling():
        fn = BinaryCrossEntropyWithLogitsJvp
    return fn.apply(x, y, weight, pos_weight, reduction)


# --------------------------------------------------------------------------------------------
# Negative log likelihood (composed: gather is linear, so autograd gives torch's scatter).


def _safe_target(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(target as int64 with ignored entries replaced by class 0, mask of kept entries)."""
    t = target.long()
    keep = t != ignore_index
    return torch.where(keep, t, 0), keep


def _kept_weight_sum(keep: Tensor, w_t: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Σ w[t_i] over kept rows (their count without a weight): the 'mean' denominator."""
    if w_t is None:
        return keep.sum().to(dtype)
    return torch.where(keep, w_t, 0.0).sum()


def nll_loss(
    log_probs: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, reduction: str
) -> Tensor:
    """``l_i = -w[t_i]·x[i, t_i]`` (0 where ignored); mean divides by Σ w[t_i] over kept i."""
    class_dim = 0 if log_probs.dim() == 1 else 1
    if log_probs.dim() == 1:
        target = target.reshape(())
    safe, keep = _safe_target(target, ignore_index)
    picked = log_probs.gather(class_dim, safe.unsqueeze(class_dim)).squeeze(class_dim)
    w_t = None if weight is None else weight[safe]
    loss = torch.where(keep, -picked if w_t is None else -(w_t * picked), 0.0)
    total_weight = _kept_weight_sum(keep, w_t, log_probs.dtype)
    if reduction == "none":
        return loss.to(log_probs.dtype)
    # Reduce in float32 for float16/bfloat16 (torch accumulates in its accscalar type).
    acc = torch.float32 if _low_precision(log_probs) else log_probs.dtype
    if reduction == "sum":
        return loss.to(acc).sum().to(log_probs.dtype)
    return (loss.to(acc).sum() / total_weight.to(acc)).to(log_probs.dtype)


# --------------------------------------------------------------------------------------------
# Cross entropy with probability targets (composed; target and weight are differentiable).


def cross_entropy_probs(
    logits: Tensor, target: Tensor, weight: Tensor | None, label_smoothing: float, reduction: str
) -> Tensor:
    """``l_n = -Σ_c w_c·y'_{n,c}·log_softmax(x)_{n,c}`` with ``y' = y(1-ε) + ε/C``.

    'mean' divides by N·d1…dk (the number of rows), *not* by the weights: the fine print where
    probability targets and index targets differ (pytorch#61309).
    """
    class_dim = 0 if logits.dim() == 1 else 1
    n_classes = logits.shape[class_dim]
    log_probs = torch.log_softmax(logits, class_dim)
    if label_smoothing > 0.0:
        target = target * (1 - label_smoothing) + label_smoothing / n_classes
    terms = log_probs * target
    if weight is not None:
        terms = terms * _class_view(weight, logits.dim())
    if reduction == "none":
        return -terms.sum(class_dim)
    if reduction == "sum":
        return -terms.sum()
    if logits.numel() == 0:
        return -terms.sum() * float("nan")
    return -terms.sum() / (logits.numel() // n_classes)


# --------------------------------------------------------------------------------------------
# Cross entropy with class indices.


def cross_entropy_index_composed(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> Tensor:
    """Differentiable composition (double backward, forward AD, torch.func, torch.compile).

    ``l_i = (1-ε)·(-w_{t_i}·lp_{i,t_i}) + (ε/C)·(-Σ_c w_c·lp_{i,c})`` for kept rows, 0 for
    ignored rows, with ``lp = log_softmax(x)``; 'mean' divides *both* terms by Σ w_{t_i} over
    kept rows.
    """
    class_dim = 0 if logits.dim() == 1 else 1
    log_probs = torch.log_softmax(logits, class_dim)
    nll = nll_loss(log_probs, target, weight, ignore_index, reduction)
    if label_smoothing <= 0.0:
        return nll
    n_classes = logits.shape[class_dim]
    if logits.dim() == 1:
        target = target.reshape(())
    safe, keep = _safe_target(target, ignore_index)
    terms = log_probs if weight is None else log_probs * _class_view(weight, logits.dim())
    smooth = torch.where(keep, -terms.sum(class_dim), 0.0)
    if reduction == "none":
        smooth_red = smooth
    elif reduction == "sum":
        smooth_red = smooth.sum()
    else:
        w_t = None if weight is None else weight[safe]
        smooth_red = smooth.sum() / _kept_weight_sum(keep, w_t, logits.dtype)
    return ((1 - label_smoothing) * nll + (label_smoothing / n_classes) * smooth_red).to(
        logits.dtype
    )


def _row_blocks(logits: Tensor) -> tuple[range, int]:
    """Start offsets of row blocks along dim 0 sized to about ``_BLOCK_BYTES`` of float32."""
    n = logits.shape[0]
    per_row = max(1, logits[:1].numel()) * 4
    rows = max(1, _BLOCK_BYTES // per_row)
    return range(0, n, rows), rows


class CrossEntropyIndex(torch.autograd.Function):
    """Cross entropy on (N, C, d1, ...) logits and (N, d1, ...) class indices.

    Forward runs torch's fused log-softmax on one cache-sized block of rows at a time into a
    reused scratch buffer and keeps only what the loss needs (the target's log-probability and,
    with smoothing, the weighted row sum): no N×C tensor survives the forward. Backward
    recomputes the softmax block by block straight into the gradient it returns, then scales it
    and subtracts the one-hot term in place, while the block is still in cache. Statistics are
    float32 for float16/bfloat16 logits. With ``create_graph=True`` the backward switches to
    differentiable ops, so double backward is exact.
    """

    @staticmethod
    def forward(
        logits: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        reduction: str,
    ) -> tuple[Tensor, Tensor]:
        safe, keep = _safe_target(target, ignore_index)
        stat_dtype = torch.float32 if _low_precision(logits) else logits.dtype
        w_stat = None if weight is None else weight.to(stat_dtype)
        picked = torch.empty(safe.shape, dtype=stat_dtype, device=logits.device)  # lp[i, t_i]
        # smooth_i = -Σ_c w_c·lp[i, c]
        smooth = torch.empty_like(picked) if label_smoothing > 0.0 else None
        starts, rows = _row_blocks(logits)
        scratch = logits.new_empty(
            (min(rows, logits.shape[0]), *logits.shape[1:]), dtype=stat_dtype
        )
        for start in starts:
            stop = start + rows
            block = logits[start:stop]
            log_probs = scratch[: block.shape[0]]
            torch.log_softmax(block, 1, dtype=stat_dtype, out=log_probs)
            picked[start:stop] = log_probs.gather(1, safe[start:stop].unsqueeze(1)).squeeze(1)
            if smooth is not None:
                if w_stat is None:
                    torch.sum(log_probs, 1, out=smooth[start:stop])
                elif log_probs.dim() == 2:
                    torch.mv(log_probs, w_stat, out=smooth[start:stop])
                else:
                    torch.sum(
                        log_probs * _class_view(w_stat, log_probs.dim()), 1, out=smooth[start:stop]
                    )
        w_t = None if w_stat is None else w_stat[safe]
        nll = -picked if w_t is None else -(w_t * picked)
        loss = torch.where(keep, nll, 0.0)
        if smooth is not None:
            n_classes = logits.shape[1]
            loss = (1 - label_smoothing) * loss + (label_smoothing / n_classes) * torch.where(
                keep, -smooth, 0.0
            )
        denom = _kept_weight_sum(keep, w_t, stat_dtype)
        if reduction == "none":
            out = loss
        elif reduction == "sum":
            out = loss.sum()
        else:
            out = loss.sum() / denom
        return out.to(logits.dtype), denom

    @staticmethod
    def setup_context(ctx, inputs, output):  # type: ignore[override]
        logits, target, weight, ignore_index, label_smoothing, reduction = inputs
        _, denom = output
        ctx.ignore_index = ignore_index
        ctx.label_smoothing = label_smoothing
        ctx.reduction = reduction
        ctx.save_for_backward(logits, target, weight, denom)
        ctx.mark_non_differentiable(denom)

    @staticmethod
    def backward(ctx, grad_output: Tensor, _grad_denom):  # type: ignore[override]
        logits, target, weight, denom = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        eps, reduction = ctx.label_smoothing, ctx.reduction
        n_classes = logits.shape[1]
        safe, keep = _safe_target(target, ctx.ignore_index)
        stat_dtype = denom.dtype
        # Per-row upstream gradient (N, d...), zero (not multiplied) on ignored rows so that an
        # all-ignored mean (denominator 0) gives zero gradients rather than 0·inf.
        g = grad_output.to(stat_dtype)
        if reduction == "mean":
            g = g / denom
        g = torch.where(keep, g.expand(keep.shape), 0.0)
        w_stat = None if weight is None else weight.to(stat_dtype)
        w_t = torch.ones_like(g) if w_stat is None else w_stat[safe]
        total_w = float(n_classes) if w_stat is None else w_stat.sum()
        # d l_i / d x_ij = (1-ε)·w_t·(p_j - [j = t]) + (ε/C)·(p_j·W - w_j)
        p_coef = (g * ((1 - eps) * w_t + (eps / n_classes) * total_w)).unsqueeze(1)  # times p_j
        t_coef = (-(g * (1 - eps) * w_t)).unsqueeze(1)  # added at j = t
        w_coef = (g * (eps / n_classes)).unsqueeze(1)  # times -w_j (only with smoothing)
        index = safe.unsqueeze(1)

        if torch.is_grad_enabled():  # create_graph: differentiable recomputation
            x = logits.to(stat_dtype)
            grad = torch.softmax(x, 1) * p_coef
            grad = grad.scatter_add(1, index, t_coef)
            if eps > 0.0:
                w_row = 1.0 if w_stat is None else _class_view(w_stat, x.dim())
                grad = grad - w_row * w_coef
            return grad.to(logits.dtype), None, None, None, None, None

        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        starts, rows = _row_blocks(logits)
        scratch = None
        if grad.dtype != stat_dtype:
            scratch = logits.new_empty(
                (min(rows, logits.shape[0]), *logits.shape[1:]), dtype=stat_dtype
            )
        for start in starts:
            stop = start + rows
            block = logits[start:stop]
            out = grad[start:stop]
            work = out if scratch is None else scratch[: block.shape[0]]
            torch.softmax(block, 1, dtype=stat_dtype, out=work)
            work.mul_(p_coef[start:stop])
            work.scatter_add_(1, index[start:stop], t_coef[start:stop])
            if eps > 0.0:
                if w_stat is None:
                    work.sub_(w_coef[start:stop])
                elif work.dim() == 2:
                    work.addr_(w_coef[start:stop].squeeze(1), w_stat, alpha=-1)
                else:
                    work.sub_(w_coef[start:stop] * _class_view(w_stat, work.dim()))
            if scratch is not None:
                out.copy_(work)
        return grad, None, None, None, None, None


def cross_entropy_index(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> Tensor:
    """Index-target cross entropy; the fast Function unless a transform needs composition."""
    if _needs_composition(logits):
        return cross_entropy_index_composed(
            logits, target, weight, ignore_index, label_smoothing, reduction
        )
    unbatched = logits.dim() == 1
    if unbatched:
        logits, target = logits.unsqueeze(0), target.reshape(1)
    loss, _ = CrossEntropyIndex.apply(
        logits, target, weight, ignore_index, label_smoothing, reduction
    )
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    return loss


def _needs_composition(t: Tensor) -> bool:
    """Forward-mode AD, torch.func transforms and torch.compile take the composed path."""
    if torch.compiler.is_compiling():
        return True
    if torch._C._are_functorch_transforms_active():
        return True
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None
