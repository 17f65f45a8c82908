"""Long-context studies (fdlib.experiments.longctx) and head ablation (fdlib.interventions.hooks.ablate_heads):
table logic on synthetic results, the ablation against an independent reference on the plain HF
model, the engine's resume and identity rules, and refusal of over-long inputs before any forward."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import fdlib
from fdlib.core.metrics import bootstrap_ci
from fdlib.data.tasks import TaskSample
from fdlib.experiments import longctx
from fdlib.experiments.longctx import BASELINE
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.hooks import ablate_heads
from fdlib.model.loading import model_name
from fdlib.study.conditions import Condition
from fdlib.study.runner import StudySample
from fdlib.views import plots

RELEVANT = fdlib.Span(10, 16)


def _task_sample(tok, seed: int, n: int = 30) -> StudySample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 64, (n,), generator=g)
    s = TaskSample(id=f"niah/{n}/s0/{seed}", task="niah", text="", input_ids=ids, relevant_span=RELEVANT,
                   answers=(tok.decode(ids[RELEVANT.slice].tolist()),), question="q", depth=0.5)
    return StudySample(s, {"task": "niah", "length": n + 8, "n_tokens": n})


def _directions(model, seed: int = 0) -> FocusDirections:
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    return FocusDirections(torch.randn(shape, generator=g) * 3, torch.zeros(shape), model_name(model))


HEADS = [(1, 0), (0, 2), (1, 3)]


# --- conditions ------------------------------------------------------------------------------


def test_condition_keys_labels_and_validation():
    assert BASELINE.key == "baseline|long" and BASELINE.label == "baseline"
    f = Condition.focus(-0.2, "focus", "contextual", 10)
    assert f.key == "focus|focus|alpha=-0.2|contextual|k=10" and f.label == "focus alpha=-0.2, k=10"
    assert Condition.focus(0.0, "d", "contextual", 5).identity
    assert Condition.split(0.1, "retrieval", 20).key == "split|tau=0.1|retrieval|k=20"
    assert Condition.split(0.1, "retrieval", 20).label == "split tau=0.1, retrieval k=20"
    assert Condition.ablate("random", 20, seed=0, rows="all").key == "ablate|random|k=20|seed=0|rows=all"
    assert Condition.ablate("contextual", 3).label == "ablate contextual k=3"
    assert [c.label for c in longctx.task_conditions((-0.2, 0.2), (10,))] == ["baseline", "focus alpha=-0.2, k=10", "focus alpha=0.2, k=10"]


def test_sized():
    assert fdlib.data.nq.sized({"quick": 2}, "quick") == 2 and fdlib.data.nq.sized({"quick": 2}, 7) == 7
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        fdlib.data.nq.sized({"quick": 2}, "huge")
    with pytest.raises(ValueError, match=">= 1"):
        fdlib.data.nq.sized({"quick": 2}, 0)


# --- tables on synthetic results -------------------------------------------------------------


def _synthetic_frame(seed: int = 0) -> pd.DataFrame:
    """Two tasks x two lengths x three samples x Table 2's conditions, random scores and arrays."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("niah", "json_kv"):
        for length in (2048, 4096):
            for i in range(3):
                for c in longctx.task_conditions((-0.2, 0.0, 0.2), (10, 20)):
                    rows.append({
                        "sample_id": f"{task}/{length}/{i}", "task": task, "length": length, "method": c.method,
                        "heads": c.heads, "k": c.k, "value": c.value, "condition": c.key, "label": c.label,
                        "score": float(rng.integers(0, 2)), "sink_score": rng.random((2, 4)),
                        "relevant_score": rng.random((2, 4)),
                    })
    return pd.DataFrame(rows)


