"""The paper-size ledger (`results/manifest.json`, the README's table under the gallery) counts
exactly the rows the committed results files hold: never a working store's progress lines, which
count a call's rows again when it is rerun with other conditions or prompts, nor rows a working
store holds that were not exported."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

import fdlib
from fdlib.core.store import RESULTS_SUFFIX, Row, Store, export_results, results_rows
from fdlib.runs import paper
from fdlib.runs.workspace import Workspace
from fdlib.views.gallery import results_markdown

ROOT = Path(__file__).resolve().parents[1]
STUDY = "02_split_softmax"


def _ws(tmp_path: Path) -> Workspace:
    return Workspace(fdlib.DEFAULT_MODEL, "paper", recompute=True, root=tmp_path)


def _rows(setup: str, conditions: list[str], samples: int) -> list[Row]:
    return [Row(f"s{i}/long", c, f"{setup}-{c}", {"answer": "x", "score": 1.0, "setup": {"name": setup}}, {})
            for i in range(samples) for c in conditions]


def _file_rows(path: Path) -> int:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def test_results_rows_counts_the_file_lines(tmp_path):
    with Store(tmp_path / "s.sqlite") as db:
        db.put(_rows("a", ["c1", "c2"], 3))
    path = export_results(tmp_path / "s.sqlite", tmp_path / f"s{RESULTS_SUFFIX}")
    assert results_rows(path) == _file_rows(path) == 6


def test_manifest_counts_the_exported_rows_not_the_progress_lines(tmp_path):
    """A superseded setup's call (its rows since replaced by the current setup's, which asks for a
    condition more) keeps its progress line in the working store: the ledger counts the rows the
    export writes, not both lines."""
    ws = _ws(tmp_path)
    store = ws.store(STUDY)
    with Store(store) as db:
        db.put(_rows("old", ["c1"], 4))  # the superseded setup, one condition
        db.note_progress("study: 1 conditions (aaaa), 4 prompts, shard 0/1", expected=4, done=4, seconds=4.0, computed=4)
        db.put(_rows("new", ["c1", "c2"], 4))  # the current setup replaces them and adds c2
        db.note_progress("study: 2 conditions (bbbb), 4 prompts, shard 0/1", expected=8, done=8, seconds=8.0, computed=8)
        assert len(db) == 8 and sum(r["done"] for r in db.progress()) == 12  # what the ledger used to count
    written = paper.export(ws, [nb for nb, names in paper.NOTEBOOK_STUDIES.items() if STUDY in names])
    committed = paper.committed_file(ws, STUDY)
    assert written == [committed]
    with gzip.open(committed, "rt", encoding="utf-8") as f:
        assert {json.loads(line)["setup_sha"].split("-")[0] for line in f} == {"new"}  # one setup's rows only
    entry = json.loads((ws.results / "manifest.json").read_text())["studies"][STUDY]
    assert entry["rows"] == entry["expected"] == _file_rows(committed) == 8
    assert entry["state"] == "complete" and entry["seconds"] == pytest.approx(12.0)  # all decoding time, kept
    assert f"| {STUDY} | float32 | 8 / 8 |" in results_markdown(ws.results)
    status = {r["study"]: r for r in paper.study_status(ws)}[STUDY]
    assert (status["rows"], status["expected"]) == (8, 8)  # `paper status` too


def test_manifest_never_counts_rows_the_committed_file_lacks(tmp_path):
    """Rows of another setup that sit in the working store but were not exported (a later call,
    superseded before any export) are not the ledger's: it counts the committed file."""
    ws = _ws(tmp_path)
    store = ws.store(STUDY)
    with Store(store) as db:
        db.put(_rows("kept", ["c1"], 5))
        db.note_progress("kept call", expected=5, done=5, seconds=5.0, computed=5)
    paper.export(ws, ["02_split_softmax"])
    committed = paper.committed_file(ws, STUDY)
    with Store(store) as db:  # afterwards, another setup's rows (3 of the 6 it asks for) reach the store only
        db.put(_rows("other", ["c9"], 3))
        db.note_progress("other call", expected=6, done=3, seconds=3.0, computed=3)
    paper.write_manifest(ws)
    entry = json.loads((ws.results / "manifest.json").read_text())["studies"][STUDY]
    assert entry["rows"] == _file_rows(committed) == 5
    assert entry["expected"] == 5 + 3 and entry["state"] == "started"  # the 3 rows still to decode


