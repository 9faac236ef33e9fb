"""Differential tests: crossent.functional against torch.nn.functional (the oracle).

Tolerances: float64 1e-12 relative (values) / 1e-10 (gradients, which go through different
but equivalent formulas); float32 1e-5; float16/bfloat16 one or two units in the last place
(crossent accumulates softmax statistics in float32 and rounds once, torch rounds the
log-softmax first, so the two differ by about 1 ulp).
"""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import blocked_path
from hypothesis import given, settings

import crossent
import crossent.functional as C
import crossent.reference as R
from crossent.ops import eager

TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=4e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
}
GRAD_TOL = {**TOL, torch.float64: dict(rtol=1e-10, atol=1e-12)}


def run_both(name: str, args: tuple, kwargs: dict, grad_wrt: tuple[int, ...] = (0,)):
    """Call crossent and torch on fresh copies of ``args``; return (ours, theirs) as
    (value, grads) with grads w.r.t. the positional args in ``grad_wrt``."""
    results = []
    for fn in (getattr(C, name), getattr(F, name)):
        copies = [
            a.detach().clone().requires_grad_(i in grad_wrt) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*copies, **kwargs)
        diff = [copies[i] for i in grad_wrt]
        grads = None
        if diff and out.requires_grad:
            upstream = torch.randn(
                out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)
            )
            grads = torch.autograd.grad(out, diff, upstream)
        results.append((out.detach(), grads))
    return results


def assert_same(ours, theirs, dtype=None):
    (a, ga), (b, gb) = ours, theirs
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    tol = TOL[dtype or a.dtype]
    torch.testing.assert_close(a, b, equal_nan=True, **tol)
    assert (ga is None) == (gb is None)
    if ga is not None:
        for x, y in zip(ga, gb, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            torch.testing.assert_close(x, y, equal_nan=True, **GRAD_TOL[dtype or x.dtype])


# ---------------------------------------------------------------------------------------------
# Strategies

REDUCTIONS = st.sampled_from(["none", "mean", "sum"])
FLOATS = st.sampled_from([torch.float64, torch.float32])


@st.composite
def class_shapes(draw):
    """(input shape, target shape) for class-index losses: (C,), (N,C), (N,C,d1..dk)."""
    c = draw(st.integers(1, 7))
    kind = draw(st.sampled_from(["unbatched", "2d", "kd"]))
    if kind == "unbatched":
        return (c,), ()
    n = draw(st.integers(0, 5))
    if kind == "2d":
        return (n, c), (n,)
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    return (n, c, *spatial), (n, *spatial)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Cross entropy and NLL, class-index targets


@settings(max_examples=60, deadline=None)
@given(
    shapes=class_shapes(),
    dtype=FLOATS,
    reduction=REDUCTIONS,
    use_weight=st.booleans(),
    ignore=st.sampled_from([None, -100, 0, 2, 255]),
    label_smoothing=st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0, -0.3]),
    target_dtype=st.sampled_from([torch.int64, torch.uint8]),
    seed=st.integers(0, 2**16),
    blocked=st.booleans(),
)
def test_cross_entropy_index_targets(
    shapes, dtype, reduction, use_weight, ignore, label_smoothing, target_dtype, seed, blocked
):
    (in_shape, t_shape), g = shapes, _gen(seed)
    c = in_shape[0] if len(in_shape) == 1 else in_shape[1]
    logits = torch.randn(in_shape, dtype=dtype, generator=g) * 3
    target = torch.randint(0, c, t_shape, generator=g)
    kwargs = dict(reduction=reduction, label_smoothing=label_smoothing)
    if ignore is not None:
        kwargs["ignore_index"] = ignore
        if target.numel() and ignore >= 0 and ignore < 256:
            mask = torch.rand(t_shape, generator=g) < 0.3
            target = torch.where(mask, torch.tensor(ignore), target)
        elif target.numel() and target_dtype == torch.int64:
            mask = torch.rand(t_shape, generator=g) < 0.3
            target = torch.where(mask, torch.tensor(ignore), target)
    if target_dtype == torch.uint8 and len(in_shape) > 2:
        # torch 2.13 fails on uint8 targets with K-dim input ('none' forward and backward:
        # "expected scalar type Long but found Byte"); test_uint8_targets_match_long covers it.
        target_dtype = torch.int64
    if target_dtype == torch.uint8:
        if ((target < 0) | (target > 255)).any():
            target = target.clamp(0, c - 1)
        target = target.to(torch.uint8)
        if use_weight and label_smoothing > 0:
            # torch 2.13 itself fails here ("gather(): Expected dtype int32/int64 for index");
            # the uint8 cases are compared through int64 targets instead.
            target = target.long()
    if use_weight:
        kwargs["weight"] = torch.rand(c, dtype=dtype, generator=g) + 0.1
    with blocked_path(blocked):
        ours, theirs = run_both("cross_entropy", (logits, target), kwargs)
    assert_same(ours, theirs)


