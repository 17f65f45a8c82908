"""The study's metric (best-subspan exact match), confidence intervals for dataset means, and the
one paired test of two conditions (McNemar)."""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np
import pandas as pd

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation and the articles a/an/the, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def best_subspan_em(prediction: str, answers: Sequence[str]) -> bool:
    """True when any normalised answer occurs as a substring of the normalised prediction."""
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not one string")
    if not answers:
        raise ValueError("best_subspan_em needs at least one gold answer")
    pred = normalize_answer(prediction)
    return any(norm and norm in pred for norm in (normalize_answer(a) for a in answers))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean over the first axis.

    NaNs are dropped (a score that is undefined for a sample, e.g. IR-max on a gold-only input).
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size == 0:
        return (float("nan"),) * 3
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(low), float(high)


def paired(frame: pd.DataFrame, a: str, b: str, *, by: str = "sample_id", value: str = "score") -> pd.DataFrame:
    """Conditions `a` and `b` (condition keys) of a study frame side by side, one row per unit of
    the column `by` that has both, columns `a` and `b` holding the unit's mean `value` (a unit
    with several rows of one condition, e.g. a question's random-head seeds, counts once)."""
    x = frame[frame.condition == a].groupby(by, sort=False)[value].mean()  # in frame order: bootstraps resample it
    y = frame[frame.condition == b].groupby(by, sort=False)[value].mean()
    return x.to_frame("a").join(y.to_frame("b"), how="inner")


def mcnemar(frame: pd.DataFrame, a: str, b: str, *, by: str = "sample_id", value: str = "score") -> dict[str, float]:
    """Exact two-sided McNemar test of conditions `a` and `b` (binomial on the discordant units).

    Pairing is by the column `by`: "sample_id" pairs prompts (each prompt once: the unit when
    every prompt is its own question), "group" pairs questions (a question's prompts, e.g. its
    long / gold / negative inputs or random seeds under one condition key, pooled: correct when
    its mean `value` is above 0.5). Returns the number of pairs `n`, the units only `a` /
    only `b` got right, the p-value, and each side's accuracy over the pairs.
    """
    from scipy.stats import binomtest

    both = paired(frame, a, b, by=by, value=value) > 0.5
    if both.empty:
        raise ValueError(f"no {by} has both {a!r} and {b!r}")
    only_a = int((both.a & ~both.b).sum())
    only_b = int((~both.a & both.b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"n": len(both), "only_a": only_a, "only_b": only_b, "p_value": float(p),
            "em_a": float(both.a.mean()), "em_b": float(both.b.mean())}
