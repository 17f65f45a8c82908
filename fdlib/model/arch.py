"""Architecture facts read off a Hugging Face causal LM: the one place that knows where a model
keeps its rotary embedding, per layer.

Everything that must rotate a vector the way the model rotates its queries and keys (pre-RoPE
focus directions, their training, the batched engine) asks here instead of assuming a Llama
layout. `model_facts` reads, per layer, what the attention computes (sliding window, softcap,
scaling, layer type) and where fdlib edits queries; `check_supported(model, operation)` refuses,
before any forward, what cannot be computed exactly (`load_model` checks "load").
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor


def backbone(hf_model: Any) -> Any:
    """The decoder stack of a `*ForCausalLM` (`hf_model.model`, `.transformer`, ...)."""
    base = getattr(hf_model, "base_model", None)
    return base if base is not None else hf_model


def rotary_module(hf_model: Any) -> Any | None:
    """The model's rotary embedding module, or None for a model without RoPE (learned or no
    positions, e.g. GPT-2). Inside a TransformerBridge the module is wrapped (a
    RotaryEmbeddingBridge whose forward takes *args); the Hugging Face module it wraps is
    returned, so its signature (Gemma 3's `layer_type`) is visible and no bridge hook fires."""
    rotary = getattr(backbone(hf_model), "rotary_emb", None)
    inner = getattr(rotary, "original_component", None) if rotary is not None else None
    return inner if inner is not None else rotary


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
    turned = head * cos + rotate_half(head) * sin  # broadcast shape of x and the angles
    return torch.cat([turned, tail.expand(*turned.shape[:-1], tail.shape[-1])], dim=-1)


def unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Inverse of `rotate` (rotation by minus the angle)."""
    return rotate(x, cos, -sin)


# --- what fdlib's sequential path needs to know about a model ---------------------------------

# Operations `check_supported` knows. "load" is what every operation needs (checked by
# `load_model`); the others add their own requirements.
OPERATIONS = (
    "load", "scores", "decode", "split_softmax", "ablate", "focus_post_rope", "focus_pre_rope", "train", "retrieval",
)

# Query hook kinds: where fdlib adds d_Q (see `ModelFacts.query_hook`).
ROTATED = "rotated"  # `hook_rot_q`: after the q/k norm and RoPE (vectors there are post-RoPE)
BEFORE_ROTATION = "before_rotation"  # `hook_q` of a fused-QKV RoPE model: after projection, before RoPE
NO_ROTATION = "no_rotation"  # `hook_q` of a model without RoPE: pre- and post-RoPE coincide


@dataclass(frozen=True)
class LayerFacts:
    """One attention layer as the model computes it (and the bridge reproduces it)."""

    window: int | None  # sliding window: row i sees keys j with i - window < j <= i; None = all j <= i
    softcap: float | None  # attention-logit softcapping: scores -> cap * tanh(scores / cap)
    scaling: float  # the factor on q . k (query_pre_attn_scalar, GPT-2's inverse-layer scaling included)
    layer_type: str | None  # config.layer_types[layer] (Gemma 3: local and global rotary bases)


@dataclass(frozen=True)
class ModelFacts:
    """Architecture facts of a TransformerBridge, read once (`model_facts`).

    `query_hook` names where a query vector is edited: `hook_rot_q` (kind ROTATED: after the q/k
    norm and RoPE), or `hook_q` (kind BEFORE_ROTATION for fused-QKV RoPE models, whose bridge has
    no rotated-query hook and no q/k norm; NO_ROTATION without RoPE). fdlib's pre-RoPE space is
    "after the q/k norm, before the rotation": the space `hook_q` gives on a model without norms
    and the rotated query rotated back otherwise; since R_i (q + d) = R_i q + R_i d, a pre-RoPE
    vector is added exactly as its rotation after RoPE.

    `refusals` maps an operation to why it cannot be computed exactly on this model.
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    layers: tuple[LayerFacts, ...]
    rope: bool
    qk_norm: bool
    fused_qkv: bool
    query_hook: str
    query_kind: str
    refusals: dict[str, str] = field(default_factory=dict)


def _attn_bridge_kind(attn: Any) -> str | None:
    """'rope' (reimplemented RoPE attention with hook_rot_q), 'joint_rope' (fused QKV with RoPE,
    rotation without a hook), 'joint' (fused QKV, no rotation) or None (not verified)."""
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge
    from transformer_lens.model_bridge.generalized_components.joint_qkv_position_embeddings_attention import (
        JointQKVPositionEmbeddingsAttentionBridge,
    )
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    if isinstance(attn, PositionEmbeddingsAttentionBridge):
        return "rope"
    if isinstance(attn, JointQKVPositionEmbeddingsAttentionBridge):
        return "joint_rope"
    if type(attn) is JointQKVAttentionBridge:
        return "joint"
    return None


def _hf_window(hf_attn: Any, config: Any) -> int | None:
    if hasattr(hf_attn, "sliding_window"):  # Gemma 2/3, Qwen 2/3: set on sliding layers only
        w = hf_attn.sliding_window
    else:  # Mistral, Phi-3: the config's window applies to every layer
        w = getattr(config, "sliding_window", None)
    return int(w) if w else None


def _hf_scaling(hf_attn: Any, layer: int, d_head: int) -> float:
    s = float(getattr(hf_attn, "scaling", d_head**-0.5))
    if getattr(hf_attn, "scale_attn_by_inverse_layer_idx", False):  # GPT-2 family
        s /= float(layer + 1)
    return s


def _has_hf_qk_norm(hf_attn: Any) -> bool:
    return any(getattr(hf_attn, n, None) is not None for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"))


def model_facts(model: Any) -> ModelFacts:
    """The facts of a TransformerBridge (cached on the object). Never runs a forward."""
    cached = model.__dict__.get("_fdlib_facts")
    if cached is not None:
        return cached
    cfg = model.cfg
    hf = model.original_model
    config = hf.config
    name = model.__dict__.get("_fdlib_name") or str(getattr(cfg, "model_name", type(hf).__name__))
    n_layers, n_heads, d_head = int(cfg.n_layers), int(cfg.n_heads), int(cfg.d_head)
    n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
    refusals: dict[str, str] = {}

    def refuse(ops: Sequence[str], why: str) -> None:
        for op in ops:
            refusals.setdefault(op, why)

    rope = rotary_module(hf) is not None
    kinds, layers, qk_norm = set(), [], False
    blocks = getattr(model, "blocks", None)
    for l in range(n_layers):
        attn = getattr(blocks[l], "attn", None) if blocks is not None and l < len(blocks) else None
        hf_attn = getattr(attn, "original_component", None)
        missing = [h for h in ("hook_pattern", "hook_attn_scores", "hook_z", "hook_q")
                   if f"blocks.{l}.attn.{h}" not in model.hook_dict]
        if attn is None or hf_attn is None or missing:
            refuse(OPERATIONS, f"layer {l} has no attention bridge with hooks {missing or 'hook_pattern'}")
            layers.append(LayerFacts(None, None, d_head**-0.5, layer_type(hf, l)))
            continue
        kind = _attn_bridge_kind(attn)
        kinds.add(kind)
        qk_norm = qk_norm or _has_hf_qk_norm(hf_attn)
        softcap = getattr(hf_attn, "attn_logit_softcapping", None)
        scaling = _hf_scaling(hf_attn, l, d_head)
        if kind is None:
            refuse(OPERATIONS, f"its attention ({type(attn).__name__}) is not one fdlib has verified "
                               "(PositionEmbeddingsAttentionBridge, JointQKV[PositionEmbeddings]AttentionBridge)")
        elif kind in ("joint", "joint_rope"):
            # These bridges rebuild attention with 1/sqrt(d_head) (and GPT-2's inverse-layer
            # factor), no softcap and no q/k norm: refuse a model they would compute wrongly.
            bridge_scaling = d_head**-0.5
            if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
                bridge_scaling /= float(l + 1)
            if abs(bridge_scaling - scaling) > 1e-9 * abs(scaling) or softcap or _has_hf_qk_norm(hf_attn):
                refuse(OPERATIONS, f"the bridge's fused-QKV attention ({type(attn).__name__}) does not reproduce "
                                   "its scaling / softcapping / q-k norm")
        layers.append(LayerFacts(_hf_window(hf_attn, config), float(softcap) if softcap else None, scaling, layer_type(hf, l)))
    if getattr(cfg, "qk_norm_after_rope", False):
        refuse(("focus_post_rope", "focus_pre_rope", "train"), "its q/k norm follows RoPE (no query hook after both)")
    if getattr(cfg, "rotary_adjacent_pairs", False) or getattr(cfg, "rotary_interleaved_cos_sin", False):
        refuse(("focus_pre_rope",), "its RoPE rotates adjacent pairs, not the rotate-half pairing fdlib applies")
    rope_params = getattr(config, "rope_parameters", None)
    if isinstance(rope_params, dict) and rope_params.get("llama_4_scaling_beta") is not None:
        refuse(("focus_post_rope", "focus_pre_rope", "train"), "its queries are rescaled per position after RoPE")
    rope_types = set()
    if isinstance(rope_params, dict):
        for v in [rope_params, *(p for p in rope_params.values() if isinstance(p, dict))]:
            if "rope_type" in v:
                rope_types.add(str(v["rope_type"]))
    if rope and rope_types & {"dynamic", "longrope"}:
        # The angles depend on the length of the forward in progress: a rotation computed here
        # for other positions would not be the one the model applied.
        why = f"its RoPE ({sorted(rope_types & {'dynamic', 'longrope'})}) changes with the sequence length"
        refuse(("focus_pre_rope",), why)
        if _attn_bridge_kind(getattr(blocks[0], "attn", None)) == "joint_rope":
            refuse(("focus_post_rope", "train"), why)
    if getattr(config, "use_attention_sinks", False) or any(
        getattr(getattr(blocks[l], "attn", None), "original_component", None) is not None
        and getattr(blocks[l].attn.original_component, "sinks", None) is not None for l in range(n_layers)
    ):
        refuse(("split_softmax",), "its attention sinks take a share of each row outside the keys")
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind is None and not refusals:
        refuse(OPERATIONS, f"its layers mix attention kinds {sorted(map(str, kinds))}")
    if kind == "rope":
        hook, qkind = "hook_rot_q", ROTATED
    elif kind == "joint_rope":
        hook, qkind = "hook_q", BEFORE_ROTATION
    else:
        hook, qkind = "hook_q", NO_ROTATION
        if rope:
            refuse(("focus_post_rope", "focus_pre_rope", "train"), "it has RoPE but no hook where the rotation is known")
    facts = ModelFacts(name, n_layers, n_heads, n_kv, d_head, tuple(layers), rope, qk_norm,
                       kind in ("joint", "joint_rope"), hook, qkind, refusals)
    model.__dict__["_fdlib_facts"] = facts
    return facts


def check_supported(model: Any, operation: str) -> ModelFacts:
    """Raise NotImplementedError, before any forward, if `operation` cannot be computed exactly on
    `model` (the message names the model and the feature); return the model's facts otherwise.

    Operations: see OPERATIONS. Every operation also needs what "load" needs; "train" is
    training in either placement's activations, and pre-RoPE training also needs
    "focus_pre_rope" (the rotation).
    """
    if operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}: expected one of {OPERATIONS}")
    facts = model_facts(model)
    for op in ("load", operation):
        why = facts.refusals.get(op)
        if why is not None:
            raise NotImplementedError(f"model {facts.name!r}: {operation} is not supported: {why}")
    return facts


def visible_keys(row_pos: Tensor, n_keys: int, window: int | None) -> Tensor:
    """[rows, n_keys] bool: which key positions each row (absolute `row_pos`) attends to."""
    cols = torch.arange(n_keys, device=row_pos.device)
    seen = cols[None, :] <= row_pos[:, None]
    if window is not None:
        seen &= (row_pos[:, None] - cols[None, :]) < window
    return seen


class RotaryTable:
    """cos / sin of the model's rotation per layer for positions 0..n-1, grown on demand and
    shared by layers of the same kind (`rope_cos_sin` per layer type)."""

    def __init__(self, hf_model: Any) -> None:
        self.hf_model = hf_model
        self._tables: dict[Any, tuple[Tensor, Tensor]] = {}

    def __call__(self, layer: int, n_pos: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """float32 cos, sin `[n_pos, rot_dim]` of `layer` on like's device."""
        key = (layer_type(self.hf_model, layer), like.device)
        got = self._tables.get(key)
        if got is None or got[0].shape[0] < n_pos:
            n = max(n_pos, 2 * got[0].shape[0] if got is not None else 64)
            proto = torch.zeros(1, dtype=torch.float32, device=like.device)
            cos, sin = rope_cos_sin(self.hf_model, layer, torch.arange(n), proto)
            got = (cos.float(), sin.float())
            self._tables[key] = got
        return got[0][:n_pos], got[1][:n_pos]
