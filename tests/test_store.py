"""The results store and resumable dataset scoring (tiny model, synthetic samples)."""

import numpy as np
import pytest
import torch
from conftest import fake_samples

import fdlib
import fdlib.scoring as scoring
from fdlib.store import Row, Store


def test_store_round_trip_and_replace(tmp_path):
    db = Store(tmp_path / "r.sqlite")
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    db.put([Row("s1", "c", {"em": True, "answer": "x"}, {"relevant": a})])
    db.put([Row("s1", "c", {"em": False, "answer": "y"}, {"relevant": a + 1})])  # same key replaces
    rows = list(db.rows("c"))
    assert len(db) == 1 and rows[0].record == {"em": False, "answer": "y"}
    np.testing.assert_array_equal(rows[0].arrays["relevant"], a + 1)
    assert db.has("s1", "c") and not db.has("s1", "other")
    assert db.keys() == {("s1", "c")}
    db.close()
    assert len(Store(tmp_path / "r.sqlite")) == 1  # persisted


def test_interrupted_scoring_resumes_without_duplicates(tiny, tmp_path, monkeypatch):
    samples = fake_samples(5)
    clean = scoring.score_dataset(tiny.model, samples, store=tmp_path / "clean.sqlite", progress=False)

    real = scoring.score_sample
    calls = {"n": 0}

    def dying(model, sample, **kw):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # Ctrl-C while the 4th sample is in flight
        calls["n"] += 1
        return real(model, sample, **kw)

    monkeypatch.setattr(scoring, "score_sample", dying)
    path = tmp_path / "resumed.sqlite"
    with pytest.raises(KeyboardInterrupt):
        scoring.score_dataset(tiny.model, samples, store=path, progress=False)
    assert len(Store(path)) == 3  # only the sample in flight was lost
    monkeypatch.setattr(scoring, "score_sample", real)

    done = []
    monkeypatch.setattr(scoring, "score_sample", lambda m, s, **kw: done.append(s.id) or real(m, s, **kw))
    resumed = scoring.score_dataset(tiny.model, samples, store=path, progress=False)
    assert done == ["s3/long", "s4/long"]  # finished samples were not recomputed
    assert len(Store(path)) == 5
    assert [r.sample_id for r in resumed] == [r.sample_id for r in clean]
    for a, b in zip(resumed, clean):
        assert a.answer == b.answer and a.em == b.em
        for k in fdlib.KINDS:
            torch.testing.assert_close(a.kinds[k], b.kinds[k], equal_nan=True)
