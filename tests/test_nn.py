"""crossent.nn modules: torch's constructors, buffers and state dicts; crossent's forward."""

from __future__ import annotations

import warnings

import pytest
import torch

import crossent
import crossent.nn as CN

PAIRS = [
    (CN.BCELoss, torch.nn.BCELoss, dict(weight=torch.rand(4))),
    (CN.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss, dict(weight=torch.rand(4), pos_weight=torch.rand(4))),
    (CN.CrossEntropyLoss, torch.nn.CrossEntropyLoss, dict(weight=torch.rand(4), ignore_index=1, label_smoothing=0.1)),
    (CN.NLLLoss, torch.nn.NLLLoss, dict(weight=torch.rand(4), ignore_index=2)),
]  # fmt: skip


def _inputs(cls):
    g = torch.Generator().manual_seed(0)
    if cls in (CN.BCELoss,):
        return torch.rand(5, 4, generator=g), torch.rand(5, 4, generator=g)
    if cls is CN.BCEWithLogitsLoss:
        return torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g)
    return torch.randn(5, 4, generator=g).log_softmax(1), torch.tensor([0, 1, 2, 3, 1])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_module_matches_torch(ours_cls, torch_cls, kwargs, reduction):
    ours, theirs = ours_cls(reduction=reduction, **kwargs), torch_cls(reduction=reduction, **kwargs)
    assert isinstance(ours, torch_cls)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k])
    x, y = _inputs(ours_cls)
    torch.testing.assert_close(ours(x, y), theirs(x, y))


@pytest.mark.parametrize("ours_cls,torch_cls,kwargs", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_weights_are_buffers_that_follow_to_and_load_state_dict(ours_cls, torch_cls, kwargs):
    module = ours_cls(**kwargs)
    names = {n for n, _ in module.named_buffers()}
    assert "weight" in names
    if ours_cls is CN.BCEWithLogitsLoss:
        assert "pos_weight" in names
    assert list(module.parameters()) == []
    module64 = module.to(torch.float64)
    assert module64.weight.dtype == torch.float64
    fresh = ours_cls(
        **{
            k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v)
            for k, v in kwargs.items()
        }
    )
    fresh.load_state_dict(torch_cls(**kwargs).state_dict())
    assert torch.equal(fresh.weight, kwargs["weight"])
    # The module's forward goes through crossent, not torch.
    x, y = _inputs(ours_cls)
    x = x.double()
    y = y.double() if y.is_floating_point() else y
    torch.testing.assert_close(module64(x, y), torch_cls(**kwargs).double()(x, y))


def test_module_forward_is_crossent():
    """Errors come from crossent's validation layer (its clearer message), proving dispatch."""
    with pytest.raises(IndexError, match="the input has 1 class"):
        CN.CrossEntropyLoss()(torch.randn(3, 1), torch.tensor([1, 1, 0]))


def test_legacy_constructor_arguments():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = CN.NLLLoss(size_average=False)
        theirs = torch.nn.NLLLoss(size_average=False)
    assert ours.reduction == theirs.reduction == "sum"
    x, t = torch.randn(3, 4).log_softmax(1), torch.tensor([0, 1, 3])
    torch.testing.assert_close(ours(x, t), theirs(x, t))


def test_negative_label_smoothing_accepted_at_construction_like_torch():
    module = CN.CrossEntropyLoss(label_smoothing=-0.5)
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 3])
    torch.testing.assert_close(module(x, t), torch.nn.CrossEntropyLoss()(x, t))


def test_exports():
    assert CN.LinearCrossEntropyLoss is crossent.nn.LinearCrossEntropyLoss
    assert callable(crossent.linear_cross_entropy)
    assert crossent.functional.linear_cross_entropy is crossent.linear_cross_entropy
