"""Linear cross entropy (``crossent.linear_cross_entropy``) against torch eager.

Oracle: ``F.cross_entropy(F.linear(x, W, b), t, ...)`` composed in torch, with the soft-cap
(``c·tanh(z/c)`` on the logits) and z-loss (``ζ·lse²`` per kept token, reduced with the same
denominator) added in torch ops. Tolerances: float64 1e-10 (relative, and absolute on the
scale of the values), float32 1e-5, bfloat16 loose (checked against the float64 oracle on the
same bf16-rounded inputs, since crossent accumulates in float32 and is more accurate than
torch's bf16 path).
"""

from __future__ import annotations

import importlib.util
import pathlib

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

import crossent
import crossent.functional
import crossent.nn
from crossent import linear as linear_mod
from crossent.ops import chunked

TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


def reference(
    x,
    w,
    t,
    *,
    linear_bias=None,
    weight=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
):
    """The loss composed from torch ops (the oracle)."""
    logits = F.linear(x, w, linear_bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat_logits = logits.reshape(-1, w.shape[0])
    flat_t = t.reshape(-1)
    loss = F.cross_entropy(
        flat_logits,
        flat_t,
        weight=weight,
        reduction=reduction,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )
    if z_loss:
        keep = flat_t != ignore_index
        z = torch.where(keep, z_loss * torch.logsumexp(flat_logits, -1) ** 2, 0.0)
        if reduction == "none":
            loss = loss + z
        elif reduction == "sum":
            loss = loss + z.sum()
        else:
            if weight is None:
                denom = keep.sum()
            else:
                denom = torch.where(keep, weight[flat_t.clamp(0, w.shape[0] - 1)], 0.0).sum()
            loss = loss + z.sum() / denom
    if reduction == "none":
        loss = loss.reshape(t.shape)
    return loss


def make(n, d, v, dtype=torch.float64, bias=False, class_weight=False, seed=0, ignore_every=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, generator=gen, dtype=torch.float64) * d**-0.5 * 2).to(dtype)
    b = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        t[::ignore_every] = -100
    cw = torch.rand(v, generator=gen, dtype=torch.float64).add(0.1).to(dtype)
    return x, w, b, t, (cw if class_weight else None)


def run(fn, x, w, b, t, upstream_seed=1, **kw):
    """Value and gradients (w.r.t. x, w, b) under a random upstream gradient."""
    leaves = [x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()]
    if b is not None:
        leaves.append(b.detach().clone().requires_grad_())
    out = fn(leaves[0], leaves[1], t, linear_bias=leaves[2] if b is not None else None, **kw)
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out.detach(), grads


def assert_matches(ours, theirs, tol):
    (a, ga), (b, gb) = ours, theirs
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True)
    for g1, g2 in zip(ga, gb, strict=True):
        assert g1.dtype == g2.dtype and g1.shape == g2.shape
        gscale = max(1.0, float(g2.abs().max())) if g2.numel() else 1.0
        torch.testing.assert_close(
            g1, g2, rtol=tol["rtol"], atol=tol["atol"] * gscale, equal_nan=True
        )


OPTIONS = [
    {},
    {"label_smoothing": 0.15},
    {"z_loss": 1e-2},
    {"softcap": 1.5},
    {"class_weight": True},
    {"class_weight": True, "label_smoothing": 0.3, "z_loss": 0.05},
    {"softcap": 2.0, "label_smoothing": 0.2, "z_loss": 0.1},
    {"class_weight": True, "softcap": 1.0, "label_smoothing": 1.0, "z_loss": 0.02},
]


def _split(opts):
    opts = dict(opts)
    return opts.pop("class_weight", False), opts


@pytest.fixture(params=["host", "accelerator"])
def code_path(request, monkeypatch):
    """Run the host path (row compaction, fused softmax) and the sync-free accelerator path
    (masking, separate softmax passes) that CUDA tensors take, both on CPU."""
    if request.param == "accelerator":
        monkeypatch.setattr(chunked, "_on_host", lambda t: False)
    return request.param


# --------------------------------------------------------------------------------------------
# Values and gradients.


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_float64_matches_torch(reduction, opts, bias, code_path):
    class_weight, kw = _split(opts)
    x, w, b, t, cw = make(23, 6, 13, bias=bias, class_weight=class_weight, ignore_every=4)
    kw = dict(kw, reduction=reduction, weight=cw)
    ours = run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=5, **kw)
    theirs = run(reference, x, w, b, t, **kw)
    assert_matches(ours, theirs, TOL[torch.float64])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS[:4] + OPTIONS[5:6], ids=lambda o: ",".join(o) or "plain")
