"""Vocab-parallel losses against single-process torch, in gloo groups of 2 and 3 CPU processes.

One pool of rank processes per world size lives for the whole module (spawning costs seconds,
a case milliseconds). The parent sends a case description to every rank; each rank builds the
same full-vocabulary tensors from the case's seed, keeps its slice, runs the vocab-parallel loss
and the torch oracle (``F.cross_entropy`` / ``F.linear`` on the gathered tensors, plus the
z-loss term written out), and sends both back as lists. The parent compares them in float64 to
1e-10. Collectives time out after 20 s and the parent waits at most 60 s per case, so a hang
fails the test instead of blocking CI.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing as mp
import os
import queue
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

COLLECTIVE_TIMEOUT_S = 20
CASE_TIMEOUT_S = 60
TOL = dict(rtol=1e-10, atol=1e-10)
REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# What every rank runs (in a spawned process)
# --------------------------------------------------------------------------------------------


def _full_problem(case: dict) -> dict:
    """The full-vocabulary tensors of a case, identical on every rank (seeded)."""
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = getattr(torch, case.get("dtype", "float64"))
    vocab, shape = sum(case["sizes"]), tuple(case["shape"])
    scale = case.get("scale", 3.0)
    problem = {"vocab": vocab}
    if case["kind"] == "linear":
        hidden = case["hidden"]
        problem["input"] = torch.randn(*shape, hidden, generator=gen, dtype=torch.float64)
        problem["classifier"] = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64)
        problem["bias"] = torch.randn(vocab, generator=gen, dtype=torch.float64)
        for name in ("input", "classifier", "bias"):
            problem[name] = problem[name].to(dtype)
    else:
        logits = torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale
        logits = logits + case.get("offset", 0.0)
        for row, column, value in case.get("cells", []):  # e.g. (0, 3, "-inf")
            logits.view(-1, vocab)[row, column] = float(value)
        problem["logits"] = logits.to(dtype)
    target = torch.randint(max(vocab, 1), shape, generator=gen)
    ignored = torch.rand(shape, generator=gen) < case.get("ignore_frac", 0.0)
    problem["target"] = torch.where(ignored, case.get("ignore_index", -100), target)
    weight = torch.rand(vocab, generator=gen, dtype=torch.float64) + 0.25
    if case.get("zero_target_weights"):  # every target class weighs 0: 'mean' divides by 0
        weight[target.reshape(-1)] = 0.0
    problem["weight"] = weight.to(dtype) if case.get("weighted") else None
    problem["upstream"] = torch.randn(shape, generator=gen, dtype=torch.float64) + 0.5
    return problem


def _options(case: dict) -> dict:
    return dict(
        ignore_index=case.get("ignore_index", -100),
        label_smoothing=case.get("label_smoothing", 0.0),
        reduction=case.get("reduction", "mean"),
    )


def _oracle_loss(logits: torch.Tensor, target: torch.Tensor, weight, case: dict) -> torch.Tensor:
    """torch's cross entropy on the gathered logits ``(*, V)`` plus ``z * lse²`` per kept token."""
    opts = _options(case)
    flat, flat_target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1)
    loss = F.cross_entropy(flat, flat_target, weight=weight, **opts)
    z = case.get("z_loss", 0.0)
    if z:
        kept = flat_target != opts["ignore_index"]
        z_term = torch.where(kept, z * flat.logsumexp(dim=1).square(), 0.0)
        if opts["reduction"] == "none":
            loss = loss + z_term
        elif opts["reduction"] == "sum":
            loss = loss + z_term.sum()
        else:
            safe = torch.where(kept, flat_target, 0)
            denom = kept.sum() if weight is None else torch.where(kept, weight[safe], 0).sum()
            loss = loss + z_term.sum() / denom
    return loss.reshape(target.shape) if opts["reduction"] == "none" else loss


def _backward(loss: torch.Tensor, upstream: torch.Tensor) -> None:
    """Backward with a non-trivial upstream gradient (per token for 'none', 1.7 otherwise)."""
    if loss.dim() == 0:
        (loss * 1.7).backward()
    else:
        (loss * upstream.to(loss.dtype)).sum().backward()


