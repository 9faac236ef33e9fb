"""Exact losses on logits sharded on the class dimension that have no vocab-parallel function:
NLL on log-probabilities and cross entropy with probability targets (``crossent._dtensor``
routes DTensor calls here). Both return ``None`` for a layout they do not take.

* ``nll_loss``: each rank picks ``-w_t x_t`` for the targets in its classes; the rows are summed
  over the mesh (a ``Partial()`` DTensor redistributed to ``Replicate()``, differentiable).
* ``probability_cross_entropy``: per row ``Σ_c w_c y'_c (m - x_c) + log(Σ_c e^(x_c - m))·Σ_c
  w_c y'_c`` with ``y' = (1-ε) y + ε/C``, from one all-reduce MAX of the row maxima ``m`` and
  one all-reduce SUM of three numbers per row; the result is replicated.

Shards follow DTensor's ``Shard`` layout (``torch.chunk``): rank ``r`` of ``n`` holds classes
``[r·⌈C/n⌉, (r+1)·⌈C/n⌉) ∩ [0, C)``.
"""

from __future__ import annotations

import math

import torch

from crossent import _dtensor as _layouts

__all__ = ["nll_loss", "probability_cross_entropy"]


def _chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of part ``index`` of ``torch.chunk`` (DTensor's ``Shard`` layout)."""
    step = -(-size // parts) if size else 0
    lo = min(index * step, size)
    return lo, min(lo + step, size)


def nll_loss(input, target, weight, ignore_index, reduction):
    """NLL of class-index targets on log-probabilities sharded on the class dimension
    (target and class weight replicated); the result is replicated."""
    from torch.distributed.tensor import Partial, Replicate

    from crossent import _checks
    from crossent.ops import _stats

    ignore = _checks.check_ignore_index(ignore_index, "nll_loss_nd")
    mesh, class_dim = input.device_mesh, _layouts._class_dim(input)
    n_classes = input.shape[class_dim]
    lo, hi = _chunk_bounds(n_classes, mesh.size(), mesh.get_local_rank())
    local = input.to_local().movedim(class_dim, -1)
    t, w = _layouts._local(target), _layouts._local(weight)
    if local.shape[-1] != hi - lo or tuple(t.shape) != tuple(local.shape[:-1]):
        return None  # not torch.chunk's layout, or a shape torch will word the error for
    _checks.check_index_target_dtype(t)
    _checks.check_class_weight(w, n_classes, input.dtype)
    _checks.check_target_range(t, n_classes, ignore)
    t = t.long()
    keep = t != ignore
    mine = keep & (t >= lo) & (t < hi)
    if hi > lo:
        index = (t - lo).clamp(0, hi - lo - 1).unsqueeze(-1)
        picked = torch.where(mine, -local.gather(-1, index).squeeze(-1), 0.0)
    else:
        picked = local.sum(-1) * 0.0
    safe = torch.where(keep, t, 0)
    w_t = None if w is None else w[safe]
    if w_t is not None:
        picked = picked * w_t
    rows = _layouts._wrap(picked, mesh, [Partial()], t.shape).redistribute(mesh, [Replicate()])
    rows = rows.to_local()
    if reduction == "none":
        loss = rows
    else:
        loss = rows.sum()
        if reduction == "mean":
            keep_flat = keep.reshape(-1)
            w_flat = None if w_t is None else w_t.reshape(-1)
            loss = loss / _stats.mean_denominator(
                keep_flat, w_flat, n_rows=t.numel(), dtype=loss.dtype, device=loss.device
            )
    return _layouts._wrap(loss, mesh, [Replicate()], loss.shape)


def probability_cross_entropy(input, target, weight, reduction, label_smoothing, ignore_index):
    """Probability targets on logits sharded on the class dimension (the target sharded alike,
    or replicated): ``Σ_c w_c y'_c (m - x_c) + log(Σ_c e^(x_c - m))·Σ_c w_c y'_c`` per row, from
    one all-reduce MAX of the row maxima ``m`` and one all-reduce SUM of three numbers per row."""
    from torch.distributed.tensor import Partial, Replicate

    from crossent import _checks
    from crossent.ops import _stats

    if not _layouts._is_dtensor(input) or _layouts._shard_dim(input) != _layouts._class_dim(input):
        return None
    mesh, class_dim = input.device_mesh, _layouts._class_dim(input)
    if (
        _layouts._is_dtensor(target)
        and target.device_mesh == mesh
        and target.placements == input.placements
    ):
        y = target.to_local()
    elif _layouts._replicated(target, mesh):
        y = None
    else:
        return None
    if not _layouts._replicated(weight, mesh):
        return None
    ignore = _checks.check_ignore_index(ignore_index, "cross_entropy_loss")
    _checks.check_cross_entropy_prob(input, target, _layouts._local(weight), ignore)
    eps = _checks.check_label_smoothing(label_smoothing)
    n_classes = input.shape[class_dim]
    lo, hi = _chunk_bounds(n_classes, mesh.size(), mesh.get_local_rank())
    x = input.to_local()
    if x.shape[class_dim] != hi - lo:
        return None  # not torch.chunk's layout
    if y is None:
        y = _layouts._local(target).narrow(class_dim, lo, hi - lo)
    dtype = _stats.compute_dtype(x.dtype)
    x, y = x.movedim(class_dim, -1).to(dtype), y.movedim(class_dim, -1).to(dtype)
    if eps > 0:
        y = (1.0 - eps) * y + eps / n_classes
    w = _layouts._local(weight)
    wy = y if w is None else y * w[lo:hi].to(dtype)
    rows = tuple(x.shape[:-1])
    row_max = x.detach().amax(-1) if hi > lo else x.new_full(rows, -math.inf).detach()
    torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group())
    shift = torch.where(row_max.isfinite(), row_max, 0.0)
    gap = shift.unsqueeze(-1) - x
    local = torch.stack([gap.neg().exp().sum(-1), wy.sum(-1), (wy * gap).sum(-1)])
    # (3, *rows): this rank's part of Σ e^(x - m), Σ w y' and Σ w y' (m - x)
    sums = _layouts._wrap(local, mesh, [Partial()], local.shape).redistribute(mesh, [Replicate()])
    sumexp, target_weight, weighted_gap = sums.to_local().unbind(0)
    loss = weighted_gap + sumexp.log() * target_weight  # Σ w y' (lse - x), lse = m + log Σ e^(x-m)
    if reduction != "none":
        loss = loss.sum() if reduction == "sum" else loss.sum() / math.prod(rows)
    loss = loss.to(input.dtype)
    return _layouts._wrap(loss, mesh, [Replicate()], loss.shape)
