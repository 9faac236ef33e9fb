"""Linear distillation (``crossent.linear_distillation_loss``) and probability targets of
linear cross entropy, both streamed by ``crossent.ops.soft_chunked``.

Oracles: an eager float64 formula on the full logits (written from the math in the docstring),
TRL's ``GKDTrainer.generalized_jsd_loss`` (the convention the loss follows), and
``F.cross_entropy(F.linear(...), probs)`` for probability targets.
"""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import crossent
from crossent.distillation import LinearDistillationLoss, linear_distillation_loss
from crossent.linear_probs import linear_cross_entropy_probs
from crossent.ops import soft_chunked

F64 = torch.float64
N_BATCH, N_TIME, D_S, D_T, V = 2, 9, 6, 10, 40  # different hidden sizes for the two heads
BETAS = (0.0, 0.25, 0.5, 1.0)
TEMPERATURES = (0.5, 1.0, 2.0)
REDUCTIONS = ("mean", "sum", "none")
# float64 results agree with the float64 oracles to a few ulp of the values summed.
F64_TOL = {"rtol": 1e-11, "atol": 1e-12}


def _problem(dtype=F64, seed=0, scale=1.0, masked=True, shape=(N_BATCH, N_TIME)):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(*shape, D_S, generator=gen, dtype=F64) * scale
    ws = torch.randn(V, D_S, generator=gen, dtype=F64) * D_S**-0.5
    bs = torch.randn(V, generator=gen, dtype=F64) * 0.5
    xt = torch.randn(*shape, D_T, generator=gen, dtype=F64) * scale
    wt = torch.randn(V, D_T, generator=gen, dtype=F64) * (2 / D_T) ** 0.5
    bt = torch.randn(V, generator=gen, dtype=F64) * 0.5
    target = torch.randint(0, V, shape, generator=gen)
    if masked:
        target.view(-1)[::4] = -100
    return [t.to(dtype) for t in (xs, ws, bs, xt, wt, bt)] + [target]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _eager(xs, ws, bs, xt, wt, bt, target, *, beta, temperature, hard=0.0, soft=1.0,
           reduction="mean"):  # fmt: skip
    """The loss on full logits, from the formula: the float64 oracle."""
    zs = F.linear(xs, ws, bs)
    zt = F.linear(xt, wt, bt)
    ls = F.log_softmax(zs / temperature, -1)
    lt = F.log_softmax(zt / temperature, -1)
    if beta == 0:
        div = (lt.exp() * (lt - ls)).sum(-1)
    elif beta == 1:
        div = (ls.exp() * (ls - lt)).sum(-1)
    else:
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log1p(-beta))  # log of the mixture
        div = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    loss = soft * div
    if target is None:
        keep = torch.ones(loss.shape, dtype=torch.bool)
    else:
        keep = target != -100
        if hard:
            ce = -F.log_softmax(zs, -1).gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            loss = loss + hard * ce
    loss = torch.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / keep.sum().clamp_min(1)


def _grads(loss, tensors, grad_output=None):
    loss.backward(grad_output)
    return [t.grad for t in tensors]


@pytest.fixture(scope="module")
def trl_jsd():
    """TRL's ``GKDTrainer.generalized_jsd_loss``, the function itself.

    Importing ``trl.experimental.gkd`` pulls in transformers, datasets, pandas and pyarrow
    (half a minute on a busy 2-core machine), so the function's own source is read from the
    installed package and compiled alone: the same code, run on torch and ``F`` only.
    """
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed (pip install -r requirements-dev.txt)")
    path = Path(spec.submodule_search_locations[0]) / "experimental" / "gkd" / "gkd_trainer.py"
    if not path.exists():
        pytest.skip(f"this trl has no {path}")
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "generalized_jsd_loss":
            node.decorator_list = []
            namespace = {"torch": torch, "F": F}
            exec(compile(ast.Module([node], type_ignores=[]), str(path), "exec"), namespace)
            return namespace["generalized_jsd_loss"]
    pytest.skip("trl's GKDTrainer has no generalized_jsd_loss")


