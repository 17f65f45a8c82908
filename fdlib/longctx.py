"""Long-context studies (issue 7): focus directions on HELMET-style tasks (the paper's Table 2),
the spread of the contextual heads' sink scores across tasks (its Tables 12-13), lost in the
middle, and retrieval heads (Wu et al., 2024) against contextual heads (its Figure 9).

One engine, `run_conditions`, serves all of them: per sample one prefill, then every condition
(no intervention, split-softmax, focus directions, head ablation) decodes its greedy answer from
that shared KV cache. The interventions touch the answer rows only (from the last prompt row on),
unless a condition asks for `rows="all"`, which prefills the prompt again under the hooks. Each
sample's rows go to the SQLite store in one transaction, so a rerun skips what is stored. Tables
are built from the store (`study_frame`); figures from the tables (`fdlib.plots`).

Lengths: a study length L is the whole budget, prompt + answer. Prompts get
`L - max_new_tokens` tokens (so 8192 fits an 8192-token window with a 32-token answer), and a
length above the model's context window is refused before any sample is built.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from fdlib.data import NQBuilder, QASample, sized
from fdlib.decoding import Answer, Prefix, check_length, decode, prefill
from fdlib.directions import FocusDirections, focus_directions
from fdlib.evaluate import best_subspan_em, bootstrap_ci
from fdlib.interventions import (
    Head,
    ablate_heads,
    check_heads,
    check_tau,
    split_softmax,
)
from fdlib.models import model_name
from fdlib.spans import Span
from fdlib.store import Row, Store
from fdlib.tasks import NQ_TASKS, TASKS, TaskSample, task_samples
from fdlib.tasks import score as task_score

Method = Literal["baseline", "split", "focus", "ablate"]
Rows = Literal["response", "all"]
Size = Literal["quick", "full"]

# The paper's Table 2 grid: focus directions at alpha on the top-k contextual heads.
ALPHAS: tuple[float, ...] = (-0.2, 0.0, 0.2)
KS: tuple[int, ...] = (10, 20)
SINK_K = 5  # the heads whose sink score the spread tables report
LENGTHS: dict[str, tuple[int, ...]] = {"quick": (2048,), "full": (2048, 4096, 8192)}
TASK_SAMPLES: dict[str, int] = {"quick": 2, "full": 20}  # per task and length
POSITIONS: tuple[int, ...] = (1, 5, 10, 15, 20)  # gold document among 20
POSITION_QUESTIONS: dict[str, int] = {"quick": 2, "full": 100}  # per gold position
NEEDLES: dict[str, int] = {"quick": 4, "full": 40}  # needle samples ranking the retrieval heads
NEEDLE_TOKENS: dict[str, int] = {"quick": 1024, "full": 2048}
BOOST_QUESTIONS: dict[str, int] = {"quick": 3, "full": 100}
MAX_NEW_TOKENS = 32


# ---------------------------------------------------------------------------------------------
# Conditions


@dataclass(frozen=True)
class Condition:
    """One way to decode a sample: no intervention (`baseline`); split-softmax on the relevant
    span with `tau`; focus directions (`directions` names a set handed to the engine) with
    `alpha`; or zeroing the heads' outputs (`ablate`). `heads` names a ranked head set handed to
    the engine (e.g. "contextual", "retrieval", "random"), of which the first `k` are used.

    Focus directions at alpha = 0 are the identity: such a condition is not decoded again, it
    shares the baseline's answer (its rows say `identity: true`).
    """

    method: Method = "baseline"
    heads: str | None = None
    k: int | None = None
    tau: float | None = None
    alpha: float | None = None
    directions: str | None = None
    rows: Rows = "response"

    def __post_init__(self) -> None:
        if self.method not in ("baseline", "split", "focus", "ablate"):
            raise ValueError(f"unknown method {self.method!r}: expected 'baseline', 'split', 'focus' or 'ablate'")
        if self.rows not in ("response", "all"):
            raise ValueError(f"rows must be 'response' or 'all', got {self.rows!r}")
        if self.method == "baseline":
            if (self.heads, self.k, self.tau, self.alpha, self.directions) != (None,) * 5 or self.rows != "response":
                raise ValueError(f"a baseline takes no heads, k, tau, alpha, directions or rows: {self}")
            return
        if not self.heads or not isinstance(self.heads, str):
            raise ValueError(f"{self.method} needs the name of a head set, got heads={self.heads!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be an int >= 1, got {self.k!r}")
        if self.method == "split":
            check_tau(self.tau)
            if self.alpha is not None or self.directions is not None or self.rows != "response":
                raise ValueError(f"split-softmax takes tau only (answer rows): {self}")
        elif self.method == "focus":
            if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
                raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
            if not self.directions or self.tau is not None:
                raise ValueError(f"focus directions take alpha and the name of a directions set, no tau: {self}")
        elif self.tau is not None or self.alpha is not None or self.directions is not None:
            raise ValueError(f"ablation takes heads, k and rows only: {self}")

    @property
    def identity(self) -> bool:
        """True when the condition cannot change the answer (focus directions at alpha = 0)."""
        return self.method == "focus" and self.alpha == 0

    @property
    def key(self) -> str:
        """Stable text key for the store."""
        rows = "|rows=all" if self.rows == "all" else ""
        if self.method == "baseline":
            return "baseline"
        if self.method == "split":
            return f"split|tau={self.tau:g}|{self.heads}|k={self.k}"
        if self.method == "focus":
            return f"focus|{self.directions}|alpha={self.alpha:g}|{self.heads}|k={self.k}{rows}"
        return f"ablate|{self.heads}|k={self.k}{rows}"

    @property
    def label(self) -> str:
        """A short human label (a table's column)."""
        rows = ", all rows" if self.rows == "all" else ""
        if self.method == "baseline":
            return "baseline"
        if self.method == "split":
            return f"split tau={self.tau:g}, {self.heads} k={self.k}"
        if self.method == "focus":
            heads = "" if self.heads == "contextual" else f"{self.heads} "
            return f"focus alpha={self.alpha:g}, {heads}k={self.k}{rows}"
        return f"ablate {self.heads} k={self.k}{rows}"


BASELINE = Condition()


def task_conditions(alphas: Sequence[float] = ALPHAS, ks: Sequence[int] = KS, *, directions: str = "focus") -> list[Condition]:
    """Table 2's columns: the baseline, then focus directions at every alpha x k (contextual heads)."""
    return [BASELINE] + [Condition("focus", "contextual", k, alpha=float(a), directions=directions) for a in alphas for k in ks]


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True)
class StudySample:
    """A prompt (a `TaskSample` or an NQ `QASample`) and what is stored with each of its rows
    (`meta`: task, length, gold position, ...)."""

    sample: TaskSample | QASample
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.sample.id

    @property
    def n_tokens(self) -> int:
        return self.sample.n_tokens

    @property
    def fingerprint(self) -> str:
        """A hash of the prompt's token ids: stored with each row, so a resumed run notices a
        sample id whose prompt changed (another generator version, tokenizer or seed)."""
        ids = self.sample.input_ids.to("cpu", dtype=torch.int64).numpy().tobytes()
        return hashlib.sha1(ids).hexdigest()[:16]

    @property
    def relevant_span(self) -> Span:
        span = self.sample.relevant_span if isinstance(self.sample, TaskSample) else self.sample.gold_span
        if span is None:
            raise ValueError(f"sample {self.id} has no relevant span (a negative NQ input?)")
        return span

    def spans(self) -> dict[str, Span]:
        """What the answer rows' attention is recorded on: the relevant span and the sink."""
        return {"relevant": self.relevant_span, "sink": self.sample.sink_span}

    def score(self, prediction: str) -> float:
        """The task's metric (best-subspan EM for NQ, NDCG@10 for re-ranking, ...)."""
        if isinstance(self.sample, TaskSample):
            return float(task_score(prediction, self.sample))
        return float(best_subspan_em(prediction, self.sample.answers))


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
    """Samples of every task at every length: `TASK_SAMPLES[size]` per task and length (or
    `size` itself when an int), prompts of `length - max_new_tokens` tokens."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}: expected some of {sorted(TASKS)}")
    n = sized(TASK_SAMPLES, size)
    if lengths is None:
        lengths = LENGTHS[size] if isinstance(size, str) else LENGTHS["quick"]
    lengths = check_lengths(model, lengths, max_new_tokens)
    builder = NQBuilder(model.tokenizer)  # one BM25 index for the NQ tasks
    out = []
    for length in lengths:
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


# ---------------------------------------------------------------------------------------------
# The engine


@contextlib.contextmanager
def _opened(store: str | Path | Store | None) -> Iterator[Store]:
    """A Store for a path (closed afterwards), an open Store passed through, or a throwaway
    in-memory one for None."""
    if isinstance(store, Store):
        yield store
    else:
        with Store(":memory:" if store is None else store) as db:
            yield db


def _intervention(
    model: TransformerBridge,
    sample: StudySample,
    condition: Condition,
    heads: Sequence[Head],
    directions: Mapping[str, FocusDirections],
) -> contextlib.AbstractContextManager:
    # The last prompt row produces the first answer token: interventions on the answer start there.
    from_pos = 0 if condition.rows == "all" else sample.n_tokens - 1
    if condition.method == "baseline":
        return contextlib.nullcontext()
    if condition.method == "split":
        return split_softmax(model, heads, sample.relevant_span, condition.tau, from_pos=from_pos)
    if condition.method == "focus":
        return focus_directions(model, directions[condition.directions], heads, condition.alpha, from_pos=from_pos)
    return ablate_heads(model, heads, from_pos=from_pos)


def decode_condition(
    model: TransformerBridge,
    sample: StudySample,
    prefix: Prefix | None,
    condition: Condition,
    heads: Sequence[Head],
    *,
    directions: Mapping[str, FocusDirections] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> Answer:
    """One greedy answer under one condition, with every head's attention on the relevant span
    and on the sink from the answer rows. `rows="response"` decodes from the shared `prefix`
    (restored afterwards); `rows="all"` prefills the prompt again under the hooks."""
    with _intervention(model, sample, condition, heads, directions or {}):
        if condition.rows == "all":
            prefix = prefill(model, sample.sample.input_ids, fast=False)
        elif prefix is None:
            raise ValueError(f"condition {condition.key!r} decodes from a shared prefix, none was given")
        return decode(model, prefix, max_new_tokens=max_new_tokens, spans=sample.spans())


def _check_setup(
    model: TransformerBridge,
    samples: Sequence[StudySample],
    conditions: Sequence[Condition],
    head_sets: Mapping[str, Sequence[Head]],
    directions: Mapping[str, FocusDirections],
    max_new_tokens: int,
) -> dict[str, list[Head]]:
    """Everything that can be wrong, checked before the first forward (not after an hour)."""
    keys = [c.key for c in conditions]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate conditions: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate sample ids: the store keys rows by sample id")
    for s in samples:
        check_length(model, s.n_tokens + max_new_tokens)
    checked = {name: check_heads(model, hs) for name, hs in head_sets.items()}
    for c in conditions:
        if c.method == "baseline":
            continue
        if c.heads not in checked:
            raise ValueError(f"condition {c.key!r} needs head set {c.heads!r}; given: {sorted(checked)}")
        if c.k > len(checked[c.heads]):
            raise ValueError(f"condition {c.key!r} needs {c.k} heads but head set {c.heads!r} has {len(checked[c.heads])}")
        if c.method == "focus":
            if c.directions not in directions:
                raise ValueError(f"condition {c.key!r} needs directions {c.directions!r}; given: {sorted(directions)}")
            directions[c.directions].check(model)
    return checked


def _check_stored(
    db: Store, conditions: Sequence[Condition], checked: Mapping[str, list[Head]], prompts: Mapping[str, str], tag: str
) -> None:
    """Refuse to resume a store whose rows would mix with this run's, in one pass over its rows:
    - a condition's key names its head set and k, not the heads: rows that used other heads (e.g.
      a ranking from another run) are refused; only the set counts, the same heads in another
      order are the same intervention;
    - a row is keyed by sample id, not by prompt: rows decoded from another prompt under the same
      id (`prompts`: this run's fingerprint per sample id; e.g. stored before a task generator
      changed) are refused."""
    wanted = {f"{tag}|{c.key}": [f"L{l}H{h}" for l, h in checked[c.heads][: c.k]] for c in conditions if c.heads}
    for row in db.rows():
        want = wanted.get(row.config)
        if want is not None and sorted(row.record.get("head_list") or []) != sorted(want):
            raise ValueError(
                f"{db.path}: stored rows of {row.record.get('condition')!r} used heads {row.record.get('head_list')}, "
                f"this run uses {want}; use another store for another ranking"
            )
        prompt = prompts.get(row.sample_id)
        stored = row.record.get("prompt_sha")
        if prompt is not None and row.config.startswith(f"{tag}|") and stored != prompt:
            found = f"prompt {stored}" if stored else "no prompt fingerprint (an older fdlib)"
            raise ValueError(
                f"{db.path}: stored rows of sample {row.sample_id!r} have {found}, this run's prompt is {prompt}: "
                "the sample changed since they were decoded; use another store or delete this one"
            )


def config_tag(model: TransformerBridge, max_new_tokens: int) -> str:
    return f"{model_name(model)}|greedy{max_new_tokens}"


def run_conditions(
    model: TransformerBridge,
    samples: Sequence[StudySample],
    conditions: Sequence[Condition],
    *,
    store: str | Path | Store,
    head_sets: Mapping[str, Sequence[Head]] | None = None,
    directions: Mapping[str, FocusDirections] | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
    desc: str = "samples",
) -> None:
    """Decode every condition on every sample, skipping (sample, condition) pairs already stored.

    Per sample: one fast prefill shared by the conditions on the answer rows; the sample's rows
    written in one transaction (a crash loses at most the sample in flight). A row's record holds
    the answer, its score (the task's metric), the condition's fields, the heads used and the
    sample's `meta`; its arrays the attention of every head on the relevant span
    (`relevant_score`) and on the sink (`sink_score`) from the answer rows.
    """
    head_sets = dict(head_sets or {})
    directions = dict(directions or {})
    checked = _check_setup(model, samples, conditions, head_sets, directions, max_new_tokens)
    tag = config_tag(model, max_new_tokens)
    with _opened(store) as db:
        done = db.keys()
        prompts = {s.id: s.fingerprint for s in samples}
        _check_stored(db, conditions, checked, prompts, tag)
        todo = [(s, [c for c in conditions if (s.id, f"{tag}|{c.key}") not in done]) for s in samples]
        todo = [(s, pending) for s, pending in todo if pending]
        for s, pending in tqdm(todo, desc=desc, unit="sample", disable=not progress):
            # alpha = 0 runs as the baseline, which decodes from the shared prefix too
            shared = any(c.identity or c.rows == "response" for c in pending)
            prefix = prefill(model, s.sample.input_ids) if shared else None
            answers: dict[str, Answer] = {}
            rows = []
            for c in pending:
                run = BASELINE if c.identity else c  # alpha = 0 is the identity: the baseline's answer
                heads = checked[run.heads][: run.k] if run.heads else []
                if run.key not in answers:
                    answers[run.key] = decode_condition(model, s, prefix, run, heads, directions=directions,
                                                        max_new_tokens=max_new_tokens)
                answer = answers[run.key]
                used = checked[c.heads][: c.k] if c.heads else []
                record = {
                    **s.meta, **asdict(c), "condition": c.key, "label": c.label, "identity": c.identity,
                    "model": model_name(model), "answer": answer.text, "score": s.score(answer.text),
                    "n_answer_tokens": len(answer.tokens), "head_list": [f"L{l}H{h}" for l, h in used],
                    "prompt_sha": prompts[s.id],
                }
                arrays = {f"{name}_score": v.numpy() for name, v in answer.scores.items()}
                rows.append(Row(s.id, f"{tag}|{c.key}", record, arrays))
            db.put(rows)


def study_frame(
    store: str | Path | Store,
    conditions: Sequence[Condition] | None = None,
    *,
    samples: Sequence[StudySample] | None = None,
    tag: str | None = None,
) -> pd.DataFrame:
    """One row per (sample, condition): the record's fields plus the `relevant_score` and
    `sink_score` arrays (`[n_layers, n_heads]`, None when the answer was empty). Keeps only the
    given `conditions`, `samples`, and rows of `tag` (`config_tag(model, max_new_tokens)`: one
    model and answer budget), when given."""
    keys = None if conditions is None else {c.key for c in conditions}
    ids = None if samples is None else {s.id for s in samples}
    with _opened(store) as db:
        rows = [
            {"sample_id": r.sample_id, **r.record, "label": _label(r.record),
             "relevant_score": r.arrays.get("relevant_score"), "sink_score": r.arrays.get("sink_score")}
            for r in db.rows()
            if (keys is None or r.record.get("condition") in keys)
            and (ids is None or r.sample_id in ids)
            and (tag is None or r.config == f"{tag}|{r.record.get('condition')}")
        ]
    return pd.DataFrame(rows)


def _label(record: dict[str, Any]) -> str:
    """The condition's label as this version writes it (stored labels may be older)."""
    fields = {f: record.get(f) for f in ("method", "heads", "k", "tau", "alpha", "directions", "rows")}
    try:
        return Condition(**fields).label
    except (TypeError, ValueError):
        return str(record.get("label"))


def head_mean(arrays: pd.Series, heads: Sequence[Head]) -> Float[np.ndarray, " row"]:
    """Per row, the mean over `heads` of a stored `[n_layers, n_heads]` score (NaN where absent)."""
    if not heads:
        raise ValueError("no heads to average over")
    idx = np.asarray(heads, dtype=int)
    return np.array([float(np.mean(a[idx[:, 0], idx[:, 1]])) if a is not None else np.nan for a in arrays], dtype=float)


# ---------------------------------------------------------------------------------------------
# Studies


def task_study(
    model: TransformerBridge,
    samples: Sequence[StudySample],
    *,
    ranked_heads: Sequence[Head],
    directions: FocusDirections,
    store: str | Path | Store | None = None,
    alphas: Sequence[float] = ALPHAS,
    ks: Sequence[int] = KS,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
) -> pd.DataFrame:
    """Table 2's runs: every task sample without intervention and with focus directions at alpha
    x k on the top-k contextual heads (answer rows). Returns `study_frame` of those runs."""
    conditions = task_conditions(alphas, ks)
    with _opened(store) as db:
        run_conditions(model, samples, conditions, store=db, head_sets={"contextual": ranked_heads},
                       directions={"focus": directions}, max_new_tokens=max_new_tokens, progress=progress,
                       desc="task study")
        return study_frame(db, conditions, samples=samples, tag=config_tag(model, max_new_tokens))


def lost_conditions(*, tau: float = 0.1, alpha: float = 0.5, k: int = 5) -> list[Condition]:
    """No intervention; split-softmax on the gold document; focus directions (contextual top-k)."""
    return [BASELINE, Condition("split", "contextual", k, tau=tau), Condition("focus", "contextual", k, alpha=alpha, directions="focus")]


def lost_in_the_middle(
    model: TransformerBridge,
    *,
    ranked_heads: Sequence[Head],
    directions: FocusDirections,
    store: str | Path | Store | None = None,
    positions: Sequence[int] = POSITIONS,
    size: Size | int = "quick",
    n_docs: int = 20,
    split: str = "test",
    tau: float = 0.1,
    alpha: float = 0.5,
    k: int = 5,
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
) -> pd.DataFrame:
    """EM on NQ with the gold document at each position, without intervention, with
    split-softmax (tau, top-k contextual heads) and with focus directions (alpha, top-k).
    Each position's prompt has its own sample id, so one store holds every position."""
    samples = position_samples(model, positions=positions, size=size, n_docs=n_docs, split=split)
    conditions = lost_conditions(tau=tau, alpha=alpha, k=k)
    with _opened(store) as db:
        run_conditions(model, samples, conditions, store=db, head_sets={"contextual": ranked_heads},
                       directions={"focus": directions}, max_new_tokens=max_new_tokens, progress=progress,
                       desc="lost in the middle")
        return study_frame(db, conditions, samples=samples, tag=config_tag(model, max_new_tokens))


def boost_ablate_conditions(
    sets: Sequence[str] = ("retrieval", "contextual", "random"), *, k: int = 20, tau: float = 0.1, rows: Rows = "response"
) -> list[Condition]:
    """No intervention; per head set, split-softmax on the gold document (boost) and ablation."""
    out = [BASELINE]
    out += [Condition("split", name, k, tau=tau) for name in sets]
    out += [Condition("ablate", name, k, rows=rows) for name in sets]
    return out


def boost_ablate(
    model: TransformerBridge,
    *,
    head_sets: Mapping[str, Sequence[Head]],
    store: str | Path | Store | None = None,
    size: Size | int = "quick",
    n_docs: int = 20,
    split: str = "test",
    k: int = 20,
    tau: float = 0.1,
    rows: Rows = "response",
    max_new_tokens: int = MAX_NEW_TOKENS,
    progress: bool = True,
) -> pd.DataFrame:
    """NQ EM (n_docs documents, gold in the middle) when each head set's top-k is boosted
    (split-softmax on the gold document, answer rows) or ablated (outputs zeroed)."""
    samples = position_samples(model, positions=[(n_docs + 1) // 2], size=sized(BOOST_QUESTIONS, size),
                               n_docs=n_docs, split=split)
    conditions = boost_ablate_conditions(list(head_sets), k=k, tau=tau, rows=rows)
    with _opened(store) as db:
        run_conditions(model, samples, conditions, store=db, head_sets=head_sets, max_new_tokens=max_new_tokens,
                       progress=progress, desc="boost / ablate")
        return study_frame(db, conditions, samples=samples, tag=config_tag(model, max_new_tokens))


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
        _m=f["method"].map({"baseline": 0, "focus": 1, "split": 2, "ablate": 3}),
        # head sets in the order they first appear (the conditions' order), not alphabetical
        _h=f["heads"].fillna("").map({h: i for i, h in enumerate(dict.fromkeys(f["heads"].fillna("")))}) if "heads" in f else 0,
        **{f"_{c}": pd.to_numeric(f[c], errors="coerce").fillna(0) if c in f else 0 for c in ("alpha", "tau", "k")},
    ).sort_values(["_m", "_h", "_alpha", "_tau", "_k"], kind="stable")
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


def sink_table(frame: pd.DataFrame, heads: Sequence[Head], *, condition: str = "baseline") -> pd.DataFrame:
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
        raise ValueError(f"the frame lacks columns {missing}; build it with fdlib.longctx.study_frame")


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