@settings(max_examples=40, deadline=None)
@given(
    shapes=class_shapes(),
    dtype=FLOATS,
    reduction=REDUCTIONS,
    weight_kind=st.sampled_from([None, "positive", "signed"]),
    ignore=st.sampled_from([None, -100, -1, 1]),
    seed=st.integers(0, 2**16),
)
def test_nll_loss(shapes, dtype, reduction, weight_kind, ignore, seed):
    (in_shape, t_shape), g = shapes, _gen(seed)
    c = in_shape[0] if len(in_shape) == 1 else in_shape[1]
    log_probs = torch.randn(in_shape, dtype=dtype, generator=g).log_softmax(
        -1 if len(in_shape) == 1 else 1
    )
    target = torch.randint(0, c, t_shape, generator=g)
    kwargs: dict = dict(reduction=reduction)
    if ignore is not None:
        kwargs["ignore_index"] = ignore
        if target.numel():
            target = torch.where(
                torch.rand(t_shape, generator=g) < 0.3, torch.tensor(ignore), target
            )
    if weight_kind == "positive":
        kwargs["weight"] = torch.rand(c, dtype=dtype, generator=g)
    elif weight_kind == "signed":
        kwargs["weight"] = torch.randn(c, dtype=dtype, generator=g)
    ours, theirs = run_both("nll_loss", (log_probs, target), kwargs)
    assert_same(ours, theirs)


# ---------------------------------------------------------------------------------------------
# Cross entropy, probability targets


@settings(max_examples=40, deadline=None)
@given(
    shapes=class_shapes(),
    dtype=FLOATS,
    target_dtype=st.sampled_from([None, torch.float64, torch.float32]),
    reduction=REDUCTIONS,
    use_weight=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_cross_entropy_probability_targets(
    shapes, dtype, target_dtype, reduction, use_weight, label_smoothing, seed
):
    (in_shape, _), g = shapes, _gen(seed)
    c = in_shape[0] if len(in_shape) == 1 else in_shape[1]
    logits = torch.randn(in_shape, dtype=dtype, generator=g)
    probs = torch.rand(in_shape, dtype=target_dtype or dtype, generator=g)
    kwargs: dict = dict(reduction=reduction, label_smoothing=label_smoothing)
    if use_weight:
        kwargs["weight"] = torch.rand(c, dtype=dtype, generator=g)
    ours, theirs = run_both("cross_entropy", (logits, probs), kwargs, grad_wrt=(0, 1))
    assert_same(ours, theirs, dtype=ours[0].dtype)


def test_cross_entropy_probability_weight_is_differentiable():
    g = _gen(0)
    logits = torch.randn(4, 5, dtype=torch.float64, generator=g)
    probs = torch.rand(4, 5, dtype=torch.float64, generator=g)
    weight = torch.rand(5, dtype=torch.float64, generator=g)
    grads = []
    for fn in (C.cross_entropy, F.cross_entropy):
        w = weight.clone().requires_grad_()
        out = fn(logits, probs, weight=w, label_smoothing=0.1)
        grads.append(torch.autograd.grad(out, w)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# BCE and BCE with logits


@st.composite
def any_shape_and_weight(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=4)))
    # A weight shape that broadcasts to ``shape`` without enlarging it: a suffix with some 1s.
    k = draw(st.integers(0, len(shape)))
    suffix = list(shape[len(shape) - k :])
    w_shape = tuple(1 if draw(st.booleans()) else s for s in suffix)
    return shape, w_shape


