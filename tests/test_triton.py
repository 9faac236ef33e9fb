"""Triton kernels against torch eager: values, gradients, edge cases, custom ops, dispatch.

Without a CUDA device the kernels run under Triton's interpreter on CPU tensors. The interpreter
is switched on here, before the first kernel is decorated (``crossent.ops.triton`` decorates its
kernels lazily, at the first call, so the order of imports does not matter). Shapes are small
and chosen to cross every tile edge of the interpreter's block sizes (32 classes per block for
cross entropy; 16 x 32 x 16 tiles for linear cross entropy): V not a multiple of the block, D
larger than the block, N not a multiple of the row block.

Oracles: ``torch.nn.functional`` compositions on the same inputs, in float32 (tolerances ~1e-5)
or, for bfloat16 kernels, float32 torch on the bfloat16-rounded inputs (relative norm error
below 1e-2, the bfloat16 operand band of the device method notes).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel is decorated
pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import crossent.ops.triton as ct  # noqa: E402
from crossent._backend import select_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter runs kernels in NumPy, which warns where the GPU silently computes NaN or inf
# in lanes that tl.where then discards (e.g. 0 * -inf in masked lanes).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
REDUCTIONS = ["none", "mean", "sum"]
F32 = dict(rtol=2e-5, atol=2e-6)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (NaN-free inputs assumed)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def ce_oracle(logits, target, *, weight=None, ignore_index=-100, label_smoothing=0.0,
              z_loss=0.0, softcap=None, reduction="mean"):  # fmt: skip
    """torch eager: F.cross_entropy on soft-capped logits, plus the z-loss term by hand."""
    z = softcap * torch.tanh(logits / softcap) if softcap else logits
    loss = F.cross_entropy(
        z,
        target,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    if z_loss:
        keep = target != ignore_index
        zl = torch.where(keep, z_loss * torch.logsumexp(z, 1).square(), 0.0)
        if reduction == "none":
            loss = loss + zl
        elif reduction == "sum":
            loss = loss + zl.sum()
        else:
            tw = weight[target.clamp(0, z.shape[1] - 1)] if weight is not None else 1.0
            denom = torch.where(keep, tw * torch.ones_like(zl), 0.0).sum()
            loss = loss + zl.sum() / denom
    return loss


def run_both(fn, oracle, tensors: dict, grad_names: list[str], reduction: str, **kwargs):
    """Loss and gradients of ``fn`` and ``oracle`` on independent copies of ``tensors``."""
    results = []
    for f in (fn, oracle):
        args = {k: leaf(v) if k in grad_names else v.clone() for k, v in tensors.items()}
        out = f(**args, reduction=reduction, **kwargs)
        # a non-uniform upstream gradient, so that 'none' checks each row's own gradient
        upstream = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        grads = torch.autograd.grad(out, [args[k] for k in grad_names], upstream.to(out.device))
        results.append((out.detach(), grads))
    return results


# --------------------------------------------------------------------------- cross entropy


def make_ce(n=19, v=70, seed=0, dtype=torch.float32, n_ignored=3, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, v, generator=g)).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.randperm(n, generator=g)[:n_ignored]] = ignore_index
    weight = (torch.rand(v, generator=g) + 0.25).to(dtype)
    return logits.to(DEVICE), target.to(DEVICE), weight.to(DEVICE)


CE_OPTIONS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.2),
    dict(weight=True, label_smoothing=0.3),
    dict(softcap=4.0),
    dict(z_loss=1e-2),
    dict(weight=True, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
    dict(ignore_index=2, label_smoothing=0.1),  # a valid class as ignore_index
]


@pytest.mark.parametrize("options", CE_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_matches_torch_float32(options, reduction):
    options = dict(options)
    ignore_index = options.get("ignore_index", -100)
    logits, target, weight = make_ce(ignore_index=ignore_index)
    if options.pop("weight", False):
        options["weight"] = weight
    (out, (grad,)), (ref, (ref_grad,)) = run_both(
        ct.cross_entropy, ce_oracle, dict(logits=logits, target=target), ["logits"], reduction,
        **options,
    )  # fmt: skip
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **F32)
    torch.testing.assert_close(grad, ref_grad, **F32)


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(1, 20),
    v=st.integers(1, 75),
    seed=st.integers(0, 2**16),
    use_weight=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.05, 1.0]),
    softcap=st.sampled_from([None, 2.5, 30.0]),
    z_loss=st.sampled_from([0.0, 1e-4]),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_cross_entropy_random_matches_torch(
    n, v, seed, use_weight, smoothing, softcap, z_loss, reduction
):
    logits, target, weight = make_ce(n, v, seed, n_ignored=seed % (n + 1))
    if target.ne(-100).sum() == 0 and reduction == "mean":
        reduction = "sum"  # all ignored: NaN, tested separately
    opts = dict(weight=weight if use_weight else None, label_smoothing=smoothing,
                z_loss=z_loss, softcap=softcap)  # fmt: skip
    (out, (grad,)), (ref, (ref_grad,)) = run_both(
        ct.cross_entropy, ce_oracle, dict(logits=logits, target=target), ["logits"], reduction,
        **opts,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=5e-5, atol=5e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=5e-5, atol=5e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_bfloat16(reduction):
    logits, target, weight = make_ce(n=16, v=70, dtype=torch.bfloat16)
    opts = dict(weight=weight, label_smoothing=0.1, z_loss=1e-3, softcap=6.0)
    x = leaf(logits)
    out = ct.cross_entropy(x, target, reduction=reduction, **opts)
    assert out.dtype == torch.bfloat16
    out.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    x32 = leaf(logits.float())
    opts32 = dict(opts, weight=weight.float())
    ref = ce_oracle(x32, target, reduction=reduction, **opts32)
    ref.sum().backward()
    assert rel_err(out, ref) < 1e-2
    assert rel_err(x.grad, x32.grad) < 1e-2


def test_cross_entropy_all_ignored():
    logits, target, weight = make_ce(n=5, v=40, n_ignored=5)
    for w in (None, weight):
        x = leaf(logits)
        loss = ct.cross_entropy(x, target, weight=w, label_smoothing=0.1, z_loss=1e-3)
        assert torch.isnan(loss)  # torch: 0 / 0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))  # gradient 0, not NaN (torch too)
        ref_x = leaf(logits)
        F.cross_entropy(ref_x, target, weight=w, label_smoothing=0.1).backward()
        assert torch.equal(x.grad, ref_x.grad)
    assert ct.cross_entropy(logits, target, reduction="sum").item() == 0.0


def test_cross_entropy_non_finite_logits_like_torch():
    logits, target, _ = make_ce(n=6, v=40, n_ignored=0)
    target[5] = -100
    logits[0, 3] = float("inf")  # +inf: NaN loss and whole-row NaN gradient
    logits[1, (target[1] + 1) % 40] = float("-inf")  # -inf off target: finite, gradient 0
    logits[2, target[2]] = float("-inf")  # -inf on target: inf
    logits[5, 7] = float("nan")  # NaN in an ignored row: loss 0, gradient NaN (torch quirk)
    x, ref_x = leaf(logits), leaf(logits)
    out = ct.cross_entropy(x, target, reduction="none")
    ref = F.cross_entropy(ref_x, target, reduction="none")
    torch.testing.assert_close(out, ref, equal_nan=True, **F32)
    out[[1, 3, 4, 5]].sum().backward()
    ref[[1, 3, 4, 5]].sum().backward()
    assert torch.isnan(x.grad).equal(torch.isnan(ref_x.grad))
    torch.testing.assert_close(x.grad, ref_x.grad, equal_nan=True, **F32)
    assert torch.isnan(x.grad[5]).all() and torch.isnan(x.grad[0]).all()


def test_cross_entropy_strided_uint8_float64_and_empty():
    logits, target, weight = make_ce(n=12, v=50)
    target[target < 0] = 7
    wide = torch.randn(50, 12, dtype=torch.float64, device=DEVICE)
    x = leaf(wide)
    out = ct.cross_entropy(x.t(), target.to(torch.uint8), weight=weight.double())
    ref_x = leaf(wide)
    ref = F.cross_entropy(ref_x.t(), target, weight=weight.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    empty = torch.empty(0, 50, device=DEVICE)
    no_target = torch.empty(0, dtype=torch.long, device=DEVICE)
    assert torch.isnan(ct.cross_entropy(empty, no_target))
    assert ct.cross_entropy(empty, no_target, reduction="sum").item() == 0.0
    assert ct.cross_entropy(empty, no_target, reduction="none").shape == (0,)


def test_cross_entropy_does_not_mutate_inputs():
    logits, target, weight = make_ce()
    copies = [t.clone() for t in (logits, target, weight)]
    x = logits.clone().requires_grad_(True)
    ct.cross_entropy(x, target, weight=weight, label_smoothing=0.1, softcap=3.0).backward()
    for before, after in zip(copies, (x.detach(), target, weight), strict=True):
        assert torch.equal(before, after)
    assert x.grad.data_ptr() != x.data_ptr()


# --------------------------------------------------------------------------- linear cross entropy


def make_lce(n=37, d=40, v=70, seed=0, dtype=torch.float32, n_ignored=4):
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(n, d, generator=g).to(dtype)
    lin_w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    bias = (0.5 * torch.randn(v, generator=g)).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.randperm(n, generator=g)[:n_ignored]] = -100
    cw = (torch.rand(v, generator=g) + 0.25).to(dtype)
    return [t.to(DEVICE) for t in (inp, lin_w, bias, target, cw)]


def lce_oracle(input, linear_weight, target, *, linear_bias=None, **kwargs):
    return ce_oracle(F.linear(input, linear_weight, linear_bias), target, **kwargs)


LCE_OPTIONS = [
    dict(),
    dict(bias=True, weight=True, label_smoothing=0.2),
    dict(bias=True, softcap=3.0, z_loss=1e-2),
]


@pytest.mark.parametrize("options", LCE_OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_matches_torch_float32(options, reduction):
    inp, lin_w, bias, target, cw = make_lce()
    options = dict(options)
    tensors = dict(input=inp, linear_weight=lin_w, target=target)
    grad_names = ["input", "linear_weight"]
    if options.pop("bias", False):
        tensors["linear_bias"] = bias
        grad_names.append("linear_bias")
    if options.pop("weight", False):
        options["weight"] = cw
    (out, grads), (ref, ref_grads) = run_both(
        ct.linear_cross_entropy, lce_oracle, tensors, grad_names, reduction, **options
    )
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    for name, got, want in zip(grad_names, grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6, msg=name)


@settings(max_examples=5, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(1, 40),
    v=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    with_bias=st.booleans(),
    reduction=st.sampled_from(REDUCTIONS),
)
def test_linear_cross_entropy_random_shapes(n, d, v, seed, with_bias, reduction):
    inp, lin_w, bias, target, _ = make_lce(n, d, v, seed, n_ignored=seed % 3)
    tensors = dict(input=inp, linear_weight=lin_w, target=target)
    grad_names = ["input", "linear_weight"]
    if with_bias:
        tensors["linear_bias"] = bias
        grad_names.append("linear_bias")
    if target.ne(-100).sum() == 0 and reduction == "mean":
        reduction = "sum"
    (out, grads), (ref, ref_grads) = run_both(
        ct.linear_cross_entropy, lce_oracle, tensors, grad_names, reduction
    )
    torch.testing.assert_close(out, ref, rtol=5e-5, atol=5e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=5e-6)


def test_linear_cross_entropy_bfloat16():
    inp, lin_w, bias, target, cw = make_lce(dtype=torch.bfloat16)
    opts = dict(label_smoothing=0.1, z_loss=1e-3, softcap=8.0)
    leaves = [leaf(t) for t in (inp, lin_w, bias)]
    out = ct.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2],
                                  weight=cw, **opts)  # fmt: skip
    assert out.dtype == torch.bfloat16
    out.backward()
    refs = [leaf(t.float()) for t in (inp, lin_w, bias)]
    ref = lce_oracle(refs[0], refs[1], target, linear_bias=refs[2], weight=cw.float(), **opts)
    ref.backward()
    assert rel_err(out, ref) < 1e-2
    for got, want in zip(leaves, refs, strict=True):
        assert got.grad.dtype == torch.bfloat16
        assert rel_err(got.grad, want.grad) < 1e-2


def test_linear_cross_entropy_all_ignored_and_frozen_weight():
    inp, lin_w, bias, target, _ = make_lce(n=20, n_ignored=20)
    x = leaf(inp)
    loss = ct.linear_cross_entropy(x, lin_w, target, linear_bias=bias)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    inp, lin_w, bias, target, _ = make_lce(n=20)
    x, ref_x = leaf(inp), leaf(inp)
    ct.linear_cross_entropy(x, lin_w, target, reduction="sum").backward()  # weight frozen
    F.cross_entropy(F.linear(ref_x, lin_w), target, reduction="sum").backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=2e-6)


def test_linear_cross_entropy_does_not_mutate_inputs():
    tensors = make_lce(n=20)
    copies = [t.clone() for t in tensors]
    inp, lin_w, bias, target, cw = [leaf(t) if t.is_floating_point() else t for t in tensors]
    ct.linear_cross_entropy(inp, lin_w, target, linear_bias=bias, weight=cw.detach(),
                            label_smoothing=0.1).backward()  # fmt: skip
    for before, after in zip(copies, (inp, lin_w, bias, target, cw), strict=True):
        assert torch.equal(before, after.detach())


def test_zero_weight_on_every_kept_target_with_smoothing_mean_is_nan_like_torch():
    """'mean' averages the target and smoothing terms separately, as torch: 0/0 + x/0 = NaN."""
    logits, target, weight = make_ce(n=9, v=40)
    target[target >= 0] %= 2
    weight[:2] = 0.0  # every kept target has weight 0; the other classes do not
    for smoothing in (0.1, 1.0):
        out = ct.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
        ref = F.cross_entropy(logits, target, weight=weight, label_smoothing=smoothing)
        assert torch.isnan(ref) and torch.isnan(out)
        summed = ct.cross_entropy(
            logits, target, weight=weight, label_smoothing=smoothing, reduction="sum"
        )
        ref_sum = F.cross_entropy(
            logits, target, weight=weight, label_smoothing=smoothing, reduction="sum"
        )
        torch.testing.assert_close(summed, ref_sum, **F32)
    inp, lin_w, bias, target, cw = make_lce(n=9, d=20)
    target[target >= 0] %= 2
    cw[:2] = 0.0
    out = ct.linear_cross_entropy(inp, lin_w, target, weight=cw, label_smoothing=0.1)
    ref = lce_oracle(inp, lin_w, target, weight=cw, label_smoothing=0.1)
    assert torch.isnan(ref) and torch.isnan(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_linear_cross_entropy_nonfinite_ignored_row_contributes_nothing(bad, monkeypatch):
    """An ignored token adds nothing to any gradient, whatever its hidden state holds: the
    same behaviour as the chunked path (torch's composition spreads NaN over grad_W)."""
    inp, lin_w, bias, target, cw = make_lce(n=20, d=20, n_ignored=0)
    target[[3, 17]] = -100
    inp[3, 5] = bad
    inp[17] = bad
    kept = target != -100
    upstream = torch.linspace(0.5, 1.5, 20, device=DEVICE)
    for reduction in ("none", "mean"):
        kw = dict(weight=cw, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)

        def grads(fn, rows, kw=kw, reduction=reduction):
            leaves = [leaf(t) for t in (inp[rows], lin_w, bias)]
            out = fn(leaves[0], leaves[1], target[rows], linear_bias=leaves[2], **kw)
            g = upstream[rows] if reduction == "none" else upstream[0]
            return out.detach(), torch.autograd.grad(out, leaves, g)

        everything = torch.ones(20, dtype=torch.bool, device=DEVICE)
        out, (gx, gw, gb) = grads(ct.linear_cross_entropy, everything)
        ref, (rgx, rgw, rgb) = grads(lce_oracle, kept)
        torch.testing.assert_close(out[kept] if reduction == "none" else out, ref, **F32)
        assert torch.equal(gx[~kept], torch.zeros_like(gx[~kept]))
        for got, want in ((gx[kept], rgx), (gw, rgw), (gb, rgb)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)
        # the chunked (CPU) path of crossent.linear_cross_entropy does the same
        import crossent

        monkeypatch.setenv("CROSSENT_BACKEND", "torch")
        _, (cgx, cgw, cgb) = grads(crossent.linear_cross_entropy, everything)
        monkeypatch.delenv("CROSSENT_BACKEND")
        for got, want in ((gx, cgx), (gw, cgw), (gb, cgb)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-6)


def test_linear_cross_entropy_edge_values_like_torch():
    """D = 0 (every logit is the bias: log V without one) and a +inf logit in a kept row
    (log_softmax is NaN there, and so is the loss)."""
    x = torch.randn(4, 0, device=DEVICE)
    lin_w = torch.randn(13, 0, device=DEVICE)
    target = torch.tensor([0, 5, -100, 12], device=DEVICE)
    for reduction in REDUCTIONS:
        out = ct.linear_cross_entropy(x, lin_w, target, reduction=reduction)
        ref = lce_oracle(x, lin_w, target, reduction=reduction)
        torch.testing.assert_close(out, ref, **F32)
    inp, lin_w, bias, target, _ = make_lce(n=6, d=20, n_ignored=0)
    lin_w[:, 0] = torch.linspace(-1.0, 1.0, lin_w.shape[0], device=DEVICE)
    inp[2, 0] = float("inf")  # row 2: logits from -inf to +inf
    for reduction in REDUCTIONS:
        out = ct.linear_cross_entropy(inp, lin_w, target, linear_bias=bias, reduction=reduction)
        ref = lce_oracle(inp, lin_w, target, linear_bias=bias, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True, **F32)
        assert torch.isnan(out.reshape(-1)[2 if reduction == "none" else 0])


# --------------------------------------------------------------------------- BCE with logits


def bce_oracle(input, target, *, weight=None, pos_weight=None, reduction="mean"):
    return F.binary_cross_entropy_with_logits(
        input, target, weight=weight, pos_weight=pos_weight, reduction=reduction
    )


BCE_SHAPES = [
    # (input shape, weight shape or None, pos_weight shape or None)
    ((6, 5), (5,), (5,)),
    ((6, 5), (6, 1), None),
    ((6, 5), (), ()),
    ((6, 5), None, (6, 5)),
    ((2, 3, 4, 5), None, (3, 1, 1)),
    ((2, 3, 4, 5), (3, 1, 1), (5,)),
    ((2, 3, 4, 5), (2, 1, 4, 1), (1, 4, 1)),
    ((7,), None, None),
    ((), (), ()),
]


@pytest.mark.parametrize("shapes", BCE_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_broadcast_matches_torch(shapes, reduction):
    shape, w_shape, p_shape = shapes
    g = torch.Generator().manual_seed(len(shape))
    tensors = dict(
        input=(4 * torch.randn(shape, generator=g)).to(DEVICE),
        target=torch.rand(shape, generator=g).to(DEVICE),
    )
    opts = {}
    if w_shape is not None:
        opts["weight"] = torch.rand(w_shape, generator=g).to(DEVICE) + 0.5
    if p_shape is not None:
        opts["pos_weight"] = 3 * torch.rand(p_shape, generator=g).to(DEVICE)
    (out, grads), (ref, ref_grads) = run_both(
        ct.binary_cross_entropy_with_logits, bce_oracle, tensors, ["input", "target"], reduction,
        **opts,
    )  # fmt: skip
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, **F32)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **F32)


