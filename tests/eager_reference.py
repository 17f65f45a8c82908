"""An eager reference for fdlib's operations, written apart from fdlib's code.

It runs the plain Hugging Face model (full forward, no cache, no TransformerLens) with its
attention function replaced by the one below, which recomputes each layer's attention by hand in
float64 from the queries / keys / values Hugging Face hands it (post q/k-norm, post-RoPE) and the
rotation the layer was given (`position_embeddings`, captured by a pre-hook on the attention
module, so Gemma 3's local / global angles come for free):

    scores = q_h . k_h * scaling  [/ (layer + 1) for GPT-2's inverse-layer scaling]
    scores = cap * tanh(scores / cap)          (attention-logit softcapping, Gemma 2)
    mask:   key j visible from row i iff j <= i and (no window or i - j < window)
    W = softmax(scores);  out = W v

Edits, each on chosen (layer, head) pairs:
- `Focus`: for rows i >= from_pos, the head's scores are (q_i + alpha d_Q) . (k_j + alpha d_K)
  at every key j (rows before from_pos keep the plain scores), before any softcap; `post_rope` adds the
  vectors to the rotated query / key, `pre_rope` adds R_i d (the rotation of row i, the same
  angles the layer applies) - i.e. the vectors live after the q/k norm, before the rotation.
- `Split`: span reweighting: the span's share pi of row i becomes t = pi**tau (split-softmax;
  `kind="odds"`: pi / (pi + a (1 - pi)); `kind="boost"`: m pi / (m pi + 1 - pi)), the inside scaled
  by t / pi, the outside by (1 - t) / (1 - pi), for rows >= from_pos; split with tau = 0 and pi = 0
  puts the row's mass uniformly on the span positions it can see (unchanged if none).
- `Ablate`: the head's output (W v, before the output projection) zeroed at rows >= from_pos.

A model in a lower precision than float32 (bfloat16 weights) is computed as transformers' eager
attention computes it: every step above in float64, its result rounded to the model's dtype
where eager attention holds it in that dtype (the logits after the scaling, the focus edit and
the softcap; the pattern after the float32 softmax and after the span edit); the softmax itself
in float32. In float32 nothing is rounded: the float64 reference.

`run(hf, ids, ...)` returns the logits `[T, vocab]` and every layer's pattern `[heads, T, T]`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import AttentionInterface

NAME = "fdlib_eager_reference"


@dataclass
class Focus:
    d_q: torch.Tensor  # [n_layers, n_heads, d_head]
    d_k: torch.Tensor
    heads: Sequence[tuple[int, int]]
    alpha: float
    placement: str = "post_rope"
    from_pos: int = 0


@dataclass
class Split:
    heads: Sequence[tuple[int, int]]
    span: tuple[int, int]  # [start, end)
    tau: float  # the map's parameter: tau (split), a (odds) or m (boost)
    from_pos: int = 0
    kind: str = "split"  # split: pi -> pi**tau; odds: pi / (pi + a (1 - pi)); boost: m pi / (m pi + 1 - pi)

    def target(self, pi: float) -> float:
        v = self.tau
        if self.kind == "split":
            return pi**v
        if self.kind == "odds":
            return pi / (pi + v * (1 - pi))
        if self.kind == "boost":
            return v * pi / (v * pi + 1 - pi)
        raise ValueError(self.kind)


@dataclass
class Ablate:
    heads: Sequence[tuple[int, int]]
    from_pos: int = 0


@dataclass
class Result:
    logits: torch.Tensor  # [T, vocab]
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [heads, T, T] float64

    def span_scores(self, span: tuple[int, int], from_pos: int) -> torch.Tensor:
        """[n_layers, n_heads]: mean over rows >= from_pos of the attention mass on span."""
        layers = sorted(self.patterns)
        return torch.stack([self.patterns[l][:, from_pos:, span[0] : span[1]].sum(-1).mean(-1) for l in layers])


def _rot_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def _rotate(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """v [d] rotated at every position: [T, d]; cos / sin [T, r] rotate the first r features."""
    r = cos.shape[-1]
    head = v[None, :r] * cos + _rot_half(v[:r])[None] * sin
    return torch.cat([head, v[None, r:].expand(cos.shape[0], -1)], dim=-1)


def _heads_at(heads: Sequence[tuple[int, int]], layer: int) -> list[int]:
    return [h for l, h in heads if l == layer]


class _State:
    def __init__(self, focus: Focus | None, split: Split | None, ablate: Ablate | None) -> None:
        self.focus, self.split, self.ablate = focus, split, ablate
        self.rotation: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.patterns: dict[int, torch.Tensor] = {}


_STATE: list[_State] = []


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    st = _STATE[-1]
    layer = int(module.layer_idx)
    b, H, T, d = query.shape
    assert b == 1 and key.shape[-2] == T, "the reference runs full forwards of one sequence only"
    groups = H // key.shape[1]
    low = query.dtype != torch.float32

    def held(x: torch.Tensor) -> torch.Tensor:
        """x as eager attention holds it: rounded to the model's dtype when that is below float32."""
        return x.to(query.dtype).double() if low else x

    q = query.double().clone()
    k = key.double().repeat_interleave(groups, dim=1)  # per query head from here on
    v = value.double().repeat_interleave(groups, dim=1)
    rows = torch.arange(T)

    if scaling is None:
        scaling = getattr(module, "scaling", d**-0.5)
    scores = held((q @ k.transpose(-1, -2)) * scaling)
    f = st.focus
    if f is not None:  # rows >= from_pos: (q_i + d_Q) . (k_j + d_K); earlier rows untouched
        rope = getattr(module.config, "rope_parameters", None) is not None and not hasattr(module, "c_attn")
        if rope and layer not in st.rotation:
            raise RuntimeError(f"layer {layer}: the rotation was not captured")
        for h in _heads_at(f.heads, layer):
            dq, dk = f.alpha * f.d_q[layer, h].double(), f.alpha * f.d_k[layer, h].double()
            if f.placement == "pre_rope" and rope:
                cos, sin = st.rotation[layer]
                dq_rows, dk_rows = _rotate(dq, cos, sin), _rotate(dk, cos, sin)
            else:  # post-RoPE, or a model without rotation (pre = post)
                dq_rows, dk_rows = dq[None].expand(T, d), dk[None].expand(T, d)
            keep = rows >= f.from_pos
            qf, kf = q[0, h, keep] + dq_rows[keep], k[0, h] + dk_rows
            scores[0, h, keep] = held((qf @ kf.T) * scaling)
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scores = scores / float(layer + 1)
    cap = kwargs.get("softcap") or getattr(module, "attn_logit_softcapping", None)
    if cap:
        scores = held(cap * torch.tanh(scores / cap))
    window = kwargs.get("sliding_window")
    cols = torch.arange(T)
    visible = cols[None, :] <= rows[:, None]
    if window:
        visible &= (rows[:, None] - cols[None, :]) < window
    masked = scores.masked_fill(~visible, float("-inf"))
    w = held(torch.softmax(masked.float(), dim=-1).double()) if low else torch.softmax(masked, dim=-1)

    s = st.split
    if s is not None:
        a, e = s.span
        for h in _heads_at(s.heads, layer):
            for i in range(s.from_pos, T):
                row = w[0, h, i]
                pi = float(row[a:e].sum())
                if 0 < pi < 1:
                    inside = torch.zeros(T, dtype=torch.bool)
                    inside[a:e] = True
                    new = row.clone()
                    new[inside] *= s.target(pi) / pi
                    new[~inside] *= (1 - s.target(pi)) / (1 - pi)
                    w[0, h, i] = new
                elif pi == 0 and s.tau == 0:
                    seen = visible[i].clone()
                    seen[:a] = False
                    seen[e:] = False
                    if seen.any():
                        w[0, h, i] = seen.double() / seen.sum()

    w = held(w)
    st.patterns[layer] = w[0].clone()
    out = w @ v  # [1, H, T, d]
    ab = st.ablate
    if ab is not None:
        for h in _heads_at(ab.heads, layer):
            out[0, h, ab.from_pos :] = 0.0
    return out.to(query.dtype).transpose(1, 2).contiguous(), w.to(query.dtype)


