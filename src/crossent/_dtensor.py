"""DTensor arguments of the drop-in losses: torch's layouts, crossent's exact arithmetic.

The public functions of ``crossent.functional`` and ``crossent.linear`` hand their arguments
here when one of them is a ``torch.distributed.tensor.DTensor`` (:func:`involved`: a set
look-up per argument for plain tensors; a process that never imported
``torch.distributed.tensor`` holds no DTensor and imports nothing). The layout picks the route:

* **Logits sharded on the class dimension** (``Shard(1)``, or ``Shard(0)`` for unbatched
  logits, on a one-dimensional mesh; class weight replicated or plain):

  - ``cross_entropy`` with class indices (target replicated or plain) runs
    :func:`crossent.distributed.vocab_parallel_cross_entropy` on ``logits.to_local()`` over
    the mesh's process group: O(N) communication, the logits never gathered, every option
    exact (class weight, ``ignore_index`` including every target ignored, label smoothing,
    each reduction).
  - ``cross_entropy`` with probability targets (sharded like the logits, or replicated) and
    ``nll_loss`` are computed here exactly (``crossent._dtensor_classes``).

  The same route is taken with or without torch's ``loss_parallel()``, so no flag of torch is
  read: the values are torch's single-process ones, the result is a ``Replicate()`` DTensor
  (torch returns ``Replicate()`` with class indices, ``Partial(sum)`` with probabilities), and
  the gradient w.r.t. the logits has the logits' placement (torch without ``loss_parallel()``
  gathers the logits and returns it replicated).
* **Replicated arguments** (every mesh dimension ``Replicate``; plain tensors count as
  replicated, where torch raises "mixed torch.Tensor and DTensor"): crossent's loss on the
  local tensors, returned as a ``Replicate()`` DTensor.
* **Batch-sharded arguments** (one-dimensional mesh, ``Shard(d)`` on a dimension other than
  the class dimension, the target a DTensor sharded on the matching dimension; the binary
  losses take any ``Shard(d)``): crossent's loss on the local shards. ``'none'`` gives the
  target's placement and ``'sum'`` a ``Partial()`` DTensor, as torch. ``'mean'`` divides the
  local sum by the global denominator (the kept rows' class weights, all-reduced; or the global
  count) and returns ``Partial()``: torch returns ``Partial(avg)`` of the per-rank means,
  which is wrong unless every rank holds the same count and class weight (torch raises for
  uneven shards of the class-index losses, and is silently wrong otherwise).
* **Everything else** (multi-dimensional meshes with a sharded dimension, ``Partial``
  placements, a plain target beside sharded logits, ...) goes to ``torch.nn.functional``
  unchanged: torch's behaviour, errors included.

``linear_cross_entropy`` with the classifier a DTensor sharded on the vocabulary (``Shard(0)``
on a one-dimensional mesh, the bias ``Shard(0)`` or absent, class-index targets, no soft-cap)
and the input a replicated DTensor or a plain tensor identical on every rank runs
:func:`crossent.distributed.vocab_parallel_linear_cross_entropy` on the local shards: the
gradients w.r.t. classifier and bias are DTensors with their placements (torch gathers the
classifier and returns them replicated), the input's is replicated. Vocabularies that the mesh
does not divide follow DTensor's ``torch.chunk`` layout, which the vocab-parallel losses
accept. Every rank must hold the same input and target: one small all-reduce compares
fingerprints of a plain input (the vocab-parallel checks compare the targets), and every rank
raises ``ValueError`` together when they differ. With the tokens sharded instead (input and
target ``Shard(d)`` alike, classifier a replicated DTensor) the loss is computed on the local
tokens with torch's placements and the exact global mean, the classifier's gradient left
``Partial(sum)`` as torch's matmul leaves it. Replicated arguments compute locally; other
layouts raise ``NotImplementedError``.

A parameter of a ``fully_shard``-ed module used outside the module's forward is such a
DTensor (FSDP2 shards parameters on dim 0 over its mesh), and it is treated as the vocabulary
shard it is: with the same input on every rank the loss is exact, the gradient lands in
``param.grad`` with the parameter's placement, and an optimizer step equals the unsharded
model's. With rank-local data (data parallelism) the inputs differ, and the call raises a
``ValueError`` that says to compute the loss inside the module's forward (where FSDP gathers
the weight) or to gather it first with ``module.unshard()``.

Measured on 2 ranks (gloo, float64, ``tests/test_dtensor.py``); "exact" means value and
gradient equal single-process torch to 1e-10::

    layout / option                         crossent                  torch 2.13 on the call
    class-sharded CE, loss_parallel()       exact, Replicate          exact, Replicate
      + label_smoothing                     exact                     raises (mixed Tensor)
      + class weight and ignored targets    exact                     raises (index -100)
      + probability targets                 exact, Replicate          Partial(sum), wrong grad
    class-sharded CE, no loss_parallel()    exact, grad sharded       exact, gathers logits
      + plain class weight or target        exact                     raises (mixed Tensor)
    class-sharded NLL, loss_parallel()      exact, Replicate          wrong gradient; raises
                                                                      with weight + ignored
    class-sharded NLL, no loss_parallel()   exact, Replicate          exact (DTensor args)
    replicated CE / NLL / BCE(+logits)      exact, Replicate          exact (DTensor target
                                                                      and weight only)
    batch-sharded, 'none' / 'sum'           exact, Shard(d) / Partial  same
    batch-sharded, 'mean'                   exact, Partial(sum)       Partial(avg): raises for
                                                                      uneven CE/NLL shards,
                                                                      wrong for BCE ones and
                                                                      for class weights
    linear CE, Shard(0) classifier          exact, grads Shard(0)     plain input: raises;
                                                                      replicated: grads
                                                                      Replicate
    linear CE, tokens sharded               exact, torch's placements  Partial(avg) mean

Longer than 500 lines as one mechanism: the layout analysis and the route of each public
function; the arithmetic of class-sharded NLL and probability targets is in
``crossent._dtensor_classes``.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "involved",
    "linear_cross_entropy",
    "nll_loss",
]

_MODULE = "torch.distributed.tensor"


def _dtensor_class() -> type | None:
    """``DTensor`` if ``torch.distributed.tensor`` was imported (no DTensor exists otherwise)."""
    module = sys.modules.get(_MODULE)
    return None if module is None else getattr(module, "DTensor", None)


_PLAIN_TYPES = {type(None), Tensor, torch.nn.Parameter}


def involved(*tensors: object) -> bool:
    """Whether one of ``tensors`` is a DTensor; imports nothing, and costs a set look-up per
    argument when they are plain tensors, parameters or None."""
    for t in tensors:
        if type(t) not in _PLAIN_TYPES:
            cls = _dtensor_class()
            if cls is not None and isinstance(t, cls):
                return True
    return False


# --------------------------------------------------------------------------------------------
# Layouts.


def _is_dtensor(t: object) -> bool:
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _replicated(t: object, mesh=None) -> bool:
    """None, a plain tensor, or a DTensor replicated on every dimension of ``mesh``."""
    if not _is_dtensor(t):
        return True
    return (mesh is None or t.device_mesh == mesh) and all(p.is_replicate() for p in t.placements)


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _shard_dim(t) -> int | None:
    """``d`` when ``t`` is a DTensor on a one-dimensional mesh with placement ``Shard(d)``."""
    if not _is_dtensor(t) or t.device_mesh.ndim != 1 or not t.placements[0].is_shard():
        return None
    return t.placements[0].dim % max(t.dim(), 1)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def _wrap(loss: Tensor, mesh, placements, shape: tuple[int, ...]):
    from torch.distributed.tensor import DTensor

    shape = tuple(shape)
    return DTensor.from_local(
        loss, mesh, placements, run_check=False, shape=torch.Size(shape),
        stride=_contiguous_stride(shape),
    )  # fmt: skip


def _all_reduce_sum(value: Tensor, mesh) -> Tensor:
    value = value.detach().clone()
    torch.distributed.all_reduce(value, group=mesh.get_group())
    return value


def _batch_layout(input, target, target_dim_of) -> tuple | None:
    """``(mesh, input_placements, output_placement_for_none)`` for replicated or batch-sharded
    ``input``/``target``, else None. ``target_dim_of(d)`` maps a sharded input dimension to
    the target's (None: not a batch dimension)."""
    from torch.distributed.tensor import Replicate, Shard

    if not (_is_dtensor(input) or _is_dtensor(target)):
        return None
    mesh = (input if _is_dtensor(input) else target).device_mesh
    if _replicated(input, mesh) and _replicated(target, mesh):
        return mesh, "replicated", [Replicate()] * mesh.ndim
    d = _shard_dim(input)
    if d is None or not _is_dtensor(target) or target.device_mesh != mesh:
        return None
    td = target_dim_of(d)
    if td is None or _shard_dim(target) != td:
        return None
    return mesh, "sharded", [Shard(td)]


