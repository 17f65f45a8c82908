"""Contextual scores: how much each head attends to a span from the response rows.

S_X = 1/|R| sum_{i in R} sum_{j in X} W_ij, per layer and query head, R the response rows.
The teacher-forced form (`contextual_scores`) and the generation form (`score_sample`, scored
while decoding) share one recorder (`decoding.SpanRecorder`). The four kinds (relevant,
irrelevant, IR-max, sink), their per-sample record and the per-head tables live here; the
studies that produce them at scale are in `fdlib.experiments.contextual`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import head_label
from fdlib.core.metrics import best_subspan_em, bootstrap_ci
from fdlib.core.spans import Span, check_spans
from fdlib.data.nq import QASample
from fdlib.model.arch import check_supported
from fdlib.model.decoding import Answer, SpanRecorder, _as_ids, check_length, decode, hooks, prefill

KINDS = ("relevant", "irrelevant", "irmax", "sink")
# Kinds stored where recorded (rows made before they were recorded lack them): `sink2`, the
# attention on tokens 0-1, the sink of the authors' code (`sink` is token 0).
EXTRA_KINDS = ("sink2",)
KIND_LABELS = {"relevant": "R", "irrelevant": "IR", "irmax": "IR-max", "sink": "Sink", "sink2": "Sink 0-1"}


@torch.no_grad()  # not inference_mode: the cache buffers must stay writable afterwards
def contextual_scores(
    model: TransformerBridge,
    tokens: Tensor | Sequence[int],
    response_start: int,
    spans: dict[str, Span],
) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
    """Teacher-forced scores of `tokens` = prompt + response, response rows `[response_start, T)`.

    The prompt's KV cache comes from the fast prefill; only the response rows run through the
    bridge's hooked attention, so no T x T pattern is ever materialised for the prompt rows.
    """
    ids = _as_ids(tokens)
    T = int(ids.shape[0])
    if isinstance(response_start, bool) or not isinstance(response_start, int) or not 0 < response_start < T:
        raise ValueError(
            f"response_start must be in [1, {T - 1}] for a sequence of length {T}, got {response_start!r}"
        )
    check_spans(spans, T)
    check_length(model, T)
    check_supported(model, "scores")
    prefix = prefill(model, ids[: response_start + 1])  # cache holds [0, response_start)
    recorder = SpanRecorder(spans, from_pos=response_start, n_layers=model.cfg.n_layers)
    with hooks(model, recorder.fwd_hooks()):
        model(ids[None, response_start:].to(model.cfg.device), past_key_values=prefix.cache, return_type=None)
    return recorder.mean()


def kind_scores(
    doc_scores: Float[Tensor, "n_docs n_layers n_heads"],
    gold_index: int | None,
    sink: Float[Tensor, "n_layers n_heads"],
) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
    """The four kinds from per-document scores. Undefined kinds are NaN: relevant without a
    gold document (negative input), IR-max without an irrelevant one (gold-only input)."""
    nan = torch.full_like(sink, float("nan"))
    n = doc_scores.shape[0]
    others = [i for i in range(n) if i != gold_index]
    irr = doc_scores[others]
    return {
        "relevant": doc_scores[gold_index] if gold_index is not None else nan,
        "irrelevant": irr.sum(0) if others else torch.zeros_like(sink),
        "irmax": irr.max(0).values if others else nan,
        "sink": sink,
    }


@dataclass(frozen=True)
class SampleScores:
    """One sample's greedy answer, its EM, and the four kinds of score."""

    sample_id: str
    variant: str
    answer: str
    em: bool
    kinds: dict[str, Float[Tensor, "n_layers n_heads"]]


def answer_scores(model: TransformerBridge, sample: QASample, answer: Answer) -> SampleScores:
    """The four kinds of score from an answer decoded with `spans=sample.named_spans()`."""
    n_docs = len(sample.doc_spans)
    if answer.scores:
        docs = torch.stack([answer.scores[f"doc{i}"] for i in range(n_docs)])
        kinds = kind_scores(docs, sample.gold_index, answer.scores["sink"])
    else:  # empty answer: no response row to score
        nan = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))
        kinds = {k: nan for k in KINDS}
    return SampleScores(sample.id, sample.variant, answer.text, best_subspan_em(answer.text, sample.answers), kinds)


