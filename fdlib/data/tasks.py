"""Long-context tasks in the spirit of HELMET (Yen et al., 2024), generated offline at a chosen
length in tokens, with the exact token span of what the answer needs.

Every generator takes a tokenizer (or a model: its tokenizer and context window are used) and
returns `TaskSample`s whose prompt, in the tokenizer's chat template (a base model without one:
the plain prompt after its BOS token, `fdlib.data.nq.encode_prompt`), has between
`(1 - LENGTH_TOLERANCE) * n_tokens` and `n_tokens` tokens (never more; ~1% under in practice on
SmolLM2 at 2k-8k; at very short lengths JSON may end up to one ~65-token pair under). Leave room
for the answer: decoding needs `n_tokens + max_new_tokens` within the model's window.

- `niah`: needle in a haystack, one key (RULER/HELMET "synthetic recall"): a line
  "The special magic number for <key> is <7 digits>." among shipped NQ passages.
- `niah_multikey`: the same with several needles of different keys; one is asked.
- `json_kv`: a JSON object of random UUID pairs; the value of one key is asked.
- `rag_nq`: NQ multi-document QA (the study's prompt, `fdlib.data.nq.render_prompt`) with as many
  BM25 distractors as fit the length.
- `rerank_nq`: the NQ gold passage among BM25 distractors, each with a numeric ID; the model
  ranks the IDs; scored by NDCG@10 with the gold passage as the only relevant item.
- `icl_nq`: many-shot in-context classification (HELMET's ICL category with synthetic data): NQ
  questions labelled by their answer type (person, date, place, quantity, thing; read off the
  question's first words), each type mapped to a random two-digit label per sample, so the
  mapping can only be learned from the demonstrations.

Filler is added whole sentence by sentence (passages and documents are cut only at a sentence
end), then the prompt is tokenised and the budget corrected until the length fits. Spans come from
the tokenizer's offset mapping and must fall on token boundaries (else ValueError): each needle,
pair and document sits on its own line so that they do.

HELMET categories that are NOT reproduced here, because they need data or judges this package does
not ship:

- long-document QA (NarrativeQA, InfiniteBench QA/MC) and summarisation (InfiniteBench Sum,
  Multi-LexSum): the books, screenplays and legal filings are hub datasets, and HELMET scores them
  with an LLM judge (GPT-4o) or ROUGE against human references;
- citation generation (ALCE ASQA / QAMPARI): needs the ALCE retrieval corpora, and its
  citation recall/precision are judged by an NLI model (TRUE-T5-11B);
- many-shot in-context learning on TREC, NLU, BANKING77 or CLINC150: the labelled datasets are
  hub downloads (`icl_nq` is a synthetic stand-in with five classes: closest to TREC coarse,
  which also classifies questions by answer type);
- re-ranking on MS MARCO with graded relevance: replaced here by NQ passages with one relevant
  passage, so NDCG@10 reduces to 1 / log2(1 + rank of the gold ID);
- RAG on HotpotQA / TriviaQA / PopQA (KILT): only NQ-open is shipped;
- JSON KV and RULER variants with other needle types (UUID needles, variable tracking, ...).
"""

from __future__ import annotations

import json
import math
import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from fdlib.core.metrics import best_subspan_em
from fdlib.core.spans import Span, check_spans
from fdlib.data.nq import (
    Document,
    EncodedPrompt,
    NQBuilder,
    NQExample,
    PromptFormat,
    build_sample,
    char_span_to_tokens,
    encode_prompt,
    load_nq,
    prompt_format,
    render_prompt,
    sized,
    split_examples,
)

# `quick` is what CI runs, `full` a study's size.
TASK_SIZES: dict[str, int] = {"quick": 4, "paper": 20, "full": 100}
# A prompt has between (1 - LENGTH_TOLERANCE) * n_tokens and n_tokens tokens (never more, so a
# request equal to the context window still fits).
LENGTH_TOLERANCE = 0.03
_MAX_FIT_ROUNDS = 6
# A tokenizer's model_max_length at or above this is transformers' "unknown" sentinel.
_UNKNOWN_LENGTH = 10**7

_ADJECTIVES = (
    "amber", "ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crimson",
    "curious", "dusty", "eager", "early", "fierce", "gentle", "golden", "hidden", "hollow",
    "humble", "icy", "jolly", "kind", "lively", "lonely", "lucky", "mellow", "misty", "noble",
    "odd", "pale", "proud", "quiet", "rapid", "rusty", "silent", "silver", "sleepy", "smooth",
    "steady", "swift", "tidy", "wild",
)
_NOUNS = (
    "anchor", "badger", "basket", "beacon", "cactus", "canyon", "castle", "cedar", "comet",
    "copper", "falcon", "garden", "glacier", "harbor", "island", "kettle", "ladder", "lantern",
    "maple", "meadow", "mirror", "orchard", "otter", "parrot", "pebble", "pepper", "piano",
    "planet", "pocket", "quarry", "rabbit", "river", "saddle", "spruce", "thunder", "tiger",
    "tunnel", "violin", "walrus", "willow",
)

