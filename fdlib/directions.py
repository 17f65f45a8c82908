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
from collections import abc
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.decoding import first_row_position, hooks
from fdlib.interventions import Head, check_from_pos, check_heads, heads_by_layer
from fdlib.models import model_name
from fdlib.store import atomic_write

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
    check_from_pos(from_pos)
    by_layer = heads_by_layer(chosen)
    queries: dict[int, Tensor] = {}

    def add_q(layer: int, idx: list[int]):
        d = (alpha * directions.d_q[layer, idx]).to(model.cfg.dtype)  # [n_chosen, d_head]

        def hook(q: Float[Tensor, "batch pos head_index d_head"], hook: Any) -> Tensor:
            start = max(0, from_pos - first_row())
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
    try:
        with first_row_position(model) as first_row, hooks(model, fwd):
            yield
    finally:
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


def _run_response(model: TransformerBridge, ids: Tensor, response_start: int) -> tuple[dict[int, Tensor], Any]:
    """Fast prefill of ids[:response_start], then the response rows through the bridge.
    Returns every layer's rotated queries of the response rows [rows, head_index, d_head] and
    the KV cache, which then holds every position's post-RoPE keys (per KV head)."""
    from fdlib.decoding import prefill

    got: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(q: Float[Tensor, "batch pos head_index d_head"], hook: Any) -> None:
            got[layer] = q[0].detach()

        return hook

    fwd = [(f"blocks.{l}.attn.hook_rot_q", keep(l)) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        prefix = prefill(model, ids[: response_start + 1])  # cache holds [0, response_start)
        with hooks(model, fwd):
            model(ids[None, response_start:].to(model.cfg.device), past_key_values=prefix.cache, return_type=None)
    return got, prefix.cache


def _kv_groups(model: TransformerBridge) -> int:
    return model.cfg.n_heads // (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def _select(
    model: TransformerBridge,
    q_layers: Sequence[Tensor],
    k_layers: Sequence[Tensor],
    chosen: Sequence[Head],
    response_start: int,
    span: Any,
    placement: Placement,
) -> HeadActivations:
    """Pick the chosen heads out of per-layer queries [rows, head, d] and keys [kv_head, T, d]
    (post-RoPE); pre-RoPE activations are those rotated back by each position's angle."""
    groups = _kv_groups(model)
    q = torch.stack([q_layers[l][:, h, :] for l, h in chosen]).float()
    k = torch.stack([k_layers[l][h // groups] for l, h in chosen]).float()
    if placement == "pre_rope":
        T = k.shape[1]
        cos, sin = _rope_cos_sin(model, T, q)
        k = _unrotate(k, cos.float(), sin.float())
        q = _unrotate(q, cos[response_start:].float(), sin[response_start:].float())
    elif placement != "post_rope":
        raise ValueError(f"placement must be 'post_rope' or 'pre_rope', got {placement!r}")
    return HeadActivations(q.contiguous(), k.contiguous(), response_start, span)


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
    response rows run through the bridge, where `hook_rot_q` gives their queries.
    """
    from fdlib.decoding import _as_ids

    ids = _as_ids(tokens)
    T = int(ids.shape[0])
    if not 0 < response_start < T:
        raise ValueError(f"response_start must be in [1, {T - 1}], got {response_start}")
    span.check(T)
    chosen = check_heads(model, heads)
    qs, cache = _run_response(model, ids, response_start)
    ks = {l: cache.layers[l].keys[0] for l in range(model.cfg.n_layers)}
    return _select(model, qs, ks, chosen, response_start, span, placement)


# --- the on-disk activation cache -----------------------------------------------------------


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


@dataclass(frozen=True)
class CachedExample:
    """Where one cached training example lives and what it holds."""

    id: str
    path: Path
    response_start: int
    span: Any  # fdlib.Span
    n_tokens: int
    answer: str


class ActivationCache:
    """Per training example, one safetensors file with every layer's post-RoPE queries of the
    response rows (`q{l}`: [rows, head_index, d_head]) and keys of every position (`k{l}`:
    [kv_head, pos, d_head]), the prompt + response tokens, and the span; written atomically, so
    an interrupted build resumes at the first missing example. Pre-RoPE activations are derived
    on reading (the rotation is exact and invertible), so they cost no disk.

    Keys are stored per KV head (grouped-query attention shares them), in `dtype` (float16 by
    default: half the disk; the score it gives matches the model's within ~1e-3).
    Layout: `root / <model> / <training_set> / <example id>.safetensors`.
    """

    def __init__(self, root: str | Path, model: TransformerBridge, training_set: TrainingSet, dtype: torch.dtype = torch.float16) -> None:
        if training_set not in ("gold", "long"):
            raise ValueError(f"training_set must be 'gold' or 'long', got {training_set!r}")
        self.model = model
        self.training_set = training_set
        self.dtype = dtype
        self.dir = Path(root) / _slug(model_name(model)) / training_set

    def path(self, example_id: str) -> Path:
        return self.dir / f"{_slug(example_id)}.safetensors"

    def __contains__(self, example_id: str) -> bool:
        return self.path(example_id).exists()

    def write(self, example_id: str, ids: Tensor, response_start: int, span: Any, answer: str,
              q_layers: dict[int, Tensor] | None, k_layers: dict[int, Tensor] | None) -> Path:
        """One example, atomically; `q_layers=None` records an example with no usable response
        (an empty R_g) so a resumed build does not retry it."""
        tensors = {"tokens": ids.to(torch.int64).cpu().contiguous()}
        if q_layers is not None and k_layers is not None:
            for l in range(self.model.cfg.n_layers):
                tensors[f"q{l}"] = q_layers[l].to(self.dtype).cpu().contiguous()
                tensors[f"k{l}"] = k_layers[l].to(self.dtype).cpu().contiguous()
        meta = {"format": "fdlib.activations/1", "model_name": model_name(self.model), "id": example_id,
                "training_set": self.training_set, "response_start": response_start,
                "span": [span.start, span.end], "answer": answer, "usable": q_layers is not None}
        path = self.path(example_id)
        # atomic: a crash leaves the old state or the new file, never half a file
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fdlib": json.dumps(meta)}))
        return path

    def example(self, example_id: str) -> CachedExample | None:
        """The cached example's metadata, None when its response was empty; raises when absent
        or written for another model."""
        from safetensors import safe_open

        from fdlib.spans import Span

        path = self.path(example_id)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["fdlib"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable fdlib activation file ({type(err).__name__}: {err})") from None
        if meta["model_name"] != model_name(self.model):
            raise ValueError(f"{path} holds activations of {meta['model_name']!r}, not {model_name(self.model)!r}")
        if not meta["usable"]:
            return None
        with safe_open(str(path), framework="pt") as f:
            n_tokens = int(f.get_slice("tokens").get_shape()[0])
        return CachedExample(example_id, path, int(meta["response_start"]), Span(*meta["span"]), n_tokens, meta["answer"])

    def read(self, example: CachedExample, heads: Sequence[Head], placement: Placement = "post_rope") -> HeadActivations:
        """The chosen heads' activations of one example (only their layers are read)."""
        from safetensors import safe_open

        chosen = check_heads(self.model, heads)
        layers = sorted({l for l, _ in chosen})
        q_layers: dict[int, Tensor] = {}
        k_layers: dict[int, Tensor] = {}
        with safe_open(str(example.path), framework="pt") as f:
            for l in layers:
                q_layers[l], k_layers[l] = f.get_tensor(f"q{l}"), f.get_tensor(f"k{l}")
        return _select(self.model, q_layers, k_layers, chosen, example.response_start, example.span, placement)

    def nbytes(self) -> int:
        """Bytes on disk of every cached example."""
        return sum(p.stat().st_size for p in self.dir.glob("*.safetensors")) if self.dir.exists() else 0


class CachedActivations(abc.Sequence):
    """A lazy sequence of `HeadActivations`: each item is read from the cache when asked for,
    so training on long prompts never holds every example in memory."""

    def __init__(self, cache: ActivationCache, examples: Sequence[CachedExample], heads: Sequence[Head], placement: Placement) -> None:
        self.cache, self.examples, self.heads, self.placement = cache, list(examples), list(heads), placement

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> HeadActivations:  # type: ignore[override]
        return self.cache.read(self.examples[i], self.heads, self.placement)


def build_activation_cache(
    model: TransformerBridge,
    cache: ActivationCache,
    *,
    split: str = "train",
    size: Any = "quick",
    n_docs: int = 20,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[CachedExample]:
    """Cache the training examples of `split`: R_g is the model's greedy answer given the gold
    document alone; the prompt is the gold-only one (`gold`, the paper's text) or the k-document
    one (`long`, the authors' release), and the relevant span is the gold document in it.
    Examples already on disk are skipped; examples with an empty R_g are recorded and left out.
    """
    from tqdm.auto import tqdm

    from fdlib.data import NQBuilder
    from fdlib.decoding import decode, prefill

    builder = NQBuilder(model.tokenizer)
    golds = builder.samples(split=split, size=size, variant="gold")
    out: list[CachedExample] = []
    bar = tqdm(golds, desc=f"caching activations ({cache.training_set})", unit="example", disable=not progress)
    for gold in bar:
        qid = gold.id.split("/")[0]
        if qid not in cache:
            answer = decode(model, prefill(model, gold.input_ids), max_new_tokens=max_new_tokens)
            if cache.training_set == "gold":
                prompt = gold
            else:
                example = next(e for e in builder.examples if e.id == qid)
                prompt = builder.sample(example, n_docs=n_docs)
            if not answer.tokens:
                cache.write(qid, prompt.input_ids, prompt.n_tokens, prompt.gold_span, "", None, None)
            else:
                ids = torch.cat([prompt.input_ids, torch.tensor(answer.tokens, dtype=torch.long)])
                qs, kv = _run_response(model, ids, prompt.n_tokens)
                ks = {l: kv.layers[l].keys[0] for l in range(model.cfg.n_layers)}
                cache.write(qid, ids, prompt.n_tokens, prompt.gold_span, answer.text, qs, ks)
        ex = cache.example(qid)
        if ex is not None:
            out.append(ex)
        bar.set_postfix(disk=f"{cache.nbytes() / 2**20:.0f} MiB")
    return out


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

        rows = slice(acts.response_start, acts.response_start + n_rows)
        q = rot(q, cos[rows], sin[rows])
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
    rope: dict[str, tuple[Tensor, Tensor]] = {}

    def rotation_for(acts: HeadActivations) -> tuple[Tensor, Tensor] | None:
        # cos/sin for every position, grown on demand (the examples have different lengths)
        if placement != "pre_rope":
            return None
        T = acts.k.shape[1]
        if "r" not in rope or rope["r"][0].shape[0] < T:
            cos, sin = _rope_cos_sin(model, T, acts.q)
            rope["r"] = (cos.float(), sin.float())
        return rope["r"]

    def score(acts: HeadActivations) -> Tensor:
        return span_score(acts, d_q, d_k, scale=scale, rotation=rotation_for(acts))

    def mean_score() -> Tensor:
        with torch.no_grad():
            return torch.stack([score(a) for a in activations]).mean(0)

    before = mean_score()
    losses = []
    bar = tqdm(total=epochs * len(activations), desc="training focus directions", unit="step", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(activations), generator=gen).tolist()
        total = 0.0
        for i in order:
            loss = -score(activations[i]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) / len(chosen)
            bar.update(1)
        losses.append(total / len(activations))
        bar.set_postfix(loss=losses[-1])
    bar.close()
    shape = (model.cfg.n_layers, model.cfg.n_heads, d)
    full_q, full_k = torch.zeros(shape), torch.zeros(shape)
    for c, (l, h) in enumerate(chosen):
        full_q[l, h], full_k[l, h] = d_q.detach()[c], d_k.detach()[c]
    settings = {"lr": lr, "epochs": epochs, "weight_decay": weight_decay, "seed": seed,
                "heads": [f"L{l}H{h}" for l, h in chosen], "n_samples": len(activations)}
    dirs = FocusDirections(full_q, full_k, model_name(model), placement, training_set, split_seed, settings)
    return TrainResult(dirs, losses, before, mean_score())


def all_heads(model: TransformerBridge) -> list[Head]:
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def train_nq_directions(
    model: TransformerBridge,
    *,
    training_set: TrainingSet = "gold",
    placement: Placement = "post_rope",
    size: Any = "quick",
    heads: Sequence[Head] | None = None,
    root: str | Path | None = None,
    n_docs: int = 20,
    progress: bool = True,
    **train_kwargs: Any,
) -> TrainResult:
    """Cache the NQ training split's activations (resumable) and train directions on them.

    `heads=None` trains every head, so random-head controls have directions of their own.
    `root` defaults to `<fdlib cache>/activations`. Extra keyword arguments go to
    `train_focus_directions` (lr, epochs, weight_decay, seed).
    """
    from fdlib.data import SPLIT_SEED
    from fdlib.models import cache_dir

    cache = ActivationCache(Path(root) if root is not None else cache_dir() / "activations", model, training_set)
    examples = build_activation_cache(model, cache, split="train", size=size, n_docs=n_docs, progress=progress)
    chosen = list(heads) if heads is not None else all_heads(model)
    acts = CachedActivations(cache, examples, chosen, placement)
    result = train_focus_directions(model, acts, chosen, placement=placement, training_set=training_set,
                                    split_seed=SPLIT_SEED, progress=progress, **train_kwargs)
    result.directions.settings.update({"size": size if isinstance(size, (int, str)) else str(size), "n_docs": n_docs,
                                       "cache_mib": round(cache.nbytes() / 2**20, 1)})
    return result


# --- analysis -------------------------------------------------------------------------------


def focus_table(
    model: TransformerBridge,
    samples: Sequence[Any],
    directions: FocusDirections,
    heads: Sequence[Head],
    alpha: float,
    *,
    report: Sequence[Head] | None = None,
    max_new_tokens: int = 32,
    level: float = 0.95,
    progress: bool = True,
) -> "pd.DataFrame":
    """The paper's Table 3: R, IR, IR-max and Sink of the `report` heads (default: `heads`)
    without and with directions on `heads` at `alpha` (response rows), per input variant of
    `samples` (QASamples: long and gold-only cases), with bootstrap CIs and EM."""
    import pandas as pd
    from tqdm.auto import tqdm

    from fdlib.decoding import decode, prefill
    from fdlib.scoring import answer_scores, head_table

    report = list(report) if report is not None else list(heads)
    runs: dict[tuple[str, str], list] = {}
    for sample in tqdm(samples, desc="focus table", disable=not progress):
        prefix = prefill(model, sample.input_ids)
        spans = sample.named_spans()
        plain = decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)
        with focus_directions(model, directions, heads, alpha, from_pos=sample.n_tokens - 1):
            steered = decode(model, prefix, max_new_tokens=max_new_tokens, spans=spans)
        runs.setdefault((sample.variant, "without"), []).append(answer_scores(model, sample, plain))
        runs.setdefault((sample.variant, f"alpha={alpha:g}"), []).append(answer_scores(model, sample, steered))
    parts = []
    for (case, condition), results in runs.items():
        t = head_table(results, report, level=level).reset_index()
        t.insert(1, "EM", sum(r.em for r in results) / len(results))
        t.insert(1, "n", len(results))
        t.insert(0, "directions", condition)
        t.insert(0, "case", case)
        parts.append(t)
    return pd.concat(parts, ignore_index=True).set_index(["case", "directions", "head"])


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
    first answer token) with the direction minus without. After RoPE this equals
    alpha * d_Q . k_j / sqrt(d_head) plus a constant that cancels in the softmax."""
    from fdlib.decoding import prefill

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


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: train one set of directions on the NQ training split and save it."""
    import argparse

    from fdlib.models import DEFAULT_MODEL, load_model
    from fdlib.scoring import contextual_study

    ap = argparse.ArgumentParser(prog="python -m fdlib.directions", description="train focus directions on NQ")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--training-set", choices=["gold", "long"], default="gold")
    ap.add_argument("--placement", choices=["post_rope", "pre_rope"], default="post_rope")
    ap.add_argument("--size", default="quick", help="'quick', 'full' or a number of training questions")
    ap.add_argument("--top", type=int, help="train only the top-N contextual heads (default: every head)")
    ap.add_argument("--heads-size", default="quick", help="size of the train-split study ranking the heads (with --top)")
    ap.add_argument("--heads-store", default="runs/contextual.sqlite")
    ap.add_argument("--cache", help="activation cache root (default: <fdlib cache>/activations)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="where to write the .safetensors file")
    args = ap.parse_args(argv)
    model = load_model(args.model)
    size = int(args.size) if args.size.isdigit() else args.size
    heads = None
    if args.top:
        hs = int(args.heads_size) if args.heads_size.isdigit() else args.heads_size
        heads = contextual_study(model, size=hs, split="train", store=args.heads_store).heads(args.top)
    result = train_nq_directions(model, training_set=args.training_set, placement=args.placement, size=size,
                                 heads=heads, root=args.cache, lr=args.lr, epochs=args.epochs, seed=args.seed)
    result.directions.save(args.out)


if __name__ == "__main__":
    main()
