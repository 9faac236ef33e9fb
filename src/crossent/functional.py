"""The torch API: drop-in replacements for ``torch.nn.functional``'s cross-entropy losses.

Each function has torch 2.13's signature and behaviour (values, dtypes, shapes, gradients,
exception types). It validates its arguments once (``crossent._checks``), then picks a backend:
the Triton kernels for CUDA tensors (or when ``CROSSENT_BACKEND=triton``), otherwise
``crossent.ops.eager``: torch's fused kernels where they are as fast, crossent's blocked cross
entropy on large logits. Checks that need a pass over the values (class-index range,
probabilities in [0, 1]) are left to torch's kernels where those make them, and re-worded from
the host tensors only once they have failed: a valid call pays for none of them.
"""

from __future__ import annotations

from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic

from crossent import _checks, _dtensor
from crossent._backend import select_backend
from crossent.ops import eager

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "nll_loss",
    "linear_cross_entropy",  # noqa: F822 (lazy, see __getattr__)
]


def _backend(*tensors: Tensor | None) -> str:
    """'triton' or 'torch' (see crossent._backend); CPU calls decide in a couple of µs."""
    return select_backend(*tensors)


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Binary cross entropy between probabilities ``input`` and targets ``target``.

    .. math::
        \ell_i = -w_i \left[ y_i \max(\log x_i, -100) + (1 - y_i) \max(\log(1 - x_i), -100)
        \right]

    The logs are clamped at -100 so that ``x = 0`` or ``x = 1`` give finite losses (100 at
    most per element). ``'mean'`` divides by the number of elements; ``weight`` does not
    renormalise it. Prefer :func:`binary_cross_entropy_with_logits` when you hold logits.

    Args:
        input: probabilities in [0, 1], any shape.
        target: same shape and dtype as ``input``, values in [0, 1].
        weight: rescaling weight, broadcast (right-aligned) to the target's shape.
        size_average, reduce: deprecated; override ``reduction`` when given.
        reduction: ``'none' | 'mean' | 'sum'``.

    Returns:
        The loss, 0-d for ``'mean'``/``'sum'`` or of the input's shape for ``'none'``, in the
        input's dtype. Differentiable w.r.t. ``input`` (gradient
        ``(x - y) / max(x(1 - x), 1e-12)``, as torch) and ``target`` (``-logit(x)``).

    Raises:
        ValueError: target shape differs from input shape; bad ``reduction``.
        RuntimeError: values outside [0, 1] (or NaN) in input or target; target dtype differs;
            weight does not broadcast; weight requires grad.
        NotImplementedError: integer input.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            binary_cross_entropy, (input, target, weight), input, target, weight=weight,
            size_average=size_average, reduce=reduce, reduction=reduction,
        )  # fmt: skip
    if _dtensor.involved(input, target, weight):
        return _dtensor.binary_cross_entropy(input, target, weight, size_average, reduce, reduction)
    reduction = _checks.resolve_reduction(size_average, reduce, reduction)
    _checks.check_binary_cross_entropy(input, target, weight)
    try:
        return eager.binary_cross_entropy(input, target, weight, reduction)
    except RuntimeError:
        # torch's kernel checks the range itself; say where the offending value is.
        _checks.check_probabilities(input, target)
        raise


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r"""Binary cross entropy on logits, in the numerically stable log-sigmoid form.

    .. math::
        \ell_i = w_i \left[ (1 - y_i)\, x_i - \big(1 + (p_i - 1) y_i\big) \log\sigma(x_i)
        \right], \qquad \log\sigma(x) = \min(x, 0) - \log(1 + e^{-|x|})

    equal to ``-w [p·y·log σ(x) + (1 - y)·log(1 - σ(x))]`` but finite for any finite ``x``,
    where sigmoid-then-log would give ``log(0) = -inf``. ``pos_weight`` and ``weight``
    broadcast right-aligned against the input: a ``(C,)`` pos_weight applies along the
    *last* dimension; for ``(N, C, H, W)`` input use ``(C, 1, 1)``.

    Args:
        input: logits, any shape.
        target: same shape, floating (probabilities; not range-checked, as in torch).
        weight: rescaling weight broadcastable to the input's shape.
        size_average, reduce: deprecated; override ``reduction`` when given.
        reduction: ``'none' | 'mean' | 'sum'``; ``'mean'`` divides by the number of elements.
        pos_weight: weight of positive examples, broadcastable to the input's shape.

    Returns:
        The loss in the **target's** dtype (a torch quirk kept for compatibility).
        Differentiable w.r.t. ``input`` and ``target``.

    Raises:
        ValueError: shape mismatch; bad ``reduction``.
        RuntimeError: integer or bool target; weight/pos_weight that do not broadcast to the
            input's shape; weight/pos_weight requiring grad.
        NotImplementedError: integer input.
    """
    if has_torch_function_variadic(input, target, weight, pos_weight):
        return handle_torch_function(
            binary_cross_entropy_with_logits, (input, target, weight, pos_weight), input,
            target, weight=weight, size_average=size_average, reduce=reduce,
            reduction=reduction, pos_weight=pos_weight,
        )  # fmt: skip
    if _dtensor.involved(input, target, weight, pos_weight):
        args = (input, target, weight, size_average, reduce, reduction, pos_weight)
        return _dtensor.binary_cross_entropy_with_logits(*args)
    reduction = _checks.resolve_reduction(size_average, reduce, reduction)
    _checks.check_binary_cross_entropy_with_logits(input, target, weight, pos_weight)
    if _backend(input, target, weight, pos_weight) == "triton":
        from crossent.ops import triton as triton_ops

        return triton_ops.binary_cross_entropy_with_logits(
            input, target, weight=weight, pos_weight=pos_weight, reduction=reduction
        )
    return eager.binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log likelihood of class indices under log-probabilities ``input``.

    .. math::
        \ell_i = -w_{t_i}\, x_{i, t_i} \;(0 \text{ if } t_i = \text{ignore\_index}), \qquad
        \text{mean} = \frac{\sum_i \ell_i}{\sum_{i:\, t_i \ne \text{ignore}} w_{t_i}}

    The weighted mean divides by the sum of the target weights of the kept rows (NaN when
    every target is ignored, as in torch), not by N.

    Args:
        input: log-probabilities ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices (int64 or uint8) ``()``, ``(N,)`` or ``(N, d1, ..., dk)``.
        weight: ``(C,)`` class weight, same dtype as input.
        size_average, reduce: deprecated; override ``reduction`` when given.
        ignore_index: target value that contributes nothing (any int).
        reduction: ``'none' | 'mean' | 'sum'``.

    Returns:
        The loss in the input's dtype; ``'none'`` gives the target's shape.

    Raises:
        ValueError: 0-d input; batch size mismatch; bad ``reduction``.
        RuntimeError: bad target shape or dtype; bad weight shape or dtype.
        IndexError: a kept target outside ``[0, C)`` (CPU; an async device assert on CUDA).
        NotImplementedError: integer input.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            nll_loss, (input, target, weight), input, target, weight=weight,
            size_average=size_average, ignore_index=ignore_index, reduce=reduce,
            reduction=reduction,
        )  # fmt: skip
    if _dtensor.involved(input, target, weight):
        args = (input, target, weight, size_average, ignore_index, reduce, reduction)
        return _dtensor.nll_loss(*args)
    reduction = _checks.resolve_reduction(size_average, reduce, reduction)
    ignore_index = _checks.check_ignore_index(ignore_index, "nll_loss_nd")
    n_classes = _checks.check_index_targets(input, target, weight, "nll_loss_out_frame")
    try:
        return eager.nll_loss(input, target, weight, ignore_index, reduction)
    except IndexError:
        # torch's kernel checks the class indices itself; say which one and where.
        _checks.check_target_range(target, n_classes, ignore_index)
        raise


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    r"""Cross entropy between logits ``input`` and class indices or class probabilities.

    Class indices (target shape = input shape without the class dimension):

    .. math::
        \ell_i = (1-\varepsilon)\,\big(-w_{t_i} \log p_{i,t_i}\big)
               + \frac{\varepsilon}{C} \Big(-\sum_c w_c \log p_{i,c}\Big), \qquad
        p = \operatorname{softmax}(x)

    with ``'mean'`` dividing both terms by :math:`\sum_{i \text{ kept}} w_{t_i}`.

    Class probabilities (target shape = input shape, floating):

    .. math::
        \ell_n = -\sum_c w_c\, y'_{n,c} \log p_{n,c}, \qquad
        y' = (1-\varepsilon)\, y + \varepsilon / C

    with ``'mean'`` dividing by the number of rows N·d1…dk — *not* by the weights, so with
    class weights one-hot probability targets and index targets give different means (as in
    torch, pytorch#61309). Label smoothing spreads ε/C on every class (PyTorch's convention);
    negative ε means no smoothing, ε > 1 raises.

    Args:
        input: logits ``(C,)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``.
        target: class indices (int64/uint8) or probabilities (input's shape).
        weight: ``(C,)`` class weight.
        size_average, reduce: deprecated; override ``reduction`` when given.
        ignore_index: index target that contributes nothing (must be negative with
            probability targets).
        reduction: ``'none' | 'mean' | 'sum'``.
        label_smoothing: ε in [0, 1].

    Returns:
        The loss; ``'none'`` gives shape ``(N, d1, ..., dk)`` (``()`` when unbatched).

    Raises:
        ValueError, RuntimeError, IndexError, TypeError, NotImplementedError: as torch, with
        messages that name what was expected and what was given.
    """
    if has_torch_function_variadic(input, target, weight):
        return handle_torch_function(
            cross_entropy, (input, target, weight), input, target, weight=weight,
            size_average=size_average, ignore_index=ignore_index, reduce=reduce,
            reduction=reduction, label_smoothing=label_smoothing,
        )  # fmt: skip
    if _dtensor.involved(input, target, weight):
        args = (size_average, ignore_index, reduce, reduction, label_smoothing)
        return _dtensor.cross_entropy(input, target, weight, *args)
    reduction = _checks.resolve_reduction(size_average, reduce, reduction)
    ignore_index = _checks.check_ignore_index(ignore_index, "cross_entropy_loss")
    if input.shape == target.shape:
        _checks.check_cross_entropy_prob(input, target, weight, ignore_index)
        _checks.check_same_device(input, "weight", weight)
        label_smoothing = _checks.check_label_smoothing(label_smoothing)
        return eager.cross_entropy_probs(input, target, weight, label_smoothing, reduction)
    label_smoothing = _checks.check_label_smoothing(label_smoothing)
    n_classes = _checks.check_index_targets(
        input, target, weight, "log_softmax_lastdim_kernel_impl"
    )
    if input.dim() == 2 and _backend(input, target, weight) == "triton":
        _checks.check_target_range(target, n_classes, ignore_index)
        from crossent.ops import triton as triton_ops

        return triton_ops.cross_entropy(
            input, target, weight=weight, ignore_index=ignore_index,
            label_smoothing=label_smoothing, reduction=reduction,
        )  # fmt: skip
    args = (input, target, weight, ignore_index, label_smoothing, reduction)
    if eager.blocked_cross_entropy_pays(input):
        _checks.check_target_range(target, n_classes, ignore_index)
        return eager.cross_entropy_index_blocked(*args)
    try:
        return eager.cross_entropy_index_fused(*args)
    except IndexError:
        _checks.check_target_range(target, n_classes, ignore_index)
        raise


def __getattr__(name: str):
    # linear_cross_entropy lives in crossent.linear; imported lazily so that this module does
    # not depend on it at import time.
    if name == "linear_cross_entropy":
        from crossent.linear import linear_cross_entropy

        return linear_cross_entropy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