_NEEDLE = "The special magic number for {key} is {value}."
_NIAH_INSTRUCTION = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
_MULTIKEY_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the numbers afterwards."
)
_NIAH_QUESTION = "What is the special magic number for {key} mentioned in the provided text?"
_NIAH_ANSWER_PREFIX = "The special magic number for {key} mentioned in the provided text is"
_JSON_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
_RERANK_INSTRUCTION = (
    "You are provided with a list of documents, each indicated by their ID. Rank each document "
    "based on their relevance to the question in descending order from most relevant to least "
    "relevant texts. Include all documents in the rankings. Write your answer using the unique "
    "IDs, with the following format:\nRanking: ID3 > ID1 > ID2"
)
_ICL_INSTRUCTION = (
    "Use the provided mapping from the questions to their numerical labels to assign a numerical "
    "label to the last question. Only output \"Label: {label}\" and nothing else."
)
_ICL_ANSWER_PREFIX = "Label:"
# Answer types read off a question's opening (NQ-open is lower case); first match wins, so
# "what year" is a date before "what" is a thing. Questions opening otherwise are not used.
ICL_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("person", re.compile(r"^(who|whom|whose|who's)\b")),
    ("date", re.compile(r"^(when|what year|what date|what day|what month|what time)\b")),
    ("place", re.compile(r"^where\b")),
    ("quantity", re.compile(r"^(how (many|much|long|old|far|big|tall|high|deep|fast)|what percentage)\b")),
    ("thing", re.compile(r"^(what|which|what's)\b")),
)
# Answer prefixes (RULER's way, after the chat template's assistant header): without them
# SmolLM2 restates the JSON key and runs out of answer tokens, or ranks by ordinal ("Ranking: 2")
# or copies the format example ("3 > ID1 > ID2"); after "[ID:" it writes one of the prompt's IDs.
_JSON_ANSWER_PREFIX = "Corresponding value:"
_RERANK_ANSWER_PREFIX = "Ranking: [ID:"
# A sentence ends at . ! or ? followed by whitespace and what can start a sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


@dataclass(frozen=True)
class TaskSample:
    """One long-context prompt, tokenised, with exact token spans.

    `relevant_span` covers what the answer needs (the asked needle, the asked JSON pair, the gold
    document line); `extra_spans` names other spans (every needle, every document, the question).
    `info` holds task-specific data (e.g. the candidate IDs of a re-ranking prompt).
    """

    id: str
    task: str
    text: str
    input_ids: Int[Tensor, " pos"]
    relevant_span: Span
    answers: tuple[str, ...]
    question: str
    depth: float  # the requested position of the relevant item in the filler, 0 = first, 1 = last
    extra_spans: dict[str, Span] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    sink_span: Span = field(default_factory=lambda: Span(0, 1))
    prompt_format: PromptFormat = "chat"  # "chat": in the chat template; "base": BOS + plain prompt

    def __post_init__(self) -> None:
        clash = {"relevant", "sink"} & set(self.extra_spans)
        if clash:
            raise ValueError(f"{self.id}: extra span names {sorted(clash)} are reserved")
        check_spans(self.named_spans(), self.n_tokens)

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def named_spans(self) -> dict[str, Span]:
        """Every span by name: `relevant`, `sink`, then the extra spans (`doc{i}` per document
        where the prompt has documents)."""
        return {"relevant": self.relevant_span, "sink": self.sink_span, **self.extra_spans}

    @property
    def variant(self) -> str:
        """Task prompts have one input variant (NQ samples also have `gold` and `negative`)."""
        return "long"

    @property
    def group(self) -> str:
        """Each task sample is its own group (a study's transaction and shard unit)."""
        return self.id

    @property
    def metric(self) -> str:
        return METRICS[self.task]

    def score(self, prediction: str) -> float:
        """The task's metric for one prediction (`fdlib.data.tasks.grade`)."""
        return grade(prediction, self)


# ---------------------------------------------------------------------------------------------
# Sizes, seeds and the context window


def task_size(size: str | int) -> int:
    """Number of samples for a size name or an explicit positive count."""
    return sized(TASK_SIZES, size)


def _rng(task: str, seed: int, index: int) -> random.Random:
    # random.Random seeded with a str hashes it with SHA-512: the same on every machine and run
    # (unlike hash()). Each sample has its own stream, so sample i's keys, values and filler do
    # not depend on how many samples are drawn.
    return random.Random(f"fdlib.tasks:{task}:{seed}:{index}")


_GOLDEN = (math.sqrt(5) - 1) / 2


def _depths(depth: float | None, n: int, task: str, seed: int) -> list[float]:
    """The relevant item's depth per sample: fixed, or spread by a golden-ratio sequence from a
    seeded start. Sample i's depth depends on i only, never on n (a stratified draw in
    [i/n, (i+1)/n) would give sample i another prompt when a study grows, under the same id),
    and any first n depths are evenly spread (at most three gap sizes)."""
    if depth is None:
        start = _rng(task + "/depth", seed, 0).random()
        return [(start + i * _GOLDEN) % 1.0 for i in range(n)]
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be None or a fraction in [0, 1], got {depth!r}")
    return [float(depth)] * n


def _prepare(
    task: str, tokenizer_or_model: Any, n_tokens: int, size: str | int, depth: float | None, seed: int,
    max_context: int | None,
) -> tuple[Any, list[float]]:
    """What every generator does first: the length is checked against the window before anything
    is tokenised; then the tokenizer and each sample's depth (one per sample of the size)."""
    check_context(tokenizer_or_model, n_tokens, max_context)
    tokenizer, _ = _split_model(tokenizer_or_model)
    prompt_format(tokenizer)  # refuses a tokenizer with neither a chat template nor BOS, up front
    return tokenizer, _depths(depth, task_size(size), task, seed)