@settings(max_examples=60, deadline=None)
@given(
    shapes=any_shape_and_weight(),
    dtype=FLOATS,
    reduction=REDUCTIONS,
    use_weight=st.booleans(),
    boundary=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_binary_cross_entropy(shapes, dtype, reduction, use_weight, boundary, seed):
    (shape, w_shape), g = shapes, _gen(seed)
    x = torch.rand(shape, dtype=dtype, generator=g)
    y = torch.rand(shape, dtype=dtype, generator=g)
    if boundary and x.numel():
        x = torch.where(torch.rand(shape, generator=g) < 0.3, torch.round(x), x)
        y = torch.where(torch.rand(shape, generator=g) < 0.3, torch.round(y), y)
    kwargs: dict = dict(reduction=reduction)
    if use_weight:
        kwargs["weight"] = torch.rand(w_shape, dtype=dtype, generator=g)
    ours, theirs = run_both("binary_cross_entropy", (x, y), kwargs, grad_wrt=(0, 1))
    assert_same(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(
    shapes=any_shape_and_weight(),
    dtypes=st.sampled_from(
        [(torch.float64, torch.float64), (torch.float32, torch.float32),
         (torch.float64, torch.float32), (torch.float32, torch.float64)]
    ),
    reduction=REDUCTIONS,
    use_weight=st.booleans(),
    use_pos_weight=st.booleans(),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_binary_cross_entropy_with_logits(
    shapes, dtypes, reduction, use_weight, use_pos_weight, scale, seed
):
    (shape, w_shape), g = shapes, _gen(seed)
    x = torch.randn(shape, dtype=dtypes[0], generator=g) * scale
    y = torch.rand(shape, dtype=dtypes[1], generator=g)
    kwargs: dict = dict(reduction=reduction)
    if use_weight:
        kwargs["weight"] = torch.rand(w_shape, dtype=dtypes[0], generator=g)
    if use_pos_weight:
        kwargs["pos_weight"] = torch.rand(w_shape, dtype=dtypes[0], generator=g) * 3
    ours, theirs = run_both("binary_cross_entropy_with_logits", (x, y), kwargs, grad_wrt=(0, 1))
    # Mixed dtypes: compare at the precision of the less precise operand.
    assert_same(ours, theirs, dtype=torch.float32 if torch.float32 in dtypes else None)


# ---------------------------------------------------------------------------------------------
# Low precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_low_precision(dtype, reduction):
    g = _gen(3)
    logits = torch.randn(16, 11, dtype=dtype, generator=g)
    target = torch.randint(0, 11, (16,), generator=g)
    target[3] = -100
    w = torch.rand(11, dtype=dtype, generator=g)
    for kwargs in (dict(), dict(weight=w), dict(label_smoothing=0.1, weight=w)):
        ours, theirs = run_both(
            "cross_entropy", (logits, target), dict(reduction=reduction, **kwargs)
        )
        assert_same(ours, theirs)
    probs = torch.rand(16, 11, dtype=dtype, generator=g)
    assert_same(*run_both("cross_entropy", (logits, probs), dict(reduction=reduction), (0, 1)))
    lp = logits.float().log_softmax(1).to(dtype)
    assert_same(*run_both("nll_loss", (lp, target), dict(reduction=reduction, weight=w)))
    x, y = torch.rand(16, 3, dtype=dtype, generator=g), torch.rand(16, 3, dtype=dtype, generator=g)
    assert_same(*run_both("binary_cross_entropy", (x, y), dict(reduction=reduction), (0, 1)))
    z = torch.randn(16, 3, dtype=dtype, generator=g)
    pw = torch.rand(3, dtype=dtype, generator=g)
    assert_same(
        *run_both(
            "binary_cross_entropy_with_logits",
            (z, y),
            dict(reduction=reduction, pos_weight=pw),
            (0, 1),
        )
    )


def test_cross_entropy_low_precision_is_closer_to_float64_than_torch():
    """fp32 statistics: crossent's bf16 loss is at least as accurate as torch's."""
    g = _gen(5)
    logits = (torch.randn(512, 1000, generator=g) * 3).to(torch.bfloat16)
    target = torch.randint(0, 1000, (512,), generator=g)
    exact = F.cross_entropy(logits.double(), target)
    ours = C.cross_entropy(logits, target).double()
    theirs = F.cross_entropy(logits, target).double()
    assert (ours - exact).abs() <= (theirs - exact).abs() + 1e-6


# ---------------------------------------------------------------------------------------------
# Hand-picked edge cases


EDGE_CASES = [
    # (name, function, args builder, kwargs, grad_wrt)
    ("ce all ignored", "cross_entropy", lambda: (torch.randn(4, 5), torch.full((4,), -100)), {}, (0,)),
    ("ce all ignored smoothing weight", "cross_entropy",
     lambda: (torch.randn(4, 5), torch.full((4,), 3)), dict(ignore_index=3, label_smoothing=0.2, weight=torch.rand(5)), (0,)),
    ("ce zero total weight", "cross_entropy",
     lambda: (torch.randn(4, 5), torch.tensor([0, 0, 1, 1])), dict(weight=torch.tensor([0.0, 0, 1, 1, 1])), (0,)),
    ("ce empty batch", "cross_entropy", lambda: (torch.randn(0, 5), torch.zeros(0, dtype=torch.long)), {}, (0,)),
    ("ce empty spatial", "cross_entropy", lambda: (torch.randn(2, 5, 0), torch.zeros(2, 0, dtype=torch.long)), {}, (0,)),
    ("ce prob empty", "cross_entropy", lambda: (torch.randn(0, 5), torch.rand(0, 5)), {}, (0,)),
    ("ce large logits", "cross_entropy",
     lambda: (torch.tensor([[1e4, 0.0, -1e4], [3e38, 3e38, 0.0]]), torch.tensor([1, 2])), {}, (0,)),
    ("ce nan/inf logits", "cross_entropy",
     lambda: (torch.tensor([[0.0, float("nan"), 1.0], [float("inf"), 0.0, 1.0], [0.0, -float("inf"), 1.0], [-float("inf"), 0.0, 1.0]]),
              torch.tensor([0, 0, 0, 0])), {}, (0,)),
    ("ce nan in ignored row", "cross_entropy",
     lambda: (torch.tensor([[0.0, float("nan"), 1.0], [0.5, 0.0, 1.0]]), torch.tensor([-100, 1])), {}, (0,)),
    ("ce -inf with smoothing", "cross_entropy",
     lambda: (torch.tensor([[0.0, -float("inf"), 1.0], [0.5, 0.0, 1.0]]), torch.tensor([0, 1])), dict(label_smoothing=0.1), (0,)),
    ("ce ignore valid class", "cross_entropy",
     lambda: (torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 1])), dict(ignore_index=1, label_smoothing=0.3, weight=torch.rand(4)), (0,)),
    ("ce single class", "cross_entropy", lambda: (torch.randn(3, 1), torch.tensor([0, 0, 0])), {}, (0,)),
    ("ce unbatched smoothing", "cross_entropy", lambda: (torch.randn(5), torch.tensor(2)), dict(label_smoothing=0.2), (0,)),
    ("ce 1-D target of size 1", "cross_entropy", lambda: (torch.randn(5), torch.tensor([2])), {}, ()),
    ("ce prob -inf where y=0", "cross_entropy",
     lambda: (torch.tensor([[-float("inf"), 0.0, 1.0]]), torch.tensor([[0.0, 0.5, 0.5]])), {}, (0,)),
    ("ce C=0", "cross_entropy", lambda: (torch.randn(0, 0), torch.zeros(0, dtype=torch.long)), {}, (0,)),
    ("ce C=0 smoothing", "cross_entropy",
     lambda: (torch.randn(0, 0), torch.zeros(0, dtype=torch.long)), dict(label_smoothing=0.1), (0,)),
    ("ce C=0 all ignored", "cross_entropy", lambda: (torch.randn(3, 0), torch.full((3,), -100)), {}, (0,)),
    ("ce C=0 all ignored smoothing", "cross_entropy",
     lambda: (torch.randn(3, 0), torch.full((3,), -100)), dict(label_smoothing=0.1), (0,)),
    ("ce kept weights all 0 smoothing", "cross_entropy",
     lambda: (torch.randn(4, 5), torch.tensor([0, 1, 0, 1])), dict(weight=torch.tensor([0.0, 0, 1, 1, 1]), label_smoothing=0.1), (0,)),
    ("ce kept weights all 0", "cross_entropy",
     lambda: (torch.randn(4, 5), torch.tensor([0, 1, 0, -100])), dict(weight=torch.tensor([0.0, 0, 1, 1, 1])), (0,)),
    ("nll C=0 all ignored", "nll_loss", lambda: (torch.randn(3, 0), torch.full((3,), -100)), {}, (0,)),
    ("nll all ignored", "nll_loss", lambda: (torch.randn(3, 4), torch.full((3,), 2)), dict(ignore_index=2), (0,)),
    ("nll ignore 255", "nll_loss", lambda: (torch.randn(3, 4), torch.tensor([0, 255, 3])), dict(ignore_index=255), (0,)),
    ("nll unbatched", "nll_loss", lambda: (torch.randn(4), torch.tensor(3)), dict(weight=torch.rand(4)), (0,)),
    ("bce boundaries", "binary_cross_entropy",
     lambda: (torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5])), dict(reduction="sum"), (0,)),
    ("bce boundaries mean", "binary_cross_entropy",
     lambda: (torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])), {}, (0,)),
    ("bce 0-d with weight", "binary_cross_entropy", lambda: (torch.tensor(0.3), torch.tensor(0.6)), dict(weight=torch.tensor(2.0)), (0, 1)),
    ("bce empty", "binary_cross_entropy", lambda: (torch.rand(0, 3), torch.rand(0, 3)), {}, (0,)),
    ("bcel inf logits", "binary_cross_entropy_with_logits",
     lambda: (torch.tensor([float("inf"), -float("inf"), float("inf"), -float("inf"), 1e4, -1e4]), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0])), dict(reduction="none"), (0,)),
    ("bcel -120 with pos_weight", "binary_cross_entropy_with_logits",
     lambda: (torch.tensor([0.0, -120.0]), torch.tensor([1.0, 1.0])), dict(pos_weight=torch.tensor([2.0, 2.0]), reduction="none"), (0,)),
    ("bcel (C,1,1) pos_weight", "binary_cross_entropy_with_logits",
     lambda: (torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5)), dict(pos_weight=torch.rand(3, 1, 1), weight=torch.rand(4, 1)), (0, 1)),
    ("bcel target out of [0,1]", "binary_cross_entropy_with_logits",
     lambda: (torch.tensor([1.0, -2.0]), torch.tensor([2.0, -1.0])), {}, (0, 1)),
    ("bcel zero logit grad", "binary_cross_entropy_with_logits", lambda: (torch.zeros(3), torch.zeros(3)), dict(reduction="sum"), (0,)),
    ("bcel empty", "binary_cross_entropy_with_logits", lambda: (torch.randn(0), torch.rand(0)), {}, (0,)),
]  # fmt: skip


