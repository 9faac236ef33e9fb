"""Vocab-parallel cross entropy over ``torch.distributed`` process groups.

When the classifier of a language model is sharded by vocabulary rows (tensor parallelism), each
rank holds the logits of a contiguous slice of the vocabulary: rank ``r`` owns classes
``[offset_r, offset_r + V_r)``, the slices in rank order, sizes free to differ between ranks.
The cross entropy needs only a few numbers per token from each rank, so it never gathers the
``N x V`` logits. Each rank computes over its shard (one pass, chunked over tokens)

.. math::

    m_r = \\max_{c \\in r} x_c, \\qquad s_r = \\sum_{c \\in r} e^{x_c - m_r}, \\qquad
    x_t \\text{ if } t \\in r, \\qquad \\sum_{c \\in r} w_c (m_r - x_c)

and the group combines them with one all-reduce MAX and one all-reduce SUM:

.. math::

    m = \\max_r m_r, \\qquad L = \\log \\sum_r s_r e^{m_r - m}, \\qquad \\mathrm{lse} = m + L,
    \\qquad \\Sigma = \\sum_c w_c (m - x_c) = \\sum_r \\Big[\\sum_{c \\in r} w_c (m_r - x_c)
    + W_r (m - m_r)\\Big]

The loss of a token with global target ``t`` that is not ignored is then

.. math::

    \\ell = (1-\\varepsilon)\\, w_t \\big((m - x_t) + L\\big)
          + \\frac{\\varepsilon}{V} \\big(\\Sigma + W L\\big) + z\\,\\mathrm{lse}^2,
    \\qquad W = \\sum_{c<V} w_c, \\quad W_r = \\sum_{c \\in r} w_c

(``w = 1`` without class weights). The max ``m`` and ``L`` stay apart, as in torch's
``log_softmax``, so that huge logits lose no digits to ``m + L``. This is PyTorch's
index-target cross entropy with label smoothing ``ε`` spread over the GLOBAL vocabulary ``V``
(Megatron's ``ε/V_r`` is a bug), plus an optional z-loss (PaLM) that class weights do not
scale. ``'mean'`` divides the sum by ``Σ w_t`` over non-ignored tokens (their
count without weights); all tokens ignored gives NaN with zero gradients, as in torch.

The gradient w.r.t. this rank's logits is local (``p = e^{(x - m) - L}`` with the saved ``m``
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
"""

from __future__ import annotations

import builtins
import math
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from crossent._checks import (
    Reduction,
    check_chunk_size,
    check_floating,
    check_ignore_index,
    check_index_target_dtype,
    check_label_smoothing,
    check_not_differentiable,
    check_reduction,
    check_z_loss,
    scalar_type_name,
)

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]

