"""Every Python block of the README runs as written, in order, as a new user would paste them
(integration tier: the real default model at `quick` size). A block preceded by an HTML comment
`<!-- not run by tests/test_readme.py: why -->` (a hub model, a GPU) is skipped."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = "<!-- not run by tests/test_readme.py:"


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(line number, code, skipped) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        line = text[: m.start()].count("\n") + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        out.append((line, m.group(1), before.startswith(SKIP)))
    return out


def test_readme_blocks_are_found_and_skips_say_why():
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert len([b for b in blocks if not b[2]]) >= 5
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith(SKIP):
            assert len(line) > len(SKIP) + 10 and line.endswith("-->"), f"a skip says why: {line}"


@pytest.mark.integration
def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the examples' stores go to runs/ here
    namespace: dict = {"__name__": "readme"}
    for line, code, skipped in python_blocks(README.read_text(encoding="utf-8")):
        if skipped:
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the README's block at line {line} fails: {type(e).__name__}: {e}") from e
