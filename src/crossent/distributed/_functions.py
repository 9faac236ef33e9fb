"""The math of both vocab-parallel losses: shard statistics, their combination, the gradient.

Each rank computes per-token statistics of its shard in chunks of tokens, and the group combines
them (one all-reduce MAX, one all-reduce SUM) into the statistics of the whole vocabulary, named
and signed as in the glossary of :mod:`crossent.ops._stats`: ``row_max``, ``logsum``,
``target_logit`` (``z_t - row_max``) and the smoothing sum ``smooth``. The loss, the 'mean'
denominator and the per-row gradient coefficients then come from ``crossent.ops._stats``, the
one home of those conventions. The backward of the logits loss is local; the linear loss
recomputes each chunk's logits and all-reduces the gradient of its replicated input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from crossent._checks import Reduction
from crossent._checks.distributed import Options
from crossent.distributed._agreement import Layout
from crossent.ops import _budget, _stats


@dataclass
class Plan:
    """Everything the autograd Functions need besides the differentiable tensors."""

    group: dist.ProcessGroup
    reduction: Reduction
    label_smoothing: float
    z_loss: float
    vocab: float | Tensor  # V in the compute dtype (0-d tensor if the layout is unchecked)
    compute_dtype: torch.dtype
    rows_per_chunk: int
    keep: Tensor  # (N,) bool: target != ignore_index
    local_target: Tensor  # (N, 1) int64: target - offset where this shard owns it, else 0
    owns_target: Tensor  # (N,) bool: kept and the target class lives in this shard
    target_weight: Tensor | None  # (N,) w_t in the compute dtype (of class 0 where ignored)
    shard_weight: Tensor | None  # (V_r,) class weights of this shard's classes
    total_weight: float | Tensor  # W = Σ_c w_c over the global vocabulary (V without weight)
    shard_total_weight: float | Tensor  # W_r = Σ_c w_c over this shard (V_r without weight)

    @staticmethod
    def build(
        group: dist.ProcessGroup,
        layout: Layout,
        opts: Options,
        target: Tensor,
        weight: Tensor | None,
        dtype: torch.dtype,
        logits_shape: tuple[int, int],
    ) -> Plan:
        n_rows, shard_size = logits_shape
        compute_dtype = _stats.compute_dtype(dtype)
        target = target.long()
        keep = target != opts.ignore_index
        local = target - layout.offset
        owns = keep & (local >= 0) & (local < shard_size)
        local_target = torch.where(owns, local, 0).unsqueeze(1)
        vocab = layout.vocab
        if isinstance(vocab, Tensor):
            vocab = vocab.to(compute_dtype)
        if weight is None:  # W = V, kept as given: a 0-d tensor when unchecked (no host sync)
            target_weight = shard_weight = None
            total_weight, shard_total_weight = vocab, float(shard_size)
        else:
            weight = weight.to(compute_dtype)
            target_weight = _stats.target_weight(weight, torch.where(keep, target, 0))
            columns = torch.arange(shard_size, device=weight.device) + layout.offset
            shard_weight = weight.index_select(0, columns)
            total_weight = _stats.total_weight(weight, n_classes=weight.numel())
            shard_total_weight = shard_weight.sum()
        # Chunk temporaries per logit: the logits in the input dtype, their compute-dtype copy,
        # exponentials and gradient (compute dtype), the gradient in the input dtype.
        per_logit = 2 * torch.finfo(dtype).bits // 8 + 3 * torch.finfo(compute_dtype).bits // 8
        rows = opts.chunk_size or _budget.budget_rows(
            _budget.VOCAB_PARALLEL_CHUNK_BYTES, per_logit * max(shard_size, 1)
        )
        return Plan(
            group=group,
            reduction=opts.reduction,
            label_smoothing=opts.label_smoothing,
            z_loss=opts.z_loss,
            vocab=vocab,
            compute_dtype=compute_dtype,
            rows_per_chunk=max(1, min(rows, n_rows)),
            keep=keep,
            local_target=local_target,
            owns_target=owns,
            target_weight=target_weight,
            shard_weight=shard_weight,
            total_weight=total_weight,
            shard_total_weight=shard_total_weight,
        )

    def chunks(self) -> list[slice]:
        n = self.keep.numel()
        return [slice(s, min(s + self.rows_per_chunk, n)) for s in range(0, n, self.rows_per_chunk)]

    def stats_options(self) -> dict:
        """The keyword options of ``crossent.ops._stats``'s loss and coefficient functions."""
        return dict(n_classes=self.vocab, label_smoothing=self.label_smoothing, z_loss=self.z_loss)