#: Bytes of chunk temporaries (logits, exponentials, their gradient) a call may hold at once;
#: ``chunk_size`` overrides the row count derived from it.
CHUNK_BUDGET_BYTES = 256 * 2**20

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
_MESSAGE_BYTES = 512  # the exception's type name and message, as UTF-8
_CHECKSUM_MODULUS = 65521  # position weights 1..65521 make the checksum order-sensitive


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


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
    group = _resolve_group(group)
    logits_2d = target_1d = None
    summary = _LocalSummary()
    problem: Exception | None = None
    try:
        opts = _check_options(reduction, ignore_index, label_smoothing, z_loss, chunk_size)
        _check_logits_target(logits_shard, target)
        _check_class_weight(weight, logits_shard)
        logits_2d = logits_shard.reshape(target.numel(), logits_shard.shape[-1])  # (N, V_r)
        target_1d = target.reshape(-1)  # (N,)
        summary = _LocalSummary.of(opts, logits_2d, target_1d, weight)
    except Exception as exc:  # any failure: every rank must learn of it, or the others hang
        if not check_inputs:
            raise
        problem = exc
    device = logits_shard.device if isinstance(logits_shard, Tensor) else None
    layout = _agree_on_layout(group, summary, problem, device, check_inputs)
    plan = _Plan.build(group, layout, opts, target_1d, weight, logits_2d.dtype, logits_2d.shape)
    loss = _VocabParallelCrossEntropy.apply(logits_2d, plan)
    return loss.reshape(target.shape) if opts.reduction == "none" else loss


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    weight_shard: Tensor,
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

    Equals :func:`vocab_parallel_cross_entropy` of ``F.linear(input, weight_shard,
    linear_bias_shard)`` without ever holding the ``N x V_r`` logits: tokens are processed in
    chunks of ``chunk_size`` rows (default from ``CHUNK_BUDGET_BYTES``), and the backward
    recomputes each chunk's logits from the saved per-token ``lse``. Gradients: w.r.t. the
    (replicated) ``input``, the sum over ranks of ``dlogits_r @ W_r`` (one all-reduce in the
    backward, so every rank must run the backward); w.r.t. ``weight_shard`` and
    ``linear_bias_shard``, local, accumulated in float32 for half dtypes.

    Args:
        input: ``(*, D)`` hidden states, identical on every rank (``(N, D)`` or ``(B, T, D)``).
        weight_shard: ``(V_r, D)`` classifier rows of this rank's classes, same dtype as input.
        target: ``(*)`` int64 or uint8 global class indices, shape ``input.shape[:-1]``.
        linear_bias_shard: optional ``(V_r,)`` bias of this rank's classes.
        group, weight, ignore_index, label_smoothing, reduction, z_loss, chunk_size,
        check_inputs: as in :func:`vocab_parallel_cross_entropy`.

    Returns:
        The loss in the input's dtype: shape ``target.shape`` for ``'none'``, else a scalar.

    Raises:
        The exceptions of :func:`vocab_parallel_cross_entropy`, plus ``RuntimeError`` when
        ``weight_shard``/``linear_bias_shard`` do not fit the input (shape, dtype, device), when
        the hidden size or ``requires_grad`` of the input differ across ranks.
    """
    group = _resolve_group(group)
    input_2d = target_1d = None
    summary = _LocalSummary()
    problem: Exception | None = None
    try:
        opts = _check_options(reduction, ignore_index, label_smoothing, z_loss, chunk_size)
        _check_linear(input, weight_shard, linear_bias_shard, target)
        _check_class_weight(weight, input)
        input_2d = input.reshape(target.numel(), input.shape[-1])  # (N, D)
        target_1d = target.reshape(-1)  # (N,)
        summary = _LocalSummary.of(
            opts, input_2d, target_1d, weight, shard_size=weight_shard.shape[0], linear=True
        )
    except Exception as exc:  # any failure: every rank must learn of it, or the others hang
        if not check_inputs:
            raise
        problem = exc
    device = input.device if isinstance(input, Tensor) else None
    layout = _agree_on_layout(group, summary, problem, device, check_inputs)
    logits_shape = (input_2d.shape[0], weight_shard.shape[0])
    plan = _Plan.build(group, layout, opts, target_1d, weight, input_2d.dtype, logits_shape)
    loss = _VocabParallelLinearCrossEntropy.apply(input_2d, weight_shard, linear_bias_shard, plan)
    return loss.reshape(target.shape) if opts.reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# Local argument checks (each rank, before any communication)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    reduction: Reduction
    ignore_index: int
    label_smoothing: float  # clamped at 0, as torch does for negative values
    z_loss: float
    chunk_size: int | None


def _check_options(
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int | None,
) -> _Options:
    reduction = check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index, "vocab_parallel_cross_entropy")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    label_smoothing = check_label_smoothing(label_smoothing)  # > 1 raises, < 0 means 0
    fn = "vocab_parallel_cross_entropy"
    z_loss = check_z_loss(z_loss, fn)
    chunk_size = check_chunk_size(chunk_size, fn)
    return _Options(reduction, ignore_index, label_smoothing, z_loss, chunk_size)


def _require_tensor(value: object, name: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def _check_target(
    target: Tensor, expected_shape: torch.Size, device: torch.device, what: str
) -> None:
    _require_tensor(target, "target")
    check_index_target_dtype(target)
    if target.shape != expected_shape:
        raise ValueError(
            f"Expected target of shape {what}.shape[:-1] = {list(expected_shape)}, "
            f"got target of shape {list(target.shape)} (the class dimension is the last one)"
        )
    if target.device != device:
        raise RuntimeError(f"target is on {target.device}, expected {device} like {what}")


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    _require_tensor(logits, "logits_shard")
    check_floating(logits, "vocab_parallel_cross_entropy")
    if logits.dtype not in _FLOAT_DTYPES:  # float8 and friends
        raise NotImplementedError(
            f"vocab_parallel_cross_entropy is not implemented for {logits.dtype} logits_shard; "
            "expected float16, bfloat16, float32 or float64"
        )
    if logits.dim() < 1:
        raise ValueError(
            "Expected logits_shard with 1 or more dimensions (*, V_r), got a 0-d tensor"
        )
    _check_target(target, logits.shape[:-1], logits.device, "logits_shard")


def _check_linear(input: Tensor, weight_shard: Tensor, bias: Tensor | None, target: Tensor) -> None:
    _require_tensor(input, "input")
    _require_tensor(weight_shard, "weight_shard")
    check_floating(input, "vocab_parallel_linear_cross_entropy")
    if input.dtype not in _FLOAT_DTYPES:  # float8 and friends
        raise NotImplementedError(
            f"vocab_parallel_linear_cross_entropy is not implemented for {input.dtype} input; "
            "expected float16, bfloat16, float32 or float64"
        )
    if input.dim() < 1:
        raise ValueError("Expected input with 1 or more dimensions (*, D), got a 0-d tensor")
    hidden = input.shape[-1]
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden:
        raise RuntimeError(
            f"weight_shard must have shape (V_r, D) with D = input.shape[-1] = {hidden}, "
            f"got {list(weight_shard.shape)}"
        )
    if weight_shard.dtype != input.dtype:
        raise RuntimeError(
            f"weight_shard has dtype {weight_shard.dtype}, expected the input's {input.dtype}"
        )
    if weight_shard.device != input.device:
        raise RuntimeError(
            f"weight_shard is on {weight_shard.device}, expected the input's {input.device}"
        )
    if bias is not None:
        _require_tensor(bias, "linear_bias_shard")
        if bias.shape != weight_shard.shape[:1]:
            raise RuntimeError(
                f"linear_bias_shard must have shape (V_r,) = {list(weight_shard.shape[:1])}, "
                f"got {list(bias.shape)}"
            )
        if bias.dtype != input.dtype or bias.device != input.device:
            raise RuntimeError(
                f"linear_bias_shard is {bias.dtype} on {bias.device}, expected the input's "
                f"{input.dtype} on {input.device}"
            )
    _check_target(target, input.shape[:-1], input.device, "input")


def _check_class_weight(weight: Tensor | None, reference: Tensor) -> None:
    """Dtype, device and differentiability; the size ``V`` is checked once it is known."""
    if weight is None:
        return
    _require_tensor(weight, "weight")
    if weight.dim() != 1:
        raise RuntimeError(
            "weight tensor should be defined either for all V classes or no classes: expected a "
            f"1-D class weight of shape (V,), got weight tensor of shape: {list(weight.shape)}"
        )
    if weight.dtype != reference.dtype:
        raise RuntimeError(
            f"expected scalar type {scalar_type_name(reference.dtype)} but found "
            f"{scalar_type_name(weight.dtype)}: the class weight must have the logits' dtype "
            f"({reference.dtype}), got {weight.dtype}"
        )
    if weight.device != reference.device:
        raise RuntimeError(f"weight is on {weight.device}, expected {reference.device}")
    check_not_differentiable("vocab_parallel_cross_entropy", "weight", weight)


# --------------------------------------------------------------------------------------------
# Collective agreement: shard sizes, errors and fingerprints in one all-gather
# --------------------------------------------------------------------------------------------


def _resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "crossent.distributed needs an initialized default process group: call "
            "torch.distributed.init_process_group() first"
        )
    return dist.group.WORLD if group is None else group


def _float_bits(value: float) -> int:
    return struct.unpack("<q", struct.pack("<d", value))[0]


def _checksum(values: Tensor) -> Tensor:
    """Order-sensitive integer checksum of a 1-D integer tensor (int64, wraps on overflow)."""
    position = torch.arange(values.numel(), device=values.device) % _CHECKSUM_MODULUS + 1
    return (values.long() * position).sum()


_INT_VIEW = {8: torch.int64, 4: torch.int32, 2: torch.int16}

# The int64 vector every rank contributes: an error flag, fields known on the host, fields
# computed on the data's device, then the exception's type and message (_MESSAGE_BYTES / 8
# words).
_HOST_FIELDS = (
    "shard_size", "tokens", "dtype", "hidden", "reduction", "ignore_index", "label_smoothing",
    "z_loss", "has_weight", "weight_size", "input_requires_grad",
)  # fmt: skip
_DEVICE_FIELDS = (
    "kept", "target_min", "target_max", "target_sum", "target_checksum", "weight_checksum",
)  # fmt: skip
_FIELDS = ("error", *_HOST_FIELDS, *_DEVICE_FIELDS)
_INT64_MAX, _INT64_MIN = 2**63 - 1, -(2**63)


@dataclass
class _LocalSummary:
    """What one rank tells the others about its call."""

    host: list[int] | None = None  # values of _HOST_FIELDS
    device: Tensor | None = None  # (len(_DEVICE_FIELDS),) int64 on the data's device

    @staticmethod
    def of(
        opts: _Options,
        rows: Tensor,
        target: Tensor,
        weight: Tensor | None,
        shard_size: int | None = None,
        linear: bool = False,
    ) -> _LocalSummary:
        """Summarize this rank's call. ``rows`` is ``(N, V_r)`` logits or ``(N, D)`` input."""
        host = {
            "shard_size": rows.shape[1] if shard_size is None else shard_size,
            "tokens": rows.shape[0],
            "dtype": _FLOAT_DTYPES.index(rows.dtype),
            "hidden": rows.shape[1] if linear else -1,
            "reduction": _REDUCTION_CODES[opts.reduction],
            "ignore_index": opts.ignore_index,
            "label_smoothing": _float_bits(opts.label_smoothing),
            "z_loss": _float_bits(opts.z_loss),
            "has_weight": weight is not None,
            "weight_size": -1 if weight is None else weight.numel(),
            "input_requires_grad": rows.requires_grad if linear else -1,
        }
        target = target.long()
        kept = target != opts.ignore_index
        if target.numel() > 0:
            t_min = torch.where(kept, target, _INT64_MAX).amin()
            t_max = torch.where(kept, target, _INT64_MIN).amax()
        else:
            t_min = t_max = target.new_zeros(())
        if weight is None:
            w_checksum = target.new_zeros(())
        else:  # bitwise: the class weight must be replicated exactly
            w_checksum = _checksum(weight.view(_INT_VIEW[weight.element_size()]))
        device = torch.stack(
            [kept.sum(), t_min, t_max, target.sum(), _checksum(target), w_checksum]
        )
        return _LocalSummary([int(host[name]) for name in _HOST_FIELDS], device)


