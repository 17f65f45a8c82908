"""Shared fixtures. Unit tests use tiny random Llama models with grouped-query attention built
from a config here (no download); integration tests (marked `integration`) load the real default
model once per session."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import pytest
import torch


def build_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in SmolLM2
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def build_tokenizer(vocab_size: int = 64):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 4}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    # A tokenizer read back from disk carries `name_or_path`, which TransformerLens needs.
    path = tempfile.mkdtemp(prefix="fdlib-tiny-tok-")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@dataclass
class Tiny:
    model: object  # TransformerBridge
    hf: object  # an independent eager LlamaForCausalLM with the same weights
    tokenizer: object


def build_tiny(seed: int = 0, **overrides) -> Tiny:
    """A bridge over a random tiny GQA Llama, plus a separate eager HF copy as the reference."""
    from transformers import LlamaForCausalLM

    import fdlib

    torch.manual_seed(seed)
    config = build_llama_config(**overrides)
    hf = LlamaForCausalLM(config).eval()
    reference = LlamaForCausalLM(build_llama_config(**overrides, attn_implementation="eager")).eval()
    reference.load_state_dict(hf.state_dict())
    tokenizer = build_tokenizer(config.vocab_size)
    return Tiny(fdlib.load_model(hf, tokenizer), reference, tokenizer)


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return build_tiny()


@pytest.fixture(scope="session")
def smol():
    """The real default model (integration tier)."""
    import fdlib

    return fdlib.load_model()


def fake_samples(n: int, variant: str = "long"):
    """QASamples of random token ids with three 'documents' (gold = the second), for the tiny
    model: the engine only needs ids and spans."""
    import fdlib
    from fdlib.data.nq import Document, QASample

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(5, 64, (24,), generator=g)
        docs = (Document("a", "x"), Document("b", "y"), Document("c", "z"))
        spans = (fdlib.Span(1, 6), fdlib.Span(6, 12), fdlib.Span(12, 18))
        gold = None if variant == "negative" else 1
        out.append(QASample(f"s{i}/{variant}", variant, "q", ("w7",), docs, gold, "", ids, spans, fdlib.Span(18, 24), fdlib.Span(0, 1)))
    return out