@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_bce_with_logits_random_broadcasts(data):
    ndim = data.draw(st.integers(1, 5))
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))

    def broadcastable():  # right-aligned, each dim kept or set to 1, leading dims dropped
        keep = data.draw(st.integers(0, ndim))
        return tuple(n if data.draw(st.booleans()) else 1 for n in shape[ndim - keep :])

    reduction = data.draw(st.sampled_from(REDUCTIONS))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    tensors = dict(
        input=(5 * torch.randn(shape, generator=g)).to(DEVICE),
        target=torch.rand(shape, generator=g).to(DEVICE),
    )
    opts = dict(
        weight=torch.rand(broadcastable(), generator=g).to(DEVICE),
        pos_weight=2 * torch.rand(broadcastable(), generator=g).to(DEVICE),
    )
    (out, grads), (ref, ref_grads) = run_both(
        ct.binary_cross_entropy_with_logits, bce_oracle, tensors, ["input", "target"], reduction,
        **opts,
    )  # fmt: skip
    torch.testing.assert_close(out, ref, **F32)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **F32)


@pytest.mark.parametrize(
    "in_dtype,target_dtype",
    [
        (torch.float64, torch.float32),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
)
def test_bce_with_logits_result_has_target_dtype(in_dtype, target_dtype):
    x = torch.randn(5, 4, device=DEVICE).to(in_dtype)
    y = torch.rand(5, 4, device=DEVICE).to(target_dtype)
    for reduction in REDUCTIONS:
        out = ct.binary_cross_entropy_with_logits(x, y, reduction=reduction)
        ref = bce_oracle(x, y, reduction=reduction)
        assert out.dtype == ref.dtype == target_dtype
        assert rel_err(out, ref) < 1e-2


def test_bce_with_logits_edges_like_torch():
    x = torch.tensor([float("inf"), float("-inf"), float("inf"), float("-inf"), 1e4, -120.0,
                      30.0, -30.0, 0.0], device=DEVICE)  # fmt: skip
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5], device=DEVICE)
    pw = torch.full((9,), 2.0, device=DEVICE)
    for opts in (dict(), dict(pos_weight=pw)):
        out = ct.binary_cross_entropy_with_logits(x, y, reduction="none", **opts)
        ref = bce_oracle(x, y, reduction="none", **opts)
        torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-6, atol=0.0)
    empty = torch.empty(0, 3, device=DEVICE)
    assert torch.isnan(ct.binary_cross_entropy_with_logits(empty, empty))
    assert ct.binary_cross_entropy_with_logits(empty, empty, reduction="sum").item() == 0.0
    assert ct.binary_cross_entropy_with_logits(empty, empty, reduction="none").shape == (0, 3)


