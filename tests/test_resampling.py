"""Fair statistics: intervals and paired tests resample questions, not prompts, where one question
contributes several prompts (fdlib.core.metrics; comparison_table, em_table, the findings table)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from fdlib.core.metrics import (
    bootstrap_ci,
    mcnemar,
    paired_cluster_test,
    question_id,
    question_ids,
    sign_flip_pvalue,
)
from fdlib.experiments import compare, sweeps
from fdlib.study.conditions import Condition
from fdlib.views import gallery


def test_question_ids_are_the_part_before_the_first_slash():
    assert question_id("nq0863/k20g10") == "nq0863" and question_id("nq0863/gold") == "nq0863"
    assert question_id("nq0863") == "nq0863" and question_id("a/b/c") == "a"
    got = question_ids(pd.Series(["q1/k20g1", "q2/k20g1", "q1/k20g20"]))
    assert got.dtype == object and list(got) == ["q1", "q2", "q1"]


def test_without_groups_the_bootstrap_is_bit_for_bit_the_old_one():
    x = np.r_[np.ones(30), np.zeros(70), [np.nan] * 5]
    rng = np.random.default_rng(1)  # the pre-groups implementation, inlined
    kept = x[~np.isnan(x)]
    means = kept[rng.integers(0, kept.size, size=(2000, kept.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert bootstrap_ci(x, seed=1) == (float(kept.mean()), float(lo), float(hi))


def test_one_prompt_per_question_equals_the_prompt_bootstrap():
    x = np.random.default_rng(3).random(50)
    ids = [f"q{i}/k20g{1 + i % 3}" for i in range(50)]
    assert bootstrap_ci(x, groups=question_ids(ids)) == bootstrap_ci(x)
    # clusters emptied to one value by NaNs count as singletons too
    y = np.r_[x, [np.nan] * 5]
    assert bootstrap_ci(y, groups=[f"q{i}" for i in range(50)] + [f"q{i}" for i in range(5)]) == bootstrap_ci(x)


def test_identical_prompts_of_a_question_widen_the_interval():
    rng = np.random.default_rng(0)
    per_q = (rng.random(60) < 0.4).astype(float)
    x = np.repeat(per_q, 3)  # 3 identical prompts per question: 180 prompts, 60 independent draws
    groups = np.repeat([f"nq{i:04d}" for i in range(60)], 3)
    m0, lo0, hi0 = bootstrap_ci(x)
    m1, lo1, hi1 = bootstrap_ci(x, groups=groups)
    assert m0 == m1 == pytest.approx(per_q.mean())
    assert hi1 - lo1 > 1.4 * (hi0 - lo0)  # about sqrt(3) wider
    # the clustered interval over 180 prompts is the plain one over the 60 question means
    _, lo_q, hi_q = bootstrap_ci(per_q)
    assert (lo1, hi1) == pytest.approx((lo_q, hi_q))
    with pytest.raises(ValueError, match="labels"):
        bootstrap_ci(x, groups=groups[:-1])


def test_unequal_clusters_keep_the_mean_over_prompts():
    x = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    m, lo, hi = bootstrap_ci(x, groups=["a", "a", "a", "b", "c"])
    assert m == pytest.approx(0.6) and 0.0 <= lo < m < hi <= 1.0


def test_sign_flip_exact_is_mcnemar_with_one_prompt_per_question():
    for only_a, only_b, ties in ((2, 1, 2), (9, 1, 5), (0, 6, 3), (7, 7, 0)):
        d = np.r_[np.ones(only_a), -np.ones(only_b), np.zeros(ties)]
        assert sign_flip_pvalue(d) == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    assert sign_flip_pvalue(np.zeros(4)) == 1.0 and np.isnan(sign_flip_pvalue([]))


def _clustered_pair(effect: float, n_questions: int = 150, per_q: int = 3, seed: int = 0) -> pd.DataFrame:
    """A baseline and a condition on `per_q` prompts per question; question difficulty is shared by
    its prompts, the condition adds `effect` to the chance of a right answer."""
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_questions):
        easy = rng.random()
        for p in range(per_q):
            sid = f"nq{q:04d}/k20g{(1, 10, 20)[p % 3]}"
            rows.append({"sample_id": sid, "condition": "base", "score": float(rng.random() < easy)})
            rows.append({"sample_id": sid, "condition": "new",
                         "score": float(rng.random() < min(1.0, easy + effect))})
    return pd.DataFrame(rows)


def test_cluster_paired_test_detects_a_real_effect_and_not_a_null_one():
    real = paired_cluster_test(_clustered_pair(0.25), "new", "base")
    assert real["p_value"] < 0.001 and real["n"] == 450 and real["n_questions"] == 150 and real["gain"] > 0.1
    assert real["only_a"] > real["only_b"]
    nulls = [paired_cluster_test(_clustered_pair(0.0, seed=s), "new", "base")["p_value"] for s in range(5)]
    assert min(nulls) > 0.05
    again = paired_cluster_test(_clustered_pair(0.25), "new", "base")
    assert again == real  # seeded
    with pytest.raises(ValueError, match="has both"):
        paired_cluster_test(_clustered_pair(0.1), "new", "missing")


def test_cluster_test_with_a_cluster_column_and_one_prompt_per_question():
    f = _clustered_pair(0.2, n_questions=12, per_q=1, seed=2)
    f["group"] = f["sample_id"].str.split("/").str[0]
    t = paired_cluster_test(f, "new", "base", cluster="group")
    m = mcnemar(f, "new", "base")
    assert t["n_questions"] == t["n"] == 12 and t["p_value"] == pytest.approx(m["p_value"])
    assert (t["only_a"], t["only_b"]) == (m["only_a"], m["only_b"])


def _compare_frame(per_q: int, n_questions: int = 40, seed: int = 0):
    """Baseline, a chosen setting and its control on `per_q` prompts per question; a question's
    prompts get the same answers (the extreme of prompts that are no independent draws)."""
    c = Condition.split(0.1, "contextual", 2)
    base, ctrl = Condition.baseline().key, compare.control(c).key
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_questions):
        easy = rng.random()
        scores = {cond: float(rng.random() < min(1.0, easy + lift)) for cond, lift in ((base, 0.0), (c.key, 0.2), (ctrl, 0.0))}
        for p in range(per_q):
            sid = f"nq{q:04d}/k20g{(1, 10, 20)[p]}"
            for cond, score in scores.items():
                a = np.full((2, 4), 0.1 * (p + 1))
                rows.append({"sample_id": sid, "condition": cond, "score": score,
                             "relevant_score": a, "sink_score": a, "irmax_score": a})
    ms = [compare.Method("split-softmax", "label-using", (c,))]
    return pd.DataFrame(rows), {"split-softmax": c}, ms


def test_comparison_table_resamples_questions():
    frame, best, ms = _compare_frame(per_q=3)
    t = compare.comparison_table(frame, best, ms, [(0, 0)]).set_index("family")
    old = compare.comparison_table(frame, best, ms, [(0, 0)], resample="prompts").set_index("family")
    for col in ("n", "n_questions", "resampled", "test"):
        assert col in t.columns
    row, old_row = t.loc["label-using"], old.loc["label-using"]
    assert row.n == 120 and row.n_questions == 40 and row.resampled == "questions" and old_row.resampled == "prompts"
    assert row.test == "sign-flip over questions" and old_row.test == "McNemar"
    assert row.em == old_row.em and row.gain == old_row.gain  # the statistics are means over prompts either way
    assert (row.gained, row.lost) == (old_row.gained, old_row.lost)  # prompts gained and lost
    assert row.hi - row.lo > old_row.hi - old_row.lo  # questions are fewer, dependent draws
    assert row.gain_hi - row.gain_lo > old_row.gain_hi - old_row.gain_lo
    assert row.p_value > old_row.p_value
    assert t.loc["baseline"].test == "" and np.isnan(t.loc["baseline"].p_value)
    with pytest.raises(ValueError, match="resample"):
        compare.comparison_table(frame, best, ms, [(0, 0)], resample="seeds")


def test_comparison_table_with_one_prompt_per_question_is_unchanged():
    frame, best, ms = _compare_frame(per_q=1)
    t = compare.comparison_table(frame, best, ms, [(0, 0)])
    old = compare.comparison_table(frame, best, ms, [(0, 0)], resample="prompts")
    assert (t.n == t.n_questions).all() and (t.resampled == "questions").all()
    pd.testing.assert_frame_equal(t.drop(columns="resampled"), old.drop(columns="resampled"))  # bit for bit


def _sweep_frame(per_q: int, n_questions: int = 30, seeds: int = 2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_questions):
        easy = rng.random()
        for p in range(per_q):
            sid = f"nq{q:04d}/k20g{(1, 10, 20)[p]}"
            common = {"sample_id": sid, "group": f"nq{q:04d}", "input": "long", "directions": None}
            rows.append({**common, "method": "baseline", "heads": None, "rows": None, "value": None, "k": None,
                         "em": bool(rng.random() < easy)})
            for s in range(seeds):
                rows.append({**common, "method": "split", "heads": "random", "rows": "response", "value": 0.1, "k": 5,
                             "seed": s, "em": bool(rng.random() < easy)})
    return pd.DataFrame(rows)


def _old_em_table_ci(g: pd.DataFrame) -> tuple[float, float, float]:
    per_q = g.groupby("group")["em"].mean().to_numpy(dtype=float)  # the pre-change em_table
    return bootstrap_ci(per_q)


def test_em_table_one_prompt_per_question_is_unchanged():
    f = _sweep_frame(per_q=1)
    t = sweeps.em_table(f).set_index("method")
    for method in ("baseline", "split"):
        row = t.loc[method]
        assert (row.em, row.lo, row.hi) == _old_em_table_ci(f[f.method == method])
        assert row.n == row.n_questions == 30


def test_em_table_resamples_questions_with_several_prompts():
    f = _sweep_frame(per_q=3)
    t = sweeps.em_table(f).set_index("method")
    for method in ("baseline", "split"):
        row, g = t.loc[method], f[f.method == method]
        per_prompt = g.groupby("sample_id")["em"].mean()  # seeds pooled per prompt
        assert row.n == 90 and row.n_questions == 30 and row.em == pytest.approx(per_prompt.mean())
        _, lo_p, hi_p = bootstrap_ci(per_prompt.to_numpy(dtype=float))
        assert row.hi - row.lo > hi_p - lo_p


def test_findings_table_labels_test_selected_cells_and_what_is_resampled(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "notebooks" / "02_beta.ipynb").write_text("{}")
    p = gallery.record_findings("02_beta", [
        {"finding": "EM, best cell", "value": 0.4, "lo": 0.3, "hi": 0.5, "n": 600, "n_questions": 200,
         "resampled": "questions", "selected_on": "test"},
        {"finding": "EM, chosen on train", "value": 0.35, "lo": 0.3, "hi": 0.4, "n": 200, "n_questions": 200,
         "selected_on": "train"},
        {"finding": "EM, plain", "value": 0.2, "lo": 0.1, "hi": 0.3, "n": 10},
    ], tmp_path / "figures")
    stored = json.loads(p.read_text())["findings"]
    assert stored[0]["selected_on"] == "test" and stored[0]["resampled"] == "questions"
    assert stored[2] == {"finding": "EM, plain", "value": 0.2, "lo": 0.1, "hi": 0.3, "n": 10}  # as before
    md = gallery.gallery_markdown(tmp_path / "figures", tmp_path / "notebooks")
    assert ("| EM, best cell (best cell on the test set) | 0.40 | [0.30, 0.50] (questions resampled) "
            "| 600 (200 questions) |") in md
    assert "| EM, chosen on train | 0.35 | [0.30, 0.40] | 200 |" in md
    assert "| EM, plain | 0.20 | [0.10, 0.30] | 10 |" in md
    for bad in ({"selected_on": "dev"}, {"resampled": "seeds"}):
        with pytest.raises(ValueError, match="must be one of"):
            gallery.record_findings("02_beta", [{"finding": "x", "value": 1, **bad}], tmp_path / "figures")
