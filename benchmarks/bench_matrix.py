"""The drop-in performance matrix (CPU): every public loss against the torch op it replaces.

For each case (a loss, a shape, a dtype, options), forward + backward:

- **time**, crossent ÷ torch, in three modes: all threads, 1 thread, and *contended* (all
  threads while another process spins on one core, as a DataLoader worker would). One fresh
  process per case; torch and crossent interleaved round by round; median of the repeats.
- **peak extra memory**, crossent and torch, each in its own fresh process (one thread, fixed
  malloc mmap threshold): the RSS high-water mark after the call (``VmHWM``, reset just before
  it) minus the RSS before it. Inputs and libraries are loaded (and the call warmed up on tiny
  shapes) before the "before" reading;
  the gradients every variant must produce count in the extra.

Linear cross entropy is compared with torch eager (``F.linear`` + ``F.cross_entropy``) and with
the three-matmul floor, at unit-scale and scale-30 logits and in bfloat16, and its peak memory
is measured against N.

Goals: time ≤ 1.10 × torch + 50 µs and peak extra memory ≤ torch's + 8 MB in every case and
mode; cross entropy on LM-vocabulary logits ≤ 0.75 × torch's time and ≤ 0.5 × its memory.

Usage::

    python benchmarks/bench_matrix.py            # the whole matrix: writes
        # benchmarks/results_matrix.md, benchmarks/results_matrix.json, benchmarks/matrix.png
        # and the table between the matrix markers of README.md
    python benchmarks/bench_matrix.py --quick --out /tmp/m   # tiny shapes, seconds (CI smoke)

The plot needs matplotlib (``pip install -r benchmarks/requirements.txt``); without it the
tables are still written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _harness import machine, median_times, peak_extra_bytes  # noqa: E402

import crossent  # noqa: E402

TIME_GOAL, OVERHEAD_S, MEMORY_GOAL_MB = 1.10, 50e-6, 8.0
README_START, README_END = "<!-- matrix:start -->", "<!-- matrix:end -->"
MODES = ("threads", "1 thread", "contended")


@dataclass
class Case:
    """One row of the matrix. ``shape`` is the input's; options are keyword arguments, with
    tensors named by a short recipe (see ``_inputs``)."""

    name: str
    loss: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    options: dict = field(default_factory=dict)


def _c(name, loss, shape, dtype="float32", **options) -> Case:
    return Case(name, loss, tuple(shape), dtype, options)


FULL_CASES = [
    _c("CE 32×10 (per-call overhead)", "cross_entropy", (32, 10)),
    _c("CE 65536×10", "cross_entropy", (65536, 10)),
    _c("CE 256×1000", "cross_entropy", (256, 1000)),
    _c("CE 4096×100, label smoothing 0.1", "cross_entropy", (4096, 100), label_smoothing=0.1),
    _c("CE 4096×1000, class weight", "cross_entropy", (4096, 1000), weight="class"),
    _c("CE 4096×1000, 10% ignored", "cross_entropy", (4096, 1000), ignore_index=-100),
    _c("CE 2048×32000 (LM vocab)", "cross_entropy", (2048, 32000)),
    _c("CE 2048×32000 bf16", "cross_entropy", (2048, 32000), "bfloat16"),
    _c(
        "CE 2048×32000, smoothing 0.1, ignored",
        "cross_entropy",
        (2048, 32000),
        label_smoothing=0.1,
        ignore_index=-100,
    ),
    _c("CE 256×128256 (LM vocab)", "cross_entropy", (256, 128256)),
    _c("CE 256×128256 bf16", "cross_entropy", (256, 128256), "bfloat16"),
    _c("CE (16, 2, 256, 256) segmentation", "cross_entropy", (16, 2, 256, 256)),
    _c("CE (8, 21, 128, 128) segmentation", "cross_entropy", (8, 21, 128, 128)),
    _c(
        "CE (8, 21, 128, 128), weight, ignore 255",
        "cross_entropy",
        (8, 21, 128, 128),
        weight="class",
        ignore_index=255,
    ),
    _c("CE (4, 150, 128, 128) segmentation", "cross_entropy", (4, 150, 128, 128)),
    _c("CE (4, 150, 128, 128) bf16", "cross_entropy", (4, 150, 128, 128), "bfloat16"),
    _c("CE 4096×1000 probability targets", "cross_entropy", (4096, 1000), target="probs"),
    _c(
        "CE 4096×1000 probabilities, smoothing 0.1",
        "cross_entropy",
        (4096, 1000),
        target="probs",
        label_smoothing=0.1,
    ),
    _c("NLL 65536×10", "nll_loss", (65536, 10)),
    _c(
        "NLL 4096×1000, weight, ignored",
        "nll_loss",
        (4096, 1000),
        weight="class",
        ignore_index=-100,
    ),
    _c("NLL (8, 21, 128, 128)", "nll_loss", (8, 21, 128, 128)),
    _c("BCE 4096×4096", "binary_cross_entropy", (4096, 4096)),
    _c("BCE 4096×4096, weight (4096,)", "binary_cross_entropy", (4096, 4096), weight="last"),
    _c("BCE 4096×4096 bf16", "binary_cross_entropy", (4096, 4096), "bfloat16"),
    _c("BCE-logits 4096×4096", "binary_cross_entropy_with_logits", (4096, 4096)),
    _c(
        "BCE-logits 4096×4096, pos_weight (4096,)",
        "binary_cross_entropy_with_logits",
        (4096, 4096),
        pos_weight="last",
    ),
    _c(
        "BCE-logits 4096×4096, weight + pos_weight",
        "binary_cross_entropy_with_logits",
        (4096, 4096),
        weight="last",
        pos_weight="last",
    ),
    _c("BCE-logits 4096×4096 bf16", "binary_cross_entropy_with_logits", (4096, 4096), "bfloat16"),
    _c("BCE-logits 32×10 (per-call overhead)", "binary_cross_entropy_with_logits", (32, 10)),
]

QUICK_CASES = [
    _c("CE 64×50", "cross_entropy", (64, 50), label_smoothing=0.1, ignore_index=-100),
    _c("CE 16×70000 (blocked path)", "cross_entropy", (16, 70000), weight="class"),
    _c("CE (2, 3, 8, 8)", "cross_entropy", (2, 3, 8, 8)),
    _c("CE 64×50 probabilities", "cross_entropy", (64, 50), target="probs"),
    _c("NLL 64×50", "nll_loss", (64, 50), weight="class"),
    _c("BCE 64×50", "binary_cross_entropy", (64, 50), weight="last"),
    _c("BCE-logits 64×50", "binary_cross_entropy_with_logits", (64, 50), pos_weight="last"),
]

# Linear cross entropy: (name, N, D, V, dtype, logit scale).
FULL_LINEAR = [
    ("N=2048 D=512 V=32000", 2048, 512, 32000, "float32", 1.0),
    # Smaller for bfloat16: on a CPU without native bf16 (no AVX-512-BF16/AMX) torch's bf16
    # matmuls run 10-100× slower than float32, and eager's would take minutes per call.
    ("N=256 D=256 V=32000 bf16", 256, 256, 32000, "bfloat16", 1.0),
    ("N=512 D=256 V=32000, unit-scale logits", 512, 256, 32000, "float32", 1.0),
    ("N=512 D=256 V=32000, scale-30 logits", 512, 256, 32000, "float32", 30.0),
]
QUICK_LINEAR = [("N=64 D=32 V=500", 64, 32, 500, "float32", 1.0)]
# Linear distillation (student head against a teacher head; bench_distill.py's variants):
# (name, divergence, N, D_s, D_t, V). Its "floor" is four matmuls: the teacher's logits and the
# student's three.
FULL_DISTILL = [
    ("distillation KL, N=2048 D_s=512 D_t=1024 V=32000", "KL", 2048, 512, 1024, 32000),
    ("distillation JSD β=0.5, N=2048 D_s=512 D_t=1024 V=32000", "JSD", 2048, 512, 1024, 32000),
]
QUICK_DISTILL = [("distillation KL, N=32 D_s=8 D_t=16 V=50", "KL", 32, 8, 16, 50)]
FULL_CURVE = {"d": 512, "v": 32000, "ns": (256, 512, 1024, 2048, 4096, 8192)}
QUICK_CURVE = {"d": 32, "v": 500, "ns": (64,)}


# --------------------------------------------------------------------------------------------
# Building the calls.


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _inputs(case: Case) -> tuple[tuple, dict]:
    """(positional args, keyword args) of the loss call, the same tensors for both sides."""
    gen = torch.Generator().manual_seed(0)
    dtype, shape, opts = _dtype(case.dtype), case.shape, dict(case.options)
    kwargs: dict = {}
    if case.loss in ("cross_entropy", "nll_loss"):
        c = shape[1]
        x = torch.randn(shape, generator=gen)
        if case.loss == "nll_loss":
            x = x.log_softmax(1)
        if opts.pop("target", None) == "probs":
            target = torch.rand(shape, generator=gen).softmax(1).to(dtype)
        else:
            target = torch.randint(0, c, (shape[0], *shape[2:]), generator=gen)
            if "ignore_index" in opts:
                mask = torch.rand(target.shape, generator=gen) < 0.1
                target = torch.where(mask, opts["ignore_index"], target)
        if opts.pop("weight", None) == "class":
            kwargs["weight"] = (torch.rand(c, generator=gen) + 0.5).to(dtype)
        kwargs.update(opts)
        return (x.to(dtype), target), kwargs
    if case.loss == "binary_cross_entropy":
        x = torch.rand(shape, generator=gen).clamp(1e-4, 1 - 1e-4)
    else:
        x = torch.randn(shape, generator=gen) * 3
    y = torch.rand(shape, generator=gen)
    for key in ("weight", "pos_weight"):
        if opts.pop(key, None) == "last":
            kwargs[key] = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    kwargs.update(opts)
    return (x.to(dtype), y.to(dtype)), kwargs


def build(case: Case, side: str) -> Callable[[], object]:
    """A closure running forward + backward once on ``side`` ('torch' or 'crossent')."""
    (x, target), kwargs = _inputs(case)
    fn = getattr(F if side == "torch" else crossent, case.loss)

    def run() -> object:
        xx = x.detach().requires_grad_()
        fn(xx, target, **kwargs).backward()
        return xx.grad

    return run


def _linear_inputs(n: int, d: int, v: int, dtype: str, scale: float):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) * (scale * d**-0.5)  # logits of std ~ scale
    t = torch.randint(0, v, (n,), generator=gen)
    return h.to(_dtype(dtype)), w.to(_dtype(dtype)), t


def build_linear(spec: list, side: str) -> Callable[[], object]:
    _, n, d, v, dtype, scale = spec
    h, w, t = _linear_inputs(n, d, v, dtype, scale)
    if side == "floor (3 mm)":

        def run() -> object:
            logits = torch.mm(h, w.T)  # (N, V)
            return torch.mm(logits, w), torch.mm(logits.T, h)  # (N, D), (V, D)

        return run

    def run() -> object:
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        if side == "crossent":
            loss = crossent.linear_cross_entropy(hh, ww, t)
        else:
            loss = F.cross_entropy(F.linear(hh, ww), t)
        loss.backward()
        return hh.grad, ww.grad

    return run


def build_distill(spec: list, side: str) -> Callable[[], object]:
    """The distillation variants of ``bench_distill.py`` under the linear rows' side names."""
    import bench_distill

    _, divergence, n, ds, dt, v = spec
    name = {
        "crossent": f"crossent {divergence}",
        "torch eager": f"torch eager {divergence}",
        "floor (3 mm)": "floor (4 mm)",
    }[side]
    return bench_distill.build(name, n, ds, dt, v)