@dataclass(frozen=True)
class _Layout:
    """Where this rank's classes sit in the global vocabulary."""

    offset: int | Tensor  # first global class of this shard (0-d int64 tensor if unchecked)
    vocab: int | Tensor  # V, the global vocabulary size


def _agree_on_layout(
    group: dist.ProcessGroup,
    summary: _LocalSummary,
    problem: Exception | None,
    device: torch.device | None,
    check_inputs: bool,
) -> _Layout:
    """One all-gather: shard sizes (for the offsets) plus, if checking, errors and fingerprints.

    Every rank runs the same checks on the same gathered data, so all of them raise the same
    exception or none does.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if device is None:  # this rank's data is not even a tensor; talk on the backend's device
        use_cuda = dist.get_backend(group) == dist.Backend.NCCL
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else None
        device = device or torch.device("cpu")
    if not check_inputs:
        size = torch.tensor(summary.host[:1], device=device)
        sizes = [torch.empty_like(size) for _ in range(world)]
        dist.all_gather(sizes, size, group=group)
        sizes_t = torch.cat(sizes)  # (world,), stays on the device: no host sync
        return _Layout(offset=sizes_t[:rank].sum(), vocab=sizes_t.sum())

    header = torch.zeros(1 + len(_HOST_FIELDS), dtype=torch.int64)
    device_part = torch.zeros(len(_DEVICE_FIELDS), dtype=torch.int64, device=device)
    message = bytearray(_MESSAGE_BYTES)
    if problem is None:
        try:  # a field that does not fit in int64 is a problem like any other
            header[1:] = torch.tensor(summary.host, dtype=torch.int64)
            device_part = summary.device
        except Exception as exc:
            problem = exc
    if problem is not None:
        header[0] = 1
        raw = _encode_problem(problem)
        message[: len(raw)] = raw
    message_words = torch.frombuffer(message, dtype=torch.int64)
    mine = torch.cat([header.to(device), device_part, message_words.to(device)])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()  # the one host sync
    info = [dict(zip(_FIELDS, row[: len(_FIELDS)], strict=True)) for row in table]

    for r, row in enumerate(table):
        if row[0]:
            words_of_message = torch.tensor(row[len(_FIELDS) :], dtype=torch.int64)
            raw = bytes(words_of_message.view(torch.uint8).tolist())
            exc_type, text = _decode_problem(raw)
            where = "this rank" if r == rank else f"rank {r}"
            error = exc_type(
                f"{text} (seen on {where}: rank {r} of {world} in the vocab-parallel group)"
            )
            raise error from (problem if r == rank else None)
    _check_agreement(info)
    sizes = [row["shard_size"] for row in info]
    vocab = sum(sizes)
    _check_vocab(info, vocab)
    return _Layout(offset=sum(sizes[:rank]), vocab=vocab)


def _wire_type(exc: Exception) -> type[Exception]:
    """The type every rank raises for ``exc``: its own if it is a builtin exception, else its
    nearest builtin base class (so ``NotImplementedError`` stays itself, not its base
    ``RuntimeError``, and ``torch.OutOfMemoryError`` becomes ``RuntimeError``)."""
    for cls in type(exc).__mro__:
        if getattr(builtins, cls.__name__, None) is cls and issubclass(cls, Exception):
            try:
                cls("")  # a type the other ranks can rebuild from a message alone
            except Exception:
                continue
            return cls
    return RuntimeError


def _encode_problem(exc: Exception) -> bytes:
    """``b"TypeName\\nmessage"``, cut to ``_MESSAGE_BYTES``."""
    wire = _wire_type(exc)
    text = str(exc.args[0]) if len(exc.args) == 1 else str(exc)
    if wire is not type(exc):
        text = f"{type(exc).__qualname__}: {text}"
    return f"{wire.__name__}\n{text}".encode()[:_MESSAGE_BYTES]


def _decode_problem(raw: bytes) -> tuple[type[Exception], str]:
    name, _, text = raw.rstrip(b"\0").decode("utf-8", "ignore").partition("\n")
    exc_type = getattr(builtins, name, None)
    if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
        exc_type = RuntimeError
    return exc_type, text


def _check_agreement(info: list[dict[str, int]]) -> None:
    """Raise if ranks disagree on anything that must be replicated."""
    first = info[0]

    def differing(field: str) -> int | None:
        return next((r for r, row in enumerate(info) if row[field] != first[field]), None)

    if (r := differing("dtype")) is not None:
        expected, found = _FLOAT_DTYPES[first["dtype"]], _FLOAT_DTYPES[info[r]["dtype"]]
        raise RuntimeError(
            f"expected scalar type {scalar_type_name(expected)} but found "
            f"{scalar_type_name(found)}: every rank must use one dtype, but rank 0 has {expected} "
            f"and rank {r} has {found}"
        )
    if (r := differing("tokens")) is not None:
        raise ValueError(
            f"Expected the same number of tokens N on every rank: rank 0 has N={first['tokens']}, "
            f"rank {r} has N={info[r]['tokens']}"
        )
    if (r := differing("hidden")) is not None:
        raise RuntimeError(
            f"Expected the same hidden size D on every rank: rank 0 has D={first['hidden']}, "
            f"rank {r} has D={info[r]['hidden']}"
        )
    options = ("reduction", "ignore_index", "label_smoothing", "z_loss", "has_weight")
    for field in options:
        if (r := differing(field)) is not None:
            raise ValueError(
                f"Expected the same {field} on every rank: rank 0 has "
                f"{_describe(field, first[field])}, rank {r} has {_describe(field, info[r][field])}"
            )
    if (r := differing("input_requires_grad")) is not None:
        raise RuntimeError(
            "Expected input.requires_grad to agree on every rank (the backward all-reduces the "
            f"input's gradient): rank 0 has {bool(first['input_requires_grad'])}, rank {r} has "
            f"{bool(info[r]['input_requires_grad'])}"
        )


def _describe(field: str, value: int) -> str:
    if field in ("label_smoothing", "z_loss"):
        return repr(struct.unpack("<d", struct.pack("<q", value))[0])
    if field == "reduction":
        return repr(next(k for k, v in _REDUCTION_CODES.items() if v == value))
    if field == "has_weight":
        return "a class weight" if value else "no class weight"
    return str(value)


def _check_vocab(info: list[dict[str, int]], vocab: int) -> None:
    """Target range, target and class weight replication, class weight size."""
    for r, row in enumerate(info):
        if row["kept"] == 0:
            continue
        bad = row["target_min"] if row["target_min"] < 0 else row["target_max"]
        if not 0 <= bad < vocab:
            raise IndexError(
                f"Target {bad} is out of bounds. Expected class indices in [0, {vocab}) for the "
                f"global vocabulary V = {vocab} = {' + '.join(str(x['shard_size']) for x in info)} "
                f"(shard sizes in rank order), or ignore_index = {row['ignore_index']}; seen on "
                f"rank {r}"
            )
    first = info[0]
    for r, row in enumerate(info):
        if (row["target_sum"], row["target_checksum"]) != (
            first["target_sum"], first["target_checksum"],
        ):  # fmt: skip
            raise ValueError(
                f"Expected the same target on every rank, but the target of rank {r} differs "
                "from the target of rank 0 (checksums of the class indices differ)"
            )
    for r, row in enumerate(info):
        if row["has_weight"] and row["weight_size"] != vocab:
            raise RuntimeError(
                f"weight tensor should be defined either for all {vocab} classes or no classes "
                f"but got weight tensor of shape: [{row['weight_size']}] on rank {r} (the class "
                f"weight covers the global vocabulary V = {vocab}, not the shard)"
            )
    for r, row in enumerate(info):
        if row["weight_checksum"] != first["weight_checksum"]:
            raise ValueError(
                f"Expected the same class weight on every rank, but the weight of rank {r} "
                "differs from the weight of rank 0 (bitwise checksums differ)"
            )


# --------------------------------------------------------------------------------------------
# The math, shared by both losses: per-chunk shard statistics, their combination, the gradient
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything the autograd Functions need besides the differentiable tensors."""

    group: dist.ProcessGroup
    reduction: Reduction
    label_smoothing: float
    z_loss: float
    vocab: float | Tensor  # V in the compute dtype (0-d tensor if the layout is unchecked)
    compute_dtype: torch.dtype
    rows_per_chunk: int
    keep: Tensor  # (N,) bool: target != ignore_index
    local_target: Tensor  # (N, 1) int64: target - offset where this shard owns it, else 0
    owns_target: Tensor  # (N,) bool: kept and the target class lives in this shard
    target_weight: Tensor | None  # (N,) w_t in the compute dtype, 0 where ignored
    shard_weight: Tensor | None  # (V_r,) class weights of this shard's classes
    total_weight: float | Tensor  # W = Σ_c w_c over the global vocabulary (V without weight)
    shard_total_weight: float | Tensor  # W_r = Σ_c w_c over this shard (V_r without weight)

    @staticmethod
    def build(
        group: dist.ProcessGroup,
        layout: _Layout,
        opts: _Options,
        target: Tensor,
        weight: Tensor | None,
        dtype: torch.dtype,
        logits_shape: tuple[int, int],
    ) -> _Plan:
        n_rows, shard_size = logits_shape
        compute_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        target = target.long()
        keep = target != opts.ignore_index
        local = target - layout.offset
        owns = keep & (local >= 0) & (local < shard_size)
        local_target = torch.where(owns, local, 0).unsqueeze(1)
        vocab = layout.vocab
        if isinstance(vocab, Tensor):
            vocab = vocab.to(compute_dtype)
        if weight is None:
            target_weight = shard_weight = None
            total_weight, shard_total_weight = vocab, float(shard_size)
        else:
            weight = weight.to(compute_dtype)
            target_weight = torch.where(keep, weight[torch.where(keep, target, 0)], 0)
            columns = torch.arange(shard_size, device=weight.device) + layout.offset
            shard_weight = weight.index_select(0, columns)
            total_weight, shard_total_weight = weight.sum(), shard_weight.sum()
        # Chunk temporaries per logit: the logits in the input dtype, their compute-dtype copy,
        # exponentials and gradient (compute dtype), the gradient in the input dtype.
        per_logit = 2 * torch.finfo(dtype).bits // 8 + 3 * torch.finfo(compute_dtype).bits // 8
        rows = opts.chunk_size or CHUNK_BUDGET_BYTES // (per_logit * max(shard_size, 1))
        return _Plan(
            group=group,
            reduction=opts.reduction,
            label_smoothing=opts.label_smoothing,
            z_loss=opts.z_loss,
            vocab=vocab,
            compute_dtype=compute_dtype,
            rows_per_chunk=max(1, min(rows, n_rows)),
            keep=keep,
            local_target=local_target,
            owns_target=owns,
            target_weight=target_weight,
            shard_weight=shard_weight,
            total_weight=total_weight,
            shard_total_weight=shard_total_weight,
        )

    def chunks(self) -> list[slice]:
        n = self.keep.numel()
        return [slice(s, min(s + self.rows_per_chunk, n)) for s in range(0, n, self.rows_per_chunk)]


