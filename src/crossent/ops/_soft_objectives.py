"""The objectives of the soft-target chunked losses (``crossent.ops.soft_chunked``).

An objective is called once per chunk with the student logits ``z`` (B, V); it returns the
per-row loss and leaves ``∂loss/∂z`` in the same buffer (up to a factor it returns). Two
objectives:

- :class:`ProbTargets`: ``loss_i = -Σ_c w_c y'_c log p_c`` with ``y' = (1-ε) y + ε/V``,
  ``p = softmax(z)``; ``∂loss/∂z = p·Σ_c w_c y'_c - w ⊙ y'`` (``F.cross_entropy`` with a
  probability target, class weights and label smoothing).
- :class:`Distillation`: with ``ls = log_softmax(z/T)``, ``lt = log_softmax(z_t/T)``,
  ``p = exp(ls)``, ``q = exp(lt)``: forward KL ``Σ q (lt - ls)`` (β = 0; gradient
  ``(p - q)/T``, the soft cross-entropy gradient above with ``y = q``), reverse KL
  ``Σ p (ls - lt)`` (β = 1) or the generalized JSD ``β Σ q (lt - lm) + (1-β) Σ p (ls - lm)``
  with ``lm = log(β q + (1-β) p)`` (formed as a ``logaddexp`` of log-probabilities, so that
  underflowing probabilities never give ``0·(-inf)``). For β > 0 the student term's gradient is
  ``c·p ⊙ (ls - r - Σ p (ls - r))/T`` with ``r = lm, c = 1-β`` (JSD; the teacher term's
  dependence on ``p`` through ``lm`` cancels against the student term's) or ``r = lt, c = 1``
  (reverse KL). An optional hard term adds ``h·(-log softmax(z)_t)`` at temperature 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Distillation", "ProbTargets"]


def _log_softmax_(t: Tensor, host: bool) -> Tensor:
    """Row log-softmax of a (B, V) chunk, in place.

    On the host torch's fused kernel runs with ``out=`` its own input (each row is reduced
    before it is written). Accelerator kernels make no such promise, so there the result is
    computed aside and copied back.
    """
    if host:
        return torch._log_softmax(t, 1, False, out=t)
    return t.copy_(torch.log_softmax(t, 1))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` for (B, V) chunks without a (B, V) temporary (a batched dot)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


# --------------------------------------------------------------------------------------------
# Objectives: per chunk, the loss of each row and ∂loss/∂z in place of the logits.


class ProbTargets:
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
        host: bool,
        grad_target: Tensor | None = None,
    ) -> None:
        self.host = host
        self.probs = probs
        self.class_weight = None if class_weight is None else class_weight.to(acc)
        self.eps = label_smoothing
        self.grad_target = grad_target

    def __call__(
        self, start: int, stop: int, z: Tensor, scratch: list[Tensor], sig: Tensor | None
    ) -> tuple[Tensor, float]:
        n, v = z.shape
        wy = scratch[0][:n]  # (B, V): w ⊙ y'
        _log_softmax_(z, self.host)  # z now holds ls = log_softmax(z)
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


class Distillation:
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
        host: bool,
    ) -> None:
        self.host = host
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
        _log_softmax_(z, self.host)  # z holds ls
        _log_softmax_(lt, self.host)
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