def score_sample(model: TransformerBridge, sample: QASample, *, max_new_tokens: int = 32) -> SampleScores:
    """Greedy answer with the KV cache, scoring the response rows as they are produced."""
    answer = decode(model, prefill(model, sample.input_ids), max_new_tokens=max_new_tokens, spans=sample.named_spans())
    return answer_scores(model, sample, answer)


def frame_scores(
    model: TransformerBridge, frame: pd.DataFrame, samples: Sequence[QASample], condition: str | None = None
) -> list[SampleScores]:
    """`SampleScores` of `samples` (in their order) read off a study frame: the row of each
    sample under `condition` (a key; default: the baseline of the sample's variant). A kind the
    prompt does not define (relevant without gold, IR-max without irrelevant documents) is NaN."""
    by_key = {(r.sample_id, r.condition): r for r in frame.itertuples()}
    nan = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))
    out = []
    for sample in samples:
        r = by_key[(sample.id, condition or f"baseline|{sample.variant}")]
        kinds = {}
        for k in KINDS + EXTRA_KINDS:
            a = getattr(r, f"{k}_score", None)
            if a is not None or k in KINDS:
                kinds[k] = torch.from_numpy(np.asarray(a)) if a is not None else nan
        out.append(SampleScores(sample.id, sample.variant, r.answer, bool(r.score), kinds))
    return out


def stack_kind(results: Sequence[SampleScores], kind: str) -> Float[Tensor, "sample n_layers n_heads"]:
    if kind not in KINDS + EXTRA_KINDS:
        raise ValueError(f"unknown score kind {kind!r}: expected one of {KINDS + EXTRA_KINDS}")
    if not results:
        raise ValueError("no results to aggregate")
    return torch.stack([r.kinds[kind] for r in results])


def mean_scores(results: Sequence[SampleScores], kind: str = "relevant") -> Float[Tensor, "n_layers n_heads"]:
    """Mean over samples (NaN-aware: samples where the kind is undefined are left out)."""
    return torch.nanmean(stack_kind(results, kind), dim=0)


def top_heads(scores: Float[Tensor, "n_layers n_heads"], k: int) -> list[tuple[int, int]]:
    """The k heads with the highest score, best first, as (layer, head)."""
    n_layers, n_heads = scores.shape
    if not 1 <= k <= n_layers * n_heads:
        raise ValueError(f"k must be in [1, {n_layers * n_heads}], got {k}")
    flat = torch.nan_to_num(scores.flatten(), nan=-float("inf"))
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    return [(int(i) // n_heads, int(i) % n_heads) for i in order]


def heads_above(scores: Float[Tensor, "n_layers n_heads"], thresholds: Iterable[float] = (0.2, 0.1, 0.05)) -> dict[float, int]:
    """How many heads score above each threshold (the paper's sparsity count)."""
    return {t: int((scores > t).sum()) for t in thresholds}


def head_table(
    results: Sequence[SampleScores],
    heads: Sequence[tuple[int, int]],
    *,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per head: mean R, IR, IR-max, Sink over samples with bootstrap CIs (the paper's Table 1),
    and Sink 0-1 where every sample has it."""
    rows = []
    kinds = KINDS + tuple(k for k in EXTRA_KINDS if results and all(k in r.kinds for r in results))
    stacks = {k: stack_kind(results, k) for k in kinds}
    for layer, head in heads:
        row: dict[str, object] = {"head": head_label(layer, head)}
        for kind in kinds:
            mean, lo, hi = bootstrap_ci(stacks[kind][:, layer, head].numpy(), level=level)
            label = KIND_LABELS[kind]
            row[label], row[f"{label} lo"], row[f"{label} hi"] = mean, lo, hi
        rows.append(row)
    return pd.DataFrame(rows).set_index("head")


def em_summary(results: Sequence[SampleScores], *, level: float = 0.95) -> dict[str, float]:
    """EM mean and bootstrap CI over samples."""
    mean, lo, hi = bootstrap_ci(np.array([r.em for r in results], dtype=float), level=level)
    return {"em": mean, "lo": lo, "hi": hi, "n": len(results)}
