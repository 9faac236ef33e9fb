"""The four losses as the CLI runs them: arguments in, crossent / reference / torch values out.

crossent (``crossent.functional``) is the value the CLI reports; the NumPy float64 reference
(``crossent.reference``) and torch itself are run next to it for comparison.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from crossent.cli._explain import Explanation, explain_bce, explain_bce_logits
from crossent.cli._explain_classes import explain_cross_entropy, explain_nll
from crossent.cli._values import UsageError, is_integral, read_values

__all__ = ["LOSSES", "LossError", "LossSpec", "Outcome", "Problem", "build_problem"]

# Exceptions the library raises for bad arguments (torch's types).
LIBRARY_ERRORS = (ValueError, RuntimeError, IndexError, TypeError, NotImplementedError)


class LossError(Exception):
    """The library rejected the arguments (its message says why): exit status 1."""


# What a loss's target holds (LossSpec.targets), which decides how the CLI reads it.
SAME_SHAPE = "same shape"  # one target per input element (BCE): the input's shape
CLASS_INDICES = "class indices"  # whole numbers, the input's shape without the class dim
INDICES_OR_PROBS = "class indices or probabilities"  # probabilities iff the input's shape


@dataclass(frozen=True)
class LossSpec:
    """One ``crossent loss`` subcommand.

    A loss is registered here with everything the CLI needs of it: its help texts, options,
    how to read its target, an example for ``--help`` and its step-by-step explanation (a spec
    cannot be built without one: ``explain`` has no default).
    """

    command: str  # subcommand name, e.g. "bce-logits"
    function: str  # name in crossent.functional / torch.nn.functional / crossent.reference
    title: str
    input_help: str
    target_help: str
    weight_help: str
    options: tuple[str, ...]  # the extra keyword arguments it takes
    targets: str  # SAME_SHAPE, CLASS_INDICES or INDICES_OR_PROBS
    example: str  # options for the examples in --help
    explain: Callable[[Problem, int], Explanation]  # --explain: (problem, max_rows) -> steps


LOSSES: dict[str, LossSpec] = {
    spec.command: spec
    for spec in (
        LossSpec(
            "bce",
            "binary_cross_entropy",
            "binary cross entropy on probabilities",
            "probabilities in [0, 1], any shape",
            "targets in [0, 1], the input's shape",
            "rescaling weight that broadcasts (right-aligned) to the input's shape",
            (),
            SAME_SHAPE,
            "--input 0.344,0.7944,0.8919 --target 0.1639,0.4745,0.1537",
            explain_bce,
        ),
        LossSpec(
            "bce-logits",
            "binary_cross_entropy_with_logits",
            "binary cross entropy on logits (stable log-sigmoid form)",
            "logits (any real numbers), any shape",
            "targets (probabilities), the input's shape",
            "rescaling weight that broadcasts (right-aligned) to the input's shape",
            ("pos_weight",),
            SAME_SHAPE,
            "--input -0.231,1.423,0.6642 --target 1,1,0 --pos-weight 2",
            explain_bce_logits,
        ),
        LossSpec(
            "ce",
            "cross_entropy",
            "cross entropy on logits (log-softmax + negative log likelihood)",
            "logits of shape (C,), (N, C) or (N, C, d1, ...); classes along dimension 1",
            "class indices of shape (), (N,) or (N, d1, ...) (whole numbers), or class "
            "probabilities of the input's shape",
            "class weight of shape (C,)",
            ("ignore_index", "label_smoothing"),
            INDICES_OR_PROBS,
            "--input '1.2,-0.5,0.3;0.1,0.4,-0.2' --target 1,0 --label-smoothing 0.1",
            explain_cross_entropy,
        ),
        LossSpec(
            "nll",
            "nll_loss",
            "negative log likelihood of class indices under log-probabilities",
            "log-probabilities of shape (C,), (N, C) or (N, C, d1, ...)",
            "class indices of shape (), (N,) or (N, d1, ...) (whole numbers)",
            "class weight of shape (C,)",
            ("ignore_index",),
            CLASS_INDICES,
            "--input '-0.5,-1.2,-2.3;-1.6,-0.4,-1.9' --target 0,1",
            explain_nll,
        ),
    )
}


@dataclass
class Problem:
    """Validated-by-the-CLI inputs of one loss call (NumPy arrays in the chosen dtype)."""

    spec: LossSpec
    input: NDArray
    target: NDArray
    weight: NDArray | None
    pos_weight: NDArray | None
    ignore_index: int
    label_smoothing: float
    reduction: str
    dtype: np.dtype

    @property
    def probability_targets(self) -> bool:
        """Cross entropy reads a target of the input's shape as class probabilities."""
        return self.spec.targets == INDICES_OR_PROBS and self.target.shape == self.input.shape

    def kwargs(self, convert: Callable[[NDArray], object]) -> dict[str, object]:
        """Keyword arguments after ``(input, target)``, with arrays passed through ``convert``."""
        kw: dict[str, object] = {
            "weight": None if self.weight is None else convert(self.weight),
            "reduction": self.reduction,
        }
        if "pos_weight" in self.spec.options:
            kw["pos_weight"] = None if self.pos_weight is None else convert(self.pos_weight)
        if "ignore_index" in self.spec.options:
            kw["ignore_index"] = self.ignore_index
        if "label_smoothing" in self.spec.options:
            kw["label_smoothing"] = self.label_smoothing
        return kw

    def call_torch_style(self, module: object) -> torch.Tensor:
        """Call ``module.<function>`` (crossent.functional or torch.nn.functional)."""

        def to_tensor(a: NDArray) -> torch.Tensor:
            # A private copy: nothing the loss does can reach the caller's arrays.
            return torch.from_numpy(np.array(a, copy=True))

        fn = getattr(module, self.spec.function)
        with torch.no_grad():
            return fn(to_tensor(self.input), to_tensor(self.target), **self.kwargs(to_tensor))


