"""Batched decoding over a shared prompt cache: many conditions of one sample in one forward per
step, each row with its own intervention and its own span recorder.

The prompt is prefilled once (`decoding.prefill`). Every row of the batch then attends to the
same prompt keys and values, which are never copied: a decode step's queries of all rows are
stacked into one matrix product against the prompt's keys (per KV head, the queries of every
row and every head of its group side by side: Hydragen's batching of the shared prefix), and
each row's own answer tokens are attended to separately. The two parts are joined before the
softmax, so the attention row is exact (no approximation) and available to interventions and
recorders. Rows stop independently: a finished row leaves the batch.

The engine runs the Hugging Face modules of the model (embeddings, projections, q/k norms, RoPE,
MLPs: whatever the architecture has) with one attention function of its own, registered with
transformers' attention interface, which applies the model's scaling, softcapping and sliding
windows as the module hands them over. What each row does:
- span reweighting (`fdlib.reweighting`: split-softmax tau, odds a, boost m) on chosen heads;
- focus directions (alpha * d_Q on the queries, alpha * d_K on the keys' logits, before any
  softcap; post-RoPE, or pre-RoPE rotated to each position);
- head ablation (the head's output zeroed before the output projection);
on the rows from the last prompt token on: the rows that produce the answer.

`decoding.decode` on the TransformerBridge, with the context managers of `fdlib.interventions`
and `fdlib.directions`, is the sequential reference this engine is tested against.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers.cache_utils import Cache, CacheLayerMixin

from fdlib import arch
from fdlib.decoding import Prefix, _stop_tokens, check_length
from fdlib.directions import FocusDirections
from fdlib.heads import Head, check_heads
from fdlib.models import fast_prefill_model
from fdlib.reweighting import SPAN_MAPS, check_strength, reweight_rows, target_share
from fdlib.spans import Span, check_spans

ATTENTION = "fdlib_shared_prefix"
# Keyword arguments the HF attention modules pass that do not change the attention's value.
_HARMLESS = {"position_ids", "cache_position", "output_attentions", "use_cache", "is_causal", "head_mask",
             "return_dict", "layer_idx", "token_type_ids", "past_key_values", "position_embeddings"}


@dataclass(frozen=True)
class RowIntervention:
    """What one batch row does, on heads already resolved to a list.

    Any combination is allowed; a study condition uses one: `span_map` + `strength` + `span`
    (span reweighting), `directions` + `alpha` (focus directions), or `ablate`.
    """

    heads: tuple[Head, ...] = ()
    span_map: str | None = None
    strength: float | None = None
    span: Span | None = None
    directions: FocusDirections | None = None
    alpha: float = 0.0
    ablate: bool = False

    def __post_init__(self) -> None:
        if self.span_map is not None:
            check_strength(self.span_map, self.strength)
            if not isinstance(self.span, Span):
                raise ValueError(f"span reweighting needs a Span to act on, got {self.span!r}")
        if (self.span_map is not None or self.directions is not None or self.ablate) and not self.heads:
            raise ValueError("an intervention needs at least one head")

    @property
    def is_identity(self) -> bool:
        return self.span_map is None and (self.directions is None or self.alpha == 0) and not self.ablate


NONE = RowIntervention()


@dataclass
class RowAnswer:
    """One row's greedy answer and, per named span, each head's attention mass averaged over the
    answer's rows (empty when the answer is empty)."""

    tokens: list[int]
    text: str
    scores: dict[str, Float[Tensor, "n_layers n_heads"]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# The cache: the prompt's keys shared, each row's answer keys its own


class SharedPrefixLayer(CacheLayerMixin):
    """One layer: the prompt's keys/values `[n_kv, P, d_head]` (views of the prefill cache, never
    copied) and per row the keys/values of its own tokens `[batch, n_kv, t, d_head]`.

    `update` stores the step's keys and returns the rows' own keys only; the attention function
    reads the prompt's from `prefix_keys` / `prefix_values`.
    """

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        super().__init__()
        self.prefix_keys = keys[0]
        self.prefix_values = values[0]
        self.capacity = capacity
        self.t = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # pragma: no cover
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        n = key_states.shape[-2]
        if self.t == 0:
            b, h, _, d = key_states.shape
            self.keys = key_states.new_empty(b, h, self.capacity, d)
            self.values = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        if self.t + n > self.capacity:
            raise RuntimeError(f"answer cache full: {self.capacity} positions")
        self.keys[:, :, self.t : self.t + n] = key_states
        self.values[:, :, self.t : self.t + n] = value_states
        self.t += n
        return self.keys[:, :, : self.t], self.values[:, :, : self.t]

    def keep(self, rows: Tensor) -> None:
        """Keep only these batch rows (the others finished)."""
        if self.t:
            self.keys = self.keys[rows]
            self.values = self.values[rows]

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_keys.shape[-2])

    def get_seq_length(self) -> int:
        return self.prefix_length + self.t

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1


