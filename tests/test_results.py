"""Committed results files (fdlib.core.store export/load), the workspace's paths per size
(fdlib.runs.workspace), the paper-size pipeline's ledger (fdlib.runs.paper) and rendering without decoding."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import fake_samples

import fdlib
from fdlib.core.store import Store, export_results, load_results, open_store
from fdlib.runs import paper, reproduce
from fdlib.runs.workspace import Workspace, parse_shard
from fdlib.study import runner as study
from fdlib.study.conditions import Condition
from fdlib.study.runner import run_study, study_frame
from fdlib.views.gallery import record_findings, results_markdown, update_readme

RANKED = [(1, 2), (0, 3), (1, 0), (0, 0), (1, 1), (0, 1), (1, 3), (0, 2)]
CONDS = [Condition.baseline(), Condition.split(0.1, "contextual", 2), Condition.ablate("random", 2, seed=0)]


def build_ws(tmp_path, **overrides):
    kw = dict(model=fdlib.DEFAULT_MODEL, size="quick", root=tmp_path)
    return Workspace(**{**kw, **overrides})


def _run(tiny, store, samples=None, **kw):
    return run_study(tiny.model, samples or fake_samples(3), CONDS, heads={"contextual": RANKED}, store=store,
                     progress=False, max_new_tokens=6, **kw)


# --- the workspace ---------------------------------------------------------------------------


def test_workspace_paths_per_size(tmp_path):
    quick = build_ws(tmp_path)
    assert quick.store("02_split_softmax") == tmp_path / "runs" / "02_split_softmax_quick.sqlite"
    assert quick.figures == tmp_path / "runs" / "figures" / "quick"  # CI never writes the gallery
    assert not quick.rendering
    render = build_ws(tmp_path, size="paper")
    assert render.rendering and render.figures == tmp_path / "figures"
    assert render.store("02_split_softmax") == tmp_path / "results" / "02_split_softmax.jsonl.gz"
    compute = build_ws(tmp_path, size="paper", recompute=True)
    assert compute.store("02_split_softmax") == tmp_path / "runs" / "paper" / "02_split_softmax.sqlite"
    shard = build_ws(tmp_path, size="paper", recompute=True, shard=(2, 8))
    assert shard.store("02_split_softmax") == tmp_path / "runs" / "paper" / "02_split_softmax.shard-2-of-8.sqlite"
    assert shard.input("01_contextual") == tmp_path / "runs" / "paper" / "01_contextual.sqlite"  # merged ranking
    assert shard.figures != shard.committed_figures  # a shard's partial figures stay out of the gallery
    gemma = build_ws(tmp_path, model="gemma-3-270m", size="paper")
    assert gemma.store("01_contextual") == tmp_path / "results" / "gemma-3-270m" / "01_contextual.jsonl.gz"
    assert gemma.committed_figures == tmp_path / "figures" / "gemma-3-270m"
    assert build_ws(tmp_path, size=30).store("01_contextual").name == "01_contextual_30.sqlite"


def test_workspace_refusals_and_env(tmp_path):
    for bad in (dict(size="huge"), dict(size=0), dict(shard=(3, 3)), dict(size="paper", shard=(0, 2))):
        with pytest.raises(ValueError):
            build_ws(tmp_path, **bad)
    with pytest.raises(ValueError, match="study name"):
        build_ws(tmp_path).store("../etc")
    ws = Workspace.from_env(tmp_path, {"FDLIB_SIZE": "paper", "FDLIB_RECOMPUTE": "1", "FDLIB_SHARD": "1/4",
                                       "FDLIB_MODEL": "gemma-3-270m"})
    assert (ws.size, ws.recompute, ws.shard, ws.model) == ("paper", True, (1, 4), "gemma-3-270m")
    assert Workspace.from_env(tmp_path, {"FDLIB_SIZE": "12"}).size == 12
    assert Workspace.from_env(tmp_path, {}).size == "quick"
    with pytest.raises(ValueError, match="FDLIB_RECOMPUTE"):
        Workspace.from_env(tmp_path, {"FDLIB_RECOMPUTE": "maybe"})
    assert parse_shard("3/8") == (3, 8)
    with pytest.raises(ValueError):
        parse_shard("8/8")


def test_workspace_dtype_has_folders_of_its_own(tmp_path):
    import torch

    f32 = build_ws(tmp_path, size="paper", recompute=True)
    bf16 = build_ws(tmp_path, size="paper", recompute=True, dtype="bf16")
    assert (f32.dtype, bf16.dtype) == ("float32", "bfloat16") and bf16.torch_dtype is torch.bfloat16
    assert build_ws(tmp_path, dtype=torch.float16).dtype == "float16" and f32.torch_dtype is torch.float32
    assert bf16.results == tmp_path / "results" / "bfloat16" and f32.results == tmp_path / "results"
    assert bf16.store("02_split_softmax") == tmp_path / "runs" / "bfloat16" / "paper" / "02_split_softmax.sqlite"
    assert bf16.kept_file("07_bias_shares") != f32.kept_file("07_bias_shares")
    assert bf16.figures == tmp_path / "figures" / "bfloat16" and f32.figures == tmp_path / "figures"
    assert bf16.committed_figures == f32.committed_figures == tmp_path / "figures"  # the directions are the model's
    render = build_ws(tmp_path, size="paper", dtype="bfloat16")
    assert render.store("01_contextual") == tmp_path / "results" / "bfloat16" / "01_contextual.jsonl.gz"
    quick = build_ws(tmp_path, dtype="bfloat16")
    assert quick.store("01_contextual") == tmp_path / "runs" / "bfloat16" / "01_contextual_quick.sqlite"
    assert quick.figures == tmp_path / "runs" / "bfloat16" / "figures" / "quick"
    gemma = build_ws(tmp_path, model="gemma-3-270m", size="paper", dtype="bfloat16")
    assert gemma.results == tmp_path / "results" / "gemma-3-270m" / "bfloat16"
    assert gemma.figures == tmp_path / "figures" / "gemma-3-270m" / "bfloat16"
    assert gemma.committed_figures == tmp_path / "figures" / "gemma-3-270m"
    for bad in ("int8", None, "float64"):
        with pytest.raises(ValueError, match=r"\['bfloat16', 'float16', 'float32'\]"):
            build_ws(tmp_path, dtype=bad)
    assert Workspace.from_env(tmp_path, {"FDLIB_DTYPE": "bf16"}).dtype == "bfloat16"
    assert Workspace.from_env(tmp_path, {"FDLIB_DTYPE": ""}).dtype == "float32"
    assert Workspace.from_env(tmp_path, {}).dtype == "float32"
    # a notebook's own default, which FDLIB_DTYPE overrides; the same run in another dtype
    own = Workspace.from_env(tmp_path, {"FDLIB_SIZE": "paper"}, dtype="bf16")
    assert own.dtype == "bfloat16" and Workspace.from_env(tmp_path, {"FDLIB_DTYPE": "float32"}, dtype="bf16").dtype == "float32"
    assert own.in_dtype("float32").results == tmp_path / "results" and own.in_dtype("float32").size == "paper"
    with pytest.raises(ValueError, match="int8"):
        Workspace.from_env(tmp_path, {"FDLIB_DTYPE": "int8"})
    # a bfloat16 run never reuses a float32 kept result
    assert f32.keep("07_bias_shares", lambda: {"x": 1}) == {"x": 1}
    assert bf16.keep("07_bias_shares", lambda: {"x": 2}) == {"x": 2}


def test_committed_rows_name_no_dtype_and_read_as_float32():
    """Every committed row was made in float32 before the dtype was a setting: its setup names no
    dtype, its setup_sha is still the hash of that setup, and the reader calls it float32."""
    root = Path(__file__).resolve().parents[1]
    path = Workspace(fdlib.DEFAULT_MODEL, "paper", root=root).store("01_contextual")
    with load_results(path) as db:
        rows = list(db.rows(arrays=False))
    assert rows and all("dtype" not in r.record["setup"] and study._sha(r.record["setup"]) == r.setup_sha for r in rows)
    assert set(study_frame(path).dtype) == {"float32"}
    kept = json.loads((path.parent / "07_bias_shares.json").read_text())["setup"]
    assert "dtype" not in kept and study.setup_dtype(kept) == "float32"


def test_keep_computes_once_then_renders_the_committed_copy(tmp_path):
    calls = []
    ws = build_ws(tmp_path, size="paper", recompute=True)
    assert ws.keep("05_retrieval", lambda: calls.append(1) or {"x": [1.5, None]}) == {"x": [1.5, None]}
    assert ws.keep("05_retrieval", lambda: calls.append(1) or {}) == {"x": [1.5, None]} and len(calls) == 1
    render = build_ws(tmp_path, size="paper")
    with pytest.raises(FileNotFoundError, match="dev figures paper"):
        render.keep("05_retrieval", dict)
    paper.export(ws, ["05_retrieval_vs_contextual"])
    assert render.keep("05_retrieval", lambda: pytest.fail("rendering must not compute")) == {"x": [1.5, None]}


def test_keep_with_a_setup_recomputes_or_refuses_another_setup(tmp_path):
    ws = build_ws(tmp_path, size="paper", recompute=True)
    made = lambda setup, x: (lambda: {"setup": setup, "x": x})  # noqa: E731
    assert ws.keep("07_bias_shares", made({"alpha": 0.5}, 1), setup={"alpha": 0.5})["x"] == 1
    assert ws.keep("07_bias_shares", made({"alpha": 0.5}, 2), setup={"alpha": 0.5})["x"] == 1  # reused
    assert ws.keep("07_bias_shares", made({"alpha": 0.3}, 3), setup={"alpha": 0.3})["x"] == 3  # another alpha: recomputed
    with pytest.raises(ValueError, match="does not hold the setup"):
        ws.keep("07_bias_shares", made({"alpha": 0.1}, 4), setup={"alpha": 0.2})
    paper.export(ws, ["07_interventions_compared"])
    render = build_ws(tmp_path, size="paper")
    assert render.keep("07_bias_shares", lambda: pytest.fail("rendering must not compute"), setup={"alpha": 0.3})["x"] == 3
    with pytest.raises(ValueError, match="other alpha"):
        render.keep("07_bias_shares", lambda: pytest.fail("rendering must not compute"), setup={"alpha": 0.5})


# --- results files ---------------------------------------------------------------------------


def test_export_load_round_trip_and_same_bytes(tiny, tmp_path):
    a = _run(tiny, tmp_path / "a.sqlite")
    out = export_results(tmp_path / "a.sqlite", tmp_path / "a.jsonl.gz")
    b = study_frame(out, CONDS)
    assert list(a.answer) == list(b.answer) and list(a.score) == list(b.score) and list(a.condition) == list(b.condition)
    for x, y in zip(a.relevant_score, b.relevant_score):
        np.testing.assert_allclose(x, y, atol=1e-3, rtol=1e-3)  # float16 in the file
    # an independent recomputation into a fresh store exports to the same bytes
    _run(tiny, tmp_path / "again.sqlite")
    again = export_results(tmp_path / "again.sqlite", tmp_path / "again.jsonl.gz")
    assert again.read_bytes() == out.read_bytes()
    # arrays=False keeps answers and scores only
    lean = export_results(tmp_path / "a.sqlite", tmp_path / "lean.jsonl.gz", arrays=False)
    assert all(x is None for x in study_frame(lean).relevant_score) and lean.stat().st_size < out.stat().st_size
    with pytest.raises(ValueError, match="jsonl.gz"):
        export_results(tmp_path / "a.sqlite", tmp_path / "a.json")


def test_results_file_is_read_only_and_renders_without_decoding(tiny, tmp_path, monkeypatch):
    samples = fake_samples(4)
    _run(tiny, tmp_path / "part.sqlite", samples[:3])  # one sample missing: a run still going
    path = export_results(tmp_path / "part.sqlite", tmp_path / "part.jsonl.gz")
    with load_results(path) as db:
        assert db.read_only
        with pytest.raises(PermissionError, match="dev figures paper"):
            db.put([])
    monkeypatch.setattr(study, "_run_batched", lambda *a, **k: pytest.fail("rendering decoded"))
    frame = _run(tiny, path, samples)
    assert sorted(set(frame.sample_id)) == sorted(s.id for s in samples[:3])  # whole samples, the held ones
    assert len(frame) == 3 * len(CONDS)
    # a committed row made by another setup is refused, naming what differs
    with pytest.raises(ValueError, match="heads"):
        run_study(tiny.model, samples, CONDS, heads={"contextual": RANKED[::-1]}, store=path, progress=False, max_new_tokens=6)
    with pytest.raises(FileNotFoundError, match="dev figures paper"):
        with open_store(tmp_path / "absent.jsonl.gz"):
            pass


def test_progress_ledger_and_status(tiny, tmp_path):
    ws = build_ws(tmp_path, size="paper", recompute=True)
    store = ws.store("02_split_softmax")
    _run(tiny, store, fake_samples(2))
    _run(tiny, store, fake_samples(3))  # resumes: one more sample
    with Store(store) as db:
        rows = db.progress()
    assert [(r["expected"], r["done"]) for r in rows] == [(6, 6), (9, 9)] and all(r["seconds"] > 0 for r in rows)
    assert [r["computed"] for r in rows] == [6, 3]  # the rerun decoded only the new sample
    _run(tiny, store, fake_samples(6)[3:])  # the same conditions over other prompts: its own line too
    # another call (other conditions) over as many prompts keeps its own line
    run_study(tiny.model, fake_samples(3, "gold"), [Condition.baseline("gold")], store=store, progress=False, max_new_tokens=6)
    with Store(store) as db:
        assert len(db.progress()) == 4
    status = {r["study"]: r for r in paper.study_status(ws)}
    # the distinct rows the store holds (6 + 9 + 9 + 3 asked, but the first call's 6 are the second's too),
    # not the lines' sum
    assert status["02_split_softmax"]["rows"] == 21 and status["02_split_softmax"]["state"] == "complete"
    assert status["03_focus"]["state"] == "not started"
    assert "02_split_softmax" in paper.format_status(list(status.values()))
    written = paper.export(ws, ["02_split_softmax"])
    assert written == [tmp_path / "results" / "02_split_softmax.jsonl.gz"]
    with gzip.open(written[0], "rt") as f:
        assert all("arrays" in json.loads(line) and not json.loads(line)["arrays"] for line in f)  # EM grid: no arrays
    manifest = json.loads((tmp_path / "results" / "manifest.json").read_text())
    assert manifest["studies"]["02_split_softmax"]["rows"] == 21 and manifest["dtype"] == "float32"
    assert manifest["studies"]["02_split_softmax"]["dtype"] == "float32"
    md = results_markdown(tmp_path / "results")
    assert "| 02_split_softmax | float32 | 21 / 21 |" in md and "in float32" in md
    # another machine continues the committed run: its working store starts from the file
    committed = written[0].read_bytes()
    store.unlink()
    assert paper.seed_from_results(ws, ["02_split_softmax"]) == [store]
    assert paper.seed_from_results(ws, ["02_split_softmax"]) == []  # never over a working store
    store.unlink()
    assert paper.seed_from_results(ws) == [store]  # by default every notebook's: inputs of later ones too
    assert export_results(store, tmp_path / "again.jsonl.gz", arrays=False).read_bytes() == committed
    # the seeded store carries the committed run's ledger: rows and decoding time, not a restart
    seeded = {r["study"]: r for r in paper.study_status(ws)}["02_split_softmax"]
    before = manifest["studies"]["02_split_softmax"]
    assert (seeded["rows"], seeded["expected"], seeded["state"]) == (21, 21, "complete")
    assert seeded["seconds"] == pytest.approx(before["seconds"]) and seeded["eta_seconds"] == 0
    # and the size the rows took in the store that decoded them (the seeded copy is smaller: no arrays)
    assert store.stat().st_size < before["store_bytes"] <= seeded["store_bytes"] <= before["store_bytes"] + 16384
    paper.write_manifest(ws)
    assert json.loads((tmp_path / "results" / "manifest.json").read_text())["studies"]["02_split_softmax"] == seeded
    # a call rerun over the seeded rows (and one sample more) counts them once, and adds its own time
    # to the committed run's
    _run(tiny, store, fake_samples(7))
    rerun = {r["study"]: r for r in paper.study_status(ws)}["02_split_softmax"]
    # (the store's rows: the 7 prompts' 21 and the seeded gold call's 3, which an export writes too)
    assert (rerun["rows"], rerun["expected"], rerun["state"]) == (24, 24, "complete")
    with Store(store) as db:
        runs = [r for r in db.progress() if r["study"] != paper.COMMITTED]
    assert sum(r["computed"] for r in runs) == 3  # the new sample's rows only
    assert rerun["seconds"] == pytest.approx(before["seconds"] + sum(r["seconds"] for r in runs), abs=0.051)


def test_status_eta_takes_each_calls_own_rate(tmp_path):
    ws = build_ws(tmp_path, size="paper", recompute=True)
    with Store(ws.store("03_focus")) as db:
        db.note_progress("grid", expected=100, done=100, seconds=100.0, computed=100)  # 1 s/row, done
        db.note_progress("compare", expected=50, done=10, seconds=100.0, computed=10)  # 10 s/row, 40 left
        db.note_progress("later", expected=20, done=0)  # nothing decoded yet: the study's mean, 200 s / 110 rows
    status = {r["study"]: r for r in paper.study_status(ws)}["03_focus"]
    # rows: the store's (none here), asked for: those plus the 60 the lines lack
    assert (status["rows"], status["expected"], status["seconds"]) == (0, 60, 200.0)
    assert status["eta_seconds"] == pytest.approx(40 * 10 + 20 * 200 / 110, abs=0.1)  # not 60 rows x 1.8 s


def test_store_of_an_older_schema_gains_the_computed_column(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("CREATE TABLE progress (study TEXT PRIMARY KEY, expected INTEGER NOT NULL, done INTEGER NOT NULL, "
               "seconds REAL NOT NULL)")
    db.execute("INSERT INTO progress VALUES ('s', 4, 2, 1.5)")
    db.commit()
    db.close()
    with Store(tmp_path / "old.sqlite") as store:
        store.note_progress("s", expected=4, done=3, seconds=0.5, computed=1)
        assert store.progress() == [dict(study="s", expected=4, done=3, seconds=2.0, computed=1, elsewhere_bytes=0)]


def test_merge_shards(tiny, tmp_path):
    samples = fake_samples(4)
    for i in range(2):
        ws = build_ws(tmp_path, size="paper", recompute=True, shard=(i, 2))
        _run(tiny, ws.store("02_split_softmax"), samples, shard=(i, 2))
    ws = build_ws(tmp_path, size="paper", recompute=True)
    by_shard = build_ws(tmp_path, size="paper", recompute=True, shard=(1, 2))
    status = {r["study"]: r for r in paper.study_status(ws)}["02_split_softmax"]
    assert (status["rows"], status["expected"]) == (len(samples) * len(CONDS),) * 2  # each shard counted once
    assert paper.study_status(by_shard) == paper.study_status(ws)  # whichever job asks
    assert paper.merge(ws, ["02_split_softmax"]) == [ws.store("02_split_softmax")]
    whole = _run(tiny, tmp_path / "whole.sqlite", samples)
    merged = study_frame(ws.store("02_split_softmax"), CONDS, samples=samples)
    assert sorted(zip(merged.sample_id, merged.condition, merged.answer)) == sorted(
        zip(whole.sample_id, whole.condition, whole.answer))


def test_reproduce_skips_notebooks_without_results(tmp_path):
    ws = build_ws(tmp_path, size="paper")
    missing = reproduce.missing_results("02_split_softmax", ws)
    assert [p.name for p in missing] == ["01_contextual.jsonl.gz", "02_split_softmax.jsonl.gz"]
    assert reproduce.missing_results("06_head_explorer", ws) == []
    assert [p.name for p in reproduce.missing_results("05_retrieval_vs_contextual", ws)][1] == "05_retrieval.json"


def test_a_notebook_with_a_dtype_of_its_own(tmp_path, monkeypatch):
    """A notebook registered in NOTEBOOK_DTYPES renders and runs in its dtype unless one is
    given, and needs notebook 01's float32 ranking (its heads), not a ranking in its dtype."""
    from fdlib.runs import workspace

    assert workspace.notebook_dtype("03_focus_directions") == workspace.NOTEBOOK_DTYPES.get("03_focus_directions", "float32")
    monkeypatch.setitem(workspace.NOTEBOOK_DTYPES, "03_focus_directions", "bfloat16")
    monkeypatch.setattr(reproduce, "NOTEBOOK_DTYPES", workspace.NOTEBOOK_DTYPES)
    ws = build_ws(tmp_path, size="paper", dtype="bfloat16")
    missing = [p.relative_to(tmp_path).as_posix() for p in reproduce.missing_results("03_focus_directions", ws)]
    assert missing[0] == "results/01_contextual.jsonl.gz" and all(m.startswith("results/bfloat16/03_") for m in missing[1:])
    assert workspace.notebook_dtype("03_focus_directions") == "bfloat16" and workspace.notebook_dtype("02_split_softmax") == "float32"


