"""Tiny random models of every architecture family fdlib claims to support, each as a bridge
(`fdlib.load_model`) plus an independent eager Hugging Face copy with the same weights.

    from arch_models import ARCHS, build_arch   # tests/ is on sys.path under pytest
    tiny = build_arch("gemma2", seed=0)   # Tiny(model=<TransformerBridge>, hf=<eager HF model>, tokenizer)

The configs are small enough to build and run in about a second each (2-3 layers, hidden 32-64,
vocab 64, 4 query heads, 2 KV heads where the architecture allows it). Weights are drawn with a
larger spread than the libraries' default and every norm / bias vector is perturbed, so attention
is far from uniform, softcaps bite and q/k norms matter.

Facts a test may rely on (see `ARCH_FACTS`): `window` (the sliding window, or None), which layers
slide, softcapping, q/k norms, fused QKV, learned positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

try:  # under pytest (tests/ on sys.path, conftest already imported), or with tests/ on sys.path
    from conftest import Tiny, build_tokenizer
except ImportError:  # pragma: no cover - imported as tests.arch_models from the repository root
    from tests.conftest import Tiny, build_tokenizer  # type: ignore[no-redef]

VOCAB = 64
WINDOW = 8  # the sliding window of mistral_window, gemma2 and gemma3's local layers

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
    return LlamaConfig, LlamaForCausalLM, cfg


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, use_sliding_window=False)
    return Qwen2Config, Qwen2ForCausalLM, cfg


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, use_sliding_window=False)
    return Qwen3Config, Qwen3ForCausalLM, cfg


def _mistral(window: int | None):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=window)
    return MistralConfig, MistralForCausalLM, cfg


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=WINDOW,
               query_pre_attn_scalar=16, attn_logit_softcapping=1.5, final_logit_softcapping=8.0,
               layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Gemma2Config, Gemma2ForCausalLM, cfg


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=WINDOW,
               query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    return Gemma3TextConfig, Gemma3ForCausalLM, cfg


def _phi3(partial: float = 1.0):
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128,
               sliding_window=None, partial_rotary_factor=partial)
    return Phi3Config, Phi3ForCausalLM, cfg


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, n_embd=32, n_layer=2, n_head=4,
               n_positions=128, n_inner=64, tie_word_embeddings=False)
    return GPT2Config, GPT2LMHeadModel, cfg


def _olmo2():
    from transformers import Olmo2Config, Olmo2ForCausalLM

    cfg = dict(_COMMON, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128)
    return Olmo2Config, Olmo2ForCausalLM, cfg


BUILDERS: dict[str, Callable[[], tuple[Any, Any, dict]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": lambda: _mistral(None),
    "mistral_window": lambda: _mistral(WINDOW),
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "phi3": _phi3,
    "phi3_partial": lambda: _phi3(0.5),  # RoPE on half of each head's features (as Phi-4-mini)
    "gpt2": _gpt2,
    "olmo2": _olmo2,
}
ARCHS: tuple[str, ...] = tuple(BUILDERS)


@dataclass(frozen=True)
class ArchFacts:
    window: int | None = None  # sliding window (keys a row sees: itself and window-1 before)
    sliding_layers: tuple[int, ...] = ()
    softcap: bool = False
    qk_norm: bool = False
    fused_qkv: bool = False
    rope: bool = True
    gqa: bool = True


ARCH_FACTS: dict[str, ArchFacts] = {
    "llama": ArchFacts(),
    "qwen2": ArchFacts(),
    "qwen3": ArchFacts(qk_norm=True),
    "mistral": ArchFacts(),
    "mistral_window": ArchFacts(window=WINDOW, sliding_layers=(0, 1)),
    "gemma2": ArchFacts(window=WINDOW, sliding_layers=(0, 2), softcap=True),
    "gemma3": ArchFacts(window=WINDOW, sliding_layers=(0, 2), qk_norm=True),
    "phi3": ArchFacts(fused_qkv=True),
    "phi3_partial": ArchFacts(fused_qkv=True),
    "gpt2": ArchFacts(rope=False, gqa=False),
    "olmo2": ArchFacts(qk_norm=True),
}


def hf_config(name: str, **overrides: Any) -> Any:
    config_cls, model_cls, cfg = BUILDERS[name]()
    # `architectures` as a real checkpoint's config.json has it (TransformerLens picks its
    # adapter from it; e.g. model_type gemma3_text / olmo2 alone are not mapped).
    return config_cls(**{"architectures": [model_cls.__name__], **cfg, **overrides})


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Matrices ~ N(0, 0.15^2), vectors (biases, norm weights) perturbed by N(0, 0.1^2): attention
    patterns far from uniform, and every norm / bias does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.ndim >= 2:
                p.copy_(noise * 0.15)
            else:
                p.add_(noise * 0.1)


def build_hf(name: str, seed: int = 0, attn_implementation: str | None = None, **overrides: Any) -> Any:
    """The Hugging Face model alone (random weights, eval mode)."""
    _, model_cls, _ = BUILDERS[name]()
    torch.manual_seed(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    config = hf_config(name, **overrides, **extra)
    model = model_cls(config).eval()
    _spread_weights(model, seed)
    return model


def as_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model` with its weights in `dtype` and its rotary tables left in float32, as
    `from_pretrained(..., dtype=dtype)` loads a checkpoint (written apart from fdlib's cast)."""
    tables = {n: b.clone() for n, b in model.named_buffers() if "inv_freq" in n}
    model.to(dtype)
    for name, table in tables.items():
        module, _, attr = name.rpartition(".")
        model.get_submodule(module)._buffers[attr] = table
    return model


def build_arch(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Tiny:
    """A bridge over a tiny random `name` model plus a separate eager HF copy with the same
    weights (the reference), both with weights in `dtype`. `overrides` go to the HF config."""
    import fdlib

    if name not in BUILDERS:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}")
    hf = build_hf(name, seed, **overrides)
    reference = build_hf(name, seed, attn_implementation="eager", **overrides)
    reference.load_state_dict(hf.state_dict())
    reference.eval()
    tokenizer = build_tokenizer(VOCAB)
    return Tiny(fdlib.load_model(hf, tokenizer, dtype=dtype), as_dtype(reference, dtype), tokenizer)


_CACHE: dict[tuple[str, int, torch.dtype], Tiny] = {}


def cached_arch(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tiny:
    """`build_arch` memoised per (name, seed, dtype) for a test session. Tests must leave the model
    as they found it (hooks removed, attention implementation restored)."""
    key = (name, seed, dtype)
    if key not in _CACHE:
        _CACHE[key] = build_arch(name, seed, dtype)
    return _CACHE[key]