# ---------------------------------------------------------------------------------------------
# Per-layer plans: what the rows do, as tensors


@dataclass
class _LayerPlan:
    """The rows' interventions at one layer, as tensors over `[batch, head_index, ...]`; None where
    no row does that thing at this layer."""

    reweight_heads: Bool[Tensor, "batch head_index"] | None = None
    map_code: Float[Tensor, " batch"] | None = None
    strength: Float[Tensor, " batch"] | None = None
    span_mask: Bool[Tensor, "batch prompt_pos"] | None = None
    dq_post: Float[Tensor, "batch head_index d_head"] | None = None
    dq_pre: Float[Tensor, "batch head_index d_head"] | None = None
    dk_post: Float[Tensor, "batch head_index d_head"] | None = None
    dk_pre: Float[Tensor, "batch head_index d_head"] | None = None
    ablate: Bool[Tensor, "batch head_index"] | None = None

    def keep(self, rows: Tensor) -> None:
        for name, value in vars(self).items():
            if value is not None:
                setattr(self, name, value[rows])


def _plans(
    rows: Sequence[RowIntervention], n_layers: int, n_heads: int, d_head: int, prefix_len: int, device: Any
) -> list[_LayerPlan]:
    B = len(rows)
    plans = [_LayerPlan() for _ in range(n_layers)]

    def need(plan: _LayerPlan, name: str, shape: tuple, dtype: torch.dtype) -> Tensor:
        if getattr(plan, name) is None:
            setattr(plan, name, torch.zeros(shape, dtype=dtype, device=device))
        return getattr(plan, name)

    for b, row in enumerate(rows):
        for layer, head in row.heads:
            plan = plans[layer]
            if row.span_map is not None:
                need(plan, "reweight_heads", (B, n_heads), torch.bool)[b, head] = True
                need(plan, "map_code", (B,), torch.float64)[b] = float(SPAN_MAPS.index(row.span_map))
                need(plan, "strength", (B,), torch.float64)[b] = float(row.strength)
                need(plan, "span_mask", (B, prefix_len + 1), torch.bool)[b, row.span.slice] = True
            if row.directions is not None and row.alpha != 0:
                d = row.directions
                where = "post" if d.placement == "post_rope" else "pre"
                need(plan, f"dq_{where}", (B, n_heads, d_head), torch.float32)[b, head] = row.alpha * d.d_q[layer, head].float()
                need(plan, f"dk_{where}", (B, n_heads, d_head), torch.float32)[b, head] = row.alpha * d.d_k[layer, head].float()
            if row.ablate:
                need(plan, "ablate", (B, n_heads), torch.bool)[b, head] = True
    for plan in plans:
        if plan.strength is not None:  # rows that reweight nothing here keep the identity
            idle = ~plan.reweight_heads.any(-1)
            plan.strength[idle] = 1.0
    return plans


# ---------------------------------------------------------------------------------------------
# The attention function


