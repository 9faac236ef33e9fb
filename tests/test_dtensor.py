"""DTensor arguments of the drop-in losses, in a gloo group of 2 CPU processes, float64.

One pool of 2 rank processes lives for the whole module; the parent sends a list of cases to
both ranks, each rank builds the same full tensors from the case's seed, lays them out as
DTensors, runs crossent (and torch's own function on the same DTensor call, to record what
torch does) and the single-process torch oracle on the full tensors, and sends back plain lists:
values, gradients (``full_tensor()``) and placements. Collectives time out after 20 s and the
parent waits at most 60 s per batch, so a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _dist_helpers import RankPool

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORLD = 2
COLLECTIVE_TIMEOUT_S = 20
BATCH_TIMEOUT_S = 60
TOL = dict(rtol=1e-10, atol=1e-10)
REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------
# What every rank runs (in a spawned process)
# --------------------------------------------------------------------------------------------


def _placements(t) -> str:
    from torch.distributed.tensor import DTensor

    return str(tuple(t.placements)) if isinstance(t, DTensor) else "plain"


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _backward(loss, upstream) -> None:
    """Backward of ``sum(loss * upstream)`` (1.7 for a scalar) through ``full_tensor()``."""
    full = _full(loss)
    (full * (1.7 if full.dim() == 0 else upstream)).sum().backward()


def _problem(case: dict) -> dict:
    gen = torch.Generator().manual_seed(case.get("seed", 0))
    shape, classes = tuple(case["shape"]), case["classes"]
    class_dim = 1 if len(shape) >= 2 else 0
    p = {"input": torch.randn(*shape, generator=gen, dtype=torch.float64) * 2}
    rows = shape[:class_dim] + shape[class_dim + 1 :]
    if case["fn"] in ("cross_entropy", "nll_loss") and not case.get("probs"):
        target = torch.randint(classes, rows, generator=gen)
        ignored = torch.rand(rows, generator=gen) < case.get("ignore_frac", 0.0)
        p["target"] = torch.where(ignored, -100, target)
        p["upstream"] = torch.randn(rows, generator=gen, dtype=torch.float64)
    elif case.get("probs"):
        p["target"] = torch.rand(*shape, generator=gen, dtype=torch.float64).softmax(class_dim)
        p["upstream"] = torch.randn(rows, generator=gen, dtype=torch.float64)
    else:
        p["target"] = torch.rand(*shape, generator=gen, dtype=torch.float64)
        p["upstream"] = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case["fn"] == "nll_loss":
        p["input"] = p["input"].log_softmax(class_dim)
    if case["fn"] == "binary_cross_entropy":
        p["input"] = p["input"].sigmoid()
    weight = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.25
    p["weight"] = weight if case.get("weighted") else None
    return p


def _layout(case: dict, p: dict, mesh) -> tuple[dict, dict]:
    """The DTensor call's arguments: (tensors, options)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    layout = case["layout"]
    class_dim = 1 if len(case["shape"]) >= 2 else 0
    elementwise = case["fn"].startswith("binary") or case.get("probs")
    if layout == "class":
        x_pl, t_pl = [Shard(class_dim)], [Replicate()]
    elif layout == "batch":
        x_pl = t_pl = [Shard(0)]
    else:
        x_pl = t_pl = [Replicate()]
    if elementwise and layout == "class":
        t_pl = x_pl
    x = distribute_tensor(p["input"], mesh, x_pl).requires_grad_()
    target = distribute_tensor(p["target"], mesh, t_pl)
    if case.get("plain_target"):
        target = p["target"]
    weight = p["weight"]
    if weight is not None and not case.get("plain_weight"):
        weight = distribute_tensor(weight, mesh, [Replicate()])
    opts = {"reduction": case.get("reduction", "mean")}
    if case["fn"] in ("cross_entropy", "nll_loss"):
        opts["weight"] = weight
    if case["fn"] == "cross_entropy":
        opts["label_smoothing"] = case.get("label_smoothing", 0.0)
    return {"input": x, "target": target}, opts


