"""GPU benchmark: crossent's Triton kernels against torch and the fused-loss libraries.

    python benchmarks/bench_gpu.py                       # every shape, every implementation found
    python benchmarks/bench_gpu.py --shapes ce-logits --out results.md
    python benchmarks/bench_gpu.py --dry-run             # the plan only; runs on a CPU machine

For each reference shape (``SHAPES``: the classifier shapes of two open models, and the first
one's logits) it times forward and forward+backward (median of ``triton.testing.do_bench``, CUDA
events, after warm-up; backward is reported as the difference)
and measures the peak device memory above the inputs, weights and their gradients
(``torch.cuda.max_memory_allocated`` minus what was allocated before the call, minus the
gradients that outlive it). Every implementation runs in this one process, side by side.

Implementations (each skipped with a note when not installed or not applicable):

* ``crossent``        crossent.ops.triton (this repository's kernels)
* ``torch-eager``     F.linear + F.cross_entropy (logits materialised)
* ``torch-compile``   the same under torch.compile
* ``torch-chunked``   F.linear_cross_entropy(..., options=nn.LinearCrossEntropyOptions()) (2.13)
* ``liger``           Liger Kernel's fused linear cross entropy / cross entropy
* ``cce``, ``cce-exact``  Apple's cut_cross_entropy, default and impl="cce_exact"
* floors: ``floor-3mm`` (the three cuBLAS matmuls of the shapes: logits, grad input, grad
  weight) and ``floor-copy`` (a device copy of the logits: read once, write once).

Inputs are random (never zeros); the smallest tensor read per call (the hidden states, 64 MB for
llama3-8b) already exceeds the L2 cache, so no input rotation is needed at these shapes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SHAPES = {
    # name: (N tokens, D hidden or None for logits given, V classes, dtype)
    "llama3-8b": (8192, 4096, 128256, torch.bfloat16),
    "gemma2-2b": (8192, 2304, 256000, torch.bfloat16),
    "ce-logits": (8192, None, 128256, torch.bfloat16),
}
LINEAR_IMPLS = [
    "crossent",
    "torch-eager",
    "torch-compile",
    "torch-chunked",
    "liger",
    "cce",
    "cce-exact",
    "floor-3mm",
]
LOGIT_IMPLS = ["crossent", "torch-eager", "torch-compile", "liger", "floor-copy"]


@dataclass
class Row:
    shape: str
    impl: str
    fwd_ms: float | None = None
    fwdbwd_ms: float | None = None
    peak_mb: float | None = None
    loss_rel: float | None = None
    grad_rel: float | None = None
    note: str = ""


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _liger():
    """Liger's functional entry points, or None."""
    try:
        from liger_kernel.transformers.functional import (
            liger_cross_entropy,
            liger_fused_linear_cross_entropy,
        )
    except Exception:
        return None
    return liger_cross_entropy, liger_fused_linear_cross_entropy


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return None
    return linear_cross_entropy


def availability(impl: str) -> str:
    """'' if ``impl`` can run here, else why not."""
    if impl.startswith("floor") or impl.startswith("torch-eager"):
        return ""
    if impl == "crossent":
        import crossent.ops.triton as ct

        return "" if ct.is_available() else "needs triton and a CUDA device"
    if impl == "torch-compile":
        return ""
    if impl == "torch-chunked":
        ok = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
        return "" if ok else f"needs torch >= 2.13 (have {torch.__version__})"
    if impl == "liger":
        return "" if _liger() is not None else "liger_kernel not installed"
    if impl.startswith("cce"):
        return "" if _cce() is not None else "cut_cross_entropy not installed"
    return "unknown implementation"


