"""The sweep engine: per question, one prefill per input variant, then every configuration
decodes its greedy answer from that shared cache; results go to the SQLite store, one
transaction per question, resumable and shardable.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from fdlib.data import NQBuilder, QASample, Size
from fdlib.decoding import Prefix, decode, prefill
from fdlib.directions import FocusDirections, focus_directions
from fdlib.evaluate import best_subspan_em, bootstrap_ci
from fdlib.interventions import Head, check_tau, split_softmax
from fdlib.models import model_name
from fdlib.store import Row, Store, open_store

Input = Literal["long", "gold", "negative"]
HeadSet = Literal["contextual", "random"]
Rows = Literal["response", "all"]


@dataclass(frozen=True)
class SweepConfig:
    """One configuration: a baseline (no intervention) on an input variant; split-softmax with
    `tau`; or focus directions (`directions` names one of the sets handed to `run_sweep`) with
    `alpha`, on the top-k contextual heads or on k random heads (seeded) of the long input.

    Focus directions touch the response rows only by default (`rows="response"`: the query
    rows from the last prompt token on, decoded from the shared prefill); `rows="all"` is the
    paper's setting (every query row, so the prompt is prefilled again under the hooks).
    """

    input: Input = "long"
    tau: float | None = None
    heads: HeadSet | None = None
    k: int | None = None
    seed: int | None = None
    alpha: float | None = None
    directions: str | None = None
    rows: Rows = "response"

    def __post_init__(self) -> None:
        if self.input not in ("long", "gold", "negative"):
            raise ValueError(f"unknown input {self.input!r}: expected 'long', 'gold' or 'negative'")
        if self.rows not in ("response", "all"):
            raise ValueError(f"rows must be 'response' or 'all', got {self.rows!r}")
        if self.tau is None and self.alpha is None:
            if (self.heads, self.k, self.seed, self.directions) != (None, None, None, None) or self.rows != "response":
                raise ValueError(f"a baseline takes no heads, k, seed, directions or rows: {self}")
            return
        if self.tau is not None and self.alpha is not None:
            raise ValueError(f"one intervention per configuration: tau and alpha are both set in {self}")
        if self.tau is not None:
            check_tau(self.tau)
            if self.directions is not None or self.rows != "response":
                raise ValueError(f"split-softmax takes no directions or rows: {self}")
        else:
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
                raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
            if not self.directions:
                raise ValueError(f"focus directions need the name of a directions set: {self}")
        if self.input != "long":
            raise ValueError(f"interventions run on the long input, got input={self.input!r}")
        if self.heads not in ("contextual", "random"):
            raise ValueError(f"heads must be 'contextual' or 'random', got {self.heads!r}")
        if self.k is None or self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k!r}")
        if (self.heads == "random") != (self.seed is not None):
            raise ValueError(f"random heads need a seed and contextual heads take none: {self}")

    @property
    def is_baseline(self) -> bool:
        return self.tau is None and self.alpha is None

    @property
    def method(self) -> str:
        return "baseline" if self.is_baseline else ("split" if self.tau is not None else "focus")

    @property
    def key(self) -> str:
        """Stable text key for the store."""
        if self.is_baseline:
            return f"baseline|{self.input}"
        tail = f"|seed={self.seed}" if self.seed is not None else ""
        if self.tau is not None:
            return f"split|tau={self.tau:g}|{self.heads}|k={self.k}{tail}"
        rows = "|rows=all" if self.rows == "all" else ""
        return f"focus|{self.directions}|alpha={self.alpha:g}|{self.heads}|k={self.k}{tail}{rows}"


def baselines() -> list[SweepConfig]:
    return [SweepConfig(input=v) for v in ("long", "gold", "negative")]


# The paper's grid; `quick` is a handful of configurations CI can run.
GRIDS: dict[str, dict] = {
    "quick": dict(taus=(0.1, 1000.0), ks=(5, 20), seeds=(0,)),
    "full": dict(taus=(0.1, 0.3, 0.6, 1.5, 1000.0), ks=(1, 5, 10, 20, 30, 50, 100, 150, 200), seeds=(0, 1, 2)),
}


def split_grid(
    size: Size = "quick",
    *,
    n_total_heads: int | None = None,
    taus: Sequence[float] | None = None,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[SweepConfig]:
    """Baselines + tau x k x (contextual, random per seed). `n_total_heads` adds k = all heads
    and drops larger k."""
    g = GRIDS[size]
    taus = g["taus"] if taus is None else taus
    ks = list(g["ks"] if ks is None else ks)
    seeds = g["seeds"] if seeds is None else seeds
    if n_total_heads is not None:
        ks = sorted({k for k in ks if k <= n_total_heads} | ({n_total_heads} if size == "full" else set()))
    out = baselines()
    for tau in taus:
        for k in ks:
            out.append(SweepConfig(tau=tau, heads="contextual", k=k))
            if k != n_total_heads:  # k = every head: the random set is the contextual set
                out += [SweepConfig(tau=tau, heads="random", k=k, seed=s) for s in seeds]
    return out


# The paper's alpha x k study (alpha = 0 is the long baseline: the identity, not decoded again).
FOCUS_GRIDS: dict[str, dict] = {
    "quick": dict(alphas=(0.5,), ks=(5,), seeds=(0,)),
    "full": dict(alphas=(-0.5, -0.2, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0), ks=(1, 5, 10, 20, 50, 100), seeds=(0,)),
}


def focus_grid(
    size: Size = "quick",
    *,
    directions: str,
    alphas: Sequence[float] | None = None,
    ks: Sequence[int] | None = None,
    seeds: Sequence[int] | None = None,
    random_alphas: Sequence[float] | None = None,
    rows: Rows = "response",
    with_baselines: bool = True,
) -> list[SweepConfig]:
    """(Baselines +) alpha x k x (contextual, random per seed) for one named directions set.
    `random_alphas` restricts the random-head controls to some alphas (default: all)."""
    g = FOCUS_GRIDS[size]
    alphas = g["alphas"] if alphas is None else alphas
    ks = g["ks"] if ks is None else ks
    seeds = g["seeds"] if seeds is None else seeds
    rand = set(alphas if random_alphas is None else random_alphas)
    out = baselines() if with_baselines else []
    for a in alphas:
        for k in ks:
            out.append(SweepConfig(alpha=a, directions=directions, heads="contextual", k=k, rows=rows))
            if a in rand:
                out += [SweepConfig(alpha=a, directions=directions, heads="random", k=k, seed=s, rows=rows) for s in seeds]
    return out


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    """k distinct heads drawn uniformly, reproducibly (Python's Random is stable across versions)."""
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    return random.Random(seed).sample(every, k)


@dataclass(frozen=True)
class QuestionInputs:
    """The three variants of one question; `long` holds the gold span the intervention uses."""

    long: QASample
    gold: QASample
    negative: QASample

    @property
    def id(self) -> str:
        return self.long.id.split("/")[0]

    def get(self, variant: Input) -> QASample:
        return getattr(self, variant)


def question_inputs(
    model: TransformerBridge,
    *,
    split: str = "test",
    size: Size | int = "quick",
    n_docs: int = 20,
    gold_position: int | None = None,
) -> list[QuestionInputs]:
    b = NQBuilder(model.tokenizer)
    kw = dict(split=split, size=size)
    long = b.samples(n_docs=n_docs, gold_position=gold_position, **kw)
    gold = b.samples(variant="gold", **kw)
    neg = b.samples(variant="negative", n_docs=n_docs, **kw)
    return [QuestionInputs(*t) for t in zip(long, gold, neg, strict=True)]


def _heads_for(config: SweepConfig, ranked: Sequence[Head], n_layers: int, n_heads: int) -> list[Head]:
    if config.heads == "contextual":
        if config.k > len(ranked):
            raise ValueError(f"k={config.k} but only {len(ranked)} ranked contextual heads were given")
        return list(ranked[: config.k])
    return random_heads(n_layers, n_heads, config.k, config.seed)


def run_config(
    model: TransformerBridge,
    sample: QASample,
    prefix: Prefix,
    config: SweepConfig,
    heads: Sequence[Head],
    *,
    max_new_tokens: int,
    directions: Mapping[str, FocusDirections] | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Decode one configuration from a shared prefix; returns the record (answer, EM, the
    configuration's fields) and the gold and sink scores of every head."""
    spans = {"sink": sample.sink_span}
    if sample.gold_span is not None:
        spans["gold"] = sample.gold_span
    last = sample.n_tokens - 1  # the last prompt row produces the first answer token
    if config.is_baseline:
        answer = decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)
    elif config.tau is not None:
        with split_softmax(model, heads, sample.gold_span, config.tau, from_pos=last):
            answer = decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)
    else:
        dirs = _directions_for(config, directions)
        if config.rows == "response":
            with focus_directions(model, dirs, heads, config.alpha, from_pos=last):
                answer = decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)
        else:  # every row: the prompt's cache must be computed under the directions too
            with focus_directions(model, dirs, heads, config.alpha, from_pos=0):
                own = prefill(model, sample.input_ids, fast=False)
                answer = decode(model, own, max_new_tokens=max_new_tokens, spans=spans)
    record = {
        "config": config.key,
        "model": model_name(model),
        "answer": answer.text,
        "em": best_subspan_em(answer.text, sample.answers),
        "n_answer_tokens": len(answer.tokens),
        **asdict(config),
    }
    arrays = {f"{name}_score": s.numpy() for name, s in answer.scores.items()}
    return record, arrays