def _run_loss(rank: int, mesh, case: dict) -> dict:
    import contextlib

    from torch.distributed.tensor.parallel import loss_parallel

    import crossent
    import crossent.nn as cnn

    p = _problem(case)
    context = loss_parallel if case.get("loss_parallel") else contextlib.nullcontext
    tensors, opts = _layout(case, p, mesh)
    with context():
        if case.get("module"):  # crossent.nn follows the functional API
            module = {"cross_entropy": cnn.CrossEntropyLoss, "nll_loss": cnn.NLLLoss}[case["fn"]]
            loss = module(**opts)(tensors["input"], tensors["target"])
        else:
            loss = getattr(crossent, case["fn"])(tensors["input"], tensors["target"], **opts)
        _backward(loss, p["upstream"])
    grad = tensors["input"].grad
    out = {
        "placements": _placements(loss),
        "loss": _full(loss).tolist(),
        "grad_placements": _placements(grad),
        "input_placements": _placements(tensors["input"]),
        "grad": grad.full_tensor().tolist(),
    }
    full = p["input"].clone().requires_grad_()
    ref_opts = {k: (_full(v) if k == "weight" and v is not None else v) for k, v in opts.items()}
    ref = getattr(F, case["fn"])(full, p["target"], **ref_opts)
    _backward(ref, p["upstream"])
    out["ref_loss"], out["ref_grad"] = ref.tolist(), full.grad.tolist()
    if case.get("torch"):  # torch's own function on the same DTensor call
        out["torch"] = _torch_on_dtensors(case, p, mesh, context, ref, full.grad)
    return out


def _torch_on_dtensors(case, p, mesh, context, ref, ref_grad) -> dict:
    from torch.distributed.tensor.parallel import loss_parallel

    tensors, opts = _layout(case, p, mesh)
    try:
        with context():
            theirs = getattr(F, case["fn"])(tensors["input"], tensors["target"], **opts)
            _backward(theirs, p["upstream"])
    except Exception as exc:  # noqa: BLE001 - recorded, compared by the parent
        with loss_parallel():  # see _rank_main
            pass
        return {"raised": type(exc).__name__, "message": str(exc)[:200]}
    close = torch.allclose(_full(theirs).detach(), ref.detach(), equal_nan=True, **TOL)
    grad = tensors["input"].grad.full_tensor()
    grad_close = torch.allclose(grad, ref_grad, equal_nan=True, **TOL)
    return {
        "raised": None,
        "placements": _placements(theirs),
        "close": close,
        "grad_close": grad_close,
    }


def _run_linear(rank: int, mesh, case: dict) -> dict:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import crossent

    gen = torch.Generator().manual_seed(case.get("seed", 0))
    n, d, v = case["tokens"], case["hidden"], case["vocab"]
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    b = torch.randn(v, generator=gen, dtype=torch.float64)
    t = torch.randint(v, (n,), generator=gen)
    t = torch.where(torch.rand(n, generator=gen) < case.get("ignore_frac", 0.0), -100, t)
    cw = torch.rand(v, generator=gen, dtype=torch.float64) + 0.25 if case.get("weighted") else None
    upstream = torch.randn(n, generator=gen, dtype=torch.float64)
    if case.get("rank_local_input"):
        h = h + rank
    w_pl = [Replicate()] if case.get("replicated") else [Shard(0)]
    dw = distribute_tensor(w, mesh, w_pl).requires_grad_()
    db = distribute_tensor(b, mesh, w_pl).requires_grad_() if case.get("bias") else None
    dh = h.clone().requires_grad_()
    if case.get("dtensor_input"):
        dh = distribute_tensor(h, mesh, [Replicate()]).requires_grad_()
    dt = t
    if case.get("batch_input"):  # tokens sharded, classifier replicated
        dh = distribute_tensor(h, mesh, [Shard(0)]).requires_grad_()
        dt = distribute_tensor(t, mesh, [Shard(0)])
    opts = dict(
        weight=cw,
        reduction=case.get("reduction", "mean"),
        label_smoothing=case.get("label_smoothing", 0.0),
    )
    try:
        loss = crossent.linear_cross_entropy(dh, dw, dt, linear_bias=db, z_loss=0.0, **opts)
    except ValueError as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    _backward(loss, upstream)
    out = {
        "raised": None,
        "placements": _placements(loss),
        "loss": _full(loss).tolist(),
        "grad_weight_placements": _placements(dw.grad),
        "grad_weight": dw.grad.full_tensor().tolist(),
        "grad_input_placements": _placements(dh.grad),
        "grad_input": _full(dh.grad).tolist(),
    }
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    br = b.clone().requires_grad_() if db is not None else None
    ref = F.cross_entropy(F.linear(hr, wr, br), t, **opts)
    _backward(ref, upstream)
    out.update(ref_loss=ref.tolist(), ref_grad_weight=wr.grad.tolist())
    out["ref_grad_input"] = hr.grad.tolist()
    if db is not None:
        out["grad_bias_placements"] = _placements(db.grad)
        out["grad_bias"], out["ref_grad_bias"] = db.grad.full_tensor().tolist(), br.grad.tolist()
    return out


