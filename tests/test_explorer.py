"""The head explorer on the tiny random GQA Llama: per-token and per-document attention of one
head against plain transformers eager attention (output_attentions=True), the teacher-forced
head switch against the decode's own rows, split-softmax against a separately written
re-weighting, and the widget callbacks called directly (no browser)."""

from __future__ import annotations

import html as html_lib
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch
from conftest import fake_samples

import fdlib
from fdlib.interventions.directions import FocusDirections, focus_directions
from fdlib.model.decoding import decode, prefill
from fdlib.study.conditions import Condition
from fdlib.study.scores import top_heads
from fdlib.views import explorer as E
from fdlib.views import plots


def eager_attention(hf, ids):
    with torch.no_grad():
        return hf(ids[None], output_attentions=True).attentions  # per layer [1, head, q, k]


class Points:
    """What plotly hands an on_click callback: the clicked cell's x (head) and y (layer)."""

    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys


@pytest.fixture(scope="module")
def samples():
    return fake_samples(2)


def test_explore_sample_matches_eager_reference(tiny, samples):
    sample = samples[0]
    prefix = prefill(tiny.model, sample.input_ids)
    L = sample.n_tokens
    for head in [(0, 1), (1, 3)]:
        view = E.explore_sample(tiny.model, sample, prefix, head)
        n = len(view.answer_tokens)
        assert n > 0 and view.head == head
        full = torch.cat([sample.input_ids, torch.tensor(view.answer_tokens)])
        attn = eager_attention(tiny.hf, full)
        # greedy: every answer token is the eager model's argmax after the tokens before it
        with torch.no_grad():
            logits = tiny.hf(full[None]).logits[0]
        assert logits[L - 1 : L - 1 + n].argmax(-1).tolist() == list(view.answer_tokens)
        rows = attn[head[0]][0, head[1], L:, :]  # the answer rows, every key
        expected_tokens = rows[:, :L].mean(0)
        torch.testing.assert_close(view.token_attention, expected_tokens, atol=1e-5, rtol=0)
        expected_docs = torch.stack([rows[:, s.slice].sum(-1).mean() for s in sample.doc_spans])
        torch.testing.assert_close(view.doc_attention, expected_docs, atol=1e-5, rtol=0)
        # every head's kinds, from the same rows
        rel = torch.stack([a[0, :, L:, sample.gold_span.slice].sum(-1).mean(-1) for a in attn])
        torch.testing.assert_close(view.kinds["relevant"], rel, atol=1e-5, rtol=0)
        assert view.head_scores["relevant"] == pytest.approx(float(expected_docs[sample.gold_index]), abs=1e-5)
        assert view.em == fdlib.best_subspan_em(view.answer, sample.answers)
        # the prefix was restored: a plain decode from it gives the same answer
        assert prefix.cache.get_seq_length() == L - 1
        assert decode(tiny.model, prefix).tokens == list(view.answer_tokens)


def test_teacher_forced_head_switch_equals_decode_rows(tiny, samples):
    sample = samples[1]
    prefix = prefill(tiny.model, sample.input_ids)
    split = Condition.split(0.2, ((1, 0), (0, 2)))
    for intervention in (E.NO_INTERVENTION, split):
        first = E.explore_sample(tiny.model, sample, prefix, (0, 0), intervention)
        for head in [(1, 0), (0, 3), (1, 2)]:
            decoded = E.explore_sample(tiny.model, sample, prefix, head, intervention)
            assert decoded.answer_tokens == first.answer_tokens
            switched = E.reselect_head(tiny.model, sample, prefix, first, head)
            assert switched.head == head and switched.answer == first.answer
            torch.testing.assert_close(switched.token_attention, decoded.token_attention, atol=1e-5, rtol=0)
            assert prefix.cache.get_seq_length() == sample.n_tokens - 1  # cropped back
    with pytest.raises(ValueError, match="another prompt"):
        E.explore_sample(tiny.model, sample, prefill(tiny.model, sample.input_ids[:-1]), (0, 0))


def reference_split(rows, span, tau):
    """Row by row, float64: W' = pi^tau/pi W in the span, (1-pi^tau)/(1-pi) W outside."""
    out = rows.double().clone()
    for r in out:
        pi = float(r[span.slice].sum())
        inside = torch.zeros_like(r, dtype=torch.bool)
        inside[span.slice] = True
        r[inside] *= pi**tau / pi
        r[~inside] *= (1 - pi**tau) / (1 - pi)
    return out