def _directions_for(config: SweepConfig, directions: Mapping[str, FocusDirections] | None) -> FocusDirections:
    if not directions or config.directions not in directions:
        have = sorted(directions) if directions else []
        raise ValueError(f"configuration {config.key!r} needs directions {config.directions!r}; given: {have}")
    return directions[config.directions]


def run_sweep(
    model: TransformerBridge,
    questions: Sequence[QuestionInputs],
    configs: Sequence[SweepConfig],
    *,
    ranked_heads: Sequence[Head],
    store: str | Path | Store,
    shard: tuple[int, int] = (0, 1),
    max_new_tokens: int = 32,
    progress: bool = True,
    directions: Mapping[str, FocusDirections] | None = None,
) -> None:
    """Run every configuration on every question of this shard, skipping stored results.

    Per question: one prefill per input variant that a pending configuration needs, every
    configuration decoded from a shared cache, all rows of the question written in one
    transaction. `shard=(i, n)` takes questions i, i+n, i+2n, ... (one job of a cluster array).
    """
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    keys = [c.key for c in configs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate configurations in the sweep")
    for c in configs:  # fail before any work, not after an hour of it
        if c.alpha is not None:
            _directions_for(c, directions).check(model)
    mine = list(questions)[i::n]
    config_tag = f"{model_name(model)}|greedy{max_new_tokens}"
    with open_store(store) as db:
        done = db.keys()
        todo = [(q, [c for c in configs if (q.id, f"{config_tag}|{c.key}") not in done]) for q in mine]
        total = sum(len(c) for _, c in todo)
        bar = tqdm(total=total, desc=f"sweep shard {i}/{n}", unit="config", disable=not progress)
        L, H = model.cfg.n_layers, model.cfg.n_heads
        for q, pending in todo:
            if not pending:
                continue
            rows = []
            for variant in ("long", "gold", "negative"):
                these = [c for c in pending if c.input == variant]
                if not these:
                    continue
                sample = q.get(variant)
                prefix = prefill(model, sample.input_ids)  # shared by every configuration below
                for c in these:
                    heads = [] if c.is_baseline else _heads_for(c, ranked_heads, L, H)
                    record, arrays = run_config(model, sample, prefix, c, heads, max_new_tokens=max_new_tokens,
                                                directions=directions)
                    rows.append(Row(q.id, f"{config_tag}|{c.key}", record, arrays))
                    bar.update(1)
            db.put(rows)  # one transaction per question: a crash loses at most this question
        bar.close()


def merge_stores(sources: Sequence[str | Path], target: str | Path) -> int:
    """Merge shard stores into one; a (sample, configuration) present twice is kept once."""
    out = Store(target)
    try:
        for src in sources:
            with Store(src) as s:
                have = out.keys()
                out.put([r for r in s.rows() if (r.sample_id, r.config) not in have])
        return len(out)
    finally:
        out.close()


def sweep_frame(store: str | Path | Store) -> pd.DataFrame:
    """One row per (question, configuration) with the configuration's fields, answer and EM."""
    with open_store(store) as db:
        rows = [{"question": r.sample_id, **r.record} for r in db.rows()]
    return pd.DataFrame(rows)


def em_table(frame: pd.DataFrame, *, level: float = 0.95) -> pd.DataFrame:
    """EM with bootstrap CIs per configuration; random-head seeds are pooled per (tau, k)."""
    f = frame.copy()
    for col, fill in (("heads", "none"), ("directions", "none"), ("rows", "response")):
        f[col] = f[col].fillna(fill) if col in f else fill  # stores older than a field lack it
    for col in ("tau", "k", "alpha"):
        f[col] = f[col].astype(float) if col in f else float("nan")
    f["method"] = np.where(f["tau"].notna(), "split", np.where(f["alpha"].notna(), "focus", "baseline"))
    keys = ["method", "input", "heads", "directions", "rows", "tau", "alpha", "k"]
    rows = []
    for vals, g in f.groupby(keys, dropna=False):
        # pool seeds: a question's EM is its mean over seeds, so each question counts once
        per_q = g.groupby("question")["em"].mean().to_numpy(dtype=float)
        mean, lo, hi = bootstrap_ci(per_q, level=level)
        rows.append({**dict(zip(keys, vals)), "em": mean, "lo": lo, "hi": hi, "n": len(per_q)})
    order = ["method", "heads", "directions", "rows", "tau", "alpha", "k"]
    return pd.DataFrame(rows).sort_values(order, na_position="first").reset_index(drop=True)


def mcnemar(frame: pd.DataFrame, config_a: str, config_b: str) -> dict[str, float]:
    """Exact McNemar test (binomial on discordant questions) of two configurations' EM."""
    from scipy.stats import binomtest

    a = frame[frame.config == config_a].set_index("question")["em"]
    b = frame[frame.config == config_b].set_index("question")["em"]
    both = a.to_frame("a").join(b.to_frame("b"), how="inner")
    if both.empty:
        raise ValueError(f"no question has both {config_a!r} and {config_b!r}")
    only_a = int((both.a & ~both.b).sum())
    only_b = int((~both.a & both.b).sum())
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"n": len(both), "only_a": only_a, "only_b": only_b, "p_value": float(p),
            "em_a": float(both.a.mean()), "em_b": float(both.b.mean())}


