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

:class:`~crossent.ops._soft_objectives.ProbTargets` (cross entropy against class probabilities,
as ``F.cross_entropy``) and :class:`~crossent.ops._soft_objectives.Distillation` (forward KL,
reverse KL or generalized JSD between a teacher and the student, plus an optional hard term);
their math is in ``crossent.ops._soft_objectives``.

Row selection and autograd are ``crossent.ops._chunking``'s, as for ``crossent.ops.chunked``:
for ``'mean'``/``'sum'`` the gradients are made during the forward and only scaled by
``grad_output`` in the backward; ``'none'`` recomputes them in its backward; double backward
raises ``RuntimeError``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from crossent.ops._budget import SOFT_CHUNK_BYTES, choose_chunk_rows
from crossent.ops._chunking import Rows, apply, select_rows
from crossent.ops._chunking import on_host as _on_host
from crossent.ops._soft_objectives import Distillation, ProbTargets
from crossent.ops._stats import compute_dtype, row_scale

__all__ = [
    "SOFT_CHUNK_BYTES",
    "linear_cross_entropy_probs_chunked",
    "linear_distillation_chunked",
]


# --------------------------------------------------------------------------------------------
# The streaming loop.


def _stream(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    objective: ProbTargets | Distillation,
    acc: torch.dtype,
    *,
    sigma: Tensor | None,
    want_loss: bool,
    needs: tuple[bool, bool, bool],
    chunk_size: int | None,
) -> tuple[Tensor | None, tuple[Tensor | None, Tensor | None, Tensor | None]]:
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
        return loss_rows, (grad_x, grad_weight, grad_bias)

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
    return loss_rows, (grad_x, grad_weight, grad_bias)


# --------------------------------------------------------------------------------------------
# Problems: the rows, the objective and the reduction of one call.


class _SoftProblem:
    """One soft-target call, for ``crossent.ops._chunking``; inputs ``(x, weight, bias,
    probs)``. Subclasses choose the rows, the 'mean' denominator and the objective."""

    reduction: str
    chunk_size: int | None
    acc: torch.dtype
    differentiable = (True, True, True, True)
    double_backward_message = (
        "crossent's linear soft-target losses (linear_distillation_loss, "
        "linear_cross_entropy with probability targets) do not support double "
        "backward: their gradients are computed chunk by chunk outside autograd so "
        "that the N×V logits are never stored. Use the eager composition on "
        "F.linear(...) logits where higher-order gradients are needed."
    )
    batched_message = (
        "crossent's linear soft-target losses (linear_distillation_loss, "
        "linear_cross_entropy with probability targets) do not support batched gradients "
        "(vmap over the backward: autograd.grad(..., is_grads_batched=True), "
        "torch.func.jacrev): use the eager composition on F.linear(...) logits there."
    )

    def rows(self, x: Tensor) -> Rows:
        raise NotImplementedError

    def mean_denominator(self, rows: Rows, device: torch.device) -> Tensor:
        raise NotImplementedError

    def objective(
        self, rows: Rows, probs: Tensor | None, grad_target: Tensor | None, host: bool
    ) -> ProbTargets | Distillation:
        raise NotImplementedError

    def out_dtype(self, inputs: tuple[Tensor | None, ...]) -> torch.dtype:
        return inputs[0].dtype

    def run(self, inputs, *, want_loss, grad_scale, needs):
        """Loss (reduced, output dtype) and the gradients of ``grad_scale · loss`` if asked.

        ``needs``: grad of x, weight, bias, probs. ``grad_scale``: None (no gradients), a 0-d
        scale for 'mean'/'sum', or the (N,) ``grad_output`` for 'none'.
        """
        x, weight, bias, probs = inputs
        acc = self.acc
        rows = self.rows(x)
        x_rows = rows.take(x)
        probs_rows = rows.take(probs)
        denom = self.mean_denominator(rows, x.device) if self.reduction == "mean" else None

        sigma = None
        grad_target = None
        if grad_scale is not None and any(needs):
            scale = grad_scale.to(acc)
            if self.reduction == "none":
                scale = rows.take(scale.reshape(-1))
            sigma = row_scale(
                scale,
                reduction=self.reduction,
                denominator=denom,
                keep=rows.keep,
                n_rows=x_rows.shape[0],
            )
            if needs[3]:
                grad_target = torch.empty(probs_rows.shape, dtype=acc, device=x.device)

        objective = self.objective(rows, probs_rows, grad_target, _on_host(x))
        loss_rows, (grad_x, grad_weight, grad_bias) = _stream(
            x_rows,
            weight,
            bias,
            objective,
            acc,
            sigma=sigma,
            want_loss=want_loss,
            needs=needs[:3],
            chunk_size=self.chunk_size,
        )
        loss = None
        if want_loss:
            if self.reduction == "none":
                loss = rows.scatter(loss_rows)
            else:
                loss = loss_rows.sum()
                if denom is not None:
                    loss = loss / denom
            loss = loss.to(self.out_dtype(inputs))
        return loss, (
            None if grad_x is None else rows.scatter(grad_x).to(x.dtype),
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None or bias is None else grad_bias.to(bias.dtype),
            None if grad_target is None else rows.scatter(grad_target).to(probs.dtype),
        )