def _split_model(tokenizer_or_model: Any) -> tuple[Any, int | None]:
    """(tokenizer, context window from the model's config) for a model or a bare tokenizer."""
    cfg = getattr(tokenizer_or_model, "cfg", None)
    if cfg is not None and hasattr(tokenizer_or_model, "tokenizer"):
        return tokenizer_or_model.tokenizer, getattr(cfg, "n_ctx", None)
    return tokenizer_or_model, None


def context_window(tokenizer_or_model: Any) -> int | None:
    """The context window in tokens, when it can be known without any download: a model's
    `cfg.n_ctx`; a tokenizer's `model_max_length` when set; else `max_position_embeddings` in a
    `config.json` beside a tokenizer loaded from a local directory (as fdlib's offline models
    are). None when unknown."""
    tokenizer, n_ctx = _split_model(tokenizer_or_model)
    if n_ctx is not None:
        return int(n_ctx)
    max_len = getattr(tokenizer, "model_max_length", None)
    if isinstance(max_len, int) and 0 < max_len < _UNKNOWN_LENGTH:
        return max_len
    config = Path(str(getattr(tokenizer, "name_or_path", "") or "")) / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            if isinstance(cfg.get(key), int):
                return int(cfg[key])
    return None


def check_context(tokenizer_or_model: Any, n_tokens: int, max_context: int | None = None) -> int | None:
    """Refuse, before anything is tokenised, a length above the context window (`max_context`
    if given, else `context_window`). Returns the window used (None if unknown)."""
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int, got {n_tokens!r}")
    window = max_context if max_context is not None else context_window(tokenizer_or_model)
    if window is not None and n_tokens > window:
        raise ValueError(f"n_tokens={n_tokens} exceeds the context window of {window} tokens")
    return window


# ---------------------------------------------------------------------------------------------
# Tokenising, fitting the length, locating spans


