"""Integration tier: SmolLM2-135M-Instruct in bfloat16 against itself in float32 and across the two
executors (the batched engine and the bridge's hooks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fdlib
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import decode_batch
from fdlib.model.decoding import decode, prefill
from fdlib.model.loading import model_dtype
from fdlib.study.conditions import Condition
from fdlib.study.runner import StudySample, decode_sequential
from fdlib.study.scores import contextual_scores

pytestmark = pytest.mark.integration

DIRECTIONS = Path(__file__).resolve().parents[1] / "figures" / "data" / "directions_gold_post_rope.safetensors"
# Teacher-forced contextual scores of SmolLM2 in bfloat16 vs float32, on the same prompt and
# answer tokens: every (layer, head, span) within SCORE_BOUND, their mean within MEAN_BOUND.
# Measured on 4 test questions (20 documents, ~2.3k tokens): largest 0.017 (on the sink, whose
# scores reach 0.9: about 2% of it), means ~1e-3; bfloat16's own step at 0.5..1 is 2^-8 = 0.004.
SCORE_BOUND = 0.03
MEAN_BOUND = 0.002


@pytest.fixture(scope="module")
def smol_bf16():
    return fdlib.load_model(dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def samples(smol):
    return fdlib.NQBuilder(smol.tokenizer).samples(split="test", size=2, n_docs=20)


def test_default_offline_model_loads_in_float32_and_in_bfloat16(smol, smol_bf16):
    assert model_dtype(smol) == torch.float32 and model_dtype(smol_bf16) == torch.bfloat16
    tables = [b for n, b in smol_bf16.original_model.named_buffers() if "inv_freq" in n]
    assert tables and all(t.dtype == torch.float32 for t in tables)


def test_teacher_forced_contextual_scores_bfloat16_vs_float32(smol, smol_bf16, samples):
    worst, means = 0.0, []
    for s in samples:
        answer = decode(smol, prefill(smol, s.input_ids), max_new_tokens=32)
        tokens = torch.cat([s.input_ids, torch.tensor(answer.tokens, dtype=torch.long)])
        assert answer.tokens, "the baseline answer is empty: nothing to score"
        a = contextual_scores(smol, tokens, s.n_tokens, s.named_spans())
        b = contextual_scores(smol_bf16, tokens, s.n_tokens, s.named_spans())
        diff = torch.stack([(a[k] - b[k]).abs() for k in a])
        worst, means = max(worst, float(diff.max())), [*means, float(diff.mean())]
        assert float(diff.max()) > 0, "bfloat16 gave float32's scores: the model did not run in bfloat16"
    assert worst < SCORE_BOUND, f"largest |bf16 - fp32| contextual score {worst:.4f}"
    assert max(means) < MEAN_BOUND, f"mean |bf16 - fp32| contextual score {max(means):.5f}"


def _mixed(model, sample, ranked):
    dirs = {"gold-post": FocusDirections.load(DIRECTIONS, model=model)}
    conditions = [Condition.baseline(), *[Condition.split(t, "contextual", 20) for t in (0.1, 0.6, 1000.0)],
                  Condition.split(0.1, "random", 20, seed=0), Condition.focus(0.5, "gold-post", "contextual", 5),
                  Condition.focus(1.0, "gold-post", "random", 5, seed=0), Condition.ablate("contextual", 20),
                  Condition.reweight("odds", 0.01, "contextual", 20), Condition.reweight("boost", 19, "contextual", 20)]
    st = StudySample(sample)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    planned = [(c, c.head_set({"contextual": ranked}, L, H)) for c in conditions]
    return st, dirs, planned


def test_greedy_em_batched_vs_sequential_in_bfloat16(smol_bf16):
    """Greedy answers in bfloat16, the batched engine vs the bridge's hooks, over a mixed set of
    conditions on two 10-document test prompts (20 rows): the same EM on >= 95% of rows (answer
    texts may part after a near tie; the share agreeing is in the failure message, and
    benchmarks/bench_sweep.py reports both on 20-document prompts)."""
    model = smol_bf16
    samples = fdlib.NQBuilder(model.tokenizer).samples(split="test", size=2, n_docs=10)
    ranked = fdlib.top_heads(fdlib.score_sample(model, samples[0]).kinds["relevant"], 50)
    same_em = same_text = n = 0
    for s in samples:
        st, dirs, planned = _mixed(model, s, ranked)
        prefix = prefill(model, s.input_ids)
        rows = [c.row(heads, st.spans(), dirs) for c, heads in planned]
        batched = decode_batch(model, prefix, rows, spans=st.spans(), max_new_tokens=32)
        for (c, heads), got in zip(planned, batched):
            ref = decode_sequential(model, st, prefix, c, heads, directions=dirs, max_new_tokens=32)
            same_em += st.score(got.text) == st.score(ref.text)
            same_text += got.text == ref.text
            n += 1
    print(f"bfloat16 batched vs sequential: same EM on {same_em}/{n} rows, same text on {same_text}/{n}")
    assert same_em / n >= 0.95, f"same EM on {same_em}/{n} rows (same text on {same_text}/{n})"