def _finish(loss, mesh, kind, none_placements, reduction, out_shape, denominator):
    """Wrap a local loss: ``'none'`` as computed; ``'sum'``/``'mean'`` of sharded inputs as a
    ``Partial()`` DTensor, the mean divided by ``denominator()`` (the global one). A zero
    denominator (every target ignored) gives NaN and zero gradients, as torch."""
    from torch.distributed.tensor import Partial, Replicate

    if reduction == "none":
        return _wrap(loss, mesh, none_placements, out_shape)
    if kind == "replicated":
        return _wrap(loss, mesh, [Replicate()] * mesh.ndim, ())
    if reduction == "mean":
        total = denominator().to(loss.dtype)
        empty = total == 0
        loss = torch.where(empty, math.nan, loss / torch.where(empty, 1.0, total))
    return _wrap(loss, mesh, [Partial()], ())


def _reduction(size_average, reduce, reduction) -> str:
    from crossent import _checks

    return _checks.resolve_reduction(size_average, reduce, reduction)


# --------------------------------------------------------------------------------------------
# Class-index losses.


def _class_dim(input: Tensor) -> int:
    return 1 if input.dim() >= 2 else 0


def _index_target_dim(class_dim: int):
    return lambda d: d if d < class_dim else (d - 1 if d > class_dim else None)