def test_split_softmax_rows_against_reference(tiny, samples):
    """A layer-0 head's inputs do not depend on any intervention, so with the same answer its
    re-weighted rows are the reference re-weighting of the eager rows."""
    sample = samples[0]
    prefix = prefill(tiny.model, sample.input_ids)
    base = E.explore_sample(tiny.model, sample, prefix, (0, 2))
    L, tau = sample.n_tokens, 0.3
    full = torch.cat([sample.input_ids, torch.tensor(base.answer_tokens)])
    rows = eager_attention(tiny.hf, full)[0][0, 2, L - 1 :, :]  # from the last prompt row on
    expected = reference_split(rows, sample.gold_span, tau)[1:, :L].mean(0).float()
    got = E.head_token_attention(
        tiny.model, sample, prefix, base.answer_tokens, (0, 2), Condition.split(tau, ((0, 2),))
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert float(got[sample.gold_span.slice].sum()) > float(base.token_attention[sample.gold_span.slice].sum())


def test_focus_directions_view_equals_manual_decode(tiny, samples):
    torch.manual_seed(3)
    dirs = FocusDirections.zeros(tiny.model)
    dirs = FocusDirections(torch.randn_like(dirs.d_q) * 3, torch.randn_like(dirs.d_k) * 3, dirs.model_name)
    sample = samples[0]
    prefix = prefill(tiny.model, sample.input_ids)
    iv = Condition.focus(0.8, E.DIRECTIONS, ((1, 1), (0, 0)))
    view = E.explore_sample(tiny.model, sample, prefix, (1, 1), iv, directions=dirs)
    with focus_directions(tiny.model, dirs, [(1, 1), (0, 0)], 0.8, from_pos=sample.n_tokens - 1):
        manual = decode(tiny.model, prefix)
    assert list(view.answer_tokens) == manual.tokens
    with pytest.raises(ValueError, match="need trained directions"):
        E.explore_sample(tiny.model, sample, prefix, (1, 1), iv)


def test_conditions_with_head_lists_compare_and_hash_equal():
    a = Condition.split(0.5, [(1, 2)])
    assert a == Condition.split(0.5, ((1, 2),)) and hash(a) == hash(Condition.split(0.5, [(1, 2)]))
    assert a.label == "split tau=0.5, heads=L1H2"
    with pytest.raises(ValueError, match="head_list"):
        Condition.split(0.1, [])
    with pytest.raises(ValueError, match="tau"):
        Condition.split(-1, [(0, 0)])
    with pytest.raises(ValueError, match="alpha"):
        Condition.focus(float("nan"), E.DIRECTIONS, [(0, 0)])


def test_head_outside_model_and_negative_sample(tiny, samples):
    sample = samples[0]
    prefix = prefill(tiny.model, sample.input_ids)
    with pytest.raises(ValueError, match="L2H0 is outside the model"):
        E.explore_sample(tiny.model, sample, prefix, (2, 0))
    neg = fake_samples(1, variant="negative")[0]
    with pytest.raises(ValueError, match="no gold document"):
        E.explore_sample(tiny.model, neg, prefill(tiny.model, neg.input_ids), (0, 0),
                         Condition.split(0.1, ((0, 0),)))
    view = E.explore_sample(tiny.model, neg, prefill(tiny.model, neg.input_ids), (0, 0))
    assert torch.isnan(view.kinds["relevant"]).all()  # undefined without gold, as in kind_scores


def test_token_html_is_one_string_with_escaping_gold_and_scale():
    tokens = ["<s>", "a<b", "&", "c", "\n", "d"]
    values = np.array([0.9, 0.1, 0.2, 0.05, 0.0, 0.001])
    out = E.token_html(tokens, values, gold=fdlib.Span(1, 3), sink=fdlib.Span(0, 1))
    assert "a&lt;b" in out and "&amp;" in out and "<b" not in out.replace("<b>", "")
    spans = re.findall(r'<span( style="background:rgba\(214,39,40,([0-9.]+)\)")? title="(\d+): ([0-9.]+)">', out)
    assert [int(s[2]) for s in spans] == list(range(6))
    alphas = {int(s[2]): float(s[1]) if s[1] else 0.0 for s in spans}
    assert alphas[2] == 1.0 and alphas[0] == 1.0  # the max outside the sink is 1; the sink is clipped
    assert alphas[1] == pytest.approx(0.5) and alphas[5] == 0.0  # below 1% of the max: no colour
    gold_open = out.index("outline:2px solid #2ca02c")
    assert out.index("a&lt;b") > gold_open and out.index(">c<") > out.index("</span></span>")
    empty = E.token_html(tokens, np.full(6, np.nan))
    assert "empty answer" in empty and "no answer row" in empty
    with pytest.raises(ValueError, match="one value per token"):
        E.token_html(tokens, values[:3])


def test_explorer_callbacks_update_state(tiny, samples, monkeypatch):
    import fdlib.model.decoding as decoding

    calls = []
    real_prefill = decoding.prefill
    monkeypatch.setattr(decoding, "prefill", lambda model, ids, **kw: calls.append(1) or real_prefill(model, ids, **kw))
    ex = E.HeadExplorer(tiny.model, samples, top_k=2, tau=0.2)
    # initial head: the best relevant head of the first sample's plain answer
    plain = E.explore_sample(tiny.model, samples[0], real_prefill(tiny.model, samples[0].input_ids), (0, 0))
    assert ex.head == top_heads(plain.kinds["relevant"], 1)[0]
    assert ex.view.answer == plain.answer and ex.error is None
    assert np.allclose(np.asarray(ex.heatmap.data[0].z), plain.kinds["relevant"].numpy())
    assert ex.last_update_s > 0 and "last update" in ex.timing_label.value
    assert ex.tau_slider.disabled and ex.alpha_slider.disabled and ex.top_k_slider.disabled

    # clicking a heatmap cell: x is the head, y the layer
    before_tokens = ex.tokens_html.value
    ex.on_head_click(ex.heatmap.data[0], Points([3], [1]))
    assert ex.head == (1, 3) and "L1H3" in ex.head_label.value
    assert list(ex.heatmap.data[2].x) == [3] and list(ex.heatmap.data[2].y) == [1]
    assert ex.tokens_html.value != before_tokens and ex.last_source == "teacher-forced"
    assert list(ex.doc_figure.data[0].y) == pytest.approx(ex.view.doc_attention.tolist())
    ex.on_head_click(ex.heatmap.data[1], Points([], []))  # a trace that was not clicked: no change
    assert ex.head == (1, 3)
    with pytest.raises(ValueError, match="outside the model"):
        ex.select_head(0, 4)

    # an intervention: split-softmax on the top-2 heads by the plain relevant score
    ex.intervention_dropdown.value = "split_softmax"
    want = tuple(top_heads(plain.kinds["relevant"], 2))
    assert ex.view.intervention == Condition.split(0.2, want)
    assert not ex.tau_slider.disabled and ex.alpha_slider.disabled
    manual = E.explore_sample(tiny.model, samples[0], real_prefill(tiny.model, samples[0].input_ids), (1, 3),
                              ex.view.intervention)
    assert ex.view.answer == manual.answer and ex.last_source == "decoded"
    torch.testing.assert_close(ex.view.token_attention, manual.token_attention, atol=1e-5, rtol=0)
    assert sorted(zip(ex.heatmap.data[1].y, ex.heatmap.data[1].x)) == sorted(want)
    assert "split tau=0.2" in ex.status.value
    ex.top_k_slider.value = 5
    assert len(ex.view.intervention.head_list) == 5

    # the score kind only redraws (cached answer)
    ex.kind_dropdown.value = "sink"
    assert ex.last_source == "cached"
    assert np.allclose(np.asarray(ex.heatmap.data[0].z), ex.view.kinds["sink"].numpy())
    assert "Sink" in ex.heatmap.data[0].hovertemplate

    # another sample, then back: one prefill per sample, ever
    ex.sample_dropdown.value = 1
    assert ex.view.sample_id == samples[1].id
    ex.sample_dropdown.value = 0
    assert ex.last_source == "cached"
    assert len(calls) == 2 and set(ex._prefixes) == {0, 1}

    # the static export
    fig = ex.snapshot()
    assert isinstance(fig, go.Figure)
    assert [type(t).__name__ for t in fig.data] == ["Heatmap", "Scatter", "Scatter", "Bar"]


def test_explorer_shows_bad_settings_and_rejects_bad_arguments(tiny, samples):
    neg = fake_samples(1, variant="negative")
    ex = E.HeadExplorer(tiny.model, samples[:1] + neg)
    assert [v for _, v in ex.intervention_dropdown.options] == ["none", "split_softmax"]  # no directions
    ex.sample_dropdown.value = 1
    ex.intervention_dropdown.value = "split_softmax"
    assert "no gold document" in ex.error and "no gold document" in ex.status.value  # shown, not raised
    with pytest.raises(ValueError, match="unknown score kind"):
        E.HeadExplorer(tiny.model, samples, kind="gold")
    with pytest.raises(ValueError, match="no samples"):
        E.HeadExplorer(tiny.model, [])
    with pytest.raises(ValueError, match="needs directions"):
        E.HeadExplorer(tiny.model, samples, intervention="focus")
    with pytest.raises(ValueError, match=r"scores\['relevant'\] has shape \(3, 4\)"):
        E.HeadExplorer(tiny.model, samples, scores={"relevant": np.zeros((3, 4))})
    with pytest.raises(ValueError, match="L5H0"):
        E.HeadExplorer(tiny.model, samples, head=(5, 0))


def test_explorer_with_given_scores_and_directions(tiny, samples):
    torch.manual_seed(4)
    dirs = FocusDirections.zeros(tiny.model)
    dirs = FocusDirections(torch.randn_like(dirs.d_q), torch.randn_like(dirs.d_k), dirs.model_name)
    given = {"relevant": torch.arange(8.0).reshape(2, 4), "sink": torch.ones(2, 4)}
    ex = E.HeadExplorer(tiny.model, samples, directions=dirs, scores=given, intervention="focus", top_k=3, alpha=0.5)
    assert ex.head == (1, 3)  # the best given relevant score
    assert ex.view.intervention == Condition.focus(0.5, E.DIRECTIONS, ((1, 3), (1, 2), (1, 1)))
    assert not ex.alpha_slider.disabled and ex.tau_slider.disabled
    ex.source_toggle.value = "given"
    assert np.allclose(np.asarray(ex.heatmap.data[0].z), given["relevant"].numpy())
    ex.kind_dropdown.value = "irmax"  # not given: the answer's own scores
    assert np.allclose(np.asarray(ex.heatmap.data[0].z), ex.view.kinds["irmax"].numpy(), equal_nan=True)


def test_head_doc_mass_and_snapshot_figures():
    fig = plots.head_doc_mass([0.1, 0.5, 0.2], 1, head="L3H2", titles=["A", "B", "C"])
    bar = fig.data[0]
    assert list(bar.x) == ["doc 1", "doc 2 (gold)", "doc 3"] and list(bar.marker.color)[1] == "#2ca02c"
    assert bar.customdata[1] == "doc 2 (gold): B" and "%{customdata}" in bar.hovertemplate
    with pytest.raises(ValueError, match="gold_index 3"):
        plots.head_doc_mass([0.1, 0.2], 3, head="x")
    snap = plots.explorer_snapshot(np.random.rand(4, 3), [0.2, 0.3], 0, head=(2, 1), marked=[(0, 0), (3, 2)])
    assert list(snap.data[1].customdata) == ["L0H0", "L3H2"] and list(snap.data[2].x) == [1]
    with pytest.raises(ValueError, match="L4H0 is outside"):
        plots.explorer_snapshot(np.random.rand(4, 3), [0.2], 0, head=(4, 0))


@pytest.mark.integration
def test_explore_sample_on_smollm2(smol):
    """A 5-document SmolLM2 prompt: the head's token attention summed over each document equals
    the span recorder's per-document mass, and a head switch reproduces the decode's rows."""
    sample = fdlib.NQBuilder(smol.tokenizer).samples(split="test", size=1, n_docs=5)[0]
    prefix = prefill(smol, sample.input_ids)
    view = E.explore_sample(smol, sample, prefix, (7, 7), max_new_tokens=8)
    sums = torch.stack([view.token_attention[s.slice].sum() for s in sample.doc_spans])
    torch.testing.assert_close(sums, view.doc_attention, atol=1e-4, rtol=0)
    other = E.explore_sample(smol, sample, prefix, (23, 2), max_new_tokens=8)
    switched = E.reselect_head(smol, sample, prefix, view, (23, 2))
    torch.testing.assert_close(switched.token_attention, other.token_attention, atol=1e-4, rtol=0)
    tokens = E.token_strings(smol.tokenizer, sample.input_ids)
    page = E.token_html(tokens, view.token_attention, gold=sample.gold_span, sink=sample.sink_span)
    assert page.count(' title="') == sample.n_tokens
    assert html_lib.unescape(re.sub(r"<[^>]+>", "", page.split('class="fd-tokens"', 1)[1].split(">", 1)[1])) == "".join(tokens)