@dataclass
class _Batch:
    """What the attention function needs during one batched decode."""

    hf_model: Any
    cache: Cache
    plans: list[_LayerPlan]
    indicator: Float[Tensor, "prompt_pos n_spans"] | None
    sums: list[list[Tensor]]  # per layer, per step: [batch_at_step, head_index, n_spans]
    n_positions: int = 0  # prompt + answer budget: the positions rotations are needed for
    rope: dict[Any, tuple[Tensor, Tensor] | None] = field(default_factory=dict)

    def rope_at(self, layer: int, n_pos: int, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """cos, sin `[n_pos, rot_dim]` of this layer's rotation at positions [0, n_pos), computed
        once per layer kind for the whole budget."""
        kind = arch.layer_type(self.hf_model, layer)
        key = layer if kind is None else kind
        if key not in self.rope:
            got = arch.rope_cos_sin(self.hf_model, layer, torch.arange(max(n_pos, self.n_positions)), like)
            self.rope[key] = None if got is None else (got[0].float(), got[1].float())
        got = self.rope[key]
        return None if got is None else (got[0][:n_pos], got[1][:n_pos])


def _pre_rope_bias(q: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """q_i . R_j d_K for every key position j: [batch, head, n_keys] (R_j: the rotation at j,
    on the first cos.shape[-1] features; the rest are not rotated)."""
    rot = cos.shape[-1]
    qh, dh = q[..., :rot], dk[..., :rot]
    bias = torch.einsum("bhd,jd->bhj", qh * dh, cos) + torch.einsum("bhd,jd->bhj", qh * arch.rotate_half(dh), sin)
    if rot < q.shape[-1]:
        bias = bias + (q[..., rot:] * dk[..., rot:]).sum(-1, keepdim=True)
    return bias


def shared_prefix_attention(
    module: Any,
    query: Float[Tensor, "batch head_index query_pos d_head"],
    key: Float[Tensor, "batch kv_head answer_pos d_head"],
    value: Float[Tensor, "batch kv_head answer_pos d_head"],
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch query_pos head_index d_head"], None]:
    """One decode step of attention over [shared prompt keys | the row's own keys]."""
    batch: _Batch | None = module.__dict__.get("_fdlib_batch")
    if batch is None:
        raise RuntimeError("the fdlib batched attention runs only inside fdlib.engine.decode_batch")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS)
    if unknown:
        raise NotImplementedError(
            f"{type(module).__name__} passes {unknown} to its attention function, which fdlib's batched engine "
            "does not implement; use the sequential path (engine='sequential')"
        )
    layer = module.layer_idx
    lc: SharedPrefixLayer = batch.cache.layers[layer]
    plan = batch.plans[layer]
    B, H, n_q, d = query.shape
    if n_q != 1:
        raise RuntimeError(f"the batched engine decodes one token per row and step, got {n_q}")
    n_kv = lc.prefix_keys.shape[0]
    g = H // n_kv
    P, t = lc.prefix_length, key.shape[-2]
    n_keys = P + t
    pos = n_keys - 1  # absolute position of this step's rows
    scale = float(scaling) if scaling is not None else d ** -0.5
    q = query[:, :, 0, :].float()  # [B, H, d]
    rope = None
    if plan.dq_pre is not None or plan.dk_pre is not None:
        rope = batch.rope_at(layer, n_keys, q)
    if plan.dq_post is not None:
        q = q + plan.dq_post
    if plan.dq_pre is not None:
        q = q + (plan.dq_pre if rope is None else arch.rotate(plan.dq_pre, rope[0][pos], rope[1][pos]))
    def kv(x: Tensor) -> Tensor:  # [B, H, ...] -> [n_kv, B*g, ...]: every row and head of a KV group
        return x.reshape(B, n_kv, g, *x.shape[2:]).transpose(0, 1).reshape(n_kv, B * g, *x.shape[2:])

    def bh(x: Tensor) -> Tensor:  # [n_kv, B*g, ...] -> [B, H, ...]
        return x.reshape(n_kv, B, g, *x.shape[2:]).transpose(0, 1).reshape(B, H, *x.shape[2:])

    # The prompt part: per KV head, one product of the queries of every row and head of its group
    # against the shared keys (read once, never copied per row). Rows stay in this layout until
    # the output, so no [batch, heads, keys] tensor is permuted.
    qk = kv(q)  # [n_kv, B*g, d]
    s_pre = torch.matmul(qk, lc.prefix_keys.float().transpose(1, 2))  # [n_kv, B*g, P]
    s_own = torch.einsum("kbgd,kbtd->kbgt", qk.view(n_kv, B, g, d), key.float().transpose(0, 1)).reshape(n_kv, B * g, t)
    scores = torch.cat([s_pre, s_own], dim=-1) * scale  # [n_kv, B*g, n_keys]
    if plan.dk_post is not None:  # q . d_K: the same for every key, it matters only under a softcap
        scores = scores + kv((q * plan.dk_post).sum(-1, keepdim=True)) * scale
    if plan.dk_pre is not None:
        if rope is None:
            scores = scores + kv((q * plan.dk_pre).sum(-1, keepdim=True)) * scale
        else:
            scores = scores + kv(_pre_rope_bias(q, plan.dk_pre, rope[0], rope[1])) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = None
    if sliding_window is not None and n_keys > sliding_window:
        visible = torch.arange(n_keys, device=q.device) > pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
    pattern = torch.softmax(scores, dim=-1)  # [n_kv, B*g, n_keys], float32
    if plan.reweight_heads is not None:
        # spans lie in the prompt: [0, P] (P, the last prompt token, is each row's first own key)
        in_span = torch.cat([plan.span_mask, plan.span_mask.new_zeros(B, t - 1)], dim=-1)[None, :, None, :]
        p4 = pattern.view(n_kv, B, g, n_keys)
        pi = (p4.double() * in_span).sum(-1)  # [n_kv, B, g]
        target = target_share(pi, plan.map_code[None, :, None], plan.strength[None, :, None])
        chosen = plan.reweight_heads.view(B, n_kv, g).transpose(0, 1)[..., None]  # [n_kv, B, g, 1]
        pattern = torch.where(chosen, reweight_rows(p4, in_span, target, visible), p4).reshape(n_kv, B * g, n_keys)
    if batch.indicator is not None:
        batch.sums[layer].append(bh(pattern[..., : P + 1] @ batch.indicator).cpu())  # [B, H, n_spans]
    out = torch.matmul(pattern[..., :P], lc.prefix_values.float())  # [n_kv, B*g, d_v]
    own = pattern[..., P:].reshape(n_kv, B, g, t)
    out = out + torch.einsum("kbgt,kbtd->kbgd", own, value.float().transpose(0, 1)).reshape(n_kv, B * g, -1)
    out = bh(out)  # [B, H, d_v]
    if plan.ablate is not None:
        out = out.masked_fill(plan.ablate[..., None], 0.0)
    return out[:, None, :, :].to(query.dtype), None  # [B, 1, H, d_v]


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, shared_prefix_attention)


def engine_model(model: TransformerBridge) -> Any:
    """A module tree of the bridge's HF model running `shared_prefix_attention`, sharing every
    weight and buffer with it (built once per model, on the meta device: nothing is copied)."""
    holder = model.__dict__.get("_fdlib_engine")
    if holder is not None:
        return holder
    from transformers import AutoModelForCausalLM

    _register()
    hf = fast_prefill_model(model)  # the plain HF module tree (the bridge's own is wrapped)
    if hf is None:
        raise ValueError("the batched engine needs a model loaded with fdlib.load_model (it shares that model's weights)")
    config = copy.deepcopy(hf.config)
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION, dtype=hf.dtype)
    twin.load_state_dict(hf.state_dict(), assign=True, strict=True)
    own = dict(hf.named_buffers())
    for name, _ in list(twin.named_buffers()):
        module_name, _, attr = name.rpartition(".")
        twin.get_submodule(module_name)._buffers[attr] = own[name]
    twin.tie_weights()
    twin.eval()
    model.__dict__["_fdlib_engine"] = twin
    return twin


