"""Hugging Face causal LMs: distillation from the two models' final hidden states.

:func:`lm_head_distillation_loss` is :func:`crossent.linear_distillation_loss` with the
causal-LM label shift of ``ForCausalLMLoss`` (token ``i`` is scored against label ``i + 1``),
for training loops that run the two backbones themselves. Re-exported as
``crossent.integrations.transformers.lm_head_distillation_loss``; it needs nothing from
transformers itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossent.distillation import linear_distillation_loss

__all__ = ["lm_head_distillation_loss"]


def _head(head: nn.Linear | Tensor) -> tuple[Tensor, Tensor | None]:
    if isinstance(head, Tensor):
        return head, None
    return head.weight, head.bias


def lm_head_distillation_loss(
    student_hidden: Tensor,
    student_head: nn.Linear | Tensor,
    teacher_hidden: Tensor,
    teacher_head: nn.Linear | Tensor,
    labels: Tensor | None = None,
    *,
    shift_labels: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Distillation loss of a causal LM's output embedding against a teacher's, without the
    logits of either.

    Per token :math:`i` (see :func:`crossent.linear_distillation_loss` for the divergence
    :math:`D_\beta`), with :math:`t_i` = ``labels`` shifted left by one and padded with
    ``ignore_index`` (or ``shift_labels`` as given):

    .. math::
        \mathcal{L} = \frac{1}{n} \sum_{t_i \ne \text{ignore}} s\, D_\beta(q_i, p_i)
            + h \big(-\log \mathrm{softmax}(z^S_i)_{t_i}\big)

    with :math:`n` = ``num_items_in_batch`` when given (gradient accumulation, as TRL's
    ``generalized_jsd_loss``) or the number of kept tokens (at least 1). The last position of
    each sequence has no next token and is masked, as in ``ForCausalLMLoss``. Without labels
    every position counts. The teacher's tensors receive no gradient. Logit transforms in a
    model's config (``final_logit_softcapping``, ``logit_scale``) are not applied here.

    Example::

        with torch.no_grad():
            t_hidden = teacher.model(input_ids, attention_mask=mask).last_hidden_state
        s_hidden = student.model(input_ids, attention_mask=mask).last_hidden_state
        loss = lm_head_distillation_loss(s_hidden, student.lm_head, t_hidden, teacher.lm_head,
                                         labels, beta=0.5, temperature=2.0)

    Args:
        student_hidden: ``(..., T, D_s)`` the student's final hidden states (after its norm).
        student_head: the student's output embedding (``nn.Linear``, bias allowed) or its
            ``(V, D_s)`` weight.
        teacher_hidden: ``(..., T, D_t)`` the teacher's, same leading shape.
        teacher_head: the teacher's output embedding or its ``(V, D_t)`` weight (same V).
        labels: ``(..., T)`` token ids, ``ignore_index`` where no loss is wanted; shifted here.
        shift_labels: ``(..., T)`` targets already aligned with the hidden states (instead of
            ``labels``).
        num_items_in_batch: divide the summed loss by this instead of the kept-token count.
        beta, temperature, hard_weight, soft_weight, ignore_index, chunk_size: see
            :func:`crossent.linear_distillation_loss`.

    Returns:
        A 0-d loss in float32 (float64 for float64 hidden states).

    Raises:
        Any error of :func:`crossent.linear_distillation_loss` for bad shapes, dtypes or
        options.
    """
    student_weight, student_bias = _head(student_head)
    teacher_weight, teacher_bias = _head(teacher_head)
    target = shift_labels
    if target is None and labels is not None:
        target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if target is not None:
        target = target.to(student_hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_distillation_loss(
        student_hidden,
        student_weight,
        teacher_hidden.to(student_hidden.device),
        teacher_weight,
        target,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        beta=beta,
        temperature=temperature,
        hard_weight=hard_weight,
        soft_weight=soft_weight,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_size=chunk_size,
    )
    if loss.dtype != torch.float64:
        loss = loss.float()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
