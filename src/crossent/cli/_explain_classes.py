"""``--explain`` for the class losses: cross entropy (class indices or probabilities) and NLL.

One block per row of C classes (the class axis moved last, the other axes flattened): the
log-softmax, the picked target entry and its weight, label smoothing; then the reduction with
the loss's own denominator (Σ w[t] over kept rows for class indices, the row count for
probabilities). Shared pieces are in ``crossent.cli._explain``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from crossent import reference
from crossent.cli._explain import Explanation, index_label, reduce_steps, rows_note
from crossent.cli._format import short, vector

if TYPE_CHECKING:
    from crossent.cli._losses import Problem

__all__ = ["explain_cross_entropy", "explain_nll"]


def _as_rows(values: NDArray) -> tuple[NDArray, tuple[int, ...]]:
    """``(C,)`` → one row; ``(N, C, d1..)`` → ``(N·d1.., C)`` rows and the loss shape."""
    if values.ndim == 1:
        return values.reshape(1, -1), ()
    loss_shape = (values.shape[0], *values.shape[2:])
    return np.moveaxis(values, 1, -1).reshape(-1, values.shape[1]), loss_shape


def _row_label(r: int, loss_shape: tuple[int, ...]) -> str:
    if not loss_shape:
        return "(unbatched)"
    return index_label(tuple(int(i) for i in np.unravel_index(r, loss_shape)))


def _class_weight(p: Problem, n_classes: int) -> NDArray:
    """``(C,)`` float64: the given class weight, or ones."""
    return np.ones(n_classes) if p.weight is None else p.weight.astype(np.float64).reshape(-1)


@dataclass
class _Targets:
    """Class-index targets in row form and what each row picks (ignored rows pick 0)."""

    target: NDArray  # (M,) int64
    keep: NDArray  # (M,) bool: target != ignore_index
    class_weight: NDArray  # (C,)
    picked: NDArray  # (M,): the row's log-probability at its target
    target_weight: NDArray  # (M,): w[t], 0 where ignored


def _pick_targets(p: Problem, log_probs: NDArray) -> _Targets:
    n_rows, n_classes = log_probs.shape
    target = p.target.reshape(-1).astype(np.int64)
    class_weight = _class_weight(p, n_classes)
    keep = target != p.ignore_index
    safe_target = np.where(keep, target, 0)
    picked = log_probs[np.arange(n_rows), safe_target] if n_classes else np.zeros(n_rows)
    target_weight = np.where(keep, class_weight[safe_target] if n_classes else 0.0, 0.0)
    return _Targets(target, keep, class_weight, picked, target_weight)


def _index_reduction(
    exp: Explanation, loss: NDArray, loss_shape: tuple[int, ...], t: _Targets, p: Problem
) -> None:
    """NLL / index cross entropy: the mean divides by the summed weights of the kept targets."""
    weighted = p.weight is not None
    denominator = np.sum(t.target_weight)
    reduce_steps(
        exp,
        loss.reshape(loss_shape),
        p.reduction,
        "the per-row losses above are the result",
        "Σ loss / Σ w[t_i] over the non-ignored rows",
        denominator,
        "sum of the target weights w[t_i] over non-ignored rows"
        if weighted
        else "number of non-ignored rows",
    )
    if p.reduction != "mean":
        return
    ignored = int(np.sum(~t.keep))
    if weighted:
        exp.lines.append(
            "  (a weighted mean divides by the sum of the target weights, not by the number of "
            "rows)"
        )
    else:
        exp.lines.append(
            "  (no weight: every w[t] is 1, so the denominator is the number of non-ignored rows"
            + (f"; {ignored} ignored)" if ignored else ")")
        )
    if ignored and not denominator:
        exp.lines.append("  (every row is ignored: 0 / 0 = nan, as in torch)")


def _softmax_header(exp: Explanation) -> None:
    exp.lines.append("  log-softmax_c = x_c − lse,  lse = m + log Σ_c exp(x_c − m),  m = max_c x_c")


def _softmax_line(exp: Explanation, row_max: float, lse: float) -> None:
    exp.lines.append(f"    max m = {short(row_max)};  lse = m + log Σ exp(x − m) = {short(lse)}")


def _ignored_line(exp: Explanation, head: str) -> None:
    exp.lines.append(f"{head} = ignore_index → loss 0, left out of the mean's denominator")


def explain_cross_entropy(p: Problem, max_rows: int) -> Explanation:
    """Cross entropy row by row; a target of the input's shape holds class probabilities."""
    if p.probability_targets:
        return _explain_ce_probs(p, max_rows)
    return _explain_ce_index(p, max_rows)


