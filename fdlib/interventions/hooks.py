"""Where interventions act on the TransformerBridge: context managers that only add hooks, and
always remove them (what span reweighting does to a row is `fdlib.interventions.reweighting`)."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head, check_heads, heads_by_layer
from fdlib.core.spans import Span
from fdlib.interventions.reweighting import check_strength, reweight_rows, target_share
from fdlib.model.arch import check_supported, visible_keys
from fdlib.model.decoding import first_row_position, hooks


def check_from_pos(from_pos: int) -> int:
    if isinstance(from_pos, bool) or not isinstance(from_pos, int) or from_pos < 0:
        raise ValueError(f"from_pos must be an int >= 0, got {from_pos!r}")
    return from_pos


def check_tau(tau: float) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise ValueError(f"tau must be a number >= 0, got {tau!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"tau must be a number >= 0, got {tau!r}")
    return value


def reweight(
    pattern: Float[Tensor, "... query_pos key_pos"],
    in_span: Tensor,
    tau: float,
    row_pos: Tensor,
    window: int | None = None,
) -> Float[Tensor, "... query_pos key_pos"]:
    """Split-softmax on attention rows (`fdlib.interventions.reweighting`, map "split"): the span's mass pi
    becomes pi**tau, inside and outside scaled proportionally. `in_span` is a boolean mask over
    key positions; `row_pos` the absolute position of each query row, which with `window` says
    which keys a row can see (where tau = 0 puts the mass of a row that gives the span none)."""
    if tau == 1.0:
        return pattern
    pi = (pattern.double() * in_span).sum(-1)
    visible = visible_keys(row_pos, pattern.shape[-1], window)
    return reweight_rows(pattern, in_span, target_share(pi, "split", tau), visible)


@contextlib.contextmanager
def reweight_span(
    model: TransformerBridge,
    heads: Sequence[Head],
    span: Span,
    span_map: str,
    value: float,
    from_pos: int = 0,
) -> Iterator[None]:
    """Re-weight the chosen heads' attention on `span` with a named map (`fdlib.interventions.reweighting`:
    split tau, odds a, boost m) for every query row at position >= `from_pos`, on
    `blocks.{l}.attn.hook_pattern`.

    During generation use `from_pos = len(prompt) - 1` (the last prompt row produces the first
    answer token). Positions are absolute, in a full forward and in a cached decode step alike;
    a sliding window is taken from the model (`fdlib.model.arch.model_facts`).
    """
    value = check_strength(span_map, value)
    chosen = check_heads(model, heads)
    if not isinstance(span, Span):
        raise ValueError(f"span must be an fdlib.Span, got {span!r}")
    check_from_pos(from_pos)
    facts = check_supported(model, "split_softmax")

    def make_hook(head_idx: list[int], window: int | None) -> Any:
        def hook(pattern: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> Tensor:
            n_q, n_k = pattern.shape[-2], pattern.shape[-1]
            first_row = n_k - n_q  # absolute position of the first query row in this call
            skip = max(0, from_pos - first_row)
            if skip >= n_q:
                return pattern
            if span.end > n_k:
                raise ValueError(f"reweighted span {span} lies past the {n_k} positions attended to")
            cols = torch.arange(n_k, device=pattern.device)
            mask = (cols >= span.start) & (cols < span.end)
            row_pos = torch.arange(first_row + skip, n_k, device=pattern.device)
            sub = pattern[:, head_idx, skip:, :]
            target = target_share((sub.double() * mask).sum(-1), span_map, value)
            out = pattern.clone()
            out[:, head_idx, skip:, :] = reweight_rows(sub, mask, target, visible_keys(row_pos, n_k, window))
            return out

        return hook

    fwd = [(f"blocks.{layer}.attn.hook_pattern", make_hook(h, facts.layers[layer].window))
           for layer, h in sorted(heads_by_layer(chosen).items())]
    with hooks(model, fwd):
        yield


@contextlib.contextmanager
def split_softmax(
    model: TransformerBridge,
    heads: Sequence[Head],
    span: Span,
    tau: float,
    from_pos: int = 0,
) -> Iterator[None]:
    """Re-weight the chosen heads' attention on `span` (split-softmax) for every query row at
    position >= `from_pos`: `reweight_span` with the map "split".

    tau < 1 raises the span's share, tau > 1 lowers it, tau = 1 is the identity, tau = 0 puts all
    mass on the span. During generation use `from_pos = len(prompt) - 1` (the last prompt row
    produces the first answer token).
    """
    with reweight_span(model, heads, span, "split", check_tau(tau), from_pos=from_pos):
        yield


@contextlib.contextmanager
def ablate_heads(model: TransformerBridge, heads: Sequence[Head], from_pos: int = 0) -> Iterator[None]:
    """Zero the chosen heads' outputs at query positions >= `from_pos`.

    A head's output is its slice of the attention output before the output projection,
    `blocks.{l}.attn.hook_z` (`[batch, pos, head_index, d_head]`; the bridge's alias of the
    o-projection's input), so zeroing it removes exactly that head's term from the residual
    stream. `from_pos=0` ablates every row (prefill with `prefill(..., fast=False)` so the prompt
    rows see it); `from_pos = len(prompt) - 1` ablates the answer rows only and works from a
    shared fast prefill. Positions are absolute: they count the `past_key_values` handed to the
    bridge's forward, so a cached decode step is ablated at its true position.
    """
    chosen = check_heads(model, heads)
    check_from_pos(from_pos)
    check_supported(model, "ablate")
    by_layer = heads_by_layer(chosen)

    def make_hook(idx: list[int]) -> Any:
        def hook(z: Float[Tensor, "batch pos head_index d_head"], hook: Any) -> Tensor:
            if z.ndim != 4:
                raise ValueError(f"{hook.name}: expected [batch, pos, head_index, d_head], got shape {tuple(z.shape)}")
            start = max(0, from_pos - first_row())
            if start >= z.shape[1]:
                return z
            z = z.clone()
            z[:, start:, idx, :] = 0.0
            return z

        return hook

    fwd = [(f"blocks.{layer}.attn.hook_z", make_hook(idx)) for layer, idx in sorted(by_layer.items())]
    with first_row_position(model) as first_row, hooks(model, fwd):
        yield