def _tiny(kind: str, spec) -> object:
    """The same call on tiny shapes (warms libraries and lazy imports before measuring)."""
    if kind == "linear":
        return [spec[0], 4, 8, 16, spec[4], spec[5]]
    if kind == "distill":
        return [spec[0], spec[1], 4, 8, 8, 16]
    small = dict(asdict(spec))
    shape = list(spec.shape)
    small["shape"] = tuple([2, min(shape[1], 3000)] + [2] * (len(shape) - 2))
    if len(shape) == 2 and shape[1] > 1000:
        small["shape"] = (2, shape[1])
    return Case(**small)


def _builder(kind: str, spec, side: str) -> Callable[[], object]:
    if kind == "distill":
        return build_distill(spec, side)
    return build_linear(spec, side) if kind == "linear" else build(spec, side)


# --------------------------------------------------------------------------------------------
# Workers (fresh processes).


def _spinner() -> subprocess.Popen:
    """Another process spinning on the last core for the duration of a contended run."""
    # It stops by itself once its parent is gone (a killed benchmark leaves no spinner).
    code = (
        "import os\n"
        f"os.sched_setaffinity(0, {{{(os.cpu_count() or 1) - 1}}})\n"
        f"while os.getppid() == {os.getpid()}:\n"
        "    for _ in range(1_000_000):\n        pass\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def time_worker(kind: str, spec, sides: list[str], budget_s: float, modes: list[str]) -> dict:
    """Median time of each side in each mode; repeats sized to about ``budget_s`` per mode."""
    spec = Case(**spec) if kind == "case" else spec
    if kind == "case":
        spec.shape = tuple(spec.shape)
    runs = {side: _builder(kind, spec, side) for side in sides}
    all_threads = torch.get_num_threads()
    start = time.perf_counter()
    for run in runs.values():
        run()
    once = (time.perf_counter() - start) / len(runs)
    repeats = int(max(3, min(25, budget_s / max(once * len(runs), 1e-6))))
    out: dict = {"repeats": repeats}
    for mode in modes:
        torch.set_num_threads(1 if mode == "1 thread" else all_threads)
        spinner = _spinner() if mode == "contended" else None
        try:
            if spinner is not None:
                time.sleep(0.2)
            out[mode] = median_times(runs, repeats)
        finally:
            if spinner is not None:
                spinner.kill()
                spinner.wait()
    torch.set_num_threads(all_threads)
    return out


def _fix_mmap_threshold(threshold: int = 128 << 10) -> None:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, 128 KiB)`` (a no-op where that is not glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def memory_worker(kind: str, spec, side: str) -> dict:
    """Peak extra resident memory of one forward + backward, in this (fresh) process.

    With one thread: with several, the peak varies from run to run by tens of MB (when each
    thread's temporaries are allocated against when the others are freed), for torch and
    crossent alike; the memory an algorithm needs does not depend on the thread count. And with
    a fixed malloc mmap threshold (glibc's adapts to the sizes freed, which made the peak of
    the same call vary by a whole N×C buffer between runs): every large tensor is mapped when
    allocated and unmapped when freed, so the RSS follows the live tensors.
    """
    torch.set_num_threads(1)
    _fix_mmap_threshold()
    if kind == "case":
        spec = Case(**spec)
        spec.shape = tuple(spec.shape)
    _builder(kind, _tiny(kind, spec), side)()
    run = _builder(kind, spec, side)
    return {"extra_mb": peak_extra_bytes(run) / 2**20}


def _spawn(payload: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(payload)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worker_main(payload: dict) -> dict:
    if payload["job"] == "time":
        return {"results": [time_worker(**job) for job in payload["batch"]]}
    return memory_worker(payload["kind"], payload["spec"], payload["side"])


# --------------------------------------------------------------------------------------------
# The run.


def run_matrix(
    quick: bool,
    modes: list[str],
    budget_s: float,
    log: Callable[[str], None],
    checkpoint: Callable[[dict], None] = lambda results: None,
    only: list[str] | None = None,
) -> dict:
    """Every case and linear row: one fresh process for the times (both sides interleaved),
    one fresh process per side for the memory. ``quick`` (a smoke test) times everything in one
    process and measures the memory of the first case and one point of the curve only."""
    cases = QUICK_CASES if quick else FULL_CASES
    linear = QUICK_LINEAR if quick else FULL_LINEAR
    distill = QUICK_DISTILL if quick else FULL_DISTILL
    curve = QUICK_CURVE if quick else FULL_CURVE
    results: dict = {"cases": [], "linear": [], "curve": []}
    lin_sides = ["crossent", "torch eager", "floor (3 mm)"]
    if only:  # a subset of rows, by name (the curve only if "curve" is named)
        cases = [c for c in cases if any(o in c.name for o in only)]
        linear = [spec for spec in linear if any(o in spec[0] for o in only)]
        distill = [spec for spec in distill if any(o in spec[0] for o in only)]
        if "curve" not in only:
            curve = {**curve, "ns": ()}
    jobs = [("case", asdict(c), ["torch", "crossent"]) for c in cases]
    jobs += [("linear", list(spec), lin_sides) for spec in linear]
    jobs += [("distill", list(spec), lin_sides) for spec in distill]

    def time_job(batch: list) -> list[dict]:
        payload = [
            dict(kind=k, spec=spec, sides=sides, budget_s=budget_s, modes=modes)
            for k, spec, sides in batch
        ]
        return _spawn(dict(job="time", batch=payload))["results"]

    batched = time_job(jobs) if quick else None
    for i, (kind, spec, sides) in enumerate(jobs):
        times = batched[i] if batched is not None else time_job([(kind, spec, sides)])[0]
        measure = not quick or i == 0
        mem = {
            side: _spawn(dict(job="memory", kind=kind, spec=spec, side=side))["extra_mb"]
            if measure
            else None
            for side in (sides if kind == "case" else sides[:2])
        }
        if kind == "case":
            row = {"case": spec["name"], "loss": spec["loss"], "dtype": spec["dtype"]}
            row.update(times=times, memory=mem)
            results["cases"].append(row)
            checkpoint(results)
            log(_case_line(row, modes))
        else:
            results["linear"].append({"case": spec[0], "times": times, "memory": mem})
            checkpoint(results)
            log(
                f"{kind} {spec[0]}: "
                + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times[modes[0]].items())
            )
    for n in curve["ns"]:
        spec = [f"N={n}", n, curve["d"], curve["v"], "float32", 1.0]
        mem = {
            side: _spawn(dict(job="memory", kind="linear", spec=spec, side=side))["extra_mb"]
            for side in ("crossent", "torch eager")
        }
        results["curve"].append({"n": n, **mem})
        checkpoint(results)
        log(f"curve N={n}: crossent {mem['crossent']:.1f} MB, eager {mem['torch eager']:.1f} MB")
    return results


def _mb(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _ratio(times: dict, mode: str) -> float:
    return times[mode]["crossent"] / times[mode]["torch"]


def _meets_time(times: dict, mode: str) -> bool:
    t = times[mode]
    return t["crossent"] <= TIME_GOAL * t["torch"] + OVERHEAD_S


def _case_line(row: dict, modes: list[str]) -> str:
    t = row["times"]
    parts = [f"{m} {_ratio(t, m):.2f}×" for m in modes]
    m = row["memory"]
    return (
        f"{row['case']}: torch {t[modes[0]]['torch'] * 1e3:.2f} ms; "
        + ", ".join(parts)
        + f"; memory {_mb(m['crossent'])} vs {_mb(m['torch'])} MB"
    )


# --------------------------------------------------------------------------------------------
# Reports.


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def case_table(results: dict, modes: list[str]) -> str:
    head = "| case | torch (ms) | " + " | ".join(f"× torch, {m}" for m in modes)
    head += " | peak extra MB: torch | crossent | goals |"
    lines = [head, "|---|---:|" + "---:|" * len(modes) + "---:|---:|:---:|"]
    for row in results["cases"]:
        t, m = row["times"], row["memory"]
        ok_time = all(_meets_time(t, mode) for mode in modes)
        ok_mem = m["crossent"] is None or m["crossent"] <= m["torch"] + MEMORY_GOAL_MB
        goals = "✓" if ok_time and ok_mem else ("time ✗" if ok_mem else "memory ✗")
        if not ok_time and not ok_mem:
            goals = "time ✗ memory ✗"
        cells = " | ".join(f"{_ratio(t, mode):.2f}" for mode in modes)
        lines.append(
            f"| {row['case']} | {t[modes[0]]['torch'] * 1e3:.3g} | {cells} | {_mb(m['torch'])} | "
            f"{_mb(m['crossent'])} | {goals} |"
        )
    return "\n".join(lines)


def linear_table(results: dict, modes: list[str]) -> str:
    head = ["case", "crossent (ms)", "× floor", "× eager"]
    head += [f"× eager, {m}" for m in modes[1:]]
    head += ["peak extra MB: crossent", "eager", "× eager"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in results["linear"]:
        t, m = row["times"], row["memory"]
        t0 = t[modes[0]]
        mem_ratio = "–"
        if m["crossent"] is not None and m["torch eager"]:
            mem_ratio = f"{m['crossent'] / m['torch eager']:.2f}"
        cells = [row["case"], f"{t0['crossent'] * 1e3:.4g}"]
        cells += [f"{t0['crossent'] / t0['floor (3 mm)']:.2f}"]
        cells += [f"{t[mode]['crossent'] / t[mode]['torch eager']:.2f}" for mode in modes]
        cells += [_mb(m["crossent"]), _mb(m["torch eager"]), mem_ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(results: dict) -> str:
    lines = ["| N | crossent (MB) | torch eager (MB) |", "|---:|---:|---:|"]
    for row in results["curve"]:
        lines.append(f"| {row['n']} | {row['crossent']:.1f} | {row['torch eager']:.1f} |")
    return "\n".join(lines)


def summary(results: dict, modes: list[str]) -> list[str]:
    """One line per goal missed (case, mode, figures)."""
    misses = []
    for row in results["cases"]:
        t, m = row["times"], row["memory"]
        for mode in modes:
            if not _meets_time(t, mode):
                misses.append(
                    f"{row['case']}, {mode}: {_ratio(t, mode):.2f}× torch "
                    f"({t[mode]['crossent'] * 1e3:.3g} ms vs {t[mode]['torch'] * 1e3:.3g} ms)"
                )
        if m["crossent"] is not None and m["crossent"] > m["torch"] + MEMORY_GOAL_MB:
            misses.append(
                f"{row['case']}: peak extra memory {m['crossent']:.1f} MB vs torch's "
                f"{m['torch']:.1f} MB"
            )
    return misses


def plot(results: dict, modes: list[str], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["cases"]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(15, max(5, 0.32 * len(rows) + 1.5)), gridspec_kw={"width_ratios": [3, 2]}
    )
    height = 0.8 / len(modes)
    x_max = 3.0  # ratios beyond are clipped and written out (noise on a shared machine)
    for i, mode in enumerate(modes):
        ys = [j + i * height for j in range(len(rows))]
        ratios = [_ratio(r["times"], mode) for r in rows]
        ax1.barh(ys, [min(v, x_max) for v in ratios], height=height, label=mode)
        for y, v in zip(ys, ratios, strict=True):
            if v > x_max:
                ax1.text(x_max * 0.98, y, f"{v:.1f}×", ha="right", va="center", fontsize=6)
    ax1.set_xlim(0, x_max)
    ax1.set_yticks([j + 0.4 - height / 2 for j in range(len(rows))])
    ax1.set_yticklabels([r["case"] for r in rows], fontsize=7)
    ax1.invert_yaxis()
    ax1.axvline(1.0, color="black", linewidth=0.8)
    ax1.axvline(TIME_GOAL, color="red", linestyle="--", linewidth=0.8, label="goal 1.10×")
    ax1.set_xlabel("time, crossent ÷ torch (forward + backward)")
    ax1.legend(fontsize=7, loc="lower right")
    ns = [r["n"] for r in results["curve"]]
    ax2.plot(ns, [r["crossent"] for r in results["curve"]], "o-", label="crossent")
    ax2.plot(ns, [r["torch eager"] for r in results["curve"]], "s-", label="torch eager")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("N (tokens)")
    ax2.set_ylabel("peak extra memory (MB)")
    ax2.set_title("linear cross entropy, forward + backward", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(results: dict, meta: dict, out_dir: str, readme: str | None) -> list[str]:
    modes = meta["modes"]
    curve = QUICK_CURVE if meta["quick"] else FULL_CURVE
    os.makedirs(out_dir, exist_ok=True)
    written = []
    json_path = os.path.join(out_dir, "results_matrix.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, **results}, f, indent=1)
    written.append(json_path)
    png = os.path.join(out_dir, "matrix.png")
    has_plot = plot(results, modes, png)
    if has_plot:
        written.append(png)
    misses = summary(results, modes)
    header = (
        f"Machine: {meta['machine']}; torch {meta['torch']}; crossent {meta['crossent']}; "
        f"{meta['date']}. Load average {meta['load_before']} before, {meta['load_after']} after "
        f"({meta['elapsed_s']:.0f} s)."
    )
    if meta.get("rerun"):
        header += f" Then {meta['rerun']}."
    if meta.get("note"):
        header += f" Note: {meta['note']}."
    body = [
        "Forward + backward. Time: crossent ÷ torch, median of interleaved repeats in one fresh "
        "process per case; *contended* = all threads while another process spins on one core. "
        "Peak extra memory: each side in its own fresh process (gradients included).",
        "",
        case_table(results, modes),
        "",
        "Linear cross entropy (crossent vs torch eager `F.linear` + `F.cross_entropy` vs the "
        "three-matmul floor) and linear distillation (crossent vs torch eager: both logits, "
        "`log_softmax`, `kl_div` or TRL's generalized JSD; its floor is four matmuls):",
        "",
        linear_table(results, modes),
        "",
        "Linear cross entropy peak extra memory against N "
        f"(D={curve['d']}, V={curve['v']}, float32):",
        "",
        curve_table(results),
        "",
        "Goals missed (time ≤ 1.10 × torch + 50 µs, peak extra memory ≤ torch's + 8 MB): "
        + ("none." if not misses else ""),
    ] + [f"- {m}" for m in misses]
    md_path = os.path.join(out_dir, "results_matrix.md")
    with open(md_path, "w") as f:
        f.write("# CPU performance matrix\n\n")
        f.write(f"Written by `{meta['command']}`.\n\n{header}\n\n")
        f.write("\n".join(body) + "\n")
        if has_plot:
            f.write("\n![time ratio per case; linear CE memory against N](matrix.png)\n")
    written.append(md_path)
    if readme:
        with open(readme) as f:
            text = f.read()
        if README_START in text and README_END in text:
            before, rest = text.split(README_START, 1)
            _, after = rest.split(README_END, 1)
            block = [
                README_START,
                f"<!-- written by {meta['command']}; do not edit by hand -->",
                "",
                header,
                "",
                case_table(results, modes),
                "",
                linear_table(results, modes),
                "",
            ]
            if has_plot:
                rel = os.path.relpath(png, os.path.dirname(os.path.abspath(readme)))
                block += [f"![time ratio per case; linear CE memory against N]({rel})", ""]
            text = before + "\n".join(block) + README_END + after
            with open(readme, "w") as f:
                f.write(text)
            written.append(readme)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds (smoke test)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/)")
    parser.add_argument(
        "--readme", default=None, help="README to update between the matrix markers "
        "(default: the project's README.md for a full run, none with --quick)",
    )  # fmt: skip
    parser.add_argument("--budget", type=float, default=None, help="seconds per case and mode")
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated subset of {', '.join(MODES)} (default: all; --quick: 1 thread)",
    )
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        help="write the reports from a results JSON (a finished or partial run) without measuring",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="measure only the rows whose name contains one of these '|'-separated strings",
    )
    parser.add_argument(
        "--merge",
        metavar="PATH",
        help="with --only: replace those rows in this results JSON and write the reports from it",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker_main(json.loads(args.worker))))
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        meta = data.pop("meta")
        readme = args.readme if args.readme is not None else os.path.join(ROOT, "README.md")
        for path in write_reports(data, meta, args.out or HERE, readme or None):
            print(f"wrote {path}")
        return 0
    if args.modes is None:
        args.modes = "1 thread" if args.quick else ",".join(MODES)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(
            f"--modes takes a comma-separated subset of {', '.join(MODES)}, got {args.modes!r}"
        )
    out_dir = args.out or HERE
    readme = (
        args.readme
        if args.readme is not None
        else (None if args.quick else os.path.join(ROOT, "README.md"))
    )
    budget = args.budget if args.budget is not None else (0.02 if args.quick else 1.5)
    command = "python benchmarks/bench_matrix.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta = {
        "machine": machine(), "torch": torch.__version__, "crossent": crossent.__version__,
        "python": platform.python_version(), "date": now, "load_before": _load_average(),
        "modes": modes, "quick": args.quick, "command": command.strip(),
    }  # fmt: skip
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    partial = os.path.join(out_dir, "results_matrix.partial.json")

    def checkpoint(results: dict) -> None:
        # A partial run can be turned into reports with --from-json.
        meta["elapsed_s"] = time.perf_counter() - start
        meta["load_after"] = _load_average()
        with open(partial, "w") as f:
            json.dump({"meta": meta, **results}, f, indent=1)

    only = args.only.split("|") if args.only else None
    results = run_matrix(
        args.quick, modes, budget, lambda s: print(s, flush=True), checkpoint, only
    )
    os.remove(partial)
    meta["elapsed_s"] = time.perf_counter() - start
    meta["load_after"] = _load_average()
    if args.merge:
        with open(args.merge) as f:
            merged = json.load(f)
        for key in ("cases", "linear"):
            new_rows = {row["case"]: row for row in results[key]}
            merged[key] = [new_rows.pop(row["case"], row) for row in merged[key]]
            merged[key] += list(new_rows.values())
        if results["curve"]:
            merged["curve"] = results["curve"]
        merged["meta"]["rerun"] = (
            f"rows matching {' | '.join(only or [])} re-measured {meta['date']}, load average "
            f"{meta['load_before']} before, {meta['load_after']} after"
        )
        meta = merged.pop("meta")
        results = merged
    for path in write_reports(results, meta, out_dir, readme):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