def _run_ce(rank: int, world: int, case: dict) -> dict:
    from crossent.distributed import vocab_parallel_cross_entropy

    p = _full_problem(case)
    lo = sum(case["sizes"][:rank])
    hi = lo + case["sizes"][rank]
    shard = p["logits"][..., lo:hi].clone().requires_grad_()
    before = shard.detach().clone()
    loss = vocab_parallel_cross_entropy(
        shard,
        p["target"],
        weight=p["weight"],
        z_loss=case.get("z_loss", 0.0),
        chunk_size=case.get("chunk_size"),
        check_inputs=case.get("check_inputs", True),
        **_options(case),
    )
    backward = rank in case.get("backward_ranks", range(world))
    if backward:
        _backward(loss, p["upstream"])
    full = p["logits"].to(torch.float64).requires_grad_()
    weight64 = None if p["weight"] is None else p["weight"].to(torch.float64)
    ref = _oracle_loss(full, p["target"], weight64, case)
    _backward(ref, p["upstream"])
    return {
        "dtype": str(loss.dtype),
        "shape": list(loss.shape),
        "unchanged": bool(((shard == before) | (shard.isnan() & before.isnan())).all()),
        "loss": loss.double().tolist(),
        "ref_loss": ref.tolist(),
        "grad": shard.grad.double().tolist() if backward else None,
        "ref_grad": full.grad[..., lo:hi].tolist(),
    }


def _run_linear(rank: int, world: int, case: dict) -> dict:
    from crossent.distributed import vocab_parallel_linear_cross_entropy

    p = _full_problem(case)
    lo = sum(case["sizes"][:rank])
    hi = lo + case["sizes"][rank]
    x = p["input"].clone().requires_grad_()
    w_shard = p["classifier"][lo:hi].clone().requires_grad_()
    b_shard = p["bias"][lo:hi].clone().requires_grad_() if case.get("bias") else None
    # The classifier shard by keyword: its name, or the deprecated one (``old_keyword``).
    shard = {"weight_shard" if case.get("old_keyword") else "linear_weight_shard": w_shard}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = vocab_parallel_linear_cross_entropy(
            x,
            target=p["target"],
            **shard,
            linear_bias_shard=b_shard,
            weight=p["weight"],
            z_loss=case.get("z_loss", 0.0),
            chunk_size=case.get("chunk_size"),
            check_inputs=case.get("check_inputs", True),
            **_options(case),
        )
    _backward(loss, p["upstream"])
    x_ref = p["input"].to(torch.float64).requires_grad_()
    w_ref = p["classifier"].to(torch.float64).requires_grad_()
    b_ref = p["bias"].to(torch.float64).requires_grad_() if case.get("bias") else None
    weight64 = None if p["weight"] is None else p["weight"].to(torch.float64)
    ref = _oracle_loss(F.linear(x_ref, w_ref, b_ref), p["target"], weight64, case)
    _backward(ref, p["upstream"])
    out = {
        "dtype": str(loss.dtype),
        "shape": list(loss.shape),
        "loss": loss.double().tolist(),
        "ref_loss": ref.tolist(),
        "grad_input": x.grad.double().tolist(),
        "ref_grad_input": x_ref.grad.tolist(),
        "grad_weight": w_shard.grad.double().tolist(),
        "ref_grad_weight": w_ref.grad[lo:hi].tolist(),
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
    }
    if b_shard is not None:
        out["grad_bias"] = b_shard.grad.double().tolist()
        out["ref_grad_bias"] = b_ref.grad[lo:hi].tolist()
    return out


class ShardStoreError(Exception):
    """An exception type of no table: what a rank's checks might raise in the field."""


class BadShardValue(ValueError):
    """A user-defined ``ValueError``: the other ranks raise its builtin base."""


_INJECTED = {"ShardStoreError": ShardStoreError, "BadShardValue": BadShardValue}


