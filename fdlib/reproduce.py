"""Run every notebook top to bottom so each writes its figures, then (at `paper` size) regenerate
the README's gallery and findings from the committed results.

    python -m fdlib.reproduce                  # paper size, rendered from results/ (minutes)
    python -m fdlib.reproduce --size quick     # computes a small run into runs/ (CI's size)

At `paper` the notebooks read the committed results files and decode nothing; a notebook whose
results are not committed yet is skipped, naming them (`python -m fdlib.paper run` computes them).
Other sizes compute into `runs/` and write their figures under `runs/`, never into `figures/`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fdlib.paper import NOTEBOOK_STUDIES, committed_file
from fdlib.workspace import PAPER, Workspace


def missing_results(notebook: str, ws: Workspace) -> list[Path]:
    """The committed results files a notebook renders from that are not there."""
    if notebook not in NOTEBOOK_STUDIES:
        return []  # the workshop and the explorer compute what they show
    names = dict.fromkeys(("01_contextual",) + NOTEBOOK_STUDIES[notebook])
    return [p for p in (committed_file(ws, n) for n in names) if not p.exists()]


def run_notebooks(notebooks: list[Path], size: str | int, timeout: int | None = None) -> None:
    import nbformat
    from nbclient import NotebookClient

    os.environ["FDLIB_SIZE"] = str(size)  # inherited by the kernels: the notebooks' one size switch
    for path in notebooks:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        sys.stderr.write(f"{path.name}: done in {time.time() - start:.0f} s\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=PAPER, help="paper (default: render the committed results), quick, full, or a count")
    ap.add_argument("--notebooks", default=str(Path(__file__).resolve().parents[1] / "notebooks"))
    ap.add_argument("notebook", nargs="*", help="only these notebooks (default: all, in name order)")
    args = ap.parse_args(argv)
    root = Path(args.notebooks)
    chosen = [Path(p) for p in args.notebook] or sorted(root.glob("[0-9]*.ipynb"))
    if not chosen:
        raise SystemExit(f"no notebooks found in {root}")
    from fdlib.data import parse_size

    size = parse_size(args.size)
    ws = Workspace.from_env(root=root.parent, environ={**os.environ, "FDLIB_SIZE": str(size)})
    if ws.rendering:
        ready = []
        for path in chosen:
            missing = missing_results(path.stem, ws)
            if missing:
                sys.stderr.write(f"{path.name}: skipped, no committed results yet ({', '.join(p.name for p in missing)}); "
                                 "`./dev figures paper` computes them\n")
            else:
                ready.append(path)
        chosen = ready
    run_notebooks(chosen, size)
    if size == PAPER and (root.parent / "README.md").exists():
        from fdlib.gallery import update_readme

        update_readme(root.parent / "README.md", root.parent / "figures", root, root.parent / "results")


if __name__ == "__main__":
    main()
