"""What every benchmark script measures with: interleaved median times, peak resident memory.

Time: the median of several repeats, the variants interleaved round by round (after one
warm-up call each) so that the noise of a shared machine hits them alike. Memory: the RSS
high-water mark after a call minus the resident set size before it, read in a fresh process.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def median_times(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each run; the runs interleaved round by round."""
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_rss_bytes(reset_ok: bool) -> int:
    """The RSS high-water mark of this process.

    ``VmHWM`` is this address space's own peak, reset by ``reset_peak_rss``. ``ru_maxrss``
    would do on a fresh process too, except that Linux carries the *parent's* peak across
    ``execve`` into it, so a benchmark parent holding big tensors would inflate every child.
    """
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def peak_extra_bytes(run: Callable[[], object]) -> int:
    """Peak resident memory ``run()`` adds to this process (its result counts)."""
    before = rss_bytes()
    reset_ok = reset_peak_rss()
    result = run()
    peak = peak_rss_bytes(reset_ok)
    del result
    return max(0, peak - before)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
