"""Tests of the ``crossent`` command (``crossent.cli``).

Most tests call ``main(argv)`` in-process and compare what it prints with torch itself
(``torch.nn.functional``, the oracle), computed here on the same numbers; tolerance 1e-6
absolute + 1e-6 relative unless stated. Two tests run the installed ``crossent`` script and
``python -m crossent`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from crossent.cli import main
from crossent.cli._values import UsageError, is_integral, parse_inline, read_values

TOL = 1e-6
FUNCTIONS = {
    "bce": F.binary_cross_entropy,
    "bce-logits": F.binary_cross_entropy_with_logits,
    "ce": F.cross_entropy,
    "nll": F.nll_loss,
}
SCALAR_LINE = re.compile(r"^(\w+)\(reduction='(\w+)', dtype=(\w+)\) = (\S+)$")
ELEMENT_LINE = re.compile(r"^  \[([\d, ]*)\]  (\S+)$")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert err == ""
    return out


def run_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    def strict(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(run_ok([*argv, "--json"], capsys), parse_constant=strict)


def as_float(value: object) -> np.ndarray:
    """JSON values back to floats ("nan"/"inf" strings included)."""
    return np.asarray(value, dtype=np.float64)


def printed_loss(out: str) -> np.ndarray:
    """The loss from the plain-text output (scalar line, or one line per element)."""
    lines = out.splitlines()
    for line in lines:
        m = SCALAR_LINE.match(line)
        if m:
            return np.asarray(float(m.group(4)))
    header = next(i for i, line in enumerate(lines) if re.match(r"^\w+\(reduction=.*, shape", line))
    shape = tuple(int(s) for s in re.findall(r"\d+", lines[header].split("shape")[1]))
    values = [float(ELEMENT_LINE.match(line).group(2)) for line in lines[header + 1 :]]
    return np.asarray(values).reshape(shape)


def inline(a: np.ndarray) -> str:
    """An array as the CLI's inline syntax, with every float written exactly (repr)."""
    a = np.asarray(a)
    if a.ndim == 1:
        return ",".join(repr(v.item()) for v in a)
    assert a.ndim == 2
    return ";".join(inline(row) for row in a)


def torch_loss(command: str, dtype: torch.dtype, input, target, **kw) -> np.ndarray:
    """The oracle: torch.nn.functional on the same values."""
    x = torch.as_tensor(np.asarray(input, dtype=np.float64)).to(dtype)
    t = torch.as_tensor(np.asarray(target))
    t = t.to(dtype) if t.is_floating_point() else t.long()
    for key in ("weight", "pos_weight"):
        if kw.get(key) is not None:
            kw[key] = torch.as_tensor(np.asarray(kw[key], dtype=np.float64)).to(dtype)
    return FUNCTIONS[command](x, t, **kw).double().numpy()


def close(a: object, b: object, tol: float = TOL) -> bool:
    return bool(np.allclose(as_float(a), as_float(b), rtol=tol, atol=tol, equal_nan=True))


# ---------------------------------------------------------------------------------------------
# Help and version


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["demo"],
        ["loss"],
        ["loss", "bce"],
        ["loss", "bce-logits"],
        ["loss", "ce"],
        ["loss", "nll"],
    ],
    ids=lambda a: " ".join(a) or "crossent",
)
def test_help_every_command_exits_0(argv, capsys):
    code, out, err = run([*argv, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: crossent")
    assert err == ""


def test_loss_help_lists_its_options_only(capsys):
    out = run_ok(["loss", "ce", "--help"], capsys)
    assert "--label-smoothing" in out and "--ignore-index" in out and "--pos-weight" not in out
    out = run_ok(["loss", "bce-logits", "--help"], capsys)
    assert "--pos-weight" in out and "--ignore-index" not in out


def test_version(capsys):
    from crossent import __version__

    assert run_ok(["--version"], capsys).strip() == f"crossent {__version__}"


# ---------------------------------------------------------------------------------------------
# crossent demo


def _demo_row(out: str, label: str) -> list[str]:
    """Cells of the demo table row that starts with ``label`` (columns: 2+ spaces apart)."""
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]
    return next(cells for cells in rows if cells[0] == label)


def test_demo_text(capsys):
    out = run_ok(["demo"], capsys)
    assert "1.2200" in out  # the BCE tutorial's mean
    # The seed values, as torch computes them here on the same float32 numbers; columns are
    # example | crossent | reference | torch | |Δ ref| | |Δ torch|.
    x = torch.tensor([0.3440, 0.7944, 0.8919, 0.3551, 0.9817, 0.8871])
    y = torch.tensor([0.1639, 0.4745, 0.1537, 0.5444, 0.6933, 0.1129])
    logits = torch.tensor([-0.231, 1.423, 0.6642])
    yl = torch.tensor([1.0, 1.0, 0.0])
    ce_logits = torch.tensor(
        [[1.2, -0.5, 0.3, 2.0, -1.1], [0.1, 0.4, -0.2, 0.0, 1.5], [-0.7, 2.2, 0.9, -0.3, 0.6]]
    )
    t = torch.tensor([1, 0, 4])
    p = torch.tensor(
        [[0.1, 0.6, 0.1, 0.1, 0.1], [0.7, 0.1, 0.0, 0.1, 0.1], [0.0, 0.2, 0.0, 0.0, 0.8]]
    )
    expected = {
        "reduction='mean'": F.binary_cross_entropy(x, y),
        "reduction='sum'": F.binary_cross_entropy(x, y, reduction="sum"),
        "BCE(sigmoid(x), y)": F.binary_cross_entropy(logits.sigmoid(), yl),
        "BCE with logits(x, y)": F.binary_cross_entropy_with_logits(logits, yl),
        "class indices": F.cross_entropy(ce_logits, t),
        "indices, ε=0.1": F.cross_entropy(ce_logits, t, label_smoothing=0.1),
        "class probabilities": F.cross_entropy(ce_logits, p),
        "probabilities, ε=0.1": F.cross_entropy(ce_logits, p, label_smoothing=0.1),
    }
    for label, want in expected.items():
        cells = _demo_row(out, label)
        assert len(cells) == 6, cells
        assert close(float(cells[1]), want), label  # crossent
        assert close(float(cells[2]), want), label  # reference
        assert np.float32(cells[3]) == want.numpy(), label  # torch, exact float32 repr
    assert "1.2200" in _demo_row(out, "reduction='mean'")[1]
    nll_line = next(line for line in out.splitlines() if "nll_loss(log_softmax(x), t)" in line)
    values = [float(v) for v in re.findall(r"= (\S+)", nll_line)]
    assert close(values[0], values[1]) and close(values[1], F.cross_entropy(ce_logits, t))
    # Large logits: the naive form prints inf, the stable one the exact 120, 50, 200.
    large = out[out.index("large logits") :]
    lines = large.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["x", "y"])
    rows = [line.split() for line in lines[header + 2 : header + 5]]
    assert [r[0] for r in rows] == ["-120.0", "50.0", "200.0"]
    assert all(r[3] == "inf" for r in rows)  # naive −log
    assert [r[4] for r in rows] == ["100.0"] * 3  # torch's clamp: wrong
    assert [float(r[5]) for r in rows] == [120.0, 50.0, 200.0]  # stable: right
    assert "Right: BCE with logits" in out
    # The classic mistake: crossent's message says what was expected and given.
    mistake = out[out.index("5. A classic mistake") :]
    assert "IndexError" in mistake
    assert "1 class" in mistake and "[0, 1)" in mistake and "holds 1" in mistake


