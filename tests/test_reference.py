"""Differential tests of ``crossent.reference`` against torch 2.13 (float64), plus identities.

Oracle: torch itself, forward values and ``torch.autograd.grad``, in float64. Tolerance: 1e-12
relative, 1e-12 absolute (near zero); NaN and ±inf must appear in the same places.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crossent.reference as R

RTOL = 1e-12
ATOL = 1e-12
REDUCTIONS = ("none", "mean", "sum")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def to_torch(value, requires_grad: bool = False):
    """NumPy float -> float64 tensor, NumPy int -> int64 tensor; anything else unchanged."""
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return torch.tensor(value, dtype=torch.float64, requires_grad=requires_grad)
        if np.issubdtype(value.dtype, np.bool_):
            return torch.tensor(value)
        if np.issubdtype(value.dtype, np.integer):
            return torch.tensor(value.astype(np.int64))
    return value


def assert_close(actual, expected, rtol: float = RTOL, atol: float = ATOL) -> None:
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def torch_value_and_grads(name: str, args: dict, grad_output, wrt: tuple[str, ...], **options):
    """Run ``F.<name>(**args, **options)`` and ``torch.autograd.grad`` w.r.t. ``wrt``."""
    tensors = {k: to_torch(v, requires_grad=k in wrt) for k, v in args.items()}
    tensors.update({k: to_torch(v) for k, v in options.items()})
    out = getattr(F, name)(**tensors)
    grads = torch.autograd.grad(
        out,
        [tensors[k] for k in wrt],
        grad_outputs=torch.as_tensor(grad_output, dtype=torch.float64),
    )
    return out, grads


def random_grad_output(rng: np.random.Generator, reduction: str, loss_shape: tuple[int, ...]):
    if reduction == "none":
        return rng.normal(size=loss_shape)
    return np.asarray(rng.normal())


def broadcastable_shape(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A random shape that broadcasts to ``shape``: a suffix of it with some sizes set to 1."""
    keep = int(rng.integers(0, len(shape) + 1))
    suffix = shape[len(shape) - keep :]
    return tuple(1 if rng.random() < 0.4 else size for size in suffix)


# ----------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout.strip()


def test_reference_package_does_not_import_torch():
    """The reference and everything it imports are torch-free (parent __init__ stubbed out)."""
    src = list(importlib.util.find_spec("crossent").submodule_search_locations)
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('crossent'); pkg.__path__ = {src!r}\n"
        "sys.modules['crossent'] = pkg\n"
        "import crossent.reference as R\n"
        "R.cross_entropy([[1.0, 2.0]], [0]); R.binary_cross_entropy([0.5], [0.5])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))\n"
    )
    assert _run(code) == "[]"


def test_import_crossent_reference_does_not_import_torch():
    """``import crossent.reference`` loads no torch (the package resolves attributes lazily)."""
    torch_loaded = "print('torch' in sys.modules)"
    assert _run(f"import sys, crossent; {torch_loaded}") == "False"
    assert _run(f"import sys, crossent.reference; {torch_loaded}") == "False"


@pytest.mark.parametrize("module", ["numerics", "binary", "nll", "categorical"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(f"crossent.reference.{module}"))
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------------------------
# Binary cross entropy
# ----------------------------------------------------------------------------------------------

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


def test_bce_seed_value():
    x = [0.3440, 0.7944, 0.8919, 0.3551, 0.9817, 0.8871]
    y = [0.1639, 0.4745, 0.1537, 0.5444, 0.6933, 0.1129]
    loss = R.binary_cross_entropy(x, y)
    assert round(float(loss), 4) == 1.2200
    assert_close(loss, F.binary_cross_entropy(torch.tensor(x), torch.tensor(y)).double(), 1e-6)


@SETTINGS
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(REDUCTIONS),
    weighted=st.booleans(),
)
def test_bce_matches_torch(shape, seed, reduction, weighted):
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.random(shape))
    y = np.asarray(rng.random(shape))
    # Sprinkle the boundaries, where the -100 clamp and the 1e-12 gradient floor act.
    x = np.where(rng.random(shape) < 0.15, rng.integers(0, 2, shape).astype(float), x)
    y = np.where(rng.random(shape) < 0.15, rng.integers(0, 2, shape).astype(float), y)
    weight = np.asarray(rng.random(broadcastable_shape(rng, shape)) * 2) if weighted else None
    g = random_grad_output(rng, reduction, shape)
    args = {"input": x, "target": y}
    out, (gx, gy) = torch_value_and_grads(
        "binary_cross_entropy", args, g, ("input", "target"), weight=weight, reduction=reduction
    )
    assert_close(R.binary_cross_entropy(x, y, weight, reduction), out)
    assert_close(R.binary_cross_entropy_grad(x, y, g, weight, reduction), gx)
    assert_close(R.binary_cross_entropy_target_grad(x, y, g, weight, reduction), gy)