# --------------------------------------------------------------------------------------------
# Against TRL and the eager formula, float64.


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl(trl_jsd, beta, temperature):
    xs, ws, bs, xt, wt, bt, target = _problem()
    for reduction, trl_reduction in (("mean", "batchmean"), ("sum", "sum"), ("none", "none")):
        ours = _leaves(xs, ws, bs)
        theirs = _leaves(xs, ws, bs)
        loss = linear_distillation_loss(
            ours[0], ours[1], xt, wt, target, student_bias=ours[2], teacher_bias=bt, beta=beta,
            temperature=temperature, reduction=reduction, chunk_size=5,
        )  # fmt: skip
        ref = trl_jsd(
            F.linear(theirs[0], theirs[1], theirs[2]), F.linear(xt, wt, bt), labels=target,
            beta=beta, temperature=temperature, reduction=trl_reduction,
        )  # fmt: skip
        if reduction == "none":
            keep = target != -100
            torch.testing.assert_close(loss[keep], ref.sum(-1), **F64_TOL)
            assert (loss[~keep] == 0).all()
            grad_output = torch.randn(loss.shape, dtype=F64)
            ref = (ref.sum(-1) * grad_output[keep]).sum()
            loss = (loss * grad_output).sum()
        else:
            torch.testing.assert_close(loss, ref, **F64_TOL)
        for a, b in zip(_grads(loss, ours), _grads(ref, theirs), strict=True):
            torch.testing.assert_close(a, b, **F64_TOL)