def _run_bad(rank: int, world: int, case: dict) -> dict:
    """A valid call, except for what ``case['breaks'][rank]`` changes on this rank."""
    from crossent.distributed import (
        vocab_parallel_cross_entropy,
        vocab_parallel_linear_cross_entropy,
    )

    p = _full_problem({**case, "kind": case["fn"]})
    lo = sum(case["sizes"][:rank])
    hi = lo + case["sizes"][rank]
    kwargs = dict(weight=p["weight"], **_options(case))
    tensors = {"target": p["target"].clone()}
    failure = None
    if case["fn"] == "linear":
        tensors["input"] = p["input"]
        tensors["linear_weight_shard"] = p["classifier"][lo:hi].clone()
    else:
        tensors["logits_shard"] = p["logits"][..., lo:hi].clone()
    for key, value in case["breaks"].get(str(rank), {}).items():
        if key == "target_value":  # (position, value)
            tensors["target"].view(-1)[value[0]] = value[1]
        elif key == "extra_token":
            name = "input" if case["fn"] == "linear" else "logits_shard"
            tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
            tensors["target"] = torch.cat([tensors["target"], tensors["target"][:1]])
        elif key == "dtype":  # the class weight follows, so only the ranks disagree
            for name in ("logits_shard", "input", "linear_weight_shard"):
                if name in tensors:
                    tensors[name] = tensors[name].to(getattr(torch, value))
            kwargs["weight"] = kwargs["weight"].to(getattr(torch, value))
        elif key == "weight_size":
            kwargs["weight"] = torch.ones(value, dtype=torch.float64)
        elif key == "weight_dtype":
            kwargs["weight"] = kwargs["weight"].to(getattr(torch, value))
        elif key == "target_dtype":
            tensors["target"] = tensors["target"].to(getattr(torch, value))
        elif key == "weight_requires_grad":
            kwargs["weight"] = kwargs["weight"].clone().requires_grad_()
        elif key == "target_shape":
            tensors["target"] = tensors["target"][:-1]
        elif key == "input_requires_grad":
            tensors["input"] = tensors["input"].clone().requires_grad_(value)
        elif key == "fail_check":  # this rank's class-weight check raises _INJECTED[value]
            failure = _INJECTED[value]("shard store unreachable")
        else:
            kwargs[key] = value
    fn = (
        vocab_parallel_linear_cross_entropy
        if case["fn"] == "linear"
        else (vocab_parallel_cross_entropy)
    )
    import crossent._checks.distributed

    injected = mock.patch.object(
        crossent._checks.distributed, "check_class_weight", side_effect=failure
    )
    try:
        with injected if failure is not None else contextlib.nullcontext():
            fn(**tensors, **kwargs)
    except Exception as exc:  # noqa: BLE001 - report whatever was raised to the parent
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "message": ""}


def _run_example(rank: int, world: int, case: dict) -> dict:
    sys.path.insert(0, str(REPO / "examples"))
    import vocab_parallel

    return {"worst": vocab_parallel.run(tokens=24, hidden_size=8, vocab=case["vocab"])}


_RUNNERS = {"ce": _run_ce, "linear": _run_linear, "bad": _run_bad, "example": _run_example}


def _rank_main(rank: int, world: int, store: str, inbox, outbox, timeout_s: float) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        while (case := inbox.get()) is not None:
            try:
                result = ("ok", _RUNNERS[case["kind"]](rank, world, case))
            except Exception as exc:  # noqa: BLE001 - the parent reports it
                result = ("error", f"{type(exc).__name__}: {exc}")
            outbox.put((rank, result))
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The parent side: a pool of rank processes per world size
# --------------------------------------------------------------------------------------------


class RankPool:
    """``world`` spawned processes in one gloo group, running cases on request."""

    def __init__(
        self,
        world: int,
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
        case_timeout_s: float = CASE_TIMEOUT_S,
    ) -> None:
        self.world = world
        self.case_timeout_s = case_timeout_s
        self._tmp = tempfile.TemporaryDirectory(prefix="crossent-dist-")
        ctx = mp.get_context("spawn")
        self._inboxes = [ctx.Queue() for _ in range(world)]
        self._outbox = ctx.Queue()
        store = os.path.join(self._tmp.name, "store")
        self._procs = [
            ctx.Process(
                target=_rank_main,
                args=(r, world, store, self._inboxes[r], self._outbox, collective_timeout_s),
                daemon=True,
            )  # fmt: skip
            for r in range(world)
        ]
        for proc in self._procs:
            proc.start()
        self.broken = False

    def run(self, case: dict) -> list[dict]:
        """Run ``case`` on every rank; the per-rank results in rank order."""
        if self.broken:
            pytest.fail(f"the {self.world}-rank pool is broken by an earlier timeout")
        for inbox in self._inboxes:
            inbox.put(case)
        results: dict[int, tuple] = {}
        while len(results) < self.world:
            try:
                rank, result = self._outbox.get(timeout=self.case_timeout_s)
            except queue.Empty:
                self.broken = True
                pytest.fail(
                    f"no answer within {self.case_timeout_s} s from ranks "
                    f"{sorted(set(range(self.world)) - set(results))}: {case}"
                )
            results[rank] = result
        for rank, (status, payload) in sorted(results.items()):
            if status != "ok":
                pytest.fail(f"rank {rank} of {self.world} failed on {case}: {payload}")
        return [results[r][1] for r in range(self.world)]

    def close(self) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self._tmp.cleanup()