def test_bce_with_logits_strided_and_no_mutation():
    base = torch.randn(6, 10, device=DEVICE)
    x = leaf(base)
    y = torch.rand(10, 6, device=DEVICE).t()  # non-contiguous target
    w = torch.rand(6, device=DEVICE)[:, None].expand(6, 5)  # a stride-0 view
    copies = [t.clone() for t in (base, y, w)]
    out = ct.binary_cross_entropy_with_logits(x[:, ::2], y[:, :5], weight=w, reduction="sum")
    ref_x = leaf(base)
    ref = bce_oracle(ref_x[:, ::2], y[:, :5], weight=w, reduction="sum")
    torch.testing.assert_close(out, ref, **F32)
    out.backward()
    ref.backward()
    torch.testing.assert_close(x.grad, ref_x.grad, **F32)
    for before, after in zip(copies, (x.detach(), y, w), strict=True):
        assert torch.equal(before, after)


def test_bce_coalesce_merges_contiguous_and_broadcast_dims():
    bce = ct._runtime.kernels("bce_with_logits")
    # (B, C, H, W) with a (C, 1, 1) operand: H and W merge, B stays (stride 0), C stays.
    sizes, strides = bce.coalesce((2, 3, 4, 5), [(60, 20, 5, 1), (0, 1, 0, 0)])
    assert sizes == [2, 3, 20] and strides == [[60, 20, 1], [0, 1, 0]]
    assert bce.coalesce((1, 1), [(1, 1)]) == ([1], [[0]])


