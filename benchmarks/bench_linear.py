"""Linear cross entropy on CPU: crossent vs torch eager vs the three-matmul floor.

Cases (forward + backward, ``'mean'``):

* ``f32``: N=2048, D=512, V=32000, float32, logits of unit scale (the reference shape);
* ``unit`` and ``scale30``: N=512, D=256, V=32000, float32, with ``h`` and ``W`` scaled so
  that the logits have scale ~1 (losses ~10) or ~30 (losses ~120 per token): a large-logit
  cliff shows as ``scale30`` slower than ``unit``;
* ``bf16``: the reference shape in bfloat16 (torch's eager path runs bfloat16 matmuls).

Variants: ``crossent`` (``crossent.linear_cross_entropy``), ``eager`` (``F.linear`` +
``F.cross_entropy``) and ``floor`` (the three ``torch.mm`` of the same shapes any exact method
does: logits, gradient w.r.t. the input, gradient w.r.t. the weight).

Time: variants interleaved round by round (the noise of a shared machine hits them alike), the
median of the wall-clock times and of the process CPU times. ``--threads 1`` runs on one
thread; ``--contended`` keeps one core busy with a spinning process for the duration (what a
DataLoader worker does). Memory (``--memory``): each variant once in a fresh process, peak
extra resident memory (``VmHWM`` after the call minus the RSS before it; gradients included).

Usage::

    python benchmarks/bench_linear.py                        # all cases, all threads
    python benchmarks/bench_linear.py --case scale30 unit --repeats 9
    python benchmarks/bench_linear.py --threads 1 --contended --memory
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import crossent

CASES = {
    "f32": dict(n=2048, d=512, v=32000, scale=1.0, dtype="float32"),
    "unit": dict(n=512, d=256, v=32000, scale=1.0, dtype="float32"),
    "scale30": dict(n=512, d=256, v=32000, scale=30.0, dtype="float32"),
    "bf16": dict(n=2048, d=512, v=32000, scale=1.0, dtype="bfloat16"),
}
VARIANTS = ("crossent", "eager", "floor")


def build(case: str, variant: str) -> Callable[[], object]:
    """A closure running one forward + backward of ``variant`` on ``case``'s inputs."""
    spec = CASES[case]
    n, d, v, scale = spec["n"], spec["d"], spec["v"], spec["scale"]
    dtype = getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(0)
    # logits = x @ W.T have standard deviation `scale`
    x = (torch.randn(n, d, generator=gen) * scale**0.5).to(dtype)
    w = (torch.randn(v, d, generator=gen) * (scale / d) ** 0.5).to(dtype)
    t = torch.randint(0, v, (n,), generator=gen)

    def leaves() -> tuple[torch.Tensor, torch.Tensor]:
        return x.detach().requires_grad_(), w.detach().requires_grad_()

    if variant == "crossent":

        def run() -> object:
            xx, ww = leaves()
            crossent.linear_cross_entropy(xx, ww, t).backward()
            return xx.grad, ww.grad

    elif variant == "eager":

        def run() -> object:
            xx, ww = leaves()
            F.cross_entropy(F.linear(xx, ww), t).backward()
            return xx.grad, ww.grad

    elif variant == "floor":

        def run() -> object:
            logits = torch.mm(x, w.T)  # (N, V)
            return torch.mm(logits, w), torch.mm(logits.T, x)  # (N, D), (V, D)

    else:
        raise ValueError(f"unknown variant {variant!r}")
    return run


def _spin() -> None:  # pragma: no cover - runs in the contending process
    while True:
        pass


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def memory_worker(case: str, variant: str) -> float:
    """In a fresh process: peak extra resident MB of one forward + backward."""
    spec = dict(CASES[case])
    CASES["_warm"] = dict(spec, n=8, d=4, v=16)
    build("_warm", variant)()  # thread pools, allocator arenas
    run = build(case, variant)
    before = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    result = run()
    peak = _hwm()
    del result
    return max(0, peak - before) / 2**20


def measure_memory(case: str, variant: str, threads: int | None) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", case, variant]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def measure_times(case: str, variants: tuple[str, ...], repeats: int) -> dict[str, list[float]]:
    """Median (wall s, CPU s) per variant over interleaved repeats, after one warm-up each."""
    runs = {name: build(case, name) for name in variants}
    for run in runs.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in runs.items():
            w0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: [statistics.median(wall[name]), statistics.median(cpu[name])] for name in runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--contended", action="store_true", help="keep one core busy meanwhile")
    parser.add_argument("--memory", action="store_true", help="also peak memory per variant")
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker:
        print(memory_worker(*args.memory_worker))
        return 0

    spinner = None
    if args.contended:
        spinner = multiprocessing.get_context("spawn").Process(target=_spin, daemon=True)
        spinner.start()
    try:
        results = {}
        for case in args.case:
            results[case] = measure_times(case, tuple(args.variants), args.repeats)
            if args.memory:
                for name in args.variants:
                    results[case][name].append(measure_memory(case, name, args.threads))
    finally:
        if spinner is not None:
            spinner.terminate()
            spinner.join()

    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{'contended' if args.contended else 'uncontended'}, median of {args.repeats}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print("| case | variant | wall (ms) | CPU (ms) | × eager | × floor | peak extra (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for case, res in results.items():
        for name, values in res.items():
            wall, cpu = values[0], values[1]
            mem = f"{values[2]:.0f}" if len(values) > 2 else ""
            eager = res.get("eager", [float("nan")])[0]
            floor = res.get("floor", [float("nan")])[0]
            print(
                f"| {case} | {name} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | {wall / eager:.2f} | "
                f"{wall / floor:.2f} | {mem} |"
            )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