def test_bce_boundaries():
    x = np.array([0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    y = np.array([0.0, 1.0, 0.0, 1.0, 0.5, 0.5])
    assert_close(R.binary_cross_entropy(x, y, reduction="none"), [0, 100, 100, 0, 50, 50])
    grad = R.binary_cross_entropy_grad(x, y, reduction="sum")
    eps = float(np.float32(1e-12))  # torch's floor is the float literal 1e-12f
    assert_close(grad, np.array([0, -1, 1, 0, -0.5, 0.5]) / eps)
    target_grad = R.binary_cross_entropy_target_grad(x, y, reduction="sum")
    assert_close(target_grad, [np.inf, np.inf, -np.inf, -np.inf, np.inf, -np.inf])
    out, (gx, gy) = torch_value_and_grads(
        "binary_cross_entropy",
        {"input": x, "target": y},
        1.0,
        ("input", "target"),
        reduction="sum",
    )
    assert_close(R.binary_cross_entropy(x, y, reduction="sum"), out)
    assert_close(grad, gx)
    assert_close(target_grad, gy)
    # float16: the 1e-12 floor underflows to 0, so the boundary gradient is infinite (as torch).
    half = R.binary_cross_entropy_grad([0.0], [1.0], reduction="sum", dtype=np.float16)
    assert half.dtype == np.float16 and half[0] == -np.inf
    xt = torch.tensor([0.0], dtype=torch.float16, requires_grad=True)
    loss = F.binary_cross_entropy(xt, torch.tensor([1.0], dtype=torch.float16), reduction="sum")
    assert torch.autograd.grad(loss, xt)[0].item() == -np.inf


def test_bce_target_grad_at_half_is_negative_zero():
    grad = R.binary_cross_entropy_target_grad([0.5], [0.3], reduction="sum")
    assert grad[0] == 0 and np.signbit(grad[0])


# ----------------------------------------------------------------------------------------------
# Binary cross entropy with logits
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(
    shape=shapes,
    seed=st.integers(0, 2**32 - 1),
    reduction=st.sampled_from(REDUCTIONS),
    weighted=st.booleans(),
    pos_weighted=st.booleans(),
    scale=st.sampled_from([1.0, 10.0, 100.0, 1e4]),
)
def test_bce_with_logits_matches_torch(shape, seed, reduction, weighted, pos_weighted, scale):
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.normal(size=shape) * scale)
    x = np.where(rng.random(shape) < 0.1, 0.0, x)
    # Targets are not range-checked by torch: include values outside [0, 1].
    y = rng.uniform(-0.5, 1.5, shape)
    y = np.where(rng.random(shape) < 0.4, rng.integers(0, 2, shape).astype(float), y)
    weight = np.asarray(rng.random(broadcastable_shape(rng, shape)) * 2) if weighted else None
    pos_weight = rng.uniform(-1, 4, broadcastable_shape(rng, shape)) if pos_weighted else None
    pos_weight = None if pos_weight is None else np.asarray(pos_weight)
    g = random_grad_output(rng, reduction, shape)
    options = {"weight": weight, "reduction": reduction, "pos_weight": pos_weight}
    out, (gx, gy) = torch_value_and_grads(
        "binary_cross_entropy_with_logits",
        {"input": x, "target": y},
        g,
        ("input", "target"),
        **options,
    )
    # Absolute tolerance scaled by the logits: errors are relative to |x|, not to the result.
    atol = ATOL * scale * 4
    assert_close(R.binary_cross_entropy_with_logits(x, y, **options), out, atol=atol)
    assert_close(R.binary_cross_entropy_with_logits_grad(x, y, g, **options), gx, atol=atol)
    assert_close(R.binary_cross_entropy_with_logits_target_grad(x, y, g, **options), gy, atol=atol)


def test_bce_with_logits_infinite_and_large_logits():
    x = np.array([np.inf, -np.inf, np.inf, -np.inf, 1e4, -1e4, 0.0, -120.0])
    y = np.array([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    pos_weight = np.array(3.0)
    for pw in (None, pos_weight):
        out, (gx, gy) = torch_value_and_grads(
            "binary_cross_entropy_with_logits",
            {"input": x, "target": y},
            np.ones(8),
            ("input", "target"),
            reduction="none",
            pos_weight=pw,
        )
        loss = R.binary_cross_entropy_with_logits(x, y, reduction="none", pos_weight=pw)
        assert_close(loss, out)
        g = np.ones(8)
        assert_close(R.binary_cross_entropy_with_logits_grad(x, y, g, None, "none", pw), gx)
        assert_close(R.binary_cross_entropy_with_logits_target_grad(x, y, g, None, "none", pw), gy)
    loss = R.binary_cross_entropy_with_logits(x, y, reduction="none")
    # torch's documented quirks at ±inf (issues #102894, #49844): 0·inf = nan.
    assert np.isnan(loss[[0, 1, 3]]).all() and loss[2] == np.inf
    assert loss[4] == 1e4 and loss[5] == 1e4 and loss[7] == 120.0
    grad = R.binary_cross_entropy_with_logits_grad(x, y, reduction="sum")
    assert grad[4] == 1.0 and grad[5] == -1.0 and grad[6] == 0.5


def test_bce_with_logits_pos_weight_per_channel_4d():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4, 5))
    y = rng.random((2, 3, 4, 5))
    pos_weight = rng.uniform(0.5, 3.0, (3, 1, 1))
    weight = rng.random((3, 1, 1))
    for reduction in REDUCTIONS:
        g = random_grad_output(rng, reduction, x.shape)
        options = {"weight": weight, "reduction": reduction, "pos_weight": pos_weight}
        out, (gx, gy) = torch_value_and_grads(
            "binary_cross_entropy_with_logits",
            {"input": x, "target": y},
            g,
            ("input", "target"),
            **options,
        )
        assert_close(R.binary_cross_entropy_with_logits(x, y, **options), out)
        assert_close(R.binary_cross_entropy_with_logits_grad(x, y, g, **options), gx)
        assert_close(R.binary_cross_entropy_with_logits_target_grad(x, y, g, **options), gy)
    # A (C,) pos_weight would apply along the last dim W, so it is rejected unless C == W.
    with pytest.raises(RuntimeError, match="pos_weight"):
        R.binary_cross_entropy_with_logits(x, y, pos_weight=np.ones(3))


# ----------------------------------------------------------------------------------------------
# NLL and cross entropy, class-index targets
# ----------------------------------------------------------------------------------------------


@st.composite
def index_problems(draw, smoothing: bool):
    """Random (logits, target, options) for class-index targets, all supported layouts."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    layout = draw(st.sampled_from(["unbatched", "2d", "3d", "4d", "5d"]))
    num_classes = draw(st.integers(1, 5))
    batch = draw(st.integers(0, 3)) if draw(st.booleans()) else draw(st.integers(1, 3))
    spatial = {"unbatched": 0, "2d": 0, "3d": 1, "4d": 2, "5d": 3}[layout]
    spatial_shape = tuple(draw(st.integers(1, 3)) for _ in range(spatial))
    if layout == "unbatched":
        shape, target_shape = (num_classes,), ()
    else:
        shape = (batch, num_classes) + spatial_shape
        target_shape = (batch,) + spatial_shape
    scale = draw(st.sampled_from([1.0, 10.0, 1e3]))
    logits = rng.normal(size=shape) * scale
    ignore_index = draw(st.sampled_from([-100, 255, -1, int(rng.integers(0, num_classes))]))
    target = rng.integers(0, num_classes, target_shape)
    target = np.where(rng.random(target_shape) < 0.25, ignore_index, target)
    weight = None
    if draw(st.booleans()):
        weight = rng.uniform(0.1, 2.0, num_classes)
        weight[rng.random(num_classes) < 0.2] = 0.0
    options = {
        "weight": weight,
        "ignore_index": ignore_index,
        "reduction": draw(st.sampled_from(REDUCTIONS)),
    }
    if smoothing:
        options["label_smoothing"] = draw(st.sampled_from([0.0, 0.1, 0.37, 1.0, -0.2]))
    return rng, logits, np.asarray(target, dtype=np.int64), options, scale


@SETTINGS
@given(problem=index_problems(smoothing=False))
def test_nll_loss_matches_torch(problem):
    rng, x, target, options, scale = problem
    loss_shape = target.shape
    g = random_grad_output(rng, options["reduction"], loss_shape)
    out, (gx,) = torch_value_and_grads(
        "nll_loss", {"input": x, "target": target}, g, ("input",), **options
    )
    assert_close(R.nll_loss(x, target, **options), out, atol=ATOL * scale)
    assert_close(R.nll_loss_grad(x, target, g, **options), gx, atol=ATOL * scale)


@SETTINGS
@given(problem=index_problems(smoothing=True))
def test_cross_entropy_index_targets_match_torch(problem):
    rng, x, target, options, scale = problem
    g = random_grad_output(rng, options["reduction"], target.shape)
    out, (gx,) = torch_value_and_grads(
        "cross_entropy", {"input": x, "target": target}, g, ("input",), **options
    )
    assert_close(R.cross_entropy(x, target, **options), out, atol=ATOL * scale)
    assert_close(R.cross_entropy_grad(x, target, g, **options), gx, atol=ATOL * scale)


def test_label_smoothing_with_weight_and_ignored_targets():
    """torch's regression test: the smoothing term shares NLL's denominator (PR #69511)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4, 3))
    weight = rng.uniform(0.2, 2.0, 4)
    for ignore_index in (-100, -2, 2, 255):
        target = rng.integers(0, 4, (6, 3))
        target[rng.random((6, 3)) < 0.3] = ignore_index
        for reduction in REDUCTIONS:
            options = {
                "weight": weight,
                "ignore_index": ignore_index,
                "reduction": reduction,
                "label_smoothing": 0.15,
            }
            g = random_grad_output(rng, reduction, target.shape)
            out, (gx,) = torch_value_and_grads(
                "cross_entropy", {"input": x, "target": target}, g, ("input",), **options
            )
            assert_close(R.cross_entropy(x, target, **options), out)
            assert_close(R.cross_entropy_grad(x, target, g, **options), gx)


def test_all_ignored_and_zero_total_weight():
    x = np.random.default_rng(2).normal(size=(3, 4))
    weight = np.array([1.0, -1.0, 0.0, 2.0])
    cases = [
        ("all ignored", np.array([-100, -100, -100]), {"weight": weight, "label_smoothing": 0.2}),
        ("all ignored, no weight", np.array([7, 7, 7]), {"ignore_index": 7}),
        ("weights sum to 0", np.array([0, 1, -100]), {"weight": weight}),
        (
            "weights sum to 0, smoothing",
            np.array([0, 1, -100]),
            {"weight": weight, "label_smoothing": 0.2},
        ),
        ("zero-weight targets", np.array([2, 2, -100]), {"weight": weight}),
    ]
    for _name, target, options in cases:
        for fn in ("nll_loss", "cross_entropy"):
            if fn == "nll_loss" and "label_smoothing" in options:
                continue
            for reduction in REDUCTIONS:
                g = random_grad_output(np.random.default_rng(3), reduction, target.shape)
                out, (gx,) = torch_value_and_grads(
                    fn,
                    {"input": x, "target": target},
                    g,
                    ("input",),
                    reduction=reduction,
                    **options,
                )
                loss = getattr(R, fn)(x, target, reduction=reduction, **options)
                grad = getattr(R, f"{fn}_grad")(x, target, g, reduction=reduction, **options)
                assert_close(loss, out)
                assert_close(grad, gx)
    # The spec, stated directly: all ignored gives a NaN mean, 0 sum, and zero gradients.
    target = np.array([-100, -100, -100])
    assert np.isnan(R.cross_entropy(x, target))
    assert R.cross_entropy(x, target, reduction="sum") == 0
    assert not np.any(R.cross_entropy_grad(x, target))


@pytest.mark.parametrize("shape", [(0, 3), (2, 3, 0), (0, 3, 2, 2), (2, 3, 2, 0, 1)])
def test_empty_batches(shape):
    x = np.zeros(shape)
    target = np.zeros(shape[:1] + shape[2:], dtype=np.int64)
    for fn in ("nll_loss", "cross_entropy"):
        for ls in (0.0, 0.1) if fn == "cross_entropy" else (0.0,):
            options = {"label_smoothing": ls} if ls else {}
            assert np.isnan(getattr(R, fn)(x, target, **options))
            assert getattr(R, fn)(x, target, reduction="sum", **options) == 0
            assert getattr(R, fn)(x, target, reduction="none", **options).shape == target.shape
            for reduction in REDUCTIONS:
                g = np.zeros(target.shape) if reduction == "none" else 1.0
                out, (gx,) = torch_value_and_grads(
                    fn,
                    {"input": x, "target": target},
                    g,
                    ("input",),
                    reduction=reduction,
                    **options,
                )
                assert_close(getattr(R, fn)(x, target, reduction=reduction, **options), out)
                assert_close(
                    getattr(R, f"{fn}_grad")(x, target, g, reduction=reduction, **options), gx
                )
    # Probability targets: mean nan, sum -0. (torch prints tensor(-0.)).
    assert np.isnan(R.cross_entropy(x, x))
    empty_sum = R.cross_entropy(x, x, reduction="sum")
    assert empty_sum == 0 and np.signbit(empty_sum)
    assert R.binary_cross_entropy(x, x, reduction="sum") == 0
    assert np.isnan(R.binary_cross_entropy_with_logits(x, x))


def test_zero_classes_matches_torch():
    """C = 0: ε/C is inf, so torch gives NaN where smoothing meets an empty class sum."""
    x = np.zeros((2, 0))
    ignored = np.array([-100, -100])
    for options in ({}, {"label_smoothing": 0.2}):
        out = F.cross_entropy(to_torch(x), to_torch(ignored), reduction="none", **options)
        assert_close(R.cross_entropy(x, ignored, reduction="none", **options), out)
    for ls in (0.0, 0.2):
        out = F.cross_entropy(to_torch(x), to_torch(x), label_smoothing=ls)
        assert_close(R.cross_entropy(x, x, label_smoothing=ls), out)
    with pytest.raises(IndexError, match="Target 0 is out of bounds"):
        R.cross_entropy(x, np.array([0, 0]))


def test_unbatched_and_one_element_targets():
    rng = np.random.default_rng(4)
    x = rng.normal(size=5)
    for target in (np.array(2), np.array([2]), np.array(-100), np.array([-100])):
        for fn in ("nll_loss", "cross_entropy"):
            for reduction in REDUCTIONS:
                out = getattr(F, fn)(to_torch(x), to_torch(target), reduction=reduction)
                loss = getattr(R, fn)(x, target, reduction=reduction)
                assert loss.shape == ()
                assert_close(loss, out)
    # torch 2.13 runs the (1,)-target forward but its backward, and its label-smoothing forward,
    # raise; the reference raises the same type rather than certify a result torch cannot give.
    xt = to_torch(x, requires_grad=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(F.cross_entropy(xt, torch.tensor([2])), xt)
    with pytest.raises(RuntimeError, match=r"\(1,\) target"):
        R.cross_entropy_grad(x, np.array([2]))
    with pytest.raises(RuntimeError, match=r"\(1,\) target"):
        R.nll_loss_grad(x, np.array([2]))
    with pytest.raises(RuntimeError):
        F.cross_entropy(to_torch(x), torch.tensor([2]), label_smoothing=0.1)
    with pytest.raises(RuntimeError, match=r"\(1,\) target"):
        R.cross_entropy(x, np.array([2]), label_smoothing=0.1)
    # The 0-d target is the supported form: gradients match torch, with smoothing too.
    for ls in (0.0, 0.3):
        out, (gx,) = torch_value_and_grads(
            "cross_entropy",
            {"input": x, "target": np.array(2)},
            1.7,
            ("input",),
            label_smoothing=ls,
        )
        assert_close(R.cross_entropy(x, np.array(2), label_smoothing=ls), out)
        assert_close(R.cross_entropy_grad(x, np.array(2), 1.7, label_smoothing=ls), gx)


def test_non_finite_logits_match_torch():
    ninf, inf, nan = -np.inf, np.inf, np.nan
    x = np.array(
        [
            [0.5, inf, 1.0],  # +inf anywhere: nan row
            [ninf, 0.3, 1.0],  # -inf on a non-target class: finite, zero gradient there
            [ninf, 0.3, 1.0],  # -inf on the target: inf loss
            [nan, 0.0, 0.0],  # NaN logits in an ignored row: loss 0, gradient NaN (as torch)
            [1e4, -1e4, 0.0],  # large finite logits
        ]
    )
    target = np.array([1, 2, 0, -100, 1])
    for ls in (0.0, 0.25):  # with smoothing, -inf anywhere gives inf
        for reduction in ("none", "sum"):
            g = np.ones(5) if reduction == "none" else 1.0
            out, (gx,) = torch_value_and_grads(
                "cross_entropy",
                {"input": x, "target": target},
                g,
                ("input",),
                reduction=reduction,
                label_smoothing=ls,
            )
            assert_close(R.cross_entropy(x, target, reduction=reduction, label_smoothing=ls), out)
            grad = R.cross_entropy_grad(x, target, g, reduction=reduction, label_smoothing=ls)
            assert_close(grad, gx)
    loss = R.cross_entropy(x, target, reduction="none")
    assert np.isnan(loss[0]) and np.isfinite(loss[1]) and loss[2] == inf and loss[3] == 0
    assert loss[4] == 2e4


def test_label_smoothing_extremes():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3))
    target = np.array([0, 2, 1, 1])
    # Negative ε is silently treated as 0 (torch issue #134767): bitwise the same result.
    assert R.cross_entropy(x, target, label_smoothing=-0.5) == R.cross_entropy(x, target)
    assert R.cross_entropy(x, x, label_smoothing=-0.5) == R.cross_entropy(x, x)
    # ε = 1 is cross entropy against the uniform distribution.
    uniform = np.full((4, 3), 1 / 3)
    assert_close(R.cross_entropy(x, target, label_smoothing=1.0), R.cross_entropy(x, uniform))


# ----------------------------------------------------------------------------------------------
# Cross entropy, probability targets
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    layout=st.sampled_from(["unbatched", "2d", "3d", "4d", "5d"]),
    num_classes=st.integers(1, 5),
    reduction=st.sampled_from(REDUCTIONS),
    weighted=st.booleans(),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0, -0.3]),
    ignore_index=st.sampled_from([-100, -1]),
    normalised=st.booleans(),
)
def test_cross_entropy_probability_targets_match_torch(
    seed, layout, num_classes, reduction, weighted, label_smoothing, ignore_index, normalised
):
    rng = np.random.default_rng(seed)
    spatial = {"unbatched": 0, "2d": 0, "3d": 1, "4d": 2, "5d": 3}[layout]
    if layout == "unbatched":
        shape = (num_classes,)
    else:
        shape = (int(rng.integers(0, 4)), num_classes) + tuple(rng.integers(1, 4, spatial))
    x = rng.normal(size=shape) * 3
    class_dim = 0 if layout == "unbatched" else 1
    y = rng.random(shape)
    if normalised:
        y = y / np.maximum(y.sum(axis=class_dim, keepdims=True), 1e-3)
    else:
        y = y * 2 - 0.5  # not validated by torch: negative and unnormalised targets allowed
    options = {
        "weight": rng.uniform(0.1, 2.0, num_classes) if weighted else None,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
    }
    loss_shape = shape[:class_dim] + shape[class_dim + 1 :]
    g = random_grad_output(rng, reduction, loss_shape)
    out, (gx, gy) = torch_value_and_grads(
        "cross_entropy", {"input": x, "target": y}, g, ("input", "target"), **options
    )
    assert_close(R.cross_entropy(x, y, **options), out)
    assert_close(R.cross_entropy_grad(x, y, g, **options), gx)
    assert_close(R.cross_entropy_target_grad(x, y, g, **options), gy)