@contextlib.contextmanager
def _attached(twin: Any, batch: _Batch) -> Iterator[None]:
    modules = [m for m in twin.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    try:
        for m in modules:
            m.__dict__["_fdlib_batch"] = batch
        yield
    finally:
        for m in modules:
            m.__dict__.pop("_fdlib_batch", None)


def check_rows(model: TransformerBridge, rows: Sequence[RowIntervention], prefix_length: int) -> None:
    """Refuse, before any forward, rows whose heads, spans or directions do not fit."""
    for row in rows:
        check_heads(model, row.heads)
        if row.span is not None:
            check_spans({"reweighted span": row.span}, prefix_length)
        if row.directions is not None:
            row.directions.check(model)


@torch.no_grad()
def decode_batch(
    model: TransformerBridge,
    prefix: Prefix,
    rows: Sequence[RowIntervention],
    *,
    spans: dict[str, Span] | None = None,
    max_new_tokens: int = 32,
) -> list[RowAnswer]:
    """Greedy answers of every row from one shared prefix, one forward per step for all rows.

    Row b decodes under `rows[b]`, acting from the last prompt row on; with `spans`, each row
    records every head's attention mass on each span over its answer's rows (the rows of its
    answer tokens, as `decoding.decode` does). The prefix is only read: it serves other batches
    afterwards.
    """
    if not rows:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    P = prefix.length - 1
    if int(prefix.cache.get_seq_length()) != P:
        raise ValueError(f"prefix cache holds {prefix.cache.get_seq_length()} positions, expected {P}")
    check_length(model, prefix.length + max_new_tokens)
    check_rows(model, rows, prefix.length)
    if spans:
        check_spans(spans, prefix.length)
    twin = engine_model(model)
    cfg = model.cfg
    device = prefix.tokens.device
    names = list(spans or {})
    indicator = None
    if names:
        indicator = torch.zeros(P + 1, len(names), dtype=torch.float32, device=device)
        for k, name in enumerate(names):
            indicator[spans[name].slice, k] = 1.0
    layers = []
    for l in range(cfg.n_layers):
        src = prefix.cache.layers[l]
        if src.keys.shape[-2] != P:
            raise ValueError(f"layer {l} of the prefix cache holds {src.keys.shape[-2]} keys, expected {P}: "
                             "a cache that drops keys (a sliding window) cannot be shared")
        layers.append(SharedPrefixLayer(src.keys, src.values, max_new_tokens + 1))
    cache = Cache(layers=layers)
    B = len(rows)
    plans = _plans(rows, cfg.n_layers, cfg.n_heads, cfg.d_head, P, device)
    batch = _Batch(twin, cache, plans, indicator, [[] for _ in range(cfg.n_layers)], prefix.length + max_new_tokens)
    stop = _stop_tokens(model)
    tok = model.tokenizer
    answers: list[list[int]] = [[] for _ in range(B)]
    sums = torch.zeros(B, cfg.n_layers, cfg.n_heads, len(names), dtype=torch.float64)
    active = torch.arange(B)
    step_input = prefix.tokens[-1:].expand(B)[:, None].clone()
    with _attached(twin, batch):
        for step in range(max_new_tokens + 1):
            for per_layer in batch.sums:
                per_layer.clear()
            logits = twin(step_input, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            if step > 0 and names:  # rows of answer tokens are recorded; the last prompt row is not
                got = torch.stack([torch.cat(x, 0) if len(x) > 1 else x[0] for x in batch.sums], dim=1)
                sums[active] += got.double()
            if step == max_new_tokens:
                break
            next_tokens = logits.argmax(-1).tolist()
            keep = []
            for i, token in enumerate(next_tokens):
                b = int(active[i])
                if token in stop.eos or (token in stop.newline and tok.decode(answers[b]).strip()):
                    continue
                answers[b].append(token)
                keep.append(i)
            if not keep:
                break
            if len(keep) < len(active):
                idx = torch.tensor(keep, device=device)
                for layer in layers:
                    layer.keep(idx)
                for plan in plans:
                    plan.keep(idx)
                active = active[torch.tensor(keep)]
            step_input = torch.tensor([answers[int(b)][-1] for b in active], device=device)[:, None]
    out = []
    for b in range(B):
        n = len(answers[b])
        scores = {}
        if names and n:
            mean = (sums[b] / n).float()
            scores = {name: mean[..., k] for k, name in enumerate(names)}
        out.append(RowAnswer(answers[b], tok.decode(answers[b], skip_special_tokens=True), scores))
    return out
