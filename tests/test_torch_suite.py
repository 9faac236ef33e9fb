"""PyTorch's own test inputs as a conformance suite.

Every OpInfo sample (``torch.testing._internal.common_methods_invocations``) and ModuleInfo input
(``common_modules``, including its error inputs) of the four losses goes through crossent and
through torch; values, dtypes, shapes, gradients and exception types must agree.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("expecttest")  # torch.testing._internal needs it

from _helpers import blocked_path  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import crossent.functional as C  # noqa: E402
import crossent.nn as CN  # noqa: E402

OPS = {
    "nn.functional.binary_cross_entropy": C.binary_cross_entropy,
    "nn.functional.binary_cross_entropy_with_logits": C.binary_cross_entropy_with_logits,
    "nn.functional.cross_entropy": C.cross_entropy,
    "nn.functional.nll_loss": C.nll_loss,
}
MODULES = {
    "BCELoss": CN.BCELoss,
    "BCEWithLogitsLoss": CN.BCEWithLogitsLoss,
    "CrossEntropyLoss": CN.CrossEntropyLoss,
    "NLLLoss": CN.NLLLoss,
}
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


def _op_infos():
    return [op for op in op_db if op.name in OPS and op.variant_test_name == ""]


def _grads(out, inputs):
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not diff or not out.requires_grad:
        return []
    upstream = (
        torch.ones_like(out)
        if out.dim() == 0
        else torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    )
    return torch.autograd.grad(out, diff, upstream, allow_unused=True)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _compare(ours, theirs, ours_in, theirs_in, dtype):
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, equal_nan=True, **TOL[dtype])
    for a, b in zip(_grads(ours, ours_in), _grads(theirs, theirs_in), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("op", _op_infos(), ids=lambda op: op.name)
def test_opinfo_samples(op, dtype):
    ours_fn = OPS[op.name]
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=dtype.is_floating_point))
    assert samples
    for sample in samples:
        theirs_in = [sample.input, *sample.args]
        ours_in = _clone(theirs_in)
        kwargs = sample.kwargs
        theirs = op.op(*theirs_in, **kwargs)
        ours = ours_fn(*ours_in, **_clone(kwargs))
        _compare(
            ours,
            theirs,
            [*ours_in, *_clone_kw_tensors(kwargs)],
            [*theirs_in, *_kw_tensors(kwargs)],
            dtype,
        )


def _kw_tensors(kwargs):
    return [v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def _clone_kw_tensors(kwargs):
    # Keyword tensors (weights) are not differentiable in these losses except probability-target
    # cross entropy's weight; the samples keep them requires_grad=False.
    return []


def _module_infos():
    return [m for m in module_db if m.module_cls.__name__ in MODULES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("info", _module_infos(), ids=lambda m: m.module_cls.__name__)
def test_moduleinfo_inputs(info, dtype):
    ours_cls = MODULES[info.module_cls.__name__]
    inputs = info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=True
    )
    assert inputs
    for mi in inputs:
        args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs_mod = info.module_cls(*args, **kwargs)
            ours_mod = ours_cls(*_clone(args), **_clone(kwargs))
        assert ours_mod.state_dict().keys() == theirs_mod.state_dict().keys()
        theirs_in = list(mi.forward_input.args)
        ours_in = _clone(theirs_in)
        theirs = theirs_mod(*theirs_in, **mi.forward_input.kwargs)
        ours = ours_mod(*ours_in, **_clone(mi.forward_input.kwargs))
        _compare(ours, theirs, ours_in, theirs_in, dtype)
        if mi.reference_fn is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                expected = mi.reference_fn(ours_mod, *_clone(theirs_in))
            torch.testing.assert_close(
                ours.detach(),
                torch.as_tensor(expected).to(ours.dtype),
                equal_nan=True,
                **TOL[dtype],
            )


@pytest.mark.parametrize(
    "info",
    [m for m in _module_infos() if m.module_error_inputs_func],
    ids=lambda m: m.module_cls.__name__,
)
def test_moduleinfo_error_inputs(info):
    ours_cls = MODULES[info.module_cls.__name__]
    errors = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
    )
    assert errors
    for err in errors:
        mi = err.module_error_input
        ctor = mi.constructor_input
        module = ours_cls(*ctor.args, **ctor.kwargs)
        with pytest.raises(err.error_type) as raised:
            module(*mi.forward_input.args, **mi.forward_input.kwargs)
        assert re.search(err.error_regex, str(raised.value)), (err.error_regex, str(raised.value))


@pytest.mark.parametrize("blocked", [False, True], ids=["default", "blocked"])
@pytest.mark.parametrize(
    "op",
    [op for op in _op_infos() if op.name == "nn.functional.cross_entropy"],
    ids=lambda op: op.name,
)
def test_opinfo_gradcheck_with_batched_grad(op, blocked):
    """torch's test_fn_grad: finite differences on every float64 sample, batched gradients
    included (gradcheck's check_batched_grad, as in torch's own suites); crossent's blocked
    cross-entropy path forced too, whatever the size."""
    ours_fn = OPS[op.name]
    with blocked_path(blocked):
        for sample in op.sample_inputs("cpu", torch.float64, requires_grad=True):
            inputs = [sample.input, *sample.args]
            diff = [
                i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad
            ]

            def fn(*d, inputs=inputs, diff=diff, kwargs=sample.kwargs):
                full = list(inputs)
                for i, t in zip(diff, d, strict=True):
                    full[i] = t
                return ours_fn(*full, **kwargs)

            args = tuple(inputs[i] for i in diff)
            assert torch.autograd.gradcheck(fn, args, check_batched_grad=True), sample