def test_demo_json_matches_torch(capsys):
    data = run_json(["demo"], capsys)
    x = torch.tensor(data["bce"]["input"])
    y = torch.tensor(data["bce"]["target"])
    assert f"{data['bce']['mean']['crossent']:.4f}" == "1.2200"
    for reduction in ("mean", "sum"):
        want = F.binary_cross_entropy(x, y, reduction=reduction).item()
        record = data["bce"][reduction]
        assert close(record["crossent"], want)
        assert close(record["reference"], want)
        assert close(record["torch"], want, tol=0)

    s = data["sigmoid_vs_logits"]
    logits, y = torch.tensor(s["input"]), torch.tensor(s["target"])
    want = F.binary_cross_entropy_with_logits(logits, y).item()
    assert close(s["bce_with_logits"]["crossent"], want)
    assert close(s["sigmoid_then_bce"]["crossent"], F.binary_cross_entropy(logits.sigmoid(), y))

    big = s["large_logits"]
    xb, yb = torch.tensor(big["input"]), torch.tensor(big["target"])
    assert big["naive"] == ["inf", "inf", "inf"] and big["naive_is_finite"] is False
    assert big["stable_is_finite"] is True
    assert close(
        big["bce_with_logits"], F.binary_cross_entropy_with_logits(xb, yb, reduction="none")
    )
    assert close(big["bce_with_logits"], [120.0, 50.0, 200.0])
    assert close(big["bce_of_sigmoid"], [100.0, 100.0, 100.0])  # the clamp's wrong answer

    c = data["cross_entropy"]
    x = torch.tensor(c["input"])
    t = torch.tensor(c["target_indices"])
    p = torch.tensor(c["target_probs"])
    for key, target, eps in [
        ("indices", t, 0.0),
        ("indices_smoothed", t, 0.1),
        ("probabilities", p, 0.0),
        ("probabilities_smoothed", p, 0.1),
    ]:
        want = F.cross_entropy(x, target, label_smoothing=eps).item()
        assert close(c[key]["crossent"], want), key
        assert close(c[key]["reference"], want), key
    nll = data["nll_equals_ce"]
    assert close(nll["nll_of_log_softmax"], nll["cross_entropy"])
    assert close(nll["cross_entropy"], F.cross_entropy(x, t))
    m = data["classic_mistake"]
    assert m["crossent_error"].startswith("IndexError: Target 1 is out of bounds")
    assert "1 class" in m["crossent_error"] and "[0, 1)" in m["crossent_error"]


# ---------------------------------------------------------------------------------------------
# crossent loss: hand-picked cases with every option

X23 = np.array([[0.344, 0.7944, 0.8919], [0.3551, 0.9817, 0.8871]])
Y23 = np.array([[0.1639, 0.4745, 0.1537], [0.5444, 0.6933, 0.1129]])
LOGITS = np.array([[1.2, -0.5, 0.3, 2.0], [0.1, 0.4, -0.2, 0.0], [-0.7, 2.2, 0.9, -0.3]])
PROBS = np.array([[0.1, 0.6, 0.1, 0.2], [0.7, 0.1, 0.0, 0.2], [0.0, 0.2, 0.0, 0.8]])
LOG_PROBS = torch.log_softmax(torch.tensor(LOGITS), 1).numpy()