def test_table2_layout_and_means():
    frame = _synthetic_frame()
    table = longctx.table2(frame)
    assert list(table.columns) == ["baseline"] + [f"focus alpha={a}, k={k}" for a in ("-0.2", "0", "0.2") for k in (10, 20)]
    assert list(table.index) == [("json_kv", 2048), ("json_kv", 4096), ("niah", 2048), ("niah", 4096)]
    for (task, length), row in table.iterrows():
        for label, value in row.items():
            want = frame[(frame.task == task) & (frame.length == length) & (frame.label == label)].score.mean()
            assert value == pytest.approx(want)
    text = longctx.table2(frame, ci=True)
    assert text.shape == table.shape
    other = frame[frame.label == "focus alpha=0.2, k=10"].assign(condition="focus|other|alpha=0.2|contextual|k=10")
    with pytest.raises(ValueError, match="labels shared by several conditions: \\['focus alpha=0.2, k=10'\\]"):
        longctx.table2(pd.concat([frame, other]))
    g = frame[(frame.task == "niah") & (frame.length == 4096) & (frame.label == "focus alpha=0.2, k=20")]
    m, lo, hi = bootstrap_ci(g.score.to_numpy())
    assert text.loc[("niah", 4096), "focus alpha=0.2, k=20"] == f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def test_versus_baseline_signs_and_styler_colours():
    table = pd.DataFrame(
        {"baseline": [0.5, 0.2, np.nan], "a": [0.6, 0.2, 0.3], "b": [0.4, np.nan, 0.1]},
        index=pd.Index(["x", "y", "z"], name="task"),
    )
    signs = longctx.versus_baseline(table)
    expected = np.array([[np.nan, 1, -1], [np.nan, 0, np.nan], [np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(signs.to_numpy(), expected)
    with pytest.raises(ValueError, match="no column 'base'"):
        longctx.versus_baseline(table, "base")
    styler = longctx.style_versus_baseline(table)
    styler._compute()  # fills styler.ctx: {(row, col): [(property, value)]}
    colours = {cell: dict(props).get("background-color") for cell, props in styler.ctx.items() if props}
    assert colours == {(0, 1): longctx.GREEN, (0, 2): longctx.RED}
    text = table.map(lambda v: f"{v:.1f} [..]")
    styler = longctx.style_versus_baseline(table, text)
    styler._compute()
    assert {c for c, p in styler.ctx.items() if p} == {(0, 1), (0, 2)}
    with pytest.raises(ValueError, match="same|rows and columns"):
        longctx.style_versus_baseline(table, text.iloc[:, :2])


def test_sink_spread_against_numpy():
    frame = _synthetic_frame(1)
    heads = [(0, 1), (1, 3)]
    table = longctx.sink_table(frame, heads)
    assert list(table.index) == ["json_kv", "niah"] and list(table.columns) == [2048, 4096]
    base = frame[frame.condition == "baseline|long"]
    for length in (2048, 4096):
        per_task = []
        for task in ("json_kv", "niah"):
            arrays = base[(base.task == task) & (base.length == length)].sink_score
            per_task.append(np.mean([np.mean([a[0, 1], a[1, 3]]) for a in arrays]))
            assert table.loc[task, length] == pytest.approx(per_task[-1])
        spread = longctx.sink_spread(table)
        assert spread.loc[length, "std across tasks"] == pytest.approx(np.std(per_task))
        assert spread.loc[length, "mean"] == pytest.approx(np.mean(per_task))
        assert spread.loc[length, "n tasks"] == 2
    assert longctx.sink_spread(table, ddof=1).loc[2048, "std across tasks"] == pytest.approx(
        np.std(table[2048].to_numpy(), ddof=1))
    with pytest.raises(ValueError, match="no rows of condition"):
        longctx.sink_table(frame, heads, condition="ablate|x|k=1")


def test_position_and_condition_tables():
    rng = np.random.default_rng(2)
    rows = []
    for c in longctx.lost_conditions():
        for p in (1, 10, 20):
            for i in range(4):
                rows.append({"sample_id": f"q{i}/g{p}", "position": p, "method": c.method, "heads": c.heads, "k": c.k,
                             "value": c.value, "condition": c.key, "label": c.label,
                             "score": float(rng.integers(0, 2)), "relevant_score": rng.random((2, 4)),
                             "sink_score": None if i == 3 else rng.random((2, 4))})
    frame = pd.DataFrame(rows)
    table = longctx.position_table(frame, [(1, 1)])
    assert list(table.label.unique()) == ["baseline", "focus alpha=0.5, k=5", "split tau=0.1, contextual k=5"]
    got = table[(table.label == "baseline") & (table.position == 10)].iloc[0]
    g = frame[(frame.label == "baseline") & (frame.position == 10)]
    assert got.em == pytest.approx(g.score.mean()) and got.n == 4
    assert got.relevant == pytest.approx(np.mean([a[1, 1] for a in g.relevant_score]))
    ct = longctx.condition_table(frame)
    assert list(ct.label) == ["baseline", "focus alpha=0.5, k=5", "split tau=0.1, contextual k=5"]
    assert ct.set_index("label").loc["baseline", "n"] == 12
    np.testing.assert_array_equal(longctx.head_mean(frame.sink_score.iloc[:4], [(0, 0)])[3:], [np.nan])
    with pytest.raises(ValueError, match="lacks columns"):
        longctx.position_table(frame.drop(columns="position"), [(1, 1)])


def test_overlap_grid_and_positive_heads():
    a, b = [(0, 1), (1, 2), (2, 0)], [(1, 2), (0, 0)]
    o = longctx.head_overlap(a, b)
    assert o.count == 1 and o.both == [(1, 2)] and o.only_first == [(0, 1), (2, 0)] and o.only_second == [(0, 0)]
    grid = longctx.head_set_grid(a, b, 3, 3)
    assert grid.tolist() == [[2, 1, 0], [0, 0, 3], [1, 0, 0]]
    with pytest.raises(ValueError, match="outside 3 layers"):
        longctx.head_set_grid([(3, 0)], [], 3, 3)
    scores = torch.tensor([[0.0, 0.5], [float("nan"), 0.2]])
    assert longctx.positive_top_heads(scores, 3) == [(0, 1), (1, 1)]  # zero and NaN never ranked
    assert longctx.positive_top_heads(scores.numpy(), 1) == [(0, 1)]


# --- plots -----------------------------------------------------------------------------------


def test_long_context_figures():
    frame = _synthetic_frame()
    table = longctx.table2(frame)
    fig = plots.versus_baseline_heatmap(table)
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z, table.to_numpy() - table[["baseline"]].to_numpy())
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text and "customdata" in fig.data[0].hovertemplate
    with pytest.raises(ValueError, match="no column"):
        plots.versus_baseline_heatmap(table.drop(columns="baseline"))

    rows = []
    for c in longctx.lost_conditions():
        for p in (1, 20):
            rows.append({"position": p, "label": c.label, "method": c.method, "heads": c.heads, "k": c.k, "value": c.value,
                         "condition": c.key, "score": 1.0, "relevant_score": np.ones((2, 4))})
    pos = longctx.position_table(pd.DataFrame(rows), [(0, 0)])
    fig = plots.em_vs_position(pos)
    assert len(fig.data) == 6 and all("customdata" in t.hovertemplate for t in fig.data)
    assert fig.layout.xaxis.title.text and fig.layout.yaxis2.title.text

    fig = plots.head_sets_map([(0, 1), (1, 2)], [(1, 2)], 2, 3, scores={"retrieval": np.arange(6.0).reshape(2, 3)})
    assert np.asarray(fig.data[0].z).tolist() == [[0, 1, 0], [0, 0, 3]]
    assert fig.data[0].customdata[1][2][0] == "L1H2" and fig.data[0].customdata[1][2][1] == "both"
    assert "retrieval score" in fig.data[0].hovertemplate and fig.layout.xaxis.title.text == "head"

    ct = longctx.condition_table(pd.DataFrame(rows))
    fig = plots.em_by_condition(ct)
    assert list(fig.data[0].x) == list(map(str, ct.label)) and fig.layout.yaxis.title.text == "exact match"


def test_table2_heatmap_shows_each_rows_sample_count():
    frame = _synthetic_frame()
    frame = frame[frame.sample_id != "niah/4096/2"]  # that row has 2 samples, the others 3
    table = longctx.table2(frame)
    n = longctx.table2_n(frame)
    assert n.to_dict() == {("json_kv", 2048): 3, ("json_kv", 4096): 3, ("niah", 2048): 3, ("niah", 4096): 2}
    long = longctx.score_table(frame)
    assert n.to_dict() == long[long.label == "baseline"].set_index(["task", "length"])["n"].to_dict()
    fig = plots.versus_baseline_heatmap(table, n=n)
    assert list(fig.data[0].y) == ["json_kv · 2048 (n=3)", "json_kv · 4096 (n=3)", "niah · 2048 (n=3)", "niah · 4096 (n=2)"]
    assert "n=%{customdata[3]}" in fig.data[0].hovertemplate and fig.data[0].customdata[3][0][3] == "2"
    with pytest.raises(ValueError, match="n lacks rows"):
        plots.versus_baseline_heatmap(table, n=n.drop(("niah", 4096)))
    with pytest.raises(ValueError, match="no 'baseline' condition"):
        longctx.table2_n(frame[frame.label != "baseline"])


# --- ablation against an independent reference -----------------------------------------------


def _reference_logits(tiny, ids: torch.Tensor, heads, from_pos: int) -> torch.Tensor:
    """The plain HF model (a separate copy of the weights) with each head's slice of o_proj's
    input zeroed at positions >= from_pos by a forward_pre_hook."""
    d = tiny.model.cfg.d_head
    handles = []
    for layer, head in heads:
        def pre(module, args, head=head):
            x = args[0].clone()
            x[:, from_pos:, head * d:(head + 1) * d] = 0.0
            return (x,)

        handles.append(tiny.hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            return tiny.hf(ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()


def test_hook_z_is_the_per_head_output(tiny):
    assert "blocks.1.attn.hook_z" in tiny.model.hook_dict
    shapes = []
    with fdlib.hooks(tiny.model, [("blocks.1.attn.hook_z", lambda z, hook: shapes.append(tuple(z.shape)))]):
        tiny.model(torch.arange(5, 12)[None], return_type=None)
    assert shapes == [(1, 7, tiny.model.cfg.n_heads, tiny.model.cfg.d_head)]


@pytest.mark.parametrize("from_pos", [0, 6])
def test_ablation_equals_o_proj_reference(tiny, from_pos):
    ids = torch.randint(5, 64, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = tiny.model(ids[None], return_type="logits")[0]
        with ablate_heads(tiny.model, HEADS, from_pos=from_pos):
            ablated = tiny.model(ids[None], return_type="logits")[0]
    reference = _reference_logits(tiny, ids, HEADS, from_pos)
    torch.testing.assert_close(ablated, reference, atol=1e-5, rtol=1e-5)
    assert (ablated - plain)[from_pos:].abs().max() > 1e-3  # it does change the logits
    torch.testing.assert_close(ablated[:from_pos], plain[:from_pos])  # and only from from_pos on
    with torch.no_grad():  # hooks removed on exit
        torch.testing.assert_close(tiny.model(ids[None], return_type="logits")[0], plain)


def test_ablation_on_cached_steps_uses_absolute_positions(tiny):
    """Answer rows only, from a shared fast prefill: each cached step is ablated at its true
    position and equals the reference forward of the whole sequence."""
    full = torch.randint(5, 64, (20,), generator=torch.Generator().manual_seed(4))
    n = 15  # prompt length; rows >= n - 1 produce the answer
    prefix = fdlib.prefill(tiny.model, full[:n])
    steps = []
    with torch.no_grad(), ablate_heads(tiny.model, HEADS, from_pos=n - 1):
        for tok in full[n - 1:]:
            steps.append(tiny.model(tok.view(1, 1), past_key_values=prefix.cache, return_type="logits")[0, -1])
    reference = _reference_logits(tiny, full, HEADS, n - 1)[n - 1:]
    torch.testing.assert_close(torch.stack(steps), reference, atol=1e-5, rtol=1e-5)
    # prompt rows ablated too (from_pos inside the prompt): the bridge prefills under the hooks
    with torch.no_grad(), ablate_heads(tiny.model, HEADS, from_pos=5):
        own = fdlib.prefill(tiny.model, full[:n], fast=False)
        last = tiny.model(full[n - 1:n].view(1, 1), past_key_values=own.cache, return_type="logits")[0, -1]
    torch.testing.assert_close(last, _reference_logits(tiny, full[:n], HEADS, 5)[-1], atol=1e-5, rtol=1e-5)


def test_ablation_validates(tiny):
    with pytest.raises(ValueError, match="outside the model"):
        with ablate_heads(tiny.model, [(9, 0)]):
            pass
    with pytest.raises(ValueError, match="from_pos"):
        with ablate_heads(tiny.model, HEADS, from_pos=-1):
            pass


def test_study_length_above_window_raises_before_any_sample(tiny, monkeypatch):
    def no_samples(*args, **kwargs):
        raise AssertionError("samples were built before the lengths were checked")

    monkeypatch.setattr(longctx, "task_samples", no_samples)
    with pytest.raises(ValueError, match="length 256 exceeds the model's context window of 128"):
        longctx.task_suite(tiny.model, tasks=["niah"], lengths=[64, 256])
    with pytest.raises(ValueError, match="above max_new_tokens"):
        longctx.task_suite(tiny.model, tasks=["niah"], lengths=[32])
    with pytest.raises(ValueError, match="unknown tasks"):
        longctx.task_suite(tiny.model, tasks=["summarise"], lengths=[64])
    with pytest.raises(ValueError, match="gold positions \\[0, 21\\]"):
        longctx.position_samples(tiny.model, positions=[0, 1, 21])


@pytest.mark.integration
def test_hook_z_on_the_default_model(smol):
    """The ablation's hook point exists on the real model, per head."""
    assert all(f"blocks.{l}.attn.hook_z" in smol.hook_dict for l in range(smol.cfg.n_layers))
    shapes = []
    with fdlib.hooks(smol, [("blocks.0.attn.hook_z", lambda z, hook: shapes.append(tuple(z.shape)))]):
        smol(torch.arange(5, 9)[None], return_type=None)
    assert shapes == [(1, 4, smol.cfg.n_heads, smol.cfg.d_head)]