def _run_fsdp(rank: int, mesh, case: dict) -> dict:
    """A ``fully_shard``-ed lm_head's weight used outside the module's forward."""
    from torch.distributed.fsdp import fully_shard

    import crossent

    gen = torch.Generator().manual_seed(3)
    n, d, v = 6, 4, case["vocab"]
    torch.manual_seed(0)
    head = torch.nn.Linear(d, v, bias=False, dtype=torch.float64)
    reference = torch.nn.Linear(d, v, bias=False, dtype=torch.float64)
    reference.load_state_dict(head.state_dict())
    fully_shard(head, mesh=mesh)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    t = torch.randint(v, (n,), generator=gen)
    if case.get("rank_local_input"):
        h = h + rank
    try:
        loss = crossent.linear_cross_entropy(h, head.weight, t, label_smoothing=0.1)
    except ValueError as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    loss.backward()
    grad = head.weight.grad
    torch.optim.SGD(head.parameters(), lr=0.5).step()
    ref = F.cross_entropy(reference(h), t, label_smoothing=0.1)
    ref.backward()
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    return {
        "raised": None,
        "loss": _full(loss).tolist(),
        "ref_loss": ref.tolist(),
        "grad_placements": _placements(grad),
        "param_placements": _placements(head.weight),
        "grad": grad.full_tensor().tolist(),
        "ref_grad": reference.weight.grad.tolist(),
        "stepped": head.weight.full_tensor().tolist(),
        "ref_stepped": reference.weight.tolist(),
    }


_RUNNERS = {"loss": _run_loss, "linear": _run_linear, "fsdp": _run_fsdp}


_MESH = []  # this rank's 1-D device mesh, made on its first batch


def _run_batch(rank: int, world: int, batch: dict) -> list[tuple[str, object]]:
    """One batch of cases on this rank: per case ``("ok", result)`` or ``("error", text)``."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    if not _MESH:
        warnings.filterwarnings("ignore")
        _MESH.append(init_device_mesh("cpu", (world,)))
    results = []
    for case in batch["cases"]:
        try:
            results.append(("ok", _RUNNERS[case["kind"]](rank, _MESH[0], case)))
        except Exception as exc:  # noqa: BLE001 - the parent reports it
            results.append(("error", f"{type(exc).__name__}: {exc}"))
        # torch's loss_parallel() leaves its loss handlers installed when its body
        # raises; a clean pass through the context removes them.
        with loss_parallel():
            pass
    return results


# --------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------


class _Batches:
    """The module's rank pool, sending lists of cases: per case, the per-rank results."""

    def __init__(self) -> None:
        self.ranks = RankPool(
            WORLD, _run_batch,
            collective_timeout_s=COLLECTIVE_TIMEOUT_S, case_timeout_s=BATCH_TIMEOUT_S,
        )  # fmt: skip

    def run(self, cases: list[dict]) -> list[list[dict]]:
        answers = self.ranks.run({"cases": cases})
        out = []
        for i, case in enumerate(cases):
            per_rank = []
            for rank in range(WORLD):
                status, payload = answers[rank][i]
                if status != "ok":
                    pytest.fail(f"rank {rank} failed on {case}: {payload}")
                per_rank.append(payload)
            out.append(per_rank)
        return out


@pytest.fixture(scope="module")
def pool():
    made = _Batches()
    yield made
    made.ranks.close()


def _close(actual, expected, what: str, case: dict) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        equal_nan=True,
        msg=lambda m: f"{what}, case {case}:\n{m}",
        **TOL,
    )


def _check_loss(results: list[dict], case: dict, placements: str) -> None:
    for res in results:
        assert res["placements"] == placements, case
        assert res["grad_placements"] == res["input_placements"], case
        _close(res["loss"], res["ref_loss"], "loss", case)
        _close(res["grad"], res["ref_grad"], "grad", case)


