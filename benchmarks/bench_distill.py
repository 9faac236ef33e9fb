"""CPU benchmark of linear distillation: crossent vs torch eager, side by side in one run.

Forward + backward (student gradients only; the teacher is frozen) of the distillation loss
between a student head ``(N, D_s) @ (V, D_s)ᵀ`` and a teacher head ``(N, D_t) @ (V, D_t)ᵀ``:

- ``crossent KL`` / ``crossent JSD``: ``crossent.linear_distillation_loss`` with β = 0 (forward
  KL) and β = 0.5;
- ``torch eager KL``: both logits (the teacher's under ``no_grad``), ``log_softmax`` of each,
  ``F.kl_div(..., log_target=True, reduction="batchmean")``;
- ``torch eager JSD``: TRL's ``GKDTrainer.generalized_jsd_loss`` form at β = 0.5 (mixture by
  ``logsumexp`` of the stacked log-probabilities, two ``kl_div``), written out here;
- ``floor (4 mm)``: the four matmuls any exact method does (teacher logits, student logits,
  the student's input and weight gradients).

Time: median of interleaved repeats. Memory: each variant once in a fresh subprocess; peak
extra = ``VmHWM`` after the call minus the resident set size before it (helpers shared with
``bench_cpu.py``); the gradients count in the extra.

Usage::

    python benchmarks/bench_distill.py            # N=2048, D_s=512, D_t=1024, V=32000 float32
    python benchmarks/bench_distill.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _harness import machine, median_times, peak_extra_bytes

import crossent

FULL = {"n": 2048, "ds": 512, "dt": 1024, "v": 32000, "repeats": 5}
QUICK = {"n": 256, "ds": 64, "dt": 128, "v": 1000, "repeats": 3}
VARIANTS = (
    "crossent KL",
    "torch eager KL",
    "crossent JSD",
    "torch eager JSD",
    "floor (4 mm)",
)


def _inputs(n: int, ds: int, dt: int, v: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(n, ds, generator=gen)
    ws = torch.randn(v, ds, generator=gen) * ds**-0.5  # logits of unit scale
    xt = torch.randn(n, dt, generator=gen)
    wt = torch.randn(v, dt, generator=gen) * (2 / dt) ** 0.5  # a more confident teacher
    return xs, ws, xt, wt


def _eager_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float):
    """TRL's generalized JSD (β strictly between 0 and 1), 'batchmean' over 2-D logits."""
    s = F.log_softmax(student_logits, -1)
    t = F.log_softmax(teacher_logits, -1)
    b = torch.tensor(beta)
    mix = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
    kl_t = F.kl_div(mix, t, reduction="none", log_target=True)
    kl_s = F.kl_div(mix, s, reduction="none", log_target=True)
    return (beta * kl_t + (1 - beta) * kl_s).sum() / student_logits.shape[0]


def build(name: str, n: int, ds: int, dt: int, v: int) -> Callable[[], object]:
    xs, ws, xt, wt = _inputs(n, ds, dt, v)

    def leaves() -> tuple[torch.Tensor, torch.Tensor]:
        return xs.detach().requires_grad_(), ws.detach().requires_grad_()

    if name.startswith("crossent"):
        beta = 0.0 if name.endswith("KL") else 0.5

        def run() -> object:
            x, w = leaves()
            crossent.linear_distillation_loss(x, w, xt, wt, beta=beta).backward()
            return x.grad, w.grad

    elif name == "torch eager KL":

        def run() -> object:
            x, w = leaves()
            with torch.no_grad():
                teacher_log_probs = F.log_softmax(F.linear(xt, wt), -1)
            student_log_probs = F.log_softmax(F.linear(x, w), -1)
            F.kl_div(
                student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True
            ).backward()
            return x.grad, w.grad

    elif name == "torch eager JSD":

        def run() -> object:
            x, w = leaves()
            with torch.no_grad():
                teacher_logits = F.linear(xt, wt)
            _eager_jsd(F.linear(x, w), teacher_logits, 0.5).backward()
            return x.grad, w.grad

    elif name == "floor (4 mm)":

        def run() -> object:
            torch.mm(xt, wt.T)  # teacher logits (N, V)
            g = torch.mm(xs, ws.T)  # student logits, standing in for their gradient
            return torch.mm(g, ws), torch.mm(g.T, xs)  # (N, D_s), (V, D_s)

    else:
        raise ValueError(f"unknown variant {name!r}")
    return run


def memory_worker(name: str, n: int, ds: int, dt: int, v: int) -> dict[str, float]:
    """Runs in a fresh process: peak extra resident memory of one forward + backward."""
    build(name, 8, 4, 6, 16)()  # warm the libraries on tiny shapes
    run = build(name, n, ds, dt, v)
    return {"extra_mb": peak_extra_bytes(run) / 2**20}


def measure_memory(name: str, n: int, ds: int, dt: int, v: int) -> float:
    spec = json.dumps({"name": name, "n": n, "ds": ds, "dt": dt, "v": v})
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", spec]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def measure_times(
    names: tuple[str, ...], n: int, ds: int, dt: int, v: int, repeats: int
) -> dict[str, float]:
    """Median seconds per variant; variants interleaved round by round, after one warm-up."""
    return median_times({name: build(name, n, ds, dt, v) for name in names}, repeats)


def table(times: dict[str, float], mems: dict[str, float]) -> str:
    lines = [
        "| variant | time (ms) | × its eager | × floor | peak extra memory (MB) | × its eager |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        eager = "torch eager JSD" if name.endswith("JSD") else "torch eager KL"
        t, m = times[name], mems[name]
        lines.append(
            f"| {name} | {t * 1e3:.0f} | {t / times[eager]:.2f} | "
            f"{t / times['floor (4 mm)']:.2f} | {m:.1f} | {m / mems[eager]:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    parser.add_argument("--memory-worker", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(**json.loads(args.memory_worker))))
        return 0

    shape = QUICK if args.quick else FULL
    n, ds, dt, v = shape["n"], shape["ds"], shape["dt"], shape["v"]
    repeats = args.repeats or shape["repeats"]
    times = measure_times(VARIANTS, n, ds, dt, v, repeats)
    mems = {name: measure_memory(name, n, ds, dt, v) for name in VARIANTS}
    load = os.getloadavg()
    print(
        f"Machine: {machine()}; torch {torch.__version__}; crossent {crossent.__version__}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; load average "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}.\n"
        f"N={n}, D_s={ds}, D_t={dt}, V={v}, float32, forward + backward (student gradients), "
        f"median of {repeats} interleaved repeats; peak extra memory in a fresh process per "
        "variant (gradients included).\n"
    )
    print(table(times, mems))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