def test_matches_trl_without_labels(trl_jsd):
    # TRL's 'batchmean' without labels divides by the first dimension: tokens for 2-D logits.
    xs, ws, bs, xt, wt, bt, _ = _problem(shape=(13,))
    for beta in BETAS:
        ours = _leaves(xs, ws)
        theirs = _leaves(xs, ws)
        loss = linear_distillation_loss(ours[0], ours[1], xt, wt, beta=beta, temperature=2.0)
        ref = trl_jsd(F.linear(theirs[0], theirs[1]), F.linear(xt, wt), beta=beta,
                      temperature=2.0)  # fmt: skip
        torch.testing.assert_close(loss, ref, **F64_TOL)
        for a, b in zip(_grads(loss, ours), _grads(ref, theirs), strict=True):
            torch.testing.assert_close(a, b, **F64_TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize(
    "beta, hard, soft", [(0.0, 0.3, 0.7), (0.25, 1.0, 1.0), (0.5, 0.5, 0.0), (1.0, 2.0, 0.5)]
)
def test_hard_soft_mix_matches_eager(beta, hard, soft, temperature, reduction):
    xs, ws, bs, xt, wt, bt, target = _problem(seed=1)
    options = dict(beta=beta, temperature=temperature, reduction=reduction)
    ours = _leaves(xs, ws, bs)
    ref_leaves = _leaves(xs, ws, bs)
    loss = linear_distillation_loss(
        ours[0], ours[1], xt, wt, target, student_bias=ours[2], teacher_bias=bt,
        hard_weight=hard, soft_weight=soft, chunk_size=4, **options,
    )  # fmt: skip
    ref = _eager(*ref_leaves, xt, wt, bt, target, hard=hard, soft=soft, **options)
    torch.testing.assert_close(loss, ref, **F64_TOL)
    grad_output = torch.randn(loss.shape, dtype=F64) if reduction == "none" else None
    for a, b in zip(_grads(loss, ours, grad_output), _grads(ref, ref_leaves, grad_output),
                    strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, **F64_TOL)


@pytest.mark.parametrize("beta", BETAS)
def test_accelerator_path_masks_instead_of_compacting(monkeypatch, beta):
    # Off the host, masked rows stay in the matmuls (no nonzero, no sync) with a zero scale.
    xs, ws, bs, xt, wt, bt, target = _problem(seed=2)
    monkeypatch.setattr(soft_chunked, "_on_host", lambda t: False)
    for reduction in REDUCTIONS:
        ours = _leaves(xs, ws, bs)
        ref_leaves = _leaves(xs, ws, bs)
        loss = linear_distillation_loss(
            ours[0], ours[1], xt, wt, target, student_bias=ours[2], beta=beta,
            temperature=0.5, hard_weight=0.5, reduction=reduction, chunk_size=7,
        )  # fmt: skip
        ref = _eager(*ref_leaves, xt, wt, None, target, beta=beta, temperature=0.5, hard=0.5,
                     reduction=reduction)  # fmt: skip
        torch.testing.assert_close(loss, ref, **F64_TOL)
        g = torch.ones_like(loss) if reduction == "none" else None
        for a, b in zip(_grads(loss, ours, g), _grads(ref, ref_leaves, g), strict=True):
            torch.testing.assert_close(a, b, **F64_TOL)


def test_chunk_sizes_agree_and_shapes():
    xs, ws, bs, xt, wt, bt, target = _problem()
    losses = [
        linear_distillation_loss(xs, ws, xt, wt, target, reduction="none", chunk_size=c)
        for c in (1, 3, 64, None)
    ]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], **F64_TOL)
    assert losses[0].shape == (N_BATCH, N_TIME)
    # Unbatched (D,) input: a 0-d loss, as linear_cross_entropy.
    one = linear_distillation_loss(xs[0, 1], ws, xt[0, 1], wt, target[0, 1], reduction="none")
    assert one.shape == ()
    torch.testing.assert_close(one, losses[0][0, 1], **F64_TOL)
    # uint8 targets are class indices too (no -100 there: ignore_index 255).
    t8 = target.clamp_min(0).to(torch.uint8)
    t8.view(-1)[::4] = 255
    a = linear_distillation_loss(xs, ws, xt, wt, t8, ignore_index=255, hard_weight=0.5)
    b = linear_distillation_loss(xs, ws, xt, wt, target, hard_weight=0.5)
    torch.testing.assert_close(a, b, **F64_TOL)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_never_holds_n_by_v(reduction):
    # 256 tokens, V=40, 8-token chunks: an N×V tensor would have 10240 elements; the chunks
    # have 320, the hidden states 2560 (N×D_T), the weight gradient 240.
    gen = torch.Generator().manual_seed(7)
    xs, xt = torch.randn(256, D_S, generator=gen), torch.randn(256, D_T, generator=gen)
    ws, wt = torch.randn(V, D_S, requires_grad=True), torch.randn(V, D_T)
    target = torch.randint(0, V, (256,), generator=gen)
    xs.requires_grad_()
    with _LargestTensor() as mode:
        loss = linear_distillation_loss(xs, ws, xt, wt, target, beta=0.5, temperature=2.0,
                                        hard_weight=0.5, reduction=reduction, chunk_size=8)  # fmt: skip
        loss.sum().backward()
    assert mode.numel <= 256 * D_T < 256 * V


def test_no_grad_and_retain_graph():
    xs, ws, bs, xt, wt, bt, target = _problem()
    with torch.no_grad():
        plain = linear_distillation_loss(xs, ws, xt, wt, target, beta=0.25)
    ours = _leaves(xs, ws)
    loss = linear_distillation_loss(ours[0], ours[1], xt, wt, target, beta=0.25)
    torch.testing.assert_close(loss, plain, **F64_TOL)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in ours]
    for t in ours:
        t.grad = None
    (3 * loss).backward()  # recomputed from the saved inputs
    for a, b in zip(first, ours, strict=True):
        torch.testing.assert_close(3 * a, b.grad, **F64_TOL)


def test_teacher_gets_no_gradient():
    xs, ws, bs, xt, wt, bt, target = _problem()
    student = _leaves(xs, ws, bs)
    teacher = _leaves(xt, wt, bt)
    loss = linear_distillation_loss(
        student[0], student[1], teacher[0], teacher[1], target, student_bias=student[2],
        teacher_bias=teacher[2], hard_weight=0.5,
    )  # fmt: skip
    loss.backward()
    assert all(t.grad is not None for t in student)
    assert all(t.grad is None for t in teacher)