def _index_denominator(target, weight, ignore_index: int, mesh, dtype):
    from crossent.ops import _stats

    def denominator() -> Tensor:
        t = _local(target).reshape(-1)
        keep = t != ignore_index
        w = _local(weight)
        w_t = None if w is None else _stats.target_weight(w, torch.where(keep, t, 0).long())
        local = _stats.mean_denominator(keep, w_t, n_rows=t.numel(), dtype=dtype, device=t.device)
        return _all_reduce_sum(local, mesh)

    return denominator


def _index_batch(fn, input, target, weight, ignore_index, reduction, **options):
    class_dim = _class_dim(input)
    layout = _batch_layout(input, target, _index_target_dim(class_dim))
    if layout is None or not _replicated(weight, layout[0]):
        return None
    mesh, kind, none_placements = layout
    local_reduction = "sum" if (kind == "sharded" and reduction == "mean") else reduction
    loss = fn(
        _local(input), _local(target), _local(weight), ignore_index=ignore_index,
        reduction=local_reduction, **options,
    )  # fmt: skip
    dtype = loss.dtype
    denominator = _index_denominator(target, weight, ignore_index, mesh, dtype)
    return _finish(loss, mesh, kind, none_placements, reduction, target.shape, denominator)


def _class_sharded(input, target, weight) -> bool:
    """Logits sharded on the class dimension of a 1-D mesh, index target and weight replicated."""
    if _shard_dim(input) != _class_dim(input) or input.shape == target.shape:
        return False
    mesh = input.device_mesh
    return _replicated(target, mesh) and _replicated(weight, mesh)


def cross_entropy(
    input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction="mean", label_smoothing=0.0,
):  # fmt: skip
    """``crossent.cross_entropy`` with a DTensor argument (see the module docstring)."""
    from crossent import _checks, _dtensor_classes, functional

    red = _reduction(size_average, reduce, reduction)
    if _is_dtensor(input) and _class_sharded(input, target, weight):
        from torch.distributed.tensor import Replicate

        from crossent.distributed import vocab_parallel_cross_entropy

        ignore = _checks.check_ignore_index(ignore_index, "cross_entropy_loss")
        shard = input.to_local().movedim(_class_dim(input), -1)
        mesh = input.device_mesh
        loss = vocab_parallel_cross_entropy(
            shard, _local(target), group=mesh.get_group(), weight=_local(weight),
            ignore_index=ignore, label_smoothing=label_smoothing, reduction=red,
        )  # fmt: skip
        return _wrap(loss, mesh, [Replicate()], loss.shape)
    if input.shape == target.shape and input.dim() >= 1:
        result = _dtensor_classes.probability_cross_entropy(
            input, target, weight, red, label_smoothing, ignore_index
        )
        if result is not None:
            return result
        result = _probability_batch(
            functional.cross_entropy, input, target, weight, red, ignore_index=ignore_index,
            label_smoothing=label_smoothing,
        )  # fmt: skip
    else:
        result = _index_batch(
            functional.cross_entropy, input, target, weight, ignore_index, red,
            label_smoothing=label_smoothing,
        )  # fmt: skip
    if result is not None:
        return result
    return F.cross_entropy(
        input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
    )