def test_cross_entropy_target_grad_rejects_index_targets():
    with pytest.raises(ValueError, match="probability targets"):
        R.cross_entropy_target_grad(np.zeros((2, 3)), np.array([0, 1]))


# ----------------------------------------------------------------------------------------------
# Identities (independent of torch)
# ----------------------------------------------------------------------------------------------


def test_index_targets_equal_one_hot_probability_targets():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 4, 3))
    target = rng.integers(0, 4, (5, 3))
    one_hot = np.moveaxis(np.eye(4)[target], -1, 1)  # (5, 4, 3)
    weight = rng.uniform(0.5, 2.0, 4)
    for reduction in REDUCTIONS:
        assert_close(
            R.cross_entropy(x, target, reduction=reduction),
            R.cross_entropy(x, one_hot, reduction=reduction),
        )
        assert_close(
            R.cross_entropy_grad(x, target, 1.0, reduction=reduction),
            R.cross_entropy_grad(x, one_hot, 1.0, reduction=reduction),
        )
        # Smoothing an index target is the smoothed one-hot probability target (no weight).
        smoothed = one_hot * 0.8 + 0.2 / 4
        assert_close(
            R.cross_entropy(x, target, reduction=reduction, label_smoothing=0.2),
            R.cross_entropy(x, smoothed, reduction=reduction),
        )
    # With class weights, 'sum' agrees but 'mean' does not (Σw_t vs N: torch issue #61309).
    assert_close(
        R.cross_entropy(x, target, weight, reduction="sum"),
        R.cross_entropy(x, one_hot, weight, reduction="sum"),
    )
    index_mean = R.cross_entropy(x, target, weight)
    prob_mean = R.cross_entropy(x, one_hot, weight)
    assert_close(index_mean * np.sum(weight[target]) / target.size, prob_mean)