def test_only_the_bias_or_weight_needs_grad():
    xs, ws, bs, xt, wt, bt, target = _problem()
    (b,) = _leaves(bs)
    linear_distillation_loss(xs, ws, xt, wt, target, student_bias=b).backward()
    ref = _leaves(bs)[0]
    _eager(xs, ws, ref, xt, wt, None, target, beta=0.5, temperature=1.0).backward()
    torch.testing.assert_close(b.grad, ref.grad, **F64_TOL)


def test_all_tokens_masked():
    xs, ws, bs, xt, wt, bt, target = _problem()
    target = torch.full_like(target, -100)
    for reduction, expected in (("mean", 0.0), ("sum", 0.0)):
        ours = _leaves(xs, ws)
        loss = linear_distillation_loss(ours[0], ours[1], xt, wt, target, hard_weight=1.0,
                                        reduction=reduction)  # fmt: skip
        assert loss.item() == expected  # TRL's batchmean clamps the count to 1: 0, not NaN
        loss.backward()
        assert all((t.grad == 0).all() for t in ours)
    none = linear_distillation_loss(xs, ws, xt, wt, target, reduction="none")
    assert none.shape == target.shape and (none == 0).all()


def test_identical_heads_give_zero():
    xs, ws, bs, xt, wt, bt, target = _problem()
    for beta in BETAS:
        loss = linear_distillation_loss(xs, ws, xs, ws, target, beta=beta, reduction="none")
        assert loss.abs().max() < 1e-14


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 12),
    v=st.integers(2, 20),
    d_s=st.integers(1, 6),
    d_t=st.integers(1, 6),
    beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    temperature=st.floats(0.25, 4.0),
    hard=st.sampled_from([0.0, 0.5]),
    reduction=st.sampled_from(REDUCTIONS),
    chunk_size=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_property_matches_eager(n, v, d_s, d_t, beta, temperature, hard, reduction, chunk_size,
                                seed):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    xs, ws = torch.randn(n, d_s, generator=gen, dtype=F64), torch.randn(v, d_s, generator=gen,
                                                                         dtype=F64)  # fmt: skip
    xt, wt = torch.randn(n, d_t, generator=gen, dtype=F64), torch.randn(v, d_t, generator=gen,
                                                                         dtype=F64)  # fmt: skip
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.3] = -100
    ours = _leaves(xs, ws)
    ref_leaves = _leaves(xs, ws)
    options = dict(beta=beta, temperature=temperature, reduction=reduction)
    loss = linear_distillation_loss(ours[0], ours[1], xt, wt, target, hard_weight=hard,
                                    chunk_size=chunk_size, **options)  # fmt: skip
    ref = _eager(ref_leaves[0], ref_leaves[1], None, xt, wt, None, target, hard=hard, **options)
    torch.testing.assert_close(loss, ref, **F64_TOL)
    g = torch.randn(loss.shape, generator=gen, dtype=F64)
    for a, b in zip(_grads(loss, ours, g), _grads(ref, ref_leaves, g), strict=True):
        torch.testing.assert_close(a, b, **F64_TOL)


# --------------------------------------------------------------------------------------------
# Low precision against float64, large logits.


