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

from fdlib.core.store import BASE_DTYPE, atomic_write

START, END = "<!-- gallery:start -->", "<!-- gallery:end -->"
RESAMPLED = ("questions", "prompts")  # what a finding's interval resamples
SELECTED_ON = ("train", "test")  # where a finding's cell was chosen
TEST_SELECTED = " (best cell on the test set)"  # the label of a cell chosen on the test set


def record_findings(notebook: str, findings: list[dict[str, Any]], directory: str | Path = "figures",
                    *, size: str | int | None = None, dtype: str | None = None) -> Path:
    """Write a notebook's headline numbers to `<directory>/data/<notebook>_findings.json`.

    Each finding: `finding` (text) and `value`, optionally `lo`, `hi` (a 95% interval), `n`,
    `n_questions` (where `n` counts prompts and questions have several), `resampled` (what the
    interval resamples: "questions" or "prompts") and `selected_on` ("train" or "test": where the
    reported cell, e.g. the best of a grid, was chosen; the table labels test-chosen cells).
    `size` is the run's size (`paper`, `quick`, a count) and `dtype` the model's ("float32",
    "bfloat16", ...: `Workspace.dtype`), shown beside them in the gallery ("paper, float32"); a
    findings file without a dtype reads as float32.
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
        if f.get("n_questions") is not None:
            row["n_questions"] = int(f["n_questions"])
        for key, allowed in (("resampled", RESAMPLED), ("selected_on", SELECTED_ON)):
            if f.get(key) is not None:
                if f[key] not in allowed:
                    raise ValueError(f"a finding's {key!r} must be one of {allowed}, got {f[key]!r}")
                row[key] = str(f[key])
        rows.append(row)
    path = Path(directory) / "data" / f"{notebook}_findings.json"
    head = {"notebook": notebook, **({} if size is None else {"size": str(size)}),
            **({} if dtype is None else {"dtype": str(dtype)})}
    text = json.dumps({**head, "findings": rows}, indent=1)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def run_label(findings: dict[str, Any]) -> str:
    """What a findings file rests on, as the gallery shows it: its size and dtype ("paper, float32";
    float32 where the file names no dtype, "?" for a size it does not name)."""
    return f"{findings.get('size', '?')}, {findings.get('dtype', BASE_DTYPE)}"


def _findings_table(figures: Path, notebooks: Path, prefix: str, link: str) -> list[str]:
    rows = []
    for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        data = figures / "data" / f"{nb.stem}_findings.json"
        if data.exists():
            got = json.loads(data.read_text(encoding="utf-8"))
            rows += [(nb.stem, run_label(got), f) for f in got["findings"]]
    if not rows:
        return []
    lines = ["| notebook | finding | value | 95% interval | n | size, dtype |", "| --- | --- | --- | --- | --- | --- |"]
    for stem, size, f in rows:
        ci = f"[{_fmt(f['lo'])}, {_fmt(f['hi'])}]" if "lo" in f and "hi" in f else ""
        if ci and "resampled" in f:
            ci += f" ({f['resampled']} resampled)"
        finding = f["finding"] + (TEST_SELECTED if f.get("selected_on") == "test" else "")
        n = f.get("n", "")
        if "n_questions" in f and f["n_questions"] != f.get("n"):
            n = f"{n} ({f['n_questions']} questions)" if n != "" else f"{f['n_questions']} questions"
        lines.append(f"| [`{stem[:2]}`]({prefix}notebooks/{stem}.ipynb) | {finding} | {_fmt(f['value'])} | {ci} "
                     f"| {n} | {size} |")
    return lines + [""]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def results_markdown(results: str | Path = "results") -> str:
    """The paper-size run's ledger from `results/manifest.json`: per study, the dtype of its rows,
    the rows stored of those asked for, the wall time, and the sizes of its working store and
    committed file. A study entry (or manifest) that names no dtype is float32.

    The rows are the manifest's, which `fdlib.runs.paper.write_manifest` (and `recount_manifest`)
    take from the committed results files: the ledger counts exactly the rows those files hold.
    A `keep` study (state "kept", or an entry without a state that asks for no rows) has none."""
    path = Path(results) / "manifest.json"
    if not path.exists():
        return ""
    m = json.loads(path.read_text(encoding="utf-8"))
    machine = m.get("machine", {})
    run_dtype = m.get("dtype", BASE_DTYPE)
    lines = [f"Paper-size run of `{m['model']}` in {run_dtype} (`{m['command'].split('  ')[0]}`), on "
             f"{machine.get('cpus', '?')} CPUs ({machine.get('platform', '?')}):", "",
             "| study | dtype | rows stored / asked for | decoding time (summed over jobs) | working store | committed file |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(m["studies"].items()):
        kept = r["state"] == "kept" if "state" in r else not r.get("expected")
        done = "kept (not store rows)" if kept else f"{r['rows']:,} / {r['expected']:,}"
        state = "" if not r.get("expected") or r["rows"] == r["expected"] else " (running)"
        hours = _hours(r["seconds"]) if r.get("seconds") else ""
        lines.append(f"| {name} | {r.get('dtype', run_dtype)} | {done}{state} | {hours} "
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


def _other_galleries(figures: Path) -> list[tuple[Path, str | None, str | None]]:
    """The galleries beside the default model's float32 one, as (folder, model, dtype): the default
    model's in another dtype (`figures/<dtype>/`), then per other model its float32 one
    (`figures/<model>/`) and its others (`figures/<model>/<dtype>/`)."""
    from fdlib.model.loading import DTYPES

    def folders(d: Path) -> list[Path]:
        return sorted(x for x in d.iterdir() if x.is_dir() and x.name != "data") if d.is_dir() else []

    out: list[tuple[Path, str | None, str | None]] = [(d, None, d.name) for d in folders(figures) if d.name in DTYPES]
    for d in folders(figures):
        if d.name not in DTYPES:
            out += [(d, d.name, None)] + [(x, d.name, x.name) for x in folders(d) if x.name in DTYPES]
    return out


def _gallery_title(model: str | None, dtype: str | None) -> str:
    on = (f" on `{model}`" if model else "") + (f" in `{dtype}`" if dtype else "")
    env = " ".join(([f"FDLIB_MODEL={model}"] if model else []) + ([f"FDLIB_DTYPE={dtype}"] if dtype else []))
    return f"**Findings{on}** (`{env}`)"


def gallery_markdown(figures: str | Path = "figures", notebooks: str | Path = "notebooks", *, prefix: str = "") -> str:
    """Markdown: per notebook, a link and its figures (PNG linking the interactive HTML), then
    the findings table; then, per other gallery (another dtype in `figures/<dtype>/`, another
    model in `figures/<model>/`, both in `figures/<model>/<dtype>/`), its findings and figures.
    `prefix` is the path from the README to the repository root."""
    figures, notebooks = Path(figures), Path(notebooks)
    lines: list[str] = []
    for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb")):
        links = _figure_links(figures, nb.stem[:2], prefix, "figures")
        lines += [f"**[`{nb.stem}`]({prefix}notebooks/{nb.name})**" + ("" if links else ": no figure")
                  + (f" — {_provenance(figures, nb.stem)}" if links else ""), ""]
        if links:
            lines += links + [""]
    lines += _findings_table(figures, notebooks, prefix, "figures")
    for other, model, dtype in _other_galleries(figures):
        rel = f"figures/{other.relative_to(figures).as_posix()}"
        table = _findings_table(other, notebooks, prefix, rel)
        if not table:
            continue
        lines += [_gallery_title(model, dtype), ""] + table
        links = [link for nb in sorted(notebooks.glob("[0-9][0-9]_*.ipynb"))
                 for link in _figure_links(other, nb.stem[:2], prefix, rel)]
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