# (command, CLI options, input, target, torch keyword arguments)
CASES = [
    ("bce", [], X23, Y23, {}),
    ("bce", ["--weight", "1,2,0.5"], X23, Y23, {"weight": [1, 2, 0.5]}),
    ("bce", ["--weight", "2;0.5"], X23, Y23, {"weight": [[2], [0.5]]}),
    ("bce", [], np.array([0.0, 1.0, 0.0, 0.5]), np.array([1.0, 0.0, 0.0, 0.5]), {}),  # clamp
    ("bce-logits", [], LOGITS[:2, :3], Y23, {}),
    ("bce-logits", ["--pos-weight", "2,1,0.5"], LOGITS[:2, :3], Y23, {"pos_weight": [2, 1, 0.5]}),
    (
        "bce-logits",
        ["--pos-weight", "3", "--weight", "0.5;2"],
        np.array([[-120.0, 50.0, 200.0], [0.0, 1.0, -1.0]]),
        np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]),
        {"pos_weight": [3.0], "weight": [[0.5], [2.0]]},
    ),
    ("ce", [], LOGITS, np.array([1, 0, 3]), {}),
    ("ce", ["--weight", "1,2,3,0.5"], LOGITS, np.array([1, 0, 3]), {"weight": [1, 2, 3, 0.5]}),
    ("ce", ["--ignore-index", "0"], LOGITS, np.array([1, 0, 3]), {"ignore_index": 0}),
    (
        "ce",
        ["--label-smoothing", "0.1", "--weight", "1,2,3,0.5", "--ignore-index", "-1"],
        LOGITS,
        np.array([1, -1, 3]),
        {"label_smoothing": 0.1, "weight": [1, 2, 3, 0.5], "ignore_index": -1},
    ),
    ("ce", [], LOGITS, PROBS, {}),  # probability targets (the input's shape)
    (
        "ce",
        ["--label-smoothing", "0.2", "--weight", "1,2,3,0.5"],
        LOGITS,
        PROBS,
        {"label_smoothing": 0.2, "weight": [1, 2, 3, 0.5]},
    ),
    ("ce", [], LOGITS[0], np.array([2]), {}),  # unbatched (C,) input, one class index
    ("nll", [], LOG_PROBS, np.array([1, 0, 3]), {}),
    (
        "nll",
        ["--weight", "1,2,3,0.5", "--ignore-index", "3"],
        LOG_PROBS,
        np.array([1, 0, 3]),
        {"weight": [1, 2, 3, 0.5], "ignore_index": 3},
    ),
]
CASE_IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def _torch_target(command: str, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    if command in ("ce", "nll") and target.shape != x.shape:
        target = target.astype(np.int64)
        return target.reshape(()) if x.ndim == 1 else target
    return target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("command", "options", "x", "target", "kw"), CASES, ids=CASE_IDS)
def test_loss_inline_text_and_json_match_torch(command, options, x, target, kw, reduction, capsys):
    argv = ["loss", command, "--input", inline(x), "--target", inline(target), *options]
    argv += ["--reduction", reduction]
    want = torch_loss(
        command,
        torch.float64,
        x,
        _torch_target(command, x, target),
        **{**kw, "reduction": reduction},
    )
    got = printed_loss(run_ok(argv, capsys))
    assert got.shape == want.shape
    assert close(got, want)
    data = run_json(argv, capsys)
    assert data["reduction"] == reduction and data["dtype"] == "float64"
    assert data["shape"] == list(want.shape)
    assert close(data["loss"], want)
    assert close(data["torch"], want)
    assert close(data["reference"], want)


@pytest.mark.parametrize(("command", "options", "x", "target", "kw"), CASES, ids=CASE_IDS)
def test_loss_float32(command, options, x, target, kw, capsys):
    argv = ["loss", command, "--input", inline(x), "--target", inline(target), *options]
    data = run_json([*argv, "--dtype", "float32"], capsys)
    assert data["dtype"] == "float32"
    want = torch_loss(command, torch.float32, x, _torch_target(command, x, target), **kw)
    assert close(data["loss"], want, tol=1e-5)
    assert close(data["torch"], want, tol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("command", "options", "x", "target", "kw"), CASES, ids=CASE_IDS)
def test_explain_total_equals_loss(command, options, x, target, kw, reduction, capsys):
    argv = ["loss", command, "--input", inline(x), "--target", inline(target), *options]
    argv += ["--reduction", reduction, "--explain"]
    data = run_json(argv, capsys)
    explained = data["explain"]
    assert close(explained["total"], data["loss"])
    assert explained["reduction"]["kind"] == reduction
    per_element = as_float([s["loss"] for s in explained["steps"]])
    if reduction == "sum":
        assert close(per_element.sum(), data["loss"])
    if reduction == "mean":
        r = explained["reduction"]
        assert close(r["sum"] / as_float(r["denominator"]), data["loss"])

    out = run_ok(argv, capsys)
    assert close(printed_loss(out), data["loss"])
    assert "comparison:" in out and "torch" in out and "reference (NumPy f64)" in out
    if reduction != "none":
        # The step-by-step reduction line ends with the explained total.
        line = next(line for line in out.splitlines() if line.startswith("reduction"))
        assert close(float(line.rsplit("=", 1)[1]), data["loss"], tol=1e-8)