def _shard_statistics(logits: Tensor, plan: _Plan, rows: slice) -> list[Tensor]:
    """Per-row statistics of one chunk ``(n, V_r)`` of this shard's logits, compute dtype.

    Returns ``m_r = max_c x_c`` (-inf for an empty shard), ``s_r = Σ_c e^{x_c - m_r}``, the
    target logit where this shard owns the target (else 0) and, with label smoothing,
    ``Σ_c w_c (m_r - x_c)`` (no cancellation: every term has the sign of ``w_c``).
    """
    n, shard_size = logits.shape
    if shard_size == 0:  # an empty shard adds e^{-inf} = 0 to the global sum
        row_max = logits.new_full((n,), -math.inf)
        return [row_max, logits.new_zeros(n), logits.new_zeros(n)] + (
            [logits.new_zeros(n)] if plan.label_smoothing > 0 else []
        )
    row_max = logits.amax(dim=1)  # (n,)
    shift = _finite_shift(row_max)
    sum_exp = (logits - shift[:, None]).exp_().sum(dim=1)
    target_logit = logits.gather(1, plan.local_target[rows]).squeeze(1)
    stats = [row_max, sum_exp, torch.where(plan.owns_target[rows], target_logit, 0.0)]
    if plan.label_smoothing > 0:
        below_max = shift[:, None] - logits
        if plan.shard_weight is not None:
            below_max = below_max * plan.shard_weight
        stats.append(below_max.sum(dim=1))
    return stats


