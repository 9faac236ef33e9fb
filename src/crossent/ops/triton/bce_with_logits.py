# Binary cross entropy with logits: fused elementwise loss + reduction, and its backward.
# - reads:  input and target (contiguous, same shape, any float dtypes); optional weight and
#           pos_weight given as broadcast views of the input shape (stride 0 where broadcast, never
#           materialised); the backward also reads the upstream gradient, a view of the same kind.
# - writes: forward: the elementwise loss ('none', in the target dtype) or one partial sum per
#           program ('mean'/'sum', summed on the host in a fixed order: deterministic). Backward:
#           NEW gradient tensors w.r.t. input (input dtype) and/or target (target dtype).
# - assumes: shapes were validated and broadcast by the caller; the dims of all operands were
#           coalesced on the host to at most 4, so a broadcast operand costs one div/mod per
#           coalesced dim; 64-bit element offsets only when numel >= 2**31.
"""Triton kernels for ``binary_cross_entropy_with_logits``, following torch 2.13's formula::

    lw = 1 + (pos_weight - 1) * y                 (lw = 1 without pos_weight)
    l  = ((1 - y) * x - lw * logsigmoid(x)) * weight
    logsigmoid(x) = min(x, 0) - log1p(exp(-|x|))

and its gradients (``t = pos_weight * y``)::

    dl/dx = ((t + 1 - y) * sigmoid(x) - t) * weight       (sigmoid(x) - y without pos_weight)
    dl/dy = ((1 - pos_weight) * logsigmoid(x) - x) * weight   (-x without pos_weight)

Statistics are computed in float32 (float64 if the input or target is float64).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._stats import compute_dtype
from ._launch import bce_block
from ._runtime import tl_dtype


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0, accurate for tiny u (core Triton has no log1p).

    Goldberg's trick: with v = 1 + u rounded, log(v) * u / (v - 1) cancels the rounding of v.
    """
    v = 1.0 + u
    return tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))


@triton.jit
def _logsigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), finite for all finite x."""
    return tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _broadcast_offsets(offs, size1, size2, size3, s0, s1, s2, s3, NDIM: tl.constexpr):
    """Element offsets of a broadcast operand.

    ``offs`` indexes a contiguous tensor of shape (size0, size1, size2, size3), of which only the
    last NDIM dims are real (the rest have size 1); s0..s3 are the operand's strides.
    """
    if NDIM == 1:
        return offs * s3
    elif NDIM == 2:
        return (offs // size3) * s2 + (offs % size3) * s3
    elif NDIM == 3:
        rest = offs // size3
        return (rest // size2) * s1 + (rest % size2) * s2 + (offs % size3) * s3
    else:
        rest = offs // size3
        rest2 = rest // size2
        return (
            (rest2 // size1) * s0 + (rest2 % size1) * s1 + (rest % size2) * s2 + (offs % size3) * s3
        )


@triton.jit
def _load_block(
    x_ptr, y_ptr, numel, INDEX_64: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr
):
    """(offsets, mask, x, y) of this program's BLOCK elements, x and y in COMPUTE precision."""
    pid = tl.program_id(0)
    if INDEX_64:
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    return offs, mask, x, y


@triton.jit
def _load_broadcast(
    ptr, offs, mask, other, size1, size2, size3, s0, s1, s2, s3,
    NDIM: tl.constexpr, COMPUTE: tl.constexpr,
):  # fmt: skip
    """A broadcast operand (strides s0..s3, see :func:`_broadcast_offsets`) at ``offs``, in
    COMPUTE precision; ``other`` in masked lanes."""
    elem = _broadcast_offsets(offs, size1, size2, size3, s0, s1, s2, s3, NDIM)
    return tl.load(ptr + elem, mask=mask, other=other).to(COMPUTE)