def linear_loss_fn(impl: str) -> Callable:
    """fn(x, w, t) -> scalar mean loss, for the linear cross entropy implementations."""
    if impl == "crossent":
        import crossent.ops.triton as ct

        return lambda x, w, t: ct.linear_cross_entropy(x, w, t)
    if impl == "torch-eager":
        return lambda x, w, t: F.cross_entropy(F.linear(x, w), t)
    if impl == "torch-compile":
        return torch.compile(lambda x, w, t: F.cross_entropy(F.linear(x, w), t))
    if impl == "torch-chunked":
        options = torch.nn.LinearCrossEntropyOptions()
        return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)
    if impl == "liger":
        fused = _liger()[1]
        return lambda x, w, t: fused(x, w, t)
    if impl in ("cce", "cce-exact"):
        cce = _cce()
        kind = "cce" if impl == "cce" else "cce_exact"
        return lambda x, w, t: cce(x, w, t, impl=kind)
    raise ValueError(impl)


def logit_loss_fn(impl: str) -> Callable:
    """fn(logits, t) -> scalar mean loss, for cross entropy on given logits."""
    if impl == "crossent":
        import crossent.ops.triton as ct

        return lambda z, t: ct.cross_entropy(z, t)
    if impl == "torch-eager":
        return lambda z, t: F.cross_entropy(z, t)
    if impl == "torch-compile":
        return torch.compile(lambda z, t: F.cross_entropy(z, t))
    if impl == "liger":
        ce = _liger()[0]
        return lambda z, t: ce(z, t)
    raise ValueError(impl)


def _bench(fn: Callable, leaves: list[torch.Tensor], warmup: int, rep: int) -> float:
    import triton.testing

    return triton.testing.do_bench(
        fn, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median"
    )


def _measure(loss_fn, inputs, leaves, reference, args) -> Row:
    """Time forward and forward+backward, peak extra memory, and errors against ``reference``."""
    row = Row("", "")

    def forward():
        return loss_fn(*inputs)

    def forward_backward():
        forward().backward()

    for leaf in leaves:
        leaf.grad = None
    loss = forward()  # warm-up and compile outside the timed region
    loss.backward()
    if reference is not None:
        ref_loss, ref_grads = reference
        row.loss_rel = abs(loss.float().item() - ref_loss) / abs(ref_loss)
        errs = [
            ((g.float() - r.float()).norm() / r.float().norm()).item()
            for g, r in zip([leaf.grad for leaf in leaves], ref_grads, strict=True)
        ]
        row.grad_rel = max(errs)
    del loss
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward()
    torch.cuda.synchronize()
    grads = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves)
    row.peak_mb = (torch.cuda.max_memory_allocated() - before - grads) / 2**20
    row.fwd_ms = _bench(forward, leaves, args.warmup, args.rep)
    row.fwdbwd_ms = _bench(forward_backward, leaves, args.warmup, args.rep)
    for leaf in leaves:
        leaf.grad = None
    return row


def _floor_three_mm(x: torch.Tensor, w: torch.Tensor, gen, args) -> float:
    """Median time of the three matmuls of linear cross entropy: x W^T, G W and G^T x."""
    grad_logits = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype, generator=gen)

    def three_mm():
        torch.mm(x, w.t())
        torch.mm(grad_logits, w)
        torch.mm(grad_logits.t(), x)

    return _bench(three_mm, [], args.warmup, args.rep)