def _explain_ce_index(p: Problem, max_rows: int) -> Explanation:
    exp = Explanation()
    rows, loss_shape = _as_rows(p.input.astype(np.float64))  # (M, C)
    n_rows, n_classes = rows.shape
    eps = p.label_smoothing if p.label_smoothing > 0 else 0.0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        row_max = np.max(rows, axis=1, initial=-np.inf)
        lse = reference.logsumexp(rows, axis=1)
        log_probs = reference.log_softmax(rows, axis=1)
        t = _pick_targets(p, log_probs)
        nll = np.where(t.keep, -t.target_weight * t.picked, 0.0)
        smooth = np.where(t.keep, -np.sum(t.class_weight * log_probs, axis=1), 0.0)
        eps_c = np.float64(eps) / n_classes  # ε/C (inf for C = 0, as in torch)
        loss = (1 - eps) * nll + eps_c * smooth if eps else nll
    exp.lines.append(
        f"cross entropy with class indices, row by row (NumPy float64; C = {n_classes} classes):"
    )
    _softmax_header(exp)
    exp.lines.append("  nll = −w[t]·log-softmax[t]")
    if eps:
        exp.lines.append(
            f"  label smoothing ε = {eps}: smooth = −Σ_c w_c·log-softmax_c, "
            "loss = (1 − ε)·nll + (ε/C)·smooth"
        )
    for r in range(n_rows):
        step: dict[str, object] = {
            "row": _row_label(r, loss_shape),
            "logits": rows[r],
            "target": int(t.target[r]),
            "ignored": not bool(t.keep[r]),
            "max": row_max[r],
            "logsumexp": lse[r],
        }
        if t.keep[r]:
            step.update(
                log_softmax_target=t.picked[r], weight=t.target_weight[r], nll=nll[r], loss=loss[r]
            )
            if eps:
                step["smooth"] = smooth[r]
        else:
            step["loss"] = 0.0
        exp.steps.append(step)
        if r >= max_rows:
            continue
        k = int(t.target[r])
        head = f"row {_row_label(r, loss_shape)}: logits {vector(rows[r])}, target {k}"
        if not t.keep[r]:
            _ignored_line(exp, head)
            continue
        exp.lines.append(head)
        _softmax_line(exp, row_max[r], lse[r])
        exp.lines.append(
            f"    log-softmax[{k}] = x[{k}] − lse = {short(rows[r, k])} − {short(lse[r])}"
            f" = {short(t.picked[r])}"
        )
        exp.lines.append(
            f"    weight w[{k}] = {short(t.target_weight[r])};  nll = −w[{k}]·log-softmax[{k}]"
            f" = {short(nll[r])}"
        )
        if eps:
            exp.lines.append(
                f"    smooth = −Σ_c w_c·log-softmax_c = {short(smooth[r])};  loss = "
                f"{short(1 - eps)}·{short(nll[r])} + {short(eps_c)}·{short(smooth[r])}"
                f" = {short(loss[r])}"
            )
        else:
            exp.lines.append(f"    loss = {short(loss[r])}")
    rows_note(exp, min(n_rows, max_rows), n_rows, "rows")
    _index_reduction(exp, loss, loss_shape, t, p)
    return exp