# --------------------------------------------------------------------------- custom ops


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_backward_kernels_receive_the_row_factor_of_stats(reduction):
    # The kernels hold no loss convention: what they receive, the gradients of the loss w.r.t.
    # the statistics, is crossent.ops._stats' row factor, target factor and -ε/V, times σ.
    from crossent.ops import _stats
    from crossent.ops.triton import _ops

    g = torch.Generator().manual_seed(3)
    n, v, eps, zeta, f64 = 9, 13, 0.2, 1e-2, torch.float64
    row_max = 3 * torch.randn(n, generator=g, dtype=f64)
    logsum = leaf(torch.rand(n, generator=g, dtype=f64) + 1.0)
    target_logit = leaf(-4 * torch.rand(n, generator=g, dtype=f64))
    smooth = leaf(-v * torch.rand(n, generator=g, dtype=f64))
    target = torch.randint(0, v, (n,), generator=g)
    target[[1, 5]] = -100
    class_weight = torch.rand(v, generator=g, dtype=f64) + 0.5
    loss = _ops.loss_from_stats(
        row_max, logsum, target_logit, smooth, target, class_weight, n_classes=v,
        ignore_index=-100, label_smoothing=eps, z_loss=zeta, reduction=reduction, out_dtype=f64,
    )  # fmt: skip
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=f64).reshape(loss.shape)
    g_logsum, g_zt, g_smooth = torch.autograd.grad(loss, (logsum, target_logit, smooth), upstream)
    keep = target != -100
    w_t = _stats.target_weight(class_weight, target.clamp(0))
    denominator = _stats.mean_denominator(keep, w_t, n_rows=n, dtype=f64)
    sigma = _stats.row_scale(
        upstream, reduction=reduction, denominator=denominator, keep=keep, n_rows=n
    )
    a_sigma, target_sigma = _stats.grad_coefficients(
        sigma, w_t, _stats.total_weight(class_weight, v), row_max + logsum.detach(),
        n_classes=v, label_smoothing=eps, z_loss=zeta,
    )  # fmt: skip
    torch.testing.assert_close(g_logsum, a_sigma, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_zt, -target_sigma, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_smooth, -sigma * (eps / v), rtol=1e-12, atol=1e-14)