def test_float32_matches_torch(reduction, opts):
    class_weight, kw = _split(opts)
    x, w, b, t, cw = make(
        70, 32, 257, dtype=torch.float32, bias=True, class_weight=class_weight, ignore_every=7
    )
    kw = dict(kw, reduction=reduction, weight=cw)
    ours = run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=16, **kw)
    theirs = run(reference, x, w, b, t, **kw)
    assert_matches(ours, theirs, TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_accumulates_in_float32(dtype, reduction):
    x, w, b, t, _ = make(40, 16, 97, dtype=dtype, bias=True, ignore_every=5)
    ours = run(crossent.linear_cross_entropy, x, w, b, t, reduction=reduction, chunk_size=7)
    # Oracle: float64 on the same (rounded) inputs, rounded to the input dtype once.
    exact = run(reference, x.double(), w.double(), b.double(), t, reduction=reduction)
    value, grads = ours
    assert value.dtype == dtype and all(g.dtype == dtype for g in grads)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(value.double(), exact[0], rtol=2 * eps, atol=2 * eps)
    for g, e in zip(grads, exact[1], strict=True):
        torch.testing.assert_close(g.double(), e, rtol=2 * eps, atol=2 * eps * e.abs().max())


def test_weight_gradient_accumulates_in_float32_across_chunks():
    # 4096 chunks of one token each: a bf16 running sum would lose every contribution below
    # 2^-8 of the total; fp32 accumulation keeps the gradient at bf16 rounding of the truth.
    x, w, _, t, _ = make(4096, 8, 3, dtype=torch.bfloat16, seed=3)
    ours = run(crossent.linear_cross_entropy, x, w, None, t, reduction="sum", chunk_size=1)
    exact = run(reference, x.double(), w.double(), None, t, reduction="sum")
    g_w, e_w = ours[1][1].double(), exact[1][1]
    torch.testing.assert_close(g_w, e_w, rtol=2**-7, atol=2**-7 * e_w.abs().max())


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 22, 23, 24, 1000, None])
def test_chunk_boundaries(chunk_size):
    x, w, b, t, cw = make(23, 5, 11, bias=True, class_weight=True, ignore_every=3)
    kw = dict(weight=cw, label_smoothing=0.1, z_loss=0.01)
    ours = run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=chunk_size, **kw)
    theirs = run(reference, x, w, b, t, **kw)
    assert_matches(ours, theirs, TOL[torch.float64])


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_batched_input_and_none_shape(softcap):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 9, (3, 4), generator=gen)
    t[1, 2] = -100
    for reduction in ("none", "mean", "sum"):
        kw = dict(reduction=reduction, softcap=softcap)
        ours = run(crossent.linear_cross_entropy, x, w, None, t, chunk_size=5, **kw)
        theirs = run(reference, x, w, None, t, **kw)
        assert_matches(ours, theirs, TOL[torch.float64])
    none = crossent.linear_cross_entropy(x, w, t, reduction="none")
    assert none.shape == (3, 4) and none[1, 2] == 0


@pytest.mark.parametrize("target_shape", [(), (1,)])
def test_unbatched_input_like_torch(target_shape):
    x, w, _, t, _ = make(1, 6, 7)
    x1, t1 = x[0], t[0].reshape(target_shape)
    for reduction in ("none", "mean", "sum"):
        ours = crossent.linear_cross_entropy(x1, w, t1, reduction=reduction)
        theirs = F.linear_cross_entropy(x1, w, t1, reduction=reduction)
        assert ours.shape == theirs.shape == ()
        torch.testing.assert_close(ours, theirs, **TOL[torch.float64])


def test_matches_torch_linear_cross_entropy_directly():
    x, w, b, t, cw = make(30, 8, 17, bias=True, class_weight=True, ignore_every=4)
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=cw, reduction=reduction, label_smoothing=0.2)
        ours = run(crossent.linear_cross_entropy, x, w, b, t, **kw)
        theirs = run(F.linear_cross_entropy, x, w, b, t, **kw)
        assert_matches(ours, theirs, TOL[torch.float64])


def test_large_logits_stay_finite_and_exact():
    x, w, b, t, _ = make(16, 4, 10, bias=True)
    x = x * 200.0  # logits in the thousands: exp overflows without the max shift
    for opts in ({}, {"z_loss": 1e-3}, {"label_smoothing": 0.1}):
        ours = run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=3, **opts)
        theirs = run(reference, x, w, b, t, **opts)
        assert torch.isfinite(ours[0]).all()
        assert_matches(ours, theirs, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_losses_beyond_underflow_of_target_probability(dtype, code_path):
    """Rows whose target probability underflows (loss of hundreds) are still exact."""
    x, w, b, t, _ = make(12, 4, 9, bias=True, seed=4)
    x = x.to(dtype) * 300.0
    w, b = w.to(dtype), b.to(dtype)
    logits = F.linear(x.double(), w.double(), b.double())
    t = logits.argmin(1)  # the least likely class: losses in the hundreds or thousands
    t[::3] = logits[::3].argmax(1)  # and some confident rows next to them
    for opts in ({}, {"z_loss": 1e-4}, {"softcap": 50.0}):
        for reduction in ("none", "sum"):
            kw = dict(reduction=reduction, **opts)
            ours = run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=5, **kw)
            exact = run(reference, x.double(), w.double(), b.double(), t, **kw)
            assert torch.isfinite(ours[0]).all()
            cast = (exact[0].to(dtype), tuple(g.to(dtype) for g in exact[1]))
            assert_matches(ours, cast, TOL[dtype])


def test_nan_logits_propagate():
    x, w, _, t, _ = make(6, 3, 5)
    x[2, 0] = float("nan")
    value = crossent.linear_cross_entropy(x, w, t, reduction="none")
    assert torch.isnan(value[2]) and torch.isfinite(value[torch.arange(6) != 2]).all()


def test_odd_and_single_class():
    for v in (1, 2, 31):
        x, w, b, t, _ = make(9, 3, v, bias=True)
        ours = run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=4, z_loss=0.1)
        theirs = run(reference, x, w, b, t, z_loss=0.1)
        assert_matches(ours, theirs, TOL[torch.float64])


