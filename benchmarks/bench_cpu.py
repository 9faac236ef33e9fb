"""CPU benchmark: crossent vs torch, side by side in one run (time and peak extra memory).

Two tables, forward + backward each:

1. Linear cross entropy on (N, D) hidden states and a (V, D) classifier, float32:
   crossent ``linear_cross_entropy``; torch eager ``F.linear`` + ``F.cross_entropy``; torch 2.13
   ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``; and the floor, the
   three ``torch.mm`` of the same shapes that any exact method must do (logits, gradient
   w.r.t. the input, gradient w.r.t. the weight).
2. Cross entropy on given (N, V) logits: ``crossent.cross_entropy`` vs torch eager
   ``F.cross_entropy``; the floor is one copy of the logits (the gradient has to be written).

Time: the median of several repeats, the variants interleaved round by round so that the
noise of a shared machine hits them alike. Memory: each variant runs once in a fresh
subprocess; peak extra = the RSS high-water mark after the call (``VmHWM``, reset just before
the call; ``ru_maxrss`` where that is not possible) minus the resident set size before it.
Inputs, weights and libraries are loaded before the "before" reading; gradients, which every
variant must produce, count in the extra.

Usage::

    python benchmarks/bench_cpu.py              # N=2048, D=512, V=32000 (the reference shape)
    python benchmarks/bench_cpu.py --quick      # small shapes, seconds; keeps the script alive
    python benchmarks/bench_cpu.py --markdown benchmarks/results_cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _harness import machine, median_times, peak_extra_bytes  # noqa: E402

import crossent  # noqa: E402

FULL = {"n": 2048, "d": 512, "v": 32000, "repeats": 7}
QUICK = {"n": 256, "d": 64, "v": 1000, "repeats": 3}

LINEAR_VARIANTS = ("crossent", "torch eager", "torch chunked", "floor (3 mm)")
CE_VARIANTS = ("crossent", "torch eager", "floor (copy)")


# --------------------------------------------------------------------------------------------
# The variants. Each builder returns a closure that runs forward + backward once.


def _linear_inputs(n: int, d: int, v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * d**-0.5  # logits of unit scale
    t = torch.randint(0, v, (n,), generator=gen)
    return x, w, t


def build_linear(name: str, n: int, d: int, v: int) -> Callable[[], object]:
    x, w, t = _linear_inputs(n, d, v)

    def leaves() -> tuple[torch.Tensor, torch.Tensor]:
        return x.detach().requires_grad_(), w.detach().requires_grad_()

    if name == "crossent":

        def run() -> object:
            xx, ww = leaves()
            crossent.linear_cross_entropy(xx, ww, t).backward()
            return xx.grad, ww.grad

    elif name == "torch eager":

        def run() -> object:
            xx, ww = leaves()
            F.cross_entropy(F.linear(xx, ww), t).backward()
            return xx.grad, ww.grad

    elif name == "torch chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def run() -> object:
            xx, ww = leaves()
            F.linear_cross_entropy(xx, ww, t, options=options).backward()
            return xx.grad, ww.grad

    elif name == "floor (3 mm)":

        def run() -> object:
            logits = torch.mm(x, w.T)  # (N, V)
            return torch.mm(logits, w), torch.mm(logits.T, x)  # (N, D), (V, D)

    else:
        raise ValueError(f"unknown linear variant {name!r}")
    return run


def build_ce(name: str, n: int, d: int, v: int) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=gen)
    t = torch.randint(0, v, (n,), generator=gen)

    if name == "crossent":

        def run() -> object:
            z = logits.detach().requires_grad_()
            crossent.cross_entropy(z, t).backward()
            return z.grad

    elif name == "torch eager":

        def run() -> object:
            z = logits.detach().requires_grad_()
            F.cross_entropy(z, t).backward()
            return z.grad

    elif name == "floor (copy)":

        def run() -> object:
            return logits.clone()

    else:
        raise ValueError(f"unknown cross-entropy variant {name!r}")
    return run


BUILDERS = {"linear": build_linear, "ce": build_ce}


# --------------------------------------------------------------------------------------------
# Measurement.


def memory_worker(kind: str, name: str, n: int, d: int, v: int) -> dict[str, float]:
    """Runs in a fresh process: peak extra resident memory of one forward + backward."""
    # Warm the libraries (thread pools, BLAS buffers) on tiny shapes first.
    BUILDERS[kind](name, 8, 4, 16)()
    run = BUILDERS[kind](name, n, d, v)
    return {"extra_mb": peak_extra_bytes(run) / 2**20}


def measure_memory(kind: str, name: str, n: int, d: int, v: int) -> float:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--memory-worker",
        json.dumps({"kind": kind, "name": name, "n": n, "d": d, "v": v}),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def measure_times(
    kind: str, names: tuple[str, ...], n: int, d: int, v: int, repeats: int
) -> dict[str, float]:
    """Median seconds per variant; variants interleaved round by round, after one warm-up."""
    return median_times({name: BUILDERS[kind](name, n, d, v) for name in names}, repeats)


# --------------------------------------------------------------------------------------------
# Report.


def table(
    title: str,
    names: tuple[str, ...],
    times: dict[str, float],
    mems: dict[str, float],
    floor: str,
) -> str:
    eager_t, eager_m = times["torch eager"], mems["torch eager"]
    lines = [
        f"### {title}",
        "",
        "| variant | time (ms) | × torch eager | × floor | peak extra memory (MB) | "
        "× torch eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        t, m = times[name], mems[name]
        lines.append(
            f"| {name} | {t * 1e3:.4g} | {t / eager_t:.2f} | {t / times[floor]:.2f} | "
            f"{m:.1f} | {m / eager_m if eager_m else float('nan'):.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables to PATH")
    parser.add_argument("--memory-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_worker:
        spec = json.loads(args.memory_worker)
        print(json.dumps(memory_worker(**spec)))
        return 0

    shape = QUICK if args.quick else FULL
    n, d, v = shape["n"], shape["d"], shape["v"]
    repeats = args.repeats or shape["repeats"]

    lin_t = measure_times("linear", LINEAR_VARIANTS, n, d, v, repeats)
    lin_m = {name: measure_memory("linear", name, n, d, v) for name in LINEAR_VARIANTS}
    ce_t = measure_times("ce", CE_VARIANTS, n, d, v, repeats)
    ce_m = {name: measure_memory("ce", name, n, d, v) for name in CE_VARIANTS}

    header = [
        f"Machine: {machine()}; torch {torch.__version__}; crossent {crossent.__version__}; "
        f"{datetime.date.today().isoformat()}.",
        f"Forward + backward, float32, median of {repeats} interleaved repeats; peak extra "
        "memory in a fresh process per variant (gradients included).",
        "",
    ]
    body = [
        table(
            f"Linear cross entropy, N={n}, D={d}, V={v}",
            LINEAR_VARIANTS,
            lin_t,
            lin_m,
            "floor (3 mm)",
        ),
        "",
        table(
            f"Cross entropy on logits, N={n}, V={v}",
            CE_VARIANTS,
            ce_t,
            ce_m,
            "floor (copy)",
        ),
    ]
    text = "\n".join(header + body)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("# CPU benchmark results\n\n")
            f.write("Written by `python benchmarks/bench_cpu.py --markdown " + args.markdown)
            f.write("`.\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
