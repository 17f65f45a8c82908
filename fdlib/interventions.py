"""Interventions: context managers that only add hooks, and always remove them."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.arch import check_supported, visible_keys
from fdlib.decoding import first_row_position, hooks
from fdlib.spans import Span

Head = tuple[int, int]


def check_heads(model: TransformerBridge, heads: Sequence[Head]) -> list[Head]:
    """Validate (layer, head) pairs against the model; duplicates are dropped, order kept."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out: list[Head] = []
    for item in heads:
        try:
            layer, head = (int(x) for x in item)
        except (TypeError, ValueError):
            raise ValueError(f"a head must be a (layer, head) pair, got {item!r}") from None
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head L{layer}H{head} is outside the model ({n_layers} layers x {n_heads} heads)")
        if (layer, head) not in out:
            out.append((layer, head))
    return out


def check_from_pos(from_pos: int) -> int:
    if isinstance(from_pos, bool) or not isinstance(from_pos, int) or from_pos < 0:
        raise ValueError(f"from_pos must be an int >= 0, got {from_pos!r}")
    return from_pos


def heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    """{layer: [head, ...]} in the order given: one hook per layer serves all its heads."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return by_layer


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
    """Split-softmax on attention rows: the span's mass pi becomes pi**tau, inside and outside
    scaled proportionally: W' = pi^tau/pi * W in the span, (1 - pi^tau)/(1 - pi) * W outside.

    `in_span` is a boolean mask over key positions; `row_pos` the absolute position of each query
    row. Limits, all finite: pi = 1 leaves the row unchanged (1**tau = 1); pi = 0 with tau > 0
    leaves it unchanged too (0**tau = 0); pi = 0 with tau = 0 asks for all mass on a span the row
    gives none, so the mass goes uniformly to the span's positions the row can see (j <= i, and
    i - j < window under a sliding window), and a row that sees none of the span is left unchanged.
    """
    if tau == 1.0:
        return pattern
    pat = pattern.double()  # pi**tau for tiny pi and large tau needs double's range
    inside = in_span.to(pat.dtype)
    pi = (pat * inside).sum(-1, keepdim=True)
    target = pi.pow(tau) if tau > 0 else torch.ones_like(pi)
    a = torch.where(pi > 0, target / pi.clamp_min(1e-300), torch.zeros_like(pi))
    b = torch.where(pi < 1, (1 - target) / (1 - pi).clamp_min(1e-300), torch.zeros_like(pi))
    out = pat * (inside * a + (1 - inside) * b)
    if tau == 0:
        seen = visible_keys(row_pos, pattern.shape[-1], window).to(pat.dtype) * inside  # [query_pos, key_pos]
        n_seen = seen.sum(-1, keepdim=True)
        uniform = (seen / n_seen.clamp_min(1)).expand_as(out)
        out = torch.where((pi <= 0) & (n_seen > 0), uniform, out)
        out = torch.where((pi <= 0) & (n_seen == 0), pat, out)
    return out.to(pattern.dtype)


@contextlib.contextmanager
def split_softmax(
    model: TransformerBridge,
    heads: Sequence[Head],
    span: Span,
    tau: float,
    from_pos: int = 0,
) -> Iterator[None]:
    """Re-weight the chosen heads' attention on `span` (split-softmax) for every query row at
    position >= `from_pos`, on `blocks.{l}.attn.hook_pattern`.

    tau < 1 raises the span's share, tau > 1 lowers it, tau = 1 is the identity, tau = 0 puts all
    mass on the span. During generation use `from_pos = len(prompt) - 1` (the last prompt row
    produces the first answer token). Positions are absolute, in a full forward and in a cached
    decode step alike.
    """
    tau = check_tau(tau)
    chosen = check_heads(model, heads)
    if not isinstance(span, Span):
        raise ValueError(f"span must be an fdlib.Span, got {span!r}")
    check_from_pos(from_pos)
    facts = check_supported(model, "split_softmax")
    by_layer = heads_by_layer(chosen)

    def make_hook(head_idx: list[int], window: int | None) -> Any:
        def hook(pattern: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> Tensor:
            n_q, n_k = pattern.shape[-2], pattern.shape[-1]
            first_row = n_k - n_q  # absolute position of the first query row in this call
            skip = max(0, from_pos - first_row)
            if skip >= n_q:
                return pattern
            if span.end > n_k:
                raise ValueError(f"split_softmax span {span} lies past the {n_k} positions attended to")
            mask = torch.zeros(n_k, dtype=torch.bool, device=pattern.device)
            mask[span.slice] = True
            out = pattern.clone()
            sub = pattern[:, head_idx, skip:, :]
            row_pos = torch.arange(first_row + skip, n_k, device=pattern.device)
            out[:, head_idx, skip:, :] = reweight(sub, mask, tau, row_pos, window)
            return out

        return hook

    fwd = [(f"blocks.{layer}.attn.hook_pattern", make_hook(h, facts.layers[layer].window)) for layer, h in sorted(by_layer.items())]
    with hooks(model, fwd):
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