def test_recount_manifest_takes_every_count_from_the_committed_files(tmp_path):
    """The fix for a manifest written by the summing ledger, without a working store (none is
    here) and without decoding: each study's rows are its file's, the rows still to decode kept."""
    ws = _ws(tmp_path)
    for name, (setup, conds, n) in {"07_compare": ("a", ["c1", "c2", "c3"], 4), "03_focus": ("b", ["c1"], 6)}.items():
        with Store(tmp_path / f"{name}.sqlite") as db:
            db.put(_rows(setup, conds, n))
        export_results(tmp_path / f"{name}.sqlite", paper.committed_file(ws, name))
    ws.results.mkdir(parents=True, exist_ok=True)
    (ws.results / "07_bias_shares.json").write_text("{}")
    old = {"model": "m", "command": "./dev figures paper  (x)", "machine": {"cpus": 2},
           "studies": {
               "07_compare": {"rows": 20, "expected": 20, "seconds": 9.0, "state": "complete", "store_bytes": 1,
                              "results_bytes": 1, "study": "07_compare"},  # over-counted: the file holds 12
               "03_focus": {"rows": 9, "expected": 10, "seconds": 5.0, "state": "started", "store_bytes": 1,
                            "results_bytes": 1, "eta_seconds": 3.0, "study": "03_focus"},  # 1 row still to decode
               "07_bias_shares": {"rows": 0, "expected": 0, "seconds": 0.0, "state": "kept", "store_bytes": 2,
                                  "results_bytes": 2, "study": "07_bias_shares"}}}
    (ws.results / "manifest.json").write_text(json.dumps(old))
    paper.recount_manifest(ws)
    new = json.loads((ws.results / "manifest.json").read_text())
    assert {k: v for k, v in new.items() if k != "studies"} == {k: v for k, v in old.items() if k != "studies"}
    compare, focus = new["studies"]["07_compare"], new["studies"]["03_focus"]
    assert (compare["rows"], compare["expected"], compare["state"]) == (12, 12, "complete")
    assert (focus["rows"], focus["expected"], focus["state"]) == (6, 7, "started")
    assert compare["seconds"] == 9.0 and focus["eta_seconds"] == 3.0 and compare["store_bytes"] == 1  # kept as they were
    assert compare["results_bytes"] == paper.committed_file(ws, "07_compare").stat().st_size
    assert new["studies"]["07_bias_shares"] == old["studies"]["07_bias_shares"]
    assert "| 07_bias_shares | float32 | kept (not store rows) |" in results_markdown(ws.results)


def _ledgers() -> list[Path]:
    return sorted((ROOT / "results").rglob("manifest.json"))


def test_committed_manifest_counts_the_committed_files():
    """A real check over the repository: every committed results file's rows are its manifest
    entry's rows, and no entry asks for fewer rows than its file holds."""
    assert _ledgers(), "results/manifest.json is committed with the repository"
    for manifest in _ledgers():
        studies = json.loads(manifest.read_text(encoding="utf-8"))["studies"]
        files = sorted(manifest.parent.glob(f"*{RESULTS_SUFFIX}"))
        assert {f.name[: -len(RESULTS_SUFFIX)] for f in files} <= set(studies), manifest
        for f in files:
            entry = studies[f.name[: -len(RESULTS_SUFFIX)]]
            assert entry["rows"] == results_rows(f), (f, entry["rows"])
            assert entry["expected"] >= entry["rows"], f
        for name, entry in studies.items():  # a study without a committed rows file counts none
            if not (manifest.parent / f"{name}{RESULTS_SUFFIX}").exists():
                assert entry["rows"] == 0, (manifest, name)


def test_readme_ledger_counts_the_committed_files():
    """The README's ledger (generated from the manifest) shows each committed file's rows."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = ROOT / "results"
    files = sorted(results.glob(f"*{RESULTS_SUFFIX}"))
    assert files
    for f in files:
        name = f.name[: -len(RESULTS_SUFFIX)]
        got = re.search(rf"^\| {re.escape(name)} \| \w+ \| ([\d,]+) / ([\d,]+)", readme, re.MULTILINE)
        assert got, f"{name} is missing from the README's ledger"
        assert int(got.group(1).replace(",", "")) == results_rows(f), name
