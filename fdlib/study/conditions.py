"""`Condition`: one way to decode a sample, the one description every study, grid, table and
command line uses.

A condition says what is done (nothing, span reweighting with a named map, focus directions,
head ablation), where (the top-k of a named head ranking, k random heads with a seed, or an
explicit list), on which input variant of a sample, and on which rows (the answer rows, or
every row). Its `key` is stable text for stores and its `label` a short name for figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from fdlib.core.heads import Head, head_label, random_heads
from fdlib.core.spans import Span
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.reweighting import IDENTITY, PARAMETER, SPAN_MAPS, check_strength
from fdlib.interventions.row import RowIntervention

Method = Literal["baseline", "split", "odds", "boost", "focus", "focus_auto", "focus_kept", "focus_drop", "ablate"]
METHODS: tuple[str, ...] = ("baseline", "split", "odds", "boost", "focus", "focus_auto", "focus_kept", "focus_drop",
                            "ablate")
# Focus directions with alpha chosen per input: the closest to an absolute or a relative sink
# target (`focus_auto`, `focus_kept`), or the smallest that removes a share of the input's own
# sink share (`focus_drop`).
AUTO: tuple[str, ...] = ("focus_auto", "focus_kept", "focus_drop")
FOCUS: tuple[str, ...] = ("focus",) + AUTO
# Automatic alpha: the candidates one probe step tries per input (`fdlib.study.runner.choose_alpha`).
AUTO_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
# `focus_drop`'s candidates: finer where small alphas already move the sink, on to the overshoot.
DROP_ALPHAS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0)
# The sink span the automatic alphas measure (`fdlib.data.nq`: "sink" is token 0, "sink2"
# tokens 0-1, the authors' definition).
AUTO_SINK: dict[str, str] = {"focus_auto": "sink", "focus_kept": "sink", "focus_drop": "sink2"}
Rows = Literal["response", "all"]
RANDOM = "random"  # the head choice drawing k heads with a seed
LIST = "list"  # the head choice naming its heads


@dataclass(frozen=True)
class Condition:
    """One way to decode a sample.

    - `method`: "baseline" (no intervention); "split" / "odds" / "boost" (span reweighting of the
      `span` named on the sample, parameter `value` = tau / a / m, see `fdlib.interventions.reweighting`);
      "focus" (focus directions: `directions` names a set handed to the runner, `value` = alpha);
      "focus_auto" (focus directions with alpha chosen per input: `value` is the target share of
      the heads' attention on the sink at the first answer row, see `fdlib.study.runner.choose_alpha`);
      "focus_kept" (the same with a relative target: `value` is the fraction of the input's own
      unsteered sink share to keep);
      "focus_drop" (per input, the smallest alpha whose directions remove at least the share
      `value` of the heads' own unsteered attention on the sink, tokens 0-1, at the first answer
      row; measured and targeted on the same heads and row);
      "ablate" (the heads' outputs zeroed).
    - where: `heads` names a ranking handed to the runner (e.g. "contextual", "retrieval"), whose
      first `k` are used; or `heads="random"` with `k` and `seed`; or `heads="list"` with
      `head_list`.
    - `input`: the sample variant decoded ("long", "gold", "negative"; task samples are "long").
    - `rows`: "response" (from the last prompt row on, decoded from the shared prefix) or "all"
      (every row, so the prompt is prefilled again under the intervention).
    """

    method: Method = "baseline"
    value: float | None = None
    heads: str | None = None
    k: int | None = None
    seed: int | None = None
    head_list: tuple[Head, ...] | None = None
    directions: str | None = None
    input: str = "long"
    rows: Rows = "response"
    span: str = "relevant"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: expected one of {METHODS}")
        if not isinstance(self.input, str) or not self.input:
            raise ValueError(f"input must name a sample variant, got {self.input!r}")
        if self.rows not in ("response", "all"):
            raise ValueError(f"rows must be 'response' or 'all', got {self.rows!r}")
        if self.method == "baseline":
            extra = {n: getattr(self, n) for n in ("value", "heads", "k", "seed", "head_list", "directions")
                     if getattr(self, n) is not None}
            if extra or self.rows != "response" or self.span != "relevant":
                raise ValueError(f"a baseline takes no {sorted(extra) or ['rows / span']}: {self}")
            return
        if self.method in SPAN_MAPS:
            object.__setattr__(self, "value", check_strength(self.method, self.value))
            if self.directions is not None:
                raise ValueError(f"span reweighting takes no directions: {self}")
            if self.rows != "response":
                raise ValueError(f"span reweighting acts on the answer rows only (rows='response'): {self}")
        elif self.method in FOCUS:
            if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
                raise ValueError(f"{self.parameter} must be a finite number, got {self.value!r}")
            if self.method in AUTO and not 0 < self.value < 1:
                what = {"focus_auto": "target sink share", "focus_kept": "fraction of the sink share kept",
                        "focus_drop": "share of the sink share removed"}[self.method]
                raise ValueError(f"the {what} must be in (0, 1), got {self.value!r}")
            if self.method in AUTO and self.rows != "response":
                raise ValueError(f"automatic alpha probes the shared prefix: rows must be 'response': {self}")
            object.__setattr__(self, "value", float(self.value))
            if not self.directions or not isinstance(self.directions, str):
                raise ValueError(f"focus directions need the name of a directions set: {self}")
        else:  # ablate
            if self.value is not None or self.directions is not None:
                raise ValueError(f"ablation takes heads and rows only: {self}")
        self._check_heads()

    def _check_heads(self) -> None:
        if not self.heads or not isinstance(self.heads, str):
            raise ValueError(f"{self.method} needs heads: a ranking's name, 'random' or 'list', got {self.heads!r}")
        if self.heads == LIST:
            if not self.head_list or self.k is not None or self.seed is not None:
                raise ValueError(f"heads='list' takes a non-empty head_list and no k or seed: {self}")
            try:
                hs = tuple((int(l), int(h)) for l, h in self.head_list)
            except (TypeError, ValueError):
                raise ValueError(f"head_list must hold (layer, head) pairs, got {self.head_list!r}") from None
            object.__setattr__(self, "head_list", hs)
            return
        if self.head_list is not None:
            raise ValueError(f"head_list goes with heads='list': {self}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if (self.heads == RANDOM) != (self.seed is not None):
            raise ValueError(f"random heads need a seed and a named ranking takes none: {self}")

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def baseline(cls, input: str = "long") -> "Condition":
        return cls("baseline", input=input)

    @classmethod
    def reweight(cls, span_map: str, value: float, heads: str | Sequence[Head] = "contextual", k: int | None = None,
                 *, seed: int | None = None, input: str = "long", span: str = "relevant") -> "Condition":
        return cls(span_map, value, input=input, span=span, **_where(heads, k, seed))  # type: ignore[arg-type]

    @classmethod
    def split(cls, tau: float, heads: str | Sequence[Head] = "contextual", k: int | None = None, **kw) -> "Condition":
        return cls.reweight("split", tau, heads, k, **kw)

    @classmethod
    def focus(cls, alpha: float, directions: str, heads: str | Sequence[Head] = "contextual", k: int | None = None,
              *, seed: int | None = None, rows: Rows = "response", input: str = "long") -> "Condition":
        return cls("focus", alpha, directions=directions, rows=rows, input=input, **_where(heads, k, seed))

    @classmethod
    def focus_auto(cls, target_sink: float, directions: str, heads: str | Sequence[Head] = "contextual",
                   k: int | None = None, *, seed: int | None = None, input: str = "long") -> "Condition":
        return cls("focus_auto", target_sink, directions=directions, input=input, **_where(heads, k, seed))

    @classmethod
    def focus_kept(cls, kept: float, directions: str, heads: str | Sequence[Head] = "contextual",
                   k: int | None = None, *, seed: int | None = None, input: str = "long") -> "Condition":
        return cls("focus_kept", kept, directions=directions, input=input, **_where(heads, k, seed))

    @classmethod
    def focus_drop(cls, drop: float, directions: str, heads: str | Sequence[Head] = "contextual",
                   k: int | None = None, *, seed: int | None = None, input: str = "long") -> "Condition":
        return cls("focus_drop", drop, directions=directions, input=input, **_where(heads, k, seed))

    @classmethod
    def ablate(cls, heads: str | Sequence[Head] = "contextual", k: int | None = None, *, seed: int | None = None,
               rows: Rows = "response", input: str = "long") -> "Condition":
        return cls("ablate", rows=rows, input=input, **_where(heads, k, seed))

    # -- what it is --------------------------------------------------------------------------

    @property
    def is_baseline(self) -> bool:
        return self.method == "baseline"

    @property
    def is_reweight(self) -> bool:
        return self.method in SPAN_MAPS

    @property
    def identity(self) -> bool:
        """True when the condition cannot change the answer (alpha = 0, tau = a = m = 1): it is
        decoded as the baseline."""
        if self.method == "focus":
            return self.value == 0
        return self.is_reweight and self.value == IDENTITY[self.method]

    @property
    def parameter(self) -> str | None:
        """The name of `value`: tau, a, m, alpha, or the automatic alpha's sink target or kept fraction."""
        if self.is_reweight:
            return PARAMETER[self.method]
        return {"focus": "alpha", "focus_auto": "sink", "focus_kept": "kept", "focus_drop": "drop"}.get(self.method)

    def head_set(self, rankings: dict[str, Sequence[Head]], n_layers: int, n_heads: int) -> list[Head]:
        """The heads this condition acts on, resolved against named rankings and the model's size."""
        if self.is_baseline:
            return []
        if self.heads == LIST:
            return list(self.head_list or ())
        if self.heads == RANDOM:
            return random_heads(n_layers, n_heads, self.k, self.seed)
        if self.heads not in rankings:
            raise ValueError(f"condition {self.key!r} needs the head ranking {self.heads!r}; given: {sorted(rankings)}")
        ranked = list(rankings[self.heads])
        if self.k > len(ranked):
            raise ValueError(f"condition {self.key!r} needs {self.k} heads but ranking {self.heads!r} has {len(ranked)}")
        return ranked[: self.k]

    def row(self, heads: Sequence[Head], spans: Mapping[str, Span], directions: Mapping[str, FocusDirections],
            alpha: float | None = None) -> RowIntervention:
        """What this condition does to a row, on `heads` (its `head_set`), for a sample with these
        named `spans`: the one translation the batched engine, the sequential path
        (`fdlib.interventions.row.intervene`) and the explorer all execute. `alpha` is the one
        chosen for an automatic alpha (`fdlib.study.runner.choose_alpha`)."""
        if self.is_baseline or self.identity:
            return RowIntervention()
        if self.is_reweight:
            return RowIntervention(tuple(heads), span_map=self.method, strength=self.value, span=spans[self.span])
        if self.method in FOCUS:
            if self.method in AUTO and alpha is None:
                raise ValueError(f"{self.key}: choose its alpha first (choose_alpha)")
            if self.directions not in directions:
                raise ValueError(f"condition {self.key!r} needs directions {self.directions!r}; given: {sorted(directions)}")
            d = directions[self.directions]
            untrained = [head_label(l, h) for l, h in heads if not (d.d_q[l, h].any() or d.d_k[l, h].any())]
            if untrained:
                raise ValueError(f"condition {self.key!r}: directions {self.directions!r} hold no trained vector for "
                                 f"heads {untrained} (a set trained on other heads); train them or choose other heads")
            return RowIntervention(tuple(heads), directions=directions[self.directions],
                                   alpha=self.value if alpha is None else alpha)
        return RowIntervention(tuple(heads), ablate=True)

    def _where_text(self, sep: str) -> str:
        if self.heads == LIST:
            return f"heads={','.join(head_label(l, h) for l, h in self.head_list)}"
        tail = f"{sep}seed={self.seed}" if self.seed is not None else ""
        return f"{self.heads}{sep}k={self.k}{tail}"

    @property
    def key(self) -> str:
        """Stable text key: method, parameter, head choice, and input / rows / span where they
        are not the defaults."""
        if self.is_baseline:
            return f"baseline|{self.input}"
        parts = [self.method]
        if self.method in FOCUS:
            parts.append(self.directions)
        if self.parameter:
            parts.append(f"{self.parameter}={self.value:g}")
        parts.append(self._where_text("|"))
        if self.input != "long":
            parts.append(f"input={self.input}")
        if self.rows != "response":
            parts.append(f"rows={self.rows}")
        if self.span != "relevant":
            parts.append(f"span={self.span}")
        return "|".join(parts)

    @property
    def label(self) -> str:
        """A short human label (a table's column, a legend entry): the method and its parameter,
        the heads (a focus condition on the contextual ranking says only k), all rows, and the
        input where not the long one. The directions set is not in it: tables refuse two
        conditions sharing a label."""
        if self.is_baseline:
            return "baseline" if self.input == "long" else f"baseline ({self.input})"
        param = f" {self.parameter}={self.value:g}" if self.parameter else ""
        heads = self._where_text(" ")
        if self.method in FOCUS and self.heads == "contextual":
            heads = f"k={self.k}"
        extra = "".join(f", {t}" for t in (
            "all rows" if self.rows == "all" else "",
            f"input {self.input}" if self.input != "long" else "",
            f"span {self.span}" if self.span != "relevant" else "",
        ) if t)
        return f"{self.method}{param}, {heads}{extra}" if self.method != "ablate" else f"ablate {heads}{extra}"


def _where(heads: str | Sequence[Head], k: int | None, seed: int | None) -> dict:
    if isinstance(heads, str):
        return {"heads": heads, "k": k, "seed": seed}
    if k is not None or seed is not None:
        raise ValueError("an explicit head list takes no k or seed")
    return {"heads": LIST, "head_list": tuple(tuple(h) for h in heads)}


def baselines(inputs: Sequence[str] = ("long", "gold", "negative")) -> list[Condition]:
    return [Condition.baseline(v) for v in inputs]


def reweight_conditions(
    values: Sequence[float],
    ks: Sequence[int],
    *,
    span_map: str = "split",
    seeds: Sequence[int] = (0,),
    rankings: Sequence[str] = ("contextual",),
    n_total_heads: int | None = None,
) -> list[Condition]:
    """value x k x (each ranking, random heads per seed). At k = every head the random set is
    the ranking's set, so it is left out."""
    out = []
    for v in values:
        for k in ks:
            out += [Condition.reweight(span_map, v, r, k) for r in rankings]
            if k != n_total_heads:
                out += [Condition.reweight(span_map, v, RANDOM, k, seed=s) for s in seeds]
    return out


def focus_conditions(
    alphas: Sequence[float],
    ks: Sequence[int],
    *,
    directions: str,
    seeds: Sequence[int] = (0,),
    random_alphas: Sequence[float] | None = None,
    random_ks: Sequence[int] | None = None,
    rows: Rows = "response",
    rankings: Sequence[str] = ("contextual",),
) -> list[Condition]:
    """alpha x k x (each ranking, random heads per seed) for one named directions set;
    `random_alphas` / `random_ks` restrict the random-head controls to some alphas / ks (default:
    all; a set trained on some heads only has vectors for those random heads)."""
    rand = set(alphas if random_alphas is None else random_alphas)
    rand_k = set(ks if random_ks is None else random_ks)
    out = []
    for a in alphas:
        for k in ks:
            out += [Condition.focus(a, directions, r, k, rows=rows) for r in rankings]
            if a in rand and k in rand_k:
                out += [Condition.focus(a, directions, RANDOM, k, seed=s, rows=rows) for s in seeds]
    return out