def attention_per_document(
    model: TransformerBridge,
    sample: QASample,
    head: Head,
    *,
    tau: float | None = None,
    directions: FocusDirections | None = None,
    alpha: float | None = None,
    heads: Sequence[Head] | None = None,
    max_new_tokens: int = 32,
) -> dict[str, object]:
    """One head's attention mass on each document, from the answer rows, without and with an
    intervention on `heads` (default: that head alone) — split-softmax with `tau`, or focus
    directions with `alpha` on the response rows — both decoded from one prefill."""
    if sample.gold_span is None:
        raise ValueError(f"sample {sample.id} has no gold document")
    if (tau is None) == (directions is None or alpha is None):
        raise ValueError("give either tau (split-softmax) or directions and alpha (focus directions)")
    spans = {f"doc{i}": s for i, s in enumerate(sample.doc_spans)}
    prefix = prefill(model, sample.input_ids)
    before = decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)
    chosen = heads or [head]
    if tau is not None:
        ctx = split_softmax(model, chosen, sample.gold_span, tau, from_pos=sample.n_tokens - 1)
    else:
        ctx = focus_directions(model, directions, chosen, alpha, from_pos=sample.n_tokens - 1)
    with ctx:
        after = decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)
    layer, h = head

    def per_doc(answer):
        return [float(answer.scores[f"doc{i}"][layer, h]) for i in range(len(sample.doc_spans))] if answer.scores else []

    return {
        "before": per_doc(before), "after": per_doc(after),
        "answer_before": before.text, "answer_after": after.text,
        "em_before": best_subspan_em(before.text, sample.answers), "em_after": best_subspan_em(after.text, sample.answers),
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: one sweep (or one shard of it) into a store; see the README's SLURM example."""
    import argparse

    from fdlib.models import DEFAULT_MODEL, load_model
    from fdlib.scoring import contextual_study

    ap = argparse.ArgumentParser(prog="python -m fdlib.sweeps", description="split-softmax sweep")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--size", choices=["quick", "full"], default="quick", help="grid and question count")
    ap.add_argument("--questions", type=int, help="number of test questions (overrides --size)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N test questions")
    ap.add_argument("--taus", type=float, nargs="+")
    ap.add_argument("--ks", type=int, nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--heads-size", default="quick", help="size of the train-split study ranking the heads")
    ap.add_argument("--heads-store", default="runs/contextual.sqlite")
    ap.add_argument("--store", default="runs/sweep.sqlite")
    ap.add_argument("--shard", type=int, nargs=2, default=(0, 1), metavar=("I", "N"))
    args = ap.parse_args(argv)
    model = load_model(args.model)
    heads_size = int(args.heads_size) if args.heads_size.isdigit() else args.heads_size
    study = contextual_study(model, size=heads_size, split="train", store=args.heads_store)
    n_total = model.cfg.n_layers * model.cfg.n_heads
    count = args.questions if args.questions is not None else args.size
    if isinstance(count, int):
        count += args.skip
    questions = question_inputs(model, split="test", size=count)[args.skip :]
    configs = split_grid(args.size, n_total_heads=n_total, taus=args.taus, ks=args.ks, seeds=args.seeds)
    run_sweep(model, questions, configs, ranked_heads=study.heads(n_total), store=args.store, shard=tuple(args.shard))


if __name__ == "__main__":
    main()
