"""The study's metric (best-subspan exact match) and confidence intervals for dataset means."""

from __future__ import annotations

import re
import string
from typing import Sequence

import numpy as np

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
