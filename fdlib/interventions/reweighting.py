"""Span reweighting maps: what an intervention does to one span's share of an attention row.

Each map takes the span's share pi of a row to a target share, and the row is rescaled so the
proportions inside the span and outside it are kept and the row still sums to one:
`W' = t/pi * W` in the span, `(1 - t)/(1 - pi) * W` outside.

- `split` (split-softmax, the paper): t = pi ** tau. tau < 1 raises the share, tau = 1 is the
  identity, tau = 0 puts all mass on the span.
- `odds` (PASTA-style: the attention outside the span scaled by a, then renormalised):
  t = pi / (pi + a (1 - pi)). a = 1 is the identity, a -> 0 puts all mass on the span.
- `boost` (InstABoost-style: the span's attention multiplied by m, then renormalised):
  t = m pi / (m pi + 1 - pi). m = 1 is the identity. It is `odds` with a = 1/m.

Limits, all finite: pi = 1 stays 1 under every map; pi = 0 stays 0, except split with tau = 0,
which asks for all mass on a span the row gives none: the mass then goes uniformly to the span
positions the row can see, and a row that sees none of the span is left unchanged.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

SpanMap = Literal["split", "odds", "boost"]
SPAN_MAPS: tuple[str, ...] = ("split", "odds", "boost")
# The parameter's name per map (keys, labels, error messages) and its identity value.
PARAMETER: dict[str, str] = {"split": "tau", "odds": "a", "boost": "m"}
IDENTITY: dict[str, float] = {"split": 1.0, "odds": 1.0, "boost": 1.0}


def check_strength(span_map: str, value: float) -> float:
    """Validate a map's parameter: tau >= 0 for split, a > 0 for odds, m > 0 for boost
    (all finite, except tau, which may be +inf: every row's share then goes to 0)."""
    if span_map not in SPAN_MAPS:
        raise ValueError(f"unknown span map {span_map!r}: expected one of {SPAN_MAPS}")
    name = PARAMETER[span_map]
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or math.isnan(v):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if span_map == "split":
        if v < 0:
            raise ValueError(f"tau must be a number >= 0, got {value!r}")
    elif not (0 < v < math.inf):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def target_share(
    pi: Float[Tensor, "*rows"], span_map: Float[Tensor, "*rows"] | str, value: Float[Tensor, "*rows"] | float
) -> Float[Tensor, "*rows"]:
    """The share each row's span gets under the map (double precision in, double out).

    `span_map` is a map name, or per row a code (0 split, 1 odds, 2 boost) so rows of one batch
    can carry different maps.
    """
    pi = pi.double()
    v = torch.as_tensor(value, dtype=torch.float64, device=pi.device).expand_as(pi)
    if isinstance(span_map, str):
        code = torch.full_like(pi, float(SPAN_MAPS.index(span_map)))
    else:
        code = span_map.to(pi.dtype).expand_as(pi)
    # split: 0**0 = 1 in torch.pow, which is the tau = 0 convention (all mass on the span)
    split = torch.where(v == 0, torch.ones_like(pi), pi.pow(v))
    a = torch.where(code == 1, v, 1.0 / v)  # odds with a, or boost with m as odds with 1/m
    odds = pi / (pi + a * (1 - pi)).clamp_min(1e-300)
    odds = torch.where(pi >= 1, torch.ones_like(pi), odds)
    return torch.where(code == 0, split, odds)


def reweight_rows(
    pattern: Float[Tensor, "*rows key_pos"],
    in_span: Bool[Tensor, "*rows key_pos"] | Bool[Tensor, " key_pos"],
    target: Float[Tensor, "*rows"],
    visible: Bool[Tensor, "*rows key_pos"] | Bool[Tensor, " key_pos"] | None = None,
) -> Float[Tensor, "*rows key_pos"]:
    """Rescale each row so its span holds `target` of the mass (proportions inside and outside
    kept). A row whose span holds nothing and whose target is positive (split with tau = 0) puts
    `target` uniformly on the span positions it can see (`visible`, default all); with none
    visible it is left unchanged. Computed in double, returned in the pattern's dtype."""
    pat = pattern.double()
    inside = in_span.to(torch.bool).expand_as(pat)
    pi = torch.where(inside, pat, 0.0).sum(-1, keepdim=True)
    t = target.double()[..., None]
    a = torch.where(pi > 0, t / pi.clamp_min(1e-300), torch.zeros_like(pi))
    b = torch.where(pi < 1, (1 - t) / (1 - pi).clamp_min(1e-300), torch.zeros_like(pi))
    out = pat * torch.where(inside, a, b)
    # computed for every row, used where the span holds nothing: no branch on the values, so
    # nothing is read back from the device
    empty = (pi <= 0) & (t > 0)
    seen = inside if visible is None else inside & visible.to(torch.bool).expand_as(pat)
    seen = seen.to(pat.dtype)
    n_seen = seen.sum(-1, keepdim=True)
    uniform = t * seen / n_seen.clamp_min(1) + (1 - t) * pat
    out = torch.where(empty & (n_seen > 0), uniform, out)
    out = torch.where(empty & (n_seen == 0), pat, out)
    return out.to(pattern.dtype)
