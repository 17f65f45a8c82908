"""The committed paper-size results (results/*.jsonl.gz) reproduce: a question of each committed
store-rows file, recomputed here on the real model, gives the committed rows: the same setup hash
(model weights, prompt tokens, heads, directions, decoding), answer and score, and per-head scores
equal up to the file's float16 rounding. This is what `./dev figures paper` does at scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fdlib
from fdlib.core.store import Store, load_results
from fdlib.runs.workspace import Workspace
from fdlib.study.conditions import Condition
from fdlib.study.runner import run_study

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _compare(committed_path: Path, fresh: Store, ids: set[str]) -> int:
    with load_results(committed_path) as committed:
        want = {(r.sample_id, r.condition): r for r in committed.rows() if r.sample_id in ids}
    got = {(r.sample_id, r.condition): r for r in fresh.rows()}
    assert want and set(want) == set(got), (sorted(want), sorted(got))
    for key, w in want.items():
        g = got[key]
        assert g.setup_sha == w.setup_sha, key
        assert (g.record["answer"], g.record["score"]) == (w.record["answer"], w.record["score"]), key
        for kind, arr in w.arrays.items():
            np.testing.assert_allclose(g.arrays[kind], arr, atol=2e-3, rtol=2e-3, equal_nan=True, err_msg=str(key))
    return len(want)


def test_committed_head_ranking_reproduces(smol):
    ws = Workspace(fdlib.DEFAULT_MODEL, "paper", root=ROOT)
    path = ws.store("01_contextual")
    assert path.exists(), f"{path} is committed with the repository"
    builder = fdlib.NQBuilder(smol.tokenizer)
    # the first train question of the ranking, both its inputs: the call notebook 01 makes, on one question
    long = builder.samples(split="train", size=1, n_docs=20)
    gold = builder.samples(split="train", size=1, variant="gold")
    with Store(":memory:") as fresh:
        run_study(smol, long, [Condition.baseline()], store=fresh, progress=False)
        run_study(smol, gold, [Condition.baseline("gold")], store=fresh, progress=False)
        assert _compare(path, fresh, {long[0].id, gold[0].id}) == 2