def test_uint8_target_equals_int64():
    x, w, b, t, _ = make(20, 4, 12, bias=True)
    a = run(crossent.linear_cross_entropy, x, w, b, t)
    c = run(crossent.linear_cross_entropy, x, w, b, t.to(torch.uint8))
    assert_matches(a, c, dict(rtol=0, atol=0))


@pytest.mark.parametrize("shape", [(4, 0), (2, 3, 0), (0,)])
def test_zero_hidden_size_gives_log_num_classes(shape, code_path):
    """D = 0: every logit is 0 (or the bias), the loss log V, as torch; gradients are empty."""
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(13, 0, dtype=torch.float64)
    t = torch.randint(0, 13, shape[:-1])
    for reduction in ("mean", "sum", "none"):
        ours = run(crossent.linear_cross_entropy, x, w, None, t, reduction=reduction)
        theirs = run(reference, x, w, None, t, reduction=reduction)
        assert_matches(ours, theirs, TOL[torch.float64])
        if reduction == "mean":
            torch.testing.assert_close(ours[0], torch.tensor(13.0, dtype=x.dtype).log())
    b = torch.randn(13, dtype=torch.float64)
    ours = run(crossent.linear_cross_entropy, x, w, b, t, label_smoothing=0.1, z_loss=0.01)
    theirs = run(reference, x, w, b, t, label_smoothing=0.1, z_loss=0.01)
    assert_matches(ours, theirs, TOL[torch.float64])


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}, {"softcap": 5.0}])
def test_infinite_logit_in_kept_row_is_nan_like_torch(opts, code_path):
    """A kept row with a +inf logit: log_softmax is NaN there (inf - inf), so is the loss."""
    x, w, b, t, _ = make(6, 3, 7, bias=True)
    w[:, 0] = torch.linspace(-1.0, 1.0, 7, dtype=w.dtype)  # row 2's logits: -inf ... +inf
    x[2, 0] = float("inf")
    t[2] = 0  # the target logit of row 2 is -inf, so the old lse fallback said inf
    for reduction in ("none", "mean", "sum"):
        ours = crossent.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, **opts)
        theirs = reference(x, w, t, linear_bias=b, reduction=reduction, **opts)
        torch.testing.assert_close(ours, theirs, equal_nan=True, **TOL[torch.float64])
        if "softcap" not in opts:  # softcap maps inf to the finite cap
            assert torch.isnan(ours.reshape(-1)[2 if reduction == "none" else 0])


@pytest.mark.parametrize("opts", [{"label_smoothing": 0.1}, {"label_smoothing": 1.0}, {}])
def test_zero_weight_on_every_kept_target_mean_is_nan_like_torch(opts, code_path):
    """'mean' = target term / Σ w_t + smoothing term / Σ w_t: 0/0 + x/0 is NaN, not inf."""
    x, w, b, t, cw = make(8, 3, 6, bias=True, class_weight=True, ignore_every=3)
    t[t >= 0] = t[t >= 0] % 2  # the kept targets are classes 0 and 1 ...
    cw[:2] = 0.0  # ... whose weight is 0; the other classes keep theirs
    ours = run(crossent.linear_cross_entropy, x, w, b, t, weight=cw, **opts)
    theirs = run(reference, x, w, b, t, weight=cw, **opts)
    assert torch.isnan(theirs[0]) and torch.isnan(ours[0])
    for g1, g2 in zip(ours[1], theirs[1], strict=True):
        assert torch.equal(torch.isfinite(g1), torch.isfinite(g2))
    for reduction in ("sum", "none"):  # finite there, and equal to torch's
        ours = run(
            crossent.linear_cross_entropy, x, w, b, t, weight=cw, reduction=reduction, **opts
        )
        theirs = run(reference, x, w, b, t, weight=cw, reduction=reduction, **opts)
        assert_matches(ours, theirs, TOL[torch.float64])


