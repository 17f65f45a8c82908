"""Interventions compared (notebook 07): which intervention focuses a model best.

Methods, each a family of `Condition`s on the top-k contextual heads:
- label-using (they are told which span is relevant): span reweighting with the three maps of
  `fdlib.interventions.reweighting` — split-softmax (the paper), odds scaling (PASTA-style), boost
  (InstABoost-style);
- label-free: focus directions at a fixed alpha, focus directions with automatic alpha
  (`Condition.focus_auto`: per input, the alpha that brings the heads' sink share at the first
  answer row to the gold-only inputs' level; `Condition.focus_kept`: the alpha that keeps a
  fraction, chosen on train, of the input's own sink share), and directions trained without the
  position prior (`training_set="shuffled"`: the gold document anywhere among the 20).

Each method's setting is chosen on train-split questions (`choose`), never on the test questions
it is scored on; on the test questions each chosen setting runs beside its random-head control
(the same method and k on k random heads) and the baseline (`comparison_table`, with `fdlib.core.metrics.mcnemar` paired by prompt).
`chosen_alphas` says what the automatic alphas chose; `bias_shares` measures the position prior
of a directions set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head
from fdlib.core.metrics import bootstrap_ci, mcnemar, paired
from fdlib.interventions.directions import FocusDirections, key_bias
from fdlib.study.conditions import AUTO, AUTO_ALPHAS, DROP_ALPHAS, RANDOM, Condition

POSITIONS: tuple[int, ...] = (1, 10, 20)  # gold document among 20
QUESTIONS: dict[str, dict[str, int]] = {"quick": {"train": 2, "test": 2}, "paper": {"train": 50, "test": 200},
                                        "full": {"train": 50, "test": 200}}
# probe prompts (gold at position 10) of the key-bias view: two prefills per probe, head and set
BIAS_PROBES: dict[str, int] = {"quick": 1, "paper": 10, "full": 20}
GRIDS: dict[str, dict[str, tuple]] = {
    "quick": dict(ks=(5,), split=(0.1,), odds=(0.01,), boost=(19.0,), alpha=(0.5,), kept=(0.75,), drop=(0.3,)),
    # kept: at alpha 1 the gold directions leave the top-5 / 10 / 20 heads 0.4-0.8 of their sink share
    "full": dict(ks=(5, 10, 20), split=(0.05, 0.1, 0.3, 0.6), odds=(0.001, 0.01, 0.1), boost=(3.0, 7.0, 11.0, 19.0),
                 alpha=(0.1, 0.2, 0.5, 1.0), kept=(0.6, 0.75, 0.9), drop=(0.1, 0.2, 0.3, 0.5)),
}
GRIDS["paper"] = GRIDS["full"]


@dataclass(frozen=True)
class Method:
    """One intervention: its name, whether it needs the relevant span's label, and the settings
    among which the train split chooses."""

    name: str
    family: str  # "label-using" or "label-free"
    candidates: tuple[Condition, ...]


def methods(size: str = "quick", *, target_sink: float | None = None, directions: str = "gold",
            shuffled: str | None = "shuffled", shuffled_scale: float = 1.0, drop: bool = False) -> list[Method]:
    """The compared methods on the "contextual" ranking, with the size's grid of settings.
    `target_sink` drives the absolute automatic alpha (`focus_auto`, None: left out), the relative
    one (`focus_kept`) aims at a kept fraction, and with `drop` the automatic alpha that works
    (`focus_drop`: the smallest alpha removing a share, chosen on train, of the input's own sink
    share) is compared too; `directions` / `shuffled` name the directions sets (trained on
    gold-anchored and on shuffled prompts; `shuffled=None` leaves that method out).
    The position-free set's alphas are the grid's times `shuffled_scale` (rounded to 0.01), e.g.
    `norm_ratio` of the two sets, so that both grids push the heads equally hard."""
    if not (math.isfinite(shuffled_scale) and shuffled_scale > 0):
        raise ValueError(f"shuffled_scale must be a positive number, got {shuffled_scale!r}")
    g = GRIDS[size] if size in GRIDS else GRIDS["quick"]
    ks = g["ks"]
    out = [
        Method("split-softmax", "label-using", tuple(Condition.split(v, "contextual", k) for v in g["split"] for k in ks)),
        Method("odds (PASTA-style)", "label-using",
               tuple(Condition.reweight("odds", v, "contextual", k) for v in g["odds"] for k in ks)),
        Method("boost (InstABoost-style)", "label-using",
               tuple(Condition.reweight("boost", v, "contextual", k) for v in g["boost"] for k in ks)),
        Method("focus directions", "label-free",
               tuple(Condition.focus(a, directions, "contextual", k) for a in g["alpha"] for k in ks)),
    ]
    if target_sink is not None:
        out.append(Method("automatic alpha", "label-free",
                          tuple(Condition.focus_auto(target_sink, directions, "contextual", k) for k in ks)))
    out.append(Method("automatic alpha (relative)", "label-free",
                      tuple(Condition.focus_kept(v, directions, "contextual", k) for v in g["kept"] for k in ks)))
    if drop:
        out.append(Method("automatic alpha (sink drop)", "label-free",
                          tuple(Condition.focus_drop(v, directions, "contextual", k) for v in g["drop"] for k in ks)))
    if shuffled is not None:
        out.append(Method("position-free directions", "label-free",
                          tuple(Condition.focus(round(a * shuffled_scale, 2), shuffled, "contextual", k)
                                for a in g["alpha"] for k in ks)))
    return out


def norm_ratio(first: FocusDirections, second: FocusDirections, heads: Sequence[Head]) -> float:
    """Mean |d_Q| of `first` over `heads` / that of `second`: how much harder the first pushes
    the same heads at the same alpha."""
    if not heads:
        raise ValueError("norm_ratio needs at least one head")
    idx = tuple(torch.tensor(h) for h in zip(*heads))
    a, b = first.d_q[idx].norm(dim=-1).mean(), second.d_q[idx].norm(dim=-1).mean()
    if not b > 0:
        raise ValueError("the second directions set has d_Q = 0 on these heads")
    return float(a / b)


def target_sink(gold_sink: Any, heads: Sequence[Head]) -> float:
    """The automatic alpha's target: the heads' mean sink score on gold-only inputs
    (`ContextualStudy.gold` scores' `sink` kind, stacked `[sample, n_layers, n_heads]`)."""
    s = torch.as_tensor(np.asarray(gold_sink, dtype=float))
    idx = torch.as_tensor(list(heads), dtype=torch.long)
    value = float(torch.nanmean(s[:, idx[:, 0], idx[:, 1]]))
    return min(max(value, 1e-3), 1 - 1e-3)


def candidates(ms: Sequence[Method]) -> list[Condition]:
    return [Condition.baseline()] + [c for m in ms for c in m.candidates]


def choose(frame: pd.DataFrame, ms: Sequence[Method]) -> dict[str, Condition]:
    """Per method, the candidate with the highest mean score on the (train) frame; ties go to the
    earlier candidate."""
    means = frame.groupby("condition")["score"].mean()
    out = {}
    for m in ms:
        scored = [(float(means.get(c.key, np.nan)), -i, c) for i, c in enumerate(m.candidates)]
        scored = [t for t in scored if not np.isnan(t[0])]
        if not scored:
            raise ValueError(f"no rows of method {m.name!r} in the frame")
        out[m.name] = max(scored, key=lambda t: (t[0], t[1]))[2]
    return out


def control(c: Condition, seed: int = 0) -> Condition:
    """The random-head control of a condition: the same method, parameter and k on k random heads."""
    from dataclasses import replace

    return replace(c, heads=RANDOM, seed=seed)


def scored_conditions(best: Mapping[str, Condition], seeds: Sequence[int] = (0,)) -> list[Condition]:
    """The baseline, each chosen setting, and its random-head controls."""
    out = [Condition.baseline()]
    for c in best.values():
        out += [c] + [control(c, s) for s in seeds]
    return list(dict.fromkeys(out))


def comparison_table(
    frame: pd.DataFrame, best: Mapping[str, Condition], ms: Sequence[Method], heads: Sequence[Head], *,
    level: float = 0.95, resample: str = "questions",
) -> pd.DataFrame:
    """Per method (chosen setting) and its random-head control: EM with a bootstrap CI, the gain
    over the baseline with a paired bootstrap CI, a paired test against the baseline, and the
    top-k contextual heads' mean relevant, sink and IR-max scores under it.

    `resample="questions"` (default): a question's prompts (its gold positions; question =
    `question_id` of `sample_id`) are drawn together by both bootstraps, and the test is the
    sign-flip test over questions (`paired_cluster_test`) where a question has several prompts,
    McNemar by prompt where each has one (then every number equals `resample="prompts"`'s).
    `resample="prompts"`: prompts as independent draws, McNemar by prompt. Columns `n` (prompts),
    `n_questions`, `resampled` (what the intervals draw), `test` (which test gave `p_value`);
    `gained` / `lost` count prompts."""
    from fdlib.core.metrics import paired_cluster_test, question_ids

    if resample not in ("questions", "prompts"):
        raise ValueError(f"resample must be 'questions' or 'prompts', got {resample!r}")
    base = Condition.baseline().key
    family = {m.name: m.family for m in ms}
    idx = np.asarray(list(heads), dtype=int)
    rows = []

    def head_mean(cond: str, kind: str) -> float:
        arrays = [a for a in frame[frame.condition == cond][f"{kind}_score"] if a is not None]
        if not arrays:
            return float("nan")
        return float(np.nanmean([np.asarray(a)[idx[:, 0], idx[:, 1]].mean() for a in arrays]))

    entries = [("baseline", "baseline", Condition.baseline())]
    for name, c in best.items():
        entries += [(name, family[name], c), (name, "random-head control", control(c))]
    for name, fam, c in entries:
        g = frame[frame.condition == c.key]
        if g.empty:
            continue
        clustered = resample == "questions"
        questions = question_ids(g["sample_id"])
        em, lo, hi = bootstrap_ci(g["score"].to_numpy(dtype=float), level=level, groups=questions if clustered else None)
        pair = paired(frame, c.key, base)
        x, y = pair.a.to_numpy(dtype=float), pair.b.to_numpy(dtype=float)
        pair_q = question_ids(pair.index) if clustered else None
        gain, glo, ghi = bootstrap_ci(x - y, level=level, groups=pair_q) if x.size else (np.nan,) * 3
        several = clustered and len(set(pair_q)) < len(pair_q)  # some question has several prompts
        if c.key == base:
            test, test_name = {"p_value": np.nan, "only_a": 0, "only_b": 0}, ""
        elif several:
            test, test_name = paired_cluster_test(frame, c.key, base), "sign-flip over questions"
        else:
            test, test_name = mcnemar(frame, c.key, base), "McNemar"
        rows.append({"method": name, "family": fam, "setting": c.label, "condition": c.key, "em": em, "lo": lo, "hi": hi,
                     "n": len(g), "n_questions": len(set(questions)), "resampled": resample, "gain": gain,
                     "gain_lo": glo, "gain_hi": ghi, "gained": test["only_a"], "lost": test["only_b"],
                     "p_value": test["p_value"], "test": test_name, "relevant": head_mean(c.key, "relevant"),
                     "sink": head_mean(c.key, "sink"), "irmax": head_mean(c.key, "irmax")})
    return pd.DataFrame(rows)


def chosen_alphas(frame: pd.DataFrame, best: Mapping[str, Condition]) -> pd.DataFrame:
    """Per method whose chosen setting picks alpha per input (and its random-head control): the
    prompts, the mean alpha chosen, the share of prompts left unsteered (alpha 0) and at the
    grid's top, and `degenerate` when more than half of the prompts sit at one end of the grid
    (the rule then acts as a fixed alpha, or not at all)."""
    rows = []
    for name, c in best.items():
        if c.method not in AUTO:
            continue
        top = max(DROP_ALPHAS if c.method == "focus_drop" else AUTO_ALPHAS)
        for fam, cond in (("chosen", c), ("random-head control", control(c))):
            a = frame.loc[frame.condition == cond.key, "chosen_alpha"].dropna().to_numpy(dtype=float)
            if a.size:
                low, high = float((a == 0).mean()), float((a == top).mean())
                rows.append({"method": name, "family": fam, "setting": cond.label, "n": int(a.size),
                             "mean_alpha": float(a.mean()), "unsteered": low, "at_top": high,
                             "degenerate": max(low, high) > 0.5})
    return pd.DataFrame(rows, columns=["method", "family", "setting", "n", "mean_alpha", "unsteered", "at_top",
                                       "degenerate"])


def alpha_histogram(frame: pd.DataFrame, condition: Condition) -> pd.Series:
    """How many prompts an automatic-alpha condition gave each candidate alpha (every candidate
    listed, zeros included)."""
    grid = DROP_ALPHAS if condition.method == "focus_drop" else AUTO_ALPHAS
    got = frame.loc[frame.condition == condition.key, "chosen_alpha"].dropna().astype(float)
    return got.value_counts().reindex([float(a) for a in grid], fill_value=0).rename("prompts")


def auto_alpha_report(frame: pd.DataFrame, auto: Condition, fixed: Sequence[Condition], *,
                      fixed_selected_on: str = "train") -> dict[str, Any]:
    """An automatic alpha against fixed alphas on the same prompts: its EM, the EM of the best
    fixed alpha among `fixed` (the same method's heads and directions; `fixed_selected_on` says
    where that best one was picked: "train", or "test" for a description of this frame), and
    the per-input ceiling (a prompt counts as solved when any fixed alpha, or alpha 0, solves
    it), plus what it costs: one probe step per prompt with one row per candidate alpha."""
    base = Condition.baseline().key
    keys = [c.key for c in fixed]
    sub = frame[frame.condition.isin(keys + [auto.key, base])]
    wide = sub.pivot_table(index="sample_id", columns="condition", values="score", aggfunc="first")
    need = [k for k in keys + [auto.key, base] if k in wide]
    wide = wide.dropna(subset=need)
    fixed_em = {k: float(wide[k].mean()) for k in keys if k in wide}
    best = max(fixed_em, key=fixed_em.get) if fixed_em else None
    grid = DROP_ALPHAS if auto.method == "focus_drop" else AUTO_ALPHAS
    return {"n": int(len(wide)), "em_auto": float(wide[auto.key].mean()) if auto.key in wide else float("nan"),
            "em_baseline": float(wide[base].mean()) if base in wide else float("nan"),
            "best_fixed": best, "em_best_fixed": fixed_em.get(best, float("nan")),
            "best_fixed_selected_on": fixed_selected_on,
            "em_ceiling": float(wide[[k for k in keys + [base] if k in wide]].max(axis=1).mean()),
            "probe_rows_per_prompt": len(grid), "probe_steps_per_prompt": 1}


def bias_shares(
    model: TransformerBridge, samples: Sequence[Any], directions: FocusDirections, heads: Sequence[Head], alpha: float,
    *, first: int = 200,
) -> pd.DataFrame:
    """The position prior of a directions set: per sample and head, the key bias it adds to the
    last prompt row's logits (`key_bias`) read as an attention distribution of its own
    (softmax over the prompt: the constant part cancels), and its mass on the gold document and
    on the first `first` tokens, beside the shares those spans have of the prompt's tokens."""
    rows = []
    for s in samples:
        gold = s.gold_span
        for head in heads:
            w = torch.softmax(key_bias(model, s, directions, head, alpha).double(), dim=-1)
            rows.append({"sample_id": s.id, "head": f"L{head[0]}H{head[1]}", "gold": float(w[gold.slice].sum()),
                         "first": float(w[:first].sum()), "gold_tokens": len(gold) / s.n_tokens,
                         "first_tokens": min(first, s.n_tokens) / s.n_tokens})
    return pd.DataFrame(rows)


def position_prior(
    model: TransformerBridge, samples: Sequence[Any], directions: Mapping[str, FocusDirections], heads: Sequence[Head],
    alphas: Mapping[str, float], *, first: int = 200,
) -> dict[str, Any]:
    """`bias_shares` of each directions set at its alpha, as a JSON-able dict (what
    `Workspace.keep` stores) holding the setup that made it (`prior_setup`)."""
    return {"setup": prior_setup(model, samples, directions, heads, alphas, first=first),
            "shares": {name: bias_shares(model, samples, d, heads, alphas[name], first=first).to_dict(orient="list")
                       for name, d in directions.items()}}


def prior_setup(
    model: TransformerBridge, samples: Sequence[Any], directions: Mapping[str, FocusDirections], heads: Sequence[Head],
    alphas: Mapping[str, float], *, first: int = 200,
) -> dict[str, Any]:
    """Everything that determines `position_prior`'s shares: model, its dtype (named unless
    float32, as in a row's setup), probes, heads, each set's directions and alpha, and the width
    of the early window."""
    from fdlib.study.runner import directions_sha, dtype_setup, model_fingerprint

    return {**model_fingerprint(model), **dtype_setup(model), "samples": [s.id for s in samples],
            "heads": [f"L{l}H{h}" for l, h in heads],
            "directions": {name: directions_sha(d) for name, d in sorted(directions.items())},
            "alphas": {name: float(alphas[name]) for name in sorted(directions)}, "first": first}


def prior_shares(kept: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The per-set `bias_shares` frames of a `position_prior` dict (as `Workspace.keep` returns
    it, having checked its setup)."""
    return {name: pd.DataFrame(v) for name, v in kept["shares"].items()}
