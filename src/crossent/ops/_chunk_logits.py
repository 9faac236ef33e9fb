"""The logits/lse step of the chunked linear cross entropy (``crossent.ops.chunked``).

:func:`chunks` makes one chunk of logits at a time (matmul, optional softcap), turns it into
probabilities in place and reads the statistics the loss and the gradient need: the
log-sum-exp, the target logit and the smoothing sum (``crossent.ops._stats``'s glossary, with
row_max = 0). :class:`Head` holds the classifier and options of the call in the accumulation
dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor

from crossent.ops import _stats

__all__ = ["Chunk", "ChunkedConfig", "Head", "chunks"]


@dataclasses.dataclass(frozen=True)
class ChunkedConfig:
    """Options of one linear cross entropy call (validated by ``crossent.linear``).

    Attributes:
        reduction: ``'none'``, ``'mean'`` or ``'sum'``.
        ignore_index: target value whose tokens are skipped.
        label_smoothing: ε in [0, 1] (negative values already mapped to 0).
        z_loss: ζ >= 0, coefficient of ``lse²``.
        softcap: c > 0 or None.
        chunk_size: rows per chunk, or None to size chunks (``crossent.ops._budget``).
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    chunk_size: int | None = None


@dataclasses.dataclass
class Head:
    """The classifier and options of one call, in the accumulation dtype.

    On CPU there is no mixed-dtype matmul (mm's out_dtype is CUDA-only), so low-precision
    weights are upcast once: fp32 math, fp32 gradient accumulation, a cast at the very end.
    """

    weight: Tensor  # (V, D)
    bias: Tensor | None  # (V,)
    class_weight: Tensor | None  # (V,)
    total: Tensor | float  # W = Σ_c w_c
    cfg: ChunkedConfig
    acc: torch.dtype
    host: bool

    @classmethod
    def of(
        cls,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        class_weight: Tensor | None,
        cfg: ChunkedConfig,
        host: bool,
    ) -> Head:
        acc = _stats.compute_dtype(linear_weight.dtype)
        weight = linear_weight if linear_weight.dtype == acc else linear_weight.to(acc)
        bias = None if linear_bias is None else linear_bias.to(acc)
        cw = None if class_weight is None else class_weight.to(acc)
        total = _stats.total_weight(cw, weight.shape[0])
        return cls(weight, bias, cw, total, cfg, acc, host)

    def options(self) -> dict:
        """The keywords of ``crossent.ops._stats`` for this call."""
        cfg = self.cfg
        return dict(
            n_classes=self.weight.shape[0], label_smoothing=cfg.label_smoothing, z_loss=cfg.z_loss
        )


@dataclasses.dataclass
class Chunk:
    start: int
    stop: int
    x: Tensor  # (B, D) acc dtype, masked rows zeroed
    target: Tensor  # (B,)
    keep: Tensor | None  # (B,)
    probs: Tensor  # (B, V) p = softmax(s); the gradient steps may overwrite it
    lse: Tensor  # (B,)
    target_logit: Tensor  # (B,) s_t
    smooth: Tensor | None  # (B,) Σ_c w_c s_c (statistics relative to row_max = 0)
    dcap: Tensor | None  # (B, V) 1 - tanh², the softcap derivative


def _softmax_(logits: Tensor, target_col: Tensor, target_logit: Tensor, host: bool) -> Tensor:
    """Overwrite ``logits`` (B, V) with its row softmax; return the row log-sum-exp (B,).

    On the host the fused softmax kernel runs in place (each row is shifted, exponentiated,
    summed and scaled while it sits in L2) and the log-sum-exp is read back from the target
    column: ``lse = s_t - log p_t``. That is as accurate as torch's ``log_softmax`` (both carry
    an absolute error of a few ulp of ``|s_t - max|``) as long as ``p_t`` is a normal number
    with room to spare; rows where it is not (a loss above ~70 in float32, common with
    large-scale logits) are flagged with NaN and read from their largest probability instead
    by the caller (``_lse_from_row_max``). This saves the separate max pass over the chunk.
    Elsewhere (accelerators) the max, exp, sum and scale run as separate in-place passes.
    """
    if host:
        torch._softmax(logits, 1, False, out=logits)
        p_t = logits.gather(1, target_col).squeeze(1)
        lse = target_logit - p_t.log()
        finfo = torch.finfo(logits.dtype)
        return torch.where(p_t >= finfo.tiny / finfo.eps, lse, torch.nan)
    row_max = logits.amax(1, keepdim=True)
    logits.sub_(row_max).exp_()
    sum_exp = logits.sum(1, keepdim=True)
    logits.div_(sum_exp)
    return (row_max + sum_exp.log_()).squeeze(1)


