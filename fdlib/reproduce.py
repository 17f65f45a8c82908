"""Re-run every notebook top to bottom so each writes its figures into `figures/`, then
regenerate the README's gallery and findings table from them.

    python -m fdlib.reproduce --size quick     # minutes on a laptop CPU
    python -m fdlib.reproduce --size full      # the real study (hours on a CPU; resumable)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


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
    ap.add_argument("--size", default="quick", help="quick, full, or a number of questions")
    ap.add_argument("--notebooks", default=str(Path(__file__).resolve().parents[1] / "notebooks"))
    ap.add_argument("notebook", nargs="*", help="only these notebooks (default: all, in name order)")
    args = ap.parse_args(argv)
    root = Path(args.notebooks)
    chosen = [Path(p) for p in args.notebook] or sorted(root.glob("[0-9]*.ipynb"))
    if not chosen:
        raise SystemExit(f"no notebooks found in {root}")
    run_notebooks(chosen, args.size)
    from fdlib.gallery import update_readme

    repo = root.parent
    if (repo / "README.md").exists():
        update_readme(repo / "README.md", repo / "figures", root)  # the gallery and findings


if __name__ == "__main__":
    main()