@pytest.fixture(scope="module")
def pools():
    made: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        if world not in made:
            made[world] = RankPool(world)
        return made[world]

    yield get
    for pool in made.values():
        pool.close()


def _close(actual: list, expected: list, what: str, case: dict, rank: int) -> None:
    torch.testing.assert_close(
        torch.tensor(actual, dtype=torch.float64),
        torch.tensor(expected, dtype=torch.float64),
        equal_nan=True,
        msg=lambda m: f"{what} on rank {rank}, case {case}:\n{m}",
        **TOL,
    )


def _check_ce(results: list[dict], case: dict) -> None:
    for rank, res in enumerate(results):
        assert res["dtype"] == f"torch.{case.get('dtype', 'float64')}"
        if case.get("reduction", "mean") == "none":
            assert res["shape"] == list(case["shape"])
        else:
            assert res["shape"] == []
        assert res["unchanged"], "the logits shard was modified"
        _close(res["loss"], res["ref_loss"], "loss", case, rank)
        if res["grad"] is not None:
            _close(res["grad"], res["ref_grad"], "grad wrt logits shard", case, rank)


def _check_linear(results: list[dict], case: dict) -> None:
    for rank, res in enumerate(results):
        assert res["dtype"] == "torch.float64"
        _close(res["loss"], res["ref_loss"], "loss", case, rank)
        _close(res["grad_input"], res["ref_grad_input"], "grad wrt input", case, rank)
        _close(res["grad_weight"], res["ref_grad_weight"], "grad wrt weight shard", case, rank)
        if case.get("bias"):
            _close(res["grad_bias"], res["ref_grad_bias"], "grad wrt bias shard", case, rank)


# --------------------------------------------------------------------------------------------
# Random cases (hypothesis) against torch
# --------------------------------------------------------------------------------------------


@st.composite
def cases(draw, world: int, kind: str) -> dict:
    sizes = draw(st.lists(st.integers(0, 5), min_size=world, max_size=world))
    if sum(sizes) == 0:
        sizes[draw(st.integers(0, world - 1))] = draw(st.integers(1, 4))
    vocab = sum(sizes)
    shape = draw(
        st.one_of(st.tuples(st.integers(0, 9)), st.tuples(st.integers(1, 3), st.integers(1, 3)))
    )
    case = {
        "kind": kind,
        "sizes": sizes,
        "shape": shape,
        "seed": draw(st.integers(0, 2**31 - 1)),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "weighted": draw(st.booleans()),
        # -100 (default), a class that exists (its tokens are dropped, it stays in the softmax),
        # a value beyond the vocabulary, -1
        "ignore_index": draw(st.sampled_from([-100, 0, vocab - 1, vocab + 250, -1])),
        "ignore_frac": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "label_smoothing": draw(st.one_of(st.sampled_from([0.0, 1.0, -0.25]), st.floats(0.0, 1.0))),
        "z_loss": draw(st.sampled_from([0.0, 0.0, 1e-2, 0.5])),
        "chunk_size": draw(st.sampled_from([None, 1, 2, 4])),
        "check_inputs": draw(st.booleans()),
    }
    if kind == "linear":
        case["hidden"] = draw(st.integers(1, 4))
        case["bias"] = draw(st.booleans())
    return case


