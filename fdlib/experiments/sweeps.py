"""The paper's split-softmax and focus-direction grids (Figures 3 and 4) on NQ: the grids as
`Condition`s, one call of `fdlib.study.runner.run_study` per sweep, EM tables with bootstrap CIs and
paired tests. Per question: one prefill per input variant (long, gold-only, negative), every
condition decoded from that shared cache in batches; one transaction per question.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head
from fdlib.core.metrics import best_subspan_em, bootstrap_ci, question_id
from fdlib.data.nq import NQBuilder, QASample, Size
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import decode_batch
from fdlib.interventions.row import RowIntervention
from fdlib.model.decoding import prefill
from fdlib.study.conditions import Condition, Rows, baselines, focus_conditions, reweight_conditions

# The paper's grid; `quick` is a handful of configurations CI can run.
GRIDS: dict[str, dict] = {
    "quick": dict(taus=(0.1, 1000.0), ks=(5, 20), seeds=(0,)),
    "full": dict(taus=(0.1, 0.3, 0.6, 1.5, 1000.0), ks=(1, 5, 10, 20, 30, 50, 100, 150, 200), seeds=(0, 1, 2)),
}
GRIDS["paper"] = GRIDS["full"]  # the paper's Figure 3 grid; `paper` differs from `full` in questions only


def split_grid(
    size: Size = "quick",
    *,
    n_total_heads: int | None = None,
    taus: Sequence[float] | None = None,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Condition]:
    """Baselines + tau x k x (contextual, random per seed). `n_total_heads` adds k = all heads
    (at `full`) and drops larger k. A count as `size` takes the `quick` grid."""
    g = GRIDS[size] if isinstance(size, str) else GRIDS["quick"]
    taus = g["taus"] if taus is None else taus
    ks = list(g["ks"] if ks is None else ks)
    seeds = g["seeds"] if seeds is None else seeds
    if n_total_heads is not None:
        ks = sorted({k for k in ks if k <= n_total_heads} | ({n_total_heads} if size in ("full", "paper") else set()))
    return baselines() + reweight_conditions(taus, ks, seeds=seeds, n_total_heads=n_total_heads)


# The paper's alpha x k study (alpha = 0 is the long baseline: the identity).
FOCUS_GRIDS: dict[str, dict] = {
    "quick": dict(alphas=(0.5,), ks=(5,), seeds=(0,)),
    "full": dict(alphas=(-0.5, -0.2, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0), ks=(1, 5, 10, 20, 50, 100), seeds=(0,)),
}
FOCUS_GRIDS["paper"] = FOCUS_GRIDS["full"]


def focus_grid(
    size: Size = "quick",
    *,
    directions: str,
    alphas: Sequence[float] | None = None,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    random_alphas: Sequence[float] | None = None,
    random_ks: Sequence[int] | None = None,
    rows: Rows = "response",
    with_baselines: bool = True,
) -> list[Condition]:
    """(Baselines +) alpha x k x (contextual, random per seed) for one named directions set.
    `random_alphas` / `random_ks` restrict the random-head controls (default: all)."""
    g = FOCUS_GRIDS[size] if isinstance(size, str) else FOCUS_GRIDS["quick"]
    grid = focus_conditions(g["alphas"] if alphas is None else alphas, g["ks"] if ks is None else ks,
                       directions=directions, seeds=g["seeds"] if seeds is None else seeds,
                       random_alphas=random_alphas, random_ks=random_ks, rows=rows)
    return (baselines() if with_baselines else []) + grid


# The paper's focus-direction evaluation: the gold document at each of these positions among 20,
# 100 new tokens, directions on every row (the authors' placement) on the release's k = 20 heads.
PAPER_POSITIONS: tuple[int, ...] = (1, 5, 10, 15, 20)
PAPER_NEW_TOKENS = 100
# The alpha curve (rows="all": one prefill per condition and prompt): from alpha < 0 on past the
# paper's overshoot (alpha = 1 on its directions), random heads at a few alphas.
ALPHA_CURVES: dict[str, dict] = {
    "quick": dict(alphas=(0.3,), random_alphas=(0.3,), k=20),
    "paper": dict(alphas=(-0.5, -0.2, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0), random_alphas=(0.3, 1.0), k=20),
}
ALPHA_CURVES["full"] = ALPHA_CURVES["paper"]


def alpha_curve(size: Size = "quick", *, directions: str, alphas: Sequence[float] | None = None,
                random_alphas: Sequence[float] | None = None, k: int | None = None,
                seeds: Sequence[int] = (0,)) -> list[Condition]:
    """The long baseline, then focus directions at each alpha on every row (`rows="all"`) of the
    top-k contextual heads, and on k random heads (per seed) at `random_alphas`."""
    g = ALPHA_CURVES[size] if isinstance(size, str) else ALPHA_CURVES["quick"]
    return [Condition.baseline()] + focus_conditions(
        g["alphas"] if alphas is None else alphas, (g["k"] if k is None else k,), directions=directions, seeds=seeds,
        random_alphas=g["random_alphas"] if random_alphas is None else random_alphas, rows="all")


@dataclass(frozen=True)
class QuestionInputs:
    """The three variants of one question; `long` holds the gold span the intervention uses."""

    long: QASample
    gold: QASample
    negative: QASample

    @property
    def id(self) -> str:
        return question_id(self.long.id)

    def get(self, variant: str) -> QASample:
        return getattr(self, variant)

    def samples(self) -> list[QASample]:
        return [self.long, self.gold, self.negative]


def question_inputs(
    model: TransformerBridge,
    *,
    split: str = "test",
    size: Size | int = "quick",
    n_docs: int = 20,
    gold_position: int | Sequence[int] | None = None,
) -> list[QuestionInputs]:
    """Per question its long (gold at `gold_position`: one, or a sequence rotated over the
    questions), gold-only and negative prompts."""
    b = NQBuilder(model.tokenizer)
    kw = dict(split=split, size=size)
    long = b.samples(n_docs=n_docs, gold_position=gold_position, **kw)
    gold = b.samples(variant="gold", **kw)
    neg = b.samples(variant="negative", n_docs=n_docs, **kw)
    return [QuestionInputs(*t) for t in zip(long, gold, neg, strict=True)]


def sweep_samples(questions: Sequence[QuestionInputs], conditions: Sequence[Condition]) -> list[QASample]:
    """The questions' prompts of the input variants the conditions decode, for `run_study` (whose
    `group` column then names each row's question: sharding, pooling and pairing go by it)."""
    wanted = {c.input for c in conditions}
    return [s for q in questions for s in q.samples() if s.variant in wanted]


