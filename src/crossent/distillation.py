"""Knowledge distillation between two linear heads without the N×V logits.

Public API: :func:`linear_distillation_loss` (re-exported as
``crossent.linear_distillation_loss``) and :class:`LinearDistillationLoss`
(``crossent.nn.LinearDistillationLoss``). The divergence follows TRL's
``GKDTrainer.generalized_jsd_loss``. This module validates; the work is done by
``crossent.ops.soft_chunked``, which streams both heads over token chunks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crossent import _checks
from crossent.nn import module_options, options_repr
from crossent.ops.soft_chunked import linear_distillation_chunked

__all__ = ["linear_distillation_loss", "LinearDistillationLoss"]

_FN = "linear_distillation_loss"
# The module's options, passed to linear_distillation_loss as they are named there.
_MODULE_OPTIONS = (
    "beta", "temperature", "hard_weight", "soft_weight", "ignore_index", "reduction", "chunk_size"
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Public API.


def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Distillation loss of a student head against a teacher head, per token, streamed.

    With student logits :math:`z^S = W_S h^S_i + b_S` and teacher logits
    :math:`z^T = W_T h^T_i + b_T`, temperature :math:`\tau`, :math:`p = \mathrm{softmax}(z^S /
    \tau)`, :math:`q = \mathrm{softmax}(z^T / \tau)`:

    .. math::
        D_\beta(q, p) = \begin{cases}
            \mathrm{KL}(q \,\|\, p) = \sum_v q_v (\log q_v - \log p_v) & \beta = 0 \\
            \mathrm{KL}(p \,\|\, q) & \beta = 1 \\
            \beta\, \mathrm{KL}(q \,\|\, m) + (1-\beta)\, \mathrm{KL}(p \,\|\, m),
            \quad m = \beta q + (1-\beta) p & 0 < \beta < 1
        \end{cases}

        \ell_i = s \, D_\beta(q_i, p_i)
               + h \, \big(-\log \mathrm{softmax}(z^S)_{t_i}\big)

    (:math:`s` = ``soft_weight``, :math:`h` = ``hard_weight``; no :math:`\tau^2` factor), for
    tokens whose target is not ``ignore_index``; masked tokens give 0. These are the
    conventions of TRL's ``GKDTrainer.generalized_jsd_loss``: ``'mean'`` divides by the number
    of kept tokens (TRL's ``batchmean`` with labels; all tokens masked gives 0, not NaN), ``'sum'``
    adds, ``'none'`` returns one value per token. Without ``target`` every token counts
    (TRL's ``batchmean`` without labels divides by its first dimension instead: the same for
    2-D logits).

    Neither head's N×V logits are ever held: tokens go through in chunks, and the gradients
    w.r.t. the student's input, weight and bias are made chunk by chunk (fp32 accumulation
    for low-precision input; during the forward for ``'mean'``/``'sum'``). The teacher's
    tensors never receive a gradient, even if they require one.

    Args:
        student_input: ``(..., D_s)`` student hidden states.
        student_weight: ``(V, D_s)`` student classifier, ``student_input``'s dtype.
        teacher_input: ``(..., D_t)`` teacher hidden states, the same leading shape.
        teacher_weight: ``(V, D_t)`` teacher classifier, ``teacher_input``'s dtype.
        target: optional class indices ``student_input.shape[:-1]`` (int64/uint8): masks
            tokens equal to ``ignore_index`` and is the hard term's label.
        student_bias, teacher_bias: optional ``(V,)`` biases in their head's dtype.
        beta: β in [0, 1].
        temperature: τ > 0, divides both heads' logits in the divergence.
        hard_weight: h >= 0, weight of the cross entropy with ``target`` (at τ = 1).
        soft_weight: s >= 0, weight of the divergence.
        ignore_index: target value of masked tokens.
        reduction: ``'none' | 'mean' | 'sum'``.
        chunk_size: tokens per chunk; None sizes chunks from a 192 MiB scratch budget
            (``crossent.ops.soft_chunked.SOFT_CHUNK_BYTES``).

    Returns:
        The loss in ``student_input``'s dtype: 0-d for ``'mean'``/``'sum'``, else
        ``student_input.shape[:-1]``.

    Raises:
        RuntimeError: head shape or dtype mismatches (in_features, bias, the two heads' leading
            shapes or vocabulary sizes), a bad target dtype, double backward.
        ValueError: β outside [0, 1], τ <= 0, negative or non-finite weights, ``hard_weight >
            0`` without ``target``, a target of the wrong shape, bad ``reduction``,
            ``chunk_size < 1``.
        IndexError: a kept target outside ``[0, V)`` (checked on the host for CPU tensors).
        TypeError: non-numeric options, non-integer ``ignore_index`` or ``chunk_size``.
        NotImplementedError: integer input.

    Example::

        >>> import torch, crossent
        >>> hs, ws = torch.randn(6, 8), torch.randn(50, 8, requires_grad=True)
        >>> ht, wt = torch.randn(6, 16), torch.randn(50, 16)
        >>> loss = crossent.linear_distillation_loss(hs, ws, ht, wt, beta=0.0)
        >>> loss.backward()
    """
    reduction = _checks.check_reduction(reduction)
    ignore_index = _checks.check_ignore_index(ignore_index, _FN)
    _checks.check_distillation_heads(
        student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias
    )
    beta, temperature, hard_weight, soft_weight = _checks.check_distillation_options(
        beta, temperature, hard_weight, soft_weight
    )
    n_classes = student_weight.shape[0]
    leading = student_input.shape[:-1]
    _checks.check_distillation_target(target, leading, n_classes, ignore_index, hard_weight)
    chunk_size = _checks.check_chunk_size(chunk_size, _FN)

    t1d = None
    if target is not None:
        t1d = target.reshape(-1)
        if t1d.dtype != torch.int64:
            t1d = t1d.long()
    loss = linear_distillation_chunked(
        student_input.reshape(-1, student_input.shape[-1]),  # (N, D_s)
        student_weight,
        teacher_input.reshape(-1, teacher_input.shape[-1]),  # (N, D_t)
        teacher_weight,
        t1d,
        bias=student_bias,
        bias_t=teacher_bias,
        beta=beta,
        temperature=temperature,
        hard_weight=hard_weight,
        soft_weight=soft_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    return loss.reshape(leading) if reduction == "none" else loss


class LinearDistillationLoss(torch.nn.Module):
    """Module form of :func:`linear_distillation_loss`; holds the options, not the heads.

    ``forward(student_input, student_weight, teacher_input, teacher_weight, target=None,
    student_bias=None, teacher_bias=None)`` (as Liger's ``LigerFusedLinearJSD``, whose
    heads belong to the two models).

    Args:
        beta, temperature, hard_weight, soft_weight, ignore_index, reduction, chunk_size: see
            :func:`linear_distillation_loss`; checked here, at construction.
    """

    def __init__(
        self,
        *,
        beta: float = 0.5,
        temperature: float = 1.0,
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.beta, self.temperature, self.hard_weight, self.soft_weight = (
            _checks.check_distillation_options(beta, temperature, hard_weight, soft_weight)
        )
        self.ignore_index = _checks.check_ignore_index(ignore_index, _FN)
        self.reduction = _checks.check_reduction(reduction)
        self.chunk_size = _checks.check_chunk_size(chunk_size, _FN)

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        target: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor:
        return linear_distillation_loss(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            target,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            **module_options(self, _MODULE_OPTIONS),
        )

    def extra_repr(self) -> str:
        return options_repr(self, _MODULE_OPTIONS)