@dataclass(frozen=True)
class _Rendered:
    """A prompt's content (before the chat template) and the char ranges of its named parts."""

    content: str
    chars: dict[str, tuple[int, int]]
    info: dict[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""  # the start of the model's answer (after the chat template's assistant header)


@dataclass(frozen=True)
class _Filler:
    """Filler units (sentences, JSON pairs) in the order they are offered, each with a group (its
    passage or document) and an estimate of its tokens in place."""

    groups: list[int]
    texts: list[str]
    costs: list[int]


def _make_filler(tokenizer: Any, groups: list[int], texts: list[str], costed: list[str] | None = None) -> _Filler:
    """Cost each unit in one batched call: its tokens (or those of `costed`, the unit with what is
    rendered around it), +1 for the newline that starts its group's line (within a line units are
    joined by a space, which merges into the next word's first token)."""
    counted = costed if costed is not None else texts
    ids = tokenizer(counted, add_special_tokens=False)["input_ids"] if counted else []
    firsts = [k == 0 or groups[k - 1] != g for k, g in enumerate(groups)]
    return _Filler(groups, texts, [len(x) + int(first) for x, first in zip(ids, firsts)])


def _greedy(filler: _Filler, budget: int, slack: int) -> list[int]:
    """Units in order while they fit the budget; a passage is cut at its first unit that does not
    fit (what is shown of it stays a prefix of sentences), later passages may still fill in."""
    chosen: list[int] = []
    used = 0
    cut: set[int] = set()
    for i, (group, cost) in enumerate(zip(filler.groups, filler.costs)):
        if budget - used <= slack:
            break
        if group in cut:
            continue
        if used + cost <= budget:
            chosen.append(i)
            used += cost
        else:
            cut.add(group)
    return chosen


def _fit(
    tokenizer: Any, filler: _Filler, render: Callable[[list[int]], _Rendered], n_tokens: int, what: str
) -> tuple[_Rendered, EncodedPrompt]:
    """Choose filler units so the tokenised prompt has at most n_tokens tokens and as close as the
    units allow: aims within 1%, accepts within LENGTH_TOLERANCE, or within one unit when units
    are coarser than that (JSON pairs in a few hundred tokens). The per-unit estimates are nearly
    additive; the remaining error (merges across joins, the template) is measured and subtracted
    from the budget. Prompts are encoded by `fdlib.data.nq.encode_prompt`: the content in the chat
    template (BOS + content for a base model), then the answer prefix."""
    lower = math.ceil(n_tokens * (1 - LENGTH_TOLERANCE))
    empty = render([])
    base = encode_prompt(tokenizer, empty.content, empty.answer_prefix)
    if len(base.ids) > lower:
        raise ValueError(
            f"{what}: n_tokens={n_tokens} is too small: the prompt without filler already has {len(base.ids)} tokens"
        )
    budget = n_tokens - len(base.ids)
    slack = max(1, n_tokens // 200)
    close = max(2, n_tokens // 100)
    best: tuple[_Rendered, EncodedPrompt] | None = None
    closest = len(base.ids)
    for _ in range(_MAX_FIT_ROUNDS):
        rendered = render(_greedy(filler, budget, slack))
        enc = encode_prompt(tokenizer, rendered.content, rendered.answer_prefix)
        n = len(enc.ids)
        if n <= n_tokens and (best is None or n > len(best[1].ids)):
            best = (rendered, enc)
        if n_tokens - close <= n <= n_tokens:
            break
        closest = n
        budget += n_tokens - n
    if best is not None and len(best[1].ids) >= min(lower, n_tokens - max(filler.costs, default=0)):
        return best
    raise ValueError(
        f"{what}: could not fit the prompt to {n_tokens} tokens (got {closest}; the filler offered "
        f"~{sum(filler.costs)} tokens)"
    )


@dataclass(frozen=True)
class _Draft:
    """One sample before its length is fitted: the filler on offer, how a choice of its units is
    rendered, the answers, and the info that does not depend on the choice."""

    key: str | int  # the sample id's last part
    filler: _Filler
    render: Callable[[list[int]], _Rendered]
    answers: Sequence[str]
    question: str
    info: dict[str, Any] = field(default_factory=dict)
    # Info that needs the fitted prompt, from (sample id, rendering, encoding); added last.
    fitted_info: Callable[[str, _Rendered, EncodedPrompt], dict[str, Any]] | None = None


def _samples(
    task: str, tokenizer: Any, n_tokens: int, seed: int, depths: Sequence[float],
    draft: Callable[[int, random.Random, float], _Draft],
) -> list[TaskSample]:
    """The loop every generator runs after `_prepare`: sample i is drafted from its own seeded
    stream (`_rng`) and its depth, fitted to n_tokens, and its spans located. The rendering's
    `chars` must name `relevant`; its other names become extra spans. `info` holds the draft's
    info, then the rendering's, then `fitted_info`'s."""
    out = []
    for i, depth in enumerate(depths):
        d = draft(i, _rng(task, seed, i), depth)
        sample_id = f"{task}/{n_tokens}/s{seed}/{d.key}"
        rendered, enc = _fit(tokenizer, d.filler, d.render, n_tokens, sample_id)
        info = {**d.info, **rendered.info}
        if d.fitted_info is not None:
            info.update(d.fitted_info(sample_id, rendered, enc))
        spans = {
            name: char_span_to_tokens(enc.offsets, s + enc.shift, e + enc.shift, f"{sample_id} {name}")
            for name, (s, e) in rendered.chars.items()
        }
        relevant = spans.pop("relevant")
        out.append(TaskSample(
            id=sample_id, task=task, text=enc.text, input_ids=torch.tensor(enc.ids, dtype=torch.long),
            relevant_span=relevant, answers=tuple(d.answers), question=d.question, depth=depth,
            extra_spans=spans, info=info, prompt_format=enc.prompt_format,
        ))
    return out


def _cued(out: _Text, info: dict[str, Any], cue: str, in_answer: bool) -> _Rendered:
    """The prompt so far, ending with the answer's cue: as the start of the model's turn (RULER's
    way, `answer_prefix`), or, HELMET's way, as the last line of the user turn."""
    if not in_answer:
        out.add("\n" + cue)
    return _Rendered(out.content(), out.chars, info, answer_prefix=cue if in_answer else "")


def _at_depth(filler: _Filler, chosen: list[int], item: str, depth: float) -> tuple[list[str], int]:
    """The chosen filler units with `item` inserted at the unit boundary nearest `depth`, and its index."""
    units = [filler.texts[j] for j in chosen]
    at = _boundary([filler.costs[j] for j in chosen], depth)
    units.insert(at, item)
    return units, at


class _Text:
    """Concatenates parts while recording the char range of named ones."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.pos = 0
        self.chars: dict[str, tuple[int, int]] = {}

    def add(self, part: str, name: str | None = None) -> None:
        if name is not None:
            self.chars[name] = (self.pos, self.pos + len(part))
        self.parts.append(part)
        self.pos += len(part)

    def content(self) -> str:
        return "".join(self.parts)


def _boundary(costs: Sequence[int], depth: float) -> int:
    """The unit boundary (0..len) whose share of the filler's tokens before it is nearest depth."""
    total = sum(costs)
    best, best_gap, cum = 0, abs(depth * total), 0
    for k, c in enumerate(costs, start=1):
        cum += c
        gap = abs(cum - depth * total)
        if gap < best_gap:
            best, best_gap = k, gap
    return best


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(" ".join(text.split())) if s]


# ---------------------------------------------------------------------------------------------
# Needles in a haystack


def _passages(examples: Sequence[NQExample]) -> list[Document]:
    seen: dict[tuple[str, str], None] = {}
    for e in examples:
        seen.setdefault((e.gold.title, e.gold.text), None)
    return [Document(t, x) for (t, x) in seen]


def _haystack_filler(tokenizer: Any, passages: Sequence[Document], rng: random.Random, n_tokens: int) -> _Filler:
    """Sentences of randomly ordered passages; only as many passages as the length can use
    (~4 characters a token, with a wide margin) are tokenised."""
    order = list(range(len(passages)))
    rng.shuffle(order)
    groups, texts, n_chars = [], [], 0
    for g in order:
        for s in _sentences(passages[g].text):
            groups.append(g)
            texts.append(s)
            n_chars += len(s) + 1
        if n_chars > 8 * n_tokens:
            break
    return _make_filler(tokenizer, groups, texts)


def _random_keys(rng: random.Random, n: int) -> list[str]:
    if n > len(_ADJECTIVES) * len(_NOUNS):
        raise ValueError(f"at most {len(_ADJECTIVES) * len(_NOUNS)} distinct keys, asked for {n}")
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), n)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def _render_haystack(
    instruction: str, filler: _Filler, needles: Sequence[tuple[float, str]], asked: int, question: str,
    answer_prefix: str, chosen: list[int],
) -> _Rendered:
    """Instruction, the haystack (a passage's sentences share a line; each needle is its own
    line, inserted at the sentence boundary of its depth), then the question.

    Needle spans are named `needle{i}` in text order; the asked one is also `relevant`.
    """
    costs = [filler.costs[i] for i in chosen]
    at = sorted((_boundary(costs, d), k) for k, (d, _) in enumerate(needles))  # (boundary, needle)
    lines: list[tuple[int | None, list[str]]] = []  # (needle index or None, the line's parts)
    for pos, i in enumerate(chosen):
        lines += [(k, [needles[k][1]]) for b, k in at if b == pos]
        # A sentence continues the line before when that line holds its passage's previous sentence.
        if lines and lines[-1][0] is None and filler.groups[chosen[pos - 1]] == filler.groups[i]:
            lines[-1][1].append(filler.texts[i])
        else:
            lines.append((None, [filler.texts[i]]))
    lines += [(k, [needles[k][1]]) for b, k in at if b == len(chosen)]
    out = _Text()
    out.add(instruction + "\n\n")
    names = (f"needle{j}" for j in range(len(needles)))
    for j, (needle, parts) in enumerate(lines):
        if j:
            out.add("\n")
        if needle is None:
            out.add(" ".join(parts))
            continue
        name = next(names)
        out.add(parts[0], name)
        if needle == asked:
            out.chars["relevant"] = out.chars[name]
    out.add("\n\n")
    out.add(f"Question: {question}", "question")
    out.add("\nAnswer:")
    return _Rendered(out.content(), out.chars, answer_prefix=answer_prefix)


