"""Focus directions: per-head query/key vectors, their file format, and the intervention.

Placement `post_rope` adds alpha * d_Q to the rotated queries (the authors' release); `pre_rope`
adds it before the rotation. alpha * d_K is added to the keys at every position; it enters the
attention logits as `q_i . d'_j * scale` with d'_j = d_K (post-RoPE) or R_j d_K (pre-RoPE), applied
on `hook_attn_scores` per query head. That handles grouped-query attention (d_K is per query
head, the cache holds per-KV-head keys) and a shared KV cache computed without directions alike.
After RoPE that term is the same for every key of row i, so it cancels in the softmax: d_K has no
effect there, only d_Q does.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.decoding import hooks
from fdlib.interventions import Head, check_heads
from fdlib.models import model_name

Placement = Literal["post_rope", "pre_rope"]
TrainingSet = Literal["gold", "long"]
FORMAT = "fdlib.focus_directions/1"


@dataclass(frozen=True)
class FocusDirections:
    """d_Q and d_K for every head (zeros where untrained), plus what they were made from."""

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
        if self.training_set not in ("gold", "long"):
            raise ValueError(f"training_set must be 'gold' or 'long', got {self.training_set!r}")

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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(
                {"d_q": self.d_q.detach().float().contiguous(), "d_k": self.d_k.detach().float().contiguous()},
                tmp, metadata={"fdlib": json.dumps(meta)},
            )
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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


def _rope_cos_sin(model: TransformerBridge, n_pos: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin of the model's own rotary embedding at positions 0..n_pos-1: [n_pos, d_head]."""
    rotary = model.original_model.model.rotary_emb
    pos = torch.arange(n_pos, device=like.device)[None]
    cos, sin = rotary(like, pos)
    return cos[0], sin[0]


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The Llama-style rotation of x [d] at every position: [n_pos, d]."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[half:], x[:half]])
    return x[None] * cos + rotated_half[None] * sin


