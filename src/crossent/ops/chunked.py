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

``'mean'`` divides the sum by ``Σ_kept w_t`` (the count of kept tokens without weights), the
same denominator as ``F.cross_entropy`` uses for both its terms. The gradient of a chunk is
scaled by ``σ_i`` (1/denominator for ``'mean'``, 1 for ``'sum'``, ``grad_output_i`` for
``'none'``) before it meets the two gradient matmuls.

Without softcap the row factor ``σ_i·a_i`` and the sparse/rank-1 corrections are folded into
the (B, D) operands of the matmuls, so the (B, V) chunk is touched only by the logits matmul,
one in-place softmax (on the host; the log-sum-exp is read back from the target column) and
the two gradient matmuls. With softcap the gradient is built densely in the chunk (the tanh
derivative multiplies every element).

Autograd: for ``'mean'``/``'sum'`` the forward computes the gradients chunk by chunk (they are
the only thing the backward needs; it scales them by ``grad_output``). ``'none'`` needs a
per-token ``grad_output`` that the forward cannot know, so its forward computes only the loss
and its backward recomputes the chunks. Double backward is refused with a RuntimeError.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

# Chunk sizes. Each chunk streams the weight (V×D) through two matmuls and the float32 weight
# gradient through a third, whatever its number of rows B, while its matmul work grows with B:
# B sets the arithmetic intensity of those streams. On the host it is sized by work per thread,
# ROWS_PER_THREAD rows for each torch thread (one thread computes half as fast as two, so it
# needs half the rows per weight pass; measured on 2 cores: 256 rows a thread run within a few
# percent of three unchunked matmuls, 64 rows 30% slower, and a busy core or bandwidth taken by
# other processes widens the gap), up to HOST_CHUNK_BYTES of scratch. Elsewhere (accelerators,
# whose chunked path is a fallback) the scratch budget is CHUNK_BYTES. The scratch is one chunk
# of logits (two with softcap); see docs/linear.md for the measurements.
CHUNK_BYTES = 32 * 1024 * 1024
ROWS_PER_THREAD = 256
HOST_CHUNK_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ChunkedConfig:
    """Options of one linear cross entropy call (validated by ``crossent.linear``).

    Attributes:
        reduction: ``'none'``, ``'mean'`` or ``'sum'``.
        ignore_index: target value whose tokens are skipped.
        label_smoothing: ε in [0, 1] (negative values already mapped to 0).
        z_loss: ζ >= 0, coefficient of ``lse²``.
        softcap: c > 0 or None.
        chunk_size: rows per chunk, or None to size chunks from ``CHUNK_BYTES``.
    """

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    chunk_size: int | None = None


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def choose_chunk_rows(
    n_rows: int,
    n_classes: int,
    acc_dtype: torch.dtype,
    *,
    softcap: bool = False,
    chunk_size: int | None = None,
    budget_bytes: int = CHUNK_BYTES,
    threads: int | None = None,
) -> int:
    """Rows per chunk: ``chunk_size`` if given, else from the work per thread or a budget.

    A chunk holds ``rows × n_classes`` elements of ``acc_dtype`` (twice that with softcap).
    With ``threads`` (host): ``ROWS_PER_THREAD × threads`` rows, at most as many as fit
    ``HOST_CHUNK_BYTES``; without: as many as fit ``budget_bytes``. The result is clamped to
    ``[1, max(n_rows, 1)]`` and, above 16 rows, rounded down to a multiple of 16 (whole
    SIMD/matmul register blocks).

    Args:
        n_rows: number of tokens to process.
        n_classes: V, the number of classes.
        acc_dtype: dtype of the chunk buffer.
        softcap: whether a second (tanh-derivative) buffer is needed.
        chunk_size: explicit override.
        budget_bytes: scratch budget when ``threads`` is None.
        threads: the number of threads the matmuls run on (host), or None.

    Returns:
        The number of rows per chunk (>= 1).
    """
    if chunk_size is not None:
        rows = chunk_size
    else:
        elem = torch.empty((), dtype=acc_dtype).element_size()
        row_bytes = max(1, n_classes) * elem * (2 if softcap else 1)
        if threads is None:
            rows = budget_bytes // row_bytes
        else:
            rows = min(ROWS_PER_THREAD * max(1, threads), HOST_CHUNK_BYTES // row_bytes)
        rows = max(1, rows)
        if rows > 16:
            rows -= rows % 16
    return max(1, min(rows, max(n_rows, 1)))


@dataclasses.dataclass
class _Rows:
    """The rows a pass works on: all tokens (masked) or only the kept ones (compacted).

    On the host, ignored tokens are dropped before any matmul (``index`` lists the kept rows;
    finding them costs a host-side ``nonzero``, free on CPU). On an accelerator, ``nonzero``
    would synchronise the device (it breaks CUDA graphs and torch.compile), so every row is
    processed and ignored rows are masked out (``keep``), costing matmul work but no sync.
    """

    x: Tensor  # (M, D) rows to process, input dtype
    target: Tensor  # (M,) int64, every entry a valid class index
    keep: Tensor | None  # (M,) bool, None when every row is kept
    index: Tensor | None  # (M,) positions of the rows in the full batch; None = identity
    n_total: int  # N


def _on_host(t: Tensor) -> bool:
    """Whether ``t`` lives in host memory, where reading values needs no device sync.

    Decides the host-only code paths (row compaction, fused in-place softmax, skipping the
    grad_output multiply); the tests patch it to run the accelerator paths on CPU.
    """
    return t.device.type == "cpu"


def _select_rows(x: Tensor, target: Tensor, ignore_index: int) -> _Rows:
    n = x.shape[0]
    keep = target != ignore_index
    if _on_host(x):
        index = keep.nonzero().squeeze(1)
        if index.numel() == n:
            return _Rows(x, target, None, None, n)
        return _Rows(x.index_select(0, index), target.index_select(0, index), None, index, n)
    safe_target = torch.where(keep, target, 0)
    return _Rows(x, safe_target, keep, None, n)


def _scatter_rows(values: Tensor, rows: _Rows, fill_shape: tuple[int, ...]) -> Tensor:
    """Place per-processed-row ``values`` back at their batch positions (zeros elsewhere)."""
    if rows.index is None:
        return values
    out = values.new_zeros((rows.n_total, *fill_shape))
    out.index_copy_(0, rows.index, values)
    return out


@dataclasses.dataclass
class _PassOutput:
    loss_rows: Tensor | None  # (M,) acc dtype: the (1-ε)·w_t·(lse - s_t) term, 0 on masked rows
    extra_rows: Tensor | None  # (M,) the smoothing and z-loss terms; None when both are off
    grad_x: Tensor | None  # (M, D) acc dtype
    grad_weight: Tensor | None  # (V, D) acc dtype
    grad_bias: Tensor | None  # (V,) acc dtype


def _softmax_(logits: Tensor, target_col: Tensor, target_logit: Tensor) -> Tensor:
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
    if _on_host(logits):
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


def _chunked_pass(
    rows: _Rows,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    class_weight: Tensor | None,
    cfg: ChunkedConfig,
    *,
    sigma: Tensor | None,
    want_loss: bool,
    want_grad_x: bool,
    want_grad_weight: bool,
    want_grad_bias: bool,
) -> _PassOutput:
    """One sweep over the rows, chunk by chunk: per-row loss and/or σ-scaled gradients.

    Args:
        rows: the rows to process (see ``_Rows``).
        linear_weight: (V, D).
        linear_bias: (V,) or None.
        class_weight: (V,) or None.
        cfg: the call's options.
        sigma: (M,) per-row gradient scale in the accumulation dtype (0 on masked rows), or
            None when no gradient is wanted.
        want_loss: compute the per-row loss.
        want_grad_x / want_grad_weight / want_grad_bias: which gradients to accumulate.

    Returns:
        ``_PassOutput`` with the requested pieces, all in the accumulation dtype.
    """
    x, target, keep = rows.x, rows.target, rows.keep
    m, d = x.shape
    v = linear_weight.shape[0]
    acc = accumulation_dtype(x.dtype)
    device = x.device
    want_grads = sigma is not None and (want_grad_x or want_grad_weight or want_grad_bias)

    # Operands in the accumulation dtype. On CPU there is no mixed-dtype matmul (mm's
    # out_dtype is CUDA-only), so low-precision weights are upcast once: fp32 math, fp32
    # gradient accumulation, a cast at the very end.
    weight_acc = linear_weight if linear_weight.dtype == acc else linear_weight.to(acc)
    bias_acc = None if linear_bias is None else linear_bias.to(acc)
    cw = None if class_weight is None else class_weight.to(acc)
    eps = cfg.label_smoothing
    zeta = cfg.z_loss
    cap = cfg.softcap
    w_sum = float(v) if cw is None else cw.sum()
    w_target = None if cw is None else cw.index_select(0, target)  # (M,)

    loss_rows = torch.zeros(m, dtype=acc, device=device) if want_loss else None
    has_extra = want_loss and (eps > 0 or zeta > 0)
    extra_rows = torch.zeros(m, dtype=acc, device=device) if has_extra else None
    grad_x = torch.empty((m, d), dtype=acc, device=device) if want_grads and want_grad_x else None
    # The weight gradient is written (not added) by the first chunk's matmul: no zero fill.
    grad_weight = (
        torch.empty((v, d), dtype=acc, device=device) if want_grads and want_grad_weight else None
    )
    grad_bias = torch.zeros(v, dtype=acc, device=device) if want_grads and want_grad_bias else None
    if m == 0:
        if grad_weight is not None:
            grad_weight.zero_()
        return _PassOutput(loss_rows, extra_rows, grad_x, grad_weight, grad_bias)

    rows_per_chunk = choose_chunk_rows(
        m,
        v,
        acc,
        softcap=cap is not None and want_grads,
        chunk_size=cfg.chunk_size,
        threads=torch.get_num_threads() if _on_host(x) else None,
    )
    buf = torch.empty((min(rows_per_chunk, m), v), dtype=acc, device=device)
    dcap_buf = torch.empty_like(buf) if cap is not None and want_grads else None
    ones_v = torch.ones(v, dtype=acc, device=device) if (eps > 0 and cw is None) else None
    w_vec = cw if cw is not None else ones_v  # (V,) only used when eps > 0
    dense = cap is not None  # softcap: build the gradient densely in the chunk
    if want_grads and eps > 0 and not dense:
        # Folded label-smoothing terms: Σ_i σ_i·x_i and Σ_i σ_i, applied once at the end.
        sum_sigma_x = torch.zeros(d, dtype=acc, device=device)
        sum_sigma = torch.zeros((), dtype=acc, device=device)
        smooth_dir = (w_vec @ weight_acc) if grad_x is not None else None  # (D,) = wᵀW

    for start in range(0, m, rows_per_chunk):
        stop = min(start + rows_per_chunk, m)
        n = stop - start
        x_c = x[start:stop]
        if x_c.dtype != acc:
            x_c = x_c.to(acc)
        if keep is not None:
            # Masked (ignored) rows enter the matmuls as zeros, so that NaN/inf in them cannot
            # reach the weight gradient (0·NaN = NaN): an ignored token contributes nothing,
            # as on the host, where it is dropped before the matmul.
            x_c = torch.where(keep[start:stop].unsqueeze(1), x_c, 0.0)
        t_c = target[start:stop]
        t_col = t_c.unsqueeze(1)
        logits = buf[:n]  # (n, V)

        if bias_acc is None:
            torch.mm(x_c, weight_acc.T, out=logits)
        else:
            torch.addmm(bias_acc, x_c, weight_acc.T, out=logits)
        if cap is not None:
            logits.div_(cap).tanh_()
            if dcap_buf is not None:
                dcap = dcap_buf[:n]
                torch.mul(logits, logits, out=dcap)
                dcap.neg_().add_(1.0)  # d(c·tanh(z/c))/dz = 1 - tanh²
            logits.mul_(cap)

        s_t = logits.gather(1, t_col).squeeze(1)  # (n,) target logit
        smooth_dot = None
        if eps > 0 and want_loss:
            smooth_dot = logits.sum(1) if cw is None else logits @ cw  # Σ_c w_c s_c
        lse = _softmax_(logits, t_col, s_t)  # logits now holds p = softmax(s)
        if _on_host(lse):
            redo = torch.isnan(lse).nonzero().squeeze(1)
            if redo.numel():
                # p_t too small to read lse from (or NaN/inf input): read the largest class.
                exact = _lse_from_row_max(logits, redo, x_c, weight_acc, bias_acc, cap)
                lse = lse.index_copy(0, redo, exact)

        w_t = None if w_target is None else w_target[start:stop]
        if want_loss:
            nll = lse - s_t
            loss_c = nll if w_t is None else nll * w_t
            extra_c = None
            if eps > 0:
                loss_c = (1 - eps) * loss_c
                extra_c = (eps / v) * (w_sum * lse - smooth_dot)
            if zeta > 0:
                z_term = zeta * lse * lse
                extra_c = z_term if extra_c is None else extra_c + z_term
            if keep is not None:
                loss_c = torch.where(keep[start:stop], loss_c, 0.0)
                if extra_c is not None:
                    extra_c = torch.where(keep[start:stop], extra_c, 0.0)
            loss_rows[start:stop] = loss_c
            if extra_c is not None:
                extra_rows[start:stop] = extra_c

        if not want_grads:
            continue
        sig = sigma[start:stop]  # (n,)
        onehot_coef = sig * (1 - eps) if w_t is None else sig * ((1 - eps) * w_t)
        a = (1 - eps) + (eps / v) * w_sum if w_t is None else (1 - eps) * w_t + (eps / v) * w_sum
        if zeta > 0:
            a = a + (2 * zeta) * lse
        row_factor = sig * a  # (n,)

        if dense:
            g = logits
            g.mul_(row_factor.unsqueeze(1))
            if eps > 0:
                g.addr_(sig, w_vec, alpha=-eps / v)
            g.scatter_add_(1, t_col, -onehot_coef.unsqueeze(1))
            g.mul_(dcap)
            if grad_x is not None:
                torch.mm(g, weight_acc, out=grad_x[start:stop])
            if grad_weight is not None:
                grad_weight.addmm_(g.T, x_c, beta=0.0 if start == 0 else 1.0)
            if grad_bias is not None:
                grad_bias.add_(g.sum(0))
            continue

        # Folded: the chunk keeps p; row factors and corrections act on (n, D) operands.
        p = logits
        if grad_x is not None:
            gx = grad_x[start:stop]
            torch.mm(p, weight_acc, out=gx)
            gx.mul_(row_factor.unsqueeze(1))
            gx.addcmul_(weight_acc.index_select(0, t_c), onehot_coef.unsqueeze(1), value=-1)
            if eps > 0:
                gx.addr_(sig, smooth_dir, alpha=-eps / v)
        if grad_weight is not None:
            scaled_x = x_c * row_factor.unsqueeze(1)
            grad_weight.addmm_(p.T, scaled_x, beta=0.0 if start == 0 else 1.0)
            grad_weight.index_add_(0, t_c, x_c * onehot_coef.unsqueeze(1), alpha=-1)
            if eps > 0:
                sum_sigma_x.addmv_(x_c.T, sig)
        if grad_bias is not None:
            grad_bias.addmv_(p.T, row_factor)
            grad_bias.index_add_(0, t_c, onehot_coef, alpha=-1)
            if eps > 0:
                sum_sigma.add_(sig.sum())

    if want_grads and eps > 0 and not dense:
        if grad_weight is not None:
            grad_weight.addr_(w_vec, sum_sigma_x, alpha=-eps / v)
        if grad_bias is not None:
            grad_bias.add_(w_vec * sum_sigma, alpha=-eps / v)
    return _PassOutput(loss_rows, extra_rows, grad_x, grad_weight, grad_bias)


def _denominator(rows: _Rows, class_weight: Tensor | None, acc: torch.dtype) -> Tensor:
    """``Σ_kept w_t`` (or the count of kept tokens): the 'mean' denominator, as a 0-d tensor."""
    if class_weight is None:
        if rows.keep is None:
            return torch.tensor(float(rows.x.shape[0]), dtype=acc, device=rows.x.device)
        return rows.keep.sum().to(acc)
    w_t = class_weight.to(acc).index_select(0, rows.target)
    if rows.keep is not None:
        w_t = torch.where(rows.keep, w_t, 0.0)
    return w_t.sum()


def _sigma(rows: _Rows, scale: Tensor) -> Tensor:
    """Per-row gradient scale: ``scale`` (0-d or (M,)) on kept rows, exactly 0 on masked rows."""
    m = rows.x.shape[0]
    sig = scale.expand(m) if scale.dim() == 0 else scale
    if rows.keep is not None:
        sig = torch.where(rows.keep, sig, 0.0)
    return sig.contiguous()


def _reduce(out: _PassOutput, rows: _Rows, denom: Tensor | None, cfg: ChunkedConfig) -> Tensor:
    """The reduction of the per-row terms.

    ``'mean'`` divides the target term and the smoothing/z-loss terms by the denominator
    separately, as ``F.cross_entropy`` does: when every kept target has class weight 0 the
    target term is 0/0 and the mean NaN, whatever the smoothing term (x/0) holds.
    """
    if cfg.reduction == "none":
        loss = out.loss_rows if out.extra_rows is None else out.loss_rows + out.extra_rows
        return _scatter_rows(loss, rows, ())
    if cfg.reduction == "sum":
        total = out.loss_rows.sum()
        return total if out.extra_rows is None else total + out.extra_rows.sum()
    mean = out.loss_rows.sum() / denom
    return mean if out.extra_rows is None else mean + out.extra_rows.sum() / denom


def _grads_for(
    x: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    cfg: ChunkedConfig,
    needs: tuple[bool, bool, bool],
    grad_scale: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of ``Σ_i scale_i·loss_i`` (scale from the reduction and the grad_output)."""
    rows = _select_rows(x, target, cfg.ignore_index)
    acc = accumulation_dtype(x.dtype)
    if cfg.reduction == "none":
        scale = grad_scale.to(acc)
        if rows.index is not None:
            scale = scale.index_select(0, rows.index)
    elif cfg.reduction == "mean":
        scale = grad_scale.to(acc) / _denominator(rows, class_weight, acc)
    else:
        scale = grad_scale.to(acc)
    out = _chunked_pass(
        rows,
        linear_weight,
        linear_bias,
        class_weight,
        cfg,
        sigma=_sigma(rows, scale),
        want_loss=False,
        want_grad_x=needs[0],
        want_grad_weight=needs[1],
        want_grad_bias=needs[2],
    )
    return _finish_grads(out, rows, x, linear_weight, linear_bias)


def _finish_grads(
    out: _PassOutput,
    rows: _Rows,
    x: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    grad_x = None
    if out.grad_x is not None:
        grad_x = _scatter_rows(out.grad_x.to(x.dtype), rows, (x.shape[1],))
    grad_weight = None if out.grad_weight is None else out.grad_weight.to(linear_weight.dtype)
    grad_bias = None
    if out.grad_bias is not None and linear_bias is not None:
        grad_bias = out.grad_bias.to(linear_bias.dtype)
    return grad_x, grad_weight, grad_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd node of the chunked linear cross entropy (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        linear_weight: Tensor,
        linear_bias: Tensor | None,
        target: Tensor,
        class_weight: Tensor | None,
        cfg: ChunkedConfig,
    ) -> Tensor:
        needs = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],
            linear_bias is not None and ctx.needs_input_grad[2],
        )
        ctx.cfg = cfg
        ctx.needs = needs
        ctx.save_for_backward(x, linear_weight, linear_bias, target, class_weight)
        rows = _select_rows(x, target, cfg.ignore_index)
        acc = accumulation_dtype(x.dtype)
        if cfg.reduction == "none":
            # The backward needs a per-token grad_output: compute the loss only, recompute then.
            ctx.grads = None
            out = _chunked_pass(
                rows,
                linear_weight,
                linear_bias,
                class_weight,
                cfg,
                sigma=None,
                want_loss=True,
                want_grad_x=False,
                want_grad_weight=False,
                want_grad_bias=False,
            )
            return _reduce(out, rows, None, cfg).to(x.dtype)

        denom = _denominator(rows, class_weight, acc) if cfg.reduction == "mean" else None
        scale = 1.0 / denom if denom is not None else torch.ones((), dtype=acc, device=x.device)
        out = _chunked_pass(
            rows,
            linear_weight,
            linear_bias,
            class_weight,
            cfg,
            sigma=_sigma(rows, scale),
            want_loss=True,
            want_grad_x=needs[0],
            want_grad_weight=needs[1],
            want_grad_bias=needs[2],
        )
        # Gradients of the reduced loss, held until backward scales them by grad_output.
        ctx.grads = _finish_grads(out, rows, x, linear_weight, linear_bias)
        return _reduce(out, rows, denom, cfg).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "crossent.linear_cross_entropy does not support double backward "
                "(backward with create_graph=True, torch.autograd.grad of its gradients, "
                "hessians): its gradients are computed chunk by chunk outside autograd so that "
                "the N×V logits are never stored. Use "
                "F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...) "
                "where higher-order gradients are needed."
            )
        cfg: ChunkedConfig = ctx.cfg
        needs = ctx.needs
        grads = ctx.grads
        if grads is not None:
            # First backward of 'mean'/'sum': hand over the gradients the forward computed.
            # Dropping our reference lets autograd adopt them without a copy.
            ctx.grads = None
            grads = tuple(_scale_grad(g, grad_output) for g in grads)
        else:
            # 'none', or a second backward (retain_graph=True): recompute from the inputs.
            x, linear_weight, linear_bias, target, class_weight = ctx.saved_tensors
            grads = _grads_for(
                x, linear_weight, linear_bias, target, class_weight, cfg, needs, grad_output
            )
        grad_x, grad_weight, grad_bias = grads
        return (
            grad_x if needs[0] else None,
            grad_weight if needs[1] else None,
            grad_bias if needs[2] else None,
            None,
            None,
            None,
        )


def _scale_grad(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """``grad * grad_output`` in place (the tensor is ours); skipped when grad_output is 1.

    Reading ``grad_output`` is free on the host; on an accelerator it would synchronise, so
    there the multiplication always runs.
    """
    if grad is None:
        return None
    if _on_host(grad_output) and float(grad_output) == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


def linear_cross_entropy_chunked(
    x: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Chunked linear cross entropy on validated 2-D input (any device).

    Args:
        x: (N, D) hidden states, floating point.
        linear_weight: (V, D) classifier weight, ``x``'s dtype.
        target: (N,) int64 class indices in [0, V) or ``ignore_index``.
        linear_bias: optional (V,) bias.
        weight: optional (V,) class weight (not differentiable).
        reduction: ``'none'``, ``'mean'`` or ``'sum'``.
        ignore_index: target value to skip.
        label_smoothing: ε in [0, 1].
        z_loss: ζ >= 0.
        softcap: c > 0 or None.
        chunk_size: rows per chunk, or None for the memory budget ``CHUNK_BYTES``.

    Returns:
        The loss in ``x``'s dtype: a scalar, or (N,) for ``reduction='none'``.
    """
    cfg = ChunkedConfig(
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    differentiable = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, linear_weight, linear_bias)
    )
    if differentiable:
        return _LinearCrossEntropy.apply(x, linear_weight, linear_bias, target, weight, cfg)
    # No autograd: the loss only (one matmul per chunk, no gradient work).
    rows = _select_rows(x, target, ignore_index)
    out = _chunked_pass(
        rows,
        linear_weight,
        linear_bias,
        weight,
        cfg,
        sigma=None,
        want_loss=True,
        want_grad_x=False,
        want_grad_weight=False,
        want_grad_bias=False,
    )
    denom = None
    if reduction == "mean":
        denom = _denominator(rows, weight, accumulation_dtype(x.dtype))
    return _reduce(out, rows, denom, cfg).to(x.dtype)