def _lse_from_row_max(
    probs: Tensor,
    redo: Tensor,
    x_c: Tensor,
    weight_acc: Tensor,
    bias_acc: Tensor | None,
    cap: float | None,
) -> Tensor:
    """Log-sum-exp of the rows ``redo`` of a softmaxed chunk, read from their largest class.

    The largest probability ``p_m = 1 / Σ_c exp(s_c - s_m)`` is at least ``1/V``, never
    denormal, so ``lse = s_m - log p_m`` is exact to rounding (``log p_m`` is torch's
    ``-log Σ exp(s - max)``). The logit ``s_m`` was overwritten by the softmax; it is recomputed
    as one dot product per row (``B·D`` work instead of the chunk's ``B·V·D``). A row holding
    NaN or ``+inf`` has NaN probabilities and gets a NaN ``lse``, as ``log_softmax`` gives.

    Args:
        probs: (B, V) the chunk after the softmax.
        redo: (R,) rows to read.
        x_c: (B, D) the chunk's hidden states in the accumulation dtype.
        weight_acc, bias_acc, cap: the classifier and soft-cap of the call.

    Returns:
        (R,) the rows' log-sum-exp.
    """
    if 4 * redo.numel() >= probs.shape[0]:  # most rows: one pass over the chunk, no copy
        p_max, col = probs.max(1)
        p_max, col = p_max.index_select(0, redo), col.index_select(0, redo)
    else:
        p_max, col = probs.index_select(0, redo).max(1)
    logit = (x_c.index_select(0, redo) * weight_acc.index_select(0, col)).sum(1)
    if bias_acc is not None:
        logit = logit + bias_acc.index_select(0, col)
    if cap is not None:
        logit = logit.div(cap).tanh_().mul_(cap)
    return logit - p_max.log()


def chunks(
    x: Tensor,
    target: Tensor,
    keep: Tensor | None,
    head: Head,
    rows_per_chunk: int,
    *,
    smooth: bool,
    dcap: bool,
) -> Iterator[Chunk]:
    """The chunks of one sweep over the rows ``x`` (M, D) with targets (M,) and mask ``keep``
    (None: all kept), each with its probabilities and statistics.

    ``smooth``: compute the smoothing sum; ``dcap``: keep the softcap derivative (gradients
    with softcap; the chunk budget must allow for its buffer). The chunks share one (B, V)
    buffer (two with ``dcap``): each is valid until the next is made.
    """
    m = x.shape[0]
    acc, cap = head.acc, head.cfg.softcap
    v = head.weight.shape[0]
    dcap = dcap and cap is not None
    buf = torch.empty((min(rows_per_chunk, m), v), dtype=acc, device=x.device)
    dcap_buf = torch.empty_like(buf) if dcap else None
    for start in range(0, m, rows_per_chunk):
        stop = min(start + rows_per_chunk, m)
        x_c = x[start:stop]
        if x_c.dtype != acc:
            x_c = x_c.to(acc)
        keep_c = None if keep is None else keep[start:stop]
        if keep_c is not None:
            # Masked (ignored) rows enter the matmuls as zeros, so that NaN/inf in them cannot
            # reach the weight gradient (0·NaN = NaN): an ignored token contributes nothing,
            # as on the host, where it is dropped before the matmul.
            x_c = torch.where(keep_c.unsqueeze(1), x_c, 0.0)
        t_c = target[start:stop]
        t_col = t_c.unsqueeze(1)
        logits = buf[: stop - start]  # (B, V)
        if head.bias is None:
            torch.mm(x_c, head.weight.T, out=logits)
        else:
            torch.addmm(head.bias, x_c, head.weight.T, out=logits)
        dcap_c = None
        if cap is not None:
            logits.div_(cap).tanh_()
            if dcap_buf is not None:
                dcap_c = dcap_buf[: stop - start]
                torch.mul(logits, logits, out=dcap_c)
                dcap_c.neg_().add_(1.0)  # d(c·tanh(z/c))/dz = 1 - tanh²
            logits.mul_(cap)

        s_t = logits.gather(1, t_col).squeeze(1)  # (B,) target logit
        smooth_c = None
        if smooth:
            cw = head.class_weight
            smooth_c = logits.sum(1) if cw is None else logits @ cw  # Σ_c w_c s_c
        lse = _softmax_(logits, t_col, s_t, head.host)  # logits now holds p = softmax(s)
        if head.host:
            redo = torch.isnan(lse).nonzero().squeeze(1)
            if redo.numel():
                # p_t too small to read lse from (or NaN/inf input): read the largest class.
                exact = _lse_from_row_max(logits, redo, x_c, head.weight, head.bias, cap)
                lse = lse.index_copy(0, redo, exact)
        yield Chunk(start, stop, x_c, t_c, keep_c, logits, lse, s_t, smooth_c, dcap_c)