@pytest.mark.parametrize(
    "dtype, loss_tol, grad_tol",
    [
        # float32: fp32 math, a few ulp of the per-token terms summed over V.
        (torch.float32, {"rtol": 2e-5, "atol": 1e-6}, {"rtol": 1e-4, "atol": 1e-6}),
        # bfloat16 in and out: fp32 math, results rounded to bf16 (8 bits: 2**-8 relative).
        (torch.bfloat16, {"rtol": 1e-2, "atol": 1e-3}, {"rtol": 2e-2, "atol": 2e-3}),
    ],
)
@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_low_precision_against_float64(dtype, loss_tol, grad_tol, beta):
    low = _problem(dtype=dtype, seed=3)
    high = [t.to(F64) if t.is_floating_point() else t for t in low]  # the same rounded inputs
    xs, ws, bs, xt, wt, bt, target = low
    ours = _leaves(xs, ws, bs)
    ref_leaves = _leaves(*high[:3])
    options = dict(beta=beta, temperature=2.0)
    loss = linear_distillation_loss(ours[0], ours[1], xt, wt, target, student_bias=ours[2],
                                    teacher_bias=bt, hard_weight=0.5, chunk_size=5,
                                    **options)  # fmt: skip
    ref = _eager(*ref_leaves, *high[3:], hard=0.5, **options)
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.to(F64), ref, **loss_tol)
    for a, b in zip(_grads(loss, ours), _grads(ref, ref_leaves), strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.to(F64), b, **grad_tol)


