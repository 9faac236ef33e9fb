"""Linear cross entropy in token chunks: the N×V logits are never held, on any device.

Contract of this module:
- reads validated arguments only (``crossent.linear`` has checked shapes, dtypes, target range
  and options): ``input`` (N, D), ``linear_weight`` (V, D), optional ``linear_bias`` (V,),
  ``target`` (N,) int64, optional class ``weight`` (V,), all on one device, one float dtype;
- writes only tensors it allocates (never a caller's tensor); the largest is one chunk of
  logits, ``chunk_rows × V`` in the accumulation dtype (two of them with ``softcap``);
- assumes nothing about values: NaN/inf propagate as in torch's eager composition, except
  that an ignored token contributes nothing at all: on the host its row is dropped before the
  matmuls, elsewhere it enters them as zeros, so NaN/inf in an ignored row give a 0 gradient
  row and leave the weight gradient alone (torch's ``log_softmax`` backward spreads NaN from
  such a row over all of ``grad_W``, by 0·NaN).

The math, per kept token i with logits ``z = x_i W^T + b`` (optionally soft-capped,
``s = c·tanh(z/c)``), ``lse = log Σ_c exp(s_c)``, ``p = softmax(s)``, class weights ``w``
(all ones if absent), ``W_sum = Σ_c w_c``, smoothing ε and z-loss coefficient ζ::

    loss_i = (1-ε)·w_t·(lse - s_t) + (ε/V)·Σ_c w_c·(lse - s_c) + ζ·lse²
    ∂loss_i/∂s = a_i·p - (1-ε)·w_t·e_t - (ε/V)·w,   a_i = (1-ε)·w_t + (ε/V)·W_sum + 2ζ·lse

The conventions (the two terms, the row factor, the ``'mean'`` denominator ``Σ_kept w_t``,
σ) are ``crossent.ops._stats``'s; chunk sizes are ``crossent.ops._budget``'s. Each chunk is one
logits/lse step (``crossent.ops._chunk_logits``: matmul, softcap, in-place softmax,
statistics) followed by the loss and the gradient steps (:class:`_Grads`). Without softcap the
row factor ``σ_i·a_i`` and the sparse/rank-1 corrections are folded into the (B, D) operands of
the matmuls, so the (B, V) chunk is touched only by the logits matmul, one in-place softmax (on
the host; the log-sum-exp is read back from the target column) and the two gradient matmuls.
With softcap the gradient is built densely in the chunk (the tanh derivative multiplies every
element).

Autograd (``crossent.ops._chunking``): for ``'mean'``/``'sum'`` the forward computes the
gradients chunk by chunk (they are the only thing the backward needs; it scales them by
``grad_output``). ``'none'`` needs a per-token ``grad_output`` that the forward cannot know, so
its forward computes only the loss and its backward recomputes the chunks. Double backward is
refused with a RuntimeError.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from crossent.ops import _stats
from crossent.ops._budget import CHUNK_BYTES, HOST_CHUNK_BYTES, ROWS_PER_THREAD, choose_chunk_rows
from crossent.ops._chunk_logits import Chunk, ChunkedConfig, Head, chunks
from crossent.ops._chunking import Rows, apply, select_rows
from crossent.ops._chunking import on_host as _on_host

__all__ = [
    "CHUNK_BYTES",
    "HOST_CHUNK_BYTES",
    "ROWS_PER_THREAD",
    "ChunkedConfig",
    "choose_chunk_rows",
    "linear_cross_entropy_chunked",
]


# --------------------------------------------------------------------------------------------
# The tokens of one call.


@dataclasses.dataclass
class _Tokens:
    """The rows a pass works on (see ``crossent.ops._chunking.select_rows``)."""

    x: Tensor  # (M, D) rows to process, input dtype
    target: Tensor  # (M,) int64, every entry a valid class index
    rows: Rows


def _tokens(x: Tensor, target: Tensor, ignore_index: int) -> _Tokens:
    rows = select_rows(target != ignore_index, x.shape[0], _on_host(x))
    target = rows.take(target)
    if rows.keep is not None:
        target = torch.where(rows.keep, target, 0)
    return _Tokens(rows.take(x), target, rows)


# --------------------------------------------------------------------------------------------
# The gradient steps.


class _Grads:
    """σ-scaled gradients of the loss, accumulated chunk by chunk (acc dtype).

    Without softcap the row factor ``σ_i·a_i`` and the sparse/rank-1 corrections are folded
    into the (B, D) operands of the matmuls, so the (B, V) chunk is touched only by the two
    gradient matmuls; the smoothing term's rank-1 parts are applied once, in :meth:`finish`.
    With softcap the gradient is built densely in the chunk (the tanh derivative multiplies
    every element).
    """

    def __init__(self, tokens: _Tokens, head: Head, needs: tuple[bool, bool, bool]) -> None:
        m, d = tokens.x.shape
        v = head.weight.shape[0]
        acc, device = head.acc, tokens.x.device
        self.head = head
        self.eps = head.cfg.label_smoothing
        self.dense = head.cfg.softcap is not None
        self.grad_x = torch.empty((m, d), dtype=acc, device=device) if needs[0] else None
        # The weight gradient is written (not added) by the first chunk's matmul: no zero fill.
        self.grad_weight = torch.empty((v, d), dtype=acc, device=device) if needs[1] else None
        self.grad_bias = torch.zeros(v, dtype=acc, device=device) if needs[2] else None
        self.first = True
        w_vec = None
        if self.eps > 0:
            cw = head.class_weight
            w_vec = cw if cw is not None else torch.ones(v, dtype=acc, device=device)
        self.w_vec = w_vec  # (V,), with smoothing only
        if self.eps > 0 and not self.dense:
            # Folded label-smoothing terms: Σ_i σ_i·x_i and Σ_i σ_i, applied once at the end.
            self.sum_sigma_x = torch.zeros(d, dtype=acc, device=device)
            self.sum_sigma = torch.zeros((), dtype=acc, device=device)
            self.smooth_dir = (w_vec @ head.weight) if needs[0] else None  # (D,) = wᵀW

    def add(self, c: Chunk, sig: Tensor) -> None:
        """Add the chunk's gradients, with per-row scale ``sig`` (B,); overwrites ``c.probs``."""
        head, eps = self.head, self.eps
        v = head.weight.shape[0]
        w_t = _stats.target_weight(head.class_weight, c.target)
        row_factor, onehot_coef = _stats.grad_coefficients(
            sig, w_t, head.total, c.lse, **head.options()
        )
        beta = 0.0 if self.first else 1.0
        self.first = False
        if self.dense:
            g = c.probs
            g.mul_(row_factor.unsqueeze(1))
            if eps > 0:
                g.addr_(sig, self.w_vec, alpha=-eps / v)
            g.scatter_add_(1, c.target.unsqueeze(1), -onehot_coef.unsqueeze(1))
            g.mul_(c.dcap)
            if self.grad_x is not None:
                torch.mm(g, head.weight, out=self.grad_x[c.start : c.stop])
            if self.grad_weight is not None:
                self.grad_weight.addmm_(g.T, c.x, beta=beta)
            if self.grad_bias is not None:
                self.grad_bias.add_(g.sum(0))
            return

        # Folded: the chunk keeps p; row factors and corrections act on (B, D) operands.
        p = c.probs
        if self.grad_x is not None:
            gx = self.grad_x[c.start : c.stop]
            torch.mm(p, head.weight, out=gx)
            gx.mul_(row_factor.unsqueeze(1))
            gx.addcmul_(head.weight.index_select(0, c.target), onehot_coef.unsqueeze(1), value=-1)
            if eps > 0:
                gx.addr_(sig, self.smooth_dir, alpha=-eps / v)
        if self.grad_weight is not None:
            scaled_x = c.x * row_factor.unsqueeze(1)
            self.grad_weight.addmm_(p.T, scaled_x, beta=beta)
            self.grad_weight.index_add_(0, c.target, c.x * onehot_coef.unsqueeze(1), alpha=-1)
            if eps > 0:
                self.sum_sigma_x.addmv_(c.x.T, sig)
        if self.grad_bias is not None:
            self.grad_bias.addmv_(p.T, row_factor)
            self.grad_bias.index_add_(0, c.target, onehot_coef, alpha=-1)
            if eps > 0:
                self.sum_sigma.add_(sig.sum())

    def finish(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(grad_x, grad_weight, grad_bias)`` over the processed rows, acc dtype."""
        if self.first and self.grad_weight is not None:
            self.grad_weight.zero_()  # no rows
        alpha = -self.eps / self.head.weight.shape[0]
        if self.eps > 0 and not self.dense:
            if self.grad_weight is not None:
                self.grad_weight.addr_(self.w_vec, self.sum_sigma_x, alpha=alpha)
            if self.grad_bias is not None:
                self.grad_bias.add_(self.w_vec * self.sum_sigma, alpha=alpha)
        return self.grad_x, self.grad_weight, self.grad_bias


# --------------------------------------------------------------------------------------------
# The sweep and the problem.


def _chunked_pass(
    tokens: _Tokens,
    head: Head,
    *,
    sigma: Tensor | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
    want_loss: bool = True,
) -> tuple[tuple[Tensor, Tensor | None] | None, tuple[Tensor | None, ...] | None]:
    """One sweep over the rows, chunk by chunk. Two call shapes: ``(tokens, head)`` for the
    per-row loss only, and with ``sigma`` (M,) (the per-row gradient scale, 0 on masked rows)
    and ``needs`` for the σ-scaled gradients of x, the weight and the bias as well (the loss
    too unless ``want_loss`` is False).

    Returns:
        The per-row loss terms ``(main, extra)`` of ``crossent.ops._stats.row_loss`` (or None)
        and the gradients ``(grad_x, grad_weight, grad_bias)`` (or None), acc dtype.
    """
    m = tokens.x.shape[0]
    eps = head.cfg.label_smoothing
    grads = _Grads(tokens, head, needs) if sigma is not None and any(needs) else None
    main = extra = None
    if want_loss:
        main = torch.zeros(m, dtype=head.acc, device=tokens.x.device)
        if eps > 0 or head.cfg.z_loss > 0:
            extra = torch.zeros_like(main)
    if m > 0 and (want_loss or grads is not None):
        dcap = grads is not None and head.cfg.softcap is not None
        rows_per_chunk = choose_chunk_rows(
            m,
            head.weight.shape[0],
            head.acc,
            softcap=dcap,
            chunk_size=head.cfg.chunk_size,
            threads=torch.get_num_threads() if head.host else None,
        )
        sweep = chunks(
            tokens.x, tokens.target, tokens.rows.keep, head, rows_per_chunk,
            smooth=want_loss and eps > 0, dcap=dcap,
        )  # fmt: skip
        for c in sweep:
            if want_loss:
                nll, smooth_nll = _stats.nll_from_stats(c.lse, c.target_logit, c.smooth, head.total)
                w_t = _stats.target_weight(head.class_weight, c.target)
                main_c, extra_c = _stats.row_loss(
                    nll, smooth_nll, c.lse, w_t, c.keep, **head.options()
                )
                main[c.start : c.stop] = main_c
                if extra_c is not None:
                    extra[c.start : c.stop] = extra_c
            if grads is not None:
                grads.add(c, sigma[c.start : c.stop])
    return (main, extra) if want_loss else None, None if grads is None else grads.finish()


@dataclasses.dataclass(frozen=True)
class _LinearProblem:
    """One linear cross entropy call, for ``crossent.ops._chunking``; inputs
    ``(x, linear_weight, linear_bias, target, class_weight)``."""

    cfg: ChunkedConfig
    acc: torch.dtype
    differentiable = (True, True, True, False, False)
    double_backward_message = (
        "crossent.linear_cross_entropy does not support double backward "
        "(backward with create_graph=True, torch.autograd.grad of its gradients, "
        "hessians): its gradients are computed chunk by chunk outside autograd so that "
        "the N×V logits are never stored. Use "
        "F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) "
        "where higher-order gradients are needed."
    )

    @property
    def reduction(self) -> str:
        return self.cfg.reduction

    def run(self, inputs, *, want_loss, grad_scale, needs):
        x, linear_weight, linear_bias, target, class_weight = inputs
        cfg, acc = self.cfg, self.acc
        tokens = _tokens(x, target, cfg.ignore_index)
        head = Head.of(linear_weight, linear_bias, class_weight, cfg, _on_host(x))
        keep, m = tokens.rows.keep, tokens.x.shape[0]
        denom = None
        if cfg.reduction == "mean":
            w_t = _stats.target_weight(head.class_weight, tokens.target)
            denom = _stats.mean_denominator(keep, w_t, n_rows=m, dtype=acc, device=x.device)
        if grad_scale is not None and any(needs[:3]):
            scale = grad_scale.to(acc)
            if cfg.reduction == "none":
                scale = tokens.rows.take(scale)
            sigma = _stats.row_scale(
                scale, reduction=cfg.reduction, denominator=denom, keep=keep, n_rows=m
            )
            terms, grads = _chunked_pass(
                tokens, head, sigma=sigma, needs=needs[:3], want_loss=want_loss
            )
        else:
            terms, grads = _chunked_pass(tokens, head)
        loss = None
        if want_loss:
            loss = _stats.reduce_loss(*terms, cfg.reduction, denom)
            loss = (tokens.rows.scatter(loss) if cfg.reduction == "none" else loss).to(x.dtype)
        if grads is None:
            return loss, (None,) * 5
        grad_x, grad_weight, grad_bias = grads
        return loss, (
            None if grad_x is None else tokens.rows.scatter(grad_x.to(x.dtype)),
            None if grad_weight is None else grad_weight.to(linear_weight.dtype),
            None if grad_bias is None or linear_bias is None else grad_bias.to(linear_bias.dtype),
            None,
            None,
        )

    def batched_backward(self, inputs, grad_output, needs):
        """The gradients for a ``grad_output`` with a vmap batch dimension (batched gradients,
        ``torch.func.jacrev``-style transforms over the backward): recomputed with out-of-place
        torch ops that vmap can batch, holding the (N, V) logits, on the same conventions."""
        x, linear_weight, linear_bias, target, class_weight = inputs
        cfg, acc = self.cfg, self.acc
        leaves = [
            t.detach().requires_grad_() if need else t
            for t, need in zip((x, linear_weight, linear_bias), needs[:3], strict=True)
        ]
        with torch.enable_grad():
            xx, ww, bb = leaves
            keep = target != cfg.ignore_index
            safe = torch.where(keep, target, 0)
            # Ignored rows are zeroed before the matmuls: whatever they hold adds nothing.
            xx = torch.where(keep.unsqueeze(1), xx.to(acc), 0.0)
            logits = torch.nn.functional.linear(xx, ww.to(acc), None if bb is None else bb.to(acc))
            if cfg.softcap is not None:
                logits = cfg.softcap * torch.tanh(logits / cfg.softcap)
            log_p = torch.log_softmax(logits, 1)
            nll = -log_p.gather(1, safe.unsqueeze(1)).squeeze(1)
            smooth_nll = None
            if cfg.label_smoothing > 0:
                w_vec = None if class_weight is None else class_weight.to(acc)
                smooth_nll = -(log_p.sum(1) if w_vec is None else log_p @ w_vec)
            w_t = _stats.target_weight(class_weight, safe)
            w_t = None if w_t is None else w_t.to(acc)
            options = dict(
                n_classes=linear_weight.shape[0], label_smoothing=cfg.label_smoothing,
                z_loss=cfg.z_loss,
            )  # fmt: skip
            main, extra = _stats.row_loss(
                nll, smooth_nll, torch.logsumexp(logits, 1), w_t, keep, **options
            )
            denom = None
            if cfg.reduction == "mean":
                denom = _stats.mean_denominator(
                    keep, w_t, n_rows=x.shape[0], dtype=acc, device=x.device
                )
            loss = _stats.reduce_loss(main, extra, cfg.reduction, denom)
            wanted = [t for t, need in zip(leaves, needs[:3], strict=True) if need]
            got = iter(torch.autograd.grad(loss, wanted, grad_output.to(acc)))
        return tuple(next(got) if need else None for need in needs[:3]) + (None, None)


def linear_cross_entropy_chunked(
    x: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    **options,
) -> Tensor:
    """Chunked linear cross entropy on validated 2-D input (any device).

    Args:
        x: (N, D) hidden states, floating point.
        linear_weight: (V, D) classifier weight, ``x``'s dtype.
        target: (N,) int64 class indices in [0, V) or ``ignore_index``.
        linear_bias: optional (V,) bias.
        weight: optional (V,) class weight (not differentiable).
        **options: the fields of :class:`ChunkedConfig` (``reduction``, ``ignore_index``,
            ``label_smoothing``, ``z_loss``, ``softcap``, ``chunk_size``).

    Returns:
        The loss in ``x``'s dtype: a scalar, or (N,) for ``reduction='none'``.
    """
    problem = _LinearProblem(ChunkedConfig(**options), _stats.compute_dtype(x.dtype))
    return apply(problem, x, linear_weight, linear_bias, target, weight)
