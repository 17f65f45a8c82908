"""Unit tier: tiny random GQA Llama; every score is checked against plain transformers
(eager, output_attentions=True) through separately written reference code."""

import pytest
import torch

import fdlib
from fdlib.model.decoding import prefill
from fdlib.study.scores import kind_scores

SPANS = {"sink": fdlib.Span(0, 1), "a": fdlib.Span(3, 10), "b": fdlib.Span(20, 35), "tail": fdlib.Span(30, 40)}


def reference_scores(hf, ids, response_start, spans):
    with torch.no_grad():
        attn = hf(ids[None], output_attentions=True).attentions  # per layer [1, head, q, k]
    return {
        name: torch.stack([a[0, :, response_start:, s.start : s.end].sum(-1).mean(-1) for a in attn])
        for name, s in spans.items()
    }


def test_contextual_scores_match_eager_reference(tiny):
    torch.manual_seed(1)
    ids = torch.randint(5, 64, (40,))
    for response_start in (30, 39, 1):
        got = fdlib.contextual_scores(tiny.model, ids, response_start, SPANS)
        ref = reference_scores(tiny.hf, ids, response_start, SPANS)
        assert set(got) == set(SPANS)
        for name in SPANS:
            assert got[name].shape == (2, 4)
            torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=0)
    # a [1, pos] batch of one is accepted too
    batched = fdlib.contextual_scores(tiny.model, ids[None], 30, SPANS)
    torch.testing.assert_close(batched["a"], reference_scores(tiny.hf, ids, 30, SPANS)["a"], atol=1e-5, rtol=0)


def test_scores_of_all_positions_sum_to_one(tiny):
    ids = torch.randint(5, 64, (25,))
    got = fdlib.contextual_scores(tiny.model, ids, 10, {"all": fdlib.Span(0, 25)})
    torch.testing.assert_close(got["all"], torch.ones(2, 4), atol=1e-5, rtol=0)


def test_generation_path_equals_teacher_forced(tiny):
    torch.manual_seed(2)
    prompt = torch.randint(5, 64, (30,))
    spans = {"a": fdlib.Span(2, 9), "b": fdlib.Span(9, 30)}
    answer = fdlib.decode(tiny.model, prefill(tiny.model, prompt), max_new_tokens=6, spans=spans)
    assert len(answer.tokens) >= 1
    full = torch.cat([prompt, torch.tensor(answer.tokens)])
    forced = fdlib.contextual_scores(tiny.model, full, 30, spans)
    ref = reference_scores(tiny.hf, full, 30, spans)
    for name in spans:
        torch.testing.assert_close(answer.scores[name], forced[name], atol=1e-5, rtol=0)
        torch.testing.assert_close(answer.scores[name], ref[name], atol=1e-5, rtol=0)


def test_bad_inputs_raise(tiny):
    ids = torch.randint(5, 64, (20,))
    with pytest.raises(ValueError, match="response_start"):
        fdlib.contextual_scores(tiny.model, ids, 20, SPANS)
    with pytest.raises(ValueError, match="response_start"):
        fdlib.contextual_scores(tiny.model, ids, 0, SPANS)
    with pytest.raises(ValueError, match=r"span 'b'.*Span\(20, 35\).*sequence length 20"):
        fdlib.contextual_scores(tiny.model, ids, 10, {"b": fdlib.Span(20, 35)})
    with pytest.raises(ValueError, match="1-D"):
        fdlib.contextual_scores(tiny.model, torch.zeros(2, 5, dtype=torch.long), 2, SPANS)


def test_kind_scores():
    docs = torch.tensor([[[0.1]], [[0.5]], [[0.2]]])  # 3 docs, 1 layer, 1 head
    sink = torch.tensor([[0.3]])
    k = kind_scores(docs, 1, sink)
    assert k["relevant"].item() == pytest.approx(0.5)
    assert k["irrelevant"].item() == pytest.approx(0.3)
    assert k["irmax"].item() == pytest.approx(0.2)
    assert k["sink"].item() == pytest.approx(0.3)
    neg = kind_scores(docs, None, sink)
    assert torch.isnan(neg["relevant"]).all() and neg["irrelevant"].item() == pytest.approx(0.8)
    gold = kind_scores(docs[:1], 0, sink)
    assert gold["irrelevant"].item() == 0 and torch.isnan(gold["irmax"]).all()


def test_top_heads_and_counts():
    s = torch.zeros(3, 4)
    s[2, 1], s[1, 3], s[0, 0] = 0.5, 0.3, 0.07
    assert fdlib.top_heads(s, 2) == [(2, 1), (1, 3)]
    assert fdlib.heads_above(s) == {0.2: 2, 0.1: 2, 0.05: 3}
    assert fdlib.head_label(2, 1) == "L2H1"
    with pytest.raises(ValueError):
        fdlib.top_heads(s, 13)