def _needle_samples(
    task: str, tokenizer_or_model: Any, n_tokens: int, size: str | int, depth: float | None, seed: int, n_keys: int,
    max_context: int | None, answer_prefix: bool,
) -> list[TaskSample]:
    tokenizer, depths = _prepare(task, tokenizer_or_model, n_tokens, size, depth, seed, max_context)
    passages = _passages(load_nq())
    instruction = _NIAH_INSTRUCTION if n_keys == 1 else _MULTIKEY_INSTRUCTION

    def draft(i: int, rng: random.Random, depth: float) -> _Draft:
        keys = _random_keys(rng, n_keys)
        values = [str(rng.randrange(1_000_000, 10_000_000)) for _ in keys]
        asked = rng.randrange(n_keys)
        # The asked needle at the sample's depth, the others anywhere.
        needle_depths = [depth if k == asked else rng.random() for k in range(n_keys)]
        needles = [(d, _NEEDLE.format(key=k, value=v)) for d, k, v in zip(needle_depths, keys, values)]
        question = _NIAH_QUESTION.format(key=keys[asked])
        filler = _haystack_filler(tokenizer, passages, rng, n_tokens)
        prefix = _NIAH_ANSWER_PREFIX.format(key=keys[asked]) if answer_prefix else ""
        render = partial(_render_haystack, instruction, filler, needles, asked, question, prefix)
        info = {"keys": tuple(keys), "values": tuple(values), "asked": asked}
        return _Draft(i, filler, render, [values[asked]], question, info)

    return _samples(task, tokenizer, n_tokens, seed, depths, draft)


def needle_task(
    tokenizer: Any, *, n_tokens: int, size: str | int = "quick", depth: float | None = None, seed: int = 0,
    max_context: int | None = None, answer_prefix: bool = True,
) -> list[TaskSample]:
    """Single-key needle in a haystack of NQ passages; the answer is the needle's 7-digit number.

    `depth` (0..1) places the needle at that share of the haystack's tokens (at a sentence
    boundary); None spreads the samples' depths evenly. The relevant span is the needle's line.
    `answer_prefix` (RULER's): the prompt ends, after the chat template's assistant header, with
    "The special magic number for <key> mentioned in the provided text is", so the model's first
    tokens are the number (a small model otherwise tends to repeat the question first).
    """
    return _needle_samples("niah", tokenizer, n_tokens, size, depth, seed, 1, max_context, answer_prefix)


def multikey_needle_task(
    tokenizer: Any, *, n_tokens: int, size: str | int = "quick", depth: float | None = None, seed: int = 0,
    n_keys: int = 4, max_context: int | None = None, answer_prefix: bool = True,
) -> list[TaskSample]:
    """`n_keys` needles with different keys; one is asked (at `depth`), the others at random
    depths. Extra spans `needle0`.. cover every needle in text order; `info["asked"]` is the
    asked key's index in `info["keys"]`. `answer_prefix` as in `needle_task`."""
    if isinstance(n_keys, bool) or not isinstance(n_keys, int) or n_keys < 2:
        raise ValueError(f"n_keys must be an int >= 2 for the multi-key task, got {n_keys!r}")
    return _needle_samples("niah_multikey", tokenizer, n_tokens, size, depth, seed, n_keys, max_context, answer_prefix)


# ---------------------------------------------------------------------------------------------
# JSON key-value retrieval


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _render_json(
    filler: _Filler, target: str, key: str, question: str, cue_in_answer: bool, depth: float, chosen: list[int]
) -> _Rendered:
    lines, at = _at_depth(filler, chosen, target, depth)
    out = _Text()
    out.add(_JSON_INSTRUCTION + "\n\nJSON data:\n{\n")
    for j, line in enumerate(lines):
        out.add(line, "relevant" if j == at else None)
        out.add(" ,\n" if j < len(lines) - 1 else "\n")
    out.add("}\n\n")
    out.add(question, "question")
    return _cued(out, {"key": key, "n_pairs": len(lines)}, _JSON_ANSWER_PREFIX, cue_in_answer)


