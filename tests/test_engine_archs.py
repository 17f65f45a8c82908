"""The batched engine on every architecture of the matrix (tests/arch_models.py), against the
eager reference written apart from fdlib (tests/eager_reference.py): a full forward of prompt +
answer, no cache, with the edits recomputed by hand. Prompts are longer than the sliding window
and one reweighted span lies entirely outside it."""

from __future__ import annotations

import pytest
import torch
from arch_models import ARCHS, cached_arch
from eager_reference import Ablate, Focus, Split, greedy, run

from fdlib.core.spans import Span
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import decode_batch
from fdlib.interventions.row import RowIntervention
from fdlib.model.decoding import prefill
from fdlib.model.loading import StopTokens, model_name

N_NEW = 6
PROMPT = 20  # > the tiny models' window of 8
NEAR, FAR = Span(13, 17), Span(2, 6)  # FAR is outside the window of the answer rows


def _prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 64, (PROMPT,), generator=torch.Generator().manual_seed(seed))


def _dirs(model, placement: str, seed: int) -> FocusDirections:
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    return FocusDirections(torch.randn(shape, generator=g), torch.randn(shape, generator=g), model_name(model), placement)


def _cases(model):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    heads = ((0, 1), (L - 1, H - 1), (L - 1, 0))
    post, pre = _dirs(model, "post_rope", 1), _dirs(model, "pre_rope", 2)
    last = PROMPT - 1
    return [
        (RowIntervention(), {}),
        (RowIntervention(heads, span_map="split", strength=0.1, span=NEAR), dict(split=Split(heads, (NEAR.start, NEAR.end), 0.1, last))),
        (RowIntervention(heads, span_map="split", strength=0.0, span=FAR), dict(split=Split(heads, (FAR.start, FAR.end), 0.0, last))),
        (RowIntervention(heads, span_map="split", strength=3.0, span=NEAR), dict(split=Split(heads, (NEAR.start, NEAR.end), 3.0, last))),
        (RowIntervention(heads, directions=post, alpha=0.7), dict(focus=Focus(post.d_q, post.d_k, heads, 0.7, "post_rope", last))),
        (RowIntervention(heads, directions=pre, alpha=0.5), dict(focus=Focus(pre.d_q, pre.d_k, heads, 0.5, "pre_rope", last))),
        (RowIntervention(heads, ablate=True), dict(ablate=Ablate(heads, last))),
        (RowIntervention(heads, span_map="odds", strength=0.05, span=NEAR), dict(split=Split(heads, (NEAR.start, NEAR.end), 0.05, last, "odds"))),
        (RowIntervention(heads, span_map="boost", strength=7.0, span=NEAR), dict(split=Split(heads, (NEAR.start, NEAR.end), 7.0, last, "boost"))),
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_engine_equals_eager_reference(arch):
    t = cached_arch(arch)
    model = t.model
    saved = model.__dict__.get("_fdlib_stop_tokens")
    model.__dict__["_fdlib_stop_tokens"] = StopTokens(frozenset(), frozenset())  # every row runs N_NEW tokens
    try:
        prompt = _prompt()
        cases = _cases(model)
        spans = {"near": NEAR, "far": FAR, "sink": Span(0, 1)}
        got = decode_batch(model, prefill(model, prompt), [row for row, _ in cases], spans=spans, max_new_tokens=N_NEW)
    finally:
        if saved is None:
            model.__dict__.pop("_fdlib_stop_tokens", None)
        else:
            model.__dict__["_fdlib_stop_tokens"] = saved
    for (row, edits), answer in zip(cases, got):
        assert answer.tokens == greedy(t.hf, prompt, N_NEW, **edits), f"{arch}: {row}"
        ref = run(t.hf, torch.cat([prompt, torch.tensor(answer.tokens)]), **edits)
        for name, span in spans.items():
            want = ref.span_scores((span.start, span.end), from_pos=PROMPT).float()
            torch.testing.assert_close(answer.scores[name], want, atol=1e-5, rtol=0, msg=f"{arch} {name} {row}")


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_prompts_of_different_lengths_in_one_batch(arch):
    """Continuous batching: two prompts (20 and 23 tokens) whose rows share forwards, each row at
    its own absolute position (RoPE / learned positions / windows), against the reference."""
    from fdlib.interventions.engine import Job, decode_jobs

    t = cached_arch(arch)
    model = t.model
    saved = model.__dict__.get("_fdlib_stop_tokens")
    model.__dict__["_fdlib_stop_tokens"] = StopTokens(frozenset(), frozenset())
    prompts = [_prompt(1), torch.cat([_prompt(2), _prompt(3)[:3]])]
    cases = [_cases(model)[i] for i in (0, 1, 5)]
    try:
        jobs = [Job(i, prefill(model, p), [row for row, _ in cases], {"near": NEAR}) for i, p in enumerate(prompts)]
        got = dict(decode_jobs(model, jobs, batch_size=4, max_new_tokens=N_NEW))
    finally:
        if saved is None:
            model.__dict__.pop("_fdlib_stop_tokens", None)
        else:
            model.__dict__["_fdlib_stop_tokens"] = saved
    for i, p in enumerate(prompts):
        for (row, edits), answer in zip(cases, got[i]):
            edits = {k: type(v)(**{**vars(v), "from_pos": len(p) - 1}) for k, v in edits.items()}
            assert answer.tokens == greedy(t.hf, p, N_NEW, **edits), f"{arch} prompt {i}: {row}"
            ref = run(t.hf, torch.cat([p, torch.tensor(answer.tokens)]), **edits)
            want = ref.span_scores((NEAR.start, NEAR.end), from_pos=len(p)).float()
            torch.testing.assert_close(answer.scores["near"], want, atol=1e-5, rtol=0, msg=f"{arch} prompt {i} {row}")


@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_engine_and_bridge_agree_with_eager_reference_teacher_forced(arch):
    """In bfloat16, on the same answer tokens (teacher forcing: greedy answers may part at a near
    tie), the batched engine, the bridge's hooks and the eager reference in bfloat16 (transformers'
    eager rounding points, float32 softmax: tests/eager_reference.py) give the same logits and span
    scores within the bfloat16 tolerances of conftest, for every case of the matrix; and bfloat16
    really changed the numbers (the float32 reference differs)."""
    from conftest import BF16_SCORE_TOL, bf16_logit_tol, sequential_forced

    from fdlib.interventions.engine import teacher_forced
    from fdlib.model.loading import model_dtype

    t, t32 = cached_arch(arch, dtype=torch.bfloat16), cached_arch(arch)
    model = t.model
    assert model_dtype(model) == torch.bfloat16 and model_dtype(t.hf) == torch.bfloat16
    prompt, tokens = _prompt(), [7, 9, 11, 13, 21, 30]
    spans = {"near": NEAR, "far": FAR, "sink": Span(0, 1)}
    full = torch.cat([prompt, torch.tensor(tokens)])
    cases = _cases(model)
    logits, answers = teacher_forced(model, prefill(model, prompt), [row for row, _ in cases], tokens, spans)
    moved = 0.0
    for i, (row, edits) in enumerate(cases):
        ref = run(t.hf, full, **edits)
        want = ref.logits[PROMPT - 1 :].float()
        tol = bf16_logit_tol(want)
        seq_logits, seq_scores = sequential_forced(model, prefill(model, prompt), row, tokens, spans)
        for name, got in (("engine", logits[i]), ("bridge", seq_logits)):
            torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=f"{arch} {name} logits {row}")
        torch.testing.assert_close(logits[i], seq_logits, atol=tol, rtol=0, msg=f"{arch} engine vs bridge {row}")
        for name, span in spans.items():
            ref_scores = ref.span_scores((span.start, span.end), from_pos=PROMPT).float()
            for label, got in (("engine", answers[i].scores[name]), ("bridge", seq_scores[name])):
                torch.testing.assert_close(got, ref_scores, atol=BF16_SCORE_TOL, rtol=0, msg=f"{arch} {label} {name} {row}")
        moved = max(moved, float((run(t32.hf, full, **edits).logits[PROMPT - 1 :].float() - want).abs().max()))
    assert moved > 0, f"{arch}: the bfloat16 reference equals the float32 one: the test did not run in bfloat16"
