"""The GPU tooling runs without a GPU: kernels compile for sm_90; the benchmark parses and plans.

* ``crossent.ops.triton._compile_check`` compiles kernel variants with Triton's NVIDIA backend
  (bundled ptxas) for a Hopper target, in a subprocess without ``TRITON_INTERPRET`` (the
  interpreter never compiles, so this is the only CPU-side check of what the GPU will build),
  and reports registers, stack (spills) and tensor-core instruction counts.
* ``benchmarks/bench_gpu.py --help`` / ``--dry-run`` work on a CPU machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env_without_interpreter() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def test_kernels_compile_for_hopper():
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("triton's NVIDIA backend (ptxas) is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "crossent.ops.triton._compile_check", "--quick", "--arch", "90"],
        capture_output=True,
        text=True,
        env=_env_without_interpreter(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line and not line.startswith("kernel")]
    assert len(lines) >= 10 and not any("FAILED" in line for line in lines), proc.stdout
    for line in lines:
        regs, stack, _smem, mma = (int(v) for v in line.split()[-4:])
        assert 0 < regs <= 255 and stack <= 64, line  # no real spills
        if line.startswith("lce.") and "bf16" in line:
            assert mma > 0, f"bf16 matmul tiles must use tensor cores: {line}"
        if line.startswith(("ce.", "bce.")):
            assert mma == 0, line


def test_bench_gpu_help_and_dry_run():
    script = ROOT / "benchmarks" / "bench_gpu.py"
    env = _env_without_interpreter()
    help_run = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, env=env
    )
    assert help_run.returncode == 0 and "--dry-run" in help_run.stdout
    dry = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--shapes", "llama3-8b", "ce-logits"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert dry.returncode == 0, dry.stderr
    for expected in ("llama3-8b (N=8192 D=4096 V=128256 bfloat16)", "torch-chunked", "floor-3mm",
                     "ce-logits", "floor-copy", "GPU: "):  # fmt: skip
        assert expected in dry.stdout
    assert re.search(r"cce-exact\s+(ready|skipped: )", dry.stdout)
    bad = subprocess.run(
        [sys.executable, str(script), "--shapes", "gpt5"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