@triton.jit
def _forward_kernel(
    x_ptr, y_ptr, weight_ptr, pos_weight_ptr,
    out_ptr,  # (numel,) for 'none', else one partial sum per program
    numel, size1, size2, size3,  # the coalesced shape (size0 implied)
    w_s0, w_s1, w_s2, w_s3,  # weight strides
    p_s0, p_s1, p_s2, p_s3,  # pos_weight strides
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr,
    NDIM: tl.constexpr, INDEX_64: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, x, y = _load_block(x_ptr, y_ptr, numel, INDEX_64, COMPUTE, BLOCK)
    log_sig = _logsigmoid(x)
    if HAS_POS_WEIGHT:
        pos_weight = _load_broadcast(
            pos_weight_ptr, offs, mask, 1.0, size1, size2, size3, p_s0, p_s1, p_s2, p_s3,
            NDIM, COMPUTE,
        )  # fmt: skip
        log_weight = (pos_weight - 1.0) * y + 1.0
        loss = (1.0 - y) * x - log_weight * log_sig
    else:
        loss = (1.0 - y) * x - log_sig
    if HAS_WEIGHT:
        loss = loss * _load_broadcast(
            weight_ptr, offs, mask, 0.0, size1, size2, size3, w_s0, w_s1, w_s2, w_s3,
            NDIM, COMPUTE,
        )  # fmt: skip
    if REDUCE:
        tl.store(out_ptr + tl.program_id(0), tl.sum(tl.where(mask, loss, 0.0), 0))
    else:
        tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    x_ptr, y_ptr, weight_ptr, pos_weight_ptr, grad_ptr,
    grad_x_ptr, grad_y_ptr,  # outputs
    numel, size1, size2, size3,  # the coalesced shape (size0 implied)
    w_s0, w_s1, w_s2, w_s3,  # weight strides
    p_s0, p_s1, p_s2, p_s3,  # pos_weight strides
    g_s0, g_s1, g_s2, g_s3,  # upstream gradient strides
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, NEED_GRAD_X: tl.constexpr,
    NEED_GRAD_Y: tl.constexpr, NDIM: tl.constexpr, INDEX_64: tl.constexpr, COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, x, y = _load_block(x_ptr, y_ptr, numel, INDEX_64, COMPUTE, BLOCK)
    g = _load_broadcast(
        grad_ptr, offs, mask, 0.0, size1, size2, size3, g_s0, g_s1, g_s2, g_s3, NDIM, COMPUTE
    )
    if HAS_WEIGHT:
        g = g * _load_broadcast(
            weight_ptr, offs, mask, 0.0, size1, size2, size3, w_s0, w_s1, w_s2, w_s3,
            NDIM, COMPUTE,
        )  # fmt: skip
    if HAS_POS_WEIGHT:
        pos_weight = _load_broadcast(
            pos_weight_ptr, offs, mask, 1.0, size1, size2, size3, p_s0, p_s1, p_s2, p_s3,
            NDIM, COMPUTE,
        )  # fmt: skip
    if NEED_GRAD_X:
        sig = 1.0 / (1.0 + tl.exp(-x))
        if HAS_POS_WEIGHT:
            t = pos_weight * y
            dx = (t + 1.0 - y) * sig - t
        else:
            dx = sig - y
        tl.store(grad_x_ptr + offs, (dx * g).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_GRAD_Y:
        if HAS_POS_WEIGHT:
            dy = (1.0 - pos_weight) * _logsigmoid(x) - x
        else:
            dy = -x
        tl.store(grad_y_ptr + offs, (dy * g).to(grad_y_ptr.dtype.element_ty), mask=mask)


def coalesce(
    shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims that every operand walks contiguously (TensorIterator's trick).

    Dims ``i`` and ``i+1`` merge when, for every operand, ``stride[i] == stride[i+1] * size[i+1]``
    (true for contiguous operands and for dims broadcast in both). Size-1 dims are dropped.

    Args:
        shape: the common (input) shape.
        strides: one stride tuple per operand, each of ``len(shape)``.

    Returns:
        (sizes, per-operand strides) with at least one dim.
    """
    dims = [i for i, n in enumerate(shape) if n != 1]
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    for i in dims:
        if sizes and all(m[-1] == st[i] * shape[i] for m, st in zip(merged, strides, strict=True)):
            sizes[-1] *= shape[i]
            for m, st in zip(merged, strides, strict=True):
                m[-1] = st[i]
        else:
            sizes.append(shape[i])
            for m, st in zip(merged, strides, strict=True):
                m.append(st[i])
    if not sizes:
        return [1], [[0] for _ in strides]
    return sizes, merged


def _layout(shape: torch.Size, operands: list[torch.Tensor | None]) -> tuple[list, int, list]:
    """(sizes padded to 4, NDIM, per-operand strides padded to 4) for the kernels."""
    present = [op for op in operands if op is not None]
    sizes, merged = coalesce(tuple(shape), [tuple(op.stride()) for op in present])
    if len(sizes) > 4:
        return [], 0, []  # caller makes the operands contiguous and retries
    pad = 4 - len(sizes)
    sizes4 = [1] * pad + sizes
    it = iter([[0] * pad + m for m in merged])
    strides = [next(it) if op is not None else [0, 0, 0, 0] for op in operands]
    return sizes4, len(sizes), strides


def _prepare(
    input: torch.Tensor, operands: list[torch.Tensor | None]
) -> tuple[list, int, list, list[torch.Tensor | None]]:
    """Broadcast ``operands`` to the input's shape as views and lay them out for the kernels."""
    shape = input.shape
    views = [op.expand(shape) if op is not None else None for op in operands]
    sizes, ndim, strides = _layout(shape, views)
    if ndim == 0:  # more than 4 dims left after coalescing: materialise (rare: odd strides)
        views = [v.contiguous() if v is not None else None for v in views]
        sizes, ndim, strides = _layout(shape, views)
    return sizes, ndim, strides, views


def _needs_index_64(numel: int, block: int, views: list[torch.Tensor | None]) -> bool:
    """Whether element offsets can reach 2**31 (then the kernels index in int64)."""
    extents = [
        sum((n - 1) * st for n, st in zip(v.shape, v.stride(), strict=True))
        for v in views
        if v is not None
    ]
    return numel + block >= 2**31 or any(e >= 2**31 for e in extents)


def _launch(
    kernel,
    x: torch.Tensor,
    y: torch.Tensor,
    operands: list[torch.Tensor | None],
    outputs: tuple[torch.Tensor, ...],
    compute: torch.dtype,
    **flags: bool,
) -> None:
    """Run ``kernel`` (either of the two above) over the contiguous ``x`` and ``y``.

    ``operands`` (weight, pos_weight, and for the backward the upstream gradient) are broadcast
    to the input shape as views; ``outputs`` follow them among the kernel's arguments, ``flags``
    are the kernel's own constexprs (REDUCE, NEED_GRAD_*).
    """
    numel = x.numel()
    sizes, ndim, strides, views = _prepare(x, operands)
    w, p = views[0], views[1]
    block, num_warps = bce_block()
    kernel[(triton.cdiv(numel, block),)](
        x,
        y,
        w if w is not None else x,
        p if p is not None else x,
        *views[2:],
        *outputs,
        numel,
        *sizes[1:],
        *(stride for operand_strides in strides for stride in operand_strides),
        HAS_WEIGHT=w is not None,
        HAS_POS_WEIGHT=p is not None,
        NDIM=ndim,
        INDEX_64=_needs_index_64(numel, block, views),
        COMPUTE=tl_dtype(compute),
        BLOCK=block,
        num_warps=num_warps,
        **flags,
    )


def forward(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
) -> torch.Tensor:
    """The loss: elementwise ('none', input shape) or reduced ('mean', 'sum'; 0-d).

    Returns:
        A tensor in the target dtype (torch's quirk).
    """
    x = input.contiguous()
    y = target.contiguous()
    numel = x.numel()
    stats_dtype = compute_dtype(input.dtype, target.dtype)
    if numel == 0:
        if reduction == "none":
            return torch.empty(input.shape, dtype=target.dtype, device=input.device)
        total = torch.zeros((), dtype=stats_dtype, device=input.device)
        return (total / 0.0 if reduction == "mean" else total).to(target.dtype)
    if reduction == "none":
        out = torch.empty(input.shape, dtype=target.dtype, device=input.device)
    else:  # one partial sum per program
        n_programs = triton.cdiv(numel, bce_block()[0])
        out = torch.empty(n_programs, dtype=stats_dtype, device=input.device)
    flags = dict(REDUCE=reduction != "none")
    _launch(_forward_kernel, x, y, [weight, pos_weight], (out,), stats_dtype, **flags)
    if reduction == "none":
        return out
    total = out.sum()
    if reduction == "mean":
        total = total / numel
    return total.to(target.dtype)


def backward(
    grad: torch.Tensor,
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: str,
    need_grad_input: bool,
    need_grad_target: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. input and target; one not asked for comes back as an empty (0,) tensor.

    Args:
        grad: upstream gradient, input-shaped for 'none', 0-d otherwise.

    Returns:
        (grad_input in the input dtype, grad_target in the target dtype), both input-shaped.
    """
    x = input.contiguous()
    y = target.contiguous()
    numel = x.numel()
    device = input.device
    grad_x = torch.empty(input.shape if need_grad_input else (0,), dtype=input.dtype, device=device)
    grad_y = torch.empty(
        target.shape if need_grad_target else (0,), dtype=target.dtype, device=device
    )
    if numel == 0 or not (need_grad_input or need_grad_target):
        return grad_x, grad_y
    if reduction == "mean":
        grad = grad / numel
    _launch(
        _backward_kernel, x, y, [weight, pos_weight, grad], (grad_x, grad_y),
        compute_dtype(input.dtype, target.dtype),
        NEED_GRAD_X=need_grad_input, NEED_GRAD_Y=need_grad_target,
    )  # fmt: skip
    return grad_x, grad_y