def test_custom_ops_pass_opcheck():
    logits, target, weight = make_ce(n=6, v=40)
    ops = torch.ops.crossent
    torch.library.opcheck(ops.ce_stats.default, (leaf(logits), target, weight, 3.0, True))
    inp, lin_w, bias, lt, cw = make_lce(n=18, d=17, v=33)
    torch.library.opcheck(
        ops.linear_ce_stats.default, (leaf(inp), leaf(lin_w), leaf(bias), lt, cw, -100, 0.0, True)
    )
    x, y = leaf(torch.randn(4, 5, device=DEVICE)), leaf(torch.rand(4, 5, device=DEVICE))
    pw = torch.rand(5, device=DEVICE)
    for reduction in ("none", "mean"):
        torch.library.opcheck(ops.bce_with_logits.default, (x, y, None, pw, reduction))


def test_torch_compile_fullgraph_traces_the_ops():
    logits, target, weight = make_ce(n=8, v=40)
    inp, lin_w, bias, lt, cw = make_lce(n=18, d=17, v=33)
    bx, by = torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE)

    def losses(logits, inp, lin_w, bias, bx):
        a = ct.cross_entropy(logits, target, weight=weight, label_smoothing=0.1, z_loss=1e-3,
                             softcap=5.0)  # fmt: skip
        b = ct.linear_cross_entropy(inp, lin_w, lt, linear_bias=bias, reduction="sum")
        c = ct.binary_cross_entropy_with_logits(bx, by, pos_weight=by[0] + 1)
        return a + b + c

    torch._dynamo.reset()
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    eager_args = [leaf(t) for t in (logits, inp, lin_w, bias, bx)]
    compiled_args = [leaf(t) for t in (logits, inp, lin_w, bias, bx)]
    expected = losses(*eager_args)
    got = compiled(*compiled_args)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    expected.backward()
    got.backward()
    for e, c in zip(eager_args, compiled_args, strict=True):
        torch.testing.assert_close(c.grad, e.grad, rtol=1e-6, atol=1e-7)


