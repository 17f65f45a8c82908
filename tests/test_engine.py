"""The batched engine (fdlib.interventions.engine) against the sequential reference: the bridge's hooks, one
condition at a time (fdlib.model.decoding.decode under fdlib's context managers)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import build_tiny, fake_samples

import fdlib
from fdlib.core.heads import random_heads
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import decode_batch
from fdlib.interventions.hooks import ablate_heads, reweight_span
from fdlib.interventions.reweighting import target_share
from fdlib.interventions.row import RowIntervention
from fdlib.model.decoding import decode, prefill
from fdlib.model.loading import StopTokens, model_name


def _directions(model, placement, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    return FocusDirections(torch.randn(shape, generator=g), torch.randn(shape, generator=g), model_name(model), placement)


def _mixed_rows(model, span):
    post, pre = _directions(model, "post_rope", 1), _directions(model, "pre_rope", 2)
    top = ((1, 3), (0, 1), (1, 0))
    rand = tuple(random_heads(model.cfg.n_layers, model.cfg.n_heads, 3, seed=4))
    return [
        RowIntervention(),
        *[RowIntervention(top, span_map="split", strength=t, span=span) for t in (0.0, 0.1, 0.6, 1000.0)],
        RowIntervention(rand, span_map="split", strength=0.1, span=span),
        *[RowIntervention(top, directions=post, alpha=a) for a in (-0.5, 0.8)],
        RowIntervention(top, directions=pre, alpha=0.6),
        RowIntervention(rand, directions=post, alpha=0.8),
        RowIntervention(top, ablate=True),
        RowIntervention(rand, ablate=True),
        RowIntervention(top, span_map="odds", strength=0.05, span=span),
        RowIntervention(top, span_map="boost", strength=9.0, span=span),
    ]


def _reference(model, prefix, row, from_pos, spans, max_new_tokens):
    if row.span_map is not None:
        ctx = reweight_span(model, row.heads, row.span, row.span_map, row.strength, from_pos=from_pos)
    elif row.directions is not None:
        ctx = fdlib.focus_directions(model, row.directions, row.heads, row.alpha, from_pos=from_pos)
    elif row.ablate:
        ctx = ablate_heads(model, row.heads, from_pos=from_pos)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        return decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)


@pytest.fixture(scope="module")
def stopping():
    """A tiny model whose stop tokens are chosen so that the mixed batch's rows stop at
    different steps (a random model rarely emits its end-of-text token)."""
    t = build_tiny(seed=3)
    sample = fake_samples(1)[0]
    free = decode_batch(t.model, prefill(t.model, sample.input_ids), _mixed_rows(t.model, sample.gold_span), max_new_tokens=12)
    # stop on a token early in the longest answer and one late in another long answer: other
    # rows stop wherever they produce one of those, or run to the budget
    longest = sorted(free, key=lambda a: -len(a.tokens))
    eos = {longest[0].tokens[2], longest[1].tokens[-2]}
    t.model.__dict__["_fdlib_stop_tokens"] = StopTokens(frozenset(eos), frozenset())
    return t, sample


def test_mixed_batch_equals_sequential_reference(stopping):
    t, sample = stopping
    model = t.model
    spans = sample.named_spans()
    rows = _mixed_rows(model, sample.gold_span)
    prefix = prefill(model, sample.input_ids)
    got = decode_batch(model, prefix, rows, spans=spans, max_new_tokens=12)
    lengths = {len(a.tokens) for a in got}
    assert len(lengths) >= 2, f"rows should stop at different steps, got lengths {lengths}"
    for row, answer in zip(rows, got):
        ref = _reference(model, prefix, row, sample.n_tokens - 1, spans, 12)
        assert answer.tokens == ref.tokens
        assert answer.text == ref.text
        assert set(answer.scores) == set(ref.scores)
        for name in ref.scores:
            torch.testing.assert_close(answer.scores[name], ref.scores[name], atol=1e-5, rtol=0)
    # the prefix is only read: it still serves the sequential path unchanged
    assert prefix.cache.get_seq_length() == sample.n_tokens - 1


def test_rows_do_not_depend_on_their_batch(stopping):
    t, sample = stopping
    rows = _mixed_rows(t.model, sample.gold_span)
    prefix = prefill(t.model, sample.input_ids)
    together = decode_batch(t.model, prefix, rows, spans=sample.named_spans(), max_new_tokens=12)
    for i in (0, 3, 10):
        alone = decode_batch(t.model, prefix, [rows[i]], spans=sample.named_spans(), max_new_tokens=12)[0]
        assert alone.tokens == together[i].tokens
        for name in alone.scores:
            torch.testing.assert_close(alone.scores[name], together[i].scores[name], atol=1e-6, rtol=0)


def test_maps_against_hand_formulas():
    pi = torch.tensor([0.0, 0.02, 0.3, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(target_share(pi, "split", 0.5), torch.tensor([0.0, 0.02**0.5, 0.3**0.5, 0.9**0.5, 1.0], dtype=torch.float64))
    a = 0.25
    odds = torch.tensor([0.0, 0.02 / (0.02 + a * 0.98), 0.3 / (0.3 + a * 0.7), 0.9 / (0.9 + a * 0.1), 1.0], dtype=torch.float64)
    torch.testing.assert_close(target_share(pi, "odds", a), odds)
    torch.testing.assert_close(target_share(pi, "boost", 1 / a), odds)  # boost m = odds 1/m
    for m in ("split", "odds", "boost"):
        torch.testing.assert_close(target_share(pi, m, 1.0), pi)  # the identity


def test_engine_refuses_before_any_forward(tiny):
    sample = fake_samples(1)[0]
    prefix = prefill(tiny.model, sample.input_ids)
    with pytest.raises(ValueError, match="outside the model"):
        decode_batch(tiny.model, prefix, [RowIntervention(((5, 0),), ablate=True)])
    with pytest.raises(ValueError, match="past the sequence"):
        decode_batch(tiny.model, prefix, [RowIntervention(((0, 0),), span_map="split", strength=0.1, span=fdlib.Span(3, 99))])
    other = FocusDirections(torch.zeros(2, 4, 16), torch.zeros(2, 4, 16), "another-model")
    with pytest.raises(ValueError, match="shape"):
        decode_batch(tiny.model, prefix, [RowIntervention(((0, 0),), directions=other, alpha=0.5)])
    with pytest.raises(ValueError, match="tau"):
        RowIntervention(((0, 0),), span_map="split", strength=-1.0, span=fdlib.Span(1, 3))
    with pytest.raises(ValueError, match="> 0"):
        RowIntervention(((0, 0),), span_map="odds", strength=0.0, span=fdlib.Span(1, 3))


def test_continuous_batching_across_prompts_equals_one_prompt_at_a_time(stopping):
    """Rows of several prompts of different lengths share forwards (rows of the next prompt take
    the places of finished rows; a prompt's rows split over several admissions): every row's
    answer and scores are those of its prompt decoded alone."""
    from dataclasses import replace as dc_replace

    from fdlib.interventions.engine import Job, decode_jobs

    t, sample = stopping
    samples = [sample, dc_replace(sample, input_ids=sample.input_ids[:20]), dc_replace(sample, input_ids=torch.cat([sample.input_ids, sample.input_ids[:7]]))]
    jobs, alone = [], {}
    for i, s in enumerate(samples):
        rows = _mixed_rows(t.model, s.gold_span)[i::2]
        spans = {"gold": s.gold_span, "sink": fdlib.Span(0, 1)}
        prefix = prefill(t.model, s.input_ids)
        alone[i] = decode_batch(t.model, prefix, rows, spans=spans, max_new_tokens=12)
        jobs.append(Job(i, (lambda ids=s.input_ids: prefill(t.model, ids)), rows, spans))
    got = dict(decode_jobs(t.model, jobs, batch_size=5, max_new_tokens=12))
    assert sorted(got) == [0, 1, 2]
    for i, answers in got.items():
        assert [a.tokens for a in answers] == [a.tokens for a in alone[i]]
        for a, b in zip(answers, alone[i]):
            for name in b.scores:
                torch.testing.assert_close(a.scores[name], b.scores[name], atol=1e-5, rtol=0)


def test_bfloat16_mixed_batch_equals_sequential_teacher_forced():
    """The mixed batch in bfloat16, teacher-forced on one answer (greedy answers may part at a near
    tie in bfloat16): every row's logits and span scores from the batched engine equal the
    bridge's hooks (the sequential executor) within conftest's bfloat16 tolerances, and
    bfloat16 changed them (the float32 model on the same weights differs)."""
    from conftest import BF16_SCORE_TOL, bf16_logit_tol, sequential_forced

    from fdlib.interventions.engine import teacher_forced

    t, t32 = build_tiny(seed=3, dtype=torch.bfloat16), build_tiny(seed=3)
    sample = fake_samples(1)[0]
    spans = sample.named_spans()
    tokens = [11, 23, 5, 40, 17, 9, 33, 28]
    moved = 0.0
    for tiny in (t, t32):
        rows = _mixed_rows(tiny.model, sample.gold_span)
        logits, answers = teacher_forced(tiny.model, prefill(tiny.model, sample.input_ids), rows, tokens, spans)
        for i, row in enumerate(rows):
            seq_logits, seq_scores = sequential_forced(tiny.model, prefill(tiny.model, sample.input_ids), row, tokens, spans)
            if tiny is t32:  # float32: the exact reference, as in the greedy test above
                torch.testing.assert_close(logits[i], seq_logits, atol=1e-4, rtol=0)
                moved = max(moved, float((logits[i] - bf16_logits[i]).abs().max()))
                continue
            torch.testing.assert_close(logits[i], seq_logits, atol=bf16_logit_tol(seq_logits), rtol=0, msg=str(row))
            for name in spans:
                torch.testing.assert_close(answers[i].scores[name], seq_scores[name], atol=BF16_SCORE_TOL, rtol=0,
                                           msg=f"{name} {row}")
        bf16_logits = logits
    assert moved > 0


def _reads(fn):
    """How often `fn` reads a tensor's value back on the host (`item`, `tolist`, `cpu`,
    `numpy`, `nonzero`, and `bool`/`int`/`float` of a tensor), by method."""
    import collections

    names = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")
    counts: collections.Counter = collections.Counter()
    originals = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name, orig):
        def read(self, *args, **kwargs):
            counts[name] += 1
            return orig(self, *args, **kwargs)
        return read

    try:
        for n, orig in originals.items():
            setattr(torch.Tensor, n, counting(n, orig))
        fn()
    finally:
        for n, orig in originals.items():
            setattr(torch.Tensor, n, orig)
    return counts


def test_a_decode_step_reads_back_only_its_next_tokens(stopping):
    """A GPU-shaped decode step: whatever the rows do (the mixed batch: span maps, focus
    directions pre and post RoPE, ablation) and however many layers, each extra step of the
    batched engine reads back exactly one thing, the batch's next tokens (`tolist`); the span
    sums, the reweighting's index plans and the stop checks stay on the device until the rows
    finish. The sequential executor's extra step reads back one thing too (its next token)."""
    t, sample = stopping
    model = t.model
    saved = model.__dict__["_fdlib_stop_tokens"]
    model.__dict__["_fdlib_stop_tokens"] = StopTokens(frozenset(), frozenset())  # every row runs the budget
    try:
        rows = _mixed_rows(model, sample.gold_span)
        prefix = prefill(model, sample.input_ids)
        spans = sample.named_spans()
        batched = {n: _reads(lambda n=n: decode_batch(model, prefix, rows, spans=spans, max_new_tokens=n)) for n in (3, 9)}
        extra = batched[9] - batched[3]
        assert dict(extra) == {"tolist": 6}, dict(batched[9])
        seq = {n: _reads(lambda n=n: _reference(model, prefix, rows[2], sample.n_tokens - 1, spans, n)) for n in (3, 9)}
        extra = seq[9] - seq[3]
        assert sum(extra.values()) == 6, dict(seq[9])
    finally:
        model.__dict__["_fdlib_stop_tokens"] = saved
