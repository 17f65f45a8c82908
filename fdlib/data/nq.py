"""NQ-open multi-document QA: the shipped questions, a stable split, BM25 distractors, prompts
in the model's chat template (or, for a base model, the plain prompt after its BOS token) with
one exact token `Span` per document.

Data: the 2,655 NaturalQuestions-Open questions with gold passages of "Lost in the Middle"
(Liu et al., 2023; MIT licence, Copyright (c) 2023 Nelson Liu; passages from Wikipedia, CC BY-SA),
shipped as `fdlib/data/nq-open-oracle.jsonl.gz`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from fdlib.core.metrics import best_subspan_em, normalize_answer, question_id
from fdlib.core.spans import Span

Size = Literal["quick", "paper", "full"]
Split = Literal["train", "test"]
Variant = Literal["long", "gold", "negative"]
# How a prompt was built: inside the tokenizer's chat template, or (a base model without one) as
# the plain prompt text after the BOS token. Either way position 0 is the attention sink.
PromptFormat = Literal["chat", "base"]

# The one place NQ question counts are set, per split: `quick` is what CI runs, `paper` the size
# the committed results were made at (the paper's claims resolved, one machine overnight with the
# batched engine: heads ranked on 300 train questions, studies on 200 test questions), `full` the
# whole split.
SIZES: dict[str, dict[str, int | None]] = {
    "quick": {"train": 6, "test": 6},
    "paper": {"train": 300, "test": 200},
    "full": {"train": None, "test": None},
}
SPLIT_SEED = 0

INSTRUCTION = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant)."
)


def sized(table: Mapping[str, Any], size: str | int) -> Any:
    """The entry of a per-size table (`quick`, `full`), or an explicit positive int passed
    through: how every study turns its one `size` parameter into a count."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        return size
    if size not in table:
        raise ValueError(f"unknown size {size!r}: expected one of {sorted(table)} or a positive int")
    return table[size]


def parse_size(text: str) -> str | int:
    """A size as written in `FDLIB_SIZE` or on a command line: a size name, or a count."""
    text = str(text).strip()
    return int(text) if text.isdigit() else text


def n_samples(size: Size | int, split: Split = "test") -> int | None:
    """Number of NQ questions of `split` for a size name (None = all), or an explicit count."""
    entry = sized(SIZES, size)
    return entry if isinstance(entry, int) else entry[split]


@dataclass(frozen=True)
class Document:
    title: str
    text: str

    def line(self, index: int) -> str:
        """The study's one-line rendering, numbered from 1."""
        return f"Document [{index + 1}](Title: {self.title}) {self.text}"


@dataclass(frozen=True)
class NQExample:
    index: int  # line number in the shipped file: the example's stable id
    question: str
    answers: tuple[str, ...]
    gold: Document

    @property
    def id(self) -> str:
        return f"nq{self.index:04d}"


def load_nq() -> list[NQExample]:
    """All 2,655 questions, in file order."""
    path = resources.files("fdlib") / "data" / "nq-open-oracle.jsonl.gz"
    out = []
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            obj = json.loads(line)
            ctx = obj["ctxs"][0]
            # Stripped: a trailing space would merge with the line's newline into one token
            # (" \n"), and the document's span would no longer end on a token boundary.
            doc = Document(ctx["title"].strip(), ctx["text"].strip())
            out.append(NQExample(i, obj["question"].strip(), tuple(obj["answers"]), doc))
    return out


