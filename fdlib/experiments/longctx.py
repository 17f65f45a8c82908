"""Long-context studies: focus directions on HELMET-style tasks (the paper's Table 2),
the spread of the contextual heads' sink scores across tasks (its Tables 12-13), lost in the
middle, and retrieval heads (Wu et al., 2024) against contextual heads (its Figure 9).

One runner, `fdlib.study.runner.run_study`, serves all of them: per sample one prefill, then every condition
(no intervention, split-softmax, focus directions, head ablation) decodes its greedy answer from
that shared KV cache, in batches of rows. The interventions touch the answer rows only (from the last prompt row on),
unless a condition asks for `rows="all"`, which prefills the prompt again under the hooks. Each
sample's rows go to the SQLite store in one transaction, so a rerun skips what is stored. Tables
are built from its frame; figures from the tables (`fdlib.views.plots`). This module gives each
study its samples (`task_suite`, `position_samples`, `boost_samples`) and conditions
(`task_conditions`, `lost_conditions`, `boost_ablate_conditions`), and reads the frames.

Lengths: a study length L is the whole budget, prompt + answer. Prompts get
`L - max_new_tokens` tokens (so 8192 fits an 8192-token window with a 32-token answer), and a
length above the model's context window is refused before any sample is built.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head
from fdlib.core.metrics import bootstrap_ci
from fdlib.data.nq import NQBuilder, sized
from fdlib.data.tasks import NQ_TASKS, TASKS, task_samples
from fdlib.study.conditions import RANDOM, Condition, Rows
from fdlib.study.runner import StudySample

Size = Literal["quick", "paper", "full"]

# The paper's Table 2 grid: focus directions at alpha on the top-k contextual heads.
ALPHAS: tuple[float, ...] = (-0.2, 0.0, 0.2)
KS: tuple[int, ...] = (10, 20)
SINK_K = 5  # the heads whose sink score the spread tables report
LENGTHS: dict[str, tuple[int, ...]] = {"quick": (2048,), "paper": (2048, 4096, 8192), "full": (2048, 4096, 8192)}
# per task and length (a dict: per length; 8k prompts cost ~4x a 2k one, so `paper` takes fewer)
TASK_SAMPLES: dict[str, int | dict[int, int]] = {"quick": 2, "paper": {2048: 20, 4096: 20, 8192: 10}, "full": 20}
POSITIONS: tuple[int, ...] = (1, 5, 10, 15, 20)  # gold document among 20
POSITION_QUESTIONS: dict[str, int] = {"quick": 2, "paper": 50, "full": 100}  # per gold position
NEEDLES: dict[str, int] = {"quick": 4, "paper": 40, "full": 40}  # needle samples ranking the retrieval heads
NEEDLE_TOKENS: dict[str, int] = {"quick": 1024, "paper": 2048, "full": 2048}
BOOST_QUESTIONS: dict[str, int] = {"quick": 3, "paper": 100, "full": 100}
MAX_NEW_TOKENS = 32


# ---------------------------------------------------------------------------------------------
# Conditions


BASELINE = Condition.baseline()


def task_conditions(alphas: Sequence[float] = ALPHAS, ks: Sequence[int] = KS, *, directions: str = "focus") -> list[Condition]:
    """Table 2's columns: the baseline, then focus directions at every alpha x k (contextual heads)."""
    return [BASELINE] + [Condition.focus(float(a), directions, "contextual", k) for a in alphas for k in ks]


# ---------------------------------------------------------------------------------------------
# Samples