def test_large_logits_cost_no_extra_matmul():
    """Rows whose target probability underflows (losses ~120, logit scale ~30) read lse from
    their largest probability: the same matmuls as at unit scale, no recomputation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                self.count += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for scale in (1.0, 30.0):
        x, w, _, t, _ = make(48, 16, 500, dtype=torch.float32, seed=2)
        x, w = x * scale**0.5, w * scale**0.5
        with CountMatmuls() as mode:
            ours = run(
                crossent.linear_cross_entropy, x, w, None, t, reduction="none", chunk_size=16
            )
        counts.append(mode.count)
        exact = run(reference, x.double(), w.double(), None, t, reduction="none")
        if scale > 1:
            # most rows are past where p_t is read (p_t < tiny/eps: a loss above ~71)
            assert (exact[0] > 72).double().mean() > 0.5
        assert_matches(
            ours, (exact[0].float(), tuple(g.float() for g in exact[1])), TOL[torch.float32]
        )
    assert counts[0] == counts[1], counts


# --------------------------------------------------------------------------------------------
# Ignored tokens.


@pytest.mark.parametrize("ignore_index", [-100, 2, None])
def test_ignore_index_values(ignore_index, code_path):
    x, w, b, t, cw = make(25, 5, 8, bias=True, class_weight=True)
    t[::3] = -100 if ignore_index is None else ignore_index
    for reduction in ("mean", "sum", "none"):
        kw = dict(weight=cw, reduction=reduction, label_smoothing=0.1)
        ours = run(crossent.linear_cross_entropy, x, w, b, t, ignore_index=ignore_index, **kw)
        theirs = run(F.linear_cross_entropy, x, w, b, t, ignore_index=ignore_index, **kw)
        assert_matches(ours, theirs, TOL[torch.float64])


@pytest.mark.parametrize("opts", [{}, {"label_smoothing": 0.2, "z_loss": 0.1, "softcap": 2.0}])
def test_all_ignored(opts, code_path):
    x, w, b, t, cw = make(10, 4, 6, bias=True, class_weight=True)
    t[:] = -100
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        value, grads = run(
            crossent.linear_cross_entropy, x, w, b, t, weight=cw, reduction=reduction, **opts
        )
        torch_value = F.linear_cross_entropy(x, w, t, linear_bias=b, weight=cw, reduction=reduction)
        torch.testing.assert_close(value, torch_value, equal_nan=True)
        torch.testing.assert_close(value, torch.tensor(expected, dtype=x.dtype), equal_nan=True)
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))  # zeros, not NaN (as torch)
    value, grads = run(crossent.linear_cross_entropy, x, w, b, t, reduction="none", **opts)
    assert torch.equal(value, torch.zeros(10, dtype=x.dtype))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nonfinite_ignored_row_contributes_nothing(bad, reduction, code_path):
    """An ignored token contributes nothing, whatever its hidden state holds: its gradient row
    is 0 and the weight gradient is the one without it. (torch's composition gives NaN in all
    of grad_W and in that row, by 0·NaN in the log_softmax backward; documented.)"""
    x, w, b, t, cw = make(9, 4, 6, bias=True, class_weight=True)
    t[[2, 5]] = -100
    x[2, 1] = bad
    x[5] = bad
    kept = t != -100
    kw = dict(weight=cw, reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    upstream = torch.linspace(0.5, 1.5, 9, dtype=x.dtype)

    def value_and_grads(fn, x, t, upstream):
        leaves = [a.clone().requires_grad_() for a in (x, w, b)]
        out = fn(leaves[0], leaves[1], t, linear_bias=leaves[2], **kw)
        grad_out = upstream if reduction == "none" else upstream[0]
        return out.detach(), torch.autograd.grad(out, leaves, grad_out)

    value, (gx, gw, gb) = value_and_grads(crossent.linear_cross_entropy, x, t, upstream)
    ref_value, (rgx, rgw, rgb) = value_and_grads(reference, x[kept], t[kept], upstream[kept])
    if reduction == "none":
        assert torch.equal(value[~kept], torch.zeros(2, dtype=x.dtype))
        value = value[kept]
    torch.testing.assert_close(value, ref_value, **TOL[torch.float64])
    assert torch.equal(gx[~kept], torch.zeros_like(gx[~kept]))
    for ours, theirs in ((gx[kept], rgx), (gw, rgw), (gb, rgb)):
        torch.testing.assert_close(ours, theirs, **TOL[torch.float64])


def test_empty_batch():
    x, w, b, t, _ = make(0, 4, 6, bias=True)
    for reduction in ("mean", "sum", "none"):
        ours = run(crossent.linear_cross_entropy, x, w, b, t, reduction=reduction)
        theirs = run(reference, x, w, b, t, reduction=reduction)
        assert_matches(ours, theirs, TOL[torch.float64])


def test_zero_total_weight_gives_nan_like_torch():
    x, w, _, t, _ = make(6, 3, 4)
    cw = torch.zeros(4, dtype=torch.float64)
    ours = run(crossent.linear_cross_entropy, x, w, None, t, weight=cw)
    theirs = run(reference, x, w, None, t, weight=cw)
    assert torch.isnan(ours[0]) and torch.isnan(theirs[0])
    for g1, g2 in zip(ours[1], theirs[1], strict=True):
        assert torch.equal(torch.isnan(g1), torch.isnan(g2))


def test_ignored_rows_cost_no_matmul_work(monkeypatch):
    """On the host the ignored rows are dropped before the first matmul."""
    x, w, _, t, _ = make(40, 4, 6)
    t[10:] = -100
    seen = []
    real = chunked._chunked_pass

    def spy(rows, *args, **kwargs):
        seen.append(rows.x.shape[0])
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(chunked, "_chunked_pass", spy)
    run(crossent.linear_cross_entropy, x, w, None, t, reduction="none")
    assert seen == [10, 10]  # forward (loss) and backward (recompute): 10 kept rows each


# --------------------------------------------------------------------------------------------
# Autograd contract.


def test_reduction_none_gradient_with_random_upstream(code_path):
    x, w, b, t, cw = make(17, 5, 9, bias=True, class_weight=True, ignore_every=5)
    kw = dict(weight=cw, reduction="none", z_loss=0.05, label_smoothing=0.1)
    for seed in (1, 2):
        ours = run(
            crossent.linear_cross_entropy, x, w, b, t, upstream_seed=seed, chunk_size=4, **kw
        )
        theirs = run(reference, x, w, b, t, upstream_seed=seed, **kw)
        assert_matches(ours, theirs, TOL[torch.float64])


def test_gradcheck_against_finite_differences():
    x, w, b, t, cw = make(7, 3, 5, bias=True, class_weight=True, ignore_every=3)
    for reduction in ("mean", "none"):

        def fn(x_, w_, b_, reduction=reduction):
            return crossent.linear_cross_entropy(
                x_, w_, t, linear_bias=b_, weight=cw, reduction=reduction,
                label_smoothing=0.1, z_loss=0.05, softcap=2.0, chunk_size=3,
            )  # fmt: skip

        inputs = tuple(a.clone().requires_grad_() for a in (x, w, b))
        assert torch.autograd.gradcheck(fn, inputs, check_batched_grad=True)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": True, "class_weight": True, "label_smoothing": 0.1, "z_loss": 0.01},
        {"softcap": 2.0, "label_smoothing": 0.2},
    ],
    ids=["plain", "bias-weight-smoothing-zloss", "softcap"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_gradients_equal_one_backward_per_upstream(reduction, options, dtype):
    """``autograd.grad(..., is_grads_batched=True)`` (vmap over the backward) gives, for each
    upstream gradient, what one backward with it gives; ignored rows holding NaN add nothing."""
    options = dict(options)
    x, w, b, t, cw = make(
        8, 3, 5, dtype, bias=options.pop("bias", False),
        class_weight=options.pop("class_weight", False), ignore_every=3,
    )  # fmt: skip
    x[3, 1] = float("nan")  # an ignored row
    leaves = [a.clone().requires_grad_() for a in (x, w, b) if a is not None]
    out = crossent.linear_cross_entropy(
        leaves[0], leaves[1], t, linear_bias=b if b is None else leaves[2], weight=cw,
        reduction=reduction, chunk_size=3, **options,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    upstream = torch.randn((4, *out.shape), generator=gen, dtype=torch.float64).to(dtype)
    batched = torch.autograd.grad(out, leaves, upstream, retain_graph=True, is_grads_batched=True)
    for k in range(upstream.shape[0]):
        one = torch.autograd.grad(out, leaves, upstream[k], retain_graph=True)
        for got, want in zip(batched, one, strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got[k], want, **TOL[dtype])
    assert torch.equal(batched[0][:, 3], torch.zeros_like(batched[0][:, 3]))


def test_batched_gradients_of_soft_targets_say_they_are_not_supported():
    x, w, _, _, _ = make(4, 3, 5)
    probs = torch.softmax(torch.randn(4, 5, dtype=x.dtype), 1)
    xx = x.clone().requires_grad_()
    out = crossent.linear_cross_entropy(xx, w, probs)
    with pytest.raises(NotImplementedError, match="batched gradients"):
        torch.autograd.grad(out, xx, torch.ones(2, dtype=x.dtype), is_grads_batched=True)


def test_grad_output_scaling_and_retain_graph():
    x, w, b, t, _ = make(12, 4, 7, bias=True, ignore_every=4)
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    loss = crossent.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2])
    (loss * 3.0).backward(retain_graph=True)
    first = [a.grad.clone() for a in leaves]
    (loss * 3.0).backward()  # second backward recomputes: grads accumulate to twice the first
    ref_leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    (reference(ref_leaves[0], ref_leaves[1], t, linear_bias=ref_leaves[2]) * 3.0).backward()
    for a, f, r in zip(leaves, first, ref_leaves, strict=True):
        torch.testing.assert_close(f, r.grad, **TOL[torch.float64])
        torch.testing.assert_close(a.grad, 2 * r.grad, **TOL[torch.float64])


def test_only_some_parameters_require_grad():
    x, w, b, t, _ = make(11, 4, 7, bias=True)
    xr = x.clone().requires_grad_()
    loss = crossent.linear_cross_entropy(xr, w, t, linear_bias=b, reduction="sum")
    (gx,) = torch.autograd.grad(loss, [xr])
    xr2 = x.clone().requires_grad_()
    (gx_ref,) = torch.autograd.grad(reference(xr2, w, t, linear_bias=b, reduction="sum"), [xr2])
    torch.testing.assert_close(gx, gx_ref, **TOL[torch.float64])


def test_no_grad_mode_returns_plain_value():
    x, w, b, t, _ = make(11, 4, 7, bias=True)
    with torch.no_grad():
        out = crossent.linear_cross_entropy(x.requires_grad_(), w, t, linear_bias=b)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, reference(x.detach(), w, t, linear_bias=b))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_double_backward_is_refused_clearly(reduction):
    x, w, _, t, _ = make(5, 3, 4)
    xr = x.clone().requires_grad_()
    loss = crossent.linear_cross_entropy(xr, w, t, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, [xr], create_graph=True)


def test_inputs_are_not_mutated(code_path):
    x, w, b, t, cw = make(13, 4, 6, bias=True, class_weight=True, ignore_every=3)
    originals = [a.clone() for a in (x, w, b, t, cw)]
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    snapshot = [a.detach().clone() for a in leaves]
    for reduction in ("mean", "none"):
        out = crossent.linear_cross_entropy(
            leaves[0], leaves[1], t, linear_bias=leaves[2], weight=cw, reduction=reduction,
            softcap=2.0, label_smoothing=0.1,
        )  # fmt: skip
        out.sum().backward()
    for a, o in zip((x, w, b, t, cw), originals, strict=True):
        assert torch.equal(a, o)
    for a, o in zip(leaves, snapshot, strict=True):
        assert torch.equal(a.detach(), o)
    tu = t.clamp(min=0).to(torch.uint8)
    tu_copy = tu.clone()
    crossent.linear_cross_entropy(x, w, tu)
    assert torch.equal(tu, tu_copy)


def test_upstream_network_gradient_is_intact():
    """Gradients flow on to whatever produced the hidden states (Liger #272 corrupted them)."""
    gen = torch.Generator().manual_seed(8)
    inp = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    proj = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 6, (9,), generator=gen)
    hidden = torch.tanh(inp @ proj.T)
    (g_ours,) = torch.autograd.grad(crossent.linear_cross_entropy(hidden, w, t), [proj])
    hidden = torch.tanh(inp @ proj.T)
    (g_ref,) = torch.autograd.grad(reference(hidden, w, t), [proj])
    torch.testing.assert_close(g_ours, g_ref, **TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# Property test.


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(0, 19),
    d=st.integers(1, 6),
    v=st.integers(1, 12),
    chunk=st.one_of(st.none(), st.integers(1, 8)),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    bias=st.booleans(),
    class_weight=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.25, 1.0]),
    z_loss=st.sampled_from([0.0, 0.03]),
    softcap=st.sampled_from([None, 0.7, 5.0]),
    ignore_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_property_matches_torch(
    n, d, v, chunk, reduction, bias, class_weight, label_smoothing, z_loss, softcap,
    ignore_frac, seed,
):  # fmt: skip
    x, w, b, t, cw = make(n, d, v, bias=bias, class_weight=class_weight, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    t = torch.where(torch.rand(n, generator=gen) < ignore_frac, -100, t)
    kw = dict(
        weight=cw, reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap,
    )  # fmt: skip
    ours = run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=chunk, **kw)
    theirs = run(reference, x, w, b, t, **kw)
    assert_matches(ours, theirs, TOL[torch.float64])