def _expected(layout: str, reduction: str) -> str:
    if layout == "batch":
        return "(Shard(dim=0),)" if reduction == "none" else "(Partial(sum),)"
    return "(Replicate(),)"


OPTIONS = {
    "plain": {},
    "weight": {"weighted": True},
    "ignore": {"ignore_frac": 0.4},
    "all_ignored": {"ignore_frac": 1.0},
    "smoothing": {"label_smoothing": 0.15},
    "everything": {"weighted": True, "ignore_frac": 0.4, "label_smoothing": 0.15},
}


# --------------------------------------------------------------------------------------------
# Class-sharded logits: the vocab-parallel path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_parallel", [True, False], ids=["loss_parallel", "plain_context"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_class_sharded(pool, loss_parallel, reduction):
    cases = [
        {
            "kind": "loss",
            "fn": "cross_entropy",
            "layout": "class",
            "shape": shape,
            "classes": shape[1 if len(shape) > 1 else 0],
            "reduction": reduction,
            "loss_parallel": loss_parallel,
            "seed": seed,
            **opts,
        }  # fmt: skip
        for seed, (name, opts) in enumerate(OPTIONS.items())
        for shape in ([6, 5], [2, 5, 3], [5])
        if not (name == "all_ignored" and len(shape) == 1)
    ]
    cases.append({**cases[1], "plain_weight": True})
    for case, results in zip(cases, pool.run(cases), strict=True):
        _check_loss(results, case, "(Replicate(),)")


def test_torch_loss_parallel_failures_are_exact_here(pool):
    """Where torch's own ``loss_parallel`` fails, crossent gives torch's single-process value."""
    base = {"kind": "loss", "fn": "cross_entropy", "layout": "class", "shape": [6, 5]}
    cases = [
        {**base, "classes": 5, "loss_parallel": True, "torch": True, "label_smoothing": 0.1},
        {
            **base,
            "classes": 5,
            "loss_parallel": True,
            "torch": True,
            "weighted": True,
            "ignore_frac": 0.4,
            "seed": 1,
        },  # fmt: skip
        {**base, "classes": 5, "loss_parallel": True, "torch": True, "weighted": True},
        {
            **base,
            "classes": 5,
            "loss_parallel": False,
            "torch": True,
            "weighted": True,
            "ignore_frac": 0.4,
            "label_smoothing": 0.1,
            "seed": 2,
        },  # fmt: skip
    ]
    results = pool.run(cases)
    for case, per_rank in zip(cases, results, strict=True):
        _check_loss(per_rank, case, "(Replicate(),)")
    smoothing, weight_ignore, weight_only, no_context = (r[0]["torch"] for r in results)
    # torch 2.13 raises in the first two; a later torch that fixes them must be exact.
    for theirs in (smoothing, weight_ignore):
        assert theirs["raised"] is not None or theirs["close"], theirs
    exact = {"raised": None, "placements": "(Replicate(),)", "close": True, "grad_close": True}
    assert weight_only == no_context == exact


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_class_sharded(pool, reduction):
    cases = [
        {
            "kind": "loss",
            "fn": "nll_loss",
            "layout": "class",
            "shape": shape,
            "seed": seed,
            "classes": shape[1 if len(shape) > 1 else 0],
            "reduction": reduction,
            "loss_parallel": lp,
            **opts,
        }  # fmt: skip
        for seed, (name, opts) in enumerate(OPTIONS.items())
        if name != "smoothing" and name != "everything"
        for shape in ([6, 5], [2, 3, 4], [3])
        for lp in (True, False)
        if not (name == "all_ignored" and len(shape) == 1)
    ]
    for case, results in zip(cases, pool.run(cases), strict=True):
        _check_loss(results, case, "(Replicate(),)")


def test_nn_modules_and_torch_nll_under_loss_parallel(pool):
    """``crossent.nn`` modules take the same routes; torch's ``nll_loss`` on class-sharded
    log-probabilities under ``loss_parallel()`` gets the gradient wrong in 2.13 (recorded)."""
    base = {"kind": "loss", "layout": "class", "shape": [6, 5], "classes": 5}
    cases = [
        {
            **base,
            "fn": "cross_entropy",
            "module": True,
            "weighted": True,
            "ignore_frac": 0.3,
            "label_smoothing": 0.1,
            "loss_parallel": True,
        },  # fmt: skip
        {**base, "fn": "nll_loss", "module": True, "weighted": True, "reduction": "sum"},
        {**base, "fn": "nll_loss", "loss_parallel": True, "torch": True, "seed": 3},
    ]
    results = pool.run(cases)
    for case, per_rank in zip(cases, results, strict=True):
        _check_loss(per_rank, case, "(Replicate(),)")
    theirs = results[-1][0]["torch"]
    assert theirs["raised"] is None and theirs["close"], theirs  # the value is right


