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


def build_tiny(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Tiny:
    """A bridge over a random tiny GQA Llama, plus a separate eager HF copy as the reference, both
    with weights in `dtype`."""
    from arch_models import as_dtype
    from transformers import LlamaForCausalLM

    import fdlib

    torch.manual_seed(seed)
    config = build_llama_config(**overrides)
    hf = LlamaForCausalLM(config).eval()
    reference = LlamaForCausalLM(build_llama_config(**overrides, attn_implementation="eager")).eval()
    reference.load_state_dict(hf.state_dict())
    tokenizer = build_tokenizer(config.vocab_size)
    return Tiny(fdlib.load_model(hf, tokenizer, dtype=dtype), as_dtype(reference, dtype), tokenizer)


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


# --- bfloat16 parity ------------------------------------------------------------------------
# bfloat16 keeps 8 significant bits: one unit in the last place of x is 2^(floor(log2|x|) - 7).
# Executors of the same computation round at different points (the batched engine splits the
# attention over the prompt's and the row's own keys; hooks add d_Q before or after a rounding),
# and through the tiny models' two layers those roundings put the bfloat16 model 2-5 ulps of its
# largest logit away from the float32 model on the same weights. Between two bfloat16 executors,
# and to the bfloat16 reference, 8 ulps of the largest logit are allowed: a real error (a missed
# edit, a wrong head, a cast table) moves logits by far more. Span scores are sums of attention
# weights taken in float32 from bfloat16 patterns; their differences carry the rounding of each
# weight (up to 2^-8 of it) and of the logits of earlier layers, so the margin is empirical: the
# largest difference seen is 2.8e-3 (2^-8.5), and 2^-7 is allowed; a missed reweighting moves a
# score by 0.1 or more.
BF16_LOGIT_ULPS = 8
BF16_SCORE_TOL = 2.0**-7


def bf16_logit_tol(reference: torch.Tensor) -> float:
    """BF16_LOGIT_ULPS bfloat16 ulps of the largest |logit| of `reference`."""
    import math

    top = float(reference.abs().max())
    return BF16_LOGIT_ULPS * 2.0 ** (math.floor(math.log2(top)) - 7)


def sequential_forced(model, prefix, row, tokens, spans):
    """The sequential executor teacher-forced: `row` as hooks on the bridge (`intervene`) from
    the last prompt row, the last prompt token and `tokens` in one cached forward. Returns the
    logits of those rows `[len(tokens) + 1, d_vocab]` (float32) and the span scores over the answer
    rows (`SpanRecorder` from the first answer row, as `decode` records them). The prefix's
    cache is returned to its length."""
    from fdlib.interventions.row import intervene
    from fdlib.model.decoding import SpanRecorder, hooks

    ids = torch.cat([prefix.tokens[-1:], torch.as_tensor(tokens, dtype=torch.long)])
    recorder = SpanRecorder(spans, from_pos=prefix.length, n_layers=model.cfg.n_layers)
    try:
        with torch.no_grad(), intervene(model, row, from_pos=prefix.length - 1), hooks(model, recorder.fwd_hooks()):
            logits = model(ids[None], past_key_values=prefix.cache, return_type="logits")[0].float()
    finally:
        grown = int(prefix.cache.get_seq_length()) - (prefix.length - 1)
        if grown:
            prefix.cache.crop(-grown)  # transformers' crop takes minus the number of tokens to drop
    return logits, recorder.mean()
