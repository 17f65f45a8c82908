"""The sweep engine on the tiny model: resume after an interruption, shards, configurations."""

import pandas as pd
import pytest
import torch
from conftest import fake_samples

import fdlib.experiments.sweeps as sweeps
import fdlib.study.runner as study
from fdlib.core.heads import random_heads
from fdlib.core.store import Store, merge_stores
from fdlib.experiments.sweeps import QuestionInputs, split_grid, sweep_samples
from fdlib.study.conditions import Condition
from fdlib.study.runner import run_study, study_frame

RANKED = [(1, 2), (0, 3), (1, 0), (0, 1), (1, 1)]


def questions(n=4):
    return [QuestionInputs(l, g, q) for l, g, q in zip(fake_samples(n), fake_samples(n, "gold"), fake_samples(n, "negative"))]


def configs():
    return split_grid("quick", taus=(0.1, 5.0), ks=(1, 3), seeds=(0,))


def run_sweep(model, qs, cfgs, *, ranked_heads, **kw):
    """A sweep is `run_study` over the questions' prompts, the ranking named "contextual"."""
    return run_study(model, sweep_samples(qs, cfgs), cfgs, heads={"contextual": ranked_heads}, **kw)


def table(path):
    f = study_frame(path)
    return f.sort_values(["sample_id", "condition"]).reset_index(drop=True)[["sample_id", "condition", "answer", "em"]]


def test_grid_shapes_and_keys():
    g = configs()
    assert len(g) == 3 + 2 * 2 * 2 and len({c.key for c in g}) == len(g)
    assert Condition.split(0.3, "random", 5, seed=1).key == "split|tau=0.3|random|k=5|seed=1"
    full = split_grid("full", n_total_heads=270)
    assert max(c.k for c in full if c.k) == 270 and {c.value for c in full if c.method == "split"} == {0.1, 0.3, 0.6, 1.5, 1000.0}
    assert not any(c.k == 270 and c.heads == "random" for c in full)  # at k = all heads random = contextual


def test_random_heads_reproducible_and_distinct():
    a = random_heads(30, 9, 20, seed=3)
    assert a == random_heads(30, 9, 20, seed=3) and len(set(a)) == 20
    assert a != random_heads(30, 9, 20, seed=4)


def test_interrupted_sweep_resumes_to_the_same_table(tiny, tmp_path, monkeypatch):
    qs, cfgs = questions(), configs()
    run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=tmp_path / "clean.sqlite", progress=False)
    clean = table(tmp_path / "clean.sqlite")
    assert len(clean) == len(qs) * len(cfgs)

    real, calls = study.prefill, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 * 3 + 2:  # Ctrl-C in the middle of the third question (one prefill per variant)
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(study, "prefill", dying)
    path = tmp_path / "resumed.sqlite"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=path, progress=False)
    assert len(Store(path)) == 2 * len(cfgs)  # two whole questions, nothing of the third
    monkeypatch.setattr(study, "prefill", real)
    run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=path, progress=False)
    pd.testing.assert_frame_equal(table(path), clean)


def test_shards_merge_without_duplicates(tiny, tmp_path):
    qs, cfgs = questions(5), configs()[:5]
    run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=tmp_path / "all.sqlite", progress=False)
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"shard{i}.sqlite")
        run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=parts[-1], shard=(i, 3), progress=False)
    assert [len(Store(p)) for p in parts] == [2 * 5, 2 * 5, 1 * 5]  # whole questions per shard
    n = merge_stores(parts + [parts[0]], tmp_path / "merged.sqlite")  # a shard merged twice
    assert n == 25
    pd.testing.assert_frame_equal(table(tmp_path / "merged.sqlite"), table(tmp_path / "all.sqlite"))
    with pytest.raises(ValueError, match="shard"):
        run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=tmp_path / "x.sqlite", shard=(3, 3))


def test_intervention_changes_scores_in_the_expected_direction(tiny, tmp_path):
    qs = questions(2)
    cfgs = [Condition.baseline(), Condition.split(0.05, "contextual", 5), Condition.split(50.0, "contextual", 5)]
    run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=tmp_path / "s.sqlite", progress=False)
    rows = {(r.sample_id, r.condition): r for r in Store(tmp_path / "s.sqlite").rows()}
    for q in qs:
        base, up, down = (rows[(q.long.id, c.key)].arrays["relevant"] for c in cfgs)
        for l, h in RANKED:  # tau < 1 raises the gold share of the chosen heads, tau > 1 lowers it
            assert up[l, h] > base[l, h] > down[l, h]


