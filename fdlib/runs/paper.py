"""The paper-size run: every notebook's studies at `paper` size, resumable and shardable, then the
committed results files they render from.

    python -m fdlib paper status                    # where each study stands, with an ETA
    python -m fdlib paper run [--only 02 07]        # compute (resumes), then export
    python -m fdlib paper run --only 02 --shard 3/8 # one job of a cluster array (scripts/paper_slurm.sh;
                                                    # notebook 07 chooses on all train questions: unsharded)
    python -m fdlib paper merge --only 02           # merge a sharded study's stores
    python -m fdlib paper export                    # runs/paper/*.sqlite -> results/*.jsonl.gz
    python -m fdlib paper run --from-results        # continue a committed run (another machine)
    python -m fdlib paper run --dtype bfloat16      # the same run in bfloat16: its own stores and
                                                    # results (runs/bfloat16/, results/bfloat16/)

`run` executes each notebook's code as a script with `FDLIB_SIZE=paper FDLIB_RECOMPUTE=1` (and the
model's `FDLIB_MODEL`, `FDLIB_DTYPE`), so the progress bar and ETA of every study show in the
terminal; each study resumes from its store in `runs/[<model>/][<dtype>/]paper/` and writes one
transaction per question. `./dev figures paper` is `run`, then the notebooks rendered from the
results (`python -m fdlib reproduce --size paper`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fdlib.core.store import BASE_DTYPE, RESULTS_SUFFIX, Store, atomic_write, export_results, merge_stores, results_rows
from fdlib.runs.workspace import PAPER, Workspace

# The stores each notebook's studies keep (`Workspace.store` names), in run order. A notebook
# reads the stores of the ones before it (every study ranks heads with 01's).
NOTEBOOK_STUDIES: dict[str, tuple[str, ...]] = {
    "01_contextual_heads": ("01_contextual",),
    "02_split_softmax": ("02_split_softmax",),
    "03_focus_directions": ("03_focus", "03_table3"),
    "04_long_context_tasks": ("04_tasks", "04_lost"),
    "05_retrieval_vs_contextual": ("05_retrieval", "05_boost_ablate"),
    "07_interventions_compared": ("07_choose", "07_compare", "07_lost", "07_bias_shares"),
}
# Per-head arrays a results file keeps (the figures' needs): the EM grids keep none.
ARRAYS: dict[str, bool] = {"02_split_softmax": False, "03_focus": False, "07_choose": False}
# Studies that are not store rows: `Workspace.keep` JSON files.
KEPT: tuple[str, ...] = ("05_retrieval", "07_bias_shares")
# The progress line a store started from its committed results carries: the committed run's rows
# and decoding time, so the ledger of a continued run counts the time spent before it.
COMMITTED = "the committed run (seeded from results/)"


def workspace(model: str | None, root: Path, shard: tuple[int, int] = (0, 1), dtype: str | None = None) -> Workspace:
    """The paper-size computing workspace of `model` (default: the default model) in `dtype`
    (default: float32)."""
    from fdlib.model.loading import DEFAULT_MODEL

    return Workspace(model or DEFAULT_MODEL, PAPER, recompute=True, shard=shard, root=root, dtype=dtype or BASE_DTYPE)


def committed_file(ws: Workspace, name: str) -> Path:
    """The committed results file of study `name`."""
    return ws.committed(name, kept=name in KEPT)


def working_file(ws: Workspace, name: str) -> Path:
    """The unsharded working store (or `keep` JSON) of study `name` in `runs/paper/`."""
    return ws.kept_file(name) if name in KEPT else ws.input(name)


def shard_stores(ws: Workspace, name: str) -> list[Path]:
    """The shard stores of study `name`, beside its working store."""
    folder = working_file(ws, name).parent
    return sorted(folder.glob(f"{name}.shard-*.sqlite")) if folder.exists() else []


def _copy(source: Path, target: Path) -> Path:
    return atomic_write(target, lambda tmp: Path(tmp).write_bytes(source.read_bytes()))


def chosen(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(NOTEBOOK_STUDIES)
    out = [nb for nb in NOTEBOOK_STUDIES if any(nb.startswith(o) for o in only)]
    unknown = [o for o in only if not any(nb.startswith(o) for nb in NOTEBOOK_STUDIES)]
    if unknown:
        raise SystemExit(f"unknown notebooks {unknown}: expected prefixes of {list(NOTEBOOK_STUDIES)}")
    return out


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def study_status(ws: Workspace) -> list[dict[str, Any]]:
    """Per study: the dtype of its rows (the workspace's), rows stored vs asked for, decoding time
    so far, an ETA, store and results sizes.

    `rows` are the distinct (sample, condition) rows its stores hold (the unsharded one and its
    shards, as a merge and `export` would write them), never the progress lines' sum: a call
    rerun with more conditions or prompts keeps its earlier call's line, whose rows the new line
    counts again. `expected` is `rows` plus the rows the calls still lack (each line's asked-for
    minus stored; the unsharded store's lines where it has any, else the shards'), so a finished
    study reads `rows == expected`. `seconds` is the decoding wall time of every call into its
    stores (and a seeded store's committed run), rows later superseded or replaced included: the
    store keeps no time per row, so it is what the run cost, not a rate of the rows it holds."""
    out = []
    for nb, names in NOTEBOOK_STUDIES.items():
        for name in names:
            path = working_file(ws, name)
            kept = name in KEPT and path.exists()  # a `keep` JSON: no rows, no ledger
            stores = [] if name in KEPT else [p for p in [path, *shard_stores(ws, name)] if p.exists()]
            # rows left: the unsharded store's own runs where it has any (after a merge, its rerun
            # sees every row), else the shards'; time: every store's, summed
            counts: dict[Path, tuple[int, int]] = {}
            lines: dict[Path, list[tuple[int, float | None]]] = {}  # per store: (rows left, s/row of its call)
            held: set[tuple[str, str]] = set()  # (sample, condition) of every stored row
            seconds, earlier, computed, elsewhere = 0.0, 0.0, 0, 0
            for p in stores:
                with Store(p) as db:
                    prog = db.progress()
                    held |= set(db.setups())
                # a seeded store's committed line counts its rows until the calls that made them
                # rerun here (their lines count the same rows again), and its time always
                seeded = [r for r in prog if r["study"] == COMMITTED]
                runs = [r for r in prog if r["study"] != COMMITTED]
                rows = runs or seeded
                counts[p] = (sum(r["expected"] for r in rows), sum(r["done"] for r in rows))
                lines[p] = [(r["expected"] - r["done"], r["seconds"] / r["computed"] if runs and r["computed"] else None)
                            for r in rows]
                seconds += sum(r["seconds"] for r in runs)
                earlier += sum(r["seconds"] for r in seeded)
                elsewhere += sum(r["elsewhere_bytes"] for r in seeded)
                computed += sum(r["computed"] for r in runs)
            main_counts = counts.get(path, (0, 0))
            asked, done = main_counts if main_counts[0] else (
                sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
            rows = len(held)
            expected = rows + max(0, asked - done)
            results = committed_file(ws, name)
            # Each call's rows left at that call's own rate (a study's calls differ: 03's comparison
            # cell decodes ~4x slower than its grid); a call not yet decoding anything at the study's
            # mean rate. A sharded study's shards run side by side.
            mean_rate = seconds / computed if computed else 0.0
            used = [path] if main_counts[0] else list(counts)
            left = sum(n * (r if r is not None else mean_rate) for p in used for n, r in lines[p])
            eta = left / max(1, len([p for p in used if p != path]))
            seconds += earlier
            out.append({
                "notebook": nb, "study": name, "dtype": ws.dtype, "rows": rows, "expected": expected,
                "seconds": round(seconds, 1), "eta_seconds": round(eta, 1),
                # a seeded store holds the committed rows compactly: count them at the size they took
                "store_bytes": sum(p.stat().st_size for p in stores) + (path.stat().st_size if kept else 0)
                + elsewhere,
                "results_bytes": results.stat().st_size if results.exists() else 0,
                "state": "kept" if kept else (
                    "not started" if not stores else "complete" if expected and rows == expected else "started"),
            })
    return out


def format_status(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'study':<22} {'rows':>15} {'time':>8} {'ETA':>8} {'store':>9} {'results':>9}"]
    for r in rows:
        frac = f"{r['rows']}/{r['expected']}" if r["expected"] else r["state"]
        eta = hms(r["eta_seconds"]) if r["eta_seconds"] else ("done" if r["expected"] and r["rows"] == r["expected"] else "-")
        lines.append(f"{r['study']:<22} {frac:>15} {hms(r['seconds']):>8} {eta:>8} "
                     f"{r['store_bytes'] / 2**20:>7.1f}MB {r['results_bytes'] / 2**20:>7.2f}MB")
    return "\n".join(lines)


def notebook_script(path: Path) -> str:
    """A notebook's code cells as one script (display-only expressions are harmless there)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "code")


def run_notebook(path: Path, ws: Workspace, threads: int | None = None) -> float:
    """Run a notebook's code at `paper` size, computing, its progress bars on this terminal.
    `threads` caps torch's threads (OMP_NUM_THREADS): give each job of a shared machine its
    share of the cores, since oversubscribed OpenMP threads spin and a study can run 5x slower."""
    env = {**os.environ, "FDLIB_SIZE": PAPER, "FDLIB_RECOMPUTE": "1", "FDLIB_MODEL": ws.model, "FDLIB_DTYPE": ws.dtype,
           "FDLIB_SHARD": f"{ws.shard[0]}/{ws.shard[1]}", "MPLBACKEND": "Agg"}
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", notebook_script(path)], cwd=path.parent, env=env)
    try:
        if child.wait() != 0:
            raise subprocess.CalledProcessError(child.returncode, f"{path.name} (as a script)")
    finally:  # interrupted (Ctrl-C, or SIGTERM: see main): the study stops with us, at a sample boundary at worst
        if child.poll() is None:
            child.terminate()
            child.wait()
    return time.perf_counter() - start


def export(ws: Workspace, notebooks: Sequence[str]) -> list[Path]:
    """Write the results files of these notebooks' studies from their `runs/paper` stores, and
    the manifest (settings, rows, wall time, store and file sizes, machine)."""
    written = []
    for nb in notebooks:
        for name in NOTEBOOK_STUDIES[nb]:
            source, target = working_file(ws, name), committed_file(ws, name)
            if not source.exists():
                continue
            written.append(_copy(source, target) if name in KEPT
                           else export_results(source, target, arrays=ARRAYS.get(name, True)))
    write_manifest(ws)
    return written


def recount(entry: dict[str, Any], results: Path) -> dict[str, Any]:
    """A ledger entry whose counts are its committed results file's: `rows` is the rows that file
    holds (nothing else: not a working store's, not the progress lines' sum), `expected` those
    rows plus the rows the entry says are still to decode (`expected - rows` as given, never
    negative), `state` and `results_bytes` follow. A `keep` study's entry (no rows) is returned
    as it is; every other field (time, store size, ETA) is kept."""
    if entry.get("state") == "kept" or not results.name.endswith(RESULTS_SUFFIX):
        return dict(entry)
    left = max(0, int(entry.get("expected") or 0) - int(entry.get("rows") or 0))
    rows = results_rows(results) if results.exists() else 0
    return {**entry, "rows": rows, "expected": rows + left,
            "results_bytes": results.stat().st_size if results.exists() else 0,
            "state": "complete" if rows and not left else "started"}


def recount_manifest(ws: Workspace) -> Path | None:
    """Rewrite `ws`'s manifest with every study's counts taken from its committed results file
    (`recount`), without a working store and without decoding anything; None where there is no
    manifest. `write_manifest` does the same after an export."""
    path = ws.results / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["studies"] = {name: recount(entry, committed_file(ws, name))
                           for name, entry in manifest.get("studies", {}).items()}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def write_manifest(ws: Workspace) -> Path:
    """`results/[<model>/][<dtype>/]manifest.json`: per study its dtype, rows, wall time and sizes,
    and how they were made. An entry without a dtype (written before the dtype was a setting) is
    float32.

    The ledger counts exactly the rows the committed files hold: each study's `rows` is its
    committed results file's row count and `expected` those plus the rows its calls still lack
    (`recount`), never the working store's progress lines, which count a call's rows again when
    it is rerun with more conditions or prompts. Entries of studies not in the working stores
    (an earlier run's) are recounted from their files too. `seconds` is the decoding wall time of
    every call that went into the study (`study_status`), time spent on rows since superseded or
    replaced included (the stores keep no time per row): it is what the run cost, not a count."""
    import torch

    path = ws.results / "manifest.json"
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    studies = {r["study"]: r for r in study_status(ws) if r["state"] != "not started"}
    studies = {name: recount(entry, committed_file(ws, name))
               for name, entry in {**old.get("studies", {}), **studies}.items()}
    env, flag = ("", "") if ws.dtype == BASE_DTYPE else (f"FDLIB_DTYPE={ws.dtype} ", f" --dtype {ws.dtype}")
    manifest = {
        "command": f"{env}./dev figures paper  (python -m fdlib paper run{flag}; then python -m fdlib reproduce "
                   f"--size paper{flag})",
        "model": ws.model, "dtype": ws.dtype, "size": PAPER,
        "machine": old.get("machine") or {"platform": platform.platform(), "cpus": os.cpu_count(),
                                          "torch_threads": torch.get_num_threads()},
        "studies": studies,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def seed_from_results(ws: Workspace, notebooks: Sequence[str] | None = None) -> list[Path]:
    """Start each study's missing working store from its committed results file, so a run
    continues where the committed one stopped (on another machine, or after `runs/` was lost).
    Seeded rows are the committed ones (float16 arrays), not recomputed. By default every
    notebook's studies: later notebooks read earlier ones' (the head ranking of 01) as inputs,
    which would otherwise be recomputed."""
    manifest = ws.results / "manifest.json"
    ledger = json.loads(manifest.read_text(encoding="utf-8")).get("studies", {}) if manifest.exists() else {}
    out = []
    for nb in NOTEBOOK_STUDIES if notebooks is None else notebooks:
        for name in NOTEBOOK_STUDIES[nb]:
            store, results = working_file(ws, name), committed_file(ws, name)
            if results.exists() and not store.exists():
                if name in KEPT:
                    _copy(results, store)
                else:
                    merge_stores([results], store)
                    seed_ledger(store, ledger.get(name, {}))
                out.append(store)
    return out


def seed_ledger(store: Path, entry: dict[str, Any]) -> None:
    """Carry a study's manifest entry (rows asked for and stored, decoding time, store size) into
    its working store as the committed run's progress line. The seeded copy (float16, only the
    exported arrays) is smaller than the store that decoded the rows; the difference is kept so
    the ledger reports the size the rows took there."""
    if entry.get("expected") or entry.get("seconds"):
        elsewhere = max(0, int(entry.get("store_bytes", 0)) - store.stat().st_size)
        with Store(store) as db:
            db.note_progress(COMMITTED, expected=entry.get("expected", 0), done=entry.get("rows", 0),
                             seconds=entry.get("seconds", 0.0), elsewhere_bytes=elsewhere)


def merge(ws: Workspace, notebooks: Sequence[str]) -> list[Path]:
    """Merge each study's shard stores into its unsharded store."""
    out = []
    for nb in notebooks:
        for name in NOTEBOOK_STUDIES[nb]:
            shards = shard_stores(ws, name)
            if shards:
                out.append(working_file(ws, name))
                merge_stores(shards, out[-1])
    return out