def _probability_batch(fn, input, target, weight, reduction, **options):
    class_dim = _class_dim(input)
    layout = _batch_layout(input, target, lambda d: d if d != class_dim else None)
    if layout is None or not _replicated(weight, layout[0]):
        return None
    mesh, kind, placements = layout
    if kind == "sharded":
        from torch.distributed.tensor import Shard

        d = placements[0].dim
        placements = [Shard(d if d < class_dim else d - 1)]
    local_reduction = "sum" if (kind == "sharded" and reduction == "mean") else reduction
    loss = fn(_local(input), _local(target), _local(weight), reduction=local_reduction, **options)
    out_shape = tuple(s for i, s in enumerate(input.shape) if i != class_dim)
    rows = torch.tensor(float(math.prod(out_shape)), dtype=torch.float64)
    return _finish(loss, mesh, kind, placements, reduction, out_shape, lambda: rows)


def nll_loss(
    input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction="mean",
):  # fmt: skip
    """``crossent.nll_loss`` with a DTensor argument (see the module docstring)."""
    from crossent import _dtensor_classes, functional

    red = _reduction(size_average, reduce, reduction)
    if _is_dtensor(input) and _class_sharded(input, target, weight):
        result = _dtensor_classes.nll_loss(input, target, weight, ignore_index, red)
    else:
        result = _index_batch(functional.nll_loss, input, target, weight, ignore_index, red)
    if result is not None:
        return result
    return F.nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction)


# --------------------------------------------------------------------------------------------
# Binary losses (elementwise: any Shard(d) is a batch layout).


def _binary_batch(fn, input, target, reduction, broadcast, **options):
    layout = _batch_layout(input, target, lambda d: d)
    if layout is None:
        return None
    mesh, kind, placements = layout
    for extra in broadcast:
        if not _replicated(extra, mesh):
            return None
        if kind == "sharded" and extra is not None:
            # a weight that varies along the sharded dimension would need slicing
            d, offset = placements[0].dim, input.dim() - extra.dim()
            if d >= offset and extra.shape[d - offset] != 1:
                return None
    local_reduction = "sum" if (kind == "sharded" and reduction == "mean") else reduction
    local_options = {k: _local(v) for k, v in options.items()}
    loss = fn(_local(input), _local(target), reduction=local_reduction, **local_options)
    count = torch.tensor(float(input.numel()), dtype=torch.float64)
    return _finish(loss, mesh, kind, placements, reduction, input.shape, lambda: count)


def binary_cross_entropy(
    input, target, weight=None, size_average=None, reduce=None, reduction="mean"
):
    """``crossent.binary_cross_entropy`` with a DTensor argument (see the module docstring)."""
    from crossent import functional

    red = _reduction(size_average, reduce, reduction)
    result = _binary_batch(functional.binary_cross_entropy, input, target, red, (weight,),
                           weight=weight)  # fmt: skip
    if result is not None:
        return result
    return F.binary_cross_entropy(input, target, weight, size_average, reduce, reduction)


def binary_cross_entropy_with_logits(
    input, target, weight=None, size_average=None, reduce=None, reduction="mean",
    pos_weight=None,
):  # fmt: skip
    """``crossent.binary_cross_entropy_with_logits`` with a DTensor argument (module
    docstring)."""
    from crossent import functional

    red = _reduction(size_average, reduce, reduction)
    result = _binary_batch(
        functional.binary_cross_entropy_with_logits, input, target, red, (weight, pos_weight),
        weight=weight, pos_weight=pos_weight,
    )  # fmt: skip
    if result is not None:
        return result
    return F.binary_cross_entropy_with_logits(
        input, target, weight, size_average, reduce, reduction, pos_weight
    )


# --------------------------------------------------------------------------------------------
# Linear cross entropy.

_SAME_INPUT = (
    "linear_cross_entropy with a classifier sharded on the vocabulary (a DTensor with "
    "placement Shard(0): a tensor-parallel lm_head, or the parameter of a fully_shard-ed module "
    "used outside the module's forward) needs the same input and target on every rank of its "
    "mesh, but the inputs differ across ranks. With FSDP2, compute the loss inside the "
    "module's forward (where FSDP gathers the weight), or gather it first with "
    "module.unshard()."
)


_LINEAR_NAMES = ("input", "linear_weight", "target", "linear_bias", "weight")


def _check_same_everywhere(input: Tensor, mesh) -> None:
    """Raise on every rank when ``input`` differs across the mesh (one small all-reduce)."""
    values = torch.nan_to_num(input.detach().reshape(-1).double(), nan=1.5, posinf=2.5,
                              neginf=-2.5)  # fmt: skip
    position = torch.arange(values.numel(), dtype=torch.float64, device=values.device)
    position = position.remainder(65521) + 1
    fingerprint = torch.stack(
        [values.sum(), (values * position).sum(), torch.tensor(values.numel() + 0.0)]
    )
    both = torch.cat([fingerprint, -fingerprint])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group())
    if not torch.equal(both[:3], -both[3:]):
        raise ValueError(_SAME_INPUT)