AttentionInterface.register(NAME, _attention)


def _attention_modules(hf: Any) -> list[torch.nn.Module]:
    return [m for m in hf.modules() if hasattr(m, "layer_idx") and any(p in type(m).__name__ for p in ("Attention",))]


@contextlib.contextmanager
def _installed(hf: Any, state: _State):
    def capture(module, args, kwargs):
        pe = kwargs.get("position_embeddings")
        if pe is None:
            pe = next((a for a in args[1:] if isinstance(a, tuple) and len(a) == 2), None)
        if pe is not None:
            cos, sin = pe
            state.rotation[int(module.layer_idx)] = (cos[0].double(), sin[0].double())

    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in _attention_modules(hf)]
    before = hf.config._attn_implementation
    _STATE.append(state)
    hf.set_attn_implementation(NAME)
    try:
        yield
    finally:
        hf.set_attn_implementation(before)
        _STATE.pop()
        for h in handles:
            h.remove()


@torch.no_grad()
def run(hf: Any, ids: torch.Tensor, *, focus: Focus | None = None, split: Split | None = None,
        ablate: Ablate | None = None) -> Result:
    """Logits and patterns of one full forward of `ids` (1-D) under the given edits."""
    state = _State(focus, split, ablate)
    with _installed(hf, state):
        logits = hf(torch.as_tensor(ids)[None]).logits[0]
    return Result(logits, state.patterns)


def greedy(hf: Any, prompt: torch.Tensor, n: int, **edits: Any) -> list[int]:
    """n greedy tokens by full forwards (no cache), under the same edits at every step."""
    ids = torch.as_tensor(prompt).clone()
    out = []
    for _ in range(n):
        tok = int(run(hf, ids, **edits).logits[-1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([tok])])
    return out