@dataclass
class Outcome:
    """A comparison implementation's result: a float64 value, or the error it raised."""

    value: NDArray | None
    error: str | None = None


def _cast_float(values: NDArray, dtype: np.dtype, option: str) -> NDArray:
    if values.dtype.kind == "f" and np.dtype(dtype).itemsize < values.dtype.itemsize:
        finite = np.isfinite(values)
        if np.any(np.abs(values[finite]) > np.finfo(dtype).max):
            raise UsageError(
                f"{option}: a value overflows {np.dtype(dtype).name} (largest "
                f"{np.finfo(dtype).max:.4g}); use --dtype float64"
            )
    return values.astype(dtype)


def _check_class_indices(target: NDArray, input_shape: tuple[int, ...]) -> None:
    """A target that must hold class indices holds no whole number too large to be one.

    Such a number (``1e20``) is read as a float, and the loss would then blame the target's
    dtype; name the value instead. Fractional values are left to the loss's own message.
    """
    if target.dtype.kind != "f":
        return
    whole = np.isfinite(target) & (target == np.round(target))
    huge = whole & (np.abs(target) >= 2**53)
    bad = target[huge | np.isinf(target) | np.isnan(target)]
    if bad.size:
        classes = input_shape[1] if len(input_shape) > 1 else (input_shape or (0,))[0]
        raise UsageError(
            f"--target: {bad[0]:g} is not a class index: class indices are whole numbers in "
            f"[0, {classes}) for input of shape {input_shape}"
        )


def build_problem(spec: LossSpec, args: argparse.Namespace) -> Problem:
    """Read the option values and cast them the way the loss expects.

    The input, weights and floating targets take ``--dtype``. For ``ce`` and ``nll``, whole-
    number targets become int64 class indices, except that ``ce`` reads a target of the input's
    shape as class probabilities (torch's rule). Other targets stay floating, and the library
    rejects them with its own message.

    Raises:
        UsageError: unreadable values (see :func:`crossent.cli._values.read_values`), or a
            class-index target holding a number no class index can be (``1e20``, ``nan``).
        LossError: a BCE target whose shape is not the input's.
    """
    dtype = np.dtype(args.dtype)
    raw_input = read_values(args.input, "--input")
    raw_target = read_values(args.target, "--target")
    input = _cast_float(raw_input, dtype, "--input")
    same_shape = raw_target.shape == raw_input.shape
    if spec.targets == SAME_SHAPE and not same_shape:
        raise LossError(
            f"{spec.function}: --target has shape {raw_target.shape} but --input has shape "
            f"{raw_input.shape}; the target must have the input's shape"
        )
    if spec.targets == CLASS_INDICES or (spec.targets == INDICES_OR_PROBS and not same_shape):
        _check_class_indices(raw_target, raw_input.shape)
        if is_integral(raw_target):
            target = raw_target.astype(np.int64)
            if input.ndim == 1 and target.shape == (1,):
                target = target.reshape(())  # one class index for unbatched (C,) input
        else:
            target = _cast_float(raw_target, dtype, "--target")
    else:
        target = _cast_float(raw_target, dtype, "--target")
    weight = None
    if args.weight is not None:
        weight = _cast_float(read_values(args.weight, "--weight"), dtype, "--weight")
    pos_weight = None
    if getattr(args, "pos_weight", None) is not None:
        pos_weight = _cast_float(
            read_values(args.pos_weight, "--pos-weight"), dtype, "--pos-weight"
        )
    return Problem(
        spec=spec,
        input=input,
        target=target,
        weight=weight,
        pos_weight=pos_weight,
        ignore_index=getattr(args, "ignore_index", -100),
        label_smoothing=getattr(args, "label_smoothing", 0.0),
        reduction=args.reduction,
        dtype=dtype,
    )


def one_line(exc: BaseException) -> str:
    """``TypeName: message`` on a single line."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}"


def run_crossent(problem: Problem) -> torch.Tensor:
    """The loss from ``crossent.functional``.

    Raises:
        LossError: the library rejected the arguments; the message is the library's.
    """
    import crossent.functional

    try:
        return problem.call_torch_style(crossent.functional)
    except LIBRARY_ERRORS as exc:
        raise LossError(f"{problem.spec.function} raised {one_line(exc)}") from None


def run_torch(problem: Problem) -> Outcome:
    """The loss from ``torch.nn.functional`` (float64 copy of the result, or the error)."""
    import torch.nn.functional as F

    try:
        out = problem.call_torch_style(F)
    except LIBRARY_ERRORS as exc:
        return Outcome(None, one_line(exc))
    return Outcome(out.double().numpy())


def run_reference(problem: Problem) -> Outcome:
    """The loss from the NumPy float64 reference (``crossent.reference``)."""
    from crossent import reference

    fn = getattr(reference, problem.spec.function)
    try:
        out = fn(problem.input, problem.target, **problem.kwargs(lambda a: a))
    except LIBRARY_ERRORS as exc:
        return Outcome(None, one_line(exc))
    return Outcome(np.asarray(out, dtype=np.float64))


def max_abs_diff(a: NDArray, b: NDArray | None) -> float | None:
    """``max |a - b|`` over all elements, treating equal non-finite values as equal.

    ``None`` when ``b`` is missing or the shapes differ; NaN when one side is NaN and the other
    is not.
    """
    if b is None or np.shape(a) != np.shape(b):
        return None
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return 0.0
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        diff = np.where(same, 0.0, np.abs(a - b))
    return float(np.max(diff))