@pytest.mark.parametrize("world", [2, 3])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_cross_entropy_matches_torch_random(pools, world, data):
    case = data.draw(cases(world, "ce"))
    _check_ce(pools(world).run(case), case)


@pytest.mark.parametrize("world", [2, 3])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_linear_cross_entropy_matches_torch_random(pools, world, data):
    case = data.draw(cases(world, "linear"))
    _check_linear(pools(world).run(case), case)


# --------------------------------------------------------------------------------------------
# Hand-picked cases: the shard layouts, every option, edge values
# --------------------------------------------------------------------------------------------

LAYOUTS = {2: [[3, 4], [7, 0]], 3: [[334, 333, 334], [400, 1, 600], [0, 1001, 0]]}


def _grid(world: int, kind: str) -> list[dict]:
    """Each layout × reduction, with weight, ignore_index, label smoothing, z-loss switched on
    alone and all together."""
    extras = [
        {},
        {"weighted": True},
        {"ignore_index": 2, "ignore_frac": 0.4},
        {"label_smoothing": 0.2},
        {"z_loss": 1e-2},
        {"weighted": True, "ignore_index": 1, "ignore_frac": 0.3, "label_smoothing": 0.3,
         "z_loss": 0.1, "chunk_size": 3},
    ]  # fmt: skip
    grid = []
    for sizes in LAYOUTS[world]:
        for reduction in ("mean", "sum", "none"):
            for i, extra in enumerate(extras):
                shape = [5] if i % 2 else [2, 3]
                case = {"kind": kind, "sizes": sizes, "shape": shape, "seed": i,
                        "reduction": reduction, **extra}  # fmt: skip
                if kind == "linear":
                    case.update(hidden=6, bias=i % 2 == 0)
                grid.append(case)
    return grid


@pytest.mark.parametrize("world", [2, 3])
def test_cross_entropy_grid(pools, world):
    pool = pools(world)
    for case in _grid(world, "ce"):
        _check_ce(pool.run(case), case)


@pytest.mark.parametrize("world", [2, 3])
def test_linear_cross_entropy_grid(pools, world):
    pool = pools(world)
    for case in _grid(world, "linear"):
        _check_linear(pool.run(case), case)


def test_linear_old_weight_shard_keyword_warns(pools):
    """``weight_shard=`` (the classifier shard's old name) still works, with a FutureWarning
    naming ``linear_weight_shard``; the new name warns of nothing."""
    case = {"kind": "linear", "sizes": [3, 4], "shape": [5], "seed": 3, "hidden": 4, "bias": True,
            "weighted": True, "label_smoothing": 0.1}  # fmt: skip
    for old in (True, False):
        results = pools(2).run({**case, "old_keyword": old})
        _check_linear(results, case)
        for res in results:
            future = [w for w in res["warnings"] if w.startswith("FutureWarning")]
            if old:
                assert len(future) == 1 and "'linear_weight_shard'" in future[0], res["warnings"]
            else:
                assert not future, future


def test_option_checks_name_the_function_called():
    """The local option checks name the public function they were called from."""
    from crossent._checks.distributed import check_options

    for fn in ("vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"):
        args = dict(reduction="mean", ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                    chunk_size=None)  # fmt: skip
        bad_args = [
            ({"z_loss": -1.0}, ValueError),
            ({"chunk_size": 0}, ValueError),
            ({"ignore_index": 1.5}, TypeError),
            ({"label_smoothing": None}, TypeError),
        ]
        for bad, exc in bad_args:
            with pytest.raises(exc, match=rf"^{fn}\W"):
                check_options(fn, **{**args, **bad})


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"ignore_frac": 1.0}, id="all-ignored"),
        pytest.param(
            {"ignore_frac": 1.0, "weighted": True, "label_smoothing": 0.1, "z_loss": 0.1},
            id="all-ignored-weighted-smoothed",
        ),  # fmt: skip
        pytest.param(
            {"weighted": True, "zero_target_weights": True, "label_smoothing": 0.1, "z_loss": 0.1},
            id="target-weights-zero",
        ),  # fmt: skip
        pytest.param({"shape": [0]}, id="empty-batch"),
        pytest.param({"shape": []}, id="unbatched"),
        pytest.param({"scale": 300.0}, id="large-logits"),
        pytest.param({"offset": 1e6, "label_smoothing": 0.1}, id="huge-offset"),
        pytest.param({"offset": -1e6, "z_loss": 1e-9}, id="huge-negative-offset"),
        pytest.param({"label_smoothing": 1.0, "weighted": True}, id="smoothing-one"),
        pytest.param({"label_smoothing": -0.5}, id="negative-smoothing-is-zero"),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_edge_cases(pools, extra, reduction):
    """all ignored → NaN mean with zero gradients; every target of class weight 0 → NaN mean
    (torch's 0/0, whatever the smoothing and z-loss terms hold); empty batch; huge logits lose
    no digits."""
    case = {"kind": "ce", "sizes": [4, 3], "shape": [6], "seed": 7, "reduction": reduction,
            **extra}  # fmt: skip
    _check_ce(pools(2).run(case), case)