def test_explain_shows_the_steps(capsys):
    out = run_ok(
        ["loss", "bce", "--input", "0,0.5", "--target", "1,1", "--explain", "--reduction", "sum"],
        capsys,
    )
    assert "log x" in out and "log(1−x)" in out
    assert "-100*" in out and "clamped at −100" in out  # log 0 clamped, as torch
    assert "reduction 'sum': Σ loss = 100.6931472" in out

    out = run_ok(["loss", "bce-logits", "--input", "-120", "--target", "1", "--explain"], capsys)
    assert "log σ(x)" in out and "min(x, 0) − log1p(e^(−|x|))" in out
    assert close(printed_loss(out), 120.0)

    out = run_ok(
        [
            "loss",
            "ce",
            "--input",
            "1,2,3;1,1,1",
            "--target",
            "2,0",
            "--weight",
            "1,1,3",
            "--explain",
        ],
        capsys,
    )
    assert "lse = m + log Σ exp(x − m)" in out
    assert "weighted mean divides by the sum of the target weights" in out
    assert "/ 4 =" in out  # Σ w[t] = 3 + 1

    out = run_ok(
        ["loss", "nll", "--input", "-1,-2;-3,-0.1", "--target", "0,-100", "--explain"], capsys
    )
    assert "ignore_index → loss 0" in out
    assert close(printed_loss(out), 1.0)


def test_explain_max_rows_truncates_display_not_total(capsys):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    t = rng.integers(0, 3, size=30)
    argv = ["loss", "ce", "--input", inline(x), "--target", inline(t), "--explain"]
    out = run_ok([*argv, "--max-rows", "2"], capsys)
    assert "28 more rows not shown" in out
    assert close(printed_loss(out), F.cross_entropy(torch.tensor(x), torch.tensor(t)))


EXPLAIN_EXAMPLES = {
    "bce": ["--input", "0.3,0.9", "--target", "0,1"],
    "bce-logits": ["--input", "-1,2", "--target", "1,0"],
    "ce": ["--input", "1,2,3;0,1,0", "--target", "2,0"],
    "nll": ["--input", "-1,-2;-3,-0.1", "--target", "0,1"],
}


def test_every_registered_loss_carries_its_explanation(capsys):
    from crossent.cli import _losses
    from crossent.cli._losses import LOSSES, LossSpec

    assert set(LOSSES) == set(EXPLAIN_EXAMPLES) == set(FUNCTIONS)
    kinds = {_losses.SAME_SHAPE, _losses.CLASS_INDICES, _losses.INDICES_OR_PROBS}
    for command, spec in LOSSES.items():
        assert spec.targets in kinds, command
        assert callable(spec.explain), command
        data = run_json(["loss", command, *EXPLAIN_EXAMPLES[command], "--explain"], capsys)
        assert data["explain"]["steps"], command
        assert close(data["explain"]["total"], data["loss"]), command
    # A loss cannot be registered without its explanation.
    with pytest.raises(TypeError, match="explain"):
        LossSpec("focal", "focal_loss", "focal", "x", "y", "w", (), _losses.SAME_SHAPE, "")


def test_explain_raises_for_an_unregistered_loss():
    import dataclasses

    from crossent.cli._explain import explain
    from crossent.cli._losses import LOSSES, Problem

    def problem(spec):
        return Problem(
            spec=spec,
            input=np.log([[0.5, 0.5], [0.25, 0.75]]),
            target=np.array([0, 1]),
            weight=None,
            pos_weight=None,
            ignore_index=-100,
            label_smoothing=0.0,
            reduction="mean",
            dtype=np.dtype(np.float64),
        )

    explained = explain(problem(LOSSES["nll"]))
    assert close(explained.total, -np.log(0.5 * 0.75) / 2)
    # An unknown loss is never explained as another one (as NLL, say): it raises.
    focal = dataclasses.replace(LOSSES["nll"], command="focal", function="focal_loss")
    with pytest.raises(ValueError, match="no explanation for loss 'focal'"):
        explain(problem(focal))


def test_negative_values_need_no_equals_sign(capsys):
    out = run_ok(["loss", "bce-logits", "--input", "-0.231,1.423", "--target", "1,0"], capsys)
    want = F.binary_cross_entropy_with_logits(
        torch.tensor([-0.231, 1.423], dtype=torch.float64), torch.tensor([1.0, 0.0]).double()
    )
    assert close(printed_loss(out), want)


def test_non_finite_results_are_strict_json(capsys):
    # Every target ignored: the mean is 0/0 = nan, in crossent as in torch.
    data = run_json(["loss", "nll", "--input", "-1,-2;-3,-4", "--target", "-100,-100"], capsys)
    assert data["loss"] == "nan" and data["torch"] == "nan"
    out = run_ok(["loss", "nll", "--input", "-1,-2;-3,-4", "--target", "-100,-100"], capsys)
    assert out.strip().endswith("= nan")


# ---------------------------------------------------------------------------------------------
# Files


def test_npy_and_csv_files(tmp_path, capsys):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 4))
    labels = rng.integers(0, 4, size=5)
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "labels.npy", labels)
    np.savetxt(tmp_path / "logits.csv", logits, delimiter=",")
    np.savetxt(tmp_path / "labels.csv", labels, delimiter=",")  # written as floats 1.0e+00
    np.savetxt(tmp_path / "weight.csv", [[1.0, 2.0, 0.5, 1.5]], delimiter=",")
    want = F.cross_entropy(
        torch.tensor(logits),
        torch.tensor(labels),
        weight=torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64),
    ).item()
    for x_file, t_file in [("logits.npy", "labels.npy"), ("logits.csv", "labels.csv")]:
        argv = ["loss", "ce", "--input", str(tmp_path / x_file), "--target", str(tmp_path / t_file)]
        argv += ["--weight", str(tmp_path / "weight.csv")]
        assert close(printed_loss(run_ok(argv, capsys)), want), x_file

    # float32 .npy probabilities for BCE, and a 3-D input (N, C, d) for cross entropy.
    probs = rng.uniform(size=(2, 3)).astype(np.float32)
    target = rng.uniform(size=(2, 3)).astype(np.float32)
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "y.npy", target)
    argv = ["loss", "bce", "--input", str(tmp_path / "p.npy"), "--target", str(tmp_path / "y.npy")]
    data = run_json([*argv, "--dtype", "float32"], capsys)
    assert close(data["loss"], F.binary_cross_entropy(torch.tensor(probs), torch.tensor(target)))

    x3 = rng.normal(size=(2, 3, 4))
    t3 = rng.integers(0, 3, size=(2, 4))
    np.save(tmp_path / "x3.npy", x3)
    np.save(tmp_path / "t3.npy", t3)
    argv = ["loss", "ce", "--input", str(tmp_path / "x3.npy"), "--target", str(tmp_path / "t3.npy")]
    data = run_json([*argv, "--reduction", "none", "--explain"], capsys)
    want = F.cross_entropy(torch.tensor(x3), torch.tensor(t3), reduction="none")
    assert data["shape"] == [2, 4]
    assert close(data["loss"], want)
    assert close(data["explain"]["total"], want)