@dataclasses.dataclass
class _ProbProblem(_SoftProblem):
    """Linear cross entropy with probability targets: every row counts, 'mean' divides by N;
    the loss has the promoted dtype of ``x``, ``probs`` and ``class_weight`` (as torch)."""

    class_weight: Tensor | None
    acc: torch.dtype
    dtype: torch.dtype
    label_smoothing: float = 0.0
    reduction: str = "mean"
    chunk_size: int | None = None

    def rows(self, x: Tensor) -> Rows:
        return select_rows(None, x.shape[0], _on_host(x))

    def mean_denominator(self, rows: Rows, device: torch.device) -> Tensor:
        return rows.count(self.acc, device)  # N (0 rows give NaN, as torch)

    def objective(self, rows, probs, grad_target, host):
        return ProbTargets(
            probs, self.class_weight, self.label_smoothing, self.acc, host, grad_target
        )

    def out_dtype(self, inputs):
        return self.dtype


@dataclasses.dataclass
class _DistillProblem(_SoftProblem):
    """Distillation: rows whose target is ``ignore_index`` are masked; 'mean' divides by the
    number of kept rows, at least 1 (all masked gives 0, as TRL's ``batchmean``)."""

    x_t: Tensor
    weight_t: Tensor
    bias_t: Tensor | None
    target: Tensor | None
    acc: torch.dtype
    beta: float = 0.5
    temperature: float = 1.0
    hard_weight: float = 0.0
    soft_weight: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    chunk_size: int | None = None

    def rows(self, x: Tensor) -> Rows:
        if self.target is None:
            return select_rows(None, x.shape[0], _on_host(x))
        mask = self.target != self.ignore_index
        return select_rows(mask, x.shape[0], _on_host(mask))

    def mean_denominator(self, rows: Rows, device: torch.device) -> Tensor:
        return rows.count(self.acc, device).clamp_min(1.0)

    def objective(self, rows, probs, grad_target, host):
        target = rows.take(self.target)
        if target is not None and rows.keep is not None:
            target = torch.where(rows.keep, target, 0)
        return Distillation(
            rows.take(self.x_t),
            self.weight_t,
            self.bias_t,
            target,
            rows.keep,
            beta=self.beta,
            temperature=self.temperature,
            soft_weight=self.soft_weight,
            hard_weight=self.hard_weight,
            acc=self.acc,
            host=host,
        )


# --------------------------------------------------------------------------------------------
# Entry points (validated 2-D arguments).


def linear_cross_entropy_probs_chunked(
    x: Tensor,
    weight: Tensor,
    probs: Tensor,
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    **options,
) -> Tensor:
    """``F.cross_entropy(F.linear(x, weight, bias), probs, ...)`` in token chunks.

    Args:
        x: (N, D) hidden states; weight: (V, D); bias: (V,) or None, ``x``'s dtype.
        probs: (N, V) class probabilities (any float dtype; may require grad).
        class_weight: (V,) or None.
        **options: ``reduction`` (``'none' | 'mean' | 'sum'``; 'mean' divides by N),
            ``label_smoothing`` (ε in [0, 1]), ``chunk_size`` (rows per chunk or None).

    Returns:
        The loss in the promoted dtype of ``x``, ``probs`` and ``class_weight`` (as torch):
        0-d, or (N,) for ``'none'``.
    """
    out_dtype = torch.promote_types(x.dtype, probs.dtype)
    if class_weight is not None:
        out_dtype = torch.promote_types(out_dtype, class_weight.dtype)
    problem = _ProbProblem(class_weight, compute_dtype(out_dtype), out_dtype, **options)
    return apply(problem, x, weight, bias, probs)


def linear_distillation_chunked(
    x: Tensor,
    weight: Tensor,
    x_t: Tensor,
    weight_t: Tensor,
    target: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    bias_t: Tensor | None = None,
    **options,
) -> Tensor:
    """Distillation loss between a student head and a teacher head, in token chunks.

    Args:
        x: (N, D_s) student hidden states; weight: (V, D_s); bias: (V,) or None.
        x_t: (N, D_t) teacher hidden states; weight_t: (V, D_t); bias_t: (V,) or None. Never
            differentiated (detached here).
        target: (N,) int64 class indices or ``ignore_index``, or None.
        **options: ``beta``, ``temperature``, ``hard_weight``, ``soft_weight``,
            ``ignore_index``, ``reduction``, ``chunk_size``, as
            ``crossent.linear_distillation_loss``.

    Returns:
        The loss in ``x``'s dtype: 0-d, or (N,) for ``'none'``.
    """
    problem = _DistillProblem(
        x_t.detach(),
        weight_t.detach(),
        None if bias_t is None else bias_t.detach(),
        target,
        compute_dtype(x.dtype),
        **options,
    )
    return apply(problem, x, weight, bias, None)