def test_focus_grid():
    grid = sweeps.focus_grid("full", directions="d", random_alphas=(0.5,))
    assert len(grid) == 3 + 8 * 6 + 6 and 0.0 not in {c.value for c in grid if c.method == "focus"}


def test_focus_sweep_response_rows_and_all_rows(tiny, tmp_path):
    from test_directions import random_dirs

    from fdlib.interventions.directions import focus_directions
    from fdlib.model.decoding import decode, prefill

    qs = questions(2)
    dirs = random_dirs(tiny, "post_rope", scale=2.0)
    cfgs = [Condition.baseline(), Condition.focus(1.0, "r", "contextual", 3),
            Condition.focus(1.0, "r", "contextual", 3, rows="all"), Condition.focus(1.0, "r", "random", 3, seed=0)]
    with pytest.raises(ValueError, match="needs directions 'r'"):
        run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=tmp_path / "x.sqlite", progress=False)
    run_sweep(tiny.model, qs, cfgs, ranked_heads=RANKED, store=tmp_path / "f.sqlite", progress=False, directions={"r": dirs})
    rows = {(r.sample_id.split("/")[0], r.condition): r for r in Store(tmp_path / "f.sqlite").rows()}
    for q in qs:
        s = q.long
        with focus_directions(tiny.model, dirs, RANKED[:3], 1.0, from_pos=0):  # an independent full re-run
            want_all = decode(tiny.model, prefill(tiny.model, s.input_ids, fast=False), max_new_tokens=32).text
        with focus_directions(tiny.model, dirs, RANKED[:3], 1.0, from_pos=s.n_tokens - 1):
            want_resp = decode(tiny.model, prefill(tiny.model, s.input_ids, fast=False), max_new_tokens=32).text
        assert rows[(q.id, cfgs[2].key)].record["answer"] == want_all
        assert rows[(q.id, cfgs[1].key)].record["answer"] == want_resp
        base, steered = rows[(q.id, cfgs[0].key)].arrays["relevant"], rows[(q.id, cfgs[1].key)].arrays["relevant"]
        assert any(abs(float(steered[l, h] - base[l, h])) > 1e-4 for l, h in RANKED[:3])
    t = sweeps.em_table(study_frame(tmp_path / "f.sqlite"))
    assert set(t.method) == {"baseline", "focus"} and set(t[t.method == "focus"].rows) == {"response", "all"}


def test_attention_per_document_equals_the_sequential_decode(tiny):
    from fdlib.interventions.hooks import split_softmax
    from fdlib.model.decoding import decode, prefill

    s = fake_samples(1)[0]
    got = sweeps.attention_per_document(tiny.model, s, (1, 2), Condition.split(0.05, [(1, 2), (0, 3)]), max_new_tokens=6)
    spans = {f"doc{i}": sp for i, sp in enumerate(s.doc_spans)}
    prefix = prefill(tiny.model, s.input_ids)
    before = decode(tiny.model, prefix, max_new_tokens=6, spans=spans)
    with split_softmax(tiny.model, [(1, 2), (0, 3)], s.gold_span, 0.05, from_pos=s.n_tokens - 1):
        after = decode(tiny.model, prefix, max_new_tokens=6, spans=spans)
    assert got["answer_before"] == before.text and got["answer_after"] == after.text
    for key, ans in (("before", before), ("after", after)):
        assert got[key] == pytest.approx([float(ans.scores[f"doc{i}"][1, 2]) for i in range(3)], abs=1e-5)
    assert got["after"][s.gold_index] > got["before"][s.gold_index]


def test_alpha_curve_and_rotated_positions(tiny):
    from fdlib.data.nq import NQBuilder

    c = sweeps.alpha_curve("paper", directions="positions")
    assert c[0] == Condition.baseline() and all(x.rows == "all" and x.k == 20 for x in c[1:])
    assert [x.value for x in c if x.heads == "contextual"] == list(sweeps.ALPHA_CURVES["paper"]["alphas"])
    assert [x.value for x in c if x.heads == "random"] == [0.3, 1.0]
    b = NQBuilder(tiny.tokenizer)
    rotated = b.samples(split="test", size=7, gold_position=sweeps.PAPER_POSITIONS)
    fixed = b.samples(split="test", size=7, gold_position=5)
    assert [s.gold_index + 1 for s in rotated] == [1, 5, 10, 15, 20, 1, 5]
    assert [s.id.split("/")[0] for s in rotated] == [s.id.split("/")[0] for s in fixed]
    assert rotated[1].id == fixed[1].id and torch.equal(rotated[1].input_ids, fixed[1].input_ids)