def _explain_ce_probs(p: Problem, max_rows: int) -> Explanation:
    exp = Explanation()
    rows, loss_shape = _as_rows(p.input.astype(np.float64))  # (M, C)
    probs, _ = _as_rows(p.target.astype(np.float64))  # (M, C)
    n_rows, n_classes = rows.shape
    class_weight = _class_weight(p, n_classes)
    eps = p.label_smoothing if p.label_smoothing > 0 else 0.0
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        row_max = np.max(rows, axis=1, initial=-np.inf)
        lse = reference.logsumexp(rows, axis=1)
        log_probs = reference.log_softmax(rows, axis=1)
        smoothed = probs * (1 - eps) + np.float64(eps) / n_classes if eps else probs
        loss = -np.sum(class_weight * smoothed * log_probs, axis=1)
    exp.lines.append(
        f"cross entropy with class probabilities, row by row (NumPy float64; C = {n_classes}):"
    )
    _softmax_header(exp)
    if eps:
        exp.lines.append(f"  label smoothing ε = {eps}: y' = (1 − ε)·y + ε/C")
    y_name = "y'" if eps else "y"
    w_txt = "w_c·" if p.weight is not None else ""
    exp.lines.append(f"  loss = −Σ_c {w_txt}{y_name}_c·log-softmax_c")
    for r in range(n_rows):
        exp.steps.append(
            {
                "row": _row_label(r, loss_shape),
                "logits": rows[r],
                "target": probs[r],
                "smoothed_target": smoothed[r],
                "max": row_max[r],
                "logsumexp": lse[r],
                "log_softmax": log_probs[r],
                "loss": loss[r],
            }
        )
        if r >= max_rows:
            continue
        exp.lines.append(f"row {_row_label(r, loss_shape)}: logits {vector(rows[r])}")
        _softmax_line(exp, row_max[r], lse[r])
        exp.lines.append(f"    log-softmax = {vector(log_probs[r])}")
        exp.lines.append(f"    target y = {vector(probs[r])}")
        if eps:
            exp.lines.append(f"    smoothed y' = {vector(smoothed[r])}")
        if p.weight is not None:
            exp.lines.append(f"    weight w = {vector(class_weight)}")
        exp.lines.append(f"    loss = −Σ_c {w_txt}{y_name}_c·log-softmax_c = {short(loss[r])}")
    rows_note(exp, min(n_rows, max_rows), n_rows, "rows")
    reduce_steps(
        exp,
        loss.reshape(loss_shape),
        p.reduction,
        "the per-row losses above are the result",
        "Σ loss / number of rows",
        n_rows,
        "number of rows (N·d1···dk)",
    )
    if p.reduction == "mean" and p.weight is not None:
        exp.lines.append(
            "  (probability targets: the mean divides by the number of rows even with a "
            "class weight; class-index targets would divide by Σ w[t])"
        )
    return exp


def explain_nll(p: Problem, max_rows: int) -> Explanation:
    """Negative log likelihood row by row: the input already holds log-probabilities."""
    exp = Explanation()
    rows, loss_shape = _as_rows(p.input.astype(np.float64))  # (M, C) log-probabilities
    n_rows, n_classes = rows.shape
    with np.errstate(invalid="ignore", over="ignore"):
        t = _pick_targets(p, rows)
        loss = np.where(t.keep, -t.target_weight * t.picked, 0.0)
    exp.lines.append(f"negative log likelihood, row by row (NumPy float64; C = {n_classes}):")
    exp.lines.append("  the input holds log-probabilities x; loss = −w[t]·x[t]")
    for r in range(n_rows):
        k = int(t.target[r])
        step: dict[str, object] = {
            "row": _row_label(r, loss_shape),
            "log_probs": rows[r],
            "target": k,
            "ignored": not bool(t.keep[r]),
            "loss": loss[r],
        }
        if t.keep[r]:
            step.update(picked=t.picked[r], weight=t.target_weight[r])
        exp.steps.append(step)
        if r >= max_rows:
            continue
        head = f"row {_row_label(r, loss_shape)}: log-probs {vector(rows[r])}, target {k}"
        if not t.keep[r]:
            _ignored_line(exp, head)
            continue
        exp.lines.append(
            f"{head}: x[{k}] = {short(t.picked[r])}, w[{k}] = {short(t.target_weight[r])}, "
            f"loss = −w[{k}]·x[{k}] = {short(loss[r])}"
        )
    rows_note(exp, min(n_rows, max_rows), n_rows, "rows")
    _index_reduction(exp, loss, loss_shape, t, p)
    return exp
