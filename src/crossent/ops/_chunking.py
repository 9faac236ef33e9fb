"""What the chunked linear losses share: the rows a pass works on and their autograd node.

``crossent.ops.chunked`` (class-index targets) and ``crossent.ops.soft_chunked`` (probability
targets, distillation) stream the tokens through a classifier chunk by chunk, so that the N×V
logits are never held. Both

- select the rows to process (:func:`select_rows`): on the host, masked rows are dropped
  before any matmul (finding them costs a ``nonzero``, free on CPU); on an accelerator
  ``nonzero`` would synchronise the device (it breaks CUDA graphs and ``torch.compile``), so
  every row is processed and masked rows are zeroed by their gradient scale instead;
- compute their gradients outside autograd (:class:`ChunkedLoss`): for ``'mean'``/``'sum'``
  during the forward, handed to the backward, which only scales them by ``grad_output``;
  ``'none'`` needs a per-token ``grad_output`` that the forward cannot know, so its backward
  recomputes them. Double backward is refused with a RuntimeError.

A loss plugs in as a *problem* (see :class:`Problem`): its options and a ``run`` that returns
the reduced loss and the gradients of ``grad_scale · loss``.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
from torch import Tensor

from crossent.ops import _stats
from crossent.ops.eager import is_batched

__all__ = ["ChunkedLoss", "Problem", "Rows", "apply", "on_host", "select_rows"]


def on_host(t: Tensor) -> bool:
    """Whether ``t`` lives in host memory, where reading values needs no device sync.

    Decides the host-only code paths (row compaction, fused in-place softmax, skipping the
    ``grad_output`` multiply). The loss modules import it as ``_on_host`` and call it through
    their own namespace, so that the tests can patch it there to run the accelerator paths on
    CPU.
    """
    return t.device.type == "cpu"


@dataclasses.dataclass
class Rows:
    """The rows of a batch a pass processes: all of them, or only the kept ones (host)."""

    index: Tensor | None  # (M,) positions of the processed rows in the batch; None = all
    keep: Tensor | None  # (M,) bool mask over the processed rows; None = all kept
    n_total: int  # N, the rows of the batch

    @property
    def n_rows(self) -> int:
        """M, the number of processed rows."""
        return self.n_total if self.index is None else self.index.numel()

    def take(self, t: Tensor | None) -> Tensor | None:
        """The processed rows of a per-row tensor of the batch."""
        if t is None or self.index is None:
            return t
        return t.index_select(0, self.index)

    def scatter(self, values: Tensor) -> Tensor:
        """Per-processed-row ``values`` placed back at their batch positions (0 elsewhere)."""
        if self.index is None:
            return values
        out = values.new_zeros((self.n_total, *values.shape[1:]))
        out.index_copy_(0, self.index, values)
        return out

    def count(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The number of kept rows, a 0-d tensor."""
        return _stats.mean_denominator(
            self.keep, None, n_rows=self.n_rows, dtype=dtype, device=device
        )


def select_rows(keep: Tensor | None, n: int, host: bool) -> Rows:
    """The rows to process of a batch of ``n`` rows whose kept ones are ``keep`` (None: all)."""
    if keep is None:
        return Rows(None, None, n)
    if host:
        index = keep.nonzero().squeeze(1)
        return Rows(None if index.numel() == n else index, None, n)
    return Rows(None, keep, n)


class Problem(Protocol):
    """One call of a chunked loss: its options, and the pass over the chunks."""

    reduction: str
    acc: torch.dtype  # the accumulation dtype
    differentiable: tuple[bool, ...]  # per input of ``run``: whether it can get a gradient
    double_backward_message: str
    batched_message: str  # raised for a batched grad_output where no batched_backward exists

    def run(
        self,
        inputs: tuple[Tensor | None, ...],
        *,
        want_loss: bool,
        grad_scale: Tensor | None,
        needs: tuple[bool, ...],
    ) -> tuple[Tensor | None, tuple[Tensor | None, ...]]:
        """The reduced loss (output dtype; None unless ``want_loss``) and, per input, the
        gradient of ``grad_scale · loss`` where ``needs`` asks (each in its input's dtype).

        ``grad_scale`` is None (no gradients), 0-d for 'mean'/'sum', or the (N,)
        ``grad_output`` for 'none'."""
        ...


class ChunkedLoss(torch.autograd.Function):
    """Autograd node of a chunked loss: ``ChunkedLoss.apply(problem, *inputs)``."""

    @staticmethod
    def forward(ctx, problem: Problem, *inputs: Tensor | None) -> Tensor:  # type: ignore[override]
        needs = tuple(
            can and t is not None and need
            for can, t, need in zip(
                problem.differentiable, inputs, ctx.needs_input_grad[1:], strict=True
            )
        )
        ctx.problem = problem
        ctx.needs = needs
        ctx.save_for_backward(*inputs)
        if problem.reduction == "none":
            ctx.grads = None  # per-token grad_output: recompute in backward
            loss, _ = problem.run(inputs, want_loss=True, grad_scale=None, needs=needs)
            return loss
        # Gradients of the reduced loss, held until backward scales them by grad_output.
        one = torch.ones((), dtype=problem.acc, device=inputs[0].device)
        loss, ctx.grads = problem.run(inputs, want_loss=True, grad_scale=one, needs=needs)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(ctx.problem.double_backward_message)
        if is_batched(grad_output):
            # vmap over the backward: the in-place chunk sweep cannot take a batched scale.
            batched_backward = getattr(ctx.problem, "batched_backward", None)
            if batched_backward is None:
                raise NotImplementedError(ctx.problem.batched_message)
            return (None, *batched_backward(ctx.saved_tensors, grad_output, ctx.needs))
        grads = ctx.grads
        if grads is not None:
            # First backward of 'mean'/'sum': hand over the gradients the forward computed.
            # Dropping our reference lets autograd adopt them without a copy.
            ctx.grads = None
            grads = tuple(_scale_grad_(g, grad_output) for g in grads)
        else:
            # 'none', or a second backward (retain_graph=True): recompute from the inputs.
            _, grads = ctx.problem.run(
                ctx.saved_tensors, want_loss=False, grad_scale=grad_output, needs=ctx.needs
            )
        kept = (g if need else None for g, need in zip(grads, ctx.needs, strict=True))
        return (None, *kept)


def _scale_grad_(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """``grad * grad_output`` in place (the tensor is ours); skipped when grad_output is 1;
    out of place when ``grad_output`` carries a vmap batch dimension.

    Reading ``grad_output`` is free on the host; on an accelerator it would synchronise, so
    there the multiplication always runs.
    """
    if grad is None:
        return None
    if is_batched(grad_output):  # vmap over the backward (batched gradients): out of place
        return grad * grad_output.to(grad.dtype)
    if on_host(grad_output) and float(grad_output) == 1.0:
        return grad
    return grad.mul_(grad_output.to(grad.dtype))


def apply(problem: Problem, *inputs: Tensor | None) -> Tensor:
    """The loss of ``problem`` on ``inputs``: through :class:`ChunkedLoss` when a
    differentiable input requires grad, else the loss only (no gradient work)."""
    differentiable = torch.is_grad_enabled() and any(
        can and t is not None and t.requires_grad
        for can, t in zip(problem.differentiable, inputs, strict=True)
    )
    if differentiable:
        return ChunkedLoss.apply(problem, *inputs)
    loss, _ = problem.run(inputs, want_loss=True, grad_scale=None, needs=(False,) * len(inputs))
    return loss
