"""Retrieval heads (Wu et al., 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality"): heads that copy the needle into the answer.

While the model answers a needle question greedily, a head *copies and pastes* at a decoding step
when its most-attended key position (the argmax of its attention row) lies inside the needle and
holds the very token generated at that step. Each such step adds 1/|needle tokens| to the head's
score; a sample's score is the sum over its steps, and a head's retrieval score is the mean over
the samples whose answer recovers the needle (ROUGE-1 recall of the gold answer > 0.5).

Alignment with `fdlib.model.decoding.decode`: decode's first forward runs the last prompt token (row
len(prompt) - 1), whose logits give answer token 0; the row of answer token i - 1 gives answer
token i. So the c-th forward's attention row is paired with answer token c; the forwards that
produce no answer token (the row that predicted a stop token, or the extra row run after the
last of `max_new_tokens`) are dropped.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.metrics import normalize_answer
from fdlib.core.spans import Span
from fdlib.model.arch import check_supported
from fdlib.model.decoding import _as_ids, decode, prefill
from fdlib.study.scores import top_heads

ROUGE_THRESHOLD = 0.5  # Wu et al. keep a sample when the answer's ROUGE-1 recall is above 50%


def rouge1_recall(reference: str, prediction: str) -> float:
    """Share of the reference's normalised words (with multiplicity) found in the prediction.

    Words are SQuAD-normalised (lower case, no punctuation or articles); an empty reference
    is a ValueError (recall is undefined).
    """
    ref = Counter(normalize_answer(reference).split())
    if not ref:
        raise ValueError(f"reference {reference!r} has no word after normalisation")
    pred = Counter(normalize_answer(prediction).split())
    return sum((ref & pred).values()) / sum(ref.values())


def recovers_needle(prediction: str, answers: Sequence[str], threshold: float = ROUGE_THRESHOLD) -> bool:
    """True when some gold answer's ROUGE-1 recall in the prediction is above `threshold`."""
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty sequence of strings")
    return max(rouge1_recall(a, prediction) for a in answers) > threshold


def attended_positions(pattern: Float[Tensor, "*rows key_pos"]) -> Int[Tensor, "*rows"]:
    """The most-attended key position of each attention row (the first one on a tie)."""
    return pattern.argmax(dim=-1)


def copy_paste_scores(
    attended: Int[Tensor, "step n_layers n_heads"],
    generated: Sequence[int] | Int[Tensor, " step"],
    input_ids: Sequence[int] | Int[Tensor, " pos"],
    span: Span,
) -> Float[Tensor, "n_layers n_heads"]:
    """One sample's retrieval score per head: the number of steps at which the head's attended
    position lies in `span` and holds the token generated at that step, divided by |span|.

    `attended[c]` comes from the row that produced `generated[c]`. `input_ids` is the prompt:
    a position past it (an answer token) is never in the span.
    """
    gen = torch.as_tensor(generated, dtype=torch.long)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    attended = torch.as_tensor(attended, dtype=torch.long)
    if attended.ndim != 3 or attended.shape[0] != gen.shape[0]:
        raise ValueError(
            f"attended must be [step, n_layers, n_heads] with one step per generated token "
            f"({gen.shape[0]}), got shape {tuple(attended.shape)}"
        )
    span.check(ids.shape[0])
    in_span = (attended >= span.start) & (attended < span.end)
    # Tokens at the attended positions (clamped: positions outside the span are masked anyway).
    held = ids[attended.clamp(0, ids.shape[0] - 1)]
    copies = in_span & (held == gen[:, None, None])
    return copies.sum(dim=0).float() / len(span)


