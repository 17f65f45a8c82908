"""The results store and resumable dataset scoring (tiny model, synthetic samples)."""

import numpy as np
import pytest
import torch
from conftest import fake_samples

import fdlib.study.scores as scoring
from fdlib.core.store import Row, Store
from fdlib.experiments.contextual import scored
from fdlib.study.conditions import Condition
from fdlib.study.runner import run_study


def test_store_round_trip_and_replace(tmp_path):
    db = Store(tmp_path / "r.sqlite")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    db.put([Row("s1", "c", "h1", {"em": True, "answer": "x"}, {"relevant": a})])
    db.put([Row("s1", "c", "h2", {"em": False, "answer": "y"}, {"relevant": a + 1})])  # same key replaces
    rows = list(db.rows(["c"]))
    assert len(db) == 1 and rows[0].record == {"em": False, "answer": "y"} and rows[0].setup_sha == "h2"
    np.testing.assert_array_equal(rows[0].arrays["relevant"], a + 1)
    assert db.setups() == {("s1", "c"): "h2"} and db.record("s1", "other") is None
    assert list(db.rows(["other"])) == []
    db.close()
    assert len(Store(tmp_path / "r.sqlite")) == 1  # persisted


def score_dataset(model, samples, **kw):
    """Every sample's greedy answer and scores: the baseline of each variant, one `run_study`."""
    conditions = [Condition.baseline(v) for v in dict.fromkeys(s.variant for s in samples)]
    return scored(model, run_study(model, samples, conditions, **kw), samples)


def test_interrupted_scoring_resumes_without_duplicates(tiny, tmp_path, monkeypatch):
    samples = fake_samples(5)
    clean = score_dataset(tiny.model, samples, store=tmp_path / "clean.sqlite", progress=False)

    import fdlib.study.runner as study

    real = study.prefill
    calls = {"n": 0}

    def dying(model, ids, **kw):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C while the 4th sample is in flight
        calls["n"] += 1
        return real(model, ids, **kw)

    monkeypatch.setattr(study, "prefill", dying)
    path = tmp_path / "resumed.sqlite"
    with pytest.raises(KeyboardInterrupt):
        score_dataset(tiny.model, samples, store=path, progress=False)
    assert len(Store(path)) == 3  # only the sample in flight was lost
    done = []
    monkeypatch.setattr(study, "prefill", lambda m, ids, **kw: done.append(len(ids)) or real(m, ids, **kw))
    resumed = score_dataset(tiny.model, samples, store=path, progress=False)
    assert len(done) == 2  # finished samples were not recomputed
    assert len(Store(path)) == 5
    assert [r.sample_id for r in resumed] == [r.sample_id for r in clean]
    for a, b in zip(resumed, clean):
        assert a.answer == b.answer and a.em == b.em
        for k in scoring.KINDS:
            torch.testing.assert_close(a.kinds[k], b.kinds[k], equal_nan=True)


def test_score_dataset_equals_score_sample(tiny):
    """The runner's scores are score_sample's (the bridge decode with its recorder)."""
    samples = fake_samples(2) + fake_samples(2, "gold") + fake_samples(1, "negative")
    got = score_dataset(tiny.model, samples, progress=False)
    for s, r in zip(samples, got):
        want = scoring.score_sample(tiny.model, s)
        assert r.answer == want.answer and r.em == want.em
        for k in scoring.KINDS:
            torch.testing.assert_close(r.kinds[k], want.kinds[k], equal_nan=True, atol=1e-5, rtol=0)