# --------------------------------------------------------------------------------------------
# Bad arguments: torch's exception types, messages that say what was expected and given.

X = torch.randn(3, 4)
W = torch.randn(5, 4)
T = torch.tensor([0, 1, 2])

BAD = [
    ("in_features", dict(linear_weight=torch.randn(5, 3)), RuntimeError, "in_features"),
    ("bias shape", dict(linear_bias=torch.randn(4)), RuntimeError, r"linear_bias shape \(5,\)"),
    ("target length", dict(target=torch.tensor([0, 1])), ValueError, "batch_size"),
    ("target 0-d", dict(target=torch.tensor(0)), ValueError, "batch_size"),
    ("target 2-d", dict(target=torch.zeros(3, 1, dtype=torch.long)), RuntimeError, "multi-target"),
    ("target float", dict(target=T.float()), RuntimeError, "Long or Byte, but got Float"),
    ("target int32", dict(target=T.int()), RuntimeError, "Long or Byte, but got Int"),
    ("target bool", dict(target=T.bool()), RuntimeError, "Long or Byte, but got Bool"),
    ("target high", dict(target=torch.tensor([0, 1, 5])), IndexError, r"Target 5 .*\[0, 5\)"),
    ("target negative", dict(target=torch.tensor([0, -1, 2])), IndexError, "Target -1"),
    ("weight dtype", dict(linear_weight=W.double()), RuntimeError, "same dtype"),
    ("input dtype", dict(input=X.double()), RuntimeError, "same dtype"),
    ("bias dtype", dict(linear_bias=torch.randn(5).double()), RuntimeError, "same dtype"),
    ("integer input", dict(input=X.long(), linear_weight=W.long()), NotImplementedError, "Long"),
    ("label_smoothing", dict(label_smoothing=1.5), RuntimeError, "between 0.0 and 1.0"),
    ("reduction", dict(reduction="avg"), ValueError, "avg is not a valid value"),
    ("class weight shape", dict(weight=torch.ones(4)), RuntimeError, "all 5 classes"),
    ("class weight dtype", dict(weight=torch.ones(5).double()), RuntimeError, "scalar type"),
    ("ignore_index float", dict(ignore_index=1.5), TypeError, "ignore_index"),
    ("0-d input", dict(input=torch.tensor(1.0)), RuntimeError, "dimensionality"),
    ("1-d weight", dict(linear_weight=torch.randn(4)), RuntimeError, "dimensionality"),
]