def _finite_shift(row_max: Tensor) -> Tensor:
    """The max to subtract: 0 where it is -inf (all -inf would give -inf - -inf = NaN).

    A row of -inf then has ``Σ e^{x - 0} = 0`` and log-sum-exp -inf; +inf and NaN propagate.
    """
    return torch.where(row_max == -math.inf, 0.0, row_max)


@dataclass
class _GlobalStats:
    """Per-token statistics over the whole vocabulary, ``(N,)`` each, compute dtype.

    ``log_softmax(x)_c = (x_c - shift) - log_sum``: the max and the log-sum-exp stay apart, so
    that huge logits lose no digits (``lse = shift + log_sum`` would round ``log_sum`` away).
    """

    shift: Tensor  # global max logit (0 where every logit is -inf)
    log_sum: Tensor  # log Σ_c e^{x_c - shift}
    target_logit: Tensor  # x_t (0 where ignored)
    smooth: Tensor | None  # Σ_c w_c (shift - x_c), with label smoothing only

    @property
    def lse(self) -> Tensor:
        return self.shift + self.log_sum


def _combine_statistics(stats: list[Tensor], plan: _Plan) -> _GlobalStats:
    """Combine every rank's ``_shard_statistics``: one all-reduce MAX, then one SUM."""
    row_max, sum_exp, target_logit = stats[:3]
    shift = row_max.clone()  # (N,)
    dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=plan.group)
    shift = _finite_shift(shift)
    # e^{m_r - m} rescales this shard's sum to the global max; an empty shard: e^{-inf} = 0.
    parts = [sum_exp * torch.exp(row_max - shift), target_logit]
    if plan.label_smoothing > 0:
        # Σ_{c∈r} w_c (m - x_c) = Σ_{c∈r} w_c (m_r - x_c) + W_r (m - m_r)
        parts.append(stats[3] + plan.shard_total_weight * (shift - _finite_shift(row_max)))
    summed = torch.stack(parts)  # (2 or 3, N): one message
    dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=plan.group)
    smooth = summed[2] if plan.label_smoothing > 0 else None
    return _GlobalStats(shift, summed[0].log(), summed[1], smooth)