@pytest.mark.parametrize("loss_parallel", [True, False], ids=["loss_parallel", "plain_context"])
def test_probability_targets_on_class_sharded_logits(pool, loss_parallel):
    """Exact and replicated; torch returns ``Partial(sum)`` (its gradient under
    ``loss_parallel()`` is recorded, not required)."""
    base = {"kind": "loss", "fn": "cross_entropy", "layout": "class", "probs": True}
    cases = [
        {
            **base,
            "shape": shape,
            "classes": shape[1 if len(shape) > 1 else 0],
            "reduction": reduction,
            "loss_parallel": loss_parallel,
            "torch": True,
            "seed": seed,
            **opts,
        }  # fmt: skip
        for reduction in REDUCTIONS
        for seed, opts in enumerate(({}, {"weighted": True, "label_smoothing": 0.2}))
        for shape in ([6, 5], [2, 5, 3], [5])
    ]
    cases.append({**cases[1], "plain_target": True})
    for case, results in zip(cases, pool.run(cases), strict=True):
        _check_loss(results, case, "(Replicate(),)")
        theirs = results[0]["torch"]
        assert theirs["raised"] is not None or theirs["close"], theirs


# --------------------------------------------------------------------------------------------
# Replicated and batch-sharded arguments: the four losses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["replicate", "batch"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_four_losses_replicated_and_batch_sharded(pool, layout, reduction):
    common = {"kind": "loss", "layout": layout, "reduction": reduction}
    cases = []
    for fn in ("cross_entropy", "nll_loss"):
        for seed, opts in enumerate(OPTIONS.values()):
            if fn == "nll_loss" and "label_smoothing" in opts:
                continue
            for shape in ([5, 4], [3, 4, 2]):  # 5 rows over 2 ranks: uneven shards
                cases.append({**common, "fn": fn, "shape": shape, "classes": 4, "seed": seed,
                              **opts})  # fmt: skip
    cases.append({**common, "fn": "cross_entropy", "shape": [5, 4], "classes": 4, "probs": True,
                  "weighted": True, "label_smoothing": 0.1})  # fmt: skip
    for fn in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
        cases.append({**common, "fn": fn, "shape": [5, 3], "classes": 3})
    for case, results in zip(cases, pool.run(cases), strict=True):
        _check_loss(results, case, _expected(layout, reduction))


def test_batch_sharded_mean_is_exact_where_torch_averages_local_means(pool):
    """torch returns ``Partial(avg)`` of per-rank means: wrong for uneven shards or weights."""
    cases = [
        {
            "kind": "loss",
            "fn": "cross_entropy",
            "layout": "batch",
            "shape": [6, 4],
            "classes": 4,
            "weighted": True,
            "torch": True,
            "seed": 4,
        },  # fmt: skip
        {
            "kind": "loss",
            "fn": "binary_cross_entropy_with_logits",
            "layout": "batch",
            "shape": [5, 3],
            "classes": 3,
            "torch": True,
        },  # fmt: skip
    ]
    results = pool.run(cases)
    for case, per_rank in zip(cases, results, strict=True):
        _check_loss(per_rank, case, "(Partial(sum),)")
    for per_rank in results:
        theirs = per_rank[0]["torch"]
        # torch 2.13: raises for the uneven shards of the class-index losses, else returns
        # Partial(avg) of the local means (wrong here); a later torch may be exact
        assert theirs["raised"] or theirs["placements"] == "(Partial(avg),)" or theirs["close"]


def test_replicated_call_with_plain_target_works_where_torch_refuses(pool):
    case = {
        "kind": "loss", "fn": "cross_entropy", "layout": "replicate", "shape": [4, 3],
        "classes": 3, "plain_target": True, "weighted": True, "plain_weight": True,
        "torch": True,
    }  # fmt: skip
    (results,) = pool.run([case])
    _check_loss(results, case, "(Replicate(),)")
    theirs = results[0]["torch"]
    assert theirs["raised"] == "RuntimeError" or theirs["close"]  # 2.13: mixed Tensor, DTensor