class ArgmaxRecorder:
    """Hooks on every layer's `hook_pattern` keeping, per forward, each head's attended position
    in the last query row (decode runs one row per forward; the last row makes the logits)."""

    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self._rows: list[list[Tensor]] = [[] for _ in range(n_layers)]

    def hook(self, layer: int):
        def record(pattern: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> None:
            self._rows[layer].append(attended_positions(pattern[0, :, -1, :]).cpu())

        return record

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        return [(f"blocks.{l}.attn.hook_pattern", self.hook(l)) for l in range(self.n_layers)]

    def attended(self, n_steps: int) -> Int[Tensor, "step n_layers n_heads"]:
        """The first n_steps forwards' positions (the rest produced no answer token)."""
        if any(len(rows) < n_steps for rows in self._rows):
            raise ValueError(f"recorded {min(len(r) for r in self._rows)} forwards, fewer than {n_steps} answer tokens")
        return torch.stack([torch.stack(rows[:n_steps]) for rows in self._rows], dim=1)


@dataclass(frozen=True)
class SampleRetrieval:
    """One needle sample: the greedy answer, whether it recovers the needle, its head scores."""

    sample_id: str
    answer: str
    recall: float  # best ROUGE-1 recall of a gold answer in the answer
    used: bool
    scores: Float[Tensor, "n_layers n_heads"]


@dataclass(frozen=True)
class RetrievalResult:
    """Per-sample results and the retrieval score of each head (mean over the used samples;
    NaN everywhere when no answer recovered its needle)."""

    samples: tuple[SampleRetrieval, ...]
    scores: Float[Tensor, "n_layers n_heads"]

    @property
    def n_used(self) -> int:
        return sum(s.used for s in self.samples)

    def heads(self, k: int) -> list[tuple[int, int]]:
        return top_heads(self.scores, k)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (NaN as null) that `from_json` reads back exactly (float32 values)."""
        def listed(t: Tensor) -> list:
            return [[None if math.isnan(x) else x for x in row] for row in t.float().tolist()]

        return {"samples": [{"sample_id": s.sample_id, "answer": s.answer, "recall": s.recall, "used": s.used,
                             "scores": listed(s.scores)} for s in self.samples],
                "scores": listed(self.scores)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RetrievalResult":
        def tensor(rows: list) -> Tensor:
            return torch.tensor([[math.nan if x is None else x for x in row] for row in rows], dtype=torch.float32)

        samples = tuple(SampleRetrieval(d["sample_id"], d["answer"], float(d["recall"]), bool(d["used"]),
                                        tensor(d["scores"])) for d in data["samples"])
        return cls(samples, tensor(data["scores"]))


def _needle_span(sample: Any) -> Span:
    span = getattr(sample, "relevant_span", None)
    if span is None:
        span = getattr(sample, "gold_span", None)
    if not isinstance(span, Span):
        raise TypeError(f"sample {getattr(sample, 'id', '?')!r} has no relevant_span (or gold_span) to score")
    return span


def sample_retrieval(model: TransformerBridge, sample: Any, *, max_new_tokens: int = 32) -> SampleRetrieval:
    """Greedy answer to one needle sample (`input_ids`, `relevant_span`, `answers`), scored."""
    ids = _as_ids(sample.input_ids)
    span = _needle_span(sample)
    check_supported(model, "retrieval")
    recorder = ArgmaxRecorder(model.cfg.n_layers)
    answer = decode(model, prefill(model, ids), max_new_tokens=max_new_tokens, extra_hooks=recorder.fwd_hooks())
    n = len(answer.tokens)
    if n:
        scores = copy_paste_scores(recorder.attended(n), answer.tokens, ids, span)
    else:
        scores = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    recall = max(rouge1_recall(a, answer.text) for a in sample.answers)
    return SampleRetrieval(str(getattr(sample, "id", "")), answer.text, recall, recall > ROUGE_THRESHOLD, scores)


def retrieval_heads(
    model: TransformerBridge, samples: Sequence[Any], *, max_new_tokens: int = 32, progress: bool = True
) -> RetrievalResult:
    """Retrieval scores of every head over needle samples (e.g. `fdlib.data.tasks.needle_task`)."""
    if not samples:
        raise ValueError("no samples to score")
    results = tuple(
        sample_retrieval(model, s, max_new_tokens=max_new_tokens)
        for s in tqdm(samples, desc="retrieval heads", disable=not progress)
    )
    used = [r.scores for r in results if r.used]
    if used:
        scores = torch.stack(used).mean(dim=0)
    else:
        scores = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))
    return RetrievalResult(results, scores)


def retrieval_scores(
    model: TransformerBridge, samples: Sequence[Any], *, max_new_tokens: int = 32, progress: bool = True
) -> Float[Tensor, "n_layers n_heads"]:
    """Each head's retrieval score: `retrieval_heads(...).scores`."""
    return retrieval_heads(model, samples, max_new_tokens=max_new_tokens, progress=progress).scores


def top_retrieval_heads(scores: Float[Tensor, "n_layers n_heads"], k: int) -> list[tuple[int, int]]:
    """The k heads with the highest retrieval score, best first, as (layer, head)."""
    return top_heads(scores, k)
