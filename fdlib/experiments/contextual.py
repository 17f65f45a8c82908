"""Contextual-head studies: the same questions scored as a long input and as a gold-only input
(the paper's Table 1 and the head ranking every later study intervenes on), and the paper's
Table 3 (the four kinds of score without and with focus directions), each one `run_study`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.study.conditions import Condition
from fdlib.data.nq import NQBuilder, QASample
from fdlib.interventions.directions import FocusDirections
from fdlib.study.scores import SampleScores, em_summary, frame_scores, head_table, mean_scores, top_heads
from fdlib.core.store import Store, open_store
from fdlib.study.runner import run_study


def score_dataset(
    model: TransformerBridge,
    samples: Sequence[QASample],
    *,
    store: str | Path | Store | None = None,
    max_new_tokens: int = 32,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> list[SampleScores]:
    """Score every sample (its greedy answer, no intervention): `fdlib.study.runner.run_study` with the
    baseline of each input variant, so stored rows are reused and a crash loses at most one
    sample. The samples of another shard, or missing from a read-only store, are left out."""
    conditions = [Condition.baseline(v) for v in dict.fromkeys(s.variant for s in samples)]
    frame = run_study(model, samples, conditions, store=store, max_new_tokens=max_new_tokens, progress=progress,
                      desc="scoring samples", shard=shard)
    held = set(frame["sample_id"]) if not frame.empty else set()
    return frame_scores(model, frame, [s for s in samples if s.id in held])


def focus_table(
    model: TransformerBridge,
    samples: Sequence[QASample],
    directions: FocusDirections,
    heads: Sequence[tuple[int, int]],
    alpha: float,
    *,
    report: Sequence[tuple[int, int]] | None = None,
    store: str | Path | Store | None = None,
    max_new_tokens: int = 32,
    level: float = 0.95,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> pd.DataFrame:
    """The paper's Table 3: R, IR, IR-max and Sink of the `report` heads (default: `heads`)
    without and with directions on `heads` at `alpha` (answer rows), per input variant of
    `samples` (long and gold-only cases), with bootstrap CIs and EM: one `run_study`."""
    report = list(report) if report is not None else list(heads)
    variants = list(dict.fromkeys(s.variant for s in samples))
    pairs = {v: (Condition.baseline(v), Condition.focus(alpha, "focus", list(heads), input=v)) for v in variants}
    frame = run_study(model, samples, [c for pair in pairs.values() for c in pair], directions={"focus": directions},
                      store=store, max_new_tokens=max_new_tokens, progress=progress, desc="focus table", shard=shard)
    parts = []
    held = set(frame["sample_id"]) if not frame.empty else set()  # this shard's, or a results file's
    for v, (plain, steered) in pairs.items():
        these = [s for s in samples if s.variant == v and s.id in held]
        if not these:
            continue
        for name, c in (("without", plain), (f"alpha={alpha:g}", steered)):
            results = frame_scores(model, frame, these, c.key)
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
        kw = dict(store=db, max_new_tokens=max_new_tokens, shard=shard, progress=progress)
        long_scores = score_dataset(model, long, **kw)
        gold_scores = score_dataset(model, gold, **kw)
    return ContextualStudy(long_scores, gold_scores, n_docs)