@contextlib.contextmanager
def focus_directions(
    model: TransformerBridge,
    directions: FocusDirections,
    heads: Sequence[Head],
    alpha: float,
    from_pos: int = 0,
) -> Iterator[None]:
    """Add alpha * d_Q to the chosen heads' queries at positions >= `from_pos` and alpha * d_K to
    their keys at every position, in the directions' placement (before or after RoPE).

    `from_pos=0` is the paper's setting (every row: prefill the prompt with
    `prefill(..., fast=False)` so the prompt rows see it); `from_pos = len(prompt) - 1` touches the
    answer rows only and works from a shared fast prefill. Positions are absolute: they count
    the `past_key_values` handed to the bridge's forward.
    """
    directions.check(model)
    chosen = check_heads(model, heads)
    alpha = float(alpha)
    if isinstance(from_pos, bool) or not isinstance(from_pos, int) or from_pos < 0:
        raise ValueError(f"from_pos must be an int >= 0, got {from_pos!r}")
    by_layer: dict[int, list[int]] = {}
    for layer, head in chosen:
        by_layer.setdefault(layer, []).append(head)
    offset = {"pos": 0}
    queries: dict[int, Tensor] = {}

    def record_offset(module: Any, args: Any, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        offset["pos"] = int(cache.get_seq_length()) if cache is not None else 0

    def add_q(layer: int, idx: list[int]):
        d = (alpha * directions.d_q[layer, idx]).to(model.cfg.dtype)  # [n_chosen, d_head]

        def hook(q: Float[Tensor, "batch pos head_index d_head"], hook: Any) -> Tensor:
            start = max(0, from_pos - offset["pos"])
            if start < q.shape[1]:
                q = q.clone()
                q[:, start:, idx, :] += d.to(q.device)
            if directions.placement == "post_rope":
                queries[layer] = q
            return q

        return hook

    def keep_rotated_q(layer: int):
        def hook(q: Tensor, hook: Any) -> None:
            queries[layer] = q  # the queries d_K meets: rotated, with d_Q already in them

        return hook

    def add_k(layer: int, idx: list[int]):
        dk = alpha * directions.d_k[layer, idx].float()  # [n_chosen, d_head]
        scale = float(getattr(model.original_model.model.layers[layer].self_attn, "scaling", model.cfg.d_head ** -0.5))

        def hook(scores: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> Tensor:
            n_k = scores.shape[-1]
            q = queries.pop(layer)[:, :, idx, :].float()  # [batch, query_pos, n_chosen, d_head]
            if directions.placement == "pre_rope":
                cos, sin = _rope_cos_sin(model, n_k, q)
                keys = torch.stack([_rotate(dk[c].to(q.device), cos.float(), sin.float()) for c in range(len(idx))])
            else:
                keys = dk.to(q.device)[:, None, :].expand(len(idx), n_k, dk.shape[-1])  # same d_K at every j
            bias = torch.einsum("bqcd,ckd->bcqk", q, keys) * scale
            scores = scores.clone()
            scores[:, idx] = scores[:, idx] + bias.to(scores.dtype)
            return scores

        return hook

    q_point = "hook_rot_q" if directions.placement == "post_rope" else "hook_q"
    fwd: list[tuple[str, Any]] = []
    for layer, idx in sorted(by_layer.items()):
        fwd.append((f"blocks.{layer}.attn.{q_point}", add_q(layer, idx)))
        if directions.placement == "pre_rope":
            fwd.append((f"blocks.{layer}.attn.hook_rot_q", keep_rotated_q(layer)))
        fwd.append((f"blocks.{layer}.attn.hook_attn_scores", add_k(layer, idx)))
    handle = model.register_forward_pre_hook(record_offset, with_kwargs=True)
    try:
        with hooks(model, fwd):
            yield
    finally:
        handle.remove()
        queries.clear()


# --- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadActivations:
    """What the training loss needs from one sample, for the chosen heads only: the queries of
    the response rows and the keys of every position, in the placement's space (never a T x T
    pattern). Keys are per chosen query head (its KV head's keys)."""

    q: Float[Tensor, "n_chosen rows d_head"]
    k: Float[Tensor, "n_chosen pos d_head"]
    response_start: int
    span: Any  # fdlib.Span of the relevant document

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.k.numel() * self.k.element_size()


def _unrotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Inverse of the Llama rotation (rotation by minus the angle), x: [..., pos, d]."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos - rotated_half * sin


def collect_activations(
    model: TransformerBridge,
    tokens: Tensor,
    response_start: int,
    span: Any,
    heads: Sequence[Head],
    placement: Placement = "post_rope",
) -> HeadActivations:
    """Queries of rows [response_start, T) and keys of [0, T) for the chosen heads.

    The prompt's keys come from the fast prefill's KV cache (post-RoPE, per KV head); only the
    response rows run through the bridge, where `hook_rot_q` / `hook_rot_k` give the rest.
    Pre-RoPE activations are the post-RoPE ones rotated back by each position's angle.
    """
    from fdlib.decoding import _as_ids, prefill

    ids = _as_ids(tokens)
    T = int(ids.shape[0])
    if not 0 < response_start < T:
        raise ValueError(f"response_start must be in [1, {T - 1}], got {response_start}")
    span.check(T)
    chosen = check_heads(model, heads)
    groups = model.cfg.n_heads // (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    layers = sorted({l for l, _ in chosen})
    got: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(x: Tensor, hook: Any) -> None:
            got[name] = x[0].detach()  # [pos, head, d_head]

        return hook

    fwd = [(f"blocks.{l}.attn.hook_rot_q", keep(f"q{l}")) for l in layers]
    with torch.no_grad():
        prefix = prefill(model, ids[: response_start + 1])
        with hooks(model, fwd):
            model(ids[None, response_start:], past_key_values=prefix.cache, return_type=None)
    qs, ks = [], []
    for l, h in chosen:
        qs.append(got[f"q{l}"][:, h, :])  # [rows, d]
        ks.append(prefix.cache.layers[l].keys[0, h // groups])  # [T, d], prompt + response
    q, k = torch.stack(qs).float(), torch.stack(ks).float()
    if placement == "pre_rope":
        cos, sin = _rope_cos_sin(model, T, q)
        k = _unrotate(k, cos.float(), sin.float())
        q = _unrotate(q, cos[response_start:].float(), sin[response_start:].float())
    elif placement != "post_rope":
        raise ValueError(f"placement must be 'post_rope' or 'pre_rope', got {placement!r}")
    return HeadActivations(q.clone(), k.clone(), response_start, span)


def span_score(
    acts: HeadActivations,
    d_q: Tensor,
    d_k: Tensor,
    *,
    scale: float,
    rotation: tuple[Tensor, Tensor] | None = None,
) -> Float[Tensor, "n_chosen"]:
    """S_C per chosen head under softmax((Q + d_Q)(K + d_K)^T * scale), response rows only.
    With `rotation` (cos, sin for every position), Q, K and the directions are pre-RoPE and
    rotated here, so d_K meets each key at its own angle."""
    q = acts.q + d_q[:, None, :]
    k = acts.k + d_k[:, None, :]
    n_rows, T = q.shape[1], k.shape[1]
    if rotation is not None:
        cos, sin = rotation
        half = q.shape[-1] // 2

        def rot(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
            return x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s

        q = rot(q, cos[acts.response_start :], sin[acts.response_start :])
        k = rot(k, cos[:T], sin[:T])
    scores = torch.einsum("hrd,htd->hrt", q, k) * scale
    rows = torch.arange(acts.response_start, acts.response_start + n_rows, device=q.device)
    causal = torch.arange(T, device=q.device)[None, :] <= rows[:, None]
    w = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    return w[..., acts.span.start : acts.span.end].sum(-1).mean(-1)


@dataclass
class TrainResult:
    directions: FocusDirections
    losses: list[float]  # mean loss per epoch
    score_before: Float[Tensor, "n_chosen"]
    score_after: Float[Tensor, "n_chosen"]


def train_focus_directions(
    model: TransformerBridge,
    activations: Sequence[HeadActivations],
    heads: Sequence[Head],
    *,
    placement: Placement = "post_rope",
    training_set: TrainingSet = "gold",
    lr: float = 1e-3,
    epochs: int = 10,
    weight_decay: float = 0.01,
    seed: int = 0,
    split_seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Per head, d_Q and d_K maximising S_C (loss -S_C), AdamW, one step per sample, samples in
    a seeded order each epoch (the paper's settings as defaults)."""
    from tqdm.auto import tqdm

    chosen = check_heads(model, heads)
    if not activations:
        raise ValueError("no training activations")
    d = model.cfg.d_head
    gen = torch.Generator().manual_seed(seed)
    d_q = torch.zeros(len(chosen), d, requires_grad=True)
    d_k = torch.zeros(len(chosen), d, requires_grad=True)
    opt = torch.optim.AdamW([d_q, d_k], lr=lr, weight_decay=weight_decay)
    scale = model.cfg.d_head ** -0.5
    T_max = max(a.k.shape[1] for a in activations)
    rotation = None
    if placement == "pre_rope":
        cos, sin = _rope_cos_sin(model, T_max, activations[0].q)
        rotation = (cos.float(), sin.float())

    def mean_score() -> Tensor:
        with torch.no_grad():
            return torch.stack([span_score(a, d_q, d_k, scale=scale, rotation=rotation) for a in activations]).mean(0)

    before = mean_score()
    losses = []
    bar = tqdm(range(epochs), desc="training focus directions", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(activations), generator=gen).tolist()
        total = 0.0
        for i in order:
            loss = -span_score(activations[i], d_q, d_k, scale=scale, rotation=rotation).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) / len(chosen)
        losses.append(total / len(activations))
        bar.set_postfix(loss=losses[-1])
    shape = (model.cfg.n_layers, model.cfg.n_heads, d)
    full_q, full_k = torch.zeros(shape), torch.zeros(shape)
    for c, (l, h) in enumerate(chosen):
        full_q[l, h], full_k[l, h] = d_q.detach()[c], d_k.detach()[c]
    settings = {"lr": lr, "epochs": epochs, "weight_decay": weight_decay, "seed": seed,
                "heads": [f"L{l}H{h}" for l, h in chosen], "n_samples": len(activations)}
    dirs = FocusDirections(full_q, full_k, model_name(model), placement, training_set, split_seed, settings)
    return TrainResult(dirs, losses, before, mean_score())