# --------------------------------------------------------------------------------------------
# linear_cross_entropy with a vocabulary-sharded classifier
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [6, 7], ids=["even", "uneven"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_vocab_sharded(pool, vocab, reduction):
    base = {"kind": "linear", "tokens": 5, "hidden": 3, "vocab": vocab, "reduction": reduction}
    cases = [
        {**base, "bias": bias, "dtensor_input": dti, "seed": seed, **opts}
        for seed, opts in enumerate(OPTIONS.values())
        for bias in (False, True)
        for dti in (False, True)
    ]
    cases.append(
        {**base, "replicated": True, "bias": True, "dtensor_input": True, "weighted": True}
    )
    for case, results in zip(cases, pool.run(cases), strict=True):
        shard = "(Replicate(),)" if case.get("replicated") else "(Shard(dim=0),)"
        for res in results:
            assert res["placements"] == "(Replicate(),)"
            assert res["grad_weight_placements"] == shard
            assert res["grad_input_placements"] == (
                "(Replicate(),)" if case["dtensor_input"] else "plain"
            )
            _close(res["loss"], res["ref_loss"], "loss", case)
            _close(res["grad_weight"], res["ref_grad_weight"], "grad weight", case)
            _close(res["grad_input"], res["ref_grad_input"], "grad input", case)
            if case["bias"]:
                assert res["grad_bias_placements"] == shard
                _close(res["grad_bias"], res["ref_grad_bias"], "grad bias", case)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_batch_sharded(pool, reduction):
    """Tokens sharded (5 over 2 ranks), classifier replicated: torch's placements, the exact
    global mean, the classifier's gradient summed over the ranks."""
    base = {"kind": "linear", "tokens": 5, "hidden": 3, "vocab": 6, "reduction": reduction}
    cases = [
        {**base, "batch_input": True, "replicated": True, "bias": bias, "seed": seed, **opts}
        for seed, opts in enumerate(OPTIONS.values())
        for bias in (False, True)
    ]
    for case, results in zip(cases, pool.run(cases), strict=True):
        for res in results:
            assert res["placements"] == _expected("batch", reduction)
            # summed over the ranks when read (DTensor's pending reduction, as torch's mm gives)
            assert res["grad_weight_placements"] == "(Partial(sum),)"
            assert res["grad_input_placements"] == "(Shard(dim=0),)"
            _close(res["loss"], res["ref_loss"], "loss", case)
            _close(res["grad_weight"], res["ref_grad_weight"], "grad weight", case)
            _close(res["grad_input"], res["ref_grad_input"], "grad input", case)
            if case["bias"]:
                _close(res["grad_bias"], res["ref_grad_bias"], "grad bias", case)


def test_linear_cross_entropy_refuses_inputs_that_differ_across_ranks(pool):
    case = {"kind": "linear", "tokens": 4, "hidden": 3, "vocab": 6, "rank_local_input": True}
    (results,) = pool.run([case])
    for res in results:
        assert res["raised"] == "ValueError"
        assert "module.unshard()" in res["message"]


@pytest.mark.parametrize("vocab", [6, 7], ids=["even", "uneven"])
def test_fsdp_sharded_weight_outside_forward(pool, vocab):
    """The parameter of a ``fully_shard``-ed lm_head is a vocabulary shard: same input on every
    rank gives the exact loss, the gradient in ``param.grad`` with the parameter's placement,
    and an optimizer step equal to the unsharded model's; rank-local inputs are refused."""
    exact, local = pool.run(
        [
            {"kind": "fsdp", "vocab": vocab},
            {"kind": "fsdp", "vocab": vocab, "rank_local_input": True},
        ]
    )
    for res in exact:
        assert res["grad_placements"] == res["param_placements"] == "(Shard(dim=0),)"
        _close(res["loss"], res["ref_loss"], "loss", {"vocab": vocab})
        _close(res["grad"], res["ref_grad"], "grad", {"vocab": vocab})
        _close(res["stepped"], res["ref_stepped"], "after the step", {"vocab": vocab})
    for res in local:
        assert res["raised"] == "ValueError" and "inside the module's forward" in res["message"]
