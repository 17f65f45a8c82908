"""Interventions compared (fdlib.experiments.compare): selection on train, tables against hand computations,
the figure from arrays, one end-to-end run on the tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fake_samples

import fdlib
from fdlib.experiments import compare
from fdlib.interventions.directions import FocusDirections
from fdlib.model.loading import model_name
from fdlib.study.conditions import Condition
from fdlib.views import plots

RANKED = [(1, 2), (0, 3), (1, 0), (0, 0), (1, 1), (0, 1), (1, 3), (0, 2)]


def _frame(scores: dict[str, list[float]], heads=((0, 0),)) -> pd.DataFrame:
    rows = []
    for cond, values in scores.items():
        for i, v in enumerate(values):
            a = np.full((2, 4), 0.1 * (i + 1))
            rows.append({"sample_id": f"q{i}", "condition": cond, "score": v, "relevant_score": a, "sink_score": a * 2,
                         "irmax_score": a * 3})
    return pd.DataFrame(rows)


def test_methods_choose_and_controls():
    ms = compare.methods("full", target_sink=0.3)
    assert [m.family for m in ms] == ["label-using"] * 3 + ["label-free"] * 4
    assert len(ms[0].candidates) == 4 * 3 and all(c.method == "split" for c in ms[0].candidates)
    assert {c.method for c in ms[4].candidates} == {"focus_auto"} and ms[6].candidates[0].directions == "shuffled"
    kept = ms[5].candidates
    assert {c.method for c in kept} == {"focus_kept"} and {c.value for c in kept} == {0.6, 0.75, 0.9} and len(kept) == 9
    split = ms[0]
    a, b, c = split.candidates[:3]
    frame = _frame({a.key: [0, 1, 1], b.key: [1, 1, 0], c.key: [0, 0, 1]})
    best = compare.choose(frame, [split])
    assert best == {"split-softmax": a}  # a tie with b goes to the earlier candidate
    ctrl = compare.control(a)
    assert ctrl.heads == "random" and ctrl.seed == 0 and ctrl.k == a.k and ctrl.value == a.value
    conds = compare.scored_conditions(best)
    assert conds == [Condition.baseline(), a, ctrl]
    with pytest.raises(ValueError, match="no rows"):
        compare.choose(frame, [ms[1]])


def test_comparison_table_against_hand_computation():
    c = Condition.split(0.1, "contextual", 2)
    base, ctrl = Condition.baseline().key, compare.control(c).key
    frame = _frame({base: [0, 0, 1, 0, 1], c.key: [1, 1, 1, 0, 0], ctrl: [0, 0, 1, 0, 1]})
    ms = [compare.Method("split-softmax", "label-using", (c,))]
    t = compare.comparison_table(frame, {"split-softmax": c}, ms, [(0, 0), (1, 1)]).set_index("family")
    row = t.loc["label-using"]
    assert row.em == pytest.approx(0.6) and row.n == 5 and row.gained == 2 and row.lost == 1
    assert row.gain == pytest.approx(0.2)
    assert row.p_value == pytest.approx(1.0)  # 2 vs 1 discordant: binomial two-sided
    assert row.relevant == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.4, 0.5])) and row.sink == pytest.approx(2 * row.relevant)
    assert t.loc["random-head control"].gain == pytest.approx(0.0)
    fig = plots.em_gain(t.reset_index())
    assert {tr.name for tr in fig.data} == {"label-using", "random-head control"}
    bar = next(tr for tr in fig.data if tr.name == "label-using")
    assert list(bar.y) == pytest.approx([0.2]) and "McNemar" in bar.hovertemplate
    assert bar.customdata[0][0] == c.label
    with pytest.raises(ValueError, match="lacks columns"):
        plots.em_gain(t.reset_index().drop(columns="gain"))


def test_target_sink_is_the_heads_gold_only_mean():
    s = np.zeros((3, 2, 4))
    s[:, 0, 1], s[:, 1, 2] = [0.2, 0.4, np.nan], 0.5
    assert compare.target_sink(s, [(0, 1), (1, 2)]) == pytest.approx((0.2 + 0.4 + 3 * 0.5) / 5)  # NaN left out


def test_end_to_end_on_the_tiny_model(tiny):
    g = torch.Generator().manual_seed(0)
    shape = (tiny.model.cfg.n_layers, tiny.model.cfg.n_heads, tiny.model.cfg.d_head)
    dirs = {name: FocusDirections(torch.randn(shape, generator=g), torch.randn(shape, generator=g), model_name(tiny.model))
            for name in ("gold", "shuffled")}
    ms = compare.methods("quick", target_sink=0.2)
    kw = dict(heads={"contextual": RANKED}, directions=dirs, progress=False, max_new_tokens=4)
    train = fdlib.run_study(tiny.model, fake_samples(2), compare.candidates(ms), **kw)
    best = compare.choose(train, ms)
    assert set(best) == {m.name for m in ms}
    test = fdlib.run_study(tiny.model, fake_samples(3)[2:], compare.scored_conditions(best), **kw)
    t = compare.comparison_table(test, best, ms, RANKED[:5])
    assert len(t) == 1 + 2 * len(ms) and set(t.family) == {"baseline", "label-using", "label-free", "random-head control"}
    assert (t[t.family != "baseline"].n == 1).all()


def test_position_free_alphas_scaled_to_push_as_hard():
    import torch

    from fdlib.interventions.directions import FocusDirections

    dq = torch.zeros(2, 4, 3)
    dq[1, 2] = torch.tensor([3.0, 4.0, 0.0])  # |d_Q| 5 on L1H2
    dq[0, 1] = torch.tensor([0.0, 0.0, 1.0])  # 1 on L0H1
    strong = FocusDirections(dq, torch.zeros_like(dq), "m", "post_rope")
    weak = FocusDirections(dq / 4, torch.zeros_like(dq), "m", "post_rope")
    assert compare.norm_ratio(strong, weak, [(1, 2), (0, 1)]) == pytest.approx(4.0)
    ms = compare.methods("full", target_sink=0.3, shuffled_scale=compare.norm_ratio(strong, weak, [(1, 2)]))
    free = {m.name: m for m in ms}["position-free directions"]
    gold = {m.name: m for m in ms}["focus directions"]
    assert sorted({c.value for c in free.candidates}) == [4 * c for c in sorted({c.value for c in gold.candidates})]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="shuffled_scale"):
            compare.methods("quick", target_sink=0.3, shuffled_scale=bad)
    with pytest.raises(ValueError, match="d_Q = 0"):
        compare.norm_ratio(strong, weak, [(0, 0)])


def test_position_prior_is_bias_shares_per_set_with_the_setup_that_made_it(tiny):
    g = torch.Generator().manual_seed(1)
    shape = (tiny.model.cfg.n_layers, tiny.model.cfg.n_heads, tiny.model.cfg.d_head)
    dirs = {name: FocusDirections(torch.randn(shape, generator=g), torch.randn(shape, generator=g), model_name(tiny.model))
            for name in ("gold", "shuffled")}
    samples = fake_samples(2)
    alphas = {"gold": 0.5, "shuffled": 1.5}
    kept = compare.position_prior(tiny.model, samples, dirs, RANKED[:2], alphas, first=5)
    shares = compare.prior_shares(kept)
    for name, d in dirs.items():
        pd.testing.assert_frame_equal(shares[name], compare.bias_shares(tiny.model, samples, d, RANKED[:2], alphas[name], first=5))
        assert ((shares[name].gold > 0) & (shares[name].gold < 1) & (shares[name]["first"] > 0)).all()
    setup = compare.prior_setup(tiny.model, samples, dirs, RANKED[:2], alphas, first=5)
    assert kept["setup"] == setup and setup["heads"] == ["L1H2", "L0H3"]
    assert setup["samples"] == [s.id for s in samples] and setup["directions"]["gold"] != setup["directions"]["shuffled"]
    assert compare.prior_setup(tiny.model, samples, dirs, RANKED[:2], {**alphas, "gold": 0.4}, first=5) != setup


def test_chosen_alphas_against_hand_computation():
    auto, fixed = Condition.focus_kept(0.75, "gold", "contextual", 5), Condition.focus(1.0, "gold", "contextual", 5)
    ctrl = compare.control(auto)
    frame = pd.DataFrame({"condition": [auto.key] * 4 + [ctrl.key] * 2 + [fixed.key],
                          "chosen_alpha": [0.0, 0.5, 1.0, 0.0, 0.0, 0.0, None]})
    t = compare.chosen_alphas(frame, {"auto": auto, "fixed": fixed})
    assert list(t.family) == ["chosen", "random-head control"] and list(t.n) == [4, 2]
    assert t.mean_alpha[0] == pytest.approx(0.375) and t.unsteered[0] == pytest.approx(0.5) and t.unsteered[1] == 1.0
    assert compare.chosen_alphas(frame, {"fixed": fixed}).empty


def test_automatic_alpha_diagnostics_against_hand_computation():
    """The ends of the grid, the degenerate flag, the histogram over every candidate, and the
    report against fixed alphas and the per-input ceiling, on a hand-made frame."""
    from fdlib.study.conditions import DROP_ALPHAS

    drop = Condition.focus_drop(0.3, "positions", "contextual", 20)
    fixed = [Condition.focus(a, "positions", "contextual", 20) for a in (0.2, 0.5)]
    base = Condition.baseline()
    alphas = [0.0, 2.0, 2.0, 2.0, 0.3]  # 3 of 5 at the grid's top: degenerate
    frame = pd.DataFrame({
        "sample_id": [f"q{i}/k20g1" for i in range(5)] * 4,
        "condition": [drop.key] * 5 + [fixed[0].key] * 5 + [fixed[1].key] * 5 + [base.key] * 5,
        "score": [1, 1, 0, 0, 1] + [0, 1, 0, 0, 0] + [1, 0, 0, 0, 1] + [0, 0, 0, 1, 0],
        "chosen_alpha": alphas + [None] * 15})
    t = compare.chosen_alphas(frame, {"drop": drop})
    assert t.at_top[0] == pytest.approx(0.6) and t.unsteered[0] == pytest.approx(0.2) and bool(t.degenerate[0])
    h = compare.alpha_histogram(frame, drop)
    assert list(h.index) == [float(a) for a in DROP_ALPHAS] and h[2.0] == 3 and h[0.0] == 1 and h[0.3] == 1 and h.sum() == 5
    r = compare.auto_alpha_report(frame, drop, fixed)
    assert r["n"] == 5 and r["em_auto"] == pytest.approx(0.6) and r["em_baseline"] == pytest.approx(0.2)
    assert r["best_fixed"] == fixed[1].key and r["em_best_fixed"] == pytest.approx(0.4)
    assert r["em_ceiling"] == pytest.approx(0.8)  # q0, q1, q4 by a fixed alpha, q3 by the baseline; q2 by none
    assert r["probe_rows_per_prompt"] == len(DROP_ALPHAS) and r["probe_steps_per_prompt"] == 1
    ms = compare.methods("full", target_sink=None, drop=True)
    assert [m.name for m in ms][-2:] == ["automatic alpha (sink drop)", "position-free directions"]
    assert not any(c.method == "focus_auto" for m in ms for c in m.candidates)
