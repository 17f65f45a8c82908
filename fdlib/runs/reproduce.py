"""Run every notebook top to bottom so each writes its figures, then (at `paper` size) regenerate
the README's gallery and findings from the committed results.

    python -m fdlib reproduce                  # paper size, rendered from results/ (minutes)
    python -m fdlib reproduce --size quick     # computes a small run into runs/ (CI's size)
    python -m fdlib reproduce --dtype bfloat16 # the bfloat16 results (results/bfloat16/) into figures/bfloat16/

At `paper` the notebooks read the committed results files and decode nothing; a notebook whose
results are not committed yet is skipped, naming them (`python -m fdlib paper run` computes them).
Other sizes compute into `runs/` and write their figures under `runs/`, never into `figures/`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

from fdlib.runs.paper import NOTEBOOK_STUDIES, committed_file
from fdlib.core.store import BASE_DTYPE
from fdlib.runs.workspace import NOTEBOOK_DTYPES, PAPER, Workspace, notebook_dtype


def missing_results(notebook: str, ws: Workspace) -> list[Path]:
    """The committed results files a notebook renders from that are not there: its studies' in
    `ws`, and notebook 01's ranking (in float32 for a notebook with a dtype of its own, whose
    heads are the float32 ranking's)."""
    if notebook not in NOTEBOOK_STUDIES:
        return []  # the workshop and the explorer compute what they show
    ranking = ws.in_dtype(BASE_DTYPE) if notebook in NOTEBOOK_DTYPES else ws
    files = [committed_file(ranking, "01_contextual")] + [committed_file(ws, n) for n in NOTEBOOK_STUDIES[notebook]]
    return [p for p in dict.fromkeys(files) if not p.exists()]


def run_notebooks(notebooks: list[Path], size: str | int, timeout: int | None = None, dtype: str | None = None) -> None:
    """Execute the notebooks in place at `size`, with `dtype` (default: `FDLIB_DTYPE` as it is)."""
    import nbformat
    from nbclient import NotebookClient

    os.environ["FDLIB_SIZE"] = str(size)  # inherited by the kernels: the notebooks' one size switch
    if dtype is not None:
        os.environ["FDLIB_DTYPE"] = dtype
    for path in notebooks:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        sys.stderr.write(f"{path.name}: done in {time.time() - start:.0f} s\n")


def reproduce(notebooks: Path, size: str | int = PAPER, only: Sequence[Path] = (), dtype: str | None = None) -> None:
    """Run `only` (default: every numbered notebook in `notebooks`) at `size` in `dtype` (default:
    `FDLIB_DTYPE`, else float32); at `paper`, only the notebooks whose results are committed, then
    regenerate the README's gallery and findings."""
    from fdlib.data.nq import parse_size
    from fdlib.views.gallery import update_readme

    chosen = list(only) or sorted(notebooks.glob("[0-9]*.ipynb"))
    if not chosen:
        raise SystemExit(f"no notebooks found in {notebooks}")
    size = parse_size(str(size))
    overrides = {"FDLIB_SIZE": str(size), **({} if dtype is None else {"FDLIB_DTYPE": dtype})}
    ws = Workspace.from_env(root=notebooks.parent, environ={**os.environ, **overrides})
    if ws.rendering:
        ready = []
        for path in chosen:
            # a notebook with a dtype of its own renders in it unless a dtype is given
            mine = ws if dtype is not None or os.environ.get("FDLIB_DTYPE") else ws.in_dtype(notebook_dtype(path.stem))
            missing = missing_results(path.stem, mine)
            if missing:
                sys.stderr.write(f"{path.name}: skipped, no committed results yet ({', '.join(p.name for p in missing)}); "
                                 "`./dev figures paper` computes them\n")
            else:
                ready.append(path)
        chosen = ready
    run_notebooks(chosen, size, dtype=dtype)
    if size == PAPER and (notebooks.parent / "README.md").exists():
        update_readme(notebooks.parent / "README.md", notebooks.parent / "figures", notebooks, notebooks.parent / "results")