def _shard_statistics(logits: Tensor, plan: Plan, rows: slice) -> list[Tensor]:
    """Per-row statistics of one chunk ``(n, V_r)`` of this shard's logits, compute dtype.

    Returns ``m_r = max_c z_c`` (-inf for an empty shard), ``s_r = Σ_c e^{z_c - m_r}``, the
    target logit ``z_t`` where this shard owns the target (else 0) and, with label smoothing,
    ``Σ_c w_c (z_c - m_r)`` (no cancellation: every term has the sign of ``-w_c``).
    """
    n, shard_size = logits.shape
    if shard_size == 0:  # an empty shard adds e^{-inf} = 0 to the global sum
        shard_max = logits.new_full((n,), -math.inf)
        return [shard_max, logits.new_zeros(n), logits.new_zeros(n)] + (
            [logits.new_zeros(n)] if plan.label_smoothing > 0 else []
        )
    shard_max = logits.amax(dim=1)  # (n,)
    shifted = logits - _finite_max(shard_max)[:, None]  # (n, V_r)
    smooth = []
    if plan.label_smoothing > 0:
        weighted = shifted if plan.shard_weight is None else shifted * plan.shard_weight
        smooth.append(weighted.sum(dim=1))
    sum_exp = shifted.exp_().sum(dim=1)
    target_logit = logits.gather(1, plan.local_target[rows]).squeeze(1)
    return [shard_max, sum_exp, torch.where(plan.owns_target[rows], target_logit, 0.0), *smooth]


def _finite_max(row_max: Tensor) -> Tensor:
    """The max to subtract: 0 where it is -inf (all -inf would give -inf - -inf = NaN).

    A row of -inf then has ``Σ e^{z - 0} = 0`` and log-sum-exp -inf; +inf and NaN propagate.
    """
    return torch.where(row_max == -math.inf, 0.0, row_max)


@dataclass
class _GlobalStats:
    """Per-token statistics over the whole vocabulary, ``(N,)`` each, compute dtype, named as in
    the glossary of ``crossent.ops._stats``.

    ``log_softmax(z)_c = (z_c - row_max) - logsum``: the max and the log-sum-exp stay apart, so
    that huge logits lose no digits (``lse = row_max + logsum`` would round ``logsum`` away).
    """

    row_max: Tensor  # global max logit (0 where every logit is -inf)
    logsum: Tensor  # log Σ_c e^{z_c - row_max}
    target_logit: Tensor  # z_t - row_max (of no meaning where ignored)
    smooth: Tensor | None  # Σ_c w_c (z_c - row_max), with label smoothing only

    @property
    def lse(self) -> Tensor:
        return self.row_max + self.logsum


def _combine_statistics(stats: list[Tensor], plan: Plan) -> _GlobalStats:
    """Combine every rank's ``_shard_statistics``: one all-reduce MAX, then one SUM."""
    shard_max, sum_exp, target_logit = stats[:3]
    row_max = shard_max.clone()  # (N,)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=plan.group)
    row_max = _finite_max(row_max)
    # e^{m_r - m} rescales this shard's sum to the global max; an empty shard: e^{-inf} = 0.
    parts = [sum_exp * torch.exp(shard_max - row_max), target_logit]
    if plan.label_smoothing > 0:
        # Σ_{c∈r} w_c (z_c - m) = Σ_{c∈r} w_c (z_c - m_r) + W_r (m_r - m)
        parts.append(stats[3] + plan.shard_total_weight * (_finite_max(shard_max) - row_max))
    summed = torch.stack(parts)  # (2 or 3, N): one message
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=plan.group)
    smooth = summed[2] if plan.label_smoothing > 0 else None
    return _GlobalStats(row_max, summed[0].log(), summed[1] - row_max, smooth)


def _forward(plan: Plan, chunk_logits) -> tuple[Tensor, _GlobalStats, Tensor | None]:
    """Loss (reduced as asked, compute dtype), the global statistics, the mean denominator.

    ``chunk_logits(rows)`` returns this shard's logits for those rows, in the compute dtype.
    """
    pieces = [_shard_statistics(chunk_logits(rows), plan, rows) for rows in plan.chunks()]
    if pieces:
        stats = [torch.cat(column) for column in zip(*pieces, strict=True)]
    else:  # N = 0
        empty = plan.keep.new_zeros(0, dtype=plan.compute_dtype)
        stats = [empty] * (4 if plan.label_smoothing > 0 else 3)
    glob = _combine_statistics(stats, plan)

    # Ignored tokens contribute exactly 0, even for NaN logits; 'mean' over no kept token is
    # 0/0 = NaN, as in torch.
    loss = _stats.loss_from_stats(
        glob.row_max, glob.logsum, glob.target_logit, glob.smooth, plan.keep,
        plan.target_weight, plan.total_weight, reduction=plan.reduction, **plan.stats_options(),
    )  # fmt: skip
    denominator = None
    if plan.reduction == "mean":  # the backward divides by it too
        denominator = _stats.mean_denominator(
            plan.keep, plan.target_weight, n_rows=plan.keep.numel(), dtype=plan.compute_dtype
        )
    return loss, glob, denominator