OURS_ONLY = [
    ("softcap zero", dict(softcap=0.0), ValueError, "softcap"),
    ("softcap negative", dict(softcap=-1.0), ValueError, "softcap"),
    ("softcap nan", dict(softcap=float("nan")), ValueError, "softcap"),
    ("z_loss negative", dict(z_loss=-0.1), ValueError, "z_loss"),
    ("z_loss string", dict(z_loss="big"), TypeError, "z_loss"),
    ("chunk_size zero", dict(chunk_size=0), ValueError, "chunk_size"),
    ("chunk_size float", dict(chunk_size=2.5), TypeError, "chunk_size"),
    (
        "probability target with z_loss",
        dict(target=torch.rand(3, 5), z_loss=0.1),
        NotImplementedError,
        "class-probability",
    ),
    (
        "probability target with softcap",
        dict(target=torch.rand(3, 5), softcap=30.0),
        NotImplementedError,
        "class-probability",
    ),
    ("K-dim weight", dict(linear_weight=torch.randn(5, 2, 4)), NotImplementedError, "K-dim"),
    (
        "weight requires grad",
        dict(weight=torch.ones(5, requires_grad=True)),
        RuntimeError,
        "not differentiable",
    ),
    (
        "3-d target rank",
        dict(input=X.reshape(3, 1, 4), target=T),
        ValueError,
        r"mismatch.*\(3, 1\)",
    ),
    (
        "3-d target extra dim",
        dict(input=X.reshape(3, 1, 4), target=T.reshape(3, 1, 1)),
        RuntimeError,
        "multi-target",
    ),
    (
        "3-d target size",
        dict(input=X.reshape(3, 1, 4), target=T.reshape(1, 3)),
        ValueError,
        "batch_size",
    ),
    ("1-d input target", dict(input=X[0], target=T), ValueError, "1D target must have size 1"),
]