NONFINITE = [
    pytest.param([[0, 1, "-inf"]], id="minus-inf-off-target"),
    pytest.param([[1, c, "-inf"] for c in range(3)], id="minus-inf-whole-shard"),
    pytest.param([[2, c, "-inf"] for c in range(7)], id="minus-inf-whole-row"),
    pytest.param([[3, 5, "inf"]], id="plus-inf"),
    pytest.param([[4, 6, "nan"]], id="nan"),
]


@pytest.mark.parametrize("cells", NONFINITE)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_nonfinite_logits_like_torch(pools, cells, label_smoothing):
    """-inf, +inf and NaN logits give torch's finite/inf/NaN losses and gradients, per row."""
    case = {"kind": "ce", "sizes": [3, 2, 2], "shape": [5], "seed": 3, "reduction": "none",
            "cells": cells, "label_smoothing": label_smoothing, "ignore_index": 0}  # fmt: skip
    _check_ce(pools(3).run(case), case)


def test_cross_entropy_backward_needs_no_communication(pools):
    """Only rank 0 runs the backward; with any collective in it, rank 0 would time out."""
    case = {"kind": "ce", "sizes": [3, 4], "shape": [5], "seed": 2, "label_smoothing": 0.1,
            "weighted": True, "z_loss": 0.01, "backward_ranks": [0]}  # fmt: skip
    _check_ce(pools(2).run(case), case)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_low_precision_close_to_float64(pools, dtype):
    """Statistics in float32, output in the logits' dtype, close to torch in float64."""
    case = {"kind": "ce", "sizes": [300, 200, 501], "shape": [4, 8], "seed": 11,
            "dtype": dtype, "label_smoothing": 0.1, "weighted": True, "z_loss": 1e-3,
            "ignore_frac": 0.2, "reduction": "none"}  # fmt: skip
    results = pools(3).run(case)
    # One rounding to the output dtype (half an ulp: eps/2) plus a few float32 ulps of compute.
    rtol = torch.finfo(getattr(torch, dtype)).eps + 4 * torch.finfo(torch.float32).eps
    for rank, res in enumerate(results):
        assert res["dtype"] == f"torch.{dtype}"
        for what, atol in (("loss", rtol), ("grad", rtol * 1e-2)):
            torch.testing.assert_close(
                torch.tensor(res[what], dtype=torch.float64),
                torch.tensor(res[f"ref_{what}"], dtype=torch.float64),
                rtol=rtol,
                atol=atol,
                msg=lambda m, what=what, rank=rank: f"{what} on rank {rank}: {m}",
            )


# --------------------------------------------------------------------------------------------
# Bad input raises the same exception on every rank
# --------------------------------------------------------------------------------------------

