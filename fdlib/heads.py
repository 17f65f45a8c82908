"""Heads: `(layer, head)` pairs, their `L{l}H{h}` labels, and reproducible random head sets."""

from __future__ import annotations

import random
import re
from typing import Sequence

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


def random_heads(n_layers: int, n_heads: int, k: int, seed: int) -> list[Head]:
    """k distinct heads drawn uniformly, reproducibly (Python's Random is stable across versions)."""
    every = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    if not 1 <= k <= len(every):
        raise ValueError(f"k must be in [1, {len(every)}], got {k}")
    return random.Random(seed).sample(every, k)
