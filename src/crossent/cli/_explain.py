"""``crossent loss ... --explain``: the per-element computation, step by step, as tutorials show it.

The intermediate quantities (logs, sigmoids, log-softmax, picked log-probabilities, weights) are
computed here with NumPy in float64, from the arrays the loss received, so that a reader can
follow the arithmetic; the stable building blocks (``sigmoid``, ``log_sigmoid``, ``logsumexp``,
``log_softmax``) come from ``crossent.reference``. The explained total is printed next to
crossent's, the reference's and torch's values, and the tests check that they agree.

Each loss of the CLI's registry (``crossent.cli._losses.LOSSES``) names its explanation
(``LossSpec.explain``), one of the ``explain_*`` functions below; :func:`explain` runs it and
raises for a loss that is not registered. This module holds what every explanation shares
(:class:`Explanation`, the reduction step) and the element-wise losses (BCE, BCE with logits:
one table row per element, the mean divides by the element count); the class losses (cross
entropy, NLL: one block per row of C classes) are in ``crossent.cli._explain_classes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numpy.typing import NDArray

from crossent import reference
from crossent.cli._format import short, table

if TYPE_CHECKING:  # the registry in _losses imports the explanations below
    from crossent.cli._losses import Problem

__all__ = [
    "Explanation",
    "explain",
    "explain_bce",
    "explain_bce_logits",
    "index_label",
    "reduce_steps",
    "rows_note",
]

LOG_CLAMP = -100.0  # torch clamps each log in binary_cross_entropy at -100


@dataclass
class Explanation:
    """The rendered steps plus the same numbers as data (for ``--json``)."""

    lines: list[str] = field(default_factory=list)
    steps: list[dict[str, object]] = field(default_factory=list)
    reduction: dict[str, object] = field(default_factory=dict)
    total: NDArray = field(default_factory=lambda: np.zeros(()))  # float64


def explain(problem: Problem, max_rows: int = 20) -> Explanation:
    """Step-by-step computation of ``problem``'s loss, by the explanation its loss registers.

    Call it after crossent accepted the arguments: it trusts their shapes and class indices.

    Args:
        problem: the loss and its arrays.
        max_rows: how many elements (BCE) or rows (CE, NLL) to print; all are in the total.

    Returns:
        The explanation; ``total`` is the explained loss (0-d, or the loss's shape for
        ``reduction='none'``).

    Raises:
        ValueError: ``problem``'s loss is not in the CLI's registry, so it has no explanation.
    """
    from crossent.cli._losses import LOSSES

    spec = LOSSES.get(problem.spec.command)
    if spec is not problem.spec:
        raise ValueError(
            f"no explanation for loss {problem.spec.command!r}: the explained losses are the "
            f"registered ones ({', '.join(LOSSES)}); register a LossSpec with its explanation "
            "in crossent.cli._losses.LOSSES"
        )
    return spec.explain(problem, max_rows)


# ---------------------------------------------------------------------------------------------
# Shared by every explanation: labels, the "rows not shown" note, the reduction


def index_label(index: tuple[int, ...]) -> str:
    """An element's or row's index as printed: ``3`` in one dimension, ``(1, 2)`` in more."""
    return str(index[0]) if len(index) == 1 else str(tuple(int(i) for i in index))


def rows_note(exp: Explanation, shown: int, total: int, what: str) -> None:
    """Say how many elements or rows ``--max-rows`` left out of the printout (not the total)."""
    if total > shown:
        exp.lines.append(
            f"  … {total - shown} more {what} not shown (they are in the total; see --max-rows)"
        )


def reduce_steps(
    exp: Explanation,
    loss: NDArray,
    reduction: str,
    none_text: str,
    mean_text: str,
    denominator: int | np.floating,
    denominator_is: str,
) -> None:
    """'none' keeps ``loss``, 'sum' is Σ loss, 'mean' is Σ loss / ``denominator`` (0 / 0 = nan)."""
    total = np.sum(loss)
    if reduction == "none":
        exp.total = loss
        exp.reduction = {"kind": "none", "shape": list(loss.shape)}
        exp.lines.append(f"reduction 'none': {none_text}, shape {tuple(loss.shape)}")
        return
    if reduction == "sum":
        exp.total = np.asarray(total)
        exp.reduction = {"kind": "sum", "sum": total, "value": total}
        exp.lines.append(f"reduction 'sum': Σ loss = {short(total, 10)}")
        return
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / denominator
    exp.total = np.asarray(mean)
    exp.reduction = {
        "kind": "mean",
        "sum": total,
        "denominator": denominator,
        "denominator_is": denominator_is,
        "value": mean,
    }
    shown = denominator if isinstance(denominator, int) else short(denominator, 10)
    exp.lines.append(
        f"reduction 'mean': {mean_text} = {short(total, 10)} / {shown} = {short(mean, 10)}"
    )


# ---------------------------------------------------------------------------------------------
# Element-wise losses: BCE, BCE with logits


class _Column(NamedTuple):
    """One quantity of an element-wise table: its header, its JSON key, its values."""

    header: str
    key: str
    values: NDArray  # the input's shape
    cell: Callable[[tuple[int, ...]], str] | None = None  # the table text; default short(value)

    def text(self, index: tuple[int, ...]) -> str:
        return short(self.values[index]) if self.cell is None else self.cell(index)


def _element_table(
    exp: Explanation,
    loss: NDArray,
    columns: Sequence[_Column],
    weights: Sequence[_Column],
    max_rows: int,
) -> None:
    """One JSON step per element and, for the first ``max_rows``, one table row.

    ``columns`` are the computation in order; ``weights`` the optional weights that were given.
    The table shows the weights before the loss, the JSON steps after it.
    """
    headers = ["i", *(c.header for c in columns), *(c.header for c in weights), "loss"]
    rows = []
    for k, index in enumerate(np.ndindex(loss.shape)):
        step: dict[str, object] = {"index": list(index)}
        step.update((c.key, c.values[index]) for c in columns)
        step["loss"] = loss[index]
        step.update((c.key, c.values[index]) for c in weights)
        exp.steps.append(step)
        if k < max_rows:
            cells = [c.text(index) for c in (*columns, *weights)]
            rows.append([index_label(index) if index else "-", *cells, short(loss[index])])
    exp.lines += table(headers, rows)
    rows_note(exp, len(rows), loss.size, "elements")


def _elementwise_reduction(exp: Explanation, loss: NDArray, reduction: str, weighted: bool) -> None:
    """BCE / BCE-with-logits reductions: the mean divides by the element count."""
    reduce_steps(
        exp,
        loss,
        reduction,
        "the loss column above is the result",
        "Σ loss / number of elements",
        loss.size,
        "number of elements",
    )
    if reduction == "mean" and weighted:
        exp.lines.append(
            "  (weights scale the elements; the mean still divides by the element count)"
        )


def _broadcast(values: NDArray | None, shape: tuple[int, ...]) -> NDArray | None:
    """A weight as float64 in the input's shape (``None`` stays ``None``)."""
    return None if values is None else np.broadcast_to(values.astype(np.float64), shape)