def test_public_names_survive_kernel_imports():
    # Importing the kernel submodules must not rebind the package's public functions.
    ct._runtime.kernels("cross_entropy")
    ct._runtime.kernels("linear_cross_entropy")
    assert callable(ct.cross_entropy) and callable(ct.linear_cross_entropy)
    assert ct.is_available()


# --------------------------------------------------------------------------- dispatch


def test_select_backend_env_var(monkeypatch):
    cpu = torch.zeros(2)
    monkeypatch.delenv("CROSSENT_BACKEND", raising=False)
    expected_auto = "triton" if DEVICE == "cuda" else "torch"
    assert select_backend(cpu.to(DEVICE), None) == expected_auto
    assert select_backend(cpu) == "torch"  # auto: CPU tensors never go to triton
    assert select_backend(cpu.double().to(DEVICE)) == "torch"  # auto keeps float64 on torch
    monkeypatch.setenv("CROSSENT_BACKEND", "torch")
    assert select_backend(cpu.to(DEVICE)) == "torch"
    monkeypatch.setenv("CROSSENT_BACKEND", " Triton ")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend(cpu, None) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        select_backend(cpu)
    monkeypatch.setenv("CROSSENT_BACKEND", "gpu")
    with pytest.raises(ValueError, match="'auto', 'torch' or 'triton'.*'gpu'"):
        select_backend(cpu)


