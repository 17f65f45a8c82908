"""Heads: `(layer, head)` pairs, their `L{l}H{h}` labels, and reproducible random head sets."""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

Head = tuple[int, int]
_LABEL = re.compile(r"^L(\d+)H(\d+)$")


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_head(label: str) -> Head:
    """`"L21H8"` -> (21, 8)."""
    m = _LABEL.match(label.strip())
    if m is None:
        raise ValueError(f"not a head label (L{{layer}}H{{head}}): {label!r}")
    return int(m.group(1)), int(m.group(2))


def labels(heads: Sequence[Head]) -> list[str]:
    return [head_label(l, h) for l, h in heads]


def check_heads(model: Any, heads: Sequence[Head]) -> list[Head]:
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


def heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    """{layer: [head, ...]} in the order given: one hook per layer serves all its heads."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    """k distinct heads drawn uniformly, reproducibly (Python's Random is stable across versions)."""
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    if not 1 <= k <= len(every):
        raise ValueError(f"k must be in [1, {len(every)}], got {k}")
    return random.Random(seed).sample(every, k)
