"""How prompts are built for each kind of tokenizer, on tiny byte-level BPE tokenizers trained here
(no download): a base model (no chat template: BOS + the plain prompt), a chat template with and
without BOS in it, and a tokenizer with neither (refused)."""

from __future__ import annotations

import functools
import tempfile

import pytest

import fdlib
from fdlib.data.nq import (
    Document,
    NQBuilder,
    NQExample,
    build_sample,
    encode_prompt,
    load_nq,
    prompt_format,
    render_prompt,
)
from fdlib.data.tasks import json_kv_task, needle_task, rag_task

EXAMPLE = NQExample(
    index=7,
    question="who wrote the song yesterday",
    answers=("Paul McCartney",),
    gold=Document("Yesterday (song)", "Yesterday is a song by the Beatles, written by Paul McCartney."),
)
DISTRACTOR = Document("Let It Be", "Let It Be is the twelfth and final album by the Beatles.")
CHAT_NO_BOS = (
    "{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT_WITH_BOS = "{{ bos_token }}" + CHAT_NO_BOS


@functools.lru_cache(maxsize=None)
def _trained_dir(with_bos: bool) -> str:
    """A byte-level BPE trained on the instructions and some NQ passages, saved to a directory
    (a tokenizer read back from disk behaves like fdlib's offline ones)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [render_prompt(EXAMPLE.question, [EXAMPLE.gold, DISTRACTOR])[0]]
    corpus += [f"{e.question} {e.gold.title} {e.gold.text}" for e in load_nq()[:300]]
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    kwargs = dict(eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    if with_bos:
        kwargs["bos_token"] = "<bos>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    path = tempfile.mkdtemp(prefix="fdlib-bpe-")
    fast.save_pretrained(path)
    return path


def bpe(with_bos: bool = True, chat_template: str | None = None):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(_trained_dir(with_bos))
    tok.chat_template = chat_template
    return tok


def test_prompt_format_by_tokenizer():
    assert prompt_format(bpe()) == "base"
    assert prompt_format(bpe(chat_template=CHAT_NO_BOS)) == "chat"
    assert prompt_format(bpe(with_bos=False, chat_template=CHAT_NO_BOS)) == "chat"


def test_neither_template_nor_bos_is_refused_naming_the_model():
    tok = bpe(with_bos=False)
    with pytest.raises(ValueError, match=r"fdlib-bpe-.*neither a chat template nor a BOS token"):
        build_sample(tok, EXAMPLE, [EXAMPLE.gold], 0, "gold", "x/gold")
    with pytest.raises(ValueError, match="neither a chat template nor a BOS token"):
        needle_task(tok, n_tokens=200, size=1)


def test_base_prompt_is_bos_then_the_plain_prompt():
    tok = bpe()
    bos = tok.bos_token_id
    s = build_sample(tok, EXAMPLE, [DISTRACTOR, EXAMPLE.gold], 1, "long", "x/k2g2")
    content, _, _ = render_prompt(EXAMPLE.question, [DISTRACTOR, EXAMPLE.gold])
    assert s.prompt_format == "base"
    assert s.text == "<bos>" + content and content.endswith("Question: who wrote the song yesterday\nAnswer:")
    ids = s.input_ids.tolist()
    assert ids[0] == bos and ids.count(bos) == 1
    assert ids == [bos] + tok(content, add_special_tokens=False)["input_ids"]
    assert s.sink_span == fdlib.Span(0, 1) and tok.convert_ids_to_tokens(ids[0]) == "<bos>"
    for i, (span, doc) in enumerate(zip(s.doc_spans, s.documents)):
        assert tok.decode(s.input_ids[span.slice]) == doc.line(i)
    assert tok.decode(s.input_ids[s.question_span.slice]) == f"Question: {EXAMPLE.question}"
    assert s.gold_span == s.doc_spans[1]


def test_chat_template_without_bos_gets_bos_in_front():
    tok = bpe(chat_template=CHAT_NO_BOS)
    s = build_sample(tok, EXAMPLE, [EXAMPLE.gold], 0, "gold", "x/gold")
    ids = s.input_ids.tolist()
    assert s.prompt_format == "chat"
    assert s.text.startswith("<bos><|user|>\n") and s.text.endswith("<|assistant|>\n")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.convert_ids_to_tokens(ids[1]) == "<|user|>"
    assert tok.decode(s.input_ids[s.doc_spans[0].slice]) == EXAMPLE.gold.line(0)


def test_chat_template_with_bos_is_left_as_rendered():
    tok = bpe(chat_template=CHAT_WITH_BOS)
    s = build_sample(tok, EXAMPLE, [EXAMPLE.gold], 0, "gold", "x/gold")
    ids = s.input_ids.tolist()
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": render_prompt(EXAMPLE.question, [EXAMPLE.gold])[0]}], tokenize=False, add_generation_prompt=True
    )
    assert s.text == rendered and ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


def test_chat_template_without_any_bos_token_keeps_its_first_token():
    tok = bpe(with_bos=False, chat_template=CHAT_NO_BOS)
    s = build_sample(tok, EXAMPLE, [EXAMPLE.gold], 0, "gold", "x/gold")
    assert s.text.startswith("<|user|>") and tok.convert_ids_to_tokens(int(s.input_ids[0])) == "<|user|>"


@pytest.mark.parametrize(
    "content,prefix,joined",
    [("Question: q\nAnswer:", "The number is", "Question: q\nAnswer: The number is"), ('Key: "k"', "Value:", 'Key: "k"\nValue:')],
)
def test_base_answer_prefix_follows_the_content(content, prefix, joined):
    tok = bpe()
    enc = encode_prompt(tok, content, prefix)
    assert enc.text == "<bos>" + joined and enc.shift == len("<bos>")
    assert enc.ids == [tok.bos_token_id] + tok(joined, add_special_tokens=False)["input_ids"]
    assert enc.offsets[0] == (0, len("<bos>")) and enc.text[slice(*enc.offsets[1])] == joined[: enc.offsets[1][1] - enc.shift]


def test_task_samples_on_a_base_model():
    tok = bpe()
    for s in needle_task(tok, n_tokens=400, size=2) + json_kv_task(tok, n_tokens=400, size=1):
        assert s.prompt_format == "base" and s.text.startswith("<bos>")
        assert int(s.input_ids[0]) == tok.bos_token_id and s.sink_span == fdlib.Span(0, 1)
        assert s.n_tokens <= 400
        assert s.input_ids.tolist() == [tok.bos_token_id] + tok(s.text[len("<bos>"):], add_special_tokens=False)["input_ids"]
    niah = needle_task(tok, n_tokens=400, size=1)[0]
    assert tok.decode(niah.input_ids[niah.relevant_span.slice]).startswith("The special magic number for")
    assert "\nAnswer: The special magic number for" in niah.text


def test_rag_task_on_a_base_model_matches_its_qa_sample():
    tok = bpe()
    builder = NQBuilder(tok, load_nq()[:200])
    for s in rag_task(tok, n_tokens=600, size=2, builder=builder):
        qa = s.info["qa_sample"]
        assert s.prompt_format == qa.prompt_format == "base"
        assert qa.input_ids.tolist() == s.input_ids.tolist() and int(s.input_ids[0]) == tok.bos_token_id
        assert tok.decode(s.input_ids[s.relevant_span.slice]) == qa.documents[qa.gold_index].line(qa.gold_index)