BAD = [
    ("target-out-of-range", "ce", {"0": {"target_value": [1, 7]}, "1": {"target_value": [1, 7]}},
     "IndexError", "Target 7 is out of bounds"),
    ("negative-target", "ce", {"0": {"target_value": [0, -3]}, "1": {"target_value": [0, -3]}},
     "IndexError", "Target -3 is out of bounds"),
    ("target-out-of-range-one-rank", "ce", {"1": {"target_value": [2, 9]}},
     "IndexError", "rank 1"),
    ("target-differs", "ce", {"1": {"target_value": [2, 0]}, "0": {"target_value": [2, 1]}},
     "ValueError", "same target"),
    ("tokens-differ", "ce", {"1": {"extra_token": True}}, "ValueError", "N=7"),
    ("dtype-differs", "ce", {"1": {"dtype": "float32"}}, "RuntimeError", "torch.float32"),
    ("weight-size", "ce", {"0": {"weight_size": 4}, "1": {"weight_size": 4}}, "RuntimeError",
     "defined either for all 7 classes"),
    ("weight-size-one-rank", "ce", {"1": {"weight_size": 3}}, "RuntimeError", "shape: [3]"),
    ("weight-dtype", "ce", {"0": {"weight_dtype": "float32"}}, "RuntimeError",
     "expected scalar type"),
    ("label-smoothing-above-one", "ce", {"1": {"label_smoothing": 1.5}}, "RuntimeError",
     "label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    ("label-smoothing-differs", "ce", {"1": {"label_smoothing": 0.5}}, "ValueError",
     "label_smoothing"),
    ("bad-reduction", "ce", {"0": {"reduction": "avg"}}, "ValueError",
     "avg is not a valid value for reduction"),
    ("bad-reduction-everywhere", "ce", {"0": {"reduction": "avg"}, "1": {"reduction": "avg"}},
     "ValueError", "avg is not a valid value for reduction"),
    ("reduction-differs", "ce", {"1": {"reduction": "sum"}}, "ValueError", "reduction"),
    ("ignore-index-not-int", "ce", {"1": {"ignore_index": None}}, "TypeError", "ignore_index"),
    ("target-dtype", "ce", {"0": {"target_dtype": "int32"}}, "RuntimeError", "Long or Byte"),
    ("weight-requires-grad", "ce", {"1": {"weight_requires_grad": True}}, "RuntimeError",
     "requires_grad"),
    ("target-shape", "ce", {"0": {"target_shape": True}}, "ValueError", "shape"),
    ("negative-z-loss", "ce", {"1": {"z_loss": -1.0}}, "ValueError", "z_loss"),
    ("linear-negative-z-loss", "linear", {"1": {"z_loss": -1.0}}, "ValueError",
     "vocab_parallel_linear_cross_entropy: z_loss"),
    ("linear-chunk-size", "linear", {"0": {"chunk_size": 0}}, "ValueError",
     "vocab_parallel_linear_cross_entropy: chunk_size"),
    ("linear-ignore-index-not-int", "linear", {"1": {"ignore_index": None}}, "TypeError",
     "vocab_parallel_linear_cross_entropy(): argument 'ignore_index'"),
    ("linear-label-smoothing-not-float", "linear", {"0": {"label_smoothing": "0.1"}},
     "TypeError", "vocab_parallel_linear_cross_entropy: label_smoothing"),
    ("linear-weight-requires-grad", "linear", {"1": {"weight_requires_grad": True}},
     "RuntimeError", "'vocab_parallel_linear_cross_entropy' is not differentiable"),
    ("linear-target-out-of-range", "linear",
     {"0": {"target_value": [0, 70]}, "1": {"target_value": [0, 70]}},
     "IndexError", "Target 70 is out of bounds"),
    ("linear-tokens-differ", "linear", {"0": {"extra_token": True}}, "ValueError", "N="),
    ("linear-dtype-differs", "linear", {"0": {"dtype": "float32"}}, "RuntimeError",
     "torch.float32"),
    ("linear-requires-grad-differs", "linear", {"1": {"input_requires_grad": True}},
     "RuntimeError", "requires_grad"),
]  # fmt: skip


@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_on_every_rank(pools, world):
    """Every rank raises the same type, naming the problem; then the group still works."""
    pool = pools(world)
    failures = []
    for name, fn, breaks, expected_type, expected_text in BAD:
        sizes = [3, 4] if world == 2 else [3, 0, 4]
        case = {"kind": "bad", "fn": fn, "sizes": sizes, "shape": [6], "seed": 5,
                "weighted": True, "hidden": 3, "breaks": breaks}  # fmt: skip
        for rank, res in enumerate(pool.run(case)):
            if res["raised"] != expected_type or expected_text not in res["message"]:
                failures.append(f"{name}: rank {rank} raised {res['raised']}: {res['message']}")
    assert not failures, "\n".join(failures)
    # No rank was left inside a collective: a good call still matches torch.
    good = {"kind": "ce", "sizes": LAYOUTS[world][0], "shape": [4], "seed": 1, "weighted": True}
    _check_ce(pool.run(good), good)


