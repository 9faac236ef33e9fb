"""Vocab-parallel cross entropy over ``torch.distributed`` process groups.

When the classifier of a language model is sharded by vocabulary rows (tensor parallelism), each
rank holds the logits of a contiguous slice of the vocabulary: rank ``r`` owns classes
``[offset_r, offset_r + V_r)``, the slices in rank order, sizes free to differ between ranks.
The cross entropy needs only a few numbers per token from each rank, so it never gathers the
``N x V`` logits. In the notation of the glossary of ``crossent.ops._stats`` (logits ``z``, row
max ``m``, log-sum ``L``, smoothing sum ``S``), each rank computes over its shard (one pass,
chunked over tokens)

.. math::

    m_r = \\max_{c \\in r} z_c, \\qquad s_r = \\sum_{c \\in r} e^{z_c - m_r}, \\qquad
    z_t \\text{ if } t \\in r, \\qquad S_r = \\sum_{c \\in r} w_c (z_c - m_r)

and the group combines them with one all-reduce MAX and one all-reduce SUM:

.. math::

    m = \\max_r m_r, \\qquad L = \\log \\sum_r s_r e^{m_r - m}, \\qquad \\mathrm{lse} = m + L,
    \\qquad S = \\sum_c w_c (z_c - m) = \\sum_r \\big[S_r + W_r (m_r - m)\\big]

The loss of a token with global target ``t`` that is not ignored is then

.. math::

    \\ell = (1-\\varepsilon)\\, w_t \\big(L - (z_t - m)\\big)
          + \\frac{\\varepsilon}{V} \\big(W L - S\\big) + \\zeta\\,\\mathrm{lse}^2,
    \\qquad W = \\sum_{c<V} w_c, \\quad W_r = \\sum_{c \\in r} w_c

(``w = 1`` without class weights). The max ``m`` and ``L`` stay apart, as in torch's
``log_softmax``, so that huge logits lose no digits to ``m + L``. This is PyTorch's
index-target cross entropy with label smoothing ``ε`` spread over the GLOBAL vocabulary ``V``
(Megatron's ``ε/V_r`` is a bug), plus an optional z-loss (PaLM) that class weights do not
scale. ``'mean'`` divides the sum by ``Σ w_t`` over non-ignored tokens (their
count without weights); all tokens ignored gives NaN with zero gradients, as in torch. The
combined statistics go to ``crossent.ops._stats``, which turns them into the loss, the
``'mean'`` denominator and the gradient coefficients, as for every other path.

The gradient w.r.t. this rank's logits is local (``p = e^{(z - m) - L}`` with the saved ``m``
and ``L``), so the backward of :func:`vocab_parallel_cross_entropy` needs no communication. For
:func:`vocab_parallel_linear_cross_entropy` the replicated input's gradient is a sum over ranks
(one all-reduce); the weight shard's gradient is local. Per token and rank the forward sends
``1 + 2`` floats (``+1`` with label smoothing): O(N), never O(N x V).

Validation is collective: every rank checks its own arguments, one small all-gather exchanges
the shard sizes together with an error flag, the exception's type and message and a few
fingerprints (token count, dtype, options, target range, target and class-weight checksums), and
then every rank raises the same exception, or none does. Any exception of a rank's checks takes
part, whatever its type, so a bad input never hangs the group and never yields a silently wrong
loss. Reading the gathered metadata is one host sync per call; ``check_inputs=False``
removes it (shard offsets stay on the device) and trusts the inputs.

The package: this module holds the public API; ``crossent._checks.distributed`` the local
argument checks of each rank; ``_agreement`` the cross-rank agreement (the all-gathered summary,
the exchanged exception, the shard layout); ``_functions`` the statistics and the autograd
Functions.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist
from torch import Tensor

from crossent._checks import distributed as local_checks
from crossent.distributed._agreement import LocalSummary, agree_on_layout, resolve_group
from crossent.distributed._functions import (
    Plan,
    VocabParallelCrossEntropy,
    VocabParallelLinearCrossEntropy,
)
from crossent.ops import _budget

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

#: Bytes of chunk temporaries (logits, exponentials, their gradient) a call may hold at once,
#: which sets the default ``chunk_size``; it lives with the other budgets in
#: ``crossent.ops._budget`` (``VOCAB_PARALLEL_CHUNK_BYTES``).
CHUNK_BUDGET_BYTES = _budget.VOCAB_PARALLEL_CHUNK_BYTES

_F = TypeVar("_F", bound=Callable[..., Tensor])


def _plan_call(
    fn: str,
    rows: Tensor,
    target: Tensor,
    check_tensors: Callable[[], None],
    options: tuple[str, int, float, float, int | None],
    weight: Tensor | None,
    group: dist.ProcessGroup | None,
    check_inputs: bool,
    linear_weight_shard: Tensor | None = None,
) -> tuple[Tensor, Plan]:
    """Check the call on every rank, agree on the layout; ``rows`` as ``(N, ·)`` and the plan.

    ``rows`` is the ``(*, V_r)`` logits shard, or the ``(*, D)`` input of the linear loss (then
    ``linear_weight_shard`` is its ``(V_r, D)`` classifier shard); ``check_tensors()`` runs the
    function's own shape and dtype checks; ``options`` are ``(reduction, ignore_index,
    label_smoothing, z_loss, chunk_size)``.
    """
    group = resolve_group(group)
    rows_2d = target_1d = None
    summary = LocalSummary()
    problem: Exception | None = None
    try:
        opts = local_checks.check_options(fn, *options)
        check_tensors()
        local_checks.check_class_weight(weight, rows, fn)
        rows_2d = rows.reshape(target.numel(), rows.shape[-1])  # (N, V_r) or (N, D)
        target_1d = target.reshape(-1)  # (N,)
        linear = linear_weight_shard is not None
        shard_size = linear_weight_shard.shape[0] if linear else rows_2d.shape[1]
        summary = LocalSummary.of(opts, rows_2d, target_1d, weight, shard_size, linear)
    except Exception as exc:  # any failure: every rank must learn of it, or the others hang
        if not check_inputs:
            raise
        problem = exc
    device = rows.device if isinstance(rows, Tensor) else None
    layout = agree_on_layout(group, summary, problem, device, check_inputs)
    logits_shape = (rows_2d.shape[0], shard_size)
    plan = Plan.build(group, layout, opts, target_1d, weight, rows_2d.dtype, logits_shape)
    return rows_2d, plan


def _renamed_keyword(old: str, new: str) -> Callable[[_F], _F]:
    """Accept the keyword ``old`` for ``new`` with a ``FutureWarning`` (a deprecation path)."""

    def decorate(func: _F) -> _F:
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{func.__name__}() got both {new!r} and its old name {old!r}")
                warnings.warn(
                    f"{func.__name__}: the keyword {old!r} is deprecated, use {new!r}",
                    FutureWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> Tensor:
    """Cross entropy of logits sharded by vocabulary across the ranks of ``group``.

    Equals ``F.cross_entropy(gathered_logits, target, weight=weight, ignore_index=ignore_index,
    label_smoothing=label_smoothing, reduction=reduction)`` (class dimension last) plus
    ``z_loss * lse**2`` per non-ignored token, in value and in the gradient w.r.t. this rank's
    shard, where ``gathered_logits = torch.cat([shard of rank 0, shard of rank 1, ...], -1)``.
    See the module docstring for the math. Every rank of ``group`` must call it with the same
    ``target``, ``weight`` and options.

    Args:
        logits_shard: ``(*, V_r)`` logits of this rank's classes ``[offset, offset + V_r)``;
            ``(N, V_r)`` or ``(B, T, V_r)`` typically. float16, bfloat16, float32 or float64;
            the softmax statistics are computed in float32 for float16/bfloat16.
        target: ``(*)`` int64 or uint8 global class indices in ``[0, V)`` or ``ignore_index``;
            shape ``logits_shard.shape[:-1]``, identical on every rank.
        group: the process group the vocabulary is sharded over (default: the world).
        weight: optional ``(V,)`` class weights over the FULL vocabulary, same dtype as the
            logits, identical on every rank; not differentiable (as in torch).
        ignore_index: target value whose tokens contribute nothing (any int).
        label_smoothing: ``ε`` in ``[0, 1]``; mass ``ε/V`` on every class of the global
            vocabulary. Negative values mean 0 (torch's behaviour).
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.
        z_loss: coefficient ``z >= 0`` of the auxiliary ``z·lse²`` term per non-ignored token.
        chunk_size: rows processed at once (default: derived from ``CHUNK_BUDGET_BYTES``).
        check_inputs: validate collectively (see module docstring). ``False`` skips the
            cross-rank checks and the target range check, so that the call has no host sync;
            inconsistent inputs then give wrong results or hang.

    Returns:
        The loss in the logits' dtype: shape ``target.shape`` for ``'none'``, else a scalar.

    Raises:
        IndexError: a non-ignored target outside ``[0, V)`` (on every rank).
        ValueError: bad ``reduction``, ``z_loss`` or ``chunk_size``; ``target`` shape not
            ``logits_shard.shape[:-1]``; token count, options or target differing across ranks.
        RuntimeError: ``label_smoothing > 1``; bad target dtype; ``weight`` not of size ``V``,
            of another dtype, or requiring grad; logits dtype differing across ranks;
            ``torch.distributed`` not initialized.
        TypeError: ``ignore_index`` not an int, or arguments that are not tensors.
        NotImplementedError: integer or float8 logits (torch's type for integer logits).

        Whatever a rank's checks raise is raised on every rank, with the same builtin type.
    """
    fn = "vocab_parallel_cross_entropy"
    options = (reduction, ignore_index, label_smoothing, z_loss, chunk_size)
    logits_2d, plan = _plan_call(
        fn,
        logits_shard,
        target,
        lambda: local_checks.check_logits_target(logits_shard, target, fn),
        options,
        weight,
        group,
        check_inputs,
    )
    loss = VocabParallelCrossEntropy.apply(logits_2d, plan)
    return loss.reshape(target.shape) if plan.reduction == "none" else loss


@_renamed_keyword("weight_shard", "linear_weight_shard")
def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    linear_weight_shard: Tensor,
    target: Tensor,
    *,
    linear_bias_shard: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> Tensor:
    """Cross entropy of ``F.linear(input, W, b)`` with ``W``, ``b`` sharded by vocabulary rows.

    Equals :func:`vocab_parallel_cross_entropy` of ``F.linear(input, linear_weight_shard,
    linear_bias_shard)`` without ever holding the ``N x V_r`` logits: tokens are processed in
    chunks of ``chunk_size`` rows (default from ``CHUNK_BUDGET_BYTES``), and the backward
    recomputes each chunk's logits from the saved per-token ``lse``. Gradients: w.r.t. the
    (replicated) ``input``, the sum over ranks of ``dlogits_r @ W_r`` (one all-reduce in the
    backward, so every rank must run the backward); w.r.t. ``linear_weight_shard`` and
    ``linear_bias_shard``, local, accumulated in float32 for half dtypes. The argument names
    follow ``F.linear_cross_entropy(input, linear_weight, target, linear_bias=...)``: ``weight``
    is the class weight, as everywhere in crossent.

    Args:
        input: ``(*, D)`` hidden states, identical on every rank (``(N, D)`` or ``(B, T, D)``).
        linear_weight_shard: ``(V_r, D)`` classifier rows of this rank's classes, same dtype as
            input. The old keyword ``weight_shard`` still works, with a ``FutureWarning``.
        target: ``(*)`` int64 or uint8 global class indices, shape ``input.shape[:-1]``.
        linear_bias_shard: optional ``(V_r,)`` bias of this rank's classes.
        group, weight, ignore_index, label_smoothing, reduction, z_loss, chunk_size,
        check_inputs: as in :func:`vocab_parallel_cross_entropy`.

    Returns:
        The loss in the input's dtype: shape ``target.shape`` for ``'none'``, else a scalar.

    Raises:
        The exceptions of :func:`vocab_parallel_cross_entropy`, plus ``RuntimeError`` when
        ``linear_weight_shard``/``linear_bias_shard`` do not fit the input (shape, dtype,
        device), when the hidden size or ``requires_grad`` of the input differ across ranks.
    """
    fn = "vocab_parallel_linear_cross_entropy"
    options = (reduction, ignore_index, label_smoothing, z_loss, chunk_size)
    input_2d, plan = _plan_call(
        fn,
        input,
        target,
        lambda: local_checks.check_linear(
            input, linear_weight_shard, linear_bias_shard, target, fn
        ),
        options,
        weight,
        group,
        check_inputs,
        linear_weight_shard,
    )
    loss = VocabParallelLinearCrossEntropy.apply(
        input_2d, linear_weight_shard, linear_bias_shard, plan
    )
    return loss.reshape(target.shape) if plan.reduction == "none" else loss