EDGE_PATHS = [
    (case, blocked)
    for case in EDGE_CASES
    for blocked in (
        (False, True) if case[0].startswith("ce ") and "prob" not in case[0] else (False,)
    )
]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "case,blocked", EDGE_PATHS, ids=[c[0] + (" blocked" if b else "") for c, b in EDGE_PATHS]
)
def test_edge_cases(case, blocked, reduction):
    _, name, build, kwargs, grad_wrt = case
    kwargs = {"reduction": reduction, **kwargs}
    torch.manual_seed(0)
    with blocked_path(blocked):
        ours, theirs = run_both(name, build(), kwargs, grad_wrt)
    assert_same(ours, theirs)


def test_uint8_targets_match_long():
    g = _gen(1)
    logits = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (5, 3), generator=g)
    for kw in (dict(), dict(weight=torch.rand(4, dtype=torch.float64)), dict(label_smoothing=0.2)):
        a = C.cross_entropy(logits, target.to(torch.uint8), **kw)
        b = F.cross_entropy(logits, target, **kw)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        a = C.nll_loss(
            logits, target.to(torch.uint8), **{k: v for k, v in kw.items() if k == "weight"}
        )
        b = F.nll_loss(logits, target, **{k: v for k, v in kw.items() if k == "weight"})
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_uint8_targets_with_smoothing_and_weight_work_where_torch_fails():
    """torch 2.13 raises 'gather(): Expected dtype int32/int64 for index' here; crossent gives
    the int64 answer."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    target = torch.tensor([0, 1, 4, 2])
    w = torch.rand(5, dtype=torch.float64)
    ours = C.cross_entropy(logits, target.to(torch.uint8), weight=w, label_smoothing=0.2)
    torch.testing.assert_close(ours, F.cross_entropy(logits, target, weight=w, label_smoothing=0.2))


def test_legacy_size_average_and_reduce():
    g = _gen(2)
    logits = torch.randn(4, 5, generator=g, dtype=torch.float64)
    target = torch.randint(0, 5, (4,), generator=g)
    x, y = (
        torch.rand(4, 5, generator=g, dtype=torch.float64),
        torch.rand(4, 5, generator=g, dtype=torch.float64),
    )
    for size_average, reduce in [
        (None, False),
        (False, None),
        (True, True),
        (False, True),
        (True, False),
    ]:
        kw = dict(size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
            a = C.cross_entropy(logits, target, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = F.cross_entropy(logits, target, **kw)
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(
                C.nll_loss(logits, target, **kw), F.nll_loss(logits, target, **kw)
            )
            torch.testing.assert_close(
                C.binary_cross_entropy(x, y, **kw), F.binary_cross_entropy(x, y, **kw)
            )
            torch.testing.assert_close(
                C.binary_cross_entropy_with_logits(logits, y, **kw),
                F.binary_cross_entropy_with_logits(logits, y, **kw),
            )
    with pytest.warns(UserWarning, match="elementwise_mean"):
        a = C.cross_entropy(logits, target, reduction="elementwise_mean")
    torch.testing.assert_close(a, F.cross_entropy(logits, target))


# ---------------------------------------------------------------------------------------------
# Autograd: gradcheck, gradgradcheck, forward AD, torch.func, torch.compile


def _double(*shape, low=None):
    t = (
        torch.rand(*shape, dtype=torch.float64)
        if low is not None
        else torch.randn(*shape, dtype=torch.float64)
    )
    if low is not None:
        t = t * (1 - 2 * low) + low
    return t.requires_grad_()


GRADCHECK_CASES = [
    ("ce index", lambda: (C.cross_entropy, (_double(3, 4), torch.tensor([0, -100, 3])), dict(label_smoothing=0.1, weight=torch.rand(4, dtype=torch.float64)))),
    ("ce index K-dim", lambda: (C.cross_entropy, (_double(2, 3, 2), torch.tensor([[0, 2], [1, 1]])), dict(ignore_index=1))),
    ("ce index unbatched", lambda: (C.cross_entropy, (_double(4), torch.tensor(2)), dict(label_smoothing=0.3))),
    ("ce prob", lambda: (C.cross_entropy, (_double(3, 4), _double(3, 4, low=0.0)), dict(label_smoothing=0.1, weight=torch.rand(4, dtype=torch.float64)))),
    ("nll", lambda: (C.nll_loss, (_double(3, 4), torch.tensor([0, 1, 3])), dict(weight=torch.rand(4, dtype=torch.float64), ignore_index=1))),
    ("bce", lambda: (C.binary_cross_entropy, (_double(3, 4, low=0.05), _double(3, 4, low=0.05)), dict(weight=torch.rand(4, dtype=torch.float64)))),
    ("bcel", lambda: (C.binary_cross_entropy_with_logits, (_double(3, 4), _double(3, 4, low=0.0)), dict(weight=torch.rand(4, dtype=torch.float64), pos_weight=torch.rand(4, dtype=torch.float64)))),
]  # fmt: skip


GRADCHECK_PATHS = [
    (case, blocked)
    for case in GRADCHECK_CASES
    for blocked in ((False, True) if case[0].startswith("ce index") else (False,))
]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "case,blocked",
    GRADCHECK_PATHS,
    ids=[c[0] + (" blocked" if b else "") for c, b in GRADCHECK_PATHS],
)
def test_gradcheck_and_gradgradcheck(case, blocked, reduction):
    """Finite differences, including batched gradients (vmap over the backward), as torch's
    own suites check them."""
    fn, args, kwargs = case[1]()

    def f(*a):
        return fn(*a, reduction=reduction, **kwargs)

    with blocked_path(blocked):
        assert torch.autograd.gradcheck(f, args, check_batched_grad=True)
        assert torch.autograd.gradgradcheck(f, args, check_batched_grad=True)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("blocked", [False, True], ids=["default", "blocked"])
@pytest.mark.parametrize(
    "kwargs",
    [{}, dict(label_smoothing=0.2), dict(weight="w"), dict(weight="w", label_smoothing=0.1)],
    ids=["plain", "smoothing", "weight", "weight+smoothing"],
)
def test_batched_gradients_match_torch(kwargs, blocked, reduction):
    """``autograd.grad(loss, x, eye, is_grads_batched=True)``: the backward runs under vmap."""
    g = _gen(11)
    logits = torch.randn(8, 6, dtype=torch.float64, generator=g)
    target = torch.tensor([0, 1, 5, -100, 4, 4, 2, -100])
    if kwargs.get("weight") == "w":
        kwargs = {**kwargs, "weight": torch.rand(6, dtype=torch.float64, generator=g)}
    grads = []
    for fn in (C.cross_entropy, F.cross_entropy):
        x = logits.clone().requires_grad_()
        with blocked_path(blocked and fn is C.cross_entropy):
            out = fn(x, target, reduction=reduction, **kwargs)
            if fn is C.cross_entropy and blocked:
                assert type(out.grad_fn).__name__ == "CrossEntropyIndexBackward"
            eye = torch.eye(out.numel(), dtype=out.dtype).view(-1, *out.shape)
            (grad,) = torch.autograd.grad(out, x, eye, is_grads_batched=True)
        grads.append(grad)
    assert grads[0].shape == (out.numel(), 8, 6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_forward_mode_ad(case):
    fn, args, kwargs = case[1]()
    assert torch.autograd.gradcheck(
        lambda *a: fn(*a, **kwargs), args, check_forward_ad=True, check_backward_ad=False,
        check_undefined_grad=False, check_batched_grad=False,
    )  # fmt: skip


def test_double_backward_matches_torch():
    g = _gen(4)
    logits = torch.randn(5, 6, dtype=torch.float64, generator=g)
    target = torch.tensor([0, 1, -100, 5, 2])
    w = torch.rand(6, dtype=torch.float64, generator=g)
    hvps = []
    for fn in (C.cross_entropy, F.cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, target, weight=w, label_smoothing=0.2)
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        (hvp,) = torch.autograd.grad(
            (grad * torch.arange(30.0, dtype=torch.float64).view(5, 6)).sum(), x
        )
        hvps.append(hvp)
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-10, atol=1e-12)


def test_torch_func_grad_and_vmap():
    g = _gen(6)
    logits = torch.randn(4, 3, 5, dtype=torch.float64, generator=g)
    target = torch.randint(0, 5, (4, 3), generator=g)
    ours = torch.func.vmap(
        torch.func.grad(lambda x, t: C.cross_entropy(x, t, label_smoothing=0.1))
    )(logits, target)
    theirs = torch.func.vmap(
        torch.func.grad(lambda x, t: F.cross_entropy(x, t, label_smoothing=0.1))
    )(logits, target)
    torch.testing.assert_close(ours, theirs)
    x = torch.rand(4, 6, dtype=torch.float64, generator=g) * 0.9 + 0.05
    y = torch.rand(4, 6, dtype=torch.float64, generator=g)
    ours = torch.func.vmap(torch.func.grad(C.binary_cross_entropy))(x, y)
    theirs = torch.func.vmap(torch.func.grad(F.binary_cross_entropy))(x, y)
    torch.testing.assert_close(ours, theirs)


def test_torch_compile_fullgraph():
    g = _gen(7)
    logits = torch.randn(6, 5, generator=g, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, -100])
    probs = torch.rand(6, 5, generator=g)

    def loss_fn(x, t, p):
        return (
            C.cross_entropy(x, t, label_smoothing=0.1)
            + C.cross_entropy(x, p)
            + C.binary_cross_entropy_with_logits(x, p)
            + C.binary_cross_entropy(torch.sigmoid(x), p)
            + C.nll_loss(x.log_softmax(1), t)
        )

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out = compiled(logits, target, probs)
    expected = loss_fn(logits, target, probs)
    torch.testing.assert_close(out, expected)
    (g1,) = torch.autograd.grad(out, logits)
    (g2,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(g1, g2)


def test_deterministic_mode():
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(8, 5, requires_grad=True)
        C.cross_entropy(x, torch.randint(0, 5, (8,))).backward()
        C.nll_loss(x, torch.randint(0, 5, (8,))).backward()
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------------------------
# No mutation, top-level exports, __torch_function__


def test_inputs_are_not_mutated():
    g = _gen(8)
    tensors = dict(
        logits=torch.randn(6, 5, generator=g), target=torch.tensor([0, 1, 2, -100, 4, 3]),
        weight=torch.rand(5, generator=g), probs=torch.rand(6, 5, generator=g),
        x=torch.rand(6, 5, generator=g), pos_weight=torch.rand(5, generator=g),
    )  # fmt: skip
    before = {k: v.clone() for k, v in tensors.items()}
    t = tensors
    logits = t["logits"].requires_grad_()
    losses = [
        C.cross_entropy(logits, t["target"], weight=t["weight"], label_smoothing=0.1),
        C.cross_entropy(logits, t["probs"], weight=t["weight"]),
        C.nll_loss(logits, t["target"], weight=t["weight"]),
        C.binary_cross_entropy(t["x"], t["probs"], weight=t["weight"]),
        C.binary_cross_entropy_with_logits(logits, t["probs"], weight=t["weight"], pos_weight=t["pos_weight"]),
    ]  # fmt: skip
    sum(losses).backward()
    for k, v in tensors.items():
        assert torch.equal(v.detach(), before[k]), k


def test_top_level_exports():
    assert crossent.cross_entropy is C.cross_entropy
    assert crossent.binary_cross_entropy is C.binary_cross_entropy
    assert crossent.binary_cross_entropy_with_logits is C.binary_cross_entropy_with_logits
    assert crossent.nll_loss is C.nll_loss


def test_torch_function_dispatch():
    calls = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    x = torch.randn(3, 4).as_subclass(Logged)
    C.cross_entropy(x, torch.tensor([0, 1, 2]))
    assert C.cross_entropy in calls


def test_cpu_values_seed_example():
    """The tutorial's BCE example: mean 1.2200."""
    x = torch.tensor([0.3440, 0.7944, 0.8919, 0.3551, 0.9817, 0.8871])
    y = torch.tensor([0.1639, 0.4745, 0.1537, 0.5444, 0.6933, 0.1129])
    assert round(C.binary_cross_entropy(x, y).item(), 4) == 1.2200