# A rank whose checks fail in a way no table lists must not leave the others in the all-gather.
# These run in pools of their own: a hang fails the test within the collective timeout (the
# other ranks time out with a RuntimeError instead of raising the rank's exception), and a
# group left unusable by it cannot spoil the shared pools of the tests above.


@pytest.fixture(scope="module")
def fragile_pools():
    made: dict[int, RankPool] = {}

    def get(world: int) -> RankPool:
        if world not in made:
            made[world] = RankPool(world)
        return made[world]

    yield get
    for pool in made.values():
        pool.close()


def _raised_everywhere(pool: RankPool, fn: str, breaks: dict) -> list[dict]:
    sizes = [3, 4, 2][: pool.world]
    case = {"kind": "bad", "fn": fn, "sizes": sizes, "shape": [6], "seed": 5, "weighted": True,
            "hidden": 3, "breaks": breaks}  # fmt: skip
    return pool.run(case)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "fn, breaks, expected_types, expected_text",
    [
        # beyond int64: OverflowError from the comparison with the target (torch: ValueError)
        ("ce", {"1": {"ignore_index": 2**70}}, {"OverflowError", "ValueError"}, "rank 1"),
        ("linear", {"0": {"ignore_index": -(2**70)}}, {"OverflowError", "ValueError"}, "rank 0"),
        ("ce", {"0": {"fail_check": "ShardStoreError"}}, {"Exception"},
         "ShardStoreError: shard store unreachable (seen on"),
        ("linear", {"1": {"fail_check": "BadShardValue"}}, {"ValueError"},
         "BadShardValue: shard store unreachable (seen on"),
    ],
    ids=["ignore-index-overflow", "linear-ignore-index-overflow", "custom-exception",
         "custom-value-error"],
)  # fmt: skip
def test_any_exception_on_one_rank_raises_on_every_rank(
    fragile_pools, world, fn, breaks, expected_types, expected_text
):
    """Whatever one rank's checks raise, every rank raises it at once (one type for all), and
    the group still works after."""
    pool = fragile_pools(world)
    results = _raised_everywhere(pool, fn, breaks)
    raised = [res["raised"] for res in results]
    assert len(set(raised)) == 1 and raised[0] in expected_types, results
    for res in results:
        assert expected_text in res["message"], res["message"]
    good = {"kind": "ce", "sizes": [3, 4, 2][:world], "shape": [4], "seed": 1, "weighted": True}
    _check_ce(pool.run(good), good)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("fn", ["ce", "linear"])
@pytest.mark.parametrize("dtype", ["int64", "float8_e4m3fn"])
@pytest.mark.parametrize("where", ["every-rank", "last-rank"])
def test_not_implemented_error_stays_not_implemented(fragile_pools, world, fn, dtype, where):
    """Integer and float8 logits raise NotImplementedError (not its base RuntimeError) on every
    rank, also alone in the group."""
    ranks = range(world) if where == "every-rank" else [world - 1]
    breaks = {str(r): {"dtype": dtype} for r in ranks}
    for rank, res in enumerate(_raised_everywhere(fragile_pools(world), fn, breaks)):
        assert res["raised"] == "NotImplementedError", (rank, res)
        assert "not implemented" in res["message"], res["message"]


# --------------------------------------------------------------------------------------------
# The example
# --------------------------------------------------------------------------------------------


def test_example_run_in_pool(pools):
    """``examples/vocab_parallel.run`` agrees with the single-process loss (3 ranks, V=7)."""
    for res in pools(3).run({"kind": "example", "vocab": 7}):
        assert res["worst"] <= 1e-9


def test_example_runs_under_torchrun():
    """The documented command: ``torchrun --nproc-per-node 2 examples/vocab_parallel.py``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(REPO / "examples" / "vocab_parallel.py"), "--tokens", "32"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "max |grad difference|" in proc.stdout
    assert "vocab_parallel_linear_cross_entropy" in proc.stdout


def test_needs_initialized_process_group():
    from crossent.distributed import vocab_parallel_cross_entropy

    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
