"""The study runner: every study in fdlib is one call of `run_study`.

Per sample: one prefill per input variant, then every pending condition decoded from that
prefix, in batches of rows sharing the prompt's KV cache (`fdlib.interventions.engine`), each row recording
every head's attention on the sample's named spans; the sample's rows (all its variants) are
written in one transaction. A rerun skips the rows already stored, and refuses a stored row that
another setup made (another prompt, model, dtype, head set, directions file, parameter or
decoding), naming what differs. A setup without "dtype" is float32: that of every row made before
the dtype was a setting, whose `setup_sha` a float32 run still gives (`dtype_setup`).
`shard=(i, n)` takes samples i, i+n, ... (one job of a cluster array).

`study_frame` is the one reader: a store -> one DataFrame row per (sample, condition).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head, check_heads, labels
from fdlib.core.spans import Span
from fdlib.core.store import BASE_DTYPE, Row, Store, check_shard, open_store
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.engine import Job, decode_jobs, first_row_scores
from fdlib.interventions.row import RowIntervention, intervene
from fdlib.model.decoding import Prefix, check_length, decode, prefill
from fdlib.model.loading import dtype_name, model_dtype, model_name, synced
from fdlib.study.conditions import AUTO, AUTO_ALPHAS, AUTO_SINK, DROP_ALPHAS, FOCUS, Condition
from fdlib.study.scores import EXTRA_KINDS, KINDS, kind_scores

Engine = Literal["batched", "sequential"]
DECODING = "greedy; stop at eos, or at a newline once the answer has text"


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass(frozen=True, eq=False)
class StudySample:
    """One prompt of a study and what is stored beside each of its rows (`meta`: task, length,
    gold position, ...). The prompt is any sample with the one protocol NQ `QASample`s and
    `TaskSample`s share: `id`, `group`, `variant`, `input_ids`, `answers`, `named_spans()` with the
    canonical names (`relevant`: the gold document / needle / pair, `sink`, and `doc{i}` per
    document where the prompt has documents), `metric` and `score(prediction)`.
    """

    sample: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.sample.id

    @property
    def group(self) -> str:
        """The question (or task sample) this prompt is a variant of: a transaction and a shard unit."""
        return self.sample.group

    @property
    def variant(self) -> str:
        return self.sample.variant

    @property
    def input_ids(self) -> Tensor:
        return self.sample.input_ids

    @property
    def n_tokens(self) -> int:
        return int(self.sample.input_ids.shape[0])

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(self.sample.answers)

    @property
    def fingerprint(self) -> str:
        """A hash of the prompt's token ids: part of every row's setup."""
        ids = self.sample.input_ids.to("cpu", dtype=torch.int64).numpy().tobytes()
        return hashlib.sha1(ids).hexdigest()[:16]

    @property
    def relevant_span(self) -> Span:
        span = self.spans().get("relevant")
        if span is None:
            raise ValueError(f"sample {self.id} has no relevant span (a negative NQ input?)")
        return span

    def spans(self) -> dict[str, Span]:
        return self.sample.named_spans()

    @property
    def metric(self) -> str:
        return self.sample.metric

    def score(self, prediction: str) -> float:
        """The sample's metric (best-subspan EM for NQ, the task's own for task samples)."""
        return float(self.sample.score(prediction))


def as_study_samples(samples: Sequence[Any]) -> list[StudySample]:
    return [s if isinstance(s, StudySample) else StudySample(s) for s in samples]


def span_kinds(scores: Mapping[str, Tensor], spans: Mapping[str, Span]) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
    """The stored score kinds from recorded span means: with documents (`doc{i}`) the four kinds
    of `fdlib.study.scores.kind_scores` (NaN where the prompt leaves one undefined); without, the
    `relevant` and `sink` scores."""
    docs = sorted((n for n in spans if n.startswith("doc") and n[3:].isdigit()), key=lambda n: int(n[3:]))
    extra = {k: scores[k] for k in EXTRA_KINDS if k in scores}
    if not docs:
        return {**{k: scores[k] for k in ("relevant", "sink") if k in scores}, **extra}
    gold = next((i for i, n in enumerate(docs) if spans[n] == spans.get("relevant")), None)
    return {**kind_scores(torch.stack([scores[n] for n in docs]), gold, scores["sink"]), **extra}


# ---------------------------------------------------------------------------------------------
# What made a row


def model_fingerprint(model: TransformerBridge) -> dict[str, str]:
    """The model's name and a hash of its config and weights (every parameter's shape and a
    strided sample of its values: another checkpoint of the same architecture differs)."""
    synced(model)  # a bridge cast or moved since loading: its cached hash is of the old weights
    got = model.__dict__.get("_fdlib_fingerprint")
    if got is None:
        h = hashlib.sha1()
        hf = model.original_model
        h.update(json.dumps(hf.config.to_dict(), sort_keys=True, default=str).encode())
        for name, p in sorted(hf.state_dict().items()):
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(name.encode() + str(tuple(p.shape)).encode())
            h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
        got = {"model": model_name(model), "model_sha": h.hexdigest()[:16]}
        model.__dict__["_fdlib_fingerprint"] = got
    return got


def dtype_setup(model: TransformerBridge) -> dict[str, str]:
    """The setup entry naming the dtype the model computes in: `{"dtype": "bfloat16"}`, and none
    for float32, so a float32 setup hashes as every row made before the dtype was a setting did.
    Read back by `setup_dtype`. Computed from the weights on each call (a bridge may be cast after
    its fingerprint was cached)."""
    name = dtype_name(model_dtype(model))
    return {} if name == BASE_DTYPE else {"dtype": name}


def setup_dtype(setup: Mapping[str, Any]) -> str:
    """The dtype a row (or a kept result) was computed in, from its setup: float32 where it names
    none (`dtype_setup`)."""
    return str(setup.get("dtype", BASE_DTYPE))


def directions_sha(d: FocusDirections) -> str:
    h = hashlib.sha1(d.placement.encode())
    h.update(d.d_q.detach().float().contiguous().numpy().tobytes())
    h.update(d.d_k.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _sha(setup: Mapping[str, Any]) -> str:
    return hashlib.sha1(json.dumps(setup, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# One condition, resolved for one sample


@dataclass(frozen=True)
class _Planned:
    condition: Condition
    heads: list[Head]
    setup: dict[str, Any]
    setup_sha: str

    @property
    def runs_as(self) -> tuple:
        """Conditions that decode the same way share one decoded row."""
        c = self.condition
        if c.is_baseline or c.identity:
            return ("baseline", c.rows)
        return (c.method, c.value, tuple(sorted(self.heads)), c.directions, c.span, c.rows)


def choose_alpha(
    model: TransformerBridge, prefix: Prefix, sample: StudySample, heads: Sequence[Head], directions: FocusDirections,
    value: float, alphas: Sequence[float] | None = None, *, rule: str = "focus_auto",
) -> float:
    """Automatic alpha from one probe step: every candidate alpha a row of one forward over the
    shared prefix, each measuring the heads' mean attention on the sink at the row that produces
    the first answer token. The rule is the condition's method (`AUTO_SINK` names its sink):

    - `focus_auto`: the candidate closest to the absolute share `value`;
    - `focus_kept`: the candidate closest to `value` times the input's own unsteered share;
    - `focus_drop`: the smallest candidate whose share is at most (1 - `value`) times the
      unsteered share (at least the share `value` of it moved off the sink), the largest
      candidate when none is (then it sits at the grid's end, as `chosen_alphas` reports).

    Relative rules need alpha 0 as the first candidate (the unsteered row); ties go to the
    smaller alpha."""
    if rule not in AUTO:
        raise ValueError(f"rule must be one of {AUTO}, got {rule!r}")
    alphas = list(alphas if alphas is not None else (DROP_ALPHAS if rule == "focus_drop" else AUTO_ALPHAS))
    if rule != "focus_auto" and alphas[0] != 0:
        raise ValueError(f"a relative target needs alpha 0 as the first candidate, got {alphas}")
    span = AUTO_SINK[rule]
    rows = [RowIntervention(tuple(heads), directions=directions, alpha=a) for a in alphas]
    sums = first_row_scores(model, prefix, rows, {span: sample.spans()[span]})  # [candidates, L, H, 1]
    idx = torch.as_tensor(list(heads), dtype=torch.long)
    sink = sums[:, idx[:, 0], idx[:, 1], 0].mean(-1)  # [candidates]
    if rule == "focus_drop":
        reached = (sink <= (1 - value) * sink[0]).nonzero()
        return float(alphas[int(reached[0]) if len(reached) else len(alphas) - 1])
    target = value * sink[0] if rule == "focus_kept" else value
    return float(alphas[int(torch.argmin((sink - target).abs()))])


def _auto_alphas(model, prefix: Prefix, s: StudySample, planned: Sequence[_Planned], directions) -> dict[tuple, float]:
    return {p.runs_as: choose_alpha(model, prefix, s, p.heads, directions[p.condition.directions], p.condition.value,
                                    rule=p.condition.method)
            for p in planned if p.condition.method in AUTO}


def decode_sequential(
    model: TransformerBridge,
    sample: StudySample,
    prefix: Prefix | None,
    condition: Condition,
    heads: Sequence[Head],
    *,
    directions: Mapping[str, FocusDirections] | None = None,
    max_new_tokens: int = 32,
):
    """One greedy answer under one condition through the bridge's hooks (the reference path):
    from the shared `prefix` (restored afterwards), or, for `rows="all"`, from a prefill of the
    prompt under the hooks."""
    from_pos = 0 if condition.rows == "all" else sample.n_tokens - 1
    with intervene(model, condition.row(heads, sample.spans(), directions or {}), from_pos):
        if condition.rows == "all":
            prefix = prefill(model, sample.input_ids, fast=False)
        elif prefix is None:
            raise ValueError(f"condition {condition.key!r} decodes from a shared prefix, none was given")
        return decode(model, prefix, max_new_tokens=max_new_tokens, spans=sample.spans())


# ---------------------------------------------------------------------------------------------
# The runner


def _check(model, samples, conditions, rankings, directions, max_new_tokens) -> dict[str, list[Head]]:
    """Everything that can be wrong, checked before the first forward (not after an hour)."""
    keys = [c.key for c in conditions]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate conditions: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate sample ids: the store keys rows by sample id")
    checked = {name: check_heads(model, hs) for name, hs in rankings.items()}
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for c in conditions:
        check_heads(model, c.head_set(checked, L, H))
        if c.method in FOCUS:
            if c.directions not in directions:
                raise ValueError(f"condition {c.key!r} needs directions {c.directions!r}; given: {sorted(directions)}")
            directions[c.directions].check(model)
    variants = {s.variant for s in samples}
    for c in conditions:
        if c.input not in variants:
            raise ValueError(f"condition {c.key!r} decodes input {c.input!r}, which no sample is (variants: {sorted(variants)})")
    for s in samples:
        check_length(model, s.n_tokens + max_new_tokens)
        if any(c.is_reweight and c.input == s.variant for c in conditions):
            need = {c.span for c in conditions if c.is_reweight and c.input == s.variant}
            missing = need - set(s.spans())
            if missing:
                raise ValueError(f"sample {s.id} has no span {sorted(missing)} to reweight (spans: {sorted(s.spans())})")
    return checked


def _plan(model, sample, conditions, rankings, directions, max_new_tokens) -> list[_Planned]:
    """The sample's conditions with the setup of each row (what its `setup_sha` hashes): model and
    weights, dtype (`dtype_setup`: absent for float32), prompt tokens, decoding, condition, the
    heads used, the directions' content and the reweighted span."""
    base = {**model_fingerprint(model), **dtype_setup(model), "prompt_sha": sample.fingerprint,
            "max_new_tokens": max_new_tokens, "decoding": DECODING}
    out = []
    L, H = model.cfg.n_layers, model.cfg.n_heads
    for c in conditions:
        if c.input != sample.variant:
            continue
        heads = c.head_set(rankings, L, H)
        setup = {**base, "condition": c.key, "heads": sorted(labels(heads))}
        if c.method in FOCUS:
            setup["directions_sha"] = directions_sha(directions[c.directions])
        if c.is_reweight:
            span = sample.spans()[c.span]
            setup["span"] = [span.start, span.end]
        out.append(_Planned(c, heads, setup, _sha(setup)))
    return out


def _difference(stored: Mapping[str, Any] | None, setup: Mapping[str, Any]) -> str:
    old = (stored or {}).get("setup") or {}
    diffs = [f"{k}: stored {old.get(k)!r}, now {setup.get(k)!r}" for k in sorted(set(old) | set(setup)) if old.get(k) != setup.get(k)]
    return "; ".join(diffs) or "the stored row has no setup (an older fdlib)"


def run_study(
    model: TransformerBridge,
    samples: Sequence[Any],
    conditions: Sequence[Condition],
    *,
    heads: Mapping[str, Sequence[Head]] | None = None,
    store: str | Path | Store | None = None,
    directions: Mapping[str, FocusDirections] | None = None,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 64,
    max_new_tokens: int = 32,
    engine: Engine = "batched",
    overlap: int = 0,
    replace: bool = False,
    progress: bool = True,
    desc: str = "study",
) -> pd.DataFrame:
    """Decode every condition on every sample of this shard; return `study_frame` of them.

    `heads` maps ranking names (what conditions' `heads` refer to, e.g. "contextual") to ranked
    head lists; `directions` maps names to `FocusDirections`. `engine="batched"` decodes
    `batch_size` rows per forward, each sample's rows over its shared prompt cache, rows of the next
    samples taking the places of finished ones (`fdlib.interventions.engine.decode_jobs`); `"sequential"`
    decodes one condition after another through the bridge's hooks (the reference). Each sample's
    rows are written in one transaction as soon as they are all decoded. `overlap` is how many
    further samples' rows may fill the batch while a sample is in flight: 0 (the default) decodes
    one sample at a time, so a kill loses at most that sample; n > 0 keeps the batch fuller at the
    end of each sample's answers (faster), and a kill loses at most n + 1 samples. Conditions with `rows="all"` always take the sequential path (their prompt rows
    change, so they share no prefix). A stored row made by another setup is refused, naming what
    differs, unless `replace=True` (then it is recomputed and overwritten). A read-only store (a
    committed results file) is only read: the frame holds the samples whose rows it has, whole,
    and nothing is decoded. The store's `progress` table follows the call (rows asked for and
    stored, wall time), for `python -m fdlib paper status`.
    """
    i, n = check_shard(shard)
    if engine not in ("batched", "sequential"):
        raise ValueError(f"engine must be 'batched' or 'sequential', got {engine!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be an int >= 0, got {overlap!r}")
    samples = as_study_samples(samples)
    directions = dict(directions or {})
    rankings = _check(model, samples, conditions, dict(heads or {}), directions, max_new_tokens)
    groups: dict[str, list[StudySample]] = {}
    for s in samples:
        groups.setdefault(s.group, []).append(s)
    mine = list(groups.values())[i::n]
    with open_store(store) as db:
        stored = db.setups()
        todo, expected = [], 0
        for group in mine:
            pending = []
            for s in group:
                for p in _plan(model, s, conditions, rankings, directions, max_new_tokens):
                    expected += 1
                    sha = stored.get((s.id, p.condition.key))
                    if sha == p.setup_sha:
                        continue
                    if sha is not None and not replace:
                        raise ValueError(
                            f"{db.path}: the stored row ({s.id}, {p.condition.key}) was made by another setup "
                            f"({_difference(db.record(s.id, p.condition.key), p.setup)}); use another store, "
                            "or replace=True to recompute it"
                        )
                    pending.append((s, p))
            if pending:
                todo.append(pending)
        if db.read_only:  # a committed results file: show the samples it holds whole, decode nothing
            missing = {s.id for pending in todo for s, _ in pending}
            held = [s for group in mine for s in group if not any(t.id in missing for t in group)]
            return study_frame(db, conditions, samples=held)
        ids = [s.id for group in mine for s in group]
        digest = hashlib.sha256("\n".join([c.key for c in conditions] + ids).encode()).hexdigest()[:8]
        study = f"{desc}: {len(conditions)} conditions ({digest}), {len(ids)} prompts, shard {i}/{n}"
        done = expected - sum(len(t) for t in todo)
        db.note_progress(study, expected=expected, done=done)
        bar = tqdm(total=expected, initial=done, desc=desc, unit="row", disable=not progress)
        if engine == "sequential":
            runs = _run_sequential(model, todo, directions, max_new_tokens)
        else:
            runs = _run_batched(model, todo, directions, batch_size, max_new_tokens, 1 + overlap)
        clock = time.perf_counter()
        for rows in runs:
            db.put(rows)  # one transaction per sample: a kill loses at most the samples in flight
            done += len(rows)
            now = time.perf_counter()
            db.note_progress(study, expected=expected, done=done, seconds=now - clock, computed=len(rows))
            clock = now
            bar.update(len(rows))
        bar.close()
        return study_frame(db, conditions, samples=samples)


def _by_sample(pending: list[tuple[StudySample, _Planned]]) -> list[tuple[StudySample, list[_Planned]]]:
    order = list({id(s): s for s, _ in pending}.values())
    return [(s, [p for t, p in pending if t is s]) for s in order]


def _decode_rest(model, s: StudySample, planned: list[_Planned], decoded: dict, prefix: Prefix | None, directions,
                 max_new_tokens: int, alphas: Mapping[tuple, float]) -> None:
    """Decode through the bridge's hooks whatever `decoded` lacks (the sequential path)."""
    for p in planned:
        if p.runs_as not in decoded:
            c = p.condition
            ref = Condition.baseline(c.input) if (c.identity and c.rows == "response") else c
            if c.method in AUTO:
                ref = Condition.focus(alphas[p.runs_as], c.directions, list(p.heads), input=c.input)
            decoded[p.runs_as] = decode_sequential(model, s, prefix, ref, p.heads, directions=directions,
                                                   max_new_tokens=max_new_tokens)


def _run_sequential(model, todo, directions, max_new_tokens) -> Iterator[list[Row]]:
    """Per sample, one prefill, then one condition after another through the bridge's hooks."""
    for pending in todo:
        rows = []
        for s, planned in _by_sample(pending):
            shared = any(p.condition.rows == "response" for p in planned)
            prefix = prefill(model, s.input_ids) if shared else None
            alphas = _auto_alphas(model, prefix, s, planned, directions)
            decoded: dict[tuple, Any] = {}
            _decode_rest(model, s, planned, decoded, prefix, directions, max_new_tokens, alphas)
            rows += _rows(s, planned, decoded, alphas)
        yield rows


def _run_batched(model, todo, directions, batch_size, max_new_tokens, max_samples) -> Iterator[list[Row]]:
    """Every answer-row condition of the shard as one stream of rows through `decode_jobs`
    (each sample's rows share its prompt cache; rows of the next samples fill the places of
    finished ones); conditions on every row (`rows="all"`) through the bridge. A sample's rows
    are yielded as soon as all of them are decoded."""
    info: dict[tuple[int, int], tuple] = {}
    left: dict[int, int] = {}
    done: dict[int, list[Row]] = {}

    def jobs() -> Iterator[Job]:
        for gi, pending in enumerate(todo):
            per_sample = _by_sample(pending)
            left[gi] = len(per_sample)
            for si, (s, planned) in enumerate(per_sample):
                shared = [p for p in planned if p.condition.rows == "response"]
                unique = list(dict.fromkeys(p.runs_as for p in shared))
                first = {p.runs_as: p for p in reversed(shared)}
                prefix: Any = lambda s=s: prefill(model, s.input_ids)  # noqa: E731  (prefilled when admitted)
                alphas: dict[tuple, float] = {}
                if any(p.condition.method in AUTO for p in shared):
                    prefix = prefill(model, s.input_ids)  # the probe needs it before the rows are built
                    alphas = _auto_alphas(model, prefix, s, shared, directions)
                rows = [first[r].condition.row(first[r].heads, s.spans(), directions, alphas.get(r)) for r in unique]
                info[(gi, si)] = (s, planned, unique, alphas)
                yield Job((gi, si), prefix, rows, s.spans())

    stream = decode_jobs(model, jobs(), batch_size=batch_size, max_new_tokens=max_new_tokens, max_jobs=max_samples)
    for (gi, si), answers in stream:
        s, planned, unique, alphas = info.pop((gi, si))
        decoded = dict(zip(unique, answers))
        _decode_rest(model, s, planned, decoded, None, directions, max_new_tokens, alphas)
        done.setdefault(gi, []).extend(_rows(s, planned, decoded, alphas))
        left[gi] -= 1
        if left[gi] == 0:
            yield done.pop(gi)


def _rows(s: StudySample, planned: list[_Planned], decoded: dict, alphas: Mapping[tuple, float]) -> list[Row]:
    spans = s.spans()
    out = []
    for p in planned:
        ans = decoded[p.runs_as]
        c = p.condition
        record = {
            **s.meta, "group": s.group, "variant": s.variant, "condition": c.key, "label": c.label,
            "method": c.method, "parameter": c.parameter, "value": c.value, "heads": c.heads, "k": c.k, "seed": c.seed,
            "directions": c.directions, "input": c.input, "rows": c.rows, "span": c.span, "identity": c.identity,
            "head_list": labels(p.heads), "answer": ans.text, "n_answer_tokens": len(ans.tokens),
            "metric": s.metric, "score": s.score(ans.text), "setup": p.setup,
            "chosen_alpha": alphas.get(p.runs_as),
        }
        arrays = {k: v.numpy().astype(np.float32) for k, v in span_kinds(ans.scores, spans).items()} if ans.scores else {}
        out.append(Row(s.id, c.key, p.setup_sha, record, arrays))
    return out


# ---------------------------------------------------------------------------------------------
# The reader


def study_frame(
    store: str | Path | Store,
    conditions: Sequence[Condition | str] | None = None,
    *,
    samples: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """One row per (sample, condition): the record's fields (the setup flattened into `model`,
    `model_sha`, `prompt_sha`, ...), `dtype` (`setup_dtype`: float32 where the setup names none),
    `em` where the metric is EM, and one `{kind}_score` column per stored score kind
    (`[n_layers, n_heads]` arrays; None where a kind is undefined).
    `conditions` / `samples` restrict it to those (and to the samples' current prompts)."""
    keys = None if conditions is None else [c.key if isinstance(c, Condition) else c for c in conditions]
    wanted = None
    if samples is not None:
        wanted = {s.id: s.fingerprint for s in as_study_samples(samples)}
    out = []
    with open_store(store) as db:
        for r in db.rows(keys):
            setup = r.record.get("setup", {})
            if wanted is not None and wanted.get(r.sample_id) != setup.get("prompt_sha"):
                continue
            rec = {k: v for k, v in r.record.items() if k != "setup"}
            row = {"sample_id": r.sample_id, **rec, **{k: v for k, v in setup.items() if k not in rec}}
            row["dtype"] = setup_dtype(setup)
            if rec.get("metric") == "em":
                row["em"] = bool(rec["score"])
            for kind in KINDS + EXTRA_KINDS:
                row[f"{kind}_score"] = r.arrays.get(kind)
            out.append(row)
    frame = pd.DataFrame(out)
    if frame.empty:
        return frame
    if keys is not None:  # the conditions' order, then the samples'
        frame["_c"] = frame["condition"].map({k: i for i, k in enumerate(keys)})
        frame = frame.sort_values(["_c"], kind="stable").drop(columns="_c").reset_index(drop=True)
    return frame
