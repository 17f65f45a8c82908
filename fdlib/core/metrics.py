"""The study's metric (best-subspan exact match), confidence intervals for dataset means, and the
paired tests of two conditions: McNemar (one prompt per question) and a sign-flip test over
questions (several prompts per question, e.g. its gold positions: `paired_cluster_test`).

Prompts of one question are not independent draws: where a question contributes several prompts,
intervals and tests resample questions (`bootstrap_ci(..., groups=question_ids(sample_ids))`)."""

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


def question_id(sample_id: str) -> str:
    """The NQ question a prompt id belongs to: the part before the first "/" (`nq0863/k20g10` ->
    `nq0863`; an id without "/" is its own question). The one place of this rule for intervals
    and tests, `QASample.group` and the training cache's examples. Not for long-context task ids
    (`task/n_tokens/seed/key`), whose samples are each their own group."""
    return str(sample_id).split("/", 1)[0]


def question_ids(sample_ids: Sequence[str] | pd.Series | pd.Index | np.ndarray) -> np.ndarray:
    """`question_id` of each sample id, as an object array in the same order."""
    return np.array([question_id(s) for s in sample_ids], dtype=object)


def _cluster_codes(groups: Sequence | np.ndarray, size: int) -> np.ndarray:
    """Integer codes 0..n_clusters-1 of cluster labels, in order of first appearance."""
    labels = np.asarray(groups, dtype=object).ravel()
    if labels.size != size:
        raise ValueError(f"groups has {labels.size} labels for {size} values")
    codes, _ = pd.factorize(labels)
    if (codes < 0).any():
        raise ValueError("groups has missing labels (None / NaN)")
    return codes


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    level: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    groups: Sequence | np.ndarray | None = None,
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean over the first axis.

    NaNs are dropped (a score that is undefined for a sample, e.g. IR-max on a gold-only input).
    `groups` (one cluster label per value, e.g. `question_ids(sample_ids)`) makes it a cluster
    bootstrap: each replicate draws clusters with replacement and takes all their values, the
    statistic staying the mean over values. Where every cluster holds one value (after dropping
    NaNs) it is the plain bootstrap, to the bit; without `groups` nothing changed.
    """
    x = np.asarray(values, dtype=float).ravel()
    keep = ~np.isnan(x)
    codes = None if groups is None else _cluster_codes(groups, x.size)[keep]
    x = x[keep]
    if x.size == 0:
        return (float("nan"),) * 3
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    if codes is not None:
        codes, _ = pd.factorize(codes)  # renumber: clusters left empty by dropped NaNs vanish
        counts = np.bincount(codes)
        if counts.size == x.size:  # one value per cluster: the plain bootstrap below
            codes = None
    if codes is None:
        idx = rng.integers(0, x.size, size=(n_resamples, x.size))
        means = x[idx].mean(axis=1)
    else:
        sums = np.bincount(codes, weights=x)
        idx = rng.integers(0, counts.size, size=(n_resamples, counts.size))
        means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(x.mean()), float(low), float(high)


def sign_flip_pvalue(
    differences: Sequence[float] | np.ndarray,
    groups: Sequence | np.ndarray | None = None,
    *,
    n_resamples: int = 10_000,
    seed: int = 0,
    exact_up_to: int = 16,
) -> float:
    """Two-sided p-value of a paired permutation (sign-flip) test that the mean of paired
    `differences` (a - b per prompt) is zero, flipping whole clusters: under the null the labels
    a / b are exchangeable within each cluster (question), so each cluster's summed difference
    keeps or flips its sign. Without `groups` each difference is its own cluster. NaNs are
    dropped. Exact (all 2^m sign patterns) when at most `exact_up_to` clusters have a nonzero
    sum, else Monte Carlo with `n_resamples` seeded draws, p = (1 + hits) / (1 + n_resamples)
    (so never below 1 / (1 + n_resamples)). On 0/1 scores with one prompt per cluster the exact
    test is the exact McNemar test."""
    d = np.asarray(differences, dtype=float).ravel()
    keep = ~np.isnan(d)
    codes = (np.arange(d.size) if groups is None else _cluster_codes(groups, d.size))[keep]
    d = d[keep]
    if d.size == 0:
        return float("nan")
    sums = np.bincount(pd.factorize(codes)[0], weights=d)
    sums = sums[sums != 0]
    if sums.size == 0:
        return 1.0
    observed = abs(sums.sum())
    tol = 1e-9 * max(1.0, float(np.abs(sums).sum()))
    m = sums.size
    if m <= exact_up_to:
        patterns = (np.arange(2**m)[:, None] >> np.arange(m)) & 1
        stats = np.abs((1 - 2 * patterns) @ sums)
        return float(np.mean(stats >= observed - tol))
    rng = np.random.default_rng(seed)
    hits, left = 0, n_resamples
    while left:
        n = min(left, 1000)
        signs = 1 - 2 * rng.integers(0, 2, size=(n, m))
        hits += int((np.abs(signs @ sums) >= observed - tol).sum())
        left -= n
    return float((1 + hits) / (1 + n_resamples))


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
    For the one-prompt-per-question case; where a question has several prompts and they are
    paired by prompt, `paired_cluster_test` treats them as the dependent draws they are.
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


def paired_cluster_test(
    frame: pd.DataFrame, a: str, b: str, *, by: str = "sample_id", value: str = "score", cluster: str | None = None,
    n_resamples: int = 10_000, seed: int = 0,
) -> dict[str, float]:
    """Paired test of conditions `a` and `b` whose units (`by`, default prompts) are clustered in
    questions: the sign-flip test over questions of the mean difference a - b
    (`sign_flip_pvalue`), where McNemar would take a question's prompts as independent pairs.
    A unit's question is `question_id` of its `by` value, or the frame's column `cluster` when
    given (e.g. "group"). Returns, like `mcnemar`: the pairs `n`, the questions `n_questions`,
    the units only `a` / only `b` got right (mean `value` above 0.5), `p_value`, each side's
    mean `em_a` / `em_b` over the pairs (means of `value`, not thresholded) and `gain` (their
    difference)."""
    pair = paired(frame, a, b, by=by, value=value)
    if pair.empty:
        raise ValueError(f"no {by} has both {a!r} and {b!r}")
    if cluster is None:
        groups = question_ids(pair.index)
    else:
        groups = frame.groupby(by, sort=False)[cluster].first().reindex(pair.index).to_numpy(dtype=object)
    x, y = pair.a.to_numpy(dtype=float), pair.b.to_numpy(dtype=float)
    hit_a, hit_b = x > 0.5, y > 0.5
    return {"n": len(pair), "n_questions": int(pd.unique(groups).size), "only_a": int((hit_a & ~hit_b).sum()),
            "only_b": int((~hit_a & hit_b).sum()),
            "p_value": sign_flip_pvalue(x - y, groups, n_resamples=n_resamples, seed=seed),
            "em_a": float(x.mean()), "em_b": float(y.mean()), "gain": float((x - y).mean())}
