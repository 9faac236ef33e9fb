"""``crossent.integrations.transformers.apply`` under torch's data-parallel engines: FSDP2
(``fully_shard`` per decoder layer and at the root, the order transformers' Trainer uses) and
DDP, in a gloo group of 2 CPU processes.

Every rank builds the same tiny float64 Llama from a config (seeded), and its own micro-batch.
The reference is single-process torch: the unpatched model with a float64 ``ForCausalLMLoss``
(set through ``model.loss_function``) run on every rank's micro-batch, the losses averaged over
ranks — what data parallelism computes when each rank's gradient is averaged. Each rank wraps
a copy of the model (patched before or after wrapping), runs one training step and one SGD
step, and compares the loss (averaged over ranks), every parameter's gradient (FSDP's sharded
gradients gathered with ``full_tensor()``) and every parameter after the step with the
reference, to 1e-10. An unpatched wrapped model is the control.

One pool of 2 rank processes (``tests/_dist_helpers.py``) serves the module; collectives time
out after 30 s and the parent waits at most 120 s per case, so a hang fails instead of blocking
CI.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _dist_helpers import RankPool

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with the gloo backend",
)

WORLD = 2
COLLECTIVE_TIMEOUT_S = 30
CASE_TIMEOUT_S = 120
TIGHT = {"rtol": 1e-10, "atol": 1e-12}
LR = 0.5
VOCAB = 96
REPO = Path(__file__).resolve().parents[1]

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


# --------------------------------------------------------------------------------------------
# What every rank runs (in a spawned process)
# --------------------------------------------------------------------------------------------


def _llama(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    config = transformers.LlamaConfig(**_TEXT, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).to(torch.float64).train()


def _batch(seed: int, num_items: int | None) -> dict:
    """A micro-batch of 2 sequences with a masked prompt; its length and mask depend on seed."""
    gen = torch.Generator().manual_seed(seed)
    seq = 9 + seed % 3
    input_ids = torch.randint(3, VOCAB, (2, seq), generator=gen)
    labels = input_ids.clone()
    labels[0, : 2 + seed % 4] = -100
    batch = {"input_ids": input_ids, "labels": labels}
    if num_items is not None:
        batch["num_items_in_batch"] = torch.tensor(num_items)
    return batch


def _batches(case: dict, world: int) -> list[dict]:
    seeds = [1 + r if case.get("different", True) else 1 for r in range(world)]
    if not case.get("num_items"):
        return [_batch(s, None) for s in seeds]
    # Gradient accumulation across ranks: every rank divides by the kept tokens of all ranks.
    kept = sum(int((_batch(s, None)["labels"][:, 1:] != -100).sum()) for s in seeds)
    return [_batch(s, kept) for s in seeds]


def _float64_causal_lm_loss(
    logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_
):
    """transformers' ForCausalLMLoss without its float32 upcast: the float64 reference."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size).double()
    target = shift_labels.reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return loss / num_items_in_batch


def _log_softmax_loss(logits, labels, vocab_size, ignore_index=-100, **_):
    """A causal-LM loss that bypasses ``F.cross_entropy``: crossent computes the logits."""
    target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    logp = logits.reshape(-1, vocab_size).double().log_softmax(-1)
    return F.nll_loss(logp, target, ignore_index=ignore_index)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's sharded parameter or gradient) gathered; a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _wrap(model: torch.nn.Module, case: dict) -> torch.nn.Module:
    if case["engine"] == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if "head_group" in case:  # the head in a group of its own, resharded after forward or not
        fully_shard(model.lm_head, reshard_after_forward=case["head_group"] == "reshard")
    fully_shard(model)
    return model


def _run_step(rank: int, world: int, case: dict) -> dict:
    """One training step of the wrapped model against single-process torch."""
    from crossent.integrations import transformers as hf

    base = _llama(case["tied"])
    batches = _batches(case, world)

    loss_function = _log_softmax_loss if case.get("fallback") else _float64_causal_lm_loss
    base.loss_function = loss_function  # an instance attribute: copies keep it
    reference = copy.deepcopy(base)
    ref_loss = sum(reference(**b).loss for b in batches) / world
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters()}
    torch.optim.SGD(reference.parameters(), lr=LR).step()

    model = copy.deepcopy(base)
    options = {"chunk_size": 7, "strict": not case.get("fallback")}
    if case["apply"] == "before":  # "none": the control, torch and transformers alone
        hf.apply(model, **options)
    wrapped = _wrap(model, case)
    if case["apply"] == "after":
        assert hf.apply(wrapped, **options) is wrapped
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = wrapped(**batches[rank])
    fell_back = any("will not reproduce" in str(w.message) for w in caught)
    assert fell_back == bool(case.get("fallback")), [str(w.message) for w in caught]
    out.loss.backward()
    loss = out.loss.detach().clone()
    torch.distributed.all_reduce(loss)
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    optimizer.step()
    after = {n: _full(p.detach()) for n, p in model.named_parameters()}
    ref_after = dict(reference.named_parameters())
    patched = hf.is_patched(wrapped)
    hf.unpatch(wrapped)  # through DDP too
    return {
        "patched": patched,
        "unpatched": not hf.is_patched(wrapped) and "forward" not in model.__dict__,
        "logits_none": out.logits is None,
        "loss": (loss / world).item(),
        "ref_loss": ref_loss.item(),
        "names": sorted(grads) == sorted(ref_grads),
        "grad_diff": {n: (g - ref_grads[n]).abs().max().item() for n, g in grads.items()},
        "grad_scale": max(g.abs().max().item() for g in ref_grads.values()),
        "step_diff": {n: (p - ref_after[n]).abs().max().item() for n, p in after.items()},
    }