# ---------------------------------------------------------------------------------------------
# The float64 NumPy reference as a second oracle (torch's kernels serve most paths, so torch
# alone would be checking itself).


def _reference_cases(g: torch.Generator):
    x = torch.randn(6, 5, 3, dtype=torch.float64, generator=g) * 2
    t = torch.randint(0, 5, (6, 3), generator=g)
    t[1, 2] = t[4, 0] = -100
    w = torch.rand(5, dtype=torch.float64, generator=g) + 0.1
    probs = torch.rand(6, 5, 3, dtype=torch.float64, generator=g)
    p = torch.rand(6, 5, dtype=torch.float64, generator=g) * 0.98 + 0.01
    y = torch.rand(6, 5, dtype=torch.float64, generator=g)
    pw = torch.rand(5, dtype=torch.float64, generator=g) * 3
    return [
        ("cross_entropy", x, t, dict(weight=w, label_smoothing=0.15)),
        ("cross_entropy", x[:, :, 0], t[:, 1], dict(weight=w, ignore_index=2)),
        ("cross_entropy", x, probs, dict(weight=w, label_smoothing=0.1)),
        ("nll_loss", x.log_softmax(1), t, dict(weight=w)),
        ("binary_cross_entropy", p, y, dict(weight=w)),
        ("binary_cross_entropy_with_logits", x[:, :, 0] * 5, y, dict(weight=w, pos_weight=pw)),
    ]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("blocked", [False, True], ids=["default", "blocked"])