@pytest.mark.parametrize("beta", BETAS)
def test_large_logits_float32(beta):
    # Logits in the thousands: exp underflows for all but a few classes; the mixture is formed
    # from log-probabilities, so nothing becomes 0·(-inf).
    low = _problem(dtype=torch.float32, seed=4, scale=400.0)
    high = [t.to(F64) if t.is_floating_point() else t for t in low]
    xs, ws, bs, xt, wt, bt, target = low
    assert F.linear(xs, ws).abs().max() > 1000
    ours = _leaves(xs, ws)
    ref_leaves = _leaves(*high[:2])
    loss = linear_distillation_loss(ours[0], ours[1], xt, wt, target, beta=beta,
                                    reduction="none")  # fmt: skip
    ref = _eager(*ref_leaves, None, *high[3:5], None, target, beta=beta, temperature=1.0,
                 reduction="none")  # fmt: skip
    assert torch.isfinite(loss).all()
    # Per-token losses of hundreds: float32's few ulp of |logit| ~ 1e3 each.
    torch.testing.assert_close(loss.to(F64), ref, rtol=1e-5, atol=1e-3)
    for a, b in zip(_grads(loss.sum(), ours), _grads(ref.sum(), ref_leaves), strict=True):
        assert torch.isfinite(a).all()
        # Saturated softmaxes: gradients of ~1e-11, known to float32 only absolutely.
        torch.testing.assert_close(a.to(F64), b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Errors and the module.


def _call(**overrides):
    xs, ws, bs, xt, wt, bt, target = _problem(dtype=torch.float32)
    args = dict(student_input=xs, student_weight=ws, teacher_input=xt, teacher_weight=wt,
                target=target)  # fmt: skip
    args.update(overrides)
    return linear_distillation_loss(**args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({"teacher_input": torch.randn(N_BATCH, N_TIME + 1, D_T)}, RuntimeError, "leading shape"),
        ({"teacher_weight": torch.randn(V + 1, D_T)}, RuntimeError, "share the vocabulary"),
        ({"teacher_weight": torch.randn(V, D_T + 1)}, RuntimeError, "in_features"),
        ({"student_weight": torch.randn(V, D_S + 1)}, RuntimeError, "in_features"),
        ({"student_weight": torch.randn(V)}, RuntimeError, "num_classes, in_features"),
        ({"student_bias": torch.randn(V + 1)}, RuntimeError, "student_bias"),
        ({"teacher_bias": torch.randn(V, dtype=F64)}, RuntimeError, "dtype"),
        ({"teacher_weight": torch.randn(V, D_T, dtype=F64)}, RuntimeError, "dtype"),
        ({"student_input": torch.ones(N_BATCH, N_TIME, D_S, dtype=torch.long)},
         NotImplementedError, "floating"),
        ({"beta": -0.1}, ValueError, r"beta must lie in \[0, 1\]"),
        ({"beta": 1.5}, ValueError, "beta"),
        ({"beta": "0.5"}, TypeError, "beta must be a real number"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, ValueError, "temperature"),
        ({"temperature": math.inf}, ValueError, "temperature"),
        ({"hard_weight": -1.0}, ValueError, "hard_weight"),
        ({"soft_weight": math.nan}, ValueError, "soft_weight"),
        ({"hard_weight": 1.0, "target": None}, ValueError, "needs a target"),
        ({"target": torch.zeros(N_BATCH, N_TIME)}, RuntimeError, "Long or Byte"),
        ({"target": torch.zeros(N_BATCH, N_TIME + 1, dtype=torch.long)}, ValueError,
         "target of shape"),
        ({"target": torch.full((N_BATCH, N_TIME), V)}, IndexError, "out of bounds"),
        ({"reduction": "batchmean"}, ValueError, "reduction"),
        ({"ignore_index": None}, TypeError, "ignore_index"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
    ],
)  # fmt: skip
def test_errors(overrides, error, match):
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_double_backward_refused():
    xs, ws, bs, xt, wt, bt, target = _problem()
    (x,) = _leaves(xs)
    loss = linear_distillation_loss(x, ws, xt, wt, target)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_module_and_exports():
    xs, ws, bs, xt, wt, bt, target = _problem()
    criterion = crossent.nn.LinearDistillationLoss(beta=0.25, temperature=2.0, hard_weight=0.5,
                                                   reduction="sum")  # fmt: skip
    assert isinstance(criterion, LinearDistillationLoss)
    assert "beta=0.25" in repr(criterion)
    loss = criterion(xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt)
    ref = crossent.linear_distillation_loss(xs, ws, xt, wt, target, student_bias=bs,
                                            teacher_bias=bt, beta=0.25, temperature=2.0,
                                            hard_weight=0.5, reduction="sum")  # fmt: skip
    torch.testing.assert_close(loss, ref, **F64_TOL)
    with pytest.raises(ValueError, match="beta"):
        LinearDistillationLoss(beta=2.0)


# --------------------------------------------------------------------------------------------
# Probability targets of linear cross entropy.


def _probs_problem(dtype=F64, shape=(N_BATCH, N_TIME), seed=5):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D_S, generator=gen, dtype=F64)
    w = torch.randn(V, D_S, generator=gen, dtype=F64)
    b = torch.randn(V, generator=gen, dtype=F64)
    probs = torch.softmax(torch.randn(*shape, V, generator=gen, dtype=F64) * 2, -1)
    class_weight = torch.rand(V, generator=gen, dtype=F64) + 0.5
    return [t.to(dtype) for t in (x, w, b, probs, class_weight)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", (0.0, 0.2))
@pytest.mark.parametrize("weighted", (False, True))
def test_probability_targets_match_torch(reduction, label_smoothing, weighted):
    fn = crossent.linear_cross_entropy  # routes (..., V) float targets to crossent.linear_probs
    x, w, b, probs, class_weight = _probs_problem()
    class_weight = class_weight if weighted else None
    ours = _leaves(x, w, b, probs)
    theirs = _leaves(x, w, b, probs)
    loss = fn(ours[0], ours[1], ours[3], linear_bias=ours[2], weight=class_weight,
              reduction=reduction, label_smoothing=label_smoothing, chunk_size=4)  # fmt: skip
    # torch's class dimension is dim 1: flatten the (B, T) tokens for the reference.
    ref = F.cross_entropy(F.linear(theirs[0], theirs[1], theirs[2]).reshape(-1, V),
                          theirs[3].reshape(-1, V), weight=class_weight, reduction=reduction,
                          label_smoothing=label_smoothing)  # fmt: skip
    if reduction == "none":
        ref = ref.reshape(loss.shape)
    torch.testing.assert_close(loss, ref, **F64_TOL)
    g = torch.randn(loss.shape, dtype=F64) if reduction == "none" else None
    # Gradients w.r.t. the input, weight, bias and the probability target itself.
    for a, b_ in zip(_grads(loss, ours, g), _grads(ref, theirs, g), strict=True):
        torch.testing.assert_close(a, b_, **F64_TOL)


def test_probability_targets_low_precision_and_promotion():
    x, w, b, probs, class_weight = _probs_problem(dtype=torch.float32, shape=(13,))
    loss = linear_cross_entropy_probs(x, w, probs, linear_bias=b, weight=class_weight)
    ref = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), probs.double(),
                          weight=class_weight.double())  # fmt: skip
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=1e-6)
    # A float64 target promotes the result, as torch does.
    promoted = linear_cross_entropy_probs(x, w, probs.double(), linear_bias=b)
    assert promoted.dtype == F64
    bf = [t.to(torch.bfloat16) for t in (x, w, probs)]
    low = linear_cross_entropy_probs(*bf)
    assert low.dtype == torch.bfloat16
    ref = F.cross_entropy(F.linear(bf[0].double(), bf[1].double()), bf[2].double())
    torch.testing.assert_close(low.double(), ref, rtol=1e-2, atol=0)
    # No rows: 'mean' is NaN (0/0) as torch, 'sum' 0.
    empty = linear_cross_entropy_probs(x[:0], w, probs[:0])
    assert torch.isnan(empty)