def _run_lm_head_loss(rank: int, world: int, case: dict) -> dict:
    """``lm_head_loss`` called outside any forward, with an output embedding sharded by a
    ``fully_shard`` of its own (its call gathers the weight) or by the root's (a DTensor
    sharded on the vocabulary: exact for the same data on every rank, refused otherwise)."""
    from torch.distributed.fsdp import fully_shard

    from crossent.integrations import transformers as hf

    base = _llama(False)
    batches = _batches(case, world)
    reference = copy.deepcopy(base)
    hidden = [reference.model(b["input_ids"]).last_hidden_state.detach() for b in batches]
    pairs = zip(hidden, batches, strict=True)
    ref_loss = sum(hf.lm_head_loss(h, reference.lm_head, b["labels"]) for h, b in pairs)
    (ref_loss / world).backward()
    model = copy.deepcopy(base)
    fully_shard(model if case["owner"] == "root" else model.lm_head)
    sharded_before = type(model.lm_head.weight).__name__
    try:
        loss = hf.lm_head_loss(hidden[rank], model.lm_head, batches[rank]["labels"])
    except ValueError as exc:
        return {"sharded_before": sharded_before, "raised": str(exc)}
    loss.backward()
    grad = _full(model.lm_head.weight.grad)
    return {
        "sharded_before": sharded_before,
        "raised": None,
        "grad_diff": (grad - reference.lm_head.weight.grad).abs().max().item(),
        "grad_scale": reference.lm_head.weight.grad.abs().max().item(),
    }


_RUNNERS = {"step": _run_step, "lm_head_loss": _run_lm_head_loss}


def _run_case(rank: int, world: int, case: dict) -> dict:
    return _RUNNERS[case["kind"]](rank, world, case)


# --------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool():
    made = RankPool(
        WORLD,
        _run_case,
        collective_timeout_s=COLLECTIVE_TIMEOUT_S,
        case_timeout_s=CASE_TIMEOUT_S,
    )
    yield made
    made.close()


def _check_step(results: list[dict], case: dict) -> None:
    for rank, res in enumerate(results):
        where = f"rank {rank}, case {case}"
        assert res["patched"] == (case["apply"] != "none"), where
        assert res["unpatched"], where
        assert res["logits_none"] == (case["apply"] != "none"), where
        assert res["names"], where
        torch.testing.assert_close(res["loss"], res["ref_loss"], **TIGHT, msg=where)
        tol = TIGHT["atol"] + TIGHT["rtol"] * res["grad_scale"]
        for what in ("grad_diff", "step_diff"):
            worst = max(res[what].items(), key=lambda item: item[1])
            assert worst[1] <= tol, f"{what} {worst} > {tol}: {where}"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("apply", ["before", "after", "none"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fully_shard_per_layer_and_root(pool, tied, apply):
    """The patched loss reads the head's weight inside the root's forward (where FSDP has
    gathered it) and its gradient reaches FSDP's reduce-scatter: loss, every gradient and the
    optimizer step equal single-process torch."""
    case = {"kind": "step", "engine": "fsdp", "tied": tied, "apply": apply}
    _check_step(pool.run(case), case)


@pytest.mark.parametrize(
    "options",
    [{"different": False}, {"num_items": True}],
    ids=["same_micro_batch", "num_items_in_batch"],
)
def test_fully_shard_micro_batches(pool, options):
    case = {"kind": "step", "engine": "fsdp", "tied": False, "apply": "before", **options}
    _check_step(pool.run(case), case)


@pytest.mark.parametrize(
    "head_group, fallback",
    [("reshard", False), ("reshard", True), ("keep", False)],
    ids=["linear_loss", "logits_fallback", "not_resharded"],
)
def test_fully_shard_head_in_its_own_group(pool, head_group, fallback):
    """An output embedding wrapped by ``fully_shard`` of its own: its weight is sharded during
    the root's forward, so the loss (or, for a loss that bypasses ``F.cross_entropy`` under
    ``strict=False``, the logits) is computed inside the head's own call; without resharding
    after forward the gathered weight is read directly."""
    case = {"kind": "step", "engine": "fsdp", "tied": False, "apply": "before"}
    case.update(head_group=head_group, fallback=fallback)
    _check_step(pool.run(case), case)


@pytest.mark.parametrize("apply", ["before", "after"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_ddp(pool, tied, apply):
    """DDP: the patched forward runs inside DDP's; ``apply(ddp)`` patches the wrapped model."""
    case = {"kind": "step", "engine": "ddp", "tied": tied, "apply": apply}
    _check_step(pool.run(case), case)


@pytest.mark.parametrize(
    "owner, different",
    [("head", True), ("root", False), ("root", True)],
    ids=["own_group", "root_same_data", "root_rank_local_data"],
)
def test_lm_head_loss_with_a_sharded_head(pool, owner, different):
    case = {"kind": "lm_head_loss", "owner": owner, "different": different}
    for res in pool.run(case):
        assert res["sharded_before"] == "DTensor"
        if owner == "root" and different:
            assert "inside the module's forward" in res["raised"]
            continue
        assert res["raised"] is None
        assert res["grad_diff"] <= TIGHT["atol"] + TIGHT["rtol"] * res["grad_scale"]


def test_example_runs_under_torchrun():
    """The documented command: ``torchrun --nproc-per-node 2 examples/fsdp_finetune.py``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(REPO / "examples" / "fsdp_finetune.py"), "--steps", "6"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 6, proc.stdout
    assert losses[-1] < losses[0], proc.stdout