def test_values_and_gradients_match_the_float64_reference(blocked, reduction):
    for name, x, target, kwargs in _reference_cases(_gen(12)):
        xx = x.clone().requires_grad_()
        with blocked_path(blocked):
            out = getattr(C, name)(xx, target, reduction=reduction, **kwargs)
            upstream = torch.randn(out.shape, dtype=out.dtype, generator=_gen(13))
            (grad,) = torch.autograd.grad(out, xx, upstream)
        np_kwargs = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        ref = getattr(R, name)(x.numpy(), target.numpy(), reduction=reduction, **np_kwargs)
        ref_grad = getattr(R, name + "_grad")(
            x.numpy(), target.numpy(), upstream.numpy(), reduction=reduction, **np_kwargs
        )
        np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-12, err_msg=name)


def test_large_logits_take_the_blocked_path_and_small_ones_torch_kernel():
    """The path choice itself (benchmarks/bench_matrix.py measures why): many classes on
    large logits go through crossent's blocked Function, few classes through torch's kernel;
    transforms (forward AD, torch.func, torch.compile) always through torch's kernel."""
    big = torch.randn(64, 32000, requires_grad=True)
    small = torch.randn(64, 10, requires_grad=True)
    t = torch.zeros(64, dtype=torch.long)
    assert type(C.cross_entropy(big, t).grad_fn).__name__ == "CrossEntropyIndexBackward"
    assert type(C.cross_entropy(small, t).grad_fn).__name__ != "CrossEntropyIndexBackward"
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(big.detach(), torch.randn(64, 32000))
        assert not eager.blocked_cross_entropy_pays(dual)


