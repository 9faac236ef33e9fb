"""Checks on the project's documentation: it speaks of the project alone, and the README's
commands and example are the ones that work."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# References to things outside the repository: the workspace the project was written in, its
# issue tracker, who asked for what, a design file that is not part of the repo.
FOREIGN = {
    "a path outside the repo": re.compile(r"\.\./shared|\bshared/"),
    "an issue number": re.compile(r"\bissues? \d", re.IGNORECASE),
    "who asked": re.compile(r"\bthe lead\b", re.IGNORECASE),
    "a design file not in the repo": re.compile(r"\bDESIGN\.md\b"),
}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".yml", ".yaml", ".sh", ""}


def _project_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        paths = [REPO / p for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        skip = {".git", ".venv", ".hypothesis", ".pytest_cache", ".ruff_cache", "build", "dist"}
        paths = [
            p
            for p in REPO.rglob("*")
            if p.is_file() and not any(part in skip or part.startswith(".venv") for part in p.parts)
        ]
    return [
        p
        for p in paths
        if p.suffix in TEXT_SUFFIXES and p.is_file() and p != Path(__file__).resolve()
    ]


def test_docs_and_sources_speak_of_the_project_alone():
    found = []
    for path in _project_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for what, pattern in FOREIGN.items():
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(REPO)}:{line}: {what}: {match.group(0)!r}")
    assert not found, "\n".join(found)


def test_foreign_patterns_catch_what_they_should():
    hits = ["see ../shared/DESIGN.md", "the goals of issue 3", "Issues 4 and 5", "the lead's tests",
            "The lead said"]  # fmt: skip
    misses = ["torch issue #61309", "pytorch#134767", "the leading dimension", "misleading",
              "a shared helper", "issues with precision"]  # fmt: skip
    for text in hits:
        assert any(p.search(text) for p in FOREIGN.values()), text
    for text in misses:
        assert not any(p.search(text) for p in FOREIGN.values()), text


def _readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands():
    """A fresh clone: one command sets up and runs the demo, one sets up and runs the whole
    suite, the way CI runs it."""
    first_block = re.search(r"```bash\n(.*?)```", _readme(), re.S)
    assert _readme().index("```bash") < _readme().index("\n## ")  # before any section
    demo, tests = first_block.group(1).splitlines()
    assert demo.startswith("python3 -m venv .venv && ") and demo.endswith("/crossent demo")
    assert "-r requirements-dev.txt" in demo
    assert tests == "bash .ci/run"
    assert (REPO / ".ci/run").is_file()


def test_readme_pypi_section_example_runs():
    readme = _readme()
    section = readme[readme.index("**From PyPI**") :]
    assert "pip install crossent" in section[:200]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(example.strip().splitlines()) <= 6
    namespace: dict = {}
    exec(compile(example, "README.md (PyPI example)", "exec"), namespace)
    torch = pytest.importorskip("torch")
    logits = namespace["logits"].detach().requires_grad_()
    target = torch.randint(0, 5, (8,))
    import crossent

    ours = crossent.cross_entropy(logits, target, label_smoothing=0.1)
    want = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(ours, want)
    assert namespace["logits"].grad is not None
