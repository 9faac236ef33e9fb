"""Bad input: crossent raises the exception type torch raises, with torch's words first (so
code matching torch's messages keeps working) and then what was expected and what was given.
Nothing is mutated on error."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossent
import crossent.functional as C
import crossent.nn as CN

f32 = torch.float32
x34 = lambda: torch.rand(3, 4)  # noqa: E731
logits = lambda *s: torch.randn(*s)  # noqa: E731
idx = lambda *v: torch.tensor(v)  # noqa: E731

# (id, function name, args, kwargs, regex that crossent's message must match)
CASES = [
    # --- reduction and legacy arguments
    ("bad reduction ce", "cross_entropy", (logits(3, 4), idx(0, 1, 2)), dict(reduction="avg"), r"avg is not a valid value for reduction.*'none', 'mean' or 'sum'"),
    ("bad reduction bce", "binary_cross_entropy", (x34(), x34()), dict(reduction="avg"), r"avg is not a valid value"),
    ("bad reduction bcel", "binary_cross_entropy_with_logits", (x34(), x34()), dict(reduction="total"), r"total is not a valid value"),
    ("bad reduction nll", "nll_loss", (logits(3, 4), idx(0, 1, 2)), dict(reduction="avg"), r"avg is not a valid value"),
    # --- BCE
    ("bce shape", "binary_cross_entropy", (torch.rand(3, 4), torch.rand(3, 1)), {}, r"Using a target size \(torch.Size\(\[3, 1\]\)\) that is different to the input size"),
    ("bce input > 1", "binary_cross_entropy", (torch.tensor([0.5, 1.5]), torch.tensor([0.0, 1.0])), {}, r"all elements of input should be between 0 and 1: .* holds 1.5 at index \(1,\)"),
    ("bce input nan", "binary_cross_entropy", (torch.tensor([float("nan")]), torch.tensor([0.0])), {}, r"all elements of input should be between 0 and 1.*nan"),
    ("bce input < 0", "binary_cross_entropy", (torch.tensor([-0.5]), torch.tensor([0.0])), {}, r"between 0 and 1.*-0.5.*binary_cross_entropy_with_logits"),
    ("bce target > 1", "binary_cross_entropy", (torch.tensor([0.5]), torch.tensor([2.0])), {}, r"all elements of target should be between 0 and 1.*2.0"),
    ("bce target dtype", "binary_cross_entropy", (torch.rand(3), torch.rand(3, dtype=torch.float64)), {}, r"Found dtype Double but expected Float.*float32.*float64"),
    ("bce long target", "binary_cross_entropy", (torch.rand(3), torch.ones(3, dtype=torch.long)), {}, r"Found dtype Long but expected Float"),
    ("bce int input", "binary_cross_entropy", (torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long)), {}, r"\"binary_cross_entropy\" not implemented for 'Long'"),
    ("bce weight no broadcast", "binary_cross_entropy", (x34(), x34()), dict(weight=torch.rand(3)), r"Attempting to broadcast a dimension of length 3 at -1.*input of shape \(3, 4\).*must be 1 or 4"),
    ("bce weight enlarges", "binary_cross_entropy", (x34(), x34()), dict(weight=torch.rand(2, 3, 4)), r"output with shape \[3, 4\] doesn't match the broadcast shape \[2, 3, 4\]"),
    ("bce weight requires grad", "binary_cross_entropy", (x34(), x34()), dict(weight=torch.rand(4, requires_grad=True)), r"not differentiable with respect to argument 'weight'"),
    # --- BCE with logits
    ("bcel shape", "binary_cross_entropy_with_logits", (torch.rand(3, 4), torch.rand(3, 1)), {}, r"Target size \(torch.Size\(\[3, 1\]\)\) must be the same as input size \(torch.Size\(\[3, 4\]\)\)"),
    ("bcel pos_weight mismatch", "binary_cross_entropy_with_logits", (x34(), x34()), dict(pos_weight=torch.rand(3)), r"The size of tensor a \(4\) must match the size of tensor b \(3\) at non-singleton dimension 1.*\(C, 1, 1\)"),
    ("bcel weight mismatch", "binary_cross_entropy_with_logits", (torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)), dict(weight=torch.rand(3)), r"must match the size of tensor b"),
    ("bcel pos_weight enlarges", "binary_cross_entropy_with_logits", (x34(), x34()), dict(pos_weight=torch.rand(2, 3, 4)), r"output with shape \[3, 4\] doesn't match the broadcast shape \[2, 3, 4\]"),
    ("bcel long target", "binary_cross_entropy_with_logits", (torch.randn(3), torch.ones(3, dtype=torch.long)), {}, r"result type Float can't be cast to the desired output type Long"),
    ("bcel bool target", "binary_cross_entropy_with_logits", (torch.randn(3), torch.ones(3, dtype=torch.bool)), {}, r"Subtraction, the `-` operator, with two bool tensors is not supported"),
    ("bcel int input", "binary_cross_entropy_with_logits", (torch.ones(3, dtype=torch.long), torch.ones(3)), {}, r"not implemented for 'Long'"),
    ("bcel pos_weight requires grad", "binary_cross_entropy_with_logits", (x34(), x34()), dict(pos_weight=torch.rand(4, requires_grad=True)), r"not differentiable with respect to argument 'pos_weight'"),
    # --- NLL / CE with class indices
    ("seed mistake (3,1) input", "cross_entropy", (torch.randn(3, 1), idx(1, 1, 0)), {}, r"Target 1 is out of bounds: the input has 1 class, so class indices must lie in \[0, 1\), but the target holds 1"),
    ("target too large", "cross_entropy", (logits(3, 5), idx(0, 5, 1)), {}, r"Target 5 is out of bounds: the input has 5 classes.*\[0, 5\).*holds 5 at position \(1,\)"),
    ("target negative", "nll_loss", (logits(3, 5), idx(0, -1, 1)), {}, r"Target -1 is out of bounds"),
    ("target out with smoothing+weight", "cross_entropy", (logits(3, 5), idx(0, 7, 1)), dict(label_smoothing=0.1, weight=torch.rand(5)), r"Target 7 is out of bounds"),
    ("K-dim target out of range", "cross_entropy", (logits(2, 3, 4), torch.tensor([[0, 1, 2, 9], [0, 0, 0, 0]])), {}, r"Target 9 is out of bounds.*position \(0, 3\)"),
    ("zero classes", "cross_entropy", (logits(2, 0), idx(0, 0)), {}, r"Target 0 is out of bounds"),
    ("uint8 target out of range", "cross_entropy", (logits(2, 5), torch.tensor([7, 0], dtype=torch.uint8)), {}, r"Target 7 is out of bounds"),
    ("float target", "cross_entropy", (logits(3, 5), torch.tensor([0.0, 1.0, 2.0])), {}, r"expected target dtype to be Long or Byte, but got Float.*int64 or uint8"),
    ("int32 target", "nll_loss", (logits(3, 5), torch.tensor([0, 1, 2], dtype=torch.int32)), {}, r"expected target dtype to be Long or Byte, but got Int"),
    ("bool target", "cross_entropy", (logits(2, 5), torch.tensor([True, False])), {}, r"but got Bool"),
    ("batch mismatch", "cross_entropy", (logits(3, 5), idx(0, 1)), {}, r"Expected input batch_size \(3\) to match target batch_size \(2\)"),
    ("0-d target for 2-D input", "cross_entropy", (logits(2, 5), torch.tensor(1)), {}, r"Expected input batch_size \(2\) to match target batch_size \(0\)"),
    ("2-D target for 2-D input", "nll_loss", (logits(3, 5), torch.zeros(3, 1, dtype=torch.long)), {}, r"0D or 1D target tensor expected, multi-target not supported"),
    ("1-D input 2-elt target", "cross_entropy", (logits(5), idx(1, 2)), {}, r"For 1D input, 1D target must have size 1, but got target size: 2"),
    ("3-D spatial mismatch", "cross_entropy", (logits(2, 5, 3), torch.zeros(2, 4, dtype=torch.long)), {}, r"Expected target size \[2, 3\], got \[2, 4\]"),
    ("5-D spatial mismatch", "nll_loss", (logits(2, 5, 3, 2, 2), torch.zeros(2, 3, 2, 1, dtype=torch.long)), {}, r"Expected target size \[2, 3, 2, 2\], got \[2, 3, 2, 1\]"),
    ("4-D spatial mismatch", "cross_entropy", (logits(2, 5, 3, 3), torch.zeros(2, 3, 4, dtype=torch.long)), {}, r"size mismatch \(got input: \[2, 5, 3, 3\] , target: \[2, 3, 4\]"),
    ("4-D target dim", "nll_loss", (logits(2, 5, 3, 3), torch.zeros(2, 3, dtype=torch.long)), {}, r"only batches of spatial targets supported \(3D tensors\) but got targets of dimension: 2"),
    ("0-d input nll", "nll_loss", (torch.tensor(1.0), torch.tensor(0)), {}, r"Expected 1 or more dimensions \(got 0\)"),
    ("0-d input ce", "cross_entropy", (torch.tensor(1.0), torch.tensor(0)), {}, r"Expected floating point type for target with class probabilities, got Long"),
    ("weight wrong size", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(weight=torch.rand(4)), r"weight tensor should be defined either for all 5 classes or no classes but got weight tensor of shape: \[4\]"),
    ("weight 2-D", "nll_loss", (logits(3, 5), idx(0, 1, 2)), dict(weight=torch.rand(1, 5)), r"but got weight tensor of shape: \[1, 5\]"),
    ("weight dtype", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(weight=torch.rand(5, dtype=torch.float64)), r"expected scalar type Float but found Double"),
    ("weight dtype bf16", "cross_entropy", (logits(3, 5).bfloat16(), idx(0, 1, 2)), dict(weight=torch.rand(5)), r"expected scalar type BFloat16 but found Float"),
    ("weight requires grad", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(weight=torch.rand(5, requires_grad=True)), r"'nll_loss_forward' is not differentiable with respect to argument 'weight'"),
    ("label smoothing > 1", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(label_smoothing=1.5), r"label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
    ("ignore_index None", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(ignore_index=None), r"argument 'ignore_index' must be int, not NoneType"),
    ("ignore_index beyond int64", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(ignore_index=2**70), r"Overflow when unpacking long long.*'ignore_index' must fit in int64.*got 1180591620717411303424"),
    ("ignore_index below int64 nll", "nll_loss", (logits(3, 5), idx(0, 1, 2)), dict(ignore_index=-(2**63) - 1), r"'ignore_index' must fit in int64.*got -9223372036854775809"),
    ("ignore_index float tensor", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(ignore_index=torch.tensor(1.0)), r"argument 'ignore_index' must be int, not Tensor"),
    ("ignore_index numpy bool", "nll_loss", (logits(3, 5), idx(0, 1, 2)), dict(ignore_index=np.bool_(True)), r"argument 'ignore_index' must be int, not bool"),
    ("label_smoothing str", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(label_smoothing="0.1"), r"argument 'label_smoothing' must be float, not str: label smoothing is a float in \[0, 1\], got '0.1'"),
    ("label_smoothing None", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(label_smoothing=None), r"argument 'label_smoothing' must be float, not NoneType"),
    ("label_smoothing str prob", "cross_entropy", (logits(3, 5), torch.rand(3, 5)), dict(label_smoothing="0.1"), r"argument 'label_smoothing' must be float, not str"),
    ("label_smoothing 1-D tensor", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(label_smoothing=torch.tensor([0.1])), r"argument 'label_smoothing' must be float, not Tensor.*shape \(1,\)"),
    ("meta class weight", "cross_entropy", (logits(3, 5), idx(0, 1, 2)), dict(weight=torch.ones(5, device="meta")), r"Tensor on device meta is not on the expected device cpu!.*weight must be on the input's device cpu, got meta"),
    ("meta class weight nll", "nll_loss", (logits(3, 5), idx(0, 1, 2)), dict(weight=torch.ones(5, device="meta")), r"Tensor on device meta is not on the expected device cpu!"),
    ("meta class weight prob", "cross_entropy", (logits(3, 5), torch.rand(3, 5)), dict(weight=torch.ones(5, device="meta")), r"Tensor on device meta is not on the expected device cpu!"),
    ("int logits", "cross_entropy", (torch.ones(2, 5, dtype=torch.long), idx(1, 1)), {}, r"not implemented for 'Long'"),
    ("int log-probs", "nll_loss", (torch.ones(2, 5, dtype=torch.long), idx(1, 1)), {}, r"not implemented for 'Long'"),
    # --- CE with probability targets
    ("prob target long", "cross_entropy", (logits(2, 5), torch.ones(2, 5, dtype=torch.long)), {}, r"Expected floating point type for target with class probabilities, got Long"),
    ("prob ignore_index >= 0", "cross_entropy", (logits(2, 5), torch.rand(2, 5)), dict(ignore_index=0), r"ignore_index is not supported for floating point target"),
    ("prob weight size", "cross_entropy", (logits(2, 5), torch.rand(2, 5)), dict(weight=torch.rand(4)), r"cross_entropy: weight tensor should be defined either for all 5 classes or no classes"),
    ("prob label smoothing", "cross_entropy", (logits(2, 5), torch.rand(2, 5)), dict(label_smoothing=2.0), r"label_smoothing must be between 0.0 and 1.0. Got: 2.0"),
    ("prob 0-d float", "cross_entropy", (torch.tensor(1.0), torch.tensor(0.0)), {}, r"Dimension specified as 1 but tensor has no dimensions"),
    ("prob shape mismatch", "cross_entropy", (logits(3, 5), torch.rand(3, 4)), {}, r"0D or 1D target tensor expected, multi-target not supported"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_error_type_matches_torch_and_message_is_clear(case):
    _, name, args, kwargs, pattern = case
    snapshot = [a.clone() for a in args]
    with pytest.raises(Exception) as theirs:
        getattr(F, name)(*args, **kwargs)
    with pytest.raises(Exception) as ours:
        getattr(C, name)(*args, **kwargs)
    assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)
    assert re.search(pattern, str(ours.value)), str(ours.value)
    for before, after in zip(snapshot, args, strict=True):
        assert torch.equal(before, after) or (before.isnan().any() and after.isnan().any())


def test_negative_label_smoothing_is_accepted_like_torch():
    """torch treats label_smoothing < 0 as 0 (pytorch#134767); so does crossent."""
    x, t = logits(3, 5), idx(0, 1, 2)
    torch.testing.assert_close(C.cross_entropy(x, t, label_smoothing=-0.5), C.cross_entropy(x, t))


def test_bcel_target_is_not_range_checked_like_torch():
    out = C.binary_cross_entropy_with_logits(torch.tensor([1.0]), torch.tensor([2.0]))
    torch.testing.assert_close(
        out, F.binary_cross_entropy_with_logits(torch.tensor([1.0]), torch.tensor([2.0]))
    )


def test_ignored_targets_are_not_range_checked():
    x = logits(3, 5)
    t = idx(0, 255, 4)
    torch.testing.assert_close(
        C.nll_loss(x, t, ignore_index=255), F.nll_loss(x, t, ignore_index=255)
    )


IGNORE_INDEX_FORMS = [np.int64(1), np.int32(1), np.int8(1), torch.tensor(1), torch.tensor([1])]


@pytest.mark.parametrize("ignore_index", IGNORE_INDEX_FORMS, ids=repr)
def test_ignore_index_as_numpy_integer_or_tensor_is_accepted_like_torch(ignore_index):
    x, t = logits(4, 5), idx(0, 1, 2, 1)
    for name in ("cross_entropy", "nll_loss"):
        torch.testing.assert_close(
            getattr(C, name)(x, t, ignore_index=ignore_index),
            getattr(F, name)(x, t, ignore_index=ignore_index),
        )
        torch.testing.assert_close(
            getattr(C, name)(x, t, ignore_index=ignore_index),
            getattr(C, name)(x, t, ignore_index=1),
        )
    for ours, theirs in (
        (CN.CrossEntropyLoss, torch.nn.CrossEntropyLoss),
        (CN.NLLLoss, torch.nn.NLLLoss),
    ):
        torch.testing.assert_close(
            ours(ignore_index=ignore_index)(x, t), theirs(ignore_index=ignore_index)(x, t)
        )


@pytest.mark.parametrize(
    "label_smoothing", [0, True, np.float32(0.25), torch.tensor(0.25)], ids=repr
)
def test_label_smoothing_real_numbers_and_0d_tensors_are_accepted_like_torch(label_smoothing):
    x, t = logits(4, 5), idx(0, 1, 2, 1)
    torch.testing.assert_close(
        C.cross_entropy(x, t, label_smoothing=label_smoothing),
        F.cross_entropy(x, t, label_smoothing=label_smoothing),
    )


# ---------------------------------------------------------------------------------------------
# crossent._checks is the one place that raises for bad arguments.

SRC = Path(crossent.__file__).resolve().parent
ARGUMENT_ERRORS = {"TypeError", "ValueError", "RuntimeError", "IndexError", "NotImplementedError"}
# Parts of the package that raise these types for something other than a loss's arguments.
RAISES_ELSEWHERE = {
    "_checks/": "the argument checks themselves",
    "reference/": "the NumPy reference does not import torch, so it keeps its own copy of the "
    "checks (same rules, same exception types)",
    "cli/": "the command line's own arguments and files, not a loss's",
    "ops/": "internal invariants of the validated paths: double backward, a kernel that "
    "cannot run on this machine",
    "distributed/": "what only the ranks together can check: the vocabulary split, replicated "
    "targets and class weights, raised alike on every rank",
    "integrations/transformers/": "models whose loss or head the integration cannot take over",
    "_dtensor": "DTensor layouts: what the mesh must agree on (checked with a collective) "
    "and layouts that no route takes",
}


def _argument_raises(source: str) -> list[tuple[int, str]]:
    """``(line, exception name)`` of each ``raise TypeError(...)``-like statement."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            func = node.exc.func
            if isinstance(func, ast.Name) and func.id in ARGUMENT_ERRORS:
                found.append((node.lineno, func.id))
    return found


def test_argument_raises_are_found():
    source = "def f(x):\n    if x:\n        raise ValueError('x')\n    raise\n"
    assert _argument_raises(source) == [(3, "ValueError")]
    assert _argument_raises("raise AttributeError('no such name')\n") == []


def test_only_checks_raises_for_bad_arguments():
    """The API layer (functional, linear, linear_probs, distillation, nn, the backend switch,
    integrations/_distillation, ...) validates through crossent._checks and raises nothing of
    its own: re-raising torch's error (a bare ``raise``) is all it may do."""
    offending = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if any(rel.startswith(prefix) for prefix in RAISES_ELSEWHERE):
            continue
        for line, name in _argument_raises(path.read_text(encoding="utf-8")):
            offending.append(f"src/crossent/{rel}:{line}: raise {name}(...)")
    assert not offending, "move these checks into crossent._checks:\n" + "\n".join(offending)