def test_probability_target_errors():
    x, w, b, probs, class_weight = _probs_problem(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        linear_cross_entropy_probs(x, w, probs, ignore_index=0)
    with pytest.raises(NotImplementedError, match="z_loss and softcap"):
        linear_cross_entropy_probs(x, w, probs, z_loss=1e-4)
    with pytest.raises(NotImplementedError, match="z_loss and softcap"):
        linear_cross_entropy_probs(x, w, probs, softcap=30.0)
    with pytest.raises(RuntimeError, match="weight tensor should be defined"):
        linear_cross_entropy_probs(x, w, probs, weight=class_weight[:-1])
    with pytest.raises(RuntimeError, match="label_smoothing"):
        linear_cross_entropy_probs(x, w, probs, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="in_features"):
        linear_cross_entropy_probs(x, w[:, :-1], probs)


# --------------------------------------------------------------------------------------------
# Hugging Face: the causal-LM label shift.


def test_lm_head_distillation_loss_shifts_labels(trl_jsd):
    from crossent.integrations._distillation import lm_head_distillation_loss

    gen = torch.Generator().manual_seed(6)
    student_head = torch.nn.Linear(D_S, V, bias=True, dtype=F64)
    teacher_head = torch.nn.Linear(D_T, V, bias=False, dtype=F64)
    hs = torch.randn(N_BATCH, N_TIME, D_S, generator=gen, dtype=F64, requires_grad=True)
    ht = torch.randn(N_BATCH, N_TIME, D_T, generator=gen, dtype=F64)
    labels = torch.randint(0, V, (N_BATCH, N_TIME), generator=gen)
    labels[0, :3] = -100  # a prompt
    loss = lm_head_distillation_loss(hs, student_head, ht, teacher_head, labels, beta=0.25,
                                     temperature=2.0)  # fmt: skip
    # TRL scores position i against label i + 1: logits[:, :-1] with labels[:, 1:].
    ref = trl_jsd(student_head(hs)[:, :-1], teacher_head(ht)[:, :-1], labels=labels[:, 1:],
                  beta=0.25, temperature=2.0)  # fmt: skip
    torch.testing.assert_close(loss, ref, **F64_TOL)
    (g,) = torch.autograd.grad(loss, student_head.weight)
    (r,) = torch.autograd.grad(ref, student_head.weight)
    torch.testing.assert_close(g, r, **F64_TOL)
    assert teacher_head.weight.grad is None

    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    by_count = lm_head_distillation_loss(hs, student_head, ht, teacher_head, shift_labels=shifted,
                                         beta=0.25, temperature=2.0,
                                         num_items_in_batch=torch.tensor(7))  # fmt: skip
    kept = (shifted != -100).sum()
    torch.testing.assert_close(by_count, loss * kept / 7, **F64_TOL)
    low = lm_head_distillation_loss(hs.float(), student_head.weight.float(), ht.bfloat16(),
                                    teacher_head.weight.bfloat16(), labels)  # fmt: skip
    assert low.dtype == torch.float32
