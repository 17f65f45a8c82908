"""The README's gallery: every figure the notebooks write, each linked to its notebook, and a
"what we found" table assembled from the findings each notebook records. `python -m
fdlib.reproduce` (the README's main command) regenerates both after re-running the notebooks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fdlib.store import atomic_write

START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"


def record_findings(notebook: str, findings: list[dict[str, Any]], directory: str | Path = "figures") -> Path:
    """Write a notebook's headline numbers to `<directory>/data/<notebook>_findings.json`.

    Each finding: `finding` (text) and `value`, optionally `lo`, `hi` (a 95% interval), `n`.
    """
    if not re.fullmatch(r"\d\d_[a-z0-9_]+", notebook):
        raise ValueError(f"notebook must look like '01_contextual_heads', got {notebook!r}")
    rows = []
    for f in findings:
        if "finding" not in f or "value" not in f:
            raise ValueError(f"a finding needs 'finding' and 'value', got {f!r}")
        row = {"finding": str(f["finding"]), "value": float(f["value"])}
        for key in ("lo", "hi"):
            if f.get(key) is not None:
                row[key] = float(f[key])
        if f.get("n") is not None:
            row["n"] = int(f["n"])
        rows.append(row)
    path = Path(directory) / "data" / f"{notebook}_findings.json"
    text = json.dumps({"notebook": notebook, "findings": rows}, indent=1)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def model_dirs(model: str, root: str | Path = "..") -> tuple[Path, Path]:
    """Where a notebook writes its figures and stores for `model`: `figures/` and `runs/` for the
    default model, `figures/<model>/` and `runs/<model>/` for any other (so a second model's run
    neither overwrites the default gallery nor meets the default model's stores)."""
    from fdlib.models import DEFAULT_MODEL

    root = Path(root)
    if model == DEFAULT_MODEL:
        return root / "figures", root / "runs"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.split("/")[-1])
    return root / "figures" / slug, root / "runs" / slug


def _findings_table(figures: Path, notebooks: Path, prefix: str, link: str) -> list[str]:
    rows = []
    for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        data = figures / "data" / f"{nb.stem}_findings.json"
        if data.exists():
            rows += [(nb.stem, f) for f in json.loads(data.read_text(encoding="utf-8"))["findings"]]
    if not rows:
        return []
    lines = ["| notebook | finding | value | 95% interval | n |", "| --- | --- | --- | --- | --- |"]
    for stem, f in rows:
        ci = f"[{_fmt(f['lo'])}, {_fmt(f['hi'])}]" if "lo" in f and "hi" in f else ""
        lines.append(f"| [`{stem[:2]}`]({prefix}notebooks/{stem}.ipynb) | {f['finding']} | {_fmt(f['value'])} | {ci} | {f.get('n', '')} |")
    return lines + [""]


def _figure_links(figures: Path, tag: str, prefix: str, rel: str) -> list[str]:
    out = []
    for png in sorted(figures.glob(f"{tag}_*.png")):
        html = png.with_suffix(".html")
        target = f"{prefix}{rel}/{html.name}" if html.exists() else f"{prefix}{rel}/{png.name}"
        out.append(f"[![{png.stem}]({prefix}{rel}/{png.name})]({target})")
    return out


def gallery_markdown(figures: str | Path = "figures", notebooks: str | Path = "notebooks", *, prefix: str = "") -> str:
    """Markdown: per notebook, a link and its figures (PNG linking the interactive HTML), then
    the findings table; then, per other model with results under `figures/<model>/`, its
    findings and figures. `prefix` is the path from the README to the repository root."""
    figures, notebooks = Path(figures), Path(notebooks)
    lines: list[str] = []
    for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        links = _figure_links(figures, nb.stem[:2], prefix, "figures")
        lines += [f"**[`{nb.stem}`]({prefix}notebooks/{nb.name})**" + ("" if links else ": no figure"), ""]
        if links:
            lines += links + [""]
    lines += _findings_table(figures, notebooks, prefix, "figures")
    for other in sorted(d for d in figures.iterdir() if d.is_dir() and d.name != "data") if figures.is_dir() else []:
        table = _findings_table(other, notebooks, prefix, f"figures/{other.name}")
        if not table:
            continue
        lines += [f"**Findings on `{other.name}`** (`FDLIB_MODEL={other.name}`)", ""] + table
        links = [link for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb"))
                 for link in _figure_links(other, nb.stem[:2], prefix, f"figures/{other.name}")]
        if links:
            lines += links + [""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: str | Path = "README.md", figures: str | Path = "figures", notebooks: str | Path = "notebooks") -> bool:
    """Replace the README's text between the gallery markers; True when it changed."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{readme} needs exactly one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    new = f"{head}{START}\n{gallery_markdown(figures, notebooks)}{END}{tail}"
    if new == text:
        return False
    atomic_write(readme, lambda tmp: Path(tmp).write_text(new, encoding="utf-8"))
    return True