def em_table(frame: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """EM with bootstrap CIs per condition; random-head seeds are pooled per (method, value, k).
    `tau` / `alpha` columns carry the value of split-softmax / focus conditions (for plots).
    A prompt's EM is its mean over seeds; `em` is the mean over prompts, `n` the prompts and
    `n_questions` the questions (`question_id` of `sample_id`). The interval resamples questions:
    a question with several prompts (e.g. gold positions) is drawn with all of them; with one
    prompt per question it is the plain bootstrap over prompts."""
    from fdlib.core.metrics import question_ids

    f = frame.copy()
    for col, fill in (("heads", "none"), ("directions", "none"), ("rows", "response")):
        f[col] = f[col].fillna(fill)
    for col in ("value", "k"):
        f[col] = f[col].astype(float)
    f["_question"] = question_ids(f["sample_id"])
    keys = ["method", "input", "heads", "directions", "rows", "value", "k"]
    rows = []
    for vals, g in f.groupby(keys, dropna=False):
        # pool seeds: a prompt's EM is its mean over seeds, so each prompt counts once; sorted by question
        per_p = g.groupby(["_question", "sample_id"])["em"].mean()
        questions = per_p.index.get_level_values("_question").to_numpy(dtype=object)
        mean, lo, hi = bootstrap_ci(per_p.to_numpy(dtype=float), level=level, groups=questions)
        rows.append({**dict(zip(keys, vals)), "em": mean, "lo": lo, "hi": hi, "n": len(per_p),
                     "n_questions": len(set(questions))})
    out = pd.DataFrame(rows)
    out["tau"] = np.where(out["method"] == "split", out["value"], np.nan)
    out["alpha"] = np.where(out["method"] == "focus", out["value"], np.nan)
    order = ["method", "heads", "directions", "rows", "value", "k"]
    return out.sort_values(order, na_position="first").reset_index(drop=True)


def attention_per_document(
    model: TransformerBridge,
    sample: QASample,
    head: Head,
    condition: Condition,
    *,
    directions: Mapping[str, FocusDirections] | None = None,
    rankings: Mapping[str, Sequence[Head]] | None = None,
    max_new_tokens: int = 32,
) -> dict[str, object]:
    """One head's attention mass on each document, from the answer rows, without and with a
    condition (answer rows), both decoded in one batch from one prefill."""
    if sample.gold_span is None:
        raise ValueError(f"sample {sample.id} has no gold document")
    if condition.rows != "response":
        raise ValueError(f"the two answers share one prefill: rows must be 'response', got {condition.rows!r}")
    spans = {f"doc{i}": s for i, s in enumerate(sample.doc_spans)}
    heads = condition.head_set(dict(rankings or {}), model.cfg.n_layers, model.cfg.n_heads)
    row = condition.row(heads, sample.named_spans(), dict(directions or {}))
    before, after = decode_batch(model, prefill(model, sample.input_ids), [RowIntervention(), row], spans=spans,
                                 max_new_tokens=max_new_tokens)
    layer, h = head

    def per_doc(answer):
        return [float(answer.scores[f"doc{i}"][layer, h]) for i in range(len(sample.doc_spans))] if answer.scores else []

    return {
        "before": per_doc(before), "after": per_doc(after),
        "answer_before": before.text, "answer_after": after.text,
        "em_before": best_subspan_em(before.text, sample.answers), "em_after": best_subspan_em(after.text, sample.answers),
    }