def _linear_batch(input, linear_weight, target, linear_bias, weight, softcap, options):
    """Input and class-index target sharded alike on a token dimension, classifier (and bias) a
    replicated DTensor: crossent's loss on the local tokens, the classifier's gradient summed
    over the mesh (``Partial`` gradients of ``to_local``)."""
    from torch.distributed.tensor import Partial, Shard

    from crossent import _checks, linear

    d = _shard_dim(input)
    if d is None or d >= input.dim() - 1 or not _is_dtensor(linear_weight):
        return None
    mesh = input.device_mesh
    if not (
        _is_dtensor(target)
        and target.device_mesh == mesh
        and _shard_dim(target) == d
        and target.dim() == input.dim() - 1
        and all(_replicated(t, mesh) for t in (linear_weight, linear_bias, weight))
    ):
        return None
    reduction = _checks.check_reduction(options["reduction"])

    def summed_gradient(t):
        return t.to_local(grad_placements=[Partial()]) if _is_dtensor(t) else t

    local_options = {**options, "reduction": "sum" if reduction == "mean" else reduction}
    loss = linear.linear_cross_entropy(
        input.to_local(), summed_gradient(linear_weight), target.to_local(),
        linear_bias=summed_gradient(linear_bias), softcap=softcap, **local_options,
    )  # fmt: skip
    denominator = _index_denominator(target, weight, options["ignore_index"], mesh, loss.dtype)
    return _finish(loss, mesh, "sharded", [Shard(d)], reduction, target.shape, denominator)


def linear_cross_entropy(
    input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
    ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None,
):  # fmt: skip
    """``crossent.linear_cross_entropy`` with a DTensor argument (see the module docstring)."""
    from torch.distributed.tensor import Replicate

    from crossent import linear

    options = dict(
        weight=_local(weight), reduction=reduction,
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size,
    )  # fmt: skip
    vocab_sharded = _shard_dim(linear_weight) == 0 and linear_weight.dim() == 2
    if vocab_sharded:
        mesh = linear_weight.device_mesh
        bias_ok = linear_bias is None or (
            _shard_dim(linear_bias) == 0 and linear_bias.device_mesh == mesh
        )
        index_target = not (
            isinstance(target, Tensor) and target.is_floating_point()
        )  # probability targets are not vocab-parallel
        if (
            bias_ok
            and index_target
            and softcap is None
            and all(_replicated(t, mesh) for t in (input, target, weight))
        ):
            from crossent.distributed import vocab_parallel_linear_cross_entropy

            if not _is_dtensor(input):
                _check_same_everywhere(input, mesh)
            loss = vocab_parallel_linear_cross_entropy(
                _local(input), linear_weight.to_local(), _local(target),
                linear_bias_shard=_local(linear_bias), group=mesh.get_group(), **options,
            )  # fmt: skip
            return _wrap(loss, mesh, [Replicate()], loss.shape)
    batch = _linear_batch(input, linear_weight, target, linear_bias, weight, softcap, options)
    if batch is not None:
        return batch
    tensors = (input, linear_weight, target, linear_bias, weight)
    meshes = {t.device_mesh for t in tensors if _is_dtensor(t)}
    if len(meshes) == 1 and all(_replicated(t) for t in tensors):
        (mesh,) = meshes
        loss = linear.linear_cross_entropy(
            _local(input), _local(linear_weight), _local(target),
            linear_bias=_local(linear_bias), softcap=softcap, **options,
        )  # fmt: skip
        return _wrap(loss, mesh, [Replicate()] * mesh.ndim, loss.shape)
    layouts = {
        name: (tuple(t.placements) if _is_dtensor(t) else "plain tensor")
        for name, t in zip(_LINEAR_NAMES, tensors, strict=True)
        if t is not None
    }
    raise NotImplementedError(
        "linear_cross_entropy supports DTensor arguments when linear_weight is sharded on the "
        "vocabulary (Shard(0) on a one-dimensional mesh, linear_bias Shard(0) or None, class-"
        "index target, no softcap) with input, target and weight replicated or plain; when "
        "input and target are sharded alike on a token dimension and linear_weight, linear_bias "
        f"and weight are replicated; or when every argument is replicated; got {layouts}"
    )