@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_with_logits_float32_input_low_precision_target_is_bitwise_torch(
    target_dtype, reduction
):
    """torch rounds to the target's dtype after each of its ops; so does crossent."""
    g = _gen(14)
    x = torch.randn(64, 33, generator=g) * 4
    y = torch.rand(64, 33, generator=g).to(target_dtype)
    kw = dict(
        weight=torch.rand(33, generator=g),
        pos_weight=torch.rand(33, generator=g) * 3,
        reduction=reduction,
    )
    for kwargs in (dict(reduction=reduction), kw):
        (a, ga), (b, gb) = run_both(
            "binary_cross_entropy_with_logits", (x, y), kwargs, grad_wrt=(0, 1)
        )
        assert a.dtype == b.dtype == target_dtype
        assert torch.equal(a, b)
        for u, v in zip(ga, gb, strict=True):
            assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize(
    "kwargs", [{}, dict(label_smoothing=0.1), dict(weight=torch.rand(5, dtype=torch.float64))]
)
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_unbatched_input_with_1d_target_of_size_1_has_the_0d_targets_gradient(name, kwargs):
    """torch accepts a (1,) target for (C,) input, then fails in its backward; crossent gives
    the value and gradient of the equivalent () target."""
    if name == "nll_loss":
        kwargs = {k: v for k, v in kwargs.items() if k == "weight"}
    x = torch.randn(5, dtype=torch.float64, generator=_gen(15))
    results = []
    for target in (torch.tensor([2]), torch.tensor(2)):
        xx = x.clone().requires_grad_()
        out = getattr(C, name)(xx, target, **kwargs)
        results.append((out.detach(), torch.autograd.grad(out, xx)[0]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(
        results[1][0], getattr(F, name)(x, torch.tensor(2), **kwargs), rtol=1e-12, atol=1e-12
    )