def run_shape(name: str, args) -> list[Row]:
    n, d, v, dtype = SHAPES[name]
    n = args.tokens or n
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    target = torch.randint(0, v, (n,), device=device, generator=gen)
    rows: list[Row] = []
    impls = [i for i in (LINEAR_IMPLS if d else LOGIT_IMPLS) if i in args.impls]
    if d:
        x = torch.randn(n, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        w = (torch.randn(v, d, device=device, dtype=dtype, generator=gen) / d**0.5).requires_grad_()
        inputs, leaves = (x, w, target), [x, w]
        make = linear_loss_fn
    else:
        z = (3 * torch.randn(n, v, device=device, dtype=dtype, generator=gen)).requires_grad_()
        inputs, leaves = (z, target), [z]
        make = logit_loss_fn
    reference = None
    try:  # torch eager is the oracle for the error columns
        loss = make("torch-eager")(*inputs)
        loss.backward()
        reference = (loss.float().item(), [leaf.grad.clone() for leaf in leaves])
        del loss
    except torch.cuda.OutOfMemoryError:
        pass
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    for impl in impls:
        why = availability(impl)
        if why:
            rows.append(Row(name, impl, note=f"skipped: {why}"))
            continue
        try:
            if impl == "floor-3mm":
                ms = _floor_three_mm(x.detach(), w.detach(), gen, args)
                rows.append(Row(name, impl, fwdbwd_ms=ms, note="3 x 2NDV FLOPs, no loss"))
                continue
            if impl == "floor-copy":
                ms = _bench(z.detach().clone, [], args.warmup, args.rep)
                rows.append(Row(name, impl, fwdbwd_ms=ms, note="read + write N x V once"))
                continue
            if impl == "liger" and not d:
                # Liger's cross entropy writes the gradient into the logits buffer (Liger #272):
                # give it its own copy so that the other implementations keep their inputs.
                own = z.detach().clone().requires_grad_()
                row = _measure(make(impl), (own, target), [own], reference, args)
                row.note = "overwrites its logits with the gradient (in place)"
                del own
            else:
                row = _measure(make(impl), inputs, leaves, reference, args)
            row.shape, row.impl = name, impl
            rows.append(row)
        except torch.cuda.OutOfMemoryError:
            rows.append(Row(name, impl, note="out of memory"))
        except Exception as exc:  # report and go on: one failing library must not stop the run
            rows.append(Row(name, impl, note=f"error: {type(exc).__name__}: {exc}"[:120]))
        finally:
            gc.collect()
            torch.cuda.empty_cache()
    return rows


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    head = (
        "| shape | implementation | fwd ms | fwd+bwd ms | bwd ms (difference) | peak extra MB "
        "| loss rel. diff vs eager | grad rel. err vs eager | note |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        bwd = r.fwdbwd_ms - r.fwd_ms if r.fwd_ms is not None and r.fwdbwd_ms else None
        lines.append(
            f"| {r.shape} | {r.impl} | {_fmt(r.fwd_ms, '.2f')} | {_fmt(r.fwdbwd_ms, '.2f')} "
            f"| {_fmt(bwd, '.2f')} | {_fmt(r.peak_mb, '.0f')} | {_fmt(r.loss_rel, '.1e')} "
            f"| {_fmt(r.grad_rel, '.1e')} | {r.note} |"
        )
    return head + "\n".join(lines) + "\n"


def header() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (
        f"GPU: {gpu}; date: {datetime.date.today().isoformat()}; "
        f"python {platform.python_version()}; torch {torch.__version__}; "
        f"triton {_version('triton')}; liger_kernel {_version('liger_kernel')}; "
        f"cut_cross_entropy {_version('cut-cross-entropy')}\n"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time crossent's Triton kernels against torch, Liger and Apple CCE on a GPU."
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=list(SHAPES),
        help="reference shapes (default: all)",
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=sorted(set(LINEAR_IMPLS + LOGIT_IMPLS)),
        default=sorted(set(LINEAR_IMPLS + LOGIT_IMPLS)),
        help="implementations to run (default: all that apply and are installed)",
    )
    parser.add_argument("--tokens", type=int, default=0, help="override N (tokens), e.g. 4096")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, milliseconds")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetition, milliseconds")
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and what is installed; run nothing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text = header()
    if args.dry_run or not torch.cuda.is_available():
        lines = [text, "Plan (dry run):" if args.dry_run else "No CUDA device: plan only."]
        for name in args.shapes:
            n, d, v, dtype = SHAPES[name]
            impls = [i for i in (LINEAR_IMPLS if d else LOGIT_IMPLS) if i in args.impls]
            dims = f"N={args.tokens or n} D={d} V={v} {str(dtype).removeprefix('torch.')}"
            lines.append(f"  {name} ({dims}):")
            for impl in impls:
                why = availability(impl)
                lines.append(f"    {impl:14s} {'ready' if not why else 'skipped: ' + why}")
        print("\n".join(lines))
        return 0 if args.dry_run else 1
    rows: list[Row] = []
    for name in args.shapes:
        rows += run_shape(name, args)
        print(table([r for r in rows if r.shape == name]), flush=True)
    text += "\n" + table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
