"""Contextual-head studies: the same questions scored as a long input and as a gold-only input
(the paper's Table 1 and the head ranking every later study intervenes on), and the paper's
Table 3 (the four kinds of score without and with focus directions): their conditions for
`fdlib.study.runner.run_study` and the tables read from its frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head
from fdlib.core.store import Store, open_store
from fdlib.data.nq import NQBuilder, QASample
from fdlib.study.conditions import Condition, Rows
from fdlib.study.runner import run_study
from fdlib.study.scores import SampleScores, em_summary, frame_scores, head_table, mean_scores, top_heads


def scored(model: TransformerBridge, frame: pd.DataFrame, samples: Sequence[QASample],
           condition: str | None = None) -> list[SampleScores]:
    """`frame_scores` of the samples the frame holds (those of this shard, or of a read-only
    store's rows), in the order of `samples`."""
    held = set(frame["sample_id"]) if not frame.empty else set()
    return frame_scores(model, frame, [s for s in samples if s.id in held], condition)


def table3_conditions(samples: Sequence[QASample], alpha: float, heads: Sequence[Head], *,
                      rows: Rows = "response") -> list[Condition]:
    """The paper's Table 3 runs: per input variant of `samples`, the baseline and focus directions
    (the set named "focus") at `alpha` on `heads`, on the answer rows (`rows="response"`) or on
    every row (`"all"`, the authors' placement)."""
    return [c for v in dict.fromkeys(s.variant for s in samples) for c in _table3_pair(v, alpha, heads, rows)]


def _table3_pair(variant: str, alpha: float, heads: Sequence[Head], rows: Rows = "response") -> tuple[Condition, Condition]:
    """One input variant's Table 3 conditions: without, and with the directions."""
    return Condition.baseline(variant), Condition.focus(alpha, "focus", list(heads), input=variant, rows=rows)


def focus_table(
    model: TransformerBridge,
    frame: pd.DataFrame,
    samples: Sequence[QASample],
    alpha: float,
    heads: Sequence[Head],
    *,
    report: Sequence[Head] | None = None,
    rows: Rows = "response",
    level: float = 0.95,
) -> pd.DataFrame:
    """The paper's Table 3 from the frame of `table3_conditions` (the same `rows`): R, IR, IR-max
    and Sink (token 0; and Sink 0-1 where recorded) of the `report` heads (default: `heads`)
    without and with the directions, per input variant of `samples` (long and gold-only cases),
    with bootstrap CIs, EM and n."""
    report = list(report) if report is not None else list(heads)
    parts = []
    for v in dict.fromkeys(s.variant for s in samples):
        these = [s for s in samples if s.variant == v]
        plain, steered = _table3_pair(v, alpha, heads, rows)
        for name, c in (("without", plain), (f"alpha={alpha:g}", steered)):
            results = scored(model, frame, these, c.key)
            if not results:
                continue
            t = head_table(results, report, level=level).reset_index()
            t.insert(1, "EM", sum(r.em for r in results) / len(results))
            t.insert(1, "n", len(results))
            t.insert(0, "directions", name)
            t.insert(0, "case", v)
            parts.append(t)
    return pd.concat(parts, ignore_index=True).set_index(["case", "directions", "head"])


@dataclass(frozen=True)
class ContextualStudy:
    """Scores of the same questions as a long (k-document) input and as a gold-only input."""

    long: list[SampleScores]
    gold: list[SampleScores]
    n_docs: int

    def relevant(self) -> Float[Tensor, "n_layers n_heads"]:
        """Mean relevant-document score on the long input: what ranks the contextual heads."""
        return mean_scores(self.long, "relevant")

    def heads(self, k: int) -> list[tuple[int, int]]:
        return top_heads(self.relevant(), k)

    def cases(self) -> dict[str, list[SampleScores]]:
        """The paper's Table 1 cases: Long, Gold, and the long inputs answered correctly / wrongly."""
        return {
            "Long": self.long,
            "Gold": self.gold,
            "Correct": [r for r in self.long if r.em],
            "Wrong": [r for r in self.long if not r.em],
        }

    def table(self, k: int = 5, *, level: float = 0.95) -> pd.DataFrame:
        """Top-k heads' R, IR, IR-max, Sink per case, with bootstrap CIs (the paper's Table 1)."""
        heads = self.heads(k)
        parts = []
        for case, results in self.cases().items():
            if not results:
                continue  # e.g. no correct answer in a tiny run: the case has no row
            t = head_table(results, heads, level=level)
            t.insert(0, "n", len(results))
            t.insert(0, "case", case)
            parts.append(t.reset_index())
        return pd.concat(parts, ignore_index=True).set_index(["case", "head"])

    def em(self, *, level: float = 0.95) -> pd.DataFrame:
        """Greedy EM with CIs for the long and gold-only inputs."""
        rows = {f"{self.n_docs} documents": em_summary(self.long, level=level), "gold only": em_summary(self.gold, level=level)}
        return pd.DataFrame(rows).T


def contextual_study(
    model: TransformerBridge,
    *,
    size: str | int = "quick",
    split: str = "train",
    n_docs: int = 20,
    gold_position: int | None = None,
    store: str | Path | Store | None = None,
    max_new_tokens: int = 32,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> ContextualStudy:
    """Score the same questions with k documents (gold in the middle by default) and gold-only.

    The default split is `train`: the heads found here are the ones later studies intervene on,
    and they are evaluated on `test`.
    """
    builder = NQBuilder(model.tokenizer)
    kw = dict(split=split, size=size)
    long = builder.samples(n_docs=n_docs, gold_position=gold_position, **kw)
    gold = builder.samples(variant="gold", **kw)
    with open_store(store) as db:
        kw = dict(store=db, max_new_tokens=max_new_tokens, shard=shard, progress=progress, desc="scoring samples")
        frames = [run_study(model, samples, [Condition.baseline(samples[0].variant)], **kw) for samples in (long, gold)]
    return ContextualStudy(scored(model, frames[0], long), scored(model, frames[1], gold), n_docs)


def committed_ranking(
    model: TransformerBridge,
    store: str | Path | Store,
    *,
    size: str | int = "quick",
    split: str = "train",
    n_docs: int = 20,
    gold_position: int | None = None,
) -> tuple[list[Head], str]:
    """Every head ranked by its mean relevant score on the long inputs of `contextual_study`'s
    questions (the same ranking as `ContextualStudy.heads`), read from rows already stored, in
    whatever dtype they were made: a study in another dtype then intervenes on the heads the
    committed ranking chose (a setting chosen on train questions), not on its own re-ranking.
    Returns the ranking and the rows' dtype; raises when a question's row is missing or the
    rows were made by another model."""
    from fdlib.model.loading import model_name
    from fdlib.study.runner import study_frame

    long = NQBuilder(model.tokenizer).samples(split=split, size=size, n_docs=n_docs, gold_position=gold_position)
    frame = study_frame(store, [Condition.baseline("long")], samples=long)
    missing = sorted({s.id for s in long} - set(frame.get("sample_id", [])))
    if missing:
        raise ValueError(f"{store}: no stored long-input row for {len(missing)} of {len(long)} questions "
                         f"(e.g. {missing[:3]}): run contextual_study there first")
    if set(frame.model) != {model_name(model)}:
        raise ValueError(f"{store}: rows made by {sorted(set(frame.model))}, not by {model_name(model)!r}")
    dtypes = sorted(set(frame.dtype))
    if len(dtypes) != 1:
        raise ValueError(f"{store}: the long-input rows mix dtypes {dtypes}")
    by_id = dict(zip(frame.sample_id, frame.relevant_score))  # in the questions' order, as `mean_scores` sums
    scores = torch.nanmean(torch.stack([torch.from_numpy(np.asarray(by_id[s.id])) for s in long]), 0)
    n = model.cfg.n_layers * model.cfg.n_heads
    return top_heads(scores, n), dtypes[0]
