"""Packaging: the license, the metadata, and a torch range that the suite actually runs on.

``pyproject.toml`` declares ``torch>=2.13`` (the first torch with
``torch.nn.LinearCrossEntropyLoss``, which crossent subclasses); ``.ci/run`` runs this suite on
torch 2.13.0 (``requirements-dev.txt``) and on torch 2.14.1 (``requirements-torch2.14.txt``).
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
REQUIREMENT_FILES = {"2.13": "requirements-dev.txt", "2.14": "requirements-torch2.14.txt"}


def _requirements(name: str) -> list[str]:
    lines = (REPO / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def test_license_file_is_mit():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the crossent authors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_license_is_an_spdx_expression():
    """PEP 639: ``license = "MIT"`` and ``license-files`` (the TOML table is deprecated), no
    license classifier beside it (setuptools refuses both), a setuptools that knows it."""
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"])
    setuptools = next(r for r in PYPROJECT["build-system"]["requires"] if "setuptools" in r)
    assert _version(setuptools) >= (77,)


def test_classifiers_keywords_and_no_placeholder_urls():
    classifiers = PROJECT["classifiers"]
    assert len(classifiers) == len(set(classifiers)) >= 5
    assert all(re.fullmatch(r"[A-Z][\w /.+-]*( :: [\w /.+-]+)+", c) for c in classifiers)
    assert "Typing :: Typed" in classifiers and (REPO / "src/crossent/py.typed").exists()
    # The Python versions named are the ones the suite runs on here.
    named = {c.rsplit(" ", 1)[1] for c in classifiers if re.search(r"Python :: 3\.\d+$", c)}
    assert named == {f"{sys.version_info.major}.{sys.version_info.minor}"}
    assert {"pytorch", "cross-entropy", "loss"} <= set(PROJECT["keywords"])
    for label, url in PROJECT.get("urls", {}).items():
        assert url.startswith("https://"), (label, url)
        assert not re.search(r"example\.|TODO|<|your-|OWNER|placeholder", url, re.I), (label, url)


def test_installed_metadata_matches_pyproject():
    """What pip installed (in CI: from this pyproject, on a fresh clone)."""
    meta = importlib.metadata.metadata("crossent")
    assert meta["License-Expression"] == "MIT"
    assert "LICENSE" in (meta.get_all("License-File") or [])
    requires = meta.get_all("Requires-Dist") or []
    assert any(re.fullmatch(r"torch>=2\.13", r.replace(" ", "")) for r in requires), requires


def test_torch_floor_is_what_the_suite_runs_on():
    """The declared floor is the oldest torch a requirement file installs, and every torch the
    suite runs on has what crossent needs at import."""
    floor = next(d for d in PROJECT["dependencies"] if d.startswith("torch"))
    floor_version = _version(floor)
    pins = {}
    for name in REQUIREMENT_FILES.values():  # each file's torch pin
        pins[name] = next(r for r in _requirements(name) if r.startswith("torch=="))
    tested = sorted(_version(pin) for pin in pins.values())
    assert tested[0][:2] == floor_version[:2], (floor, pins)
    assert _version(torch.__version__) >= floor_version
    assert hasattr(torch.nn, "LinearCrossEntropyLoss")
    running = ".".join(map(str, _version(torch.__version__)[:2]))
    assert running in REQUIREMENT_FILES, f"torch {torch.__version__} is not a tested version"


def _dev_rest() -> list[str]:
    """requirements-dev.txt less its torch and triton pins, as .ci/run filters it."""
    return [
        r for r in _requirements("requirements-dev.txt") if not re.match(r"(torch|triton)==", r)
    ]


def test_torch_2_14_requirements_do_not_clash_with_the_dev_pins():
    """The torch 2.14.1 venv gets everything the dev venv does except the torch and triton
    pins: torch 2.14.1 pins its own triton (3.8.0), which the dev pin 3.9.0 would clash with."""
    newer = _requirements("requirements-torch2.14.txt")
    assert newer == ["torch==2.14.1"]
    assert "torch==2.13.0" in _requirements("requirements-dev.txt")
    rest = _dev_rest()
    assert "-e ." in rest and not any(re.match(r"(torch|triton)\b", r) for r in rest), rest
    if _version(torch.__version__)[:2] == (2, 14):  # in that venv: torch's own triton pin
        wanted = [r for r in importlib.metadata.requires("torch") or [] if r.startswith("triton")]
        if wanted:
            installed = importlib.metadata.version("triton")
            assert any(installed in r for r in wanted), (wanted, installed)


def test_installed_requirements_are_consistent():
    """``pip check`` in the running venv: e.g. torch's own triton pin is met."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120
    )
    if "No module named pip" in result.stderr:
        pytest.skip("pip is not installed in this environment")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_suite_on_both_torch_versions():
    script = (REPO / ".ci/run").read_text()
    assert "set -euo pipefail" in script
    assert ".venv/bin/pip install -q -r requirements-dev.txt\n" in script
    assert "grep -vE '^(torch|triton)==' requirements-dev.txt" in script
    assert "-r requirements-torch2.14.txt" in script
    for venv in (".venv", ".venv-torch2.14"):
        assert f"\n{venv}/bin/python -m pytest -q\n" in script, venv