def _forward(plan: _Plan, chunk_logits) -> tuple[Tensor, _GlobalStats, Tensor | None]:
    """Loss (reduced as asked, compute dtype), the global statistics, the mean denominator.

    ``chunk_logits(rows)`` returns this shard's logits for those rows, in the compute dtype.
    """
    pieces = [_shard_statistics(chunk_logits(rows), plan, rows) for rows in plan.chunks()]
    if pieces:
        stats = [torch.cat(column) for column in zip(*pieces, strict=True)]
    else:  # N = 0
        empty = plan.keep.new_zeros(0, dtype=plan.compute_dtype)
        stats = [empty] * (4 if plan.label_smoothing > 0 else 3)
    glob = _combine_statistics(stats, plan)

    eps = plan.label_smoothing
    loss = (glob.shift - glob.target_logit) + glob.log_sum  # (N,) -log p_t
    if plan.target_weight is not None:
        loss = loss * plan.target_weight
    if eps > 0:
        # -Σ_c w_c log p_c = Σ_c w_c (shift - x_c) + W log_sum
        smooth = glob.smooth + plan.total_weight * glob.log_sum
        loss = (1 - eps) * loss + (eps / plan.vocab) * smooth
    if plan.z_loss > 0:
        loss = loss + plan.z_loss * glob.lse.square()
    loss = torch.where(plan.keep, loss, 0.0)  # ignored tokens: exactly 0, even for NaN logits

    denominator = None
    if plan.reduction == "sum":
        loss = loss.sum()
    elif plan.reduction == "mean":
        kept = plan.keep.to(plan.compute_dtype)
        denominator = kept.sum() if plan.target_weight is None else plan.target_weight.sum()
        loss = loss.sum() / denominator  # 0/0 = NaN when every token is ignored, as in torch
    return loss, glob, denominator


