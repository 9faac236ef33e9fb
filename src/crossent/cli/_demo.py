"""``crossent demo``: the seed examples, crossent next to the NumPy reference and torch.

All inputs are float32, torch's default dtype, as in the tutorials these examples come from;
the reference computes in float64 from the same float32 numbers. No line is wider than
``LINE_WIDTH`` (100) columns, in the ASCII spelling too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray

import crossent.functional as cf
import crossent.nn as cnn
from crossent import reference
from crossent.cli._format import exact, paragraph, table, vector
from crossent.cli._losses import LIBRARY_ERRORS, max_abs_diff, one_line

__all__ = ["DemoReport", "run_demo"]

# 1. The BCE tutorial's probabilities and targets (its answer: 1.2200).
BCE_PROBS = [0.3440, 0.7944, 0.8919, 0.3551, 0.9817, 0.8871]
BCE_TARGETS = [0.1639, 0.4745, 0.1537, 0.5444, 0.6933, 0.1129]
# 1b. The same tutorial's nn.BCELoss() example: input = torch.rand(3, 5), target =
# torch.randn(3, 5).softmax(dim=1), as it printed them (4 decimals); it prints tensor(1.0689).
BCE_MODULE_INPUT = [
    [0.5080, 0.5674, 0.1960, 0.7617, 0.9675],
    [0.8497, 0.4167, 0.4464, 0.6646, 0.7448],
    [0.4477, 0.6700, 0.0358, 0.8317, 0.9484],
]
BCE_MODULE_TARGET = [
    [0.0821, 0.2900, 0.1864, 0.1480, 0.2935],
    [0.1719, 0.3426, 0.0729, 0.3616, 0.0510],
    [0.1284, 0.1542, 0.1338, 0.1779, 0.4057],
]
BCE_MODULE_PRINTED = "1.0689"
# 2. Logits for sigmoid + BCE vs BCE with logits, and logits large enough to break the former.
LOGITS = [-0.231, 1.423, 0.6642]
LOGIT_TARGETS = [1.0, 1.0, 0.0]
LARGE_LOGITS = [-120.0, 50.0, 200.0]
LARGE_TARGETS = [1.0, 0.0, 0.0]
# 3. Cross entropy: 3 samples, 5 classes.
CE_LOGITS = [
    [1.2, -0.5, 0.3, 2.0, -1.1],
    [0.1, 0.4, -0.2, 0.0, 1.5],
    [-0.7, 2.2, 0.9, -0.3, 0.6],
]
CE_TARGETS = [1, 0, 4]
CE_PROBS = [
    [0.1, 0.6, 0.1, 0.1, 0.1],
    [0.7, 0.1, 0.0, 0.1, 0.1],
    [0.0, 0.2, 0.0, 0.0, 0.8],
]
LABEL_SMOOTHING = 0.1
# 5. The classic mistake: one output per sample fed to cross entropy with labels 0/1.
MISTAKE_LOGITS = [[0.8], [-0.3], [1.1]]
MISTAKE_TARGETS = [1, 1, 0]

_HEADERS = ["example", "crossent", "reference (NumPy f64)", "torch", "|Δ ref|", "|Δ torch|"]
_INDENT = "   "  # a section's body, under its numbered title


@dataclass
class DemoReport:
    """The demo as text lines and as JSON-able data."""

    lines: list[str] = field(default_factory=list)
    data: dict[str, object] = field(default_factory=dict)


def _f32(values: object) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _f64(t: torch.Tensor) -> NDArray:
    """The float32 numbers as float64 (the reference's input)."""
    return t.double().numpy()


def _numpy(t: torch.Tensor) -> NDArray:
    """The reference's copy of ``t``: float64 for floating values, class indices as they are."""
    return _f64(t) if t.is_floating_point() else t.numpy()


def _four_decimals(row: list[float]) -> str:
    """A row as the tutorial printed it: ``[0.5080, 0.5674, ...]``."""
    return "[" + ", ".join(f"{v:.4f}" for v in row) + "]"


def _compare(label: str, ours: torch.Tensor, ref: NDArray, theirs: torch.Tensor) -> tuple:
    """One table row and its JSON record."""
    ours_np, theirs_np = ours.numpy(), theirs.numpy()
    d_ref = max_abs_diff(ours_np, ref)
    d_torch = max_abs_diff(ours_np, theirs_np)
    row = [
        label,
        exact(ours_np, ours_np.dtype),
        exact(ref),
        exact(theirs_np, theirs_np.dtype),
        f"{d_ref:.1e}",
        f"{d_torch:.1e}",
    ]
    record = {
        "crossent": ours_np,
        "reference": ref,
        "torch": theirs_np,
        "abs_diff_reference": d_ref,
        "abs_diff_torch": d_torch,
    }
    return row, record


def _side_by_side(
    label: str, function: str, x: torch.Tensor, y: torch.Tensor, **kw: object
) -> tuple:
    """``function`` from crossent, the reference and torch on the same values: row and record."""
    return _compare(
        label,
        getattr(cf, function)(x, y, **kw),
        getattr(reference, function)(_numpy(x), _numpy(y), **kw),
        getattr(F, function)(x, y, **kw),
    )


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return table(headers, rows, indent=_INDENT)


def _paragraph(text: str, hanging: str | None = None) -> list[str]:
    return paragraph(text, indent=_INDENT, hanging=hanging)


def _section(report: DemoReport, key: str, lines: list[str], data: dict[str, object]) -> None:
    """One section of the demo: its lines, then a blank line; its data under ``key``."""
    report.lines += [*lines, ""]
    report.data[key] = data


def _bce_section(report: DemoReport) -> None:
    x, y = _f32(BCE_PROBS), _f32(BCE_TARGETS)
    rows, data = [], {"input": BCE_PROBS, "target": BCE_TARGETS}
    for reduction in ("mean", "sum"):
        row, record = _side_by_side(
            f"reduction={reduction!r}", "binary_cross_entropy", x, y, reduction=reduction
        )
        rows.append(row)
        data[reduction] = record
    _section(
        report,
        "bce",
        [
            "1. Binary cross entropy on probabilities",
            f"   x = {BCE_PROBS}",
            f"   y = {BCE_TARGETS}",
            *_table(_HEADERS, rows),
        ],
        data,
    )

    # The module form on a (3, 5) batch: crossent.nn.BCELoss subclasses torch.nn.BCELoss.
    x, y = _f32(BCE_MODULE_INPUT), _f32(BCE_MODULE_TARGET)
    ours = cnn.BCELoss()(x, y)
    row, record = _compare(
        "nn.BCELoss()",
        ours,
        reference.binary_cross_entropy(_f64(x), _f64(y)),
        torch.nn.BCELoss()(x, y),
    )
    rounded = f"{ours.item():.4f}"
    lines = [
        "   nn.BCELoss() on x = torch.rand(3, 5), y = torch.randn(3, 5).softmax(dim=1)",
        *(f"   x[{i}] = {_four_decimals(r)}" for i, r in enumerate(BCE_MODULE_INPUT)),
        *(f"   y[{i}] = {_four_decimals(r)}" for i, r in enumerate(BCE_MODULE_TARGET)),
        *_table(_HEADERS, [row]),
        *_paragraph(
            f"the tutorial prints tensor({BCE_MODULE_PRINTED}); crossent, to 4 decimals: {rounded}"
        ),
    ]
    printed = float(BCE_MODULE_PRINTED)
    data = {"input": BCE_MODULE_INPUT, "target": BCE_MODULE_TARGET, "mean": record}
    _section(report, "bce_module", lines, {**data, "tutorial_printed": printed})


def _sigmoid_section(report: DemoReport) -> None:
    x, y = _f32(LOGITS), _f32(LOGIT_TARGETS)
    row_a, rec_a = _compare(
        "BCE(sigmoid(x), y)",
        cf.binary_cross_entropy(torch.sigmoid(x), y),
        reference.binary_cross_entropy(reference.sigmoid(_f64(x)), _f64(y)),
        F.binary_cross_entropy(torch.sigmoid(x), y),
    )
    row_b, rec_b = _side_by_side("BCE with logits(x, y)", "binary_cross_entropy_with_logits", x, y)

    # Large logits, float32: sigmoid rounds to exactly 0 or 1.
    big, big_y = _f32(LARGE_LOGITS), _f32(LARGE_TARGETS)
    sig = torch.sigmoid(big)
    s, t = sig.numpy(), big_y.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        naive = -(t * np.log(s) + (1 - t) * np.log(1 - s))  # float32, no clamp
    clamped = cf.binary_cross_entropy(sig, big_y, reduction="none").numpy()  # torch's -100 clamp
    stable = cf.binary_cross_entropy_with_logits(big, big_y, reduction="none").numpy()
    stable_torch = F.binary_cross_entropy_with_logits(big, big_y, reduction="none").numpy()
    exact_f64 = reference.binary_cross_entropy_with_logits(_f64(big), _f64(big_y), reduction="none")
    headers = ["x", "y", "σ(x) f32", "naive", "BCE(σ(x))", "with logits", "torch", "exact f64"]
    rows = [
        [
            exact(big[i].item(), np.float32),
            exact(t[i], np.float32),
            exact(s[i], np.float32),
            exact(naive[i], np.float32),
            exact(clamped[i], np.float32),
            exact(stable[i], np.float32),
            exact(stable_torch[i], np.float32),
            exact(exact_f64[i]),
        ]
        for i in range(len(LARGE_LOGITS))
    ]
    means = [naive.mean(), clamped.mean(), stable.mean(), stable_torch.mean()]
    rows.append(["mean", "", "", *(exact(m, np.float32) for m in means), exact(exact_f64.mean())])
    verdict = (
        "Right: BCE with logits. In float32 σ(−120) rounds to 0 and σ(50), σ(200) to 1, so "
        "sigmoid-then-log takes log(0) = −inf: the naive form gives inf and torch's −100 clamp "
        "gives 100 instead of 120, 50, 200; the stable log σ(x) = min(x, 0) − log1p(e^(−|x|)) "
        "never forms σ(x)."
    )
    lines = [
        "2. Sigmoid + BCE vs BCE with logits",
        f"   x = {LOGITS} (logits), y = {LOGIT_TARGETS}",
        *_table(_HEADERS, [row_a, row_b]),
        "",
        f"   large logits (float32): x = {LARGE_LOGITS}, y = {LARGE_TARGETS}, reduction='none'",
        *_paragraph(
            "naive: −[y·log σ(x) + (1 − y)·log(1 − σ(x))] in float32; BCE(σ(x)): torch's BCE, "
            "each log clamped at −100; with logits: BCE with logits, crossent and torch"
        ),
        *_table(headers, rows),
        *_paragraph(verdict),
    ]
    data = {
        "input": LOGITS,
        "target": LOGIT_TARGETS,
        "sigmoid_then_bce": rec_a,
        "bce_with_logits": rec_b,
        "large_logits": {
            "input": LARGE_LOGITS,
            "target": LARGE_TARGETS,
            "dtype": "float32",
            "sigmoid": s,
            "naive": naive,
            "bce_of_sigmoid": clamped,
            "bce_with_logits": stable,
            "torch_bce_with_logits": stable_torch,
            "exact": exact_f64,
            "naive_is_finite": bool(np.all(np.isfinite(naive))),
            "stable_is_finite": bool(np.all(np.isfinite(stable))),
            "verdict": verdict,
        },
    }
    _section(report, "sigmoid_vs_logits", lines, data)


def _ce_section(report: DemoReport) -> None:
    x = _f32(CE_LOGITS)
    t_idx = torch.tensor(CE_TARGETS, dtype=torch.int64)
    t_prob = _f32(CE_PROBS)
    cases = [
        ("indices", "class indices", t_idx, 0.0),
        ("indices_smoothed", f"indices, ε={LABEL_SMOOTHING}", t_idx, 0.1),
        ("probabilities", "class probabilities", t_prob, 0.0),
        ("probabilities_smoothed", f"probabilities, ε={LABEL_SMOOTHING}", t_prob, 0.1),
    ]
    rows, data = [], {"input": CE_LOGITS, "target_indices": CE_TARGETS, "target_probs": CE_PROBS}
    for key, label, target, eps in cases:
        row, record = _side_by_side(label, "cross_entropy", x, target, label_smoothing=eps)
        rows.append(row)
        data[key] = record
    lines = [
        "3. Cross entropy (reduction='mean'), logits x of shape (3, 5)",
        *(f"   x[{i}] = {vector(np.array(r))}" for i, r in enumerate(CE_LOGITS)),
        f"   t = {CE_TARGETS} (class indices)",
        *(f"   p[{i}] = {vector(np.array(r))} (probabilities)" for i, r in enumerate(CE_PROBS)),
        *_table(_HEADERS, rows),
    ]
    _section(report, "cross_entropy", lines, data)

    # 4. NLL on log-softmax outputs is cross entropy.
    t = torch.tensor(CE_TARGETS)
    nll = cf.nll_loss(torch.log_softmax(x, dim=1), t)
    ce = cf.cross_entropy(x, t)
    diff = abs(nll.item() - ce.item())
    lines = [
        "4. NLL on log-softmax outputs equals cross entropy",
        f"   nll_loss(log_softmax(x), t) = {exact(nll.numpy(), np.float32)}   "
        f"cross_entropy(x, t) = {exact(ce.numpy(), np.float32)}   |diff| = {diff:.1e}",
    ]
    data = {"nll_of_log_softmax": nll.numpy(), "cross_entropy": ce.numpy(), "abs_diff": diff}
    _section(report, "nll_equals_ce", lines, data)


def _mistake_section(report: DemoReport) -> None:
    x = _f32(MISTAKE_LOGITS)  # (3, 1): one output per sample
    t = torch.tensor(MISTAKE_TARGETS)
    messages = {}
    for name, fn in (("crossent", cf.cross_entropy), ("torch", F.cross_entropy)):
        try:
            fn(x, t)
        except LIBRARY_ERRORS as exc:
            messages[name] = one_line(exc)
        else:  # pragma: no cover - both libraries reject this input
            messages[name] = "(no error)"
    fix = (
        "one output per sample is a binary problem: use binary_cross_entropy_with_logits("
        "x.squeeze(1), t.float()), or give cross_entropy two columns, one per class"
    )
    report.lines += [
        "5. A classic mistake: cross_entropy on input of shape (3, 1) with targets [1, 1, 0]",
        *_paragraph(f"crossent: {messages['crossent']}", hanging=" " * 13),
        *_paragraph(f"torch:    {messages['torch']}", hanging=" " * 13),
        *_paragraph(f"fix: {fix}", hanging=" " * 8),
    ]
    report.data["classic_mistake"] = {
        "input": MISTAKE_LOGITS,
        "target": MISTAKE_TARGETS,
        "crossent_error": messages["crossent"],
        "torch_error": messages["torch"],
        "fix": fix,
    }


def run_demo() -> DemoReport:
    """Compute every demo example.

    Returns:
        The text report and the same values as data.
    """
    report = DemoReport()
    report.lines += [
        f"crossent demo: crossent vs the NumPy float64 reference vs torch {torch.__version__} "
        "(float32 inputs)",
        "",
    ]
    _bce_section(report)
    _sigmoid_section(report)
    _ce_section(report)
    _mistake_section(report)
    return report