def json_kv_task(
    tokenizer: Any, *, n_tokens: int, size: str | int = "quick", depth: float | None = None, seed: int = 0,
    max_context: int | None = None, answer_prefix: bool = True,
) -> list[TaskSample]:
    """A JSON object of random UUID keys and values, one pair per line; the value of one key is
    asked. The relevant span is exactly the text `"key": "value"` of the asked pair.
    `answer_prefix`: the model's turn begins with `Corresponding value:` (else, as in HELMET, the
    user turn ends with it).

    The pairs are separated by ` ,` (a space before the comma, valid JSON): a closing quote
    directly followed by a comma is one token in byte-level BPE vocabularies, so the pair would
    not end on a token boundary.
    """
    tokenizer, depths = _prepare("json_kv", tokenizer, n_tokens, size, depth, seed, max_context)

    def draft(i: int, rng: random.Random, depth: float) -> _Draft:
        key, value = _uuid(rng), _uuid(rng)
        target = json.dumps(key) + ": " + json.dumps(value)
        # Any tokenizer spends >= 1 token per 6 characters of a UUID pair: enough pairs to fill.
        pairs = [json.dumps(_uuid(rng)) + ": " + json.dumps(_uuid(rng)) for _ in range(n_tokens // 12 + 8)]
        filler = _make_filler(tokenizer, list(range(len(pairs))), pairs, [p + " ," for p in pairs])
        question = f'Key: "{key}"'
        render = partial(_render_json, filler, target, key, question, answer_prefix, depth)
        return _Draft(i, filler, render, [value], question)

    return _samples("json_kv", tokenizer, n_tokens, seed, depths, draft)


# ---------------------------------------------------------------------------------------------
# NQ: RAG and re-ranking


def _nq_questions(
    builder: NQBuilder, split: str, seed: int, n: int, keep: Callable[[NQExample], bool] | None = None
) -> list[NQExample]:
    """The first n questions (those `keep` accepts) of a seeded permutation of the split."""
    pool = [e for e in split_examples(builder.examples, split) if keep is None or keep(e)]  # type: ignore[arg-type]
    if n > len(pool):
        raise ValueError(f"size {n} exceeds the {len(pool)} usable questions of the {split} split")
    random.Random(f"fdlib.tasks:nq:{seed}").shuffle(pool)
    return pool[:n]


def _distractor_filler(
    tokenizer: Any, builder: NQBuilder, example: NQExample, n_tokens: int, header: Callable[[Document], str]
) -> tuple[_Filler, list[Document]]:
    """BM25 distractors (no answer string) as sentence units, best-ranked first; a document's
    first unit is costed with its header line. Enough documents for the length (one per 40
    tokens: NQ passages have ~130)."""
    docs = builder.retriever.distractors(example, min(len(builder.retriever.passages) - 1, n_tokens // 40 + 5))
    groups, texts, costed = [], [], []
    for g, doc in enumerate(docs):
        for k, s in enumerate(_sentences(doc.text)):
            groups.append(g)
            texts.append(s)
            costed.append(header(doc) + s if k == 0 else s)
    return _make_filler(tokenizer, groups, texts, costed), docs


def _with_gold(
    filler: _Filler, chosen: list[int], docs: Sequence[Document], gold: Document, depth: float
) -> tuple[list[Document], list[int], int]:
    """The distractors shown (each a prefix of its sentences), in rank order, with the gold
    document at the document boundary nearest `depth`: the documents, each one's index in `docs`
    (`len(docs)` for the gold one), and the gold one's position."""
    by_group: dict[int, list[int]] = {}
    for i in chosen:
        by_group.setdefault(filler.groups[i], []).append(i)
    shown = [Document(docs[g].title, " ".join(filler.texts[i] for i in units)) for g, units in by_group.items()]
    at = _boundary([sum(filler.costs[i] for i in units) for units in by_group.values()], depth)
    groups = list(by_group)
    return shown[:at] + [gold] + shown[at:], groups[:at] + [len(docs)] + groups[at:], at


def _render_rag(filler: _Filler, docs: list[Document], example: NQExample, depth: float, chosen: list[int]) -> _Rendered:
    documents, _, gold = _with_gold(filler, chosen, docs, example.gold, depth)
    content, doc_chars, q_chars = render_prompt(example.question, documents)
    chars = {f"doc{k}": c for k, c in enumerate(doc_chars)}
    chars["relevant"] = doc_chars[gold]
    chars["question"] = q_chars
    return _Rendered(content, chars, {"documents": tuple(documents), "gold_index": gold})


def rag_task(
    tokenizer: Any, *, n_tokens: int, size: str | int = "quick", depth: float | None = None, seed: int = 0,
    split: str = "test", builder: NQBuilder | None = None, max_context: int | None = None,
) -> list[TaskSample]:
    """NQ multi-document QA (the study's prompt) with as many BM25 distractors as fit n_tokens.

    The gold document is at `depth` among the documents (None: spread). The relevant span is the
    gold document's line; extra spans `doc0`.. and `question`; `info["qa_sample"]` is the same
    prompt as a `fdlib.data.nq.QASample` (for `fdlib.score_sample`). Questions: a seeded
    permutation of the `split` (test by default, so heads found on train are not scored on it).
    """
    tokenizer, depths = _prepare("rag_nq", tokenizer, n_tokens, size, depth, seed, max_context)
    builder = builder if builder is not None else NQBuilder(tokenizer)
    questions = _nq_questions(builder, split, seed, len(depths))

    def draft(i: int, rng: random.Random, depth: float) -> _Draft:
        example = questions[i]
        filler, docs = _distractor_filler(
            tokenizer, builder, example, n_tokens, lambda d: f"Document [10](Title: {d.title}) "
        )
        render = partial(_render_rag, filler, docs, example, depth)
        return _Draft(example.id, filler, render, example.answers, example.question,
                      fitted_info=partial(_qa_sample, tokenizer, example))

    return _samples("rag_nq", tokenizer, n_tokens, seed, depths, draft)


def _qa_sample(
    tokenizer: Any, example: NQExample, sample_id: str, rendered: _Rendered, enc: EncodedPrompt
) -> dict[str, Any]:
    """`info["qa_sample"]`: a RAG prompt as the study's `QASample`, checked to be the same tokens."""
    qa = build_sample(tokenizer, example, rendered.info["documents"], rendered.info["gold_index"], "long", sample_id)
    if qa.input_ids.tolist() != enc.ids:  # the same prompt, tokenised the same way
        raise ValueError(f"{sample_id}: the QASample's tokens differ from the task prompt's")
    return {"qa_sample": qa}


def _render_rerank(
    filler: _Filler, docs: list[Document], ids: list[str], example: NQExample, cue_in_answer: bool, depth: float,
    chosen: list[int],
) -> _Rendered:
    documents, groups, gold = _with_gold(filler, chosen, docs, example.gold, depth)
    doc_ids = [ids[g] for g in groups]  # the gold document's ID is the last
    out = _Text()
    out.add(_RERANK_INSTRUCTION + "\n\n")
    for k, (doc_id, doc) in enumerate(zip(doc_ids, documents)):
        out.add(f"[ID: {doc_id}] Document (Title: {doc.title}): {doc.text}", f"doc{k}")
        out.add("\n")
    out.chars["relevant"] = out.chars[f"doc{gold}"]
    out.add("\n")
    out.add(f"Query: {example.question}", "question")
    info = {"ids": tuple(doc_ids), "documents": tuple(documents), "gold_index": gold}
    # HELMET's user turn ends with "Ranking:"; in the model's turn the cue goes on to "[ID:".
    return _cued(out, info, _RERANK_ANSWER_PREFIX if cue_in_answer else "Ranking:", cue_in_answer)


def rerank_task(
    tokenizer: Any, *, n_tokens: int, size: str | int = "quick", depth: float | None = None, seed: int = 0,
    split: str = "test", builder: NQBuilder | None = None, max_context: int | None = None, answer_prefix: bool = True,
) -> list[TaskSample]:
    """Re-ranking (HELMET's MS MARCO format, on NQ): the gold passage among BM25 distractors, each
    line `[ID: 12345] Document (Title: ...): ...`; the model writes `Ranking: ID > ID > ...`.
    `answer_prefix`: the model's turn begins with `Ranking:` and the first ID's start (else,
    as in HELMET, the user turn ends with `Ranking:`).

    `answers` is the gold ID, `info["ids"]` every ID in prompt order (`info["documents"]` the
    passages, `info["gold_index"]` the gold one's position); the relevant span is the gold
    passage's line. Scored by `ndcg_at_10`.
    """
    tokenizer, depths = _prepare("rerank_nq", tokenizer, n_tokens, size, depth, seed, max_context)
    builder = builder if builder is not None else NQBuilder(tokenizer)
    questions = _nq_questions(builder, split, seed, len(depths))

    def draft(i: int, rng: random.Random, depth: float) -> _Draft:
        example = questions[i]
        filler, docs = _distractor_filler(
            tokenizer, builder, example, n_tokens, lambda d: f"[ID: 12345] Document (Title: {d.title}): "
        )
        # One fixed ID per document (the gold one last), so IDs do not move while fitting.
        ids = [str(x) for x in rng.sample(range(10_000, 100_000), len(docs) + 1)]
        render = partial(_render_rerank, filler, docs, ids, example, answer_prefix, depth)
        return _Draft(example.id, filler, render, [ids[-1]], example.question)

    return _samples("rerank_nq", tokenizer, n_tokens, seed, depths, draft)


# ---------------------------------------------------------------------------------------------
# Many-shot in-context classification


def answer_type(question: str) -> str | None:
    """The `icl_nq` class of a question (person, date, place, quantity, thing), or None."""
    q = " ".join(question.lower().split())
    return next((name for name, pattern in ICL_CLASSES if pattern.match(q)), None)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def _demo(question: str, label: int) -> str:
    return f"Question: {question}\nLabel: {label}"


def _render_icl(
    filler: _Filler, target: str, question: str, cue_in_answer: bool, depth: float, chosen: list[int]
) -> _Rendered:
    demos, at = _at_depth(filler, chosen, target, depth)
    out = _Text()
    out.add(_ICL_INSTRUCTION + "\n\n")
    for j, demo in enumerate(demos):
        out.add(demo, "relevant" if j == at else None)
        out.add("\n\n")
    out.add(f"Question: {question}", "question")
    return _cued(out, {"n_shots": len(demos), "relevant_index": at}, _ICL_ANSWER_PREFIX, cue_in_answer)


def icl_task(
    tokenizer: Any, *, n_tokens: int, size: str | int = "quick", depth: float | None = None, seed: int = 0,
    split: str = "test", builder: NQBuilder | None = None, max_context: int | None = None, answer_prefix: bool = True,
) -> list[TaskSample]:
    """Many-shot in-context classification: as many labelled demonstrations as fit
    (`Question: ...` / `Label: 37`), then an unlabelled question from the `split`.

    Classes are the questions' answer types (`ICL_CLASSES`), mapped per sample to distinct random
    two-digit labels (`info["labels"]`); demonstrations come from the other NQ questions (either
    split: the label is a property of the wording, not of the answer), classes taken in turn so
    they stay balanced. ICL has no single gold passage: the relevant span is the demonstration
    of the asked class that shares the most words with the question (what a nearest-neighbour
    reader would copy its label from), placed at `depth`; the other same-class demonstrations
    carry the label too, so the relevant score is a lower bound on the attention the answer can
    use. `answer_prefix`: the model's turn begins with `Label:` (else the user turn ends with it).
    """
    tokenizer, depths = _prepare("icl_nq", tokenizer, n_tokens, size, depth, seed, max_context)
    builder = builder if builder is not None else NQBuilder(tokenizer)
    names = [name for name, _ in ICL_CLASSES]
    kind = {e.id: answer_type(e.question) for e in builder.examples}  # one regex pass for all samples
    of_kind = {name: [e for e in builder.examples if kind[e.id] == name] for name in names}
    questions = _nq_questions(builder, split, seed, len(depths), keep=lambda e: kind[e.id] is not None)

    def draft(i: int, rng: random.Random, depth: float) -> _Draft:
        example = questions[i]
        labels = dict(zip(names, rng.sample(range(10, 100), len(names))))
        asked = kind[example.id]
        by_class = {name: [e for e in of_kind[name] if e.id != example.id] for name in names}
        words = _words(example.question)
        # The nearest same-class question by shared words (ties: NQ order), shown at `depth`.
        nearest = max(by_class[asked], key=lambda e: len(words & _words(e.question)))
        by_class[asked] = [e for e in by_class[asked] if e.id != nearest.id]
        for members in by_class.values():
            rng.shuffle(members)
        # Classes in turn (a fresh random class order each round), only as many as any length needs.
        demos: list[str] = []
        for r in range(max(len(m) for m in by_class.values())):
            for name in rng.sample(names, len(names)):
                if r < len(by_class[name]):
                    demos.append(_demo(by_class[name][r].question, labels[name]))
            if sum(map(len, demos)) > 8 * n_tokens:  # ~4 characters a token, a wide margin
                break
        filler = _make_filler(tokenizer, list(range(len(demos))), demos, [d + "\n\n" for d in demos])
        target = _demo(nearest.question, labels[asked])
        render = partial(_render_icl, filler, target, example.question, answer_prefix, depth)
        info = {"labels": labels, "class": asked, "nearest": nearest.id}
        return _Draft(example.id, filler, render, [str(labels[asked])], example.question, info)

    return _samples("icl_nq", tokenizer, n_tokens, seed, depths, draft)


# ---------------------------------------------------------------------------------------------
# Scorers and the registry


def substring_score(prediction: str, sample: TaskSample) -> float:
    """1.0 when a normalised gold answer occurs in the normalised prediction (best-subspan EM)."""
    return float(best_subspan_em(prediction, sample.answers))


def label_score(prediction: str, sample: TaskSample) -> float:
    """1.0 when the first number in the prediction is the gold label (a list of labels, or a
    label followed by others, does not count)."""
    first = re.search(r"\d+", prediction)
    return float(first is not None and first.group() == sample.answers[0])


def parse_ranking(prediction: str, candidates: Sequence[str] = ()) -> list[str]:
    """The IDs in a ranking, in order, each once; only `candidates` when given."""
    allowed = set(candidates)
    ids = [x for x in re.findall(r"\d+", prediction) if not allowed or x in allowed]
    return list(dict.fromkeys(ids))


def ndcg_at_10(prediction: str, sample: TaskSample) -> float:
    """NDCG@10 of the parsed ranking with the gold ID as the only relevant item:
    1 / log2(1 + rank) if the gold ID is among the first 10 parsed IDs, else 0."""
    ranking = parse_ranking(prediction, sample.info.get("ids", ()))[:10]
    gold = sample.answers[0]
    return 1.0 / math.log2(2 + ranking.index(gold)) if gold in ranking else 0.0


TaskFn = Callable[..., list[TaskSample]]
TASKS: dict[str, TaskFn] = {
    "niah": needle_task,
    "niah_multikey": multikey_needle_task,
    "json_kv": json_kv_task,
    "rag_nq": rag_task,
    "rerank_nq": rerank_task,
    "icl_nq": icl_task,
}
NQ_TASKS = frozenset({"rag_nq", "rerank_nq", "icl_nq"})  # built from NQ: they take `builder=`
METRICS: dict[str, str] = {"niah": "em", "niah_multikey": "em", "json_kv": "em", "rag_nq": "em",
                           "rerank_nq": "ndcg@10", "icl_nq": "label"}
SCORERS: dict[str, Callable[[str, TaskSample], float]] = {
    "niah": substring_score,
    "niah_multikey": substring_score,
    "json_kv": substring_score,
    "rag_nq": substring_score,
    "rerank_nq": ndcg_at_10,
    "icl_nq": label_score,
}


def task_samples(
    name: str, tokenizer: Any, n_tokens: int, size: str | int = "quick", seed: int = 0, **kwargs: Any
) -> list[TaskSample]:
    """Samples of the task `name` (a key of TASKS); other keyword arguments go to its generator."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name](tokenizer, n_tokens=n_tokens, size=size, seed=seed, **kwargs)


def grade(prediction: str, sample: TaskSample) -> float:
    """The task's metric for one prediction (1.0 for the gold answer, 0.0 for a wrong one)."""
    if sample.task not in SCORERS:
        raise ValueError(f"no scorer for task {sample.task!r}: expected one of {sorted(SCORERS)}")
    return SCORERS[sample.task](prediction, sample)
