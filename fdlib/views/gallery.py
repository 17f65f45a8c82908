"""The README's gallery: every figure the notebooks write, each linked to its notebook, and a
"what we found" table assembled from the findings each notebook records. `python -m
fdlib.runs.reproduce` (the README's main command) regenerates both after re-running the notebooks.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fdlib.core.store import atomic_write

START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"


def record_findings(notebook: str, findings: list[dict[str, Any]], directory: str | Path = "figures",
                    *, size: str | int | None = None) -> Path:
    """Write a notebook's headline numbers to `<directory>/data/<notebook>_findings.json`.

    Each finding: `finding` (text) and `value`, optionally `lo`, `hi` (a 95% interval), `n`.
    `size` is the run's size (`paper`, `quick`, a count), shown beside them in the gallery.
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
    head = {"notebook": notebook} if size is None else {"notebook": notebook, "size": str(size)}
    text = json.dumps({**head, "findings": rows}, indent=1)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _findings_table(figures: Path, notebooks: Path, prefix: str, link: str) -> list[str]:
    rows = []
    for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        data = figures / "data" / f"{nb.stem}_findings.json"
        if data.exists():
            got = json.loads(data.read_text(encoding="utf-8"))
            rows += [(nb.stem, got.get("size", "?"), f) for f in got["findings"]]
    if not rows:
        return []
    lines = ["| notebook | finding | value | 95% interval | n | size |", "| --- | --- | --- | --- | --- | --- |"]
    for stem, size, f in rows:
        ci = f"[{_fmt(f['lo'])}, {_fmt(f['hi'])}]" if "lo" in f and "hi" in f else ""
        lines.append(f"| [`{stem[:2]}`]({prefix}notebooks/{stem}.ipynb) | {f['finding']} | {_fmt(f['value'])} | {ci} "
                     f"| {f.get('n', '')} | {size} |")
    return lines + [""]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def results_markdown(results: str | Path = "results") -> str:
    """The paper-size run's ledger from `results/manifest.json`: per study, the rows stored of
    those asked for, the wall time, and the sizes of its working store and committed file."""
    path = Path(results) / "manifest.json"
    if not path.exists():
        return ""
    m = json.loads(path.read_text(encoding="utf-8"))
    machine = m.get("machine", {})
    lines = [f"Paper-size run of `{m['model']}` (`{m['command'].split('  ')[0]}`), on {machine.get('cpus', '?')} CPUs "
             f"({machine.get('platform', '?')}):", "",
             "| study | rows stored / asked for | decoding time (summed over jobs) | working store | committed file |",
             "| --- | --- | --- | --- | --- |"]
    for name, r in sorted(m["studies"].items()):
        done = f"{r['rows']:,} / {r['expected']:,}" if r.get("expected") else "kept (not store rows)"
        state = "" if not r.get("expected") or r["rows"] == r["expected"] else " (running)"
        lines.append(f"| {name} | {done}{state} | {_hours(r['seconds']) if r.get('seconds') else ''} "
                     f"| {r['store_bytes'] / 2**20:.1f} MiB | {r['results_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(lines) + "\n"


def _provenance(figures: Path, stem: str) -> str:
    """What a notebook's figures rest on, from its findings file: the size and the largest n."""
    data = figures / "data" / f"{stem}_findings.json"
    if not data.exists():
        return "no findings recorded (an illustration, not a study)"
    got = json.loads(data.read_text(encoding="utf-8"))
    ns = [f["n"] for f in got["findings"] if "n" in f]
    size = got.get("size", "unrecorded")
    text = f"size `{size}`" + (f", n up to {max(ns)}" if ns else "")
    return text if size == "paper" else text + " (not yet rendered at `paper` size: its results are not committed yet)"


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
        lines += [f"**[`{nb.stem}`]({prefix}notebooks/{nb.name})**" + ("" if links else ": no figure")
                  + (f" — {_provenance(figures, nb.stem)}" if links else ""), ""]
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


def update_readme(readme: str | Path = "README.md", figures: str | Path = "figures", notebooks: str | Path = "notebooks",
                  results: str | Path | None = None) -> bool:
    """Replace the README's text between the gallery markers (the gallery, its findings, and the
    paper-size run's ledger when `results` holds one); True when it changed."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"{readme} needs exactly one {START} ... {END} block")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    ledger = results_markdown(results) if results is not None else ""
    body = gallery_markdown(figures, notebooks) + (f"\n{ledger}" if ledger else "")
    new = f"{head}{START}\n{body}{END}{tail}"
    if new == text:
        return False
    atomic_write(readme, lambda tmp: Path(tmp).write_text(new, encoding="utf-8"))
    return True