def test_every_notebook_store_is_registered():
    """The stores notebooks name are the ones the pipeline runs, exports and checks."""
    import re

    import nbformat

    names = set()
    for nb in sorted(Path(__file__).resolve().parents[1].glob("notebooks/0*.ipynb")):
        src = "\n".join(c.source for c in nbformat.read(nb, as_version=4).cells)
        found = set(re.findall(r'WS\.(?:store|keep)\("(\d\d_[a-z0-9_]+)"', src))
        assert found <= set(paper.NOTEBOOK_STUDIES.get(nb.stem, ())), (nb.stem, found)
        names |= found
        assert "../figures" not in src  # figures go where the workspace says
    assert names == {n for ns in paper.NOTEBOOK_STUDIES.values() for n in ns}


def test_findings_size_and_ledger_in_readme(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "02_split_softmax.ipynb").write_text("{}")
    record_findings("02_split_softmax", [{"finding": "EM", "value": 0.5, "lo": 0.4, "hi": 0.6, "n": 200}],
                    tmp_path / "figures", size="paper", dtype="float32")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "manifest.json").write_text(json.dumps({
        "model": "m", "command": "./dev figures paper  (x)", "machine": {"cpus": 2, "platform": "p"},
        "studies": {"02_split_softmax": {"rows": 5, "expected": 10, "seconds": 7200, "store_bytes": 2**20,
                                         "results_bytes": 2**19}}}))
    (tmp_path / "notebooks" / "03_focus_directions.ipynb").write_text("{}")
    (tmp_path / "figures" / "02_em_vs_k.png").write_bytes(b"png")
    (tmp_path / "figures" / "03_em_vs_k.png").write_bytes(b"png")
    record_findings("03_focus_directions", [{"finding": "EM", "value": 0.1, "n": 6}], tmp_path / "figures", size="quick")
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- gallery:start -->\n<!-- gallery:end -->\ny\n")
    assert update_readme(readme, tmp_path / "figures", tmp_path / "notebooks", tmp_path / "results")
    text = readme.read_text()
    assert "| 0.50 | [0.40, 0.60] | 200 | paper, float32 |" in text
    assert "| 0.10 |  | 6 | quick, float32 |" in text  # a findings file without a dtype: float32
    assert "**[`02_split_softmax`](notebooks/02_split_softmax.ipynb)** — size `paper`, n up to 200\n" in text
    assert "— size `quick`, n up to 6 (not yet rendered at `paper` size" in text  # says why it rests on fewer
    assert "| 02_split_softmax | float32 | 5 / 10 (running) | 2.0 h | 1.0 MiB | 0.50 MiB |" in text  # no dtype: float32
    assert "Paper-size run of `m` in float32" in text