def check_lengths(model: TransformerBridge, lengths: Sequence[int], max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    """Validate study lengths (prompt + answer budgets) against the model's window, before any
    sample is built or any forward runs."""
    out = []
    n_ctx = getattr(model.cfg, "n_ctx", None)
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= max_new_tokens:
            raise ValueError(f"a length must be an int above max_new_tokens={max_new_tokens}, got {length!r}")
        if n_ctx is not None and length > n_ctx:
            raise ValueError(f"length {length} exceeds the model's context window of {n_ctx} tokens")
        out.append(int(length))
    return out


def task_suite(
    model: TransformerBridge,
    *,
    tasks: Sequence[str] = tuple(TASKS),
    lengths: Sequence[int] | None = None,
    size: Size | int = "quick",
    seed: int = 0,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[StudySample]:
    """Samples of every task at every length: `TASK_SAMPLES[size]` per task and length (per length
    where it is a dict; its largest count at a length it does not list), or `size` itself when an
    int; prompts of `length - max_new_tokens` tokens."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}: expected some of {sorted(TASKS)}")
    per_length = sized(TASK_SAMPLES, size)
    if lengths is None:
        lengths = LENGTHS[size] if isinstance(size, str) else LENGTHS["quick"]
    lengths = check_lengths(model, lengths, max_new_tokens)
    builder = NQBuilder(model.tokenizer)  # one BM25 index for the NQ tasks
    out = []
    for length in lengths:
        n = per_length.get(length, max(per_length.values())) if isinstance(per_length, dict) else per_length
        for name in tasks:
            extra = {"builder": builder} if name in NQ_TASKS else {}
            for s in task_samples(name, model, n_tokens=length - max_new_tokens, size=n, seed=seed, **extra):
                out.append(StudySample(s, {"task": name, "length": length, "n_tokens": s.n_tokens, "depth": s.depth}))
    return out


def suite_table(samples: Sequence[StudySample]) -> pd.DataFrame:
    """One line per sample: task, length, prompt tokens, where the relevant span is, the answer."""
    rows = []
    for s in samples:
        span = s.relevant_span
        rows.append({"id": s.id, "task": s.meta.get("task"), "length": s.meta.get("length"), "n_tokens": s.n_tokens,
                     "relevant": f"[{span.start}, {span.end})", "relevant tokens": len(span),
                     "depth": round(span.start / s.n_tokens, 2), "answer": s.sample.answers[0]})
    return pd.DataFrame(rows)


def needle_samples(
    model: TransformerBridge, *, size: Size | int = "quick", n_tokens: int | None = None, seed: int = 0
) -> list[TaskSample]:
    """Single-needle samples that rank the retrieval heads: `NEEDLES[size]` of them (or `size`
    when an int) with prompts of `NEEDLE_TOKENS[size]` tokens (1024 for an int size) unless
    `n_tokens` is given."""
    n = sized(NEEDLES, size)
    if n_tokens is None:
        n_tokens = NEEDLE_TOKENS[size] if isinstance(size, str) else NEEDLE_TOKENS["quick"]
    return task_samples("niah", model, n_tokens=n_tokens, size=n, seed=seed)


def position_samples(
    model: TransformerBridge,
    *,
    positions: Sequence[int] = POSITIONS,
    size: Size | int = "quick",
    n_docs: int = 20,
    split: str = "test",
) -> list[StudySample]:
    """The same NQ questions with the gold document at each position (1-based) among n_docs."""
    bad = [p for p in positions if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= n_docs]
    if bad:
        raise ValueError(f"gold positions {bad} are outside 1..{n_docs}")
    builder = NQBuilder(model.tokenizer)
    n = sized(POSITION_QUESTIONS, size)
    out = []
    for p in positions:
        for s in builder.samples(split=split, size=n, n_docs=n_docs, gold_position=p):
            out.append(StudySample(s, {"task": "nq", "position": p, "n_docs": n_docs, "n_tokens": s.n_tokens}))
    return out


def head_mean(arrays: pd.Series, heads: Sequence[Head]) -> Float[np.ndarray, " row"]:
    """Per row, the mean over `heads` of a stored `[n_layers, n_heads]` score (NaN where absent)."""
    if not heads:
        raise ValueError("no heads to average over")
    idx = np.asarray(heads, dtype=int)
    return np.array([float(np.mean(a[idx[:, 0], idx[:, 1]])) if a is not None else np.nan for a in arrays], dtype=float)


# ---------------------------------------------------------------------------------------------
# Studies


def lost_conditions(*, tau: float = 0.1, alpha: float = 0.5, k: int = 5) -> list[Condition]:
    """No intervention; split-softmax on the gold document; focus directions (contextual top-k)."""
    return [BASELINE, Condition.split(tau, "contextual", k), Condition.focus(alpha, "focus", "contextual", k)]


def boost_ablate_conditions(
    sets: Sequence[str] = ("retrieval", "contextual"), *, k: int = 20, tau: float = 0.1, rows: Rows = "response",
    random_seeds: Sequence[int] = (0,),
) -> list[Condition]:
    """No intervention; per named head set and per random draw, split-softmax on the gold
    document (boost) and ablation."""
    where = [(name, None) for name in sets] + [(RANDOM, s) for s in random_seeds]
    out = [BASELINE]
    out += [Condition.split(tau, name, k, seed=seed) for name, seed in where]
    out += [Condition.ablate(name, k, seed=seed, rows=rows) for name, seed in where]
    return out


def boost_samples(
    model: TransformerBridge, *, size: Size | int = "quick", n_docs: int = 20, split: str = "test"
) -> list[StudySample]:
    """The boost / ablate study's NQ prompts: `BOOST_QUESTIONS[size]` questions (or `size` when an
    int) with the gold document in the middle of `n_docs` (alone for `n_docs=1`)."""
    return position_samples(model, positions=[(n_docs + 1) // 2], size=sized(BOOST_QUESTIONS, size), n_docs=n_docs,
                            split=split)


# ---------------------------------------------------------------------------------------------
# Tables


def _ci_rows(frame: pd.DataFrame, by: Sequence[str], value: str, level: float) -> pd.DataFrame:
    rows = []
    for vals, g in frame.groupby(list(by), sort=False, dropna=False):
        mean, lo, hi = bootstrap_ci(g[value].to_numpy(dtype=float), level=level)
        rows.append({**dict(zip(by, vals if isinstance(vals, tuple) else (vals,))), "mean": mean, "lo": lo, "hi": hi,
                     "n": int(g[value].notna().sum())})
    return pd.DataFrame(rows)


def _column_order(frame: pd.DataFrame) -> list[str]:
    """Table columns: the baseline first, then by method, alpha / tau, k (as in the paper)."""
    f = frame.drop_duplicates("label")
    order = f.assign(
        _m=f["method"].map({"baseline": 0, "focus": 1, "split": 2, "odds": 3, "boost": 4, "ablate": 5}),
        # head sets in the order they first appear (the conditions' order), not alphabetical
        _h=f["heads"].fillna("").map({h: i for i, h in enumerate(dict.fromkeys(f["heads"].fillna("")))}) if "heads" in f else 0,
        **{f"_{c}": pd.to_numeric(f[c], errors="coerce").fillna(0) if c in f else 0 for c in ("value", "k")},
    ).sort_values(["_m", "_h", "_value", "_k"], kind="stable")
    return list(order["label"])


def score_table(frame: pd.DataFrame, by: Sequence[str] = ("task", "length"), *, level: float = 0.95) -> pd.DataFrame:
    """Mean score with a bootstrap CI over samples, per `by` group and condition (long format)."""
    _require(frame, [*by, "label", "score"])
    _check_labels(frame)
    out = _ci_rows(frame, [*by, "label"], "score", level)
    out["label"] = pd.Categorical(out["label"], _column_order(frame), ordered=True)
    return out.sort_values([*by, "label"]).reset_index(drop=True)


def table2(frame: pd.DataFrame, *, ci: bool = False, level: float = 0.95, digits: int = 2) -> pd.DataFrame:
    """The paper's Table 2 layout: rows (task, length), columns the baseline then each condition
    (`alpha=a, k=k`), values the mean score over samples. `ci=True` gives text cells
    `mean [lo, hi]` (bootstrap) instead of numbers."""
    long = score_table(frame, ("task", "length"), level=level)
    means = long.pivot(index=["task", "length"], columns="label", values="mean")
    means = means[[c for c in _column_order(frame) if c in means.columns]]
    means.columns = list(means.columns)
    if not ci:
        return means
    fmt = f"{{:.{digits}f}}"
    text = long.assign(cell=[f"{fmt.format(m)} [{fmt.format(lo)}, {fmt.format(hi)}]" for m, lo, hi in zip(long["mean"], long["lo"], long["hi"])])
    cells = text.pivot(index=["task", "length"], columns="label", values="cell")[list(means.columns)]
    cells.columns = list(cells.columns)
    return cells


def table2_n(frame: pd.DataFrame, baseline: str = "baseline") -> pd.Series:
    """The number of samples behind each row of `table2` (its baseline column's), indexed as
    `table2`'s rows."""
    _require(frame, ["task", "length", "label", "score"])
    base = frame[frame["label"] == baseline]
    if base.empty:
        raise ValueError(f"no {baseline!r} condition in the frame; labels: {sorted(frame['label'].unique())}")
    return base.groupby(["task", "length"])["score"].count()  # as score_table's n: scores present


def versus_baseline(table: pd.DataFrame, baseline: str = "baseline", *, tol: float = 1e-9) -> pd.DataFrame:
    """+1 where a cell beats the row's baseline by more than `tol`, -1 where it is worse, 0 where
    equal; NaN in the baseline column and where either value is missing."""
    if baseline not in table.columns:
        raise ValueError(f"no column {baseline!r} to compare with; columns: {list(table.columns)}")
    values = table.apply(pd.to_numeric, errors="coerce")
    diff = values.sub(values[baseline], axis=0)
    out = np.sign(diff.where(diff.abs() > tol, 0.0)).where(diff.notna())
    out[baseline] = np.nan
    return out


GREEN, RED = "#c7e9c0", "#fcbba1"


def style_versus_baseline(table: pd.DataFrame, text: pd.DataFrame | None = None, *, baseline: str = "baseline",
                          digits: int = 2) -> Any:
    """A pandas Styler of `table` (or of `text`, e.g. `table2(..., ci=True)`, with the same
    layout) with cells green where better than the row's baseline, red where worse."""
    signs = versus_baseline(table, baseline)
    shown = table if text is None else text
    if shown.shape != table.shape or list(shown.columns) != list(table.columns):
        raise ValueError("text must have the table's rows and columns")
    css = signs.apply(lambda col: col.map({1.0: f"background-color: {GREEN}", -1.0: f"background-color: {RED}"}).fillna(""))
    css.index, css.columns = shown.index, shown.columns
    styler = shown.style.apply(lambda _: css, axis=None)
    return styler.format(precision=digits) if text is None else styler


def sink_table(frame: pd.DataFrame, heads: Sequence[Head], *, condition: str = BASELINE.key) -> pd.DataFrame:
    """Mean sink score (attention on position 0 from the answer rows) of `heads` (the top-5
    contextual heads), averaged over samples: rows tasks, columns lengths (Tables 12-13)."""
    _require(frame, ["task", "length", "condition", "sink_score"])
    f = frame[frame["condition"] == condition]
    if f.empty:
        raise ValueError(f"no rows of condition {condition!r}; have {sorted(frame['condition'].unique())}")
    f = f.assign(sink=head_mean(f["sink_score"], heads))
    return f.pivot_table(index="task", columns="length", values="sink", aggfunc="mean")


def sink_spread(table: pd.DataFrame, *, ddof: int = 0) -> pd.DataFrame:
    """Per length (a column of `sink_table`): mean, standard deviation (`ddof`, population by
    default), min and max of the sink score across tasks."""
    return pd.DataFrame({
        "mean": table.mean(axis=0), "std across tasks": table.std(axis=0, ddof=ddof),
        "min": table.min(axis=0), "max": table.max(axis=0), "n tasks": table.notna().sum(axis=0),
    })


def position_table(frame: pd.DataFrame, heads: Sequence[Head], *, level: float = 0.95) -> pd.DataFrame:
    """Per condition and gold position: EM with a bootstrap CI, and the mean relevant-document
    score of `heads` (the top-5 contextual heads) from the answer rows, with its CI."""
    _require(frame, ["position", "label", "score", "relevant_score"])
    _check_labels(frame)
    f = frame.assign(relevant=head_mean(frame["relevant_score"], heads))
    em = _ci_rows(f, ["label", "position"], "score", level).rename(columns={"mean": "em"})
    rel = _ci_rows(f, ["label", "position"], "relevant", level).rename(
        columns={"mean": "relevant", "lo": "relevant_lo", "hi": "relevant_hi", "n": "n_relevant"})
    out = em.merge(rel, on=["label", "position"])
    out["label"] = pd.Categorical(out["label"], _column_order(frame), ordered=True)
    return out.sort_values(["label", "position"]).reset_index(drop=True)


def condition_table(frame: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """EM (mean score) per condition with a bootstrap CI, in the conditions' order."""
    _require(frame, ["label", "method", "score"])
    _check_labels(frame)
    out = _ci_rows(frame, ["label", "method", "heads"], "score", level).rename(columns={"mean": "em"})
    out["label"] = pd.Categorical(out["label"], _column_order(frame), ordered=True)
    return out.sort_values("label").reset_index(drop=True)


def _check_labels(frame: pd.DataFrame) -> None:
    """Tables are laid out by label: two conditions sharing one (e.g. the same alpha and k with
    two directions sets) would be pooled silently."""
    if "condition" in frame:
        shared = frame.groupby("label")["condition"].nunique()
        if (shared > 1).any():
            raise ValueError(f"labels shared by several conditions: {sorted(shared[shared > 1].index)}; filter the frame first")


def _require(frame: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"the frame lacks columns {missing}; build it with fdlib.study.runner.run_study or study_frame")


# ---------------------------------------------------------------------------------------------
# Retrieval heads vs contextual heads


@dataclass(frozen=True)
class HeadOverlap:
    """Two head sets: the heads in both, and those in only one (each in its set's rank order)."""

    both: list[Head]
    only_first: list[Head]
    only_second: list[Head]

    @property
    def count(self) -> int:
        return len(self.both)


def head_overlap(first: Sequence[Head], second: Sequence[Head]) -> HeadOverlap:
    a = [tuple(map(int, h)) for h in first]
    b = [tuple(map(int, h)) for h in second]
    sb, sa = set(b), set(a)
    return HeadOverlap([h for h in a if h in sb], [h for h in a if h not in sb], [h for h in b if h not in sa])


def head_set_grid(first: Sequence[Head], second: Sequence[Head], n_layers: int, n_heads: int) -> Int[np.ndarray, "n_layers n_heads"]:
    """Layers x heads: 0 in neither set, 1 in the first only, 2 in the second only, 3 in both."""
    grid = np.zeros((n_layers, n_heads), dtype=int)
    for bit, heads in ((1, first), (2, second)):
        for l, h in heads:
            if not (0 <= l < n_layers and 0 <= h < n_heads):
                raise ValueError(f"head L{l}H{h} is outside {n_layers} layers x {n_heads} heads")
            grid[l, h] |= bit
    return grid


def positive_top_heads(scores: Float[np.ndarray, "n_layers n_heads"] | Float[Tensor, "n_layers n_heads"], k: int) -> list[Head]:
    """The k best heads among those scoring above 0 (fewer when fewer do): a retrieval score
    of 0 means the head never copied, and ranking such ties would only list heads in index order."""
    s = np.nan_to_num(np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=float), nan=0.0)
    if s.ndim != 2:
        raise ValueError(f"scores must be [n_layers, n_heads], got shape {s.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    flat = s.ravel()
    order = np.argsort(-flat, kind="stable")[:k]
    return [(int(i) // s.shape[1], int(i) % s.shape[1]) for i in order if flat[i] > 0]


def head_scores_table(heads: Sequence[Head], scores: Mapping[str, Float[np.ndarray, "n_layers n_heads"] | Float[Tensor, "n_layers n_heads"]]) -> pd.DataFrame:
    """One row per head (`L{l}H{h}`, in the given order) with each named score at that head."""
    arrays = {name: np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v, dtype=float) for name, v in scores.items()}
    rows = [{"head": f"L{l}H{h}", **{f"{name} score": float(a[l, h]) for name, a in arrays.items()}} for l, h in heads]
    return pd.DataFrame(rows).set_index("head") if rows else pd.DataFrame(columns=["head"]).set_index("head")
