"""``crossent loss ... --explain``: the per-element computation, step by step, as tutorials show it.

The intermediate quantities (logs, sigmoids, log-softmax, picked log-probabilities, weights) are
computed here with NumPy in float64, from the arrays the loss received, so that a reader can
follow the arithmetic; the stable building blocks (``sigmoid``, ``log_sigmoid``, ``logsumexp``,
``log_softmax``) come from ``crossent.reference``. The explained total is printed next to
crossent's, the reference's and torch's values, and the tests check that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from crossent import reference
from crossent.cli._format import short, table, vector
from crossent.cli._losses import Problem

__all__ = ["Explanation", "explain"]

LOG_CLAMP = -100.0  # torch clamps each log in binary_cross_entropy at -100


@dataclass
class Explanation:
    """The rendered steps plus the same numbers as data (for ``--json``)."""

    lines: list[str] = field(default_factory=list)
    steps: list[dict[str, object]] = field(default_factory=list)
    reduction: dict[str, object] = field(default_factory=dict)
    total: NDArray = field(default_factory=lambda: np.zeros(()))  # float64


def _label(index: tuple[int, ...]) -> str:
    return str(index[0]) if len(index) == 1 else str(tuple(int(i) for i in index))


def _elementwise_reduction(exp: Explanation, loss: NDArray, reduction: str, weighted: bool) -> None:
    """BCE / BCE-with-logits reductions: the mean divides by the element count."""
    total = np.sum(loss)
    if reduction == "none":
        exp.total = loss
        exp.reduction = {"kind": "none", "shape": list(loss.shape)}
        exp.lines.append(
            f"reduction 'none': the loss column above is the result, shape {tuple(loss.shape)}"
        )
    elif reduction == "sum":
        exp.total = np.asarray(total)
        exp.reduction = {"kind": "sum", "sum": total, "value": total}
        exp.lines.append(f"reduction 'sum': Σ loss = {short(total, 10)}")
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / loss.size if loss.size else np.float64("nan")
        exp.total = np.asarray(mean)
        exp.reduction = {
            "kind": "mean",
            "sum": total,
            "denominator": loss.size,
            "denominator_is": "number of elements",
            "value": mean,
        }
        exp.lines.append(
            f"reduction 'mean': Σ loss / number of elements = {short(total, 10)} / {loss.size}"
            f" = {short(mean, 10)}"
        )
        if weighted:
            exp.lines.append(
                "  (weights scale the elements; the mean still divides by the element count)"
            )


def _rows_note(exp: Explanation, shown: int, total: int, what: str) -> None:
    if total > shown:
        exp.lines.append(
            f"  … {total - shown} more {what} not shown (they are in the total; see --max-rows)"
        )


def _explain_bce(p: Problem, max_rows: int) -> Explanation:
    exp = Explanation()
    x = p.input.astype(np.float64)
    y = p.target.astype(np.float64)
    w = None if p.weight is None else np.broadcast_to(p.weight.astype(np.float64), x.shape)
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

    def logcell(raw: float, clamped: float) -> str:
        return f"{short(clamped)}*" if raw < LOG_CLAMP else short(clamped)

    headers = ["i", "x", "y", "log x", "log(1−x)", *(["w"] if w is not None else []), "loss"]
    rows, clamped_any = [], False
    for k, index in enumerate(np.ndindex(x.shape)):
        clamped_any |= bool(log_x_raw[index] < LOG_CLAMP or log_1mx_raw[index] < LOG_CLAMP)
        step = {
            "index": list(index),
            "x": x[index],
            "y": y[index],
            "log_x": log_x[index],
            "log_1mx": log_1mx[index],
            "loss": loss[index],
        }
        if w is not None:
            step["weight"] = w[index]
        exp.steps.append(step)
        if k < max_rows:
            rows.append(
                [
                    _label(index) if index else "-",
                    short(x[index]),
                    short(y[index]),
                    logcell(log_x_raw[index], log_x[index]),
                    logcell(log_1mx_raw[index], log_1mx[index]),
                    *([short(w[index])] if w is not None else []),
                    short(loss[index]),
                ]
            )
    exp.lines += table(headers, rows)
    _rows_note(exp, len(rows), x.size, "elements")
    if clamped_any:
        exp.lines.append(
            "  * clamped at −100 as torch does (log 0 = −inf would give an infinite loss)"
        )
    _elementwise_reduction(exp, loss, p.reduction, w is not None)
    return exp


def _explain_bce_logits(p: Problem, max_rows: int) -> Explanation:
    exp = Explanation()
    x = p.input.astype(np.float64)
    y = p.target.astype(np.float64)
    w = None if p.weight is None else np.broadcast_to(p.weight.astype(np.float64), x.shape)
    pw = None if p.pos_weight is None else np.broadcast_to(p.pos_weight.astype(np.float64), x.shape)
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
    headers = [
        "i",
        "x",
        "y",
        "σ(x)",
        "log σ(x)",
        "log σ(−x)",
        *(["p"] if pw is not None else []),
        *(["w"] if w is not None else []),
        "loss",
    ]
    rows = []
    for k, index in enumerate(np.ndindex(x.shape)):
        step = {
            "index": list(index),
            "x": x[index],
            "y": y[index],
            "sigmoid": sig[index],
            "log_sigmoid": log_sig[index],
            "log_sigmoid_neg": log_sig_neg[index],
            "loss": loss[index],
        }
        if pw is not None:
            step["pos_weight"] = pw[index]
        if w is not None:
            step["weight"] = w[index]
        exp.steps.append(step)
        if k < max_rows:
            rows.append(
                [
                    _label(index) if index else "-",
                    short(x[index]),
                    short(y[index]),
                    short(sig[index]),
                    short(log_sig[index]),
                    short(log_sig_neg[index]),
                    *([short(pw[index])] if pw is not None else []),
                    *([short(w[index])] if w is not None else []),
                    short(loss[index]),
                ]
            )
    exp.lines += table(headers, rows)
    _rows_note(exp, len(rows), x.size, "elements")
    _elementwise_reduction(exp, loss, p.reduction, w is not None or pw is not None)
    return exp


def _as_rows(values: NDArray) -> tuple[NDArray, tuple[int, ...]]:
    """``(C,)`` → one row; ``(N, C, d1..)`` → ``(N·d1.., C)`` rows and the loss shape."""
    if values.ndim == 1:
        return values.reshape(1, -1), ()
    loss_shape = (values.shape[0], *values.shape[2:])
    return np.moveaxis(values, 1, -1).reshape(-1, values.shape[1]), loss_shape


def _row_label(r: int, loss_shape: tuple[int, ...]) -> str:
    if not loss_shape:
        return "(unbatched)"
    return _label(tuple(int(i) for i in np.unravel_index(r, loss_shape)))


def _index_reduction(
    exp: Explanation,
    loss: NDArray,
    loss_shape: tuple[int, ...],
    target_weight: NDArray,
    reduction: str,
    weighted: bool,
    ignored: int,
) -> None:
    """NLL / index cross entropy: the mean divides by the summed weights of the kept targets."""
    total = np.sum(loss)
    if reduction == "none":
        exp.total = loss.reshape(loss_shape)
        exp.reduction = {"kind": "none", "shape": list(loss_shape)}
        exp.lines.append(
            f"reduction 'none': the per-row losses above are the result, shape {tuple(loss_shape)}"
        )
        return
    if reduction == "sum":
        exp.total = np.asarray(total)
        exp.reduction = {"kind": "sum", "sum": total, "value": total}
        exp.lines.append(f"reduction 'sum': Σ loss = {short(total, 10)}")
        return
    denominator = np.sum(target_weight)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / denominator
    exp.total = np.asarray(mean)
    meaning = (
        "sum of the target weights w[t_i] over non-ignored rows"
        if weighted
        else "number of non-ignored rows"
    )
    exp.reduction = {
        "kind": "mean",
        "sum": total,
        "denominator": denominator,
        "denominator_is": meaning,
        "value": mean,
    }
    exp.lines.append(
        f"reduction 'mean': Σ loss / Σ w[t_i] over the non-ignored rows = {short(total, 10)} / "
        f"{short(denominator, 10)} = {short(mean, 10)}"
    )
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


def _explain_ce_index(p: Problem, max_rows: int) -> Explanation:
    exp = Explanation()
    rows, loss_shape = _as_rows(p.input.astype(np.float64))  # (M, C)
    n_rows, n_classes = rows.shape
    target = p.target.reshape(-1).astype(np.int64)  # (M,)
    class_weight = (
        np.ones(n_classes) if p.weight is None else p.weight.astype(np.float64).reshape(-1)
    )
    eps = p.label_smoothing if p.label_smoothing > 0 else 0.0
    keep = target != p.ignore_index
    safe_target = np.where(keep, target, 0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        row_max = np.max(rows, axis=1, initial=-np.inf)
        lse = reference.logsumexp(rows, axis=1)
        log_probs = reference.log_softmax(rows, axis=1)
        picked = log_probs[np.arange(n_rows), safe_target] if n_classes else np.zeros(n_rows)
        target_weight = np.where(keep, class_weight[safe_target] if n_classes else 0.0, 0.0)
        nll = np.where(keep, -target_weight * picked, 0.0)
        smooth = np.where(keep, -np.sum(class_weight * log_probs, axis=1), 0.0)
        eps_c = np.float64(eps) / n_classes  # ε/C (inf for C = 0, as in torch)
        loss = (1 - eps) * nll + eps_c * smooth if eps else nll
    exp.lines.append(
        f"cross entropy with class indices, row by row (NumPy float64; C = {n_classes} classes):"
    )
    exp.lines.append("  log-softmax_c = x_c − lse,  lse = m + log Σ_c exp(x_c − m),  m = max_c x_c")
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
            "target": int(target[r]),
            "ignored": not bool(keep[r]),
            "max": row_max[r],
            "logsumexp": lse[r],
        }
        if keep[r]:
            step.update(
                log_softmax_target=picked[r], weight=target_weight[r], nll=nll[r], loss=loss[r]
            )
            if eps:
                step["smooth"] = smooth[r]
        else:
            step["loss"] = 0.0
        exp.steps.append(step)
        if r >= max_rows:
            continue
        t = int(target[r])
        head = f"row {_row_label(r, loss_shape)}: logits {vector(rows[r])}, target {t}"
        if not keep[r]:
            exp.lines.append(f"{head} = ignore_index → loss 0, left out of the mean's denominator")
            continue
        exp.lines.append(head)
        exp.lines.append(
            f"    max m = {short(row_max[r])};  lse = m + log Σ exp(x − m) = {short(lse[r])}"
        )
        exp.lines.append(
            f"    log-softmax[{t}] = x[{t}] − lse = {short(rows[r, t])} − {short(lse[r])}"
            f" = {short(picked[r])}"
        )
        exp.lines.append(
            f"    weight w[{t}] = {short(target_weight[r])};  nll = −w[{t}]·log-softmax[{t}]"
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
    _rows_note(exp, min(n_rows, max_rows), n_rows, "rows")
    _index_reduction(
        exp,
        loss,
        loss_shape,
        target_weight,
        p.reduction,
        p.weight is not None,
        int(np.sum(~keep)),
    )
    return exp


def _explain_ce_probs(p: Problem, max_rows: int) -> Explanation:
    exp = Explanation()
    rows, loss_shape = _as_rows(p.input.astype(np.float64))  # (M, C)
    probs, _ = _as_rows(p.target.astype(np.float64))  # (M, C)
    n_rows, n_classes = rows.shape
    class_weight = (
        np.ones(n_classes) if p.weight is None else p.weight.astype(np.float64).reshape(-1)
    )
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
    exp.lines.append("  log-softmax_c = x_c − lse,  lse = m + log Σ_c exp(x_c − m),  m = max_c x_c")
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
        exp.lines.append(
            f"    max m = {short(row_max[r])};  lse = m + log Σ exp(x − m) = {short(lse[r])}"
        )
        exp.lines.append(f"    log-softmax = {vector(log_probs[r])}")
        exp.lines.append(f"    target y = {vector(probs[r])}")
        if eps:
            exp.lines.append(f"    smoothed y' = {vector(smoothed[r])}")
        if p.weight is not None:
            exp.lines.append(f"    weight w = {vector(class_weight)}")
        exp.lines.append(f"    loss = −Σ_c {w_txt}{y_name}_c·log-softmax_c = {short(loss[r])}")
    _rows_note(exp, min(n_rows, max_rows), n_rows, "rows")
    total = np.sum(loss)
    if p.reduction == "none":
        exp.total = loss.reshape(loss_shape)
        exp.reduction = {"kind": "none", "shape": list(loss_shape)}
        exp.lines.append(
            f"reduction 'none': the per-row losses above are the result, shape {tuple(loss_shape)}"
        )
    elif p.reduction == "sum":
        exp.total = np.asarray(total)
        exp.reduction = {"kind": "sum", "sum": total, "value": total}
        exp.lines.append(f"reduction 'sum': Σ loss = {short(total, 10)}")
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / n_rows if n_rows else np.float64("nan")
        exp.total = np.asarray(mean)
        exp.reduction = {
            "kind": "mean",
            "sum": total,
            "denominator": n_rows,
            "denominator_is": "number of rows (N·d1···dk)",
            "value": mean,
        }
        exp.lines.append(
            f"reduction 'mean': Σ loss / number of rows = {short(total, 10)} / {n_rows}"
            f" = {short(mean, 10)}"
        )
        if p.weight is not None:
            exp.lines.append(
                "  (probability targets: the mean divides by the number of rows even with a "
                "class weight; class-index targets would divide by Σ w[t])"
            )
    return exp


def _explain_nll(p: Problem, max_rows: int) -> Explanation:
    exp = Explanation()
    rows, loss_shape = _as_rows(p.input.astype(np.float64))  # (M, C) log-probabilities
    n_rows, n_classes = rows.shape
    target = p.target.reshape(-1).astype(np.int64)
    class_weight = (
        np.ones(n_classes) if p.weight is None else p.weight.astype(np.float64).reshape(-1)
    )
    keep = target != p.ignore_index
    safe_target = np.where(keep, target, 0)
    with np.errstate(invalid="ignore", over="ignore"):
        picked = rows[np.arange(n_rows), safe_target] if n_classes else np.zeros(n_rows)
        target_weight = np.where(keep, class_weight[safe_target] if n_classes else 0.0, 0.0)
        loss = np.where(keep, -target_weight * picked, 0.0)
    exp.lines.append(f"negative log likelihood, row by row (NumPy float64; C = {n_classes}):")
    exp.lines.append("  the input holds log-probabilities x; loss = −w[t]·x[t]")
    for r in range(n_rows):
        t = int(target[r])
        step: dict[str, object] = {
            "row": _row_label(r, loss_shape),
            "log_probs": rows[r],
            "target": t,
            "ignored": not bool(keep[r]),
            "loss": loss[r],
        }
        if keep[r]:
            step.update(picked=picked[r], weight=target_weight[r])
        exp.steps.append(step)
        if r >= max_rows:
            continue
        head = f"row {_row_label(r, loss_shape)}: log-probs {vector(rows[r])}, target {t}"
        if not keep[r]:
            exp.lines.append(f"{head} = ignore_index → loss 0, left out of the mean's denominator")
            continue
        exp.lines.append(
            f"{head}: x[{t}] = {short(picked[r])}, w[{t}] = {short(target_weight[r])}, "
            f"loss = −w[{t}]·x[{t}] = {short(loss[r])}"
        )
    _rows_note(exp, min(n_rows, max_rows), n_rows, "rows")
    _index_reduction(
        exp,
        loss,
        loss_shape,
        target_weight,
        p.reduction,
        p.weight is not None,
        int(np.sum(~keep)),
    )
    return exp


def explain(problem: Problem, max_rows: int = 20) -> Explanation:
    """Step-by-step computation of ``problem``'s loss.

    Call it after crossent accepted the arguments: it trusts their shapes and class indices.

    Args:
        problem: the loss and its arrays.
        max_rows: how many elements (BCE) or rows (CE, NLL) to print; all are in the total.

    Returns:
        The explanation; ``total`` is the explained loss (0-d, or the loss's shape for
        ``reduction='none'``).
    """
    command = problem.spec.command
    if command == "bce":
        return _explain_bce(problem, max_rows)
    if command == "bce-logits":
        return _explain_bce_logits(problem, max_rows)
    if command == "ce":
        if problem.probability_targets:
            return _explain_ce_probs(problem, max_rows)
        return _explain_ce_index(problem, max_rows)
    return _explain_nll(problem, max_rows)
