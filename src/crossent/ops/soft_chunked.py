"""Soft targets in token chunks: a student head against a distribution, never holding N×V.

Contract of this module:
- reads validated arguments only (``crossent.linear_probs`` and ``crossent.distillation``
  have checked shapes, dtypes and options): the student's rows ``x`` (M, D), ``weight``
  (V, D), optional ``bias`` (V,), and what the student is compared with, per chunk of rows:
  class probabilities ``probs`` (M, V) (linear cross entropy with probability targets), or a
  teacher head ``x_t`` (M, D_t), ``weight_t`` (V, D_t), ``bias_t`` (V,) whose logits are
  made chunk by chunk (distillation);
- writes only tensors it allocates (never a caller's tensor); the largest are one chunk of
  student logits and at most four scratch chunks, ``chunk_rows × V`` each, in the
  accumulation dtype, plus the student gradients (``V × D`` for the weight, fp32 or fp64);
- assumes nothing about values: NaN/inf propagate as in the eager composition, except that
  on the host masked rows are dropped before any matmul.

One streaming loop (:func:`_stream`) serves every soft target: for each chunk it makes the
student logits ``z = x_c Wᵀ + b`` (B, V), hands them to an *objective* that returns the
per-row loss and leaves ``∂loss/∂z`` in the same buffer, then accumulates
``grad_x_c = σ ⊙ (g W)`` and ``grad_W += gᵀ (σ ⊙ x_c)`` (and ``grad_b += gᵀ σ``), where σ
is the per-row scale of the reduction (and of ``grad_output`` for ``'none'``). Two
objectives use it:

- :class:`_ProbTargets`: ``loss_i = -Σ_c w_c y'_c log p_c`` with ``y' = (1-ε) y + ε/V``,
  ``p = softmax(z)``; ``∂loss/∂z = p·Σ_c w_c y'_c - w ⊙ y'`` (``F.cross_entropy`` with a
  probability target, class weights and label smoothing).
- :class:`_Distillation`: with ``ls = log_softmax(z/T)``, ``lt = log_softmax(z_t/T)``,
  ``p = exp(ls)``, ``q = exp(lt)``: forward KL ``Σ q (lt - ls)`` (β = 0; gradient
  ``(p - q)/T``, the soft cross-entropy gradient above with ``y = q``), reverse KL
  ``Σ p (ls - lt)`` (β = 1) or the generalized JSD ``β Σ q (lt - lm) + (1-β) Σ p (ls - lm)``
  with ``lm = log(β q + (1-β) p)`` (formed as a ``logaddexp`` of log-probabilities, so that
  underflowing probabilities never give ``0·(-inf)``). For β > 0 the student term's gradient is
  ``c·p ⊙ (ls - r - Σ p (ls - r))/T`` with ``r = lm, c = 1-β`` (JSD; the teacher term's
  dependence on ``p`` through ``lm`` cancels against the student term's) or ``r = lt, c = 1``
  (reverse KL). An optional hard term adds ``h·(-log softmax(z)_t)`` at temperature 1.

Autograd follows ``crossent.ops.chunked``: for ``'mean'``/``'sum'`` the gradients are made
during the forward and only scaled by ``grad_output`` in the backward; ``'none'`` recomputes
them in its backward; double backward raises ``RuntimeError``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from crossent.ops._budget import SOFT_CHUNK_BYTES, choose_chunk_rows
from crossent.ops._stats import compute_dtype as accumulation_dtype

__all__ = [
    "SOFT_CHUNK_BYTES",
    "linear_cross_entropy_probs_chunked",
    "linear_distillation_chunked",
]


def _on_host(t: Tensor) -> bool:
    """Host tensors: masked rows are compacted away and ``grad_output`` may be read."""
    return t.device.type == "cpu"


def _log_softmax_(t: Tensor) -> Tensor:
    """Row log-softmax of a (B, V) chunk, in place.

    On the host torch's fused kernel runs with ``out=`` its own input (each row is reduced
    before it is written). Accelerator kernels make no such promise, so there the result is
    computed aside and copied back.
    """
    if _on_host(t):
        return torch._log_softmax(t, 1, False, out=t)
    return t.copy_(torch.log_softmax(t, 1))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` for (B, V) chunks without a (B, V) temporary (a batched dot)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


# --------------------------------------------------------------------------------------------
# Objectives: per chunk, the loss of each row and ∂loss/∂z in place of the logits.


class _ProbTargets:
    """Cross entropy against class probabilities ``y`` (M, V), as ``F.cross_entropy``.

    ``grad_target`` (M, V), when set, receives ``∂(Σ σ_i loss_i)/∂y = -σ_i (1-ε) w_c ls_c``.
    """

    n_scratch = 1

    def __init__(
        self,
        probs: Tensor,
        class_weight: Tensor | None,
        label_smoothing: float,
        acc: torch.dtype,
        grad_target: Tensor | None = None,
    ) -> None:
        self.probs = probs
        self.class_weight = None if class_weight is None else class_weight.to(acc)
        self.eps = label_smoothing
        self.grad_target = grad_target

    def __call__(
        self, start: int, stop: int, z: Tensor, scratch: list[Tensor], sig: Tensor | None
    ) -> tuple[Tensor, float]:
        n, v = z.shape
        wy = scratch[0][:n]  # (B, V): w ⊙ y'
        _log_softmax_(z)  # z now holds ls = log_softmax(z)
        wy.copy_(self.probs[start:stop])
        if self.eps > 0:
            wy.mul_(1 - self.eps).add_(self.eps / v)
        if self.class_weight is not None:
            wy.mul_(self.class_weight)
        loss = _row_dot(wy, z).neg_()
        if sig is None:
            return loss, 1.0
        if self.grad_target is not None:
            gy = self.grad_target[start:stop]  # (B, V)
            torch.mul(z, (sig * -(1 - self.eps)).unsqueeze(1), out=gy)
            if self.class_weight is not None:
                gy.mul_(self.class_weight)
        total = wy.sum(1, keepdim=True)  # Σ_c w_c y'_c
        z.exp_().mul_(total).sub_(wy)  # p·Σ w y' - w ⊙ y'
        return loss, 1.0


class _Distillation:
    """``soft_weight·D(p_T ‖ p_S) + hard_weight·CE(z, target)`` per row; see the module doc.

    The teacher rows are aligned with the student rows (both compacted alike on the host).
    """

    def __init__(
        self,
        x_t: Tensor,
        weight_t: Tensor,
        bias_t: Tensor | None,
        target: Tensor | None,
        keep: Tensor | None,
        *,
        beta: float,
        temperature: float,
        soft_weight: float,
        hard_weight: float,
        acc: torch.dtype,
    ) -> None:
        self.x_t = x_t
        self.weight_t = weight_t if weight_t.dtype == acc else weight_t.to(acc)
        self.bias_t = None if bias_t is None else bias_t.to(acc)
        self.target = target
        self.keep = keep
        self.beta = beta
        self.temperature = temperature
        self.soft_weight = soft_weight
        self.hard_weight = hard_weight
        self.acc = acc
        # Scratch: the teacher's logits and one more buffer (q for the forward KL, p for the
        # reverse KL); the JSD needs the mixture and a probability buffer; the hard term at a
        # temperature other than 1 needs the temperature-1 softmax.
        self.jsd = 0.0 < beta < 1.0
        self.n_scratch = (3 if self.jsd else 2) + (1 if hard_weight > 0 and temperature != 1 else 0)

    def __call__(
        self, start: int, stop: int, z: Tensor, scratch: list[Tensor], sig: Tensor | None
    ) -> tuple[Tensor, float]:
        n = z.shape[0]
        lt, mix = scratch[0][:n], scratch[1][:n]  # (B, V) each
        beta, temp, hard = self.beta, self.temperature, self.hard_weight
        want_grad = sig is not None

        x_t = self.x_t[start:stop]
        if x_t.dtype != self.acc:
            x_t = x_t.to(self.acc)
        if self.bias_t is None:
            torch.mm(x_t, self.weight_t.T, out=lt)
        else:
            torch.addmm(self.bias_t, x_t, self.weight_t.T, out=lt)

        hard_loss = None
        probs_1 = None  # softmax(z) at temperature 1, for the hard term's gradient
        if hard > 0:
            t_col = self.target[start:stop].unsqueeze(1)
            if temp != 1.0:
                probs_1 = scratch[-1][:n]
                torch.log_softmax(z, 1, out=probs_1)
                hard_loss = probs_1.gather(1, t_col).squeeze(1).neg_()
                if want_grad:
                    probs_1.exp_()
        if temp != 1.0:
            z.div_(temp)
            lt.div_(temp)
        _log_softmax_(z)  # z holds ls
        _log_softmax_(lt)
        if hard > 0 and temp == 1.0:
            hard_loss = z.gather(1, t_col).squeeze(1).neg_()

        if beta == 0.0:
            # Forward KL(q ‖ p) = Σ q (lt - ls); gradient p - q.
            torch.exp(lt, out=mix)  # q
            lt.sub_(z)
            div = _row_dot(mix, lt)
            probs = lt  # free now
            if want_grad:
                torch.exp(z, out=probs)  # p
                torch.sub(probs, mix, out=z)
            coef = 1.0
        else:
            if beta == 1.0:
                ref = lt  # reverse KL(p ‖ q) = Σ p (ls - lt)
                probs = mix
                coef = 1.0
            else:
                probs = scratch[2][:n]
                torch.add(z, math.log1p(-beta), out=mix)
                torch.add(lt, math.log(beta), out=probs)
                torch.logaddexp(mix, probs, out=mix)  # lm = log(β q + (1-β) p)
                torch.exp(lt, out=probs)  # q
                lt.sub_(mix)
                teacher_term = _row_dot(probs, lt)  # KL(q ‖ m)
                ref = mix
                coef = 1.0 - beta
            torch.exp(z, out=probs)  # p
            z.sub_(ref)  # ls - r
            student_term = _row_dot(probs, z)  # KL(p ‖ r)
            if beta == 1.0:
                div = student_term
            else:
                div = beta * teacher_term + (1.0 - beta) * student_term
            if want_grad:
                z.sub_(student_term.unsqueeze(1)).mul_(probs)

        loss = div if self.soft_weight == 1.0 else div * self.soft_weight
        if hard_loss is not None:
            loss = loss + hard * hard_loss
        if self.keep is not None:
            loss = torch.where(self.keep[start:stop], loss, 0.0)
        if not want_grad:
            return loss, 1.0

        soft_factor = self.soft_weight * coef / temp
        if hard == 0:
            return loss, soft_factor
        # g = soft_factor·g_soft + h·(p1 - e_t) = h·(p1 + (soft_factor/h)·g_soft - e_t)
        if probs_1 is None:
            probs_1 = probs
        torch.add(probs_1, z, alpha=soft_factor / hard, out=z)
        z.scatter_add_(1, t_col, z.new_full((n, 1), -1.0))
        return loss, hard


# --------------------------------------------------------------------------------------------
# The streaming loop.


@dataclasses.dataclass
class _PassOutput:
    loss_rows: Tensor | None  # (M,) acc dtype
    grad_x: Tensor | None  # (M, D) acc dtype
    grad_weight: Tensor | None  # (V, D) acc dtype
    grad_bias: Tensor | None  # (V,) acc dtype


def _stream(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    objective: _ProbTargets | _Distillation,
    acc: torch.dtype,
    *,
    sigma: Tensor | None,
    want_loss: bool,
    needs: tuple[bool, bool, bool],
    chunk_size: int | None,
) -> _PassOutput:
    """One sweep over the rows: per-row loss and/or σ-scaled student gradients.

    Args:
        x: (M, D) student rows.
        weight: (V, D) student classifier; bias: (V,) or None.
        objective: makes each chunk's loss and ``∂loss/∂z`` (see the classes above).
        acc: accumulation dtype.
        sigma: (M,) per-row gradient scale (0 on masked rows), or None for no gradients.
        want_loss: compute the per-row loss.
        needs: which of grad_x, grad_weight, grad_bias to accumulate.
        chunk_size: rows per chunk, or None for ``SOFT_CHUNK_BYTES``.
    """
    m, d = x.shape
    v = weight.shape[0]
    device = x.device
    grads = sigma is not None
    weight_acc = weight if weight.dtype == acc else weight.to(acc)
    bias_acc = None if bias is None else bias.to(acc)

    loss_rows = torch.zeros(m, dtype=acc, device=device) if want_loss else None
    grad_x = torch.empty((m, d), dtype=acc, device=device) if grads and needs[0] else None
    grad_weight = torch.zeros((v, d), dtype=acc, device=device) if grads and needs[1] else None
    grad_bias = torch.zeros(v, dtype=acc, device=device) if grads and needs[2] else None
    if m == 0:
        return _PassOutput(loss_rows, grad_x, grad_weight, grad_bias)

    n_buffers = 1 + objective.n_scratch
    rows = choose_chunk_rows(
        m, v * n_buffers, acc, chunk_size=chunk_size, budget_bytes=SOFT_CHUNK_BYTES
    )
    rows = min(rows, m)
    buf = torch.empty((rows, v), dtype=acc, device=device)
    scratch = [torch.empty((rows, v), dtype=acc, device=device) for _ in range(n_buffers - 1)]

    for start in range(0, m, rows):
        stop = min(start + rows, m)
        n = stop - start
        x_c = x[start:stop]
        if x_c.dtype != acc:
            x_c = x_c.to(acc)
        z = buf[:n]  # (n, V) student logits, then ∂loss/∂z
        if bias_acc is None:
            torch.mm(x_c, weight_acc.T, out=z)
        else:
            torch.addmm(bias_acc, x_c, weight_acc.T, out=z)
        sig = None if sigma is None else sigma[start:stop]
        loss_c, factor = objective(start, stop, z, scratch, sig)
        if loss_rows is not None:
            loss_rows[start:stop] = loss_c
        if sig is None or not any(needs):
            continue
        row = sig if factor == 1.0 else sig * factor  # (n,)
        if grad_x is not None:
            gx = grad_x[start:stop]
            torch.mm(z, weight_acc, out=gx)
            gx.mul_(row.unsqueeze(1))
        if grad_weight is not None:
            grad_weight.addmm_(z.T, x_c * row.unsqueeze(1))
        if grad_bias is not None:
            grad_bias.addmv_(z.T, row)
    return _PassOutput(loss_rows, grad_x, grad_weight, grad_bias)


# --------------------------------------------------------------------------------------------
# Problems: the rows, the objective and the reduction of one call.


@dataclasses.dataclass
class _Rows:
    """Rows kept for the pass: on the host, masked rows are dropped (``index``); elsewhere
    all rows stay and ``keep`` masks them (no device sync)."""

    index: Tensor | None  # (M,) positions of the kept rows; None = all rows
    keep: Tensor | None  # (M,) bool mask over processed rows; None = all kept
    n_total: int
    n_kept: Tensor  # 0-d, acc dtype


def _select(mask: Tensor | None, n: int, acc: torch.dtype, device: torch.device) -> _Rows:
    if mask is None:
        return _Rows(None, None, n, torch.tensor(float(n), dtype=acc, device=device))
    if _on_host(mask):
        index = mask.nonzero().squeeze(1)
        n_kept = torch.tensor(float(index.numel()), dtype=acc, device=device)
        if index.numel() == n:
            return _Rows(None, None, n, n_kept)
        return _Rows(index, None, n, n_kept)
    return _Rows(None, mask, n, mask.sum().to(acc))


def _take(t: Tensor | None, rows: _Rows) -> Tensor | None:
    if t is None or rows.index is None:
        return t
    return t.index_select(0, rows.index)


def _scatter(values: Tensor, rows: _Rows) -> Tensor:
    if rows.index is None:
        return values
    out = values.new_zeros((rows.n_total, *values.shape[1:]))
    out.index_copy_(0, rows.index, values)
    return out


@dataclasses.dataclass
class _ProbProblem:
    """Linear cross entropy with probability targets: every row counts, 'mean' divides by N."""

    class_weight: Tensor | None
    label_smoothing: float
    reduction: str
    chunk_size: int | None
    acc: torch.dtype

    def rows(self, x: Tensor) -> _Rows:
        return _select(None, x.shape[0], self.acc, x.device)

    def mean_denominator(self, rows: _Rows) -> Tensor:
        return rows.n_kept  # N (0 rows give NaN, as torch)

    def objective(
        self, rows: _Rows, probs: Tensor | None, grad_target: Tensor | None
    ) -> _ProbTargets:
        return _ProbTargets(probs, self.class_weight, self.label_smoothing, self.acc, grad_target)


@dataclasses.dataclass
class _DistillProblem:
    """Distillation: rows whose target is ``ignore_index`` are masked; 'mean' divides by the
    number of kept rows, at least 1 (all masked gives 0, as TRL's ``batchmean``)."""

    x_t: Tensor
    weight_t: Tensor
    bias_t: Tensor | None
    target: Tensor | None
    ignore_index: int
    beta: float
    temperature: float
    soft_weight: float
    hard_weight: float
    reduction: str
    chunk_size: int | None
    acc: torch.dtype

    def rows(self, x: Tensor) -> _Rows:
        mask = None if self.target is None else self.target != self.ignore_index
        return _select(mask, x.shape[0], self.acc, x.device)

    def mean_denominator(self, rows: _Rows) -> Tensor:
        return rows.n_kept.clamp_min(1.0)

    def objective(
        self, rows: _Rows, probs: Tensor | None, grad_target: Tensor | None
    ) -> _Distillation:
        target = _take(self.target, rows)
        if target is not None and rows.keep is not None:
            target = torch.where(rows.keep, target, 0)
        return _Distillation(
            _take(self.x_t, rows),
            self.weight_t,
            self.bias_t,
            target,
            rows.keep,
            beta=self.beta,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            hard_weight=self.hard_weight,
            acc=self.acc,
        )


_Problem = _ProbProblem | _DistillProblem


def _run(
    problem: _Problem,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    probs: Tensor | None,
    *,
    want_loss: bool,
    grad_scale: Tensor | None,
    needs: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
    """Loss (reduced, acc dtype) and the gradients of ``grad_scale · loss`` if asked.

    ``needs``: grad of x, weight, bias, probs. ``grad_scale``: None (no gradients), a 0-d
    scale for 'mean'/'sum', or the (N,) ``grad_output`` for 'none'.
    """
    acc = problem.acc
    rows = problem.rows(x)
    x_rows = _take(x, rows)
    probs_rows = _take(probs, rows)
    mean = problem.reduction == "mean"
    denom = problem.mean_denominator(rows) if mean else None

    sigma = None
    grad_target = None
    if grad_scale is not None and any(needs):
        scale = grad_scale.to(acc)
        if problem.reduction == "none":
            scale = _take(scale.reshape(-1), rows)
        elif mean:
            scale = scale / denom
        m = x_rows.shape[0]
        sigma = scale.expand(m) if scale.dim() == 0 else scale
        if rows.keep is not None:
            sigma = torch.where(rows.keep, sigma, 0.0)
        sigma = sigma.contiguous()
        if needs[3]:
            grad_target = torch.empty(probs_rows.shape, dtype=acc, device=x.device)

    objective = problem.objective(rows, probs_rows, grad_target)
    out = _stream(
        x_rows,
        weight,
        bias,
        objective,
        acc,
        sigma=sigma,
        want_loss=want_loss,
        needs=needs[:3],
        chunk_size=problem.chunk_size,
    )
    loss = None
    if want_loss:
        if problem.reduction == "none":
            loss = _scatter(out.loss_rows, rows)
        else:
            loss = out.loss_rows.sum()
            if mean:
                loss = loss / denom
    grads = (
        None if out.grad_x is None else _scatter(out.grad_x, rows).to(x.dtype),
        None if out.grad_weight is None else out.grad_weight.to(weight.dtype),
        None if out.grad_bias is None or bias is None else out.grad_bias.to(bias.dtype),
        None if grad_target is None else _scatter(grad_target, rows).to(probs.dtype),
    )
    return loss, grads


class _SoftLinear(torch.autograd.Function):
    """Autograd node of both soft-target losses (the student head and, for linear cross
    entropy, the probability target are the differentiable inputs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        probs: Tensor | None,
        problem: _Problem,
        out_dtype: torch.dtype,
    ) -> Tensor:
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            bias is not None and ctx.needs_input_grad[2],
            probs is not None and ctx.needs_input_grad[3],
        )
        ctx.problem = problem
        ctx.needs = needs
        ctx.save_for_backward(x, weight, bias, probs)
        if problem.reduction == "none":
            ctx.grads = None  # per-token grad_output: recompute in backward
            loss, _ = _run(
                problem, x, weight, bias, probs, want_loss=True, grad_scale=None, needs=needs
            )
            return loss.to(out_dtype)
        one = torch.ones((), dtype=problem.acc, device=x.device)
        loss, ctx.grads = _run(
            problem, x, weight, bias, probs, want_loss=True, grad_scale=one, needs=needs
        )
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "crossent's linear soft-target losses (linear_distillation_loss, "
                "linear_cross_entropy with probability targets) do not support double "
                "backward: their gradients are computed chunk by chunk outside autograd so "
                "that the N×V logits are never stored. Use the eager composition on "
                "F.linear(...) logits where higher-order gradients are needed."
            )
        grads = ctx.grads
        if grads is not None:
            ctx.grads = None
            grads = tuple(_scale(g, grad_output) for g in grads)
        else:
            x, weight, bias, probs = ctx.saved_tensors
            _, grads = _run(
                ctx.problem,
                x,
                weight,
                bias,
                probs,
                want_loss=False,
                grad_scale=grad_output,
                needs=ctx.needs,
            )
        kept = (g if need else None for g, need in zip(grads, ctx.needs, strict=True))
        return (*kept, None, None)


def _scale(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    if grad is None:
        return None
    if _on_host(grad_output) and float(grad_output) == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


def _apply(
    problem: _Problem,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    probs: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, probs)
    )
    if differentiable:
        return _SoftLinear.apply(x, weight, bias, probs, problem, out_dtype)
    loss, _ = _run(
        problem, x, weight, bias, probs, want_loss=True, grad_scale=None, needs=(False,) * 4
    )
    return loss.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Entry points (validated 2-D arguments).


def linear_cross_entropy_probs_chunked(
    x: Tensor,
    weight: Tensor,
    probs: Tensor,
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), probs, ...)`` in token chunks.

    Args:
        x: (N, D) hidden states; weight: (V, D); bias: (V,) or None, ``x``'s dtype.
        probs: (N, V) class probabilities (any float dtype; may require grad).
        class_weight: (V,) or None. reduction: ``'none' | 'mean' | 'sum'`` ('mean' divides
            by N). label_smoothing: ε in [0, 1]. chunk_size: rows per chunk or None.

    Returns:
        The loss in the promoted dtype of ``x``, ``probs`` and ``class_weight`` (as torch):
        0-d, or (N,) for ``'none'``.
    """
    out_dtype = torch.promote_types(x.dtype, probs.dtype)
    if class_weight is not None:
        out_dtype = torch.promote_types(out_dtype, class_weight.dtype)
    problem = _ProbProblem(
        class_weight=class_weight,
        label_smoothing=label_smoothing,
        reduction=reduction,
        chunk_size=chunk_size,
        acc=accumulation_dtype(out_dtype),
    )
    return _apply(problem, x, weight, bias, probs, out_dtype)


def linear_distillation_chunked(
    x: Tensor,
    weight: Tensor,
    x_t: Tensor,
    weight_t: Tensor,
    target: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    bias_t: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Distillation loss between a student head and a teacher head, in token chunks.

    Args:
        x: (N, D_s) student hidden states; weight: (V, D_s); bias: (V,) or None.
        x_t: (N, D_t) teacher hidden states; weight_t: (V, D_t); bias_t: (V,) or None. Never
            differentiated (detached here).
        target: (N,) int64 class indices or ``ignore_index``, or None.
        beta, temperature, hard_weight, soft_weight, ignore_index, reduction, chunk_size: as
            ``crossent.linear_distillation_loss``.

    Returns:
        The loss in ``x``'s dtype: 0-d, or (N,) for ``'none'``.
    """
    problem = _DistillProblem(
        x_t=x_t.detach(),
        weight_t=weight_t.detach(),
        bias_t=None if bias_t is None else bias_t.detach(),
        target=target,
        ignore_index=ignore_index,
        beta=beta,
        temperature=temperature,
        soft_weight=soft_weight,
        hard_weight=hard_weight,
        reduction=reduction,
        chunk_size=chunk_size,
        acc=accumulation_dtype(x.dtype),
    )
    return _apply(problem, x, weight, bias, None, x.dtype)