def test_cross_entropy_is_nll_of_log_softmax():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(4, 5, 2))
    target = rng.integers(0, 5, (4, 2))
    weight = rng.uniform(0.5, 2.0, 5)
    log_probs = R.log_softmax(x, axis=1)
    for reduction in REDUCTIONS:
        assert_close(
            R.cross_entropy(x, target, weight, reduction=reduction),
            R.nll_loss(log_probs, target, weight, reduction=reduction),
        )


def test_bce_with_logits_equals_bce_of_sigmoid():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 4)) * 3
    y = rng.random((3, 4))
    assert_close(
        R.binary_cross_entropy_with_logits(x, y),
        R.binary_cross_entropy(R.sigmoid(x), y),
        rtol=1e-10,
    )
    ones = np.ones(4)
    assert_close(
        R.binary_cross_entropy_with_logits(x, y, pos_weight=ones),
        R.binary_cross_entropy_with_logits(x, y),
    )


def _central_difference(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[i] = h
        grad[i] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def test_analytic_gradients_match_finite_differences():
    """The gradients are derivatives of the forwards, checked without torch."""
    rng = np.random.default_rng(9)
    x = rng.uniform(0.1, 0.9, (3, 4))
    y = rng.uniform(0.1, 0.9, (3, 4))
    w = rng.uniform(0.5, 2.0, 4)
    pw = rng.uniform(0.5, 2.0, 4)
    logits = rng.normal(size=(3, 4, 2))
    target = np.array([[0, 3], [2, -100], [1, 1]])
    probs_target = rng.random((3, 4, 2))
    checks = [
        (lambda a: R.binary_cross_entropy(a, y, w), R.binary_cross_entropy_grad(x, y, 1.0, w), x),
        (
            lambda b: R.binary_cross_entropy(x, b, w),
            R.binary_cross_entropy_target_grad(x, y, 1.0, w),
            y,
        ),
        (
            lambda a: R.binary_cross_entropy_with_logits(a, y, w, pos_weight=pw),
            R.binary_cross_entropy_with_logits_grad(x, y, 1.0, w, pos_weight=pw),
            x,
        ),
        (
            lambda b: R.binary_cross_entropy_with_logits(x, b, w, pos_weight=pw),
            R.binary_cross_entropy_with_logits_target_grad(x, y, 1.0, w, pos_weight=pw),
            y,
        ),
        (
            lambda a: R.cross_entropy(a, target, w, label_smoothing=0.1),
            R.cross_entropy_grad(logits, target, 1.0, w, label_smoothing=0.1),
            logits,
        ),
        (lambda a: R.nll_loss(a, target, w), R.nll_loss_grad(logits, target, 1.0, w), logits),
        (
            lambda a: R.cross_entropy(a, probs_target, w, label_smoothing=0.1),
            R.cross_entropy_grad(logits, probs_target, 1.0, w, label_smoothing=0.1),
            logits,
        ),
        (
            lambda b: R.cross_entropy(logits, b, w, label_smoothing=0.1),
            R.cross_entropy_target_grad(logits, probs_target, 1.0, w, label_smoothing=0.1),
            probs_target,
        ),
    ]
    for f, analytic, at in checks:
        assert_close(analytic, _central_difference(f, at), rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------
# Helpers, dtypes, purity
# ----------------------------------------------------------------------------------------------


def test_stable_helpers_match_torch():
    x = np.array(
        [
            -1e4,
            -800.0,
            -40.0,
            -1.0,
            -1e-8,
            0.0,
            1e-8,
            1.0,
            40.0,
            800.0,
            1e4,
            np.inf,
            -np.inf,
            np.nan,
        ]
    )
    xt = torch.tensor(x)
    assert_close(R.sigmoid(x), torch.sigmoid(xt), atol=0)
    assert_close(R.log_sigmoid(x), F.logsigmoid(xt), atol=0)
    rows = np.array(
        [
            [1e4, 1e4 - 1, -1e4],
            [0.0, -np.inf, 1.0],
            [-np.inf, -np.inf, -np.inf],
            [np.inf, 0.0, 1.0],
            [np.nan, 0.0, 1.0],
            [-800.0, -801.0, -900.0],
        ]
    )
    rt = torch.tensor(rows)
    assert_close(R.logsumexp(rows, axis=1), torch.logsumexp(rt, dim=1), atol=0)
    assert_close(R.log_softmax(rows, axis=1), torch.log_softmax(rt, dim=1))
    assert_close(R.softmax(rows, axis=1), torch.softmax(rt, dim=1))
    assert R.logsumexp(np.zeros((2, 0)), axis=1).tolist() == [-np.inf, -np.inf]


def test_float32_dtype_option():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 3))
    target = np.array([0, 1, 2, 1])
    for fn, args in [
        (R.cross_entropy, (x, target)),
        (R.nll_loss, (x, target)),
        (R.binary_cross_entropy_with_logits, (x, rng.random((4, 3)))),
        (R.binary_cross_entropy, (rng.random((4, 3)), rng.random((4, 3)))),
    ]:
        single = fn(*args, dtype=np.float32)
        assert single.dtype == np.float32
        assert_close(single, fn(*args), rtol=1e-5, atol=1e-6)
    assert R.cross_entropy_grad(x, target, dtype=np.float32).dtype == np.float32
    with pytest.raises(TypeError, match="floating dtype"):
        R.cross_entropy(x, target, dtype=np.int64)


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(11)
    arrays = {
        "x": rng.random((3, 4)),
        "y": rng.random((3, 4)),
        "w": rng.random(4),
        "t": np.array([0, 3, -100]),
    }
    before = {k: v.copy() for k, v in arrays.items()}
    x, y, w, t = arrays.values()
    for fn in (
        R.binary_cross_entropy,
        R.binary_cross_entropy_grad,
        R.binary_cross_entropy_target_grad,
        R.binary_cross_entropy_with_logits,
        R.binary_cross_entropy_with_logits_grad,
        R.binary_cross_entropy_with_logits_target_grad,
    ):
        fn(x, y, weight=w)
    for fn in (R.cross_entropy, R.cross_entropy_grad, R.nll_loss, R.nll_loss_grad):
        fn(x, t, weight=w, label_smoothing=0.1) if "cross" in fn.__name__ else fn(x, t, weight=w)
    R.cross_entropy_target_grad(x, y, weight=w, label_smoothing=0.1)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, before[k])