def _call(fn, overrides):
    kw = dict(input=X, linear_weight=W, target=T)
    kw.update(overrides)
    return fn(kw.pop("input"), kw.pop("linear_weight"), kw.pop("target"), **kw)


@pytest.mark.parametrize("name,overrides,exc,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise_like_torch(name, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(crossent.linear_cross_entropy, overrides)
    torch_overrides = dict(overrides)
    with pytest.raises(exc):  # torch raises the same type
        _call(F.linear_cross_entropy, torch_overrides)


@pytest.mark.parametrize("name,overrides,exc,pattern", OURS_ONLY, ids=[b[0] for b in OURS_ONLY])
def test_bad_arguments_ours_only(name, overrides, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(crossent.linear_cross_entropy, overrides)


def test_out_of_range_message_names_range_and_value():
    with pytest.raises(IndexError) as info:
        crossent.linear_cross_entropy(X, W, torch.tensor([0, 7, 1]))
    message = str(info.value)
    assert "Target 7 is out of bounds" in message and "5 classes" in message and "[0, 5)" in message


def test_ignored_out_of_range_target_is_fine():
    out = crossent.linear_cross_entropy(X, W, torch.tensor([0, 255, 1]), ignore_index=255)
    torch.testing.assert_close(
        out, F.cross_entropy(X @ W.T, torch.tensor([0, 255, 1]), ignore_index=255)
    )


def test_negative_label_smoothing_means_none_as_in_torch():
    a = crossent.linear_cross_entropy(X, W, T, label_smoothing=-0.5)
    torch.testing.assert_close(a, F.linear_cross_entropy(X, W, T, label_smoothing=-0.5))
    torch.testing.assert_close(a, crossent.linear_cross_entropy(X, W, T))


# --------------------------------------------------------------------------------------------
# Module, exports, dispatch, chunk sizing.


def test_module_matches_functional_and_torch_module():
    torch.manual_seed(0)
    cw = torch.rand(7) + 0.5
    ours = crossent.nn.LinearCrossEntropyLoss(
        5, 7, bias=True, weight=cw, ignore_index=3, label_smoothing=0.1, reduction="sum"
    )
    theirs = torch.nn.LinearCrossEntropyLoss(
        5, 7, bias=True, weight=cw, ignore_index=3, label_smoothing=0.1, reduction="sum"
    )
    assert isinstance(ours, torch.nn.LinearCrossEntropyLoss)
    assert set(ours.state_dict()) == set(theirs.state_dict()) == {
        "weight", "linear.weight", "linear.bias"
    }  # fmt: skip
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(11, 5)
    t = torch.randint(0, 7, (11,))
    t[::4] = 3
    a, b = ours(x, t), theirs(x, t)
    torch.testing.assert_close(a, b, **TOL[torch.float32])
    a.backward()
    b.backward()
    torch.testing.assert_close(
        ours.linear.weight.grad, theirs.linear.weight.grad, **TOL[torch.float32]
    )
    torch.testing.assert_close(ours.linear.bias.grad, theirs.linear.bias.grad, **TOL[torch.float32])
    assert "z_loss=0.0" in repr(ours) and "softcap=None" in repr(ours)


def test_module_extras_and_constructor_checks():
    m = crossent.nn.LinearCrossEntropyLoss(4, 6, z_loss=0.01, softcap=3.0, chunk_size=2)
    m.double()
    x = torch.randn(5, 4, dtype=torch.float64)
    t = torch.randint(0, 6, (5,))
    expected = reference(x, m.linear.weight, t, z_loss=0.01, softcap=3.0)
    torch.testing.assert_close(m(x, t), expected, **TOL[torch.float64])
    with pytest.raises(RuntimeError, match="weight shape"):
        crossent.nn.LinearCrossEntropyLoss(4, 6, weight=torch.ones(5))
    with pytest.raises(RuntimeError, match="label_smoothing"):
        crossent.nn.LinearCrossEntropyLoss(4, 6, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="softcap"):
        crossent.nn.LinearCrossEntropyLoss(4, 6, softcap=0)
    with pytest.raises(ValueError, match="z_loss"):
        crossent.nn.LinearCrossEntropyLoss(4, 6, z_loss=-1)


def test_exports():
    assert crossent.linear_cross_entropy is linear_mod.linear_cross_entropy
    assert crossent.functional.linear_cross_entropy is linear_mod.linear_cross_entropy
    assert crossent.nn.LinearCrossEntropyLoss is linear_mod.LinearCrossEntropyLoss


def test_triton_dispatch_gets_2d_arguments_and_reshapes_none(monkeypatch):
    calls = []

    def fake_kernel(x2d, w, t1d, **kw):
        calls.append((x2d.shape, t1d.shape, t1d.dtype, kw))
        return reference(x2d, w, t1d, **{k: v for k, v in kw.items()})

    monkeypatch.setattr(linear_mod, "select_backend", lambda *tensors: "triton")
    monkeypatch.setattr(linear_mod.triton_ops, "linear_cross_entropy", fake_kernel)
    x = torch.randn(2, 3, 4)
    t = torch.randint(0, 5, (2, 3), dtype=torch.uint8)
    out = crossent.linear_cross_entropy(x, W, t, reduction="none", z_loss=0.1, chunk_size=2)
    assert out.shape == (2, 3)
    (x_shape, t_shape, t_dtype, kw) = calls[0]
    assert x_shape == (6, 4) and t_shape == (6,) and t_dtype == torch.int64
    assert kw["z_loss"] == 0.1 and kw["reduction"] == "none" and "chunk_size" not in kw


def test_chunk_rows_by_work_per_thread_on_the_host(monkeypatch):
    rows = chunked.choose_chunk_rows
    # 256 rows a thread, up to 64 MiB of scratch (524 float32 rows of 32000 classes)
    assert rows(10**6, 32000, torch.float32, threads=1) == 256
    assert rows(10**6, 32000, torch.float32, threads=2) == 512
    assert rows(10**6, 32000, torch.float32, threads=64) == 512
    assert rows(10**6, 32000, torch.float32, threads=2, softcap=True) == 256
    assert rows(10**6, 128256, torch.float32, threads=2) == 128
    assert rows(10**6, 32000, torch.float64, threads=2) == 256
    assert rows(300, 32000, torch.float32, threads=2) == 300
    assert rows(10**6, 32000, torch.float32, threads=2, chunk_size=7) == 7
    # the host pass asks for the current thread count
    seen = []
    real = chunked.choose_chunk_rows
    monkeypatch.setattr(
        chunked, "choose_chunk_rows", lambda *a, **k: seen.append(k) or real(*a, **k)
    )
    x, w, _, t, _ = make(8, 3, 5)
    with_threads = torch.get_num_threads()
    crossent.linear_cross_entropy(x, w, t)
    assert seen[-1]["threads"] == with_threads


def test_chunk_rows_from_budget():
    # Without a thread count (accelerators): 32 MiB of float32 rows of 32000 classes, 262
    # rows, rounded down to 256.
    assert chunked.choose_chunk_rows(10**6, 32000, torch.float32) == 256
    assert chunked.choose_chunk_rows(10**6, 32000, torch.float32, softcap=True) == 128
    assert chunked.choose_chunk_rows(10**6, 32000, torch.float64) == 128
    assert chunked.choose_chunk_rows(100, 32000, torch.float32) == 100
    assert chunked.choose_chunk_rows(10**6, 10**9, torch.float32) == 1
    assert chunked.choose_chunk_rows(50, 10, torch.float32, chunk_size=7) == 7
    assert chunked.choose_chunk_rows(5, 10, torch.float32, chunk_size=7) == 5
    assert chunked.choose_chunk_rows(0, 10, torch.float32) == 1


def test_no_full_logits_buffer_is_allocated(monkeypatch):
    """The largest scratch is one chunk: rows_per_chunk × V, never N × V."""
    shapes = []
    real_empty = torch.empty

    def spy_empty(*size, **kwargs):
        t = real_empty(*size, **kwargs)
        shapes.append(tuple(t.shape))
        return t

    monkeypatch.setattr(chunked.torch, "empty", spy_empty)
    x, w, b, t, _ = make(64, 4, 50, bias=True)
    run(crossent.linear_cross_entropy, x, w, b, t, chunk_size=8)
    assert (8, 50) in shapes
    assert all(s[0] * (s[1] if len(s) > 1 else 1) < 64 * 50 for s in shapes), shapes


# --------------------------------------------------------------------------------------------
# The CPU benchmark script stays runnable.


def test_benchmark_script_quick():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cpu.py"
    spec = importlib.util.spec_from_file_location("bench_cpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    times = bench.measure_times("linear", bench.LINEAR_VARIANTS, 32, 8, 50, repeats=1)
    assert set(times) == set(bench.LINEAR_VARIANTS) and all(t > 0 for t in times.values())
    times = bench.measure_times("ce", bench.CE_VARIANTS, 32, 8, 50, repeats=1)
    assert all(t > 0 for t in times.values())
    assert bench.measure_memory("linear", "crossent", 32, 8, 50) >= 0
    text = bench.table("t", ("torch eager", "crossent"), {"torch eager": 2.0, "crossent": 1.0},
                       {"torch eager": 4.0, "crossent": 1.0}, "torch eager")  # fmt: skip
    assert "| crossent | 1000 | 0.50 | 0.50 | 1.0 | 0.25 |" in text


def test_linear_benchmark_script_runs():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_linear.py"
    spec = importlib.util.spec_from_file_location("bench_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.CASES["tiny"] = dict(n=16, d=8, v=50, scale=30.0, dtype="float32")
    times = bench.measure_times("tiny", bench.VARIANTS, repeats=1)
    assert set(times) == set(bench.VARIANTS)
    assert all(wall > 0 and cpu >= 0 for wall, cpu in times.values())
