"""Cross-rank agreement: shard sizes, errors and fingerprints in one all-gather.

Every rank runs its local checks (``crossent._checks.distributed``), then contributes one int64
vector: an error flag, a summary of its call (:class:`LocalSummary`: shard size, token count,
dtype, options, target range and checksums of the target and the class weight) and, if a check
raised, the exception's builtin type and message. One all-gather gives every rank the same
table; every rank then runs the same checks on it (:func:`agree_on_layout`), so all of them
raise the same exception or none does, and learns its shard's offset in the global vocabulary.
"""

from __future__ import annotations

import builtins
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from crossent._checks import scalar_type_name
from crossent._checks.distributed import FLOAT_DTYPES, Options

_REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
_MESSAGE_BYTES = 512  # the exception's type name and message, as UTF-8
_CHECKSUM_MODULUS = 65521  # position weights 1..65521 make the checksum order-sensitive


def resolve_group(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """``group``, or the world; raises before any check if no process group exists."""
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
class LocalSummary:
    """What one rank tells the others about its call."""

    host: list[int] | None = None  # values of _HOST_FIELDS
    device: Tensor | None = None  # (len(_DEVICE_FIELDS),) int64 on the data's device

    @staticmethod
    def of(
        opts: Options,
        rows: Tensor,
        target: Tensor,
        weight: Tensor | None,
        shard_size: int | None = None,
        linear: bool = False,
    ) -> LocalSummary:
        """Summarize this rank's call. ``rows`` is ``(N, V_r)`` logits or ``(N, D)`` input."""
        host = {
            "shard_size": rows.shape[1] if shard_size is None else shard_size,
            "tokens": rows.shape[0],
            "dtype": FLOAT_DTYPES.index(rows.dtype),
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
        return LocalSummary([int(host[name]) for name in _HOST_FIELDS], device)


@dataclass(frozen=True)
class Layout:
    """Where this rank's classes sit in the global vocabulary."""

    offset: int | Tensor  # first global class of this shard (0-d int64 tensor if unchecked)
    vocab: int | Tensor  # V, the global vocabulary size


def agree_on_layout(
    group: dist.ProcessGroup,
    summary: LocalSummary,
    problem: Exception | None,
    device: torch.device | None,
    check_inputs: bool,
) -> Layout:
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
        return Layout(offset=sizes_t[:rank].sum(), vocab=sizes_t.sum())

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
    return Layout(offset=sum(sizes[:rank]), vocab=vocab)


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
        expected, found = FLOAT_DTYPES[first["dtype"]], FLOAT_DTYPES[info[r]["dtype"]]
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
