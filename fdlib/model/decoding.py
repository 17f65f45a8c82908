"""The sequential path on the bridge: prefill a prompt once, decode a greedy answer under hooks,
record span sums (the batched executor is `fdlib.interventions.engine`).

`decode` is the bridge's one greedy loop. A `SpanRecorder` on every layer's `hook_pattern`
keeps, per response row, the attention mass on each named span (`[n_heads, n_spans]` per layer and
row), never a T x T pattern.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from fdlib.core.spans import Span, check_spans
from fdlib.model.arch import check_supported
from fdlib.model.loading import StopTokens, fast_prefill_model, stop_tokens, synced


def _as_ids(tokens: Tensor | Sequence[int]) -> Int[Tensor, "pos"]:
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"tokens must be 1-D or [1, pos], got shape {tuple(ids.shape)}")
        ids = ids[0]
    if ids.ndim != 1 or ids.numel() == 0:
        raise ValueError(f"tokens must be a non-empty 1-D sequence, got shape {tuple(ids.shape)}")
    return ids


@dataclass
class Prefix:
    """The KV cache of `tokens[:-1]` plus the last prompt token, not yet run.

    The last prompt row produces the first answer token, so it is left for `decode` to run on
    the bridge, where hooks (interventions with `from_pos = len(prompt) - 1`) see it.
    """

    cache: Any  # transformers.DynamicCache holding positions [0, length - 1)
    tokens: Int[Tensor, "pos"]

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def compact(self) -> Prefix:
        """Hold every layer's keys and values as contiguous tensors of exactly the cached length
        (a copy only where they are views of a larger buffer, e.g. after a decode). Products that
        read the prompt's keys every step (the batched engine) then read them in place: some
        kernels (bfloat16 on the CPU) copy a strided operand on every call."""
        for layer in self.cache.layers:
            if layer.keys is None or (layer.keys.is_contiguous() and layer.values.is_contiguous()):
                continue
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
            if isinstance(layer, GrowableLayer):
                layer._k = layer._v = None  # the next update re-buffers; the larger buffer is freed
        return self


def check_length(model: TransformerBridge, n_tokens: int) -> None:
    """Refuse, before any forward pass, a sequence longer than the model's context window."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and n_tokens > n_ctx:
        raise ValueError(f"{n_tokens} tokens exceed the model's context window of {n_ctx} tokens")


class GrowableLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into a buffer with spare room.

    transformers' DynamicLayer concatenates the whole cache on every decode step; here a step
    writes its position in place. `crop` (the inherited slice) stays a view of the buffer, so
    returning a shared prefix to its length and decoding the next configuration copies nothing.
    """

    reserve = 64  # spare positions allocated beyond the current need

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k: Tensor | None = None
            self._v: Tensor | None = None
        cur = self.get_seq_length()
        need = cur + key_states.shape[-2]
        buf = self._k
        # Re-buffer when full, or when keys were replaced by something that is not our view.
        if buf is None or need > buf.shape[-2] or (cur and self.keys.data_ptr() != buf.data_ptr()):
            k_shape = list(key_states.shape)
            k_shape[-2] = need + self.reserve
            v_shape = k_shape[:-1] + [value_states.shape[-1]]
            new_k, new_v = key_states.new_empty(k_shape), value_states.new_empty(v_shape)
            if cur:
                new_k[..., :cur, :] = self.keys
                new_v[..., :cur, :] = self.values
            self._k, self._v = new_k, new_v
        self._k[..., cur:need, :] = key_states
        self._v[..., cur:need, :] = value_states
        self.keys, self.values = self._k[..., :need, :], self._v[..., :need, :]
        return self.keys, self.values


def _new_cache(model: TransformerBridge) -> Any:
    """A cache keeping every position's keys and values in every layer.

    transformers' sliding-window layers keep only the last window - 1 keys; fdlib's hooks (span
    recorders, split-softmax, focus directions, retrieval's argmax) read a row's absolute position
    as (keys attended to) - (query rows) and index spans by absolute key position, so every layer
    here keeps them all. The window is still applied: by the attention mask, which transformers
    builds from the config's `sliding_window` whatever the cache layers are (the sdpa / eager twin
    and the bridge alike), masking keys i - j >= window.
    """
    cache = DynamicCache(config=model.original_model.config)
    cache.layers = [GrowableLayer() for _ in cache.layers]
    return cache


@torch.no_grad()  # not inference_mode: the cache buffers must stay writable afterwards
def prefill(model: TransformerBridge, tokens: Tensor | Sequence[int], *, fast: bool = True,
            reuse: Prefix | None = None) -> Prefix:
    """Compute the KV cache of all prompt tokens but the last.

    `fast=True` uses the sdpa twin from `load_model`: no eager attention and no hooks, right
    whenever nothing edits the prompt rows. `fast=False` (or a bridge without a twin) runs the
    bridge itself, so hooks that edit prompt rows (e.g. `from_pos=0`) see them.
    `reuse`: a prefix whose cache holds the keys and values of the first positions of its
    `tokens` (it may hold more than `length - 1`, e.g. after a forward over an answer); its cache
    is cut back to the longest common prefix with `tokens` and continued from there, and is
    consumed (the returned prefix owns it). Causal attention makes the kept positions exactly
    those a fresh prefill computes, up to floating-point summation order.
    """
    synced(model)  # a bridge moved or cast since loading: its twin and rotary tables follow
    ids = _as_ids(tokens).to(model.cfg.device)
    check_supported(model, "decode")
    check_length(model, ids.shape[0])
    start = 0
    if reuse is not None:
        held = min(_cache_len(reuse.cache), int(reuse.tokens.shape[0]), int(ids.shape[0]) - 1)
        same = (reuse.tokens[:held].to(ids.device) == ids[:held]).long()
        start = int(same.cumprod(0).sum()) if held > 0 else 0
    if start > 0:
        cache = reuse.cache
        drop = _cache_len(cache) - start
        if drop:
            cache.crop(-drop)  # transformers' crop takes minus the number of tokens to drop
    else:
        cache = _new_cache(model)
    if ids.shape[0] - 1 > start:
        twin = fast_prefill_model(model) if fast else None
        if twin is not None:
            twin(ids[None, start:-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            model(ids[None, start:-1], past_key_values=cache, return_type=None)
    return Prefix(cache=cache, tokens=ids)


def _cache_len(cache: Any) -> int:
    return int(cache.get_seq_length())


class SpanRecorder:
    """Records, for every query row at position >= `from_pos`, each head's attention on each span.

    Hooked on `blocks.{l}.attn.hook_pattern` (shape `batch head_index query_pos key_pos`); the
    query rows of a call are the last `query_pos` of the `key_pos` positions, so the absolute
    position of a row is known in a full forward and in a cached decode step alike.
    """

    def __init__(self, spans: dict[str, Span], from_pos: int, n_layers: int) -> None:
        if from_pos < 0:
            raise ValueError(f"from_pos must be >= 0, got {from_pos}")
        self.names = list(spans)
        self.spans = dict(spans)
        self.from_pos = from_pos
        self.n_layers = n_layers
        # rows[layer] is a list of [query_rows, head_index, n_spans] blocks, in order.
        self._rows: list[list[Tensor]] = [[] for _ in range(n_layers)]
        self._indicator: Tensor | None = None

    def _indicator_for(self, n_keys: int, like: Tensor) -> Float[Tensor, "key_pos n_spans"]:
        ind = self._indicator
        if ind is None or ind.shape[0] < n_keys or ind.dtype != like.dtype or ind.device != like.device:
            size = max(n_keys, max(s.end for s in self.spans.values()))
            ind = torch.zeros(size, len(self.names), dtype=like.dtype, device=like.device)
            for k, name in enumerate(self.names):
                ind[self.spans[name].slice, k] = 1.0
            self._indicator = ind
        return ind[:n_keys]

    def hook(self, layer: int):
        def record(pattern: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> None:
            n_q, n_k = pattern.shape[-2], pattern.shape[-1]
            first_row = n_k - n_q  # absolute position of the first query row in this call
            skip = max(0, self.from_pos - first_row)
            if skip >= n_q:
                return
            for name, span in self.spans.items():
                if span.end > n_k:
                    raise ValueError(f"span {name!r} {span} lies past the {n_k} positions attended to")
            rows = pattern[0, :, skip:, :].float()  # [head, rows, key], float32 whatever the model's dtype
            sums = rows @ self._indicator_for(n_k, rows)  # [head, rows, n_spans]
            self._rows[layer].append(sums.permute(1, 0, 2).detach())  # on the device until read

        return record

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        return [(f"blocks.{l}.attn.hook_pattern", self.hook(l)) for l in range(self.n_layers)]

    @property
    def n_rows(self) -> int:
        return sum(t.shape[0] for t in self._rows[0])

    def per_row(self) -> Float[Tensor, "row n_layers n_heads n_spans"]:
        if self.n_rows == 0:
            raise ValueError("the recorder saw no query row at or after from_pos")
        return torch.stack([torch.cat(blocks, dim=0) for blocks in self._rows], dim=1).cpu()

    def mean(self) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
        """S_X = mean over recorded rows of the attention mass on X, per layer and head."""
        m = self.per_row().mean(dim=0)
        return {name: m[..., k] for k, name in enumerate(self.names)}


@contextlib.contextmanager
def hooks(model: TransformerBridge, fwd_hooks: list[tuple[str, Any]]) -> Iterator[None]:
    """Add forward hooks for the body; always removed, also when the body raises.

    Only the hooks added here are removed (by handle), so these contexts nest: an inner one
    leaves the outer one's hooks in place.
    """
    added = []
    try:
        for name, fn in fwd_hooks:
            if name not in model.hook_dict:
                raise ValueError(f"no hook point named {name!r} in this model")
            point = model.hook_dict[name]
            added.append((point, point.add_hook(fn)))
        yield
    finally:
        for point, handle in reversed(added):
            handle.hook.remove()
            if handle in point.fwd_hooks:
                point.fwd_hooks.remove(handle)


@contextlib.contextmanager
def first_row_position(model: TransformerBridge) -> Iterator[Any]:
    """Yield a function returning the absolute position of the first query row of the forward
    in progress: the length of the `past_key_values` handed to the bridge's forward (0 without
    a cache). Hooks that act on positions >= from_pos use it on full forwards and cached decode
    steps alike."""
    state = {"pos": 0}

    def record(module: Any, args: Any, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        state["pos"] = int(cache.get_seq_length()) if cache is not None else 0

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield lambda: state["pos"]
    finally:
        handle.remove()


@dataclass
class Answer:
    """A greedy answer: its tokens (no stop token), text, and per-span scores if recorded."""

    tokens: list[int]
    text: str
    scores: dict[str, Float[Tensor, "n_layers n_heads"]] = field(default_factory=dict)


def _stop_tokens(model: TransformerBridge) -> StopTokens:
    # Cached on the model object (not module state): the vocabulary scan is done once per model.
    stop = model.__dict__.get("_fdlib_stop_tokens")
    if stop is None:
        stop = stop_tokens(model.tokenizer)
        model.__dict__["_fdlib_stop_tokens"] = stop
    return stop


@torch.no_grad()  # not inference_mode: the cache buffers must stay writable afterwards
def decode(
    model: TransformerBridge,
    prefix: Prefix,
    *,
    max_new_tokens: int = 32,
    spans: dict[str, Span] | None = None,
    extra_hooks: list[tuple[str, Any]] = (),
) -> Answer:
    """Greedy answer from a prefix; the prefix's cache is restored afterwards, so it can be reused.

    If `spans` is given, each head's attention on each span is averaged over the response rows
    (the rows of the answer tokens, positions >= len(prompt)); this equals
    `contextual_scores(model, prompt + answer, len(prompt), spans)`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if _cache_len(prefix.cache) != prefix.length - 1:
        raise ValueError(
            f"prefix cache holds {_cache_len(prefix.cache)} positions, expected {prefix.length - 1}"
        )
    synced(model)
    check_supported(model, "decode")
    check_length(model, prefix.length + max_new_tokens)
    stop = _stop_tokens(model)
    recorder = None
    hook_list = list(extra_hooks)
    if spans:
        check_spans(spans, prefix.length)
        recorder = SpanRecorder(spans, from_pos=prefix.length, n_layers=model.cfg.n_layers)
        hook_list += recorder.fwd_hooks()
    answer: list[int] = []
    fed = 0
    try:
        with hooks(model, hook_list):
            next_input = prefix.tokens[-1:]
            while True:
                logits = model(next_input[None, :], past_key_values=prefix.cache, return_type="logits")
                fed += 1
                if len(answer) == max_new_tokens:
                    break  # the last answer token's row is recorded; its prediction is unused
                token = int(logits[0, -1].argmax())
                if token in stop.eos or (token in stop.newline and model.tokenizer.decode(answer).strip()):
                    break
                answer.append(token)
                next_input = torch.tensor([token], device=prefix.tokens.device)
    finally:
        if fed:
            prefix.cache.crop(-fed)  # transformers' crop takes minus the number of tokens to drop
    scores = recorder.mean() if recorder is not None and answer else {}
    return Answer(tokens=answer, text=model.tokenizer.decode(answer, skip_special_tokens=True), scores=scores)