def _row_factors(
    plan: _Plan, grad_output: Tensor, lse: Tensor, denominator: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-row ``g_i`` (upstream gradient, 0 for ignored rows) and ``a_i`` of the gradient.

    ``dℓ_i/dx_ij = a_i p_ij - (1-ε) w_t [j = t] - (ε/V) w_j`` with
    ``a_i = (1-ε) w_t + (ε/V) W + 2 z lse_i``.
    """
    g = grad_output.to(plan.compute_dtype)
    if plan.reduction == "mean":
        g = g / denominator
    g = torch.where(plan.keep, g.reshape(-1) if plan.reduction == "none" else g, 0.0)
    eps = plan.label_smoothing
    a = (1 - eps) * (1.0 if plan.target_weight is None else plan.target_weight)
    a = a + (eps / plan.vocab) * plan.total_weight if eps > 0 else a
    a = a + 2 * plan.z_loss * lse if plan.z_loss > 0 else a
    return g, torch.as_tensor(a, dtype=plan.compute_dtype, device=lse.device).expand_as(lse)


def _shard_logit_grad(
    logits: Tensor,
    shift: Tensor,
    log_sum: Tensor,
    g: Tensor,
    a: Tensor,
    plan: _Plan,
    rows: slice,
) -> Tensor:
    """Gradient ``(n, V_r)`` w.r.t. one chunk of this shard's logits, compute dtype.

    Uses only local data and the saved global statistics: no communication.
    """
    grad = (logits - shift[:, None]).sub_(log_sum[:, None]).exp_()  # global softmax, this shard
    grad *= (g * a)[:, None]
    eps = plan.label_smoothing
    if eps > 0:
        uniform = g[:, None] * (eps / plan.vocab)
        grad -= uniform if plan.shard_weight is None else uniform * plan.shard_weight
    if logits.shape[1] > 0:
        on_target = g * (1 - eps)
        if plan.target_weight is not None:
            on_target = on_target * plan.target_weight[rows]
        on_target = torch.where(plan.owns_target[rows], on_target, 0.0)
        grad.scatter_add_(1, plan.local_target[rows], -on_target[:, None])
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Logits sharded by vocabulary -> loss. Backward: local, no communication."""

    @staticmethod
    def forward(ctx, logits: Tensor, plan: _Plan) -> Tensor:  # logits (N, V_r)
        def chunk_logits(rows: slice) -> Tensor:
            return logits[rows].to(plan.compute_dtype)

        loss, glob, denominator = _forward(plan, chunk_logits)
        ctx.save_for_backward(logits, glob.shift, glob.log_sum)
        ctx.plan, ctx.denominator = plan, denominator
        return loss.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None]:
        logits, shift, log_sum = ctx.saved_tensors
        plan: _Plan = ctx.plan
        g, a = _row_factors(plan, grad_output, shift + log_sum, ctx.denominator)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        for rows in plan.chunks():
            chunk = logits[rows].to(plan.compute_dtype)
            grad[rows] = _shard_logit_grad(
                chunk, shift[rows], log_sum[rows], g[rows], a[rows], plan, rows
            )
        return grad, None


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Replicated input, classifier sharded by vocabulary rows -> loss, chunked over tokens.

    Backward: recomputes each chunk's logits; one all-reduce of the input's gradient.
    """

    @staticmethod
    def forward(
        ctx, input: Tensor, weight_shard: Tensor, bias_shard: Tensor | None, plan: _Plan
    ) -> Tensor:  # input (N, D), weight_shard (V_r, D)
        def chunk_logits(rows: slice) -> Tensor:
            return F.linear(input[rows], weight_shard, bias_shard).to(plan.compute_dtype)

        loss, glob, denominator = _forward(plan, chunk_logits)
        ctx.save_for_backward(input, weight_shard, bias_shard, glob.shift, glob.log_sum)
        ctx.plan, ctx.denominator = plan, denominator
        return loss.to(input.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        input, weight_shard, bias_shard, shift, log_sum = ctx.saved_tensors
        plan: _Plan = ctx.plan
        need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
        g, a = _row_factors(plan, grad_output, shift + log_sum, ctx.denominator)
        # Weight and bias gradients accumulate over chunks in the compute dtype (fp32 for half).
        grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
        grad_input = grad_input if need_input else None
        grad_weight = torch.zeros_like(weight_shard, dtype=plan.compute_dtype)
        grad_weight = grad_weight if need_weight else None
        grad_bias = torch.zeros_like(bias_shard, dtype=plan.compute_dtype) if need_bias else None
        for rows in plan.chunks():
            x = input[rows]  # (n, D)
            logits = F.linear(x, weight_shard, bias_shard).to(plan.compute_dtype)
            grad_logits = _shard_logit_grad(
                logits, shift[rows], log_sum[rows], g[rows], a[rows], plan, rows
            )
            grad_logits_io = grad_logits.to(input.dtype)  # what torch's linear backward sees
            if grad_input is not None:
                torch.mm(grad_logits_io, weight_shard, out=grad_input[rows])
            if grad_weight is not None:
                if grad_weight.dtype == input.dtype:
                    grad_weight.addmm_(grad_logits_io.t(), x)
                else:
                    grad_weight += (grad_logits_io.t() @ x).to(grad_weight.dtype)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
        if grad_input is not None:
            # input is replicated, so its gradient is the sum of every shard's contribution.
            dist.all_reduce(grad_input, op=dist.ReduceOp.SUM, group=plan.group)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_shard.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias_shard.dtype)
        return grad_input, grad_weight, grad_bias, None