def explain_bce(p: Problem, max_rows: int) -> Explanation:
    """Binary cross entropy on probabilities, element by element, with torch's −100 clamp."""
    exp = Explanation()
    x = p.input.astype(np.float64)
    y = p.target.astype(np.float64)
    w = _broadcast(p.weight, x.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_x_raw = np.log(x)
        # log1p(-x) is log(1 - x) without the rounding of 1 - x for small x.
        log_1mx_raw = np.log1p(-x)
        log_x = np.maximum(log_x_raw, LOG_CLAMP)
        log_1mx = np.maximum(log_1mx_raw, LOG_CLAMP)
        loss = -(y * log_x + (1 - y) * log_1mx)
        if w is not None:
            loss = loss * w
    exp.lines.append("binary cross entropy, element by element (NumPy float64):")
    exp.lines.append(
        "  loss = −w·[y·max(log x, −100) + (1 − y)·max(log(1 − x), −100)]"
        if w is not None
        else "  loss = −[y·max(log x, −100) + (1 − y)·max(log(1 − x), −100)]"
    )

    def clamp_marked(raw: NDArray, clamped: NDArray) -> Callable[[tuple[int, ...]], str]:
        return lambda i: f"{short(clamped[i])}*" if raw[i] < LOG_CLAMP else short(clamped[i])

    columns = [
        _Column("x", "x", x),
        _Column("y", "y", y),
        _Column("log x", "log_x", log_x, clamp_marked(log_x_raw, log_x)),
        _Column("log(1−x)", "log_1mx", log_1mx, clamp_marked(log_1mx_raw, log_1mx)),
    ]
    weights = [] if w is None else [_Column("w", "weight", w)]
    _element_table(exp, loss, columns, weights, max_rows)
    if np.any((log_x_raw < LOG_CLAMP) | (log_1mx_raw < LOG_CLAMP)):
        exp.lines.append(
            "  * clamped at −100 as torch does (log 0 = −inf would give an infinite loss)"
        )
    _elementwise_reduction(exp, loss, p.reduction, w is not None)
    return exp


def explain_bce_logits(p: Problem, max_rows: int) -> Explanation:
    """Binary cross entropy on logits, element by element, in the stable log-sigmoid form."""
    exp = Explanation()
    x = p.input.astype(np.float64)
    y = p.target.astype(np.float64)
    w = _broadcast(p.weight, x.shape)
    pw = _broadcast(p.pos_weight, x.shape)
    sig = reference.sigmoid(x)
    log_sig = reference.log_sigmoid(x)  # log σ(x)
    log_sig_neg = reference.log_sigmoid(-x)  # log(1 − σ(x)) = log σ(−x)
    with np.errstate(invalid="ignore", over="ignore"):
        pos = y * log_sig if pw is None else pw * y * log_sig
        loss = -(pos + (1 - y) * log_sig_neg)
        if w is not None:
            loss = loss * w
    exp.lines.append("binary cross entropy with logits, element by element (NumPy float64):")
    exp.lines.append(
        "  log σ(x) = min(x, 0) − log1p(e^(−|x|))  (stable: never forms σ(x), which rounds to "
        "exactly 0 or 1 for large |x|)"
    )
    exp.lines.append("  log(1 − σ(x)) = log σ(−x)")
    p_txt = "p·" if pw is not None else ""
    w_txt = "w·" if w is not None else ""
    exp.lines.append(f"  loss = −{w_txt}[{p_txt}y·log σ(x) + (1 − y)·log σ(−x)]")
    columns = [
        _Column("x", "x", x),
        _Column("y", "y", y),
        _Column("σ(x)", "sigmoid", sig),
        _Column("log σ(x)", "log_sigmoid", log_sig),
        _Column("log σ(−x)", "log_sigmoid_neg", log_sig_neg),
    ]
    weights = [_Column("p", "pos_weight", pw)] if pw is not None else []
    weights += [_Column("w", "weight", w)] if w is not None else []
    _element_table(exp, loss, columns, weights, max_rows)
    _elementwise_reduction(exp, loss, p.reduction, w is not None or pw is not None)
    return exp