class _Sentinel:
    """Unpickling this creates a directory: proof that nothing was unpickled if it is absent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_npy_is_refused(tmp_path, capsys):
    sentinel = tmp_path / "unpickled"
    bad = tmp_path / "objects.npy"
    np.save(bad, np.array([_Sentinel(str(sentinel)), 1.0], dtype=object), allow_pickle=True)
    pure_pickle = tmp_path / "pickle.npy"
    pure_pickle.write_bytes(pickle.dumps([_Sentinel(str(sentinel))]))
    code, out, err = run(["loss", "bce", "--input", str(bad), "--target", "1,0"], capsys)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("crossent: error: --input: refusing")
    assert "allow_pickle=False" in err and "dtype object" in err
    assert "unsafely" not in err and ".." not in err  # no hint to unpickle, no double period
    # A pickle is not a .npy file at all: say so (numpy would call it "pickled (object) data").
    code, out, err = run(["loss", "bce", "--input", str(pure_pickle), "--target", "1,0"], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "is not a .npy file" in err
    message = err.replace(repr(str(pure_pickle)), "PATH")  # the tmp path names this test
    assert "pickled" not in message and "unsafely" not in message and ".." not in message
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
# Errors: one line on stderr, no traceback, the right exit status


def _error_cases(tmp_path: Path) -> list[tuple[list[str], int, str]]:
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    (tmp_path / "bad.csv").write_text("0.1,zz\n")
    (tmp_path / "data.txt").write_text("0.1,0.2\n")
    return [
        # usage errors: exit 2
        (["loss", "bce", "--input", "0.3,x", "--target", "1,0"], 2, "cannot read 'x'"),
        (["loss", "bce", "--input", "0.3,,0.5", "--target", "1,0,1"], 2, "empty value"),
        (["loss", "ce", "--input", "1,2;3", "--target", "0,1"], 2, "rows have different lengths"),
        (["loss", "bce", "--input", str(tmp_path / "data.txt"), "--target", "1"], 2, "'.txt'"),
        (["loss", "bce", "--input", str(tmp_path / "no.npy"), "--target", "1"], 2, "no such file"),
        (["loss", "bce", "--input", str(tmp_path / "bad.csv"), "--target", "1"], 2, "bad.csv"),
        (["loss", "bce", "--input", str(tmp_path / "strings.npy"), "--target", "1"], 2, "dtype"),
        (["loss", "bce", "--input", "0.5", "--target", "1", "--reduction", "avg"], 2, "avg"),
        (["loss", "bce", "--input", "0.5"], 2, "--target"),
        (["loss", "ce", "--input", "1,2", "--target", "0", "--ignore-index", "x"], 2, "int"),
        (["loss", "bce", "--input", "0.5", "--target", "1", "--pos-weight", "2"], 2, "pos-weight"),
        (["loss", "kl", "--input", "0.5", "--target", "1"], 2, "invalid choice"),
        (["loss", "bce", "--input", "1e300", "--target", "1", "--dtype", "float32"], 2, "float32"),
        (["loss", "ce", "--input", "1,2", "--target", "0", "--explain", "--max-rows", "-1"], 2, ""),
        ([], 2, "required"),
        # errors raised by the library: exit 1, its message
        (["loss", "bce", "--input", "0.3,0.5", "--target", "1,0,1"], 1, "--target has shape (3,) but --input has shape (2,)"),
        (["loss", "bce", "--input", "1.3,0.5", "--target", "1,0"], 1, "between 0 and 1"),
        (["loss", "bce", "--input", "0.3,0.5", "--target", "1,0", "--weight", "1,2,3"], 1, "(3,)"),
        (["loss", "bce-logits", "--input", "1,2", "--target", "1,0", "--pos-weight", "1,2,3"], 1, ""),
        (["loss", "ce", "--input", "0.2;0.5;-0.1", "--target", "1,1,0"], 1, "1 class"),
        (["loss", "ce", "--input", "1,2;3,4", "--target", "0,2"], 1, "Target 2 is out of bounds"),
        (["loss", "ce", "--input", "1,2;3,4", "--target", "0"], 1, "batch_size"),
        (["loss", "ce", "--input", "1,2;3,4", "--target", "0,1", "--label-smoothing", "1.5"], 1, "1.5"),
        (["loss", "ce", "--input", "1,2;3,4", "--target", "0.5,0.5;1,0", "--ignore-index", "0"], 1, "ignore_index"),
        (["loss", "ce", "--input", "1,2;3,4", "--target", "0,1", "--weight", "1,2,3"], 1, "weight"),
        (["loss", "nll", "--input", "-1,-2;-3,-4", "--target", "0.5,1"], 1, "Long or Byte"),
    ]  # fmt: skip


def test_error_paths(tmp_path, capsys):
    for argv, status, needle in _error_cases(tmp_path):
        code, out, err = run(argv, capsys)
        assert code == status, (argv, err)
        assert out == "", argv
        assert err.startswith("crossent: error: "), argv
        assert err.count("\n") == 1, (argv, err)  # exactly one line
        assert "Traceback" not in err
        assert needle in err, (argv, err)


def _one_line_error(code: int, out: str, err: str, status: int) -> str:
    assert code == status, err
    assert out == ""
    assert err.startswith("crossent: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_ignore_index_beyond_int64_is_a_usage_error(capsys):
    argv = ["loss", "ce", "--input", "1,2;3,4", "--target", "0,1"]
    for value in ("99999999999999999999999", "-9223372036854775809", "9223372036854775808"):
        err = _one_line_error(*run([*argv, "--ignore-index", value], capsys), 2)
        assert "argument --ignore-index" in err and "int64" in err and value in err
    data = run_json([*argv, "--ignore-index", "-9223372036854775808"], capsys)  # int64's min
    assert close(
        data["loss"], F.cross_entropy(torch.tensor([[1.0, 2], [3, 4]]), torch.tensor([0, 1]))
    )


@pytest.mark.parametrize("option", ["--input", "--target", "--weight"])
def test_empty_npy_file_is_one_line(tmp_path, option, capsys):
    (tmp_path / "empty.npy").write_bytes(b"")
    values = {"--input": "0.3,0.7", "--target": "1,0", "--weight": "1,1"}
    values[option] = str(tmp_path / "empty.npy")
    argv = ["loss", "bce", *(x for kv in values.items() for x in kv)]
    err = _one_line_error(*run(argv, capsys), 2)
    assert f"{option}: " in err and "is empty (0 bytes)" in err


def test_truncated_npy_file_is_one_line(tmp_path, capsys):
    np.save(tmp_path / "full.npy", np.arange(100.0))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "full.npy").read_bytes()[:200])
    err = _one_line_error(
        *run(["loss", "bce", "--input", str(tmp_path / "cut.npy"), "--target", "1"], capsys), 2
    )
    assert "cut.npy" in err


def test_non_npy_file_and_directory_are_named_for_what_they_are(tmp_path, capsys):
    (tmp_path / "notes.npy").write_text("0.3,0.7\n")
    err = _one_line_error(
        *run(["loss", "bce", "--input", str(tmp_path / "notes.npy"), "--target", "1,0"], capsys), 2
    )
    assert "is not a .npy file" in err and "pickled" not in err
    for name in ("folder.npy", "folder.csv"):
        (tmp_path / name).mkdir()
        err = _one_line_error(
            *run(["loss", "bce", "--input", str(tmp_path / name), "--target", "1"], capsys), 2
        )
        assert "is a directory" in err and "no such file" not in err


def test_bce_shape_mismatch_names_both_shapes(capsys):
    for command in ("bce", "bce-logits"):
        argv = ["loss", command, "--input", "0.3,0.7;0.2,0.1", "--target", "1,0"]
        err = _one_line_error(*run(argv, capsys), 1)
        assert "--target has shape (2,) but --input has shape (2, 2)" in err
        assert "deprecated" not in err


@pytest.mark.parametrize("target", ["1e20,1", "1,-1e300", "nan,1", "inf,0"])
def test_impossible_class_index_is_named_not_its_dtype(target, capsys):
    argv = ["loss", "ce", "--input", "1,2;3,4", "--target", target]
    err = _one_line_error(*run(argv, capsys), 2)
    assert "is not a class index" in err and "[0, 2)" in err
    assert "dtype" not in err and "Long" not in err
    assert _one_line_error(
        *run(["loss", "nll", "--input", "-1,-2;-3,-4", "--target", target], capsys), 2
    )


@pytest.mark.parametrize(
    "argv, help_of",
    [
        (["loss", "ce", "--input", "1,2", "--target", "0", "--bogus"], "crossent loss ce"),
        (
            ["loss", "bce", "--input", "0.5", "--target", "1", "--ignore-index", "3"],
            "crossent loss bce",
        ),
        (["demo", "--bogus"], "crossent demo"),
        (["demo", "extra"], "crossent demo"),
    ],
)
def test_unknown_option_points_to_its_subcommand_help(argv, help_of, capsys):
    err = _one_line_error(*run(argv, capsys), 2)
    assert "unrecognized arguments" in err
    assert f"(see '{help_of} --help')" in err


def test_bom_csv_is_read(tmp_path, capsys):
    (tmp_path / "x.csv").write_bytes("\ufeff0.3,0.7\n0.2,0.9\n".encode())
    (tmp_path / "y.csv").write_bytes(b"\xef\xbb\xbf1,0\r\n0,1\r\n")
    data = run_json(
        ["loss", "bce", "--input", str(tmp_path / "x.csv"), "--target", str(tmp_path / "y.csv")],
        capsys,
    )
    want = F.binary_cross_entropy(
        torch.tensor([[0.3, 0.7], [0.2, 0.9]]).double(), torch.tensor([[1.0, 0], [0, 1]]).double()
    )
    assert close(data["loss"], want)


@pytest.mark.parametrize("eps", ["-1e400", "-inf", "-0.1", "nan", "-0", "1e-400", "-1e-5"])
def test_label_smoothing_values_that_mean_none(eps, capsys):
    """Negative, NaN and negative-overflowing ε are values (not options) and mean no smoothing,
    as in torch."""
    argv = ["loss", "ce", "--input", "1,2,0.5;3,4,-1", "--target", "0,2", "--label-smoothing", eps]
    data = run_json(argv, capsys)
    x, t = torch.tensor([[1.0, 2, 0.5], [3, 4, -1]], dtype=torch.float64), torch.tensor([0, 2])
    assert close(data["loss"], F.cross_entropy(x, t, label_smoothing=float(eps)))
    assert close(data["loss"], F.cross_entropy(x, t))


def test_label_smoothing_help_says_what_values_do(capsys):
    out = " ".join(run_ok(["loss", "ce", "--help"], capsys).split())
    assert "ε in [0, 1]" not in out
    assert "ε <= 0 and nan mean no smoothing" in out and "ε > 1 is an error" in out


NEGATIVE_ZERO = re.compile(r"(?<![\w.])-0(\.0*)?(?![\d.eE])")


@pytest.mark.parametrize(
    "argv",
    [
        ["loss", "bce", "--input", "0,1,1", "--target", "0,1,1"],
        ["loss", "nll", "--input", "0,0;1,1;-0,2", "--target", "0,1,0"],
        ["loss", "ce", "--input", "0,-1000;5,-1000", "--target", "0,0", "--weight", "1,-0"],
        ["loss", "bce-logits", "--input", "-1000,1000", "--target", "0,1"],
    ],
)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_explain_prints_no_negative_zero(argv, reduction, capsys):
    out = run_ok([*argv, "--explain", "--reduction", reduction], capsys)
    assert not NEGATIVE_ZERO.search(out), [
        line for line in out.splitlines() if NEGATIVE_ZERO.search(line)
    ]


def test_negative_zero_pattern_catches_what_it_should():
    for text in ("loss = -0", "= -0.0", "[-0, 1]", "-0  "):
        assert NEGATIVE_ZERO.search(text), text
    for text in ("-0.5", "-0.0001", "1e-05", "-0e5x", "x-0", "-100", "ε=0.1"):
        assert not NEGATIVE_ZERO.search(text) or text == "-0e5x", text


def test_unexpected_exception_is_one_line(monkeypatch, capsys):
    import crossent.cli._demo as demo

    for exc in (
        OverflowError("int too big to convert"),
        EOFError("No data left in file"),
        KeyError("x"),
    ):

        def boom(exc=exc):
            raise exc

        monkeypatch.setattr(demo, "run_demo", boom)
        err = _one_line_error(*run(["demo"], capsys), 1)
        assert type(exc).__name__ in err


# ---------------------------------------------------------------------------------------------
# The demo's second BCE example and its width


BCE_MODULE_INPUT = [[0.5080, 0.5674, 0.1960, 0.7617, 0.9675],
                    [0.8497, 0.4167, 0.4464, 0.6646, 0.7448],
                    [0.4477, 0.6700, 0.0358, 0.8317, 0.9484]]  # fmt: skip
BCE_MODULE_TARGET = [[0.0821, 0.2900, 0.1864, 0.1480, 0.2935],
                     [0.1719, 0.3426, 0.0729, 0.3616, 0.0510],
                     [0.1284, 0.1542, 0.1338, 0.1779, 0.4057]]  # fmt: skip


def test_demo_bce_module_example(capsys):
    """The tutorial's nn.BCELoss() example on its printed data: torch printed tensor(1.0689)."""
    want = torch.nn.BCELoss()(torch.tensor(BCE_MODULE_INPUT), torch.tensor(BCE_MODULE_TARGET))
    assert f"{want.item():.4f}" == "1.0689"
    out = run_ok(["demo"], capsys)
    cells = _demo_row(out, "nn.BCELoss()")
    assert np.float32(cells[1]) == want.numpy() and np.float32(cells[3]) == want.numpy()
    assert close(float(cells[2]), want)
    assert "x[0] = [0.5080, 0.5674, 0.1960, 0.7617, 0.9675]" in out
    assert "y[2] = [0.1284, 0.1542, 0.1338, 0.1779, 0.4057]" in out
    assert "tensor(1.0689)" in out and "to 4 decimals: 1.0689" in out
    data = run_json(["demo"], capsys)["bce_module"]
    assert data["input"] == BCE_MODULE_INPUT and data["target"] == BCE_MODULE_TARGET
    assert f"{data['mean']['crossent']:.4f}" == "1.0689" == f"{data['tutorial_printed']:.4f}"
    assert close(data["mean"]["torch"], want, tol=0)


