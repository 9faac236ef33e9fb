"""NumPy reference implementation of the cross-entropy family: the executable specification.

Every loss is written as plainly as its formula (explicit gathers, one-hots and sums), computes
in float64 unless a ``dtype=`` keyword says otherwise, and follows torch 2.13's semantics
exactly: values, shapes, reductions, edge cases and the *type* of exception for bad input. Each
loss has an analytic gradient with respect to its input (and, where torch has one, its target).
Every fast path in :mod:`crossent` is tested against these functions.

This package imports NumPy only, never torch. It keeps its own NumPy copy of the loss
conventions (label smoothing ε/C, the class weight on the target term, the ignore mask, the
'mean' denominator) by design: it is the independent oracle the torch paths are tested
against, so it shares no code with them (their one home is ``crossent.ops._stats``).

Modules: ``binary`` (BCE, BCE with logits), ``nll`` (class-index targets, NLL), ``categorical``
(cross entropy), ``numerics`` (stable helpers), ``_common`` (array conversion, reductions,
upstream gradients, argument checks, the class losses' row form). The public names are the
``__all__`` below; everything else in the modules serves them.

Losses (torch.nn.functional signatures, minus the deprecated ``size_average``/``reduce``):

- :func:`binary_cross_entropy` ``(input, target, weight=None, reduction='mean')``
- :func:`binary_cross_entropy_with_logits` ``(input, target, weight=None, reduction='mean',
  pos_weight=None)``
- :func:`cross_entropy` ``(input, target, weight=None, ignore_index=-100, reduction='mean',
  label_smoothing=0.0)``: class-index or class-probability targets
- :func:`nll_loss` ``(input, target, weight=None, ignore_index=-100, reduction='mean')``

Gradients, ``<loss>_grad(input, target, grad_output=1.0, <same options>)`` → ∂L/∂input, and
``<loss>_target_grad(...)`` → ∂L/∂target (each spells out its loss's full signature, so that it
reads on its own):

- :func:`binary_cross_entropy_grad`, :func:`binary_cross_entropy_target_grad`
- :func:`binary_cross_entropy_with_logits_grad`,
  :func:`binary_cross_entropy_with_logits_target_grad`
- :func:`cross_entropy_grad`, :func:`cross_entropy_target_grad` (probability targets)
- :func:`nll_loss_grad`

Numerically stable helpers: :func:`sigmoid`, :func:`log_sigmoid`, :func:`logsumexp`,
:func:`log_softmax`, :func:`softmax`.
"""

from .binary import (
    binary_cross_entropy,
    binary_cross_entropy_grad,
    binary_cross_entropy_target_grad,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_grad,
    binary_cross_entropy_with_logits_target_grad,
)
from .categorical import cross_entropy, cross_entropy_grad, cross_entropy_target_grad
from .nll import nll_loss, nll_loss_grad
from .numerics import log_sigmoid, log_softmax, logsumexp, sigmoid, softmax

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_grad",
    "binary_cross_entropy_target_grad",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_grad",
    "binary_cross_entropy_with_logits_target_grad",
    "cross_entropy",
    "cross_entropy_grad",
    "cross_entropy_target_grad",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "nll_loss",
    "nll_loss_grad",
    "sigmoid",
    "softmax",
]
