"""crossent: the cross-entropy family of losses with exact PyTorch semantics.

``crossent.functional`` (re-exported here) mirrors ``torch.nn.functional``; ``crossent.nn``
mirrors ``torch.nn``'s loss modules; ``crossent.reference`` is a NumPy float64 reference that
reads like the formulas.
"""

from crossent.functional import (
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    nll_loss,
)

__version__ = "0.1.0"

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "nll_loss",
    "linear_cross_entropy",
    "__version__",
]


def __getattr__(name: str):
    if name == "linear_cross_entropy":
        from crossent.linear import linear_cross_entropy

        return linear_cross_entropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