def test_demo_lines_fit_100_columns(monkeypatch, capsys):
    import io

    out = run_ok(["demo"], capsys)
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii")  # ASCII spelling: longer words
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["demo"]) == 0
    stream.flush()
    plain = stream.buffer.getvalue().decode("ascii")
    for text in (out, plain):
        wide = [line for line in text.splitlines() if len(line) > 100]
        assert not wide, wide
    assert plain.isascii() and not out.isascii()


# ---------------------------------------------------------------------------------------------
# Random inputs (hypothesis): the CLI's value equals torch's


@st.composite
def _problems(draw):
    command = draw(st.sampled_from(sorted(FUNCTIONS)))
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    rng = np.random.default_rng(seed)
    options, kw = [], {}
    if command == "bce":
        x, t = rng.uniform(size=(n, c)), rng.uniform(size=(n, c))
    elif command == "bce-logits":
        x, t = rng.normal(scale=5, size=(n, c)), rng.uniform(size=(n, c))
        if draw(st.booleans()):
            pw = rng.uniform(0.1, 3, size=c)
            options, kw = ["--pos-weight", inline(pw)], {"pos_weight": pw}
    else:
        x = rng.normal(scale=3, size=(n, c))
        if command == "nll":
            x = torch.log_softmax(torch.tensor(x), 1).numpy()
        t = rng.integers(0, c, size=n)
        if command == "ce" and draw(st.booleans()):
            t = rng.dirichlet(np.ones(c), size=n)  # probability targets
        if command == "ce" and draw(st.booleans()):
            eps = float(draw(st.sampled_from([0.05, 0.1, 0.5])))
            options, kw = ["--label-smoothing", repr(eps)], {"label_smoothing": eps}
    if draw(st.booleans()):
        w = rng.uniform(0.1, 2, size=c)
        options, kw = [*options, "--weight", inline(w)], {**kw, "weight": w}
    return command, x, t, options, kw, reduction


