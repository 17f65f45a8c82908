"""Integration tier: the real default model (SmolLM2-135M-Instruct, offline) and the shipped data."""

from __future__ import annotations

import pytest
import torch

import fdlib
from fdlib.data.nq import NQBuilder, load_nq, split_examples
from fdlib.model.decoding import prefill
from fdlib.model.loading import converted_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def builder(smol):
    return NQBuilder(smol.tokenizer)


@pytest.fixture(scope="module")
def eager_reference():
    """An independent plain-transformers model with eager attention, same checkpoint."""
    from transformers import AutoModelForCausalLM

    path = converted_checkpoint(fdlib.DEFAULT_MODEL)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def test_default_model_shape(smol):
    cfg = smol.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_head) == (30, 9, 64)
    assert smol.original_model.config.num_key_value_heads == 3


def test_split_is_deterministic_disjoint_and_half():
    ex = load_nq()
    assert len(ex) == 2655
    train, test = split_examples(ex, "train"), split_examples(ex, "test")
    assert len(train) == 1327 and len(test) == 1328
    assert not {e.index for e in train} & {e.index for e in test}
    assert [e.index for e in split_examples(load_nq(), "test")] == [e.index for e in test]
    assert [e.index for e in split_examples(ex, "test", seed=1)] != [e.index for e in test]


@pytest.mark.parametrize("n_docs,gold_position", [(20, 1), (20, 10), (20, 20), (10, None)])
def test_document_spans_are_exact(smol, builder, n_docs, gold_position):
    examples = split_examples(builder.examples, "test")[:3]
    for ex in examples:
        s = builder.sample(ex, n_docs=n_docs, gold_position=gold_position)
        assert len(s.doc_spans) == n_docs
        expected_gold = (n_docs + 1) // 2 - 1 if gold_position is None else gold_position - 1
        assert s.gold_index == expected_gold and s.documents[s.gold_index] == ex.gold
        for i, (span, doc) in enumerate(zip(s.doc_spans, s.documents)):
            assert smol.tokenizer.decode(s.input_ids[span.slice]) == doc.line(i)
        for a, b in zip(s.doc_spans, s.doc_spans[1:]):
            assert a.end <= b.start  # in order, no overlap
        assert smol.tokenizer.decode(s.input_ids[s.question_span.slice]) == f"Question: {ex.question}"
        assert s.sink_span == fdlib.Span(0, 1)
        assert s.question_span.start >= s.doc_spans[-1].end


def test_variants_share_distractors_and_exclude_answers(builder):
    from fdlib.core.metrics import normalize_answer

    ex = split_examples(builder.examples, "test")[5]
    long = builder.sample(ex, n_docs=20, gold_position=5)
    neg = builder.sample(ex, n_docs=20, variant="negative")
    gold = builder.sample(ex, variant="gold")
    assert gold.documents == (ex.gold,) and gold.gold_index == 0
    assert neg.gold_index is None and len(neg.documents) == 19 and ex.gold not in neg.documents
    assert [d for d in long.documents if d != ex.gold] == list(neg.documents)
    answers = [normalize_answer(a) for a in ex.answers]
    for d in neg.documents:
        assert not any(a in normalize_answer(f"{d.title} {d.text}") for a in answers)
    with pytest.raises(ValueError, match="gold_position 21"):
        builder.sample(ex, n_docs=20, gold_position=21)


def test_cached_step_equals_full_forward_real_model(smol, builder, eager_reference):
    """The transformers-cap regression test on SmolLM2 (5.24 gave a logit difference of 17)."""
    ids = builder.samples(size=1, n_docs=5)[0].input_ids
    prefix = prefill(smol, ids)
    with torch.no_grad():
        step = smol(ids[None, -1:], past_key_values=prefix.cache, return_type="logits")[0, -1]
        full = eager_reference(ids[None]).logits[0, -1]
    assert (step - full).abs().max().item() < 1e-3


def test_scores_match_eager_output_attentions(smol, builder, eager_reference):
    sample = builder.samples(size=1, n_docs=3)[0]
    answer = fdlib.decode(smol, prefill(smol, sample.input_ids), max_new_tokens=8, spans=sample.named_spans())
    ids = torch.cat([sample.input_ids, torch.tensor(answer.tokens)])
    P = sample.n_tokens
    with torch.no_grad():
        attn = eager_reference(ids[None], output_attentions=True).attentions
    for name, span in sample.named_spans().items():
        ref = torch.stack([a[0, :, P:, span.slice].sum(-1).mean(-1) for a in attn])
        torch.testing.assert_close(answer.scores[name], ref, atol=1e-5, rtol=0)


def test_greedy_answer_equals_transformers_generate(smol, builder, eager_reference):
    sample = builder.samples(size=1, n_docs=5)[0]
    answer = fdlib.decode(smol, prefill(smol, sample.input_ids), max_new_tokens=12)
    with torch.no_grad():
        gen = eager_reference.generate(
            sample.input_ids[None], max_new_tokens=len(answer.tokens), do_sample=False, attention_mask=torch.ones(1, sample.n_tokens, dtype=torch.long)
        )[0, sample.n_tokens :]
    assert gen.tolist() == answer.tokens


def test_shared_prefill_answers_equal_fresh_bridge_runs(smol, builder):
    """Split-softmax configurations decoded from one shared fast prefill give the same answers as
    each configuration run from scratch with the full prompt through the bridge, hooks on."""
    from fdlib.core.heads import random_heads

    sample = builder.samples(size=2, n_docs=5)[1]
    heads = [(20, 8), (22, 2), (21, 1), (22, 7), (23, 2)]
    configs = [(heads[:1], 0.1), (heads, 0.1), (heads, 1000.0), (random_heads(30, 9, 20, seed=0), 0.3)]
    shared = prefill(smol, sample.input_ids)
    for chosen, tau in configs:
        with fdlib.split_softmax(smol, chosen, sample.gold_span, tau, from_pos=sample.n_tokens - 1):
            a = fdlib.decode(smol, shared, max_new_tokens=16)
            b = fdlib.decode(smol, prefill(smol, sample.input_ids, fast=False), max_new_tokens=16)
        assert a.tokens == b.tokens, (tau, a.text, b.text)
