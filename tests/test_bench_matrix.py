"""Smoke test of the benchmark matrix (benchmarks/bench_matrix.py --quick): every public loss
gets a row, the reports are written, the README block between the markers is regenerated.
Figures are not asserted: benchmarks are scripts, never timed tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_matrix.py")


def test_quick_matrix_writes_results_and_readme_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# title\n\nbefore\n<!-- matrix:start -->\nstale\n<!-- matrix:end -->\nafter\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CROSSENT_BACKEND")}
    out = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--out", str(tmp_path), "--readme", str(readme)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "results_matrix.json").read_text())
    losses = {row["loss"] for row in data["cases"]}
    assert losses == {
        "cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits"
    }  # fmt: skip
    for row in data["cases"]:
        t = row["times"]["1 thread"]
        assert t["torch"] > 0 and t["crossent"] > 0
    assert data["cases"][0]["memory"]["crossent"] is not None
    assert data["linear"] and data["curve"]
    md = (tmp_path / "results_matrix.md").read_text()
    assert "Machine:" in md and "torch 2." in md and "| CE 64×50 |" in md
    assert "Linear cross entropy" in md and "Goals missed" in md
    text = readme.read_text()
    assert "stale" not in text and text.startswith("# title\n\nbefore\n<!-- matrix:start -->")
    assert text.endswith("<!-- matrix:end -->\nafter\n") and "| BCE 64×50 |" in text