@settings(max_examples=25, deadline=None)
@given(_problems())
def test_random_inputs_match_torch(problem):
    command, x, t, options, kw, reduction = problem
    argv = ["loss", command, "--input", inline(x), "--target", inline(t), *options]
    argv += ["--reduction", reduction, "--json", "--explain"]
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(argv) == 0
    data = json.loads(buffer.getvalue())
    want = torch_loss(command, torch.float64, x, t, **kw, reduction=reduction)
    assert close(data["loss"], want)
    assert close(data["explain"]["total"], want)


# ---------------------------------------------------------------------------------------------
# Value parsing


def test_parse_inline():
    assert parse_inline("1,2,3", "--x").dtype == np.int64
    a = parse_inline(" 0.5, 1e-3 ;-2, inf ", "--x")
    assert a.dtype == np.float64 and a.shape == (2, 2) and a[1, 1] == np.inf
    assert parse_inline("7", "--x").shape == (1,)
    with pytest.raises(UsageError, match="rows have different lengths"):
        parse_inline("1,2;3", "--x")
    with pytest.raises(UsageError, match="cannot read 'a'"):
        parse_inline("1,a", "--x")


def test_read_values_and_is_integral(tmp_path):
    np.savetxt(tmp_path / "one_row.csv", [[0.25, 0.5, 0.75]], delimiter=",")
    assert read_values(str(tmp_path / "one_row.csv"), "--x").shape == (3,)
    assert is_integral(np.array([0.0, 3.0])) and not is_integral(np.array([0.5]))
    assert not is_integral(np.array([np.nan])) and is_integral(np.array([True, False]))