def _grad_coefficients(
    plan: Plan, grad_output: Tensor, lse: Tensor, denominator: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: ``σ`` (upstream gradient, 0 for ignored rows), ``σ·a`` and ``σ·(1-ε)·w_t``.

    ``dℓ_i/dz_ij = a_i p_ij - (1-ε) w_t [j = t] - (ε/V) w_j`` with
    ``a_i = (1-ε) w_t + (ε/V) W + 2ζ lse_i`` (``crossent.ops._stats``).
    """
    sigma = _stats.row_scale(
        grad_output.to(plan.compute_dtype),
        reduction=plan.reduction,
        denominator=denominator,
        keep=plan.keep,
        n_rows=plan.keep.numel(),
    )
    scaled_a, on_target = _stats.grad_coefficients(
        sigma, plan.target_weight, plan.total_weight, lse, **plan.stats_options()
    )
    return sigma, scaled_a, on_target


def _shard_logit_grad(
    logits: Tensor,
    saved: tuple[Tensor, Tensor],
    coefficients: tuple[Tensor, Tensor, Tensor],
    plan: Plan,
    rows: slice,
) -> Tensor:
    """Gradient ``(n, V_r)`` w.r.t. one chunk ``rows`` of this shard's logits, compute dtype.

    ``saved`` is the forward's ``(row_max, logsum)``, ``coefficients`` is
    :func:`_grad_coefficients`, both for all ``N`` rows. Uses only local data: no communication.
    """
    row_max, logsum = (t[rows, None] for t in saved)  # (n, 1) each
    sigma, scaled_a, on_target = (t[rows] for t in coefficients)  # (n,) each
    grad = (logits - row_max).sub_(logsum).exp_()  # the global softmax on this shard's classes
    grad *= scaled_a[:, None]
    eps = plan.label_smoothing
    if eps > 0:
        uniform = sigma[:, None] * (eps / plan.vocab)
        grad -= uniform if plan.shard_weight is None else uniform * plan.shard_weight
    if logits.shape[1] > 0:
        on_target = torch.where(plan.owns_target[rows], on_target, 0.0)
        grad.scatter_add_(1, plan.local_target[rows], -on_target[:, None])
    return grad


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Logits sharded by vocabulary -> loss. Backward: local, no communication."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: Plan) -> Tensor:  # logits (N, V_r)
        def chunk_logits(rows: slice) -> Tensor:
            return logits[rows].to(plan.compute_dtype)

        loss, glob, denominator = _forward(plan, chunk_logits)
        ctx.save_for_backward(logits, glob.row_max, glob.logsum)
        ctx.plan, ctx.denominator = plan, denominator
        return loss.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None]:
        logits, *saved = ctx.saved_tensors
        plan: Plan = ctx.plan
        coefficients = _grad_coefficients(plan, grad_output, saved[0] + saved[1], ctx.denominator)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for rows in plan.chunks():
            chunk = logits[rows].to(plan.compute_dtype)
            grad[rows] = _shard_logit_grad(chunk, saved, coefficients, plan, rows)
        return grad, None


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Replicated input, classifier sharded by vocabulary rows -> loss, chunked over tokens.

    Backward: recomputes each chunk's logits; one all-reduce of the input's gradient.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        linear_weight_shard: Tensor,
        linear_bias_shard: Tensor | None,
        plan: Plan,
    ) -> Tensor:  # input (N, D), linear_weight_shard (V_r, D)
        def chunk_logits(rows: slice) -> Tensor:
            return F.linear(input[rows], linear_weight_shard, linear_bias_shard).to(
                plan.compute_dtype
            )

        loss, glob, denominator = _forward(plan, chunk_logits)
        ctx.save_for_backward(
            input, linear_weight_shard, linear_bias_shard, glob.row_max, glob.logsum
        )
        ctx.plan, ctx.denominator = plan, denominator
        return loss.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, linear_weight_shard, linear_bias_shard, *saved = ctx.saved_tensors
        plan: Plan = ctx.plan
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        coefficients = _grad_coefficients(plan, grad_output, saved[0] + saved[1], ctx.denominator)
        # Weight and bias gradients accumulate over chunks in the compute dtype (fp32 for half).
        grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
        grad_input = grad_input if need_input else None
        grad_weight = torch.zeros_like(linear_weight_shard, dtype=plan.compute_dtype)
        grad_weight = grad_weight if need_weight else None
        grad_bias = (
            torch.zeros_like(linear_bias_shard, dtype=plan.compute_dtype) if need_bias else None
        )
        for rows in plan.chunks():
            x = input[rows]  # (n, D)
            logits = F.linear(x, linear_weight_shard, linear_bias_shard).to(plan.compute_dtype)
            grad_logits = _shard_logit_grad(logits, saved, coefficients, plan, rows)
            grad_logits_io = grad_logits.to(input.dtype)  # what torch's linear backward sees
            if grad_input is not None:
                torch.mm(grad_logits_io, linear_weight_shard, out=grad_input[rows])
            if grad_weight is not None:
                if grad_weight.dtype == input.dtype:
                    grad_weight.addmm_(grad_logits_io.t(), x)
                else:
                    grad_weight += (grad_logits_io.t() @ x).to(grad_weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        if grad_input is not None:
            # input is replicated, so its gradient is the sum of every shard's contribution.
            dist.all_reduce(grad_input, op=dist.ReduceOp.SUM, group=plan.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(linear_weight_shard.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(linear_bias_shard.dtype)
        return grad_input, grad_weight, grad_bias, None