def split_examples(examples: Sequence[NQExample], split: Split, seed: int = SPLIT_SEED) -> list[NQExample]:
    """A deterministic 50/50 split: order by SHA-256 of (seed, question), first half is train.

    A hash of the text (not an RNG stream) gives the same split on every machine and version.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: expected 'train' or 'test'")
    ranked = sorted(examples, key=lambda e: hashlib.sha256(f"{seed}:{e.question}".encode()).hexdigest())
    half = len(ranked) // 2
    chosen = ranked[:half] if split == "train" else ranked[half:]
    return sorted(chosen, key=lambda e: hashlib.sha256(f"{seed}:order:{e.question}".encode()).hexdigest())


class Retriever:
    """BM25 (bm25s) over every shipped gold passage, for on-topic but wrong distractors."""

    def __init__(self, examples: Sequence[NQExample]) -> None:
        import bm25s

        # One entry per distinct passage (some questions share a gold passage).
        seen: dict[tuple[str, str], int] = {}
        for e in examples:
            seen.setdefault((e.gold.title, e.gold.text), len(seen))
        self.passages = [Document(t, x) for (t, x) in seen]
        self._norm = [normalize_answer(f"{d.title} {d.text}") for d in self.passages]
        self._bm25 = bm25s.BM25()
        self._bm25.index(bm25s.tokenize([f"{d.title} {d.text}" for d in self.passages], show_progress=False), show_progress=False)

    def distractors(self, example: NQExample, k: int) -> list[Document]:
        """The k best-ranked passages for the question that are not its gold passage and
        contain no normalised answer string (so they are on-topic and wrong)."""
        import bm25s

        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if k == 0:
            return []
        answers = [a for a in (normalize_answer(x) for x in example.answers) if a]
        query = bm25s.tokenize([example.question], show_progress=False)
        n = min(len(self.passages), max(4 * k, 50))
        while True:
            idx, _ = self._bm25.retrieve(query, k=n, show_progress=False)
            out = []
            for i in idx[0]:
                doc = self.passages[int(i)]
                if doc == example.gold or any(a in self._norm[int(i)] for a in answers):
                    continue
                out.append(doc)
                if len(out) == k:
                    return out
            if n == len(self.passages):
                raise ValueError(f"only {len(out)} distractors available for {example.id}, asked for {k}")
            n = min(len(self.passages), n * 4)


@dataclass(frozen=True)
class QASample:
    """One prompt, tokenised, with exact token spans.

    `doc_spans[i]` covers the line `Document [i+1](Title: ...) ...` exactly; `gold_index` is the
    position of the relevant document in `documents` (None for the negative variant).
    """

    id: str
    variant: Variant
    question: str
    answers: tuple[str, ...]
    documents: tuple[Document, ...]
    gold_index: int | None
    text: str
    input_ids: Int[Tensor, "pos"]
    doc_spans: tuple[Span, ...]
    question_span: Span
    sink_span: Span
    prompt_format: PromptFormat = "chat"

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def gold_span(self) -> Span | None:
        return None if self.gold_index is None else self.doc_spans[self.gold_index]

    def named_spans(self) -> dict[str, Span]:
        """Every span by name: `relevant` (the gold document, when there is one), `sink` (token
        0), `sink2` (tokens 0-1, the authors' sink), `doc0`..`doc{k-1}`, `question`."""
        spans = {} if self.gold_span is None else {"relevant": self.gold_span}
        spans["sink"] = self.sink_span
        spans["sink2"] = Span(0, min(2, self.n_tokens))
        spans.update({f"doc{i}": s for i, s in enumerate(self.doc_spans)})
        spans["question"] = self.question_span
        return spans

    @property
    def group(self) -> str:
        """The question this prompt is a variant of (every variant and gold position of one
        question share it): what a study writes in one transaction and shards by."""
        return question_id(self.id)

    @property
    def metric(self) -> str:
        return "em"

    def score(self, prediction: str) -> float:
        """Best-subspan exact match of a prediction against the sample's answers (1.0 or 0.0)."""
        return float(best_subspan_em(prediction, self.answers))


def char_span_to_tokens(offsets: list[tuple[int, int]], start: int, end: int, what: str) -> Span:
    """The token span whose characters are exactly [start, end): boundaries must fall between
    tokens, else the span would be fuzzy and we refuse it."""
    first = next((t for t, (s, e) in enumerate(offsets) if s == start and e > s), None)
    last = next((t for t, (s, e) in enumerate(offsets) if e == end and e > s), None)
    if first is None or last is None or last < first:
        raise ValueError(f"{what}: characters [{start}, {end}) do not fall on token boundaries")
    return Span(first, last + 1)


def render_prompt(question: str, documents: Sequence[Document]) -> tuple[str, list[tuple[int, int]], tuple[int, int]]:
    """The study's prompt; returns the text and the char ranges of each document line and of the
    question line (`Question: ...`; the label keeps the span on token boundaries)."""
    parts = [INSTRUCTION, "\n\n"]
    pos = sum(len(p) for p in parts)
    doc_chars = []
    for i, doc in enumerate(documents):
        line = doc.line(i)
        doc_chars.append((pos, pos + len(line)))
        parts += [line, "\n"]
        pos += len(line) + 1
    q_line = f"Question: {question}"
    parts += ["\n", q_line, "\nAnswer:"]
    q_start = pos + 1
    return "".join(parts), doc_chars, (q_start, q_start + len(q_line))


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def prompt_format(tokenizer: Any) -> PromptFormat:
    """`chat` when the tokenizer has a chat template, `base` when it has none but a BOS token
    (a base model: the plain prompt after BOS). A tokenizer with neither is refused: position 0,
    the attention-sink span, would be the prompt's first word, and a base model prompted without
    its BOS token answers far worse (Gemma 3 270M: 0/5 gold-only NQ questions instead of 3/5)."""
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    if getattr(tokenizer, "bos_token", None) is not None and getattr(tokenizer, "bos_token_id", None) is not None:
        return "base"
    raise ValueError(
        f"cannot build prompts for model {_tokenizer_name(tokenizer)!r}: its tokenizer has neither a chat "
        "template nor a BOS token, so the prompt would start with an ordinary word (no attention-sink "
        "token at position 0)"
    )


def chat_text(tokenizer: Any, content: str) -> tuple[str, int]:
    """The prompt text for `content` and the character offset where `content` starts in it:
    `content` as the user turn of the tokenizer's chat template (with the generation prompt), or,
    for a base model (`prompt_format` "base"), `content` after the BOS token's text."""
    if prompt_format(tokenizer) == "base":
        return tokenizer.bos_token + content, len(tokenizer.bos_token)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    if text.count(content) != 1:
        raise ValueError("the chat template does not contain the prompt exactly once")
    return text, text.index(content)


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt's text, token ids and offsets; `shift` is where the content starts in `text`."""

    text: str
    shift: int
    ids: list[int]
    offsets: list[tuple[int, int]]
    prompt_format: PromptFormat


def _tokens(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _with_bos(tokenizer: Any, enc: EncodedPrompt) -> EncodedPrompt:
    """`enc` with the BOS token (and its text) in front; offsets move with the text."""
    bos = tokenizer.bos_token
    n = len(bos)
    return EncodedPrompt(
        bos + enc.text, enc.shift + n, [int(tokenizer.bos_token_id), *enc.ids],
        [(0, n), *((s + n, e + n) for s, e in enc.offsets)], enc.prompt_format,
    )


def encode_prompt(tokenizer: Any, content: str, answer_prefix: str = "") -> EncodedPrompt:
    """Tokenise `content` the way every fdlib prompt is: in the chat template (then the answer
    prefix opens the model's turn), or for a base model the plain text after BOS (then the answer
    prefix follows the content after a space if the content ends with a colon, else a newline).

    Position 0 is the BOS token wherever the tokenizer has one: a base prompt is BOS + the tokens
    of the text (as `tokenizer(text)` prepends it), and a chat template that does not start with
    BOS gets it in front. Special tokens in the prompt text are never added by the tokenizer.
    """
    fmt = prompt_format(tokenizer)
    if fmt == "chat":
        text, shift = chat_text(tokenizer, content)
        text += answer_prefix
        ids, offsets = _tokens(tokenizer, text)
        enc = EncodedPrompt(text, shift, ids, offsets, "chat")
        bos = tokenizer.bos_token_id
        if tokenizer.bos_token is not None and bos is not None and (not ids or ids[0] != bos):
            enc = _with_bos(tokenizer, enc)
        return enc
    body = content
    if answer_prefix:
        body += (" " if content.endswith(":") else "\n") + answer_prefix
    ids, offsets = _tokens(tokenizer, body)
    return _with_bos(tokenizer, EncodedPrompt(body, 0, ids, offsets, "base"))


def build_sample(
    tokenizer: Any,
    example: NQExample,
    documents: Sequence[Document],
    gold_index: int | None,
    variant: Variant,
    sample_id: str,
) -> QASample:
    """Tokenise the prompt (`encode_prompt`: the chat template, or BOS + the plain prompt for a
    base model) and locate every span; the sink span is position 0."""
    content, doc_chars, q_chars = render_prompt(example.question, documents)
    enc = encode_prompt(tokenizer, content)
    text, shift, offsets = enc.text, enc.shift, enc.offsets
    doc_spans = tuple(
        char_span_to_tokens(offsets, s + shift, e + shift, f"{sample_id} document {i + 1}")
        for i, (s, e) in enumerate(doc_chars)
    )
    q_span = char_span_to_tokens(offsets, q_chars[0] + shift, q_chars[1] + shift, f"{sample_id} question")
    return QASample(
        id=sample_id,
        variant=variant,
        question=example.question,
        answers=example.answers,
        documents=tuple(documents),
        gold_index=gold_index,
        text=text,
        input_ids=torch.tensor(enc.ids, dtype=torch.long),
        doc_spans=doc_spans,
        question_span=q_span,
        sink_span=Span(0, 1),
        prompt_format=enc.prompt_format,
    )


class NQBuilder:
    """Builds k-document samples; holds the examples and the BM25 index (built once)."""

    def __init__(self, tokenizer: Any, examples: Sequence[NQExample] | None = None) -> None:
        self.tokenizer = tokenizer
        self.examples = list(examples) if examples is not None else load_nq()

    @cached_property
    def retriever(self) -> Retriever:
        return Retriever(self.examples)

    def sample(
        self, example: NQExample, n_docs: int = 20, gold_position: int | None = None, variant: Variant = "long"
    ) -> QASample:
        """`long`: gold at `gold_position` (1-based; default the middle) among n_docs-1 BM25
        distractors; `gold`: the gold passage alone; `negative`: the same distractors, no gold."""
        if n_docs < 1:
            raise ValueError(f"n_docs must be >= 1, got {n_docs}")
        pos = (n_docs + 1) // 2 if gold_position is None else gold_position
        if not 1 <= pos <= n_docs:
            raise ValueError(f"gold_position {gold_position} is outside 1..{n_docs}")
        if variant == "gold":
            return build_sample(self.tokenizer, example, [example.gold], 0, "gold", f"{example.id}/gold")
        distractors = self.retriever.distractors(example, n_docs - 1)
        if variant == "negative":
            return build_sample(self.tokenizer, example, distractors, None, "negative", f"{example.id}/neg{n_docs - 1}")
        if variant != "long":
            raise ValueError(f"unknown variant {variant!r}: expected 'long', 'gold' or 'negative'")
        docs = distractors[: pos - 1] + [example.gold] + distractors[pos - 1 :]
        return build_sample(self.tokenizer, example, docs, pos - 1, "long", f"{example.id}/k{n_docs}g{pos}")

    def samples(
        self,
        *,
        split: Split = "test",
        size: Size | int = "quick",
        n_docs: int = 20,
        gold_position: int | Sequence[int] | None = None,
        variant: Variant = "long",
        seed: int = SPLIT_SEED,
    ) -> list[QASample]:
        """The first `size` questions of `split` as `variant` prompts; `gold_position` is one
        position for all (default: the middle) or a sequence rotated over the questions (each
        question one prompt, the positions balanced: a study's cost of one position, its
        average over several)."""
        chosen = split_examples(self.examples, split, seed)[: n_samples(size, split)]
        if isinstance(gold_position, (list, tuple)):
            # rotated: question i gets the gold document at gold_position[i mod len]
            if not gold_position:
                raise ValueError("gold_position: give at least one position to rotate over")
            return [self.sample(e, n_docs, gold_position[i % len(gold_position)], variant) for i, e in enumerate(chosen)]
        return [self.sample(e, n_docs, gold_position, variant) for e in chosen]
