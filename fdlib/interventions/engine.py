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
- span reweighting (`fdlib.interventions.reweighting`: split-softmax tau, odds a, boost m) on chosen heads;
- focus directions (alpha * d_Q on the queries, alpha * d_K on the keys' logits, before any
  softcap; post-RoPE, or pre-RoPE rotated to each position);
- head ablation (the head's output zeroed before the output projection);
on the rows from the last prompt token on: the rows that produce the answer.

`decoding.decode` on the TransformerBridge, with the context managers of `fdlib.interventions.hooks`
and `fdlib.interventions.directions`, is the sequential reference this engine is tested against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers.cache_utils import Cache, CacheLayerMixin

from fdlib.core.heads import check_heads
from fdlib.core.spans import Span, check_spans
from fdlib.interventions.reweighting import SPAN_MAPS, reweight_rows, target_share
from fdlib.interventions.row import RowIntervention
from fdlib.model import arch
from fdlib.model.decoding import Prefix, _stop_tokens, check_length
from fdlib.model.loading import fast_prefill_model, shared_twin

ATTENTION = "fdlib_shared_prefix"
# Keyword arguments the HF attention modules pass that do not change the attention's value.
_HARMLESS = {"position_ids", "cache_position", "output_attentions", "use_cache", "is_causal", "head_mask",
             "return_dict", "layer_idx", "token_type_ids", "past_key_values", "position_embeddings"}


@dataclass
class RowAnswer:
    """One row's greedy answer and, per named span, each head's attention mass averaged over the
    answer's rows (empty when the answer is empty)."""

    tokens: list[int]
    text: str
    scores: dict[str, Float[Tensor, "n_layers n_heads"]] = field(default_factory=dict)


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
    # the (kv head, row, head in group) index of every reweighted pair, made on the host from
    # `reweight_heads` (which stays on the CPU) and uploaded: no read-back when rows change
    pairs: tuple[Tensor, Tensor, Tensor] | None = None

    def index(self, n_kv: int, device: Any) -> _LayerPlan:
        if self.reweight_heads is not None:
            B, H = self.reweight_heads.shape
            pairs = self.reweight_heads.view(B, n_kv, H // n_kv).transpose(0, 1).nonzero(as_tuple=True)
            self.pairs = tuple(i.to(device) for i in pairs)
        return self

    def to(self, device: Any) -> _LayerPlan:
        for name, value in vars(self).items():
            if isinstance(value, Tensor) and name != "reweight_heads":
                setattr(self, name, value.to(device))
        return self

    def keep(self, rows: Tensor, rows_cpu: Tensor, n_kv: int) -> None:
        for name, value in vars(self).items():
            if isinstance(value, Tensor):
                setattr(self, name, value[rows_cpu if name == "reweight_heads" else rows])
        self.index(n_kv, rows.device)


def _plans(
    rows: Sequence[RowIntervention], n_layers: int, n_heads: int, n_kv: int, d_head: int, prefix_len: int, device: Any
) -> list[_LayerPlan]:
    """The rows' plans, built on the CPU and moved to `device` once (no per-element writes there)."""
    B = len(rows)
    plans = [_LayerPlan() for _ in range(n_layers)]

    def need(plan: _LayerPlan, name: str, shape: tuple, dtype: torch.dtype) -> Tensor:
        if getattr(plan, name) is None:
            setattr(plan, name, torch.zeros(shape, dtype=dtype))
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
    return [plan.to(device).index(n_kv, device) for plan in plans]


# ---------------------------------------------------------------------------------------------
# Groups: rows that share one prompt


@dataclass(frozen=True)
class Job:
    """Rows to decode from one prompt: `prefix` (a `Prefix`, or a function making it, called when
    the first row is admitted, so prompts are prefilled as the batch needs them), the rows'
    interventions, and the spans recorded. `key` identifies the job in `decode_jobs`' output."""

    key: Any
    prefix: Any
    rows: Sequence[RowIntervention]
    spans: dict[str, Span] | None = None


class _GroupLayer:
    """One layer of a group: the prompt's keys/values `[n_kv, P, d_head]` (views of the prefill
    cache, never copied) and per row the keys/values of its own tokens `[rows, n_kv, t, d_head]`."""

    def __init__(self, keys: Tensor, values: Tensor, capacity: int) -> None:
        self.prefix_keys, self.prefix_values = keys[0], values[0]
        self.capacity = capacity
        self.t = 0
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> None:
        if self.keys is None:
            n, h, _, d = k.shape
            self.keys = k.new_empty(n, h, self.capacity, d)
            self.values = v.new_empty(n, h, self.capacity, v.shape[-1])
        if self.t >= self.capacity:
            raise RuntimeError(f"answer cache full: {self.capacity} positions")
        self.keys[:, :, self.t : self.t + 1] = k
        self.values[:, :, self.t : self.t + 1] = v
        self.t += 1

    def keep(self, rows: Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]


class _Group:
    """Rows of one job admitted together: they share the prompt and step in lockstep (one token
    per step each); rows leave as they finish."""

    def __init__(self, model: TransformerBridge, job: Job, prefix: Prefix, first: int, rows: Sequence[RowIntervention],
                 max_new_tokens: int) -> None:
        cfg = model.cfg
        self.job, self.first, self.rows = job, first, list(rows)
        self.P = prefix.length - 1
        self.last_prompt_token = int(prefix.tokens[-1])
        self.names = list(job.spans or {})
        device = prefix.tokens.device
        self.indicator = None
        if self.names:
            # span columns padded to a multiple of 8 (zeros): the product is ~1.8x faster there
            indicator = torch.zeros(self.P + 1, -(-len(self.names) // 8) * 8, dtype=torch.float32)
            for k, name in enumerate(self.names):
                indicator[job.spans[name].slice, k] = 1.0
            self.indicator = indicator.to(device)
        self.layers = []
        prefix.compact()  # the prompt's keys and values read in place every step
        for l in range(cfg.n_layers):
            src = prefix.cache.layers[l]
            if src.keys.shape[-2] != self.P:
                raise ValueError(f"layer {l} of the prefix cache holds {src.keys.shape[-2]} keys, expected {self.P}: "
                                 "a cache that drops keys (a sliding window) cannot be shared")
            self.layers.append(_GroupLayer(src.keys, src.values, max_new_tokens + 1))
        self.n_kv = prefix.cache.layers[0].keys.shape[1]
        self.plans = _plans(self.rows, cfg.n_layers, cfg.n_heads, self.n_kv, cfg.d_head, self.P, device)
        n = len(self.rows)
        self.answers: list[list[int]] = [[] for _ in range(n)]
        # per row, layer, head and span: the attention mass summed over the answer's rows, on the
        # device (read back once, when the group finishes)
        self.sums = torch.zeros(n, cfg.n_layers, cfg.n_heads, len(self.names), dtype=torch.float64, device=device)
        self.active = list(range(n))  # which rows are left: plain ints, so the bookkeeping reads no tensor
        self.active_on_device = torch.arange(n, device=device)
        self.step = 0
        self.step_sums: list[Tensor | None] = [None] * cfg.n_layers

    @property
    def position(self) -> int:
        """Absolute position of this step's rows."""
        return self.P + self.step

    def add_step(self) -> None:
        """Add this step's span sums to its active rows' totals (on the device)."""
        self.sums[self.active_on_device] += torch.stack(self.step_sums, dim=1).to(self.sums.dtype)

    def inputs(self) -> list[int]:
        if self.step == 0:
            return [self.last_prompt_token] * len(self.active)
        return [self.answers[b][-1] for b in self.active]

    def keep(self, idx: list[int]) -> None:
        """Keep only rows `idx` (positions among the active rows): called when rows finish."""
        on_cpu = torch.tensor(idx)
        on_device = on_cpu.to(self.active_on_device.device)
        for layer in self.layers:
            layer.keep(on_device)
        for plan in self.plans:
            plan.keep(on_device, on_cpu, self.n_kv)
        self.active = [self.active[i] for i in idx]
        self.active_on_device = self.active_on_device[on_device]


@dataclass
class _Batch:
    """What the attention function needs during one forward: the groups, in batch order."""

    groups: list[_Group]
    rotary: Any  # arch.RotaryTable, or None for a model without RoPE

    def slices(self) -> Iterator[tuple[_Group, slice]]:
        start = 0
        for g in self.groups:
            n = len(g.active)
            yield g, slice(start, start + n)
            start += n

    def buckets(self) -> list[list[tuple[_Group, slice]]]:
        """The groups in runs sharing one job (one prompt): `decode_jobs` keeps them adjacent."""
        out: list[list[tuple[_Group, slice]]] = []
        for g, sl in self.slices():
            if out and out[-1][0][0].job is g.job:
                out[-1].append((g, sl))
            else:
                out.append([(g, sl)])
        return out


class _StreamLayer(CacheLayerMixin):
    """The cache layer handed to the HF model: it files each group's new keys/values with the
    group (the attention function reads them there) and hands the step's own back."""

    is_compileable = False
    is_sliding = False

    def __init__(self, layer: int, batch: _Batch) -> None:
        super().__init__()
        self.layer, self.batch = layer, batch
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:  # pragma: no cover
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        for g, sl in self.batch.slices():
            g.layers[self.layer].append(key_states[sl], value_states[sl])
        return key_states, value_states

    def get_seq_length(self) -> int:
        return max((g.position for g in self.batch.groups), default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1


# ---------------------------------------------------------------------------------------------
# The attention function


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
    key: Float[Tensor, "batch kv_head query_pos d_head"],
    value: Float[Tensor, "batch kv_head query_pos d_head"],
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[Float[Tensor, "batch query_pos head_index d_head"], None]:
    """One decode step of attention for every group of the batch, each over [its shared prompt
    keys | each row's own keys]."""
    batch: _Batch | None = module.__dict__.get("_fdlib_batch")
    if batch is None:
        raise RuntimeError("the fdlib batched attention runs only inside fdlib.interventions.engine.decode_jobs")
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _HARMLESS)
    if unknown:
        raise NotImplementedError(
            f"{type(module).__name__} passes {unknown} to its attention function, which fdlib's batched engine "
            "does not implement; use the sequential path (engine='sequential')"
        )
    if query.shape[2] != 1:
        raise RuntimeError(f"the batched engine decodes one token per row and step, got {query.shape[2]}")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    layer = module.layer_idx
    q_all = query[:, :, 0, :]  # the model's dtype
    outs = []
    for bucket in batch.buckets():  # groups sharing one prompt, adjacent in the batch
        qs = [_query(batch, g, layer, q_all[sl]) for g, sl in bucket]
        outs.append(_bucket_attention(bucket, layer, qs, scale, sliding_window, softcap))
    return torch.cat(outs, dim=0)[:, None, :, :].to(query.dtype), None  # [B, 1, H, d_v]


def _query(batch: _Batch, group: _Group, layer: int, q: Float[Tensor, "rows head_index d_head"]) -> tuple[Tensor, Any]:
    """The group's queries with d_Q added, and the layer's rotation (pre-RoPE directions only)."""
    plan = group.plans[layer]
    n_keys = group.P + group.layers[layer].t
    rope = None
    if batch.rotary is not None and (plan.dq_pre is not None or plan.dk_pre is not None):
        rope = batch.rotary(layer, n_keys, q)
    # alpha * d is made in float32 and added in the query's dtype, as the bridge's hook adds it
    if plan.dq_post is not None:
        q = q + plan.dq_post.to(q.dtype)
    if plan.dq_pre is not None:
        pos = n_keys - 1
        q = q + (plan.dq_pre if rope is None else arch.rotate(plan.dq_pre, rope[0][pos], rope[1][pos])).to(q.dtype)
    return q, rope


def _kv(x: Tensor, n_kv: int) -> Tensor:
    """[rows, heads, ...] -> [n_kv, rows * group, ...]: every row and head of a KV group together."""
    B, g = x.shape[0], x.shape[1] // n_kv
    return x.reshape(B, n_kv, g, *x.shape[2:]).transpose(0, 1).reshape(n_kv, B * g, *x.shape[2:])


def _bh(x: Tensor, n_heads: int) -> Tensor:
    """The inverse of `_kv`: [n_kv, rows * group, ...] -> [rows, heads, ...]."""
    n_kv = x.shape[0]
    g = n_heads // n_kv
    B = x.shape[1] // g
    return x.reshape(n_kv, B, g, *x.shape[2:]).transpose(0, 1).reshape(B, n_heads, *x.shape[2:])


def _bucket_attention(
    bucket: list[tuple[_Group, slice]], layer: int, qs: list[tuple[Tensor, Any]], scale: float,
    sliding_window: int | None, softcap: float | None,
) -> Float[Tensor, "rows head_index d_head"]:
    """Attention of the rows of groups sharing one prompt: the prompt part as one product for all
    of them, per KV head the queries of every row and every head of its group against the shared
    keys (read once, never copied per row: Hydragen's batching); each group's own keys apart.
    Rows stay in the [n_kv, rows * group, ...] layout until the output, so no [rows, heads, keys]
    tensor is permuted."""
    lc0 = bucket[0][0].layers[layer]
    H = qs[0][0].shape[1]
    n_kv = lc0.prefix_keys.shape[0]
    g = H // n_kv
    P = bucket[0][0].P

    qk = _kv(torch.cat([q for q, _ in qs], dim=0), n_kv)  # [n_kv, R*g, d]
    keys = lc0.prefix_keys  # [n_kv, P, d]
    if keys.dtype == torch.float32:
        s_pre = torch.matmul(qk, keys.transpose(1, 2))  # [n_kv, R*g, P]
    else:  # the same products; bfloat16 kernels read the keys untransposed (1.7x faster on the CPU)
        s_pre = torch.matmul(keys, qk.transpose(1, 2)).transpose(1, 2)  # [n_kv, R*g, P], the model's dtype
    patterns = []
    start = 0
    for (group, _), (q, rope) in zip(bucket, qs):
        B = q.shape[0]
        rows = slice(start * g, (start + B) * g)
        start += B
        patterns.append(_group_pattern(group, layer, q, qk[:, rows], s_pre[:, rows], rope, scale, sliding_window, softcap))
    pre = torch.cat([p for p, _ in patterns], dim=1) if len(patterns) > 1 else patterns[0][0]
    out_pre = torch.matmul(pre, lc0.prefix_values)  # [n_kv, R*g, d_v]
    outs = []
    start = 0
    for (group, _), (_, own_pattern) in zip(bucket, patterns):
        lc, plan = group.layers[layer], group.plans[layer]
        B, t = own_pattern.shape[1] // g, lc.t
        own_v = lc.values[:, :, :t].transpose(0, 1)  # [n_kv, B, t, d_v]
        own = torch.einsum("kbgt,kbtd->kbgd", own_pattern.reshape(n_kv, B, g, t), own_v).reshape(n_kv, B * g, -1)
        out = _bh(out_pre[:, start * g : (start + B) * g] + own, H)  # [B, H, d_v]
        start += B
        if plan.ablate is not None:
            out = out.masked_fill(plan.ablate[..., None], 0.0)
        outs.append(out)
    return torch.cat(outs, dim=0)


def _group_pattern(
    group: _Group, layer: int, q: Float[Tensor, "rows head_index d_head"], qk: Tensor, s_pre: Tensor, rope: Any,
    scale: float, sliding_window: int | None, softcap: float | None,
) -> tuple[Float[Tensor, "n_kv rows_group prompt_pos"], Float[Tensor, "n_kv rows_group own_pos"]]:
    """One group's attention rows over [prompt | own keys] after every intervention, in the
    [n_kv, rows * group, keys] layout and the model's dtype, as its prompt part and its own part;
    records its span sums.

    As transformers' eager attention: the logits q.k * scaling in the model's dtype, the softmax
    in float32, the pattern handed on to the values in the model's dtype. The span maps (float64 on
    the chosen rows) and the span sums (float32) work on the float32 pattern, before that
    rounding; the bridge rounds the pattern before its `hook_pattern`, so its maps and recorders
    see it rounded: one rounding of each weight apart (at most 2^-8 of it in bfloat16). Nothing
    here reads a value back to the host."""
    lc, plan = group.layers[layer], group.plans[layer]
    B, H, d = q.shape
    n_kv = lc.prefix_keys.shape[0]
    g = H // n_kv
    P, t = group.P, lc.t
    n_keys = P + t
    pos = n_keys - 1  # absolute position of this step's rows

    own_k = lc.keys[:, :, :t].transpose(0, 1)  # [n_kv, B, t, d]
    s_own = torch.einsum("kbgd,kbtd->kbgt", qk.reshape(n_kv, B, g, d), own_k).reshape(n_kv, B * g, t)
    scores = torch.cat([s_pre, s_own], dim=-1) * scale  # [n_kv, B*g, n_keys]
    # q . d_K * scaling (float32, added in the scores' dtype, as the bridge's hook adds it): the
    # same for every key after RoPE, it matters only under a softcap
    qf = q.float()
    if plan.dk_post is not None:
        scores = scores + (_kv((qf * plan.dk_post).sum(-1, keepdim=True), n_kv) * scale).to(scores.dtype)
    if plan.dk_pre is not None:
        bias = (qf * plan.dk_pre).sum(-1, keepdim=True) if rope is None else _pre_rope_bias(qf, plan.dk_pre, rope[0], rope[1])
        scores = scores + (_kv(bias, n_kv) * scale).to(scores.dtype)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = None
    if sliding_window is not None and n_keys > sliding_window:
        visible = torch.arange(n_keys, device=q.device) > pos - sliding_window
        scores = scores.masked_fill(~visible, float("-inf"))
    pattern = torch.softmax(scores.float(), dim=-1)  # [n_kv, B*g, n_keys], float32 (faster than softmax(dtype=))
    if plan.pairs is not None:
        # only the chosen (row, head) pairs are re-weighted, gathered out of the pattern and put back
        kk, bb, gg = plan.pairs
        p4 = pattern.view(n_kv, B, g, n_keys)
        sub = p4[kk, bb, gg]  # [pairs, n_keys]
        # spans lie in the prompt: [0, P] (P, the last prompt token, is each row's first own key)
        in_span = torch.cat([plan.span_mask, plan.span_mask.new_zeros(B, t - 1)], dim=-1)[bb]
        pi = torch.where(in_span, sub.double(), 0.0).sum(-1)
        target = target_share(pi, plan.map_code[bb], plan.strength[bb])
        p4[kk, bb, gg] = reweight_rows(sub, in_span, target, visible)
    if group.indicator is not None:
        sums = (pattern[..., : P + 1] @ group.indicator)[..., : len(group.names)]  # [n_kv, B*g, n_spans]
        group.step_sums[layer] = _bh(sums, H)
    # in a lower dtype, the cast leaves the prompt's part contiguous for its product with the values
    return pattern[..., :P].to(q.dtype), pattern[..., P:].to(q.dtype)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, shared_prefix_attention)


def engine_model(model: TransformerBridge) -> Any:
    """A module tree of the bridge's HF model running `shared_prefix_attention`, sharing every
    weight and buffer with it (built once per model, on the meta device: nothing is copied)."""
    hf = fast_prefill_model(model)  # the plain HF module tree (rebuilt if the bridge moved or was cast)
    holder = model.__dict__.get("_fdlib_engine")
    if holder is not None:
        return holder
    _register()
    if hf is None:
        raise ValueError("the batched engine needs a model loaded with fdlib.load_model (it shares that model's weights)")
    twin = shared_twin(hf, ATTENTION)
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


# ---------------------------------------------------------------------------------------------
# The decode loop


@torch.no_grad()
def decode_jobs(
    model: TransformerBridge,
    jobs: Iterable[Job],
    *,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    max_jobs: int | None = None,
) -> Iterator[tuple[Any, list[RowAnswer]]]:
    """Greedy answers of every row of every job, `batch_size` rows per forward: as rows finish,
    rows of the next jobs take their places (continuous batching), each group of rows attending to
    its own shared prompt, with at most `max_jobs` jobs in flight (None: no limit; 1: one job
    at a time, its rows in batches). Yields `(job.key, answers in the job's row order)` as each
    job finishes (not necessarily in the jobs' order).

    A row decodes under its `RowIntervention`, acting from the last prompt row on; with the job's
    `spans`, it records every head's attention mass on each span over its answer's rows (the rows
    of its answer tokens, as `decoding.decode` does). Prefixes are only read.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if max_jobs is not None and max_jobs < 1:
        raise ValueError(f"max_jobs must be None or >= 1, got {max_jobs!r}")
    twin = engine_model(model)
    rotary = arch.RotaryTable(twin) if arch.rotary_module(twin) is not None else None
    stop = _stop_tokens(model)
    tok = model.tokenizer
    pending = iter(jobs)
    waiting: tuple[Job, Prefix, int] | None = None  # a job whose rows are not all admitted yet
    unfinished: dict[int, list] = {}  # id(job) -> [job, answers by row, rows left]
    active: list[_Group] = []
    device = None
    exhausted = False
    while True:
        # admit rows while there is room: the rest of a job first, then new jobs
        room = batch_size - sum(len(g.active) for g in active)
        while room > 0 and not exhausted:
            if waiting is None:
                if max_jobs is not None and len(unfinished) >= max_jobs:
                    break
                job = next(pending, None)
                if job is None:
                    exhausted = True
                    break
                if not job.rows:
                    yield job.key, []
                    continue
                prefix = job.prefix() if callable(job.prefix) else job.prefix
                _check_job(model, job, prefix, max_new_tokens)
                unfinished[id(job)] = [job, [None] * len(job.rows), len(job.rows)]
                waiting = (job, prefix, 0)
            job, prefix, first = waiting
            left = len(job.rows) - first
            if active and room < min(left, max(1, batch_size // 4)):
                break  # wait for room for a useful chunk: every group costs its own small products
            take = job.rows[first : first + room]
            group = _Group(model, job, prefix, first, take, max_new_tokens)
            same = [i for i, g in enumerate(active) if g.job is job]
            active.insert(same[-1] + 1 if same else len(active), group)  # next to its job's groups
            device = prefix.tokens.device
            room -= len(take)
            waiting = (job, prefix, first + len(take)) if first + len(take) < len(job.rows) else None
        if not active:
            return
        batch = _Batch(active, rotary)
        # the step's one read-back: the next tokens, to stop rows (nothing else is read per step)
        next_tokens = _step(model, twin, batch, device).argmax(-1).tolist()
        done_groups = []
        for g, sl in list(batch.slices()):
            if g.step > 0 and g.names:  # rows of answer tokens are recorded; the last prompt row is not
                g.add_step()
            keep = []
            if g.step < max_new_tokens:
                for i, token in enumerate(next_tokens[sl]):
                    b = g.active[i]
                    if token in stop.eos or (token in stop.newline and tok.decode(g.answers[b]).strip()):
                        continue
                    g.answers[b].append(token)
                    keep.append(i)
            g.step += 1
            if not keep:
                done_groups.append(g)
            elif len(keep) < len(g.active):
                g.keep(keep)
        for g in done_groups:
            active.remove(g)
            entry = unfinished[id(g.job)]
            for i, row_answer in enumerate(_answers(g, tok)):
                entry[1][g.first + i] = row_answer
            entry[2] -= len(g.rows)
            if entry[2] == 0:
                del unfinished[id(g.job)]
                yield g.job.key, entry[1]


def _step(model: TransformerBridge, twin: Any, batch: _Batch, device: Any) -> Float[Tensor, "batch d_vocab"]:
    """One forward of every active row (its next token at its own absolute position); the logits
    of each row's last position."""
    ids = torch.tensor([t for g in batch.groups for t in g.inputs()], device=device)[:, None]
    positions = torch.tensor([g.position for g in batch.groups for _ in g.active], device=device)[:, None]
    cache = Cache(layers=[_StreamLayer(l, batch) for l in range(model.cfg.n_layers)])
    with _attached(twin, batch):
        # float32 logits (an exact cast): the argmax is faster there, and every dtype picks the same way
        return twin(ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()


@torch.no_grad()
def first_row_scores(
    model: TransformerBridge, prefix: Prefix, rows: Sequence[RowIntervention], spans: dict[str, Span]
) -> Float[Tensor, "row n_layers n_heads n_spans"]:
    """Each row's attention mass on each span at the last prompt row (the row that produces the
    first answer token) under its intervention: one forward for all rows, from the shared prefix
    (what a per-input magnitude control costs: one extra step)."""
    job = Job(None, prefix, list(rows), spans)
    _check_job(model, job, prefix, 1)
    if not spans:
        raise ValueError("first_row_scores needs spans to record")
    twin = engine_model(model)
    rotary = arch.RotaryTable(twin) if arch.rotary_module(twin) is not None else None
    group = _Group(model, job, prefix, 0, list(rows), 1)
    _step(model, twin, _Batch([group], rotary), prefix.tokens.device)
    return torch.stack(group.step_sums, dim=1).float()  # [rows, n_layers, n_heads, n_spans]


@torch.no_grad()
def teacher_forced(
    model: TransformerBridge,
    prefix: Prefix,
    rows: Sequence[RowIntervention],
    tokens: Sequence[int],
    spans: dict[str, Span] | None = None,
) -> tuple[Float[Tensor, "row pos d_vocab"], list[RowAnswer]]:
    """Every row fed the same answer `tokens` under its own intervention (teacher forcing), in one
    batch: the logits of the last prompt row and of every answer row, `[rows, len(tokens) + 1,
    d_vocab]` in float32, and per row a `RowAnswer` holding `tokens` and, with `spans`, the span
    scores over the answer's rows (the rows `decode_batch` records). Comparing executors or
    dtypes on the same tokens is meaningful where greedy answers may part at a near tie."""
    tokens = [int(t) for t in tokens]
    if not tokens or not rows:
        raise ValueError("teacher_forced needs at least one row and one answer token")
    job = Job(None, prefix, list(rows), spans)
    _check_job(model, job, prefix, len(tokens))
    twin = engine_model(model)
    rotary = arch.RotaryTable(twin) if arch.rotary_module(twin) is not None else None
    group = _Group(model, job, prefix, 0, list(rows), len(tokens))
    batch = _Batch([group], rotary)
    logits = []
    for step in range(len(tokens) + 1):
        logits.append(_step(model, twin, batch, prefix.tokens.device).float())
        if step > 0 and group.names:
            group.add_step()
        if step < len(tokens):
            for answer in group.answers:
                answer.append(tokens[step])
        group.step += 1
    return torch.stack(logits, dim=1), _answers(group, model.tokenizer)


def _check_job(model: TransformerBridge, job: Job, prefix: Prefix, max_new_tokens: int) -> None:
    if int(prefix.cache.get_seq_length()) != prefix.length - 1:
        raise ValueError(f"prefix cache holds {prefix.cache.get_seq_length()} positions, expected {prefix.length - 1}")
    check_length(model, prefix.length + max_new_tokens)
    check_rows(model, job.rows, prefix.length)
    if job.spans:
        check_spans(job.spans, prefix.length)


def _answers(g: _Group, tok: Any) -> list[RowAnswer]:
    out = []
    sums = g.sums.cpu()  # the group's one read-back of its span sums
    for b in range(len(g.rows)):
        n = len(g.answers[b])
        scores = {}
        if g.names and n:
            mean = (sums[b] / n).float()
            scores = {name: mean[..., k] for k, name in enumerate(g.names)}
        out.append(RowAnswer(g.answers[b], tok.decode(g.answers[b], skip_special_tokens=True), scores))
    return out


def decode_batch(
    model: TransformerBridge,
    prefix: Prefix,
    rows: Sequence[RowIntervention],
    *,
    spans: dict[str, Span] | None = None,
    max_new_tokens: int = 32,
    batch_size: int | None = None,
) -> list[RowAnswer]:
    """Greedy answers of every row from one shared prefix (`decode_jobs` with one job; by
    default all rows in one batch)."""
    if not rows:
        return []
    job = Job(None, prefix, list(rows), spans)
    ((_, answers),) = list(decode_jobs(model, [job], batch_size=batch_size or len(rows), max_new_tokens=max_new_tokens))
    return answers