def test_kernels_refuse_cpu_tensors_without_interpreter(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CPU tensors are refused only when no GPU path is being tested")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, target, _ = make_ce(n=4, v=8)
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ct.cross_entropy(logits, target)
    assert not ct.is_available()


def test_double_backward_matches_torch():
    # Second order goes through the backward ops' autograd (a torch re-expression).
    logits, target, weight = make_ce(n=5, v=40)
    opts = dict(weight=weight, label_smoothing=0.1, softcap=4.0)
    results = []
    for fn in (ct.cross_entropy, ce_oracle):
        x = leaf(logits)
        (g,) = torch.autograd.grad(fn(x, target, **opts), x, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), x)
        results.append(gg)
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-7)
    results = []
    y0 = torch.rand(4, 5, device=DEVICE)
    x0 = torch.randn(4, 5, device=DEVICE)
    pw = torch.rand(5, device=DEVICE) + 0.5
    for fn in (ct.binary_cross_entropy_with_logits, bce_oracle):
        x, y = leaf(x0), leaf(y0)
        gx, gy = torch.autograd.grad(fn(x, y, pos_weight=pw), (x, y), create_graph=True)
        results.append(torch.autograd.grad((gx * gy).sum() + gx.square().sum(), (x, y)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, **F32)


def test_select_backend_leaves_transforms_to_torch(monkeypatch):
    # vmap/grad wrappers and forward-mode dual tensors always get torch, whatever the variable.
    monkeypatch.setenv("CROSSENT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []
    torch.func.vmap(lambda t: seen.append(select_backend(t)) or t.sum())(torch.randn(2, 3))
    torch.func.grad(lambda t: seen.append(select_backend(t)) or t.sum())(torch.randn(3))
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        seen.append(select_backend(fwAD.make_dual(torch.randn(3), torch.ones(3))))
    assert seen == ["torch", "torch", "torch"]
    assert select_backend(torch.randn(3)) == "triton"


def test_large_logits_are_exact_relative_to_the_row_max():
    # lse = max + logsum is never rounded as one number: logits of 1e4 or 3e38 lose nothing.
    logits = torch.tensor([[1e4, 1e4 - 1.0, 0.0], [3e38, 3e38, 0.0], [-3e38, 0.0, 1.0]])
    target = torch.tensor([1, 2, 0])
    x, ref_x = leaf(logits.to(DEVICE)), leaf(logits.double())
    out = ct.cross_entropy(x, target.to(DEVICE), reduction="none", label_smoothing=0.1)
    ref = F.cross_entropy(ref_x, target, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-6, atol=0.0)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad.double().cpu(), ref_x.grad, rtol=1e-6, atol=1e-7)
    # linear CE with logits in the thousands, target probabilities underflowing
    inp, lin_w, bias, lt, _ = make_lce(n=20, d=24, v=50, n_ignored=0)
    inp = inp * 300.0
    leaves = [leaf(t) for t in (inp, lin_w, bias)]
    refs = [leaf(t.double().cpu()) for t in (inp, lin_w, bias)]
    out = ct.linear_cross_entropy(*leaves[:2], lt, linear_bias=leaves[2], softcap=50.0)
    ref = lce_oracle(*refs[:2], lt.cpu(), linear_bias=refs[2], softcap=50.0)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=0.0)
    out.backward()
    ref.backward()
    for got, want in zip(leaves, refs, strict=True):
        scale = want.grad.abs().max()
        torch.testing.assert_close(got.grad.double().cpu(), want.grad, rtol=0, atol=1e-5 * scale)


def test_kernels_follow_the_interpreter_setting(monkeypatch):
    # Kernel modules are (re-)decorated for the mode in force at the call, not at import.
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    kernels = ct._runtime.kernels
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert isinstance(kernels("cross_entropy")._forward_kernel, JITFunction)
    assert isinstance(kernels("_helpers").softcap_tanh, JITFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(kernels("cross_entropy")._forward_kernel, InterpretedFunction)
    assert isinstance(kernels("_helpers").softcap_tanh, InterpretedFunction)
    if DEVICE == "cpu":
        logits, target, _ = make_ce(n=4, v=8)
        ref = F.cross_entropy(logits, target)
        torch.testing.assert_close(ct.cross_entropy(logits, target, softcap=None), ref, **F32)
    assert callable(ct.cross_entropy) and callable(ct.linear_cross_entropy)
