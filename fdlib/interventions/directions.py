"""Focus directions: per-head query/key vectors, their file format, and the intervention.

Placement `post_rope` adds alpha * d_Q to the rotated queries (the authors' release); `pre_rope`
adds it in the space after the q/k norm and before the rotation (the space training reads), which
is exactly adding R_i d_Q after the rotation (R_i (q + d) = R_i q + R_i d). alpha * d_K is added
to the keys at every position; it enters the attention logits as `q_i . d'_j * scaling` with
d'_j = d_K (post-RoPE) or R_j d_K (pre-RoPE), per query head, before any softcap. That handles
grouped-query attention (d_K is per query head, the cache holds per-KV-head keys) and a shared KV
cache computed without directions alike. After RoPE (and without a softcap) that term is the
same for every key of row i, so it cancels in the softmax: d_K has no effect there, only d_Q
does. Under attention-logit softcapping (Gemma 2) it does not cancel and is applied before the
cap.

Training (the activation cache, `span_score`, `train_focus_directions`, the CLI) lives in
`fdlib.interventions.training`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

if TYPE_CHECKING:
    import pandas as pd

from fdlib.core.heads import Head, check_heads, heads_by_layer
from fdlib.core.store import atomic_write
from fdlib.interventions.hooks import check_from_pos
from fdlib.model import arch
from fdlib.model.decoding import first_row_position, hooks
from fdlib.model.loading import model_name

Placement = Literal["post_rope", "pre_rope"]
TrainingSet = Literal["gold", "long", "shuffled", "positions"]
TRAINING_SETS: tuple[str, ...] = ("gold", "long", "shuffled", "positions")
FORMAT = "fdlib.focus_directions/1"


@dataclass(frozen=True)
class FocusDirections:
    """d_Q and d_K for every head (zeros where untrained), plus what they were made from.

    The vectors may be of any floating dtype; they are applied as `alpha * d` computed in float32
    and added in the model's dtype (the queries' and the attention logits'), whatever dtype they
    were trained or stored in (`save` writes float32)."""

    d_q: Float[Tensor, "n_layers n_heads d_head"]
    d_k: Float[Tensor, "n_layers n_heads d_head"]
    model_name: str
    placement: Placement = "post_rope"
    training_set: TrainingSet = "gold"
    split_seed: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_q.ndim != 3 or self.d_q.shape != self.d_k.shape:
            raise ValueError(
                f"d_q and d_k must both be [n_layers, n_heads, d_head], got {tuple(self.d_q.shape)} and {tuple(self.d_k.shape)}"
            )
        if self.placement not in ("post_rope", "pre_rope"):
            raise ValueError(f"placement must be 'post_rope' or 'pre_rope', got {self.placement!r}")
        if self.training_set not in TRAINING_SETS:
            raise ValueError(f"training_set must be one of {TRAINING_SETS}, got {self.training_set!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.d_q.shape)  # type: ignore[return-value]

    @classmethod
    def zeros(cls, model: TransformerBridge, **kwargs: Any) -> "FocusDirections":
        shape = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
        return cls(torch.zeros(shape), torch.zeros(shape), model_name(model), **kwargs)

    def check(self, model: TransformerBridge) -> "FocusDirections":
        """Raise ValueError naming what differs if these directions do not fit `model`."""
        want = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
        if self.shape != want:
            raise ValueError(
                f"directions have shape {self.shape} (layers, heads, d_head) but model {model_name(model)!r} has {want}"
            )
        if self.model_name != model_name(model):
            raise ValueError(f"directions were trained on {self.model_name!r}, not on {model_name(model)!r}")
        return self

    def save(self, path: str | Path) -> Path:
        """One safetensors file (tensors + JSON metadata in its header), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT, "model_name": self.model_name, "placement": self.placement,
            "training_set": self.training_set, "split_seed": self.split_seed, "settings": self.settings,
        }
        tensors = {"d_q": self.d_q.detach().float().contiguous(), "d_k": self.d_k.detach().float().contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fdlib": json.dumps(meta)}))
        return path

    @classmethod
    def load(cls, path: str | Path, model: TransformerBridge | None = None) -> "FocusDirections":
        """Read a file written by `save`; with `model`, check it fits (name and head shape)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
            meta = json.loads(header["fdlib"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError, RuntimeError) as err:
            raise ValueError(f"{path} is not a readable fdlib focus-directions file ({type(err).__name__}: {err})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
        out = cls(
            tensors["d_q"], tensors["d_k"], meta["model_name"], meta["placement"], meta["training_set"],
            int(meta["split_seed"]), meta.get("settings", {}),
        )
        return out.check(model) if model is not None else out


def direction_norms(directions: FocusDirections, heads: Sequence[Head], *, source: str = "") -> pd.DataFrame:
    """Per head (in the order given, with its rank): |d_Q|, |d_K|, and both divided by
    sqrt(d_head), the scale that compares models of different head widths (a query's own norm
    grows like sqrt(d_head))."""
    import pandas as pd

    d = directions.shape[-1]
    rows = []
    for rank, (l, h) in enumerate(heads, 1):
        q, k = float(directions.d_q[l, h].norm()), float(directions.d_k[l, h].norm())
        rows.append({"source": source or directions.model_name, "rank": rank, "head": f"L{l}H{h}", "d_head": d,
                     "dq_norm": q, "dk_norm": k, "dq_per_sqrt_d": q / d ** 0.5, "dk_per_sqrt_d": k / d ** 0.5})
    return pd.DataFrame(rows)


class _Softcaps:
    """Moves the attention-logit softcap of the chosen layers out of the bridge, for the body.

    The bridge caps the scores before `hook_attn_scores`, where the d_K term is added; a term added
    after the cap would be wrong (tanh is not shift-invariant). Here the bridge's HF module is
    told there is no cap, and the hook adds the term and then applies the very same cap
    (`cap * tanh(s / cap)`) to every head of the layer, masked keys left masked: the scores that
    reach the softmax, and hooks added on `hook_attn_scores` after this context, are the
    bridge's own (bitwise, for heads without directions); a hook added before it would see the
    uncapped scores of these layers while it is active."""

    def __init__(self, model: TransformerBridge, layers: Sequence[int], facts: arch.ModelFacts) -> None:
        self.modules: dict[int, Any] = {}
        self.caps: dict[int, float] = {}
        for l in layers:
            cap = facts.layers[l].softcap
            if cap is None:
                continue
            hf_attn = model.blocks[l].attn.original_component
            if getattr(hf_attn, "attn_logit_softcapping", None) is None:
                raise ValueError(
                    f"model {facts.name!r}: layer {l}'s softcap is already handled by another focus_directions "
                    "context; nest them on different layers, or merge the directions into one"
                )
            self.modules[l] = hf_attn
            self.caps[l] = cap

    def __enter__(self) -> "_Softcaps":
        for m in self.modules.values():
            m.attn_logit_softcapping = None
        return self

    def __exit__(self, *exc: Any) -> None:
        for l, m in self.modules.items():
            m.attn_logit_softcapping = self.caps[l]


def _cap(scores: Tensor, bias: Tensor | None, idx: list[int], cap: float) -> Tensor:
    """The bridge's `cap * tanh(s / cap)` after adding `bias` to heads `idx`; keys the mask
    removed (an additive mask of finfo.min or -inf) stay removed."""
    masked = scores <= torch.finfo(scores.dtype).min / 2
    full = scores.clone()
    if bias is not None:
        full[:, idx] = full[:, idx] + bias.to(scores.dtype)
    capped = torch.tanh(full / cap) * cap
    return torch.where(masked, scores, capped)


@contextlib.contextmanager
def focus_directions(
    model: TransformerBridge,
    directions: FocusDirections,
    heads: Sequence[Head],
    alpha: float,
    from_pos: int = 0,
) -> Iterator[None]:
    """Add alpha * d_Q to the chosen heads' queries at positions >= `from_pos` and alpha * d_K to
    the keys (at every position) those rows attend to, in the directions' placement (before or
    after RoPE). Rows before `from_pos` are untouched: they see the plain queries and keys.

    `from_pos=0` is the paper's setting (every row: prefill the prompt with
    `prefill(..., fast=False)` so the prompt rows see it); `from_pos = len(prompt) - 1` touches the
    answer rows only and works from a shared fast prefill. Positions are absolute: they count
    the `past_key_values` handed to the bridge's forward.

    Where the vectors go depends on the architecture (`fdlib.model.arch.model_facts`): on `hook_rot_q`
    (after the q/k norm and RoPE) as d or R_i d; on a fused-QKV RoPE model (Phi-3), whose bridge
    has no rotated-query hook, on `hook_q` (before the rotation) as R_i^-1 d or d; without RoPE
    (GPT-2) both placements are the same vector on `hook_q`. Models the operation cannot be
    computed exactly on are refused (NotImplementedError) before any forward.
    """
    directions.check(model)
    chosen = check_heads(model, heads)
    alpha = float(alpha)
    check_from_pos(from_pos)
    placement = directions.placement
    facts = arch.check_supported(model, f"focus_{placement}")
    hf = model.original_model
    by_layer = heads_by_layer(chosen)
    rotary = arch.RotaryTable(hf) if facts.rope else None
    queries: dict[int, Tensor] = {}  # layer -> post-RoPE queries of its chosen heads [batch, pos, chosen, d]

    def add_q(layer: int, idx: list[int]):
        dq = alpha * directions.d_q[layer, idx].float()  # [n_chosen, d_head]
        kind = facts.query_kind

        def hook(q: Float[Tensor, "batch pos head_index d_head"], hook: Any) -> Tensor:
            n = q.shape[1]
            first = first_row()
            start = max(0, from_pos - first)
            cos = sin = None
            if rotary is not None and (kind == arch.BEFORE_ROTATION or placement == "pre_rope"):
                cos, sin = rotary(layer, first + n, q)
                cos, sin = cos[first:, None, :], sin[first:, None, :]  # [n, 1, rot]
            d = dq.to(q.device)[None].expand(n, *dq.shape)  # [n, n_chosen, d]
            if kind == arch.ROTATED and placement == "pre_rope":
                d = arch.rotate(d, cos, sin)  # R_i d after the rotation = d before it
            elif kind == arch.BEFORE_ROTATION and placement == "post_rope":
                d = arch.unrotate(d, cos, sin)  # R_i^-1 d before the rotation = d after it
            if start < n:
                q = q.clone()
                q[:, start:, idx, :] += d[start:].to(q.dtype)
            sel = q[:, :, idx, :].float()
            if kind == arch.BEFORE_ROTATION:
                sel = arch.rotate(sel, cos, sin)  # the rotation the bridge applies next
            queries[layer] = sel
            return q

        return hook

    def add_k(layer: int, idx: list[int]):
        dk = alpha * directions.d_k[layer, idx].float()  # [n_chosen, d_head]
        lf = facts.layers[layer]

        def hook(scores: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> Tensor:
            n_k = scores.shape[-1]
            q = queries.pop(layer)  # [batch, query_pos, n_chosen, d_head], post-RoPE
            start = max(0, from_pos - first_row())  # rows before from_pos see the plain keys
            bias = torch.zeros(q.shape[0], len(idx), q.shape[1], n_k, dtype=q.dtype, device=q.device)
            if start < q.shape[1]:
                if placement == "pre_rope" and rotary is not None:
                    cos, sin = rotary(layer, n_k, q)
                    keys = arch.rotate(dk.to(q.device)[:, None, :], cos[None], sin[None])  # R_j d_K: [n_chosen, n_k, d]
                else:
                    keys = dk.to(q.device)[:, None, :].expand(len(idx), n_k, dk.shape[-1])  # same d_K at every j
                bias[:, :, start:] = torch.einsum("bqcd,ckd->bcqk", q[:, start:], keys) * lf.scaling
            if lf.softcap is not None:
                return _cap(scores, bias, idx, lf.softcap)
            scores = scores.clone()
            scores[:, idx] = scores[:, idx] + bias.to(scores.dtype)
            return scores

        return hook

    fwd: list[tuple[str, Any]] = []
    for layer, idx in sorted(by_layer.items()):
        fwd.append((f"blocks.{layer}.attn.{facts.query_hook}", add_q(layer, idx)))
        fwd.append((f"blocks.{layer}.attn.hook_attn_scores", add_k(layer, idx)))
    caps = _Softcaps(model, sorted(by_layer), facts)
    try:
        with first_row_position(model) as first_row, hooks(model, fwd), caps:
            yield
    finally:
        queries.clear()


# --- analysis -------------------------------------------------------------------------------


@torch.no_grad()
def key_bias(
    model: TransformerBridge,
    sample: Any,
    directions: FocusDirections,
    head: Head,
    alpha: float,
) -> Float[Tensor, "pos"]:
    """What the head's direction adds to each prompt token's attention logit, read from the
    model: the head's pre-softmax scores of the last prompt row (the row that produces the
    first answer token) with the direction minus without. After RoPE (and without a softcap) this
    equals alpha * d_Q . k_j * scaling plus a constant that cancels in the softmax; under a
    softcap it is the difference of the capped scores."""
    from fdlib.model.decoding import prefill

    (layer, h), = check_heads(model, [head])
    directions.check(model)
    prefix = prefill(model, sample.input_ids)
    rows: list[Tensor] = []

    def keep(scores: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> None:
        rows.append(scores[0, h, -1].detach().float().clone())

    last = prefix.tokens[-1:][None]
    point = [(f"blocks.{layer}.attn.hook_attn_scores", keep)]
    for steer in (False, True):
        ctx = focus_directions(model, directions, [head], alpha, from_pos=prefix.length - 1) if steer else contextlib.nullcontext()
        with ctx, hooks(model, point):
            model(last, past_key_values=prefix.cache, return_type=None)
        prefix.cache.crop(-1)  # back to the prompt, for the second pass
    return rows[1] - rows[0]