# ---------------------------------------------------------------------------------------------
# The installed entry point and python -m crossent (subprocesses)


def _script() -> str:
    script = Path(sys.executable).parent / "crossent"
    found = str(script) if script.exists() else shutil.which("crossent")
    if found is None:
        pytest.skip("the crossent console script is not installed")
    return found


def test_console_script_subprocess():
    result = subprocess.run(
        [_script(), "loss", "bce", "--input", "0.344,0.7944", "--target", "0.1639,0.4745"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    want = F.binary_cross_entropy(
        torch.tensor([0.344, 0.7944], dtype=torch.float64),
        torch.tensor([0.1639, 0.4745], dtype=torch.float64),
    )
    assert close(json.loads(result.stdout)["loss"], want)

    result = subprocess.run(
        [_script(), "loss", "ce", "--input", "0.2;0.5", "--target", "1,0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("crossent: error: cross_entropy raised IndexError")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_closed_pipe_ends_quietly():
    """``crossent demo | head``: the reader goes away; no message, SIGPIPE's status (141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "crossent", "demo"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 141


@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["loss", "ce", "--help"],
        [
            "loss",
            "ce",
            "--input",
            "1,2;3,4",
            "--target",
            "0,1",
            "--label-smoothing",
            "0.1",
            "--explain",
        ],
        ["loss", "bce-logits", "--input", "1,2", "--target", "1,0", "--explain"],
        ["loss", "ce", "--input", "1,2;3,4", "--target", "0,1", "--weight", "1,2,3"],  # an error
    ],
    ids=["demo", "help", "explain-ce", "explain-bce-logits", "error"],
)
def test_ascii_only_streams(argv):
    """PYTHONIOENCODING=ascii (or a C locale): symbols are spelled out, nothing crashes."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    result = subprocess.run(
        [sys.executable, "-m", "crossent", *argv],
        capture_output=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert b"UnicodeEncodeError" not in result.stderr, result.stderr
    assert result.returncode == (1 if argv[-1] == "1,2,3" else 0), result.stderr
    assert result.stdout.isascii() and result.stderr.isascii()
    text = result.stdout.decode()
    if argv == ["demo"]:
        assert "eps=0.1" in text and "sigmoid(-120)" in text and "1.0689" in text
        assert max(len(line) for line in text.splitlines()) <= 100
    if "--explain" in argv:
        assert "sum" in text or "sigmoid" in text


def test_ascii_only_stream_json_keeps_its_text():
    """--json on an ASCII stream: \\u escapes, the same data as on a UTF-8 stream."""
    runs = [
        subprocess.run(
            [sys.executable, "-m", "crossent", "demo", "--json"],
            capture_output=True,
            timeout=120,
            check=True,
            env={**os.environ, "PYTHONIOENCODING": encoding},
        ).stdout
        for encoding in ("ascii", "utf-8")
    ]
    assert runs[0].isascii() and not runs[1].isascii()
    assert json.loads(runs[0]) == json.loads(runs[1])


def test_python_m_crossent_demo_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "crossent", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "1.2200" in result.stdout and result.stderr == ""