def test_run_notebook_computes_at_paper_size_in_the_notebook_folder(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# a"),
        nbformat.v4.new_code_cell("import os, json\nfrom fdlib.runs.workspace import Workspace\nws = Workspace.from_env()"),
        nbformat.v4.new_code_cell("json.dump([ws.size, ws.recompute, list(ws.shard), os.getcwd(), "
                                  "os.environ.get('OMP_NUM_THREADS'), ws.dtype], open('out.json', 'w'))"),
    ])
    path = tmp_path / "nbs" / "09_probe.ipynb"
    path.parent.mkdir()
    nbformat.write(nb, path)
    ws = build_ws(tmp_path, size="paper", recompute=True, shard=(1, 3), dtype="bfloat16")
    paper.run_notebook(path, ws, threads=1)
    size, recompute, shard, cwd, threads, dtype = json.loads((path.parent / "out.json").read_text())
    assert (size, recompute, shard, Path(cwd), threads, dtype) == ("paper", True, [1, 3], path.parent, "1", "bfloat16")
    assert "# a" not in paper.notebook_script(path)  # code cells only


def test_stopping_the_run_stops_the_notebook(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import nbformat

    nbs = tmp_path / "notebooks"
    nbs.mkdir()
    cell = "import os, time\nopen('child.pid', 'w').write(str(os.getpid()))\ntime.sleep(60)"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)]), nbs / "01_contextual_heads.ipynb")
    run = subprocess.Popen([sys.executable, "-m", "fdlib", "paper", "run", "--only", "01", "--root", str(tmp_path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = nbs / "child.pid"
    for _ in range(300):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.1)
    child = int(pid_file.read_text())
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) != 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the notebook's process is gone too


def test_dtype_on_the_command_line_picks_its_workspace_and_ledger(tmp_path, monkeypatch):
    import signal
    import subprocess
    import sys

    from fdlib import __main__ as cli

    ap = cli.parser()
    assert ap.parse_args(["paper", "status", "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert ap.parse_args(["paper", "status"]).dtype is None  # FDLIB_DTYPE, else float32
    assert ap.parse_args(["sweep"]).dtype == "float32" and ap.parse_args(["train", "--out", "x"]).dtype == "float32"
    assert ap.parse_args(["reproduce", "--dtype", "float16"]).dtype == "float16"
    with pytest.raises(SystemExit):
        ap.parse_args(["sweep", "--dtype", "int8"])
    # train: the cache alone may be built in shares; training is one process with an output file
    args = ap.parse_args(["train", "--training-set", "positions", "--cache-only", "--shard", "1/2", "--positions", "1", "10"])
    assert args.cache_only and args.shard == "1/2" and args.positions == [1, 10] and args.out is None
    for argv, why in ((["train"], "--out is required"), (["train", "--out", "x", "--shard", "0/2"], "give --cache-only"),
                      (["train", "--out", "x", "--random", "5"], "give --top too")):
        with pytest.raises(SystemExit, match=why):
            cli.train(ap.parse_args(argv))  # refused before any model is loaded
    assert cli._runs_file(None, "sweep.sqlite", "bfloat16") == str(Path("runs") / "bfloat16" / "sweep.sqlite")
    assert cli._runs_file(None, "sweep.sqlite", "float32") == str(Path("runs") / "sweep.sqlite")
    out = subprocess.run([sys.executable, "-m", "fdlib", "paper", "status", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert "--dtype {float32,bfloat16,float16}" in out.stdout
    # `paper export --dtype bfloat16` writes that dtype's ledger, beside (not over) float32's
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # paper() reroutes SIGTERM: not in the test process
    monkeypatch.delenv("FDLIB_DTYPE", raising=False)
    ws = build_ws(tmp_path, size="paper", recompute=True, dtype="bfloat16")
    with Store(ws.store("02_split_softmax")) as db:
        db.note_progress("s", expected=4, done=4, seconds=10.0, computed=4)
    cli.main(["paper", "export", "--only", "02", "--dtype", "bfloat16", "--root", str(tmp_path)])
    manifest = json.loads((tmp_path / "results" / "bfloat16" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["studies"]["02_split_softmax"]["dtype"] == "bfloat16"
    assert manifest["command"].startswith("FDLIB_DTYPE=bfloat16 ./dev figures paper")
    assert not (tmp_path / "results" / "manifest.json").exists()
    md = results_markdown(tmp_path / "results" / "bfloat16")
    # the ledger counts the rows the exported file holds (none: the line's 4 rows were never stored)
    assert "| 02_split_softmax | bfloat16 | 0 / 0 |" in md and "in bfloat16" in md
    monkeypatch.setenv("FDLIB_DTYPE", "bfloat16")  # the notebooks' switch is the default
    cli.main(["paper", "export", "--only", "02", "--root", str(tmp_path)])
    assert not (tmp_path / "results" / "manifest.json").exists()