def test_grad_output_shapes():
    x = np.array([[0.3, 0.6]])
    y = np.array([[0.0, 1.0]])
    assert_close(
        R.binary_cross_entropy_grad(x, y, 2.0, reduction="none"),
        R.binary_cross_entropy_grad(x, y, np.full((1, 2), 2.0), reduction="none"),
    )
    with pytest.raises(RuntimeError, match="grad_output"):
        R.binary_cross_entropy_grad(x, y, np.ones(3), reduction="none")
    with pytest.raises(RuntimeError, match="grad_output"):
        R.cross_entropy_grad(x, np.array([1]), np.ones(1), reduction="mean")


def test_legacy_reduction_name_warns():
    with pytest.warns(UserWarning, match="elementwise_mean"):
        loss = R.cross_entropy([[1.0, 2.0]], [0], reduction="elementwise_mean")
    assert loss == R.cross_entropy([[1.0, 2.0]], [0])


# ----------------------------------------------------------------------------------------------
# Bad input: the same exception type as torch, with a message naming the problem
# ----------------------------------------------------------------------------------------------

_x34 = np.full((3, 4), 0.5)
_x35 = np.zeros((3, 5))
_t3 = np.array([1, 2, 3])
ERROR_CASES = [
    # (function, args, kwargs, regex the reference's message must match)
    ("binary_cross_entropy", (_x34, np.full((3, 1), 0.5)), {}, r"target shape \(3, 1\)"),
    ("binary_cross_entropy", (_x34 + 1, _x34), {}, "input should be between 0 and 1"),
    ("binary_cross_entropy", (_x34 * np.nan, _x34), {}, "input should be between 0 and 1"),
    ("binary_cross_entropy", (_x34, _x34 + 1), {}, "target should be between 0 and 1"),
    ("binary_cross_entropy", (_x34, _x34), {"weight": np.ones(3)}, r"weight of shape \(3,\)"),
    ("binary_cross_entropy", (_x34, _x34), {"weight": np.ones((2, 3, 4))}, r"\(2, 3, 4\)"),
    ("binary_cross_entropy", (_x34, _x34), {"reduction": "avg"}, "avg is not a valid"),
    ("binary_cross_entropy_with_logits", (_x34, np.full((3, 1), 0.5)), {}, "target shape"),
    ("binary_cross_entropy_with_logits", (_x34, _x34), {"pos_weight": np.ones(3)}, "pos_weight"),
    (
        "binary_cross_entropy_with_logits",
        (_x34, _x34),
        {"pos_weight": np.ones((2, 3, 4))},
        "pos_weight",
    ),
    ("binary_cross_entropy_with_logits", (_x34, _x34), {"weight": np.ones((1, 3, 4))}, "weight"),
    ("nll_loss", (np.array(1.0), np.array(0)), {}, "1 or more dimensions"),
    ("nll_loss", (_x35, np.array([1, 2])), {}, r"batch_size \(3\).*batch_size \(2\)"),
    ("nll_loss", (_x35, np.array(1)), {}, "batch_size"),
    ("nll_loss", (np.zeros(5), np.array([1, 2])), {}, "1D target must have size 1"),
    ("nll_loss", (np.zeros(5), np.array([[1]])), {}, "0D or 1D target"),
    ("nll_loss", (_x35, np.zeros((3, 4), dtype=np.int64)), {}, "multi-target"),
    (
        "nll_loss",
        (np.zeros((2, 5, 3)), np.zeros((2, 4), dtype=np.int64)),
        {},
        r"Expected target size \(2, 3\)",
    ),
    (
        "nll_loss",
        (np.zeros((2, 5, 3, 3)), np.zeros((2, 3, 4), dtype=np.int64)),
        {},
        "Expected target size",
    ),
    (
        "nll_loss",
        (np.zeros((2, 5, 3, 3)), np.zeros((2, 3), dtype=np.int64)),
        {},
        "Expected target size",
    ),
    ("nll_loss", (_x35, np.array([1.0, 2.0, 3.0])), {}, "Long or Byte.*float64"),
    ("nll_loss", (_x35, np.array([True, False, True])), {}, "Long or Byte.*bool"),
    ("nll_loss", (_x35, np.array([1, 5, 0])), {}, r"Target 5 is out of bounds.*< 5"),
    ("nll_loss", (_x35, np.array([1, -1, 0])), {}, "Target -1 is out of bounds"),
    ("nll_loss", (_x35, np.array([1, 255, 0])), {"ignore_index": -1}, "Target 255"),
    ("nll_loss", (_x35, _t3), {"weight": np.ones(4)}, r"all 5 classes.*shape: \[4\]"),
    ("nll_loss", (_x35, _t3), {"weight": np.ones((1, 5))}, r"shape: \[1, 5\]"),
    ("nll_loss", (_x35, _t3), {"ignore_index": None}, "ignore_index.*must be int"),
    ("nll_loss", (_x35, _t3), {"reduction": "avg"}, "avg is not a valid"),
    ("cross_entropy", (_x35, _t3), {"label_smoothing": 1.5}, "between 0.0 and 1.0. Got: 1.5"),
    ("cross_entropy", (_x35, _x35), {"label_smoothing": 1.5}, "between 0.0 and 1.0"),
    ("cross_entropy", (_x35, np.zeros((3, 5), dtype=np.int64)), {}, "class probabilities"),
    ("cross_entropy", (_x35, _x35), {"ignore_index": 0}, "ignore_index is not supported"),
    ("cross_entropy", (_x35, _x35), {"weight": np.ones(4)}, "cross_entropy: weight tensor"),
    ("cross_entropy", (np.array(1.0), np.array(1.0)), {}, "no class dimension"),
    ("cross_entropy", (np.array(1.0), np.array(0)), {}, "class probabilities"),
    ("cross_entropy", (_x35, np.zeros((3, 4))), {}, "multi-target"),
    ("cross_entropy", (_x35, np.zeros(3)), {}, "Long or Byte"),
    (
        "cross_entropy",
        (_x35, np.array([0, 7, 1])),
        {"weight": np.ones(5), "label_smoothing": 0.1},
        "Target 7 is out of bounds",
    ),
    ("cross_entropy", (_x35, _t3), {"ignore_index": 1.0}, "must be int"),
    ("cross_entropy", (np.zeros((2, 0)), np.array([0, 0])), {}, "Target 0 is out of bounds"),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "message"), ERROR_CASES)
def test_errors_have_torch_exception_types(name, args, kwargs, message):
    with pytest.raises(Exception) as from_torch:
        getattr(F, name)(*map(to_torch, args), **{k: to_torch(v) for k, v in kwargs.items()})
    with pytest.raises(type(from_torch.value), match=message):
        getattr(R, name)(*args, **kwargs)
    grad = getattr(R, f"{name}_grad")  # the gradients validate in the same way
    with pytest.raises(type(from_torch.value), match=message):
        grad(args[0], args[1], 1.0, **kwargs)
