"""Architecture facts read off a Hugging Face causal LM: the one place that knows where a model
keeps its rotary embedding, per layer.

Everything that must rotate a vector the way the model rotates its queries and keys (pre-RoPE
focus directions, their training, the batched engine) asks here instead of assuming a Llama
layout.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor


def backbone(hf_model: Any) -> Any:
    """The decoder stack of a `*ForCausalLM` (`hf_model.model`, `.transformer`, ...)."""
    base = getattr(hf_model, "base_model", None)
    return base if base is not None else hf_model


def rotary_module(hf_model: Any) -> Any | None:
    """The model's rotary embedding module, or None for a model without RoPE (learned or no
    positions, e.g. GPT-2)."""
    return getattr(backbone(hf_model), "rotary_emb", None)


def layer_type(hf_model: Any, layer: int) -> str | None:
    types = getattr(hf_model.config, "layer_types", None)
    return types[layer] if types else None


def rope_cos_sin(hf_model: Any, layer: int, positions: Tensor, like: Tensor) -> tuple[Tensor, Tensor] | None:
    """cos, sin `[len(positions), rot_dim]` of the rotation the model applies at `layer` to the
    queries and keys at absolute `positions`; None when the model has no rotary embedding.

    Models whose rotary module serves several layer kinds (Gemma 3: local and global layers with
    different bases) are asked for `layer`'s kind.
    """
    rotary = rotary_module(hf_model)
    if rotary is None:
        return None
    pos = positions.to(like.device)[None]
    params = inspect.signature(rotary.forward).parameters
    if "layer_type" in params:
        cos, sin = rotary(like, pos, layer_type(hf_model, layer))
    else:
        cos, sin = rotary(like, pos)
    return cos[0], sin[0]


def rotate_half(x: Tensor) -> Tensor:
    """The Llama / GPT-NeoX pairing used by every HF RoPE model here: (x1, x2) -> (-x2, x1)."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `cos.shape[-1]` features of x (all of them unless RoPE is partial) by the
    given angles; x broadcasts against cos / sin."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    head, tail = x[..., :rot], x[..., rot:]
    return torch.cat([head * cos + rotate_half(head) * sin, tail.expand(*head.shape[:-1], tail.shape[-1])], dim=-1)


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Inverse of `rotate` (rotation by minus the angle)."""
    return rotate(x, cos, -sin)
