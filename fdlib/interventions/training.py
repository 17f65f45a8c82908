"""Training focus directions: the activations the loss reads, their on-disk cache, the loss
(`span_score`) and the optimiser loop, and the command line `python -m fdlib train`.

The loss is -S_C, the attention the chosen heads' response rows give the relevant span, or, with
`loss="contrast"`, -(S_C - S_IRmax): the relevant span's share minus that of the irrelevant
document drawing the most, so a direction cannot win by raising every document (or the start of
the prompt) alike. Both are computed from cached queries and keys exactly as the model computes
its attention (`attention_rows`): the layer's own scaling (`query_pre_attn_scalar`, ...),
attention-logit softcapping (Gemma 2) and sliding window (Mistral, Gemma 2/3), per chosen head
(`span_score_settings`). Pre-RoPE activations live after
the q/k norm and before the rotation, the space `fdlib.interventions.directions.focus_directions` adds
pre-RoPE directions in; each layer's own rotation (Gemma 3: local and global bases) maps them.
"""

from __future__ import annotations

import json
from collections import abc
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head, check_heads
from fdlib.core.metrics import question_id
from fdlib.core.store import atomic_write
from fdlib.interventions.directions import TRAINING_SETS, FocusDirections, Placement, TrainingSet
from fdlib.model import arch
from fdlib.model.decoding import Prefix, hooks
from fdlib.model.loading import dtype_name, model_dtype, model_name

Loss = Literal["relevant", "contrast"]
LOSSES: tuple[str, ...] = ("relevant", "contrast")


def _check_placement(placement: str) -> None:
    if placement not in ("post_rope", "pre_rope"):
        raise ValueError(f"placement must be 'post_rope' or 'pre_rope', got {placement!r}")


def check_trainable(model: TransformerBridge, placement: str) -> arch.ModelFacts:
    """Refuse (NotImplementedError, before any forward) a model whose training activations or
    score in `placement` cannot be computed exactly."""
    _check_placement(placement)
    facts = arch.check_supported(model, "train")
    if placement == "pre_rope":
        arch.check_supported(model, "focus_pre_rope")
    return facts


def _rope_cos_sin(model: TransformerBridge, n_pos: int, like: Tensor, layer: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin of `layer`'s rotation at positions 0..n_pos-1: [n_pos, rot_dim] (identity, i.e.
    cos 1 and sin 0, for a model without RoPE)."""
    got = arch.rope_cos_sin(model.original_model, layer, torch.arange(n_pos), like)
    if got is None:
        ones = torch.ones(n_pos, model.cfg.d_head, dtype=like.dtype, device=like.device)
        return ones, torch.zeros_like(ones)
    return got


@dataclass(frozen=True)
class HeadActivations:
    """What the training loss needs from one sample, for the chosen heads only: the queries of
    the response rows and the keys of every position, in the placement's space (never a T x T
    pattern). Keys are per chosen query head (its KV head's keys)."""

    q: Float[Tensor, "n_chosen rows d_head"]
    k: Float[Tensor, "n_chosen pos d_head"]
    response_start: int
    span: Any  # fdlib.Span of the relevant document
    others: tuple[Any, ...] = ()  # fdlib.Spans of the irrelevant documents (the contrastive loss's)

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.k.numel() * self.k.element_size()

    def to(self, device: Any) -> HeadActivations:
        if self.q.device == torch.device(device):
            return self
        return replace(self, q=self.q.to(device), k=self.k.to(device))


def _run_response(model: TransformerBridge, ids: Tensor, response_start: int,
                  reuse: Any = None) -> tuple[dict[int, Tensor], Any]:
    """Fast prefill of ids[:response_start] (continuing `reuse`, a `Prefix` of an earlier call,
    from the longest common prefix), then the response rows through the bridge. Returns every
    layer's post-RoPE queries of the response rows [rows, head_index, d_head] and a `Prefix` of
    `ids` whose cache holds every position's post-RoPE keys (per KV head; every position, also
    on sliding-window layers)."""
    from fdlib.model.decoding import prefill

    facts = arch.check_supported(model, "train")
    rotary = arch.RotaryTable(model.original_model) if facts.query_kind == arch.BEFORE_ROTATION else None
    got: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(q: Float[Tensor, "batch pos head_index d_head"], hook: Any) -> None:
            q = q[0].detach()
            if rotary is not None:  # fused-QKV RoPE model: the hook is before the rotation
                cos, sin = rotary(layer, response_start + q.shape[0], q)
                q = arch.rotate(q.float(), cos[response_start:, None, :], sin[response_start:, None, :]).to(q.dtype)
            got[layer] = q

        return hook

    fwd = [(f"blocks.{l}.attn.{facts.query_hook}", keep(l)) for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        prefix = prefill(model, ids[: response_start + 1], reuse=reuse)  # cache holds [0, response_start)
        with hooks(model, fwd):
            model(ids[None, response_start:].to(model.cfg.device), past_key_values=prefix.cache, return_type=None)
    return got, Prefix(prefix.cache, ids)


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
    others: Sequence[Any] = (),
) -> HeadActivations:
    """Pick the chosen heads out of per-layer queries [rows, head, d] and keys [kv_head, T, d]
    (post-RoPE), in `placement`'s space."""
    groups = _kv_groups(model)
    q = torch.stack([q_layers[l][:, h, :] for l, h in chosen]).float()
    k = torch.stack([k_layers[l][h // groups] for l, h in chosen]).float()
    return _in_placement(model, q, k, chosen, response_start, span, placement, others)


def _in_placement(
    model: TransformerBridge,
    q: Float[Tensor, "n_chosen rows d_head"],
    k: Float[Tensor, "n_chosen pos d_head"],
    chosen: Sequence[Head],
    response_start: int,
    span: Any,
    placement: Placement,
    others: Sequence[Any] = (),
) -> HeadActivations:
    """Post-RoPE activations of the chosen heads as `HeadActivations` in `placement`'s space:
    pre-RoPE ones are rotated back by each position's angle (each head by its own layer's
    rotation: Gemma 3 has local and global bases)."""
    _check_placement(placement)
    if placement == "pre_rope" and arch.rotary_module(model.original_model) is not None:
        rotary = arch.RotaryTable(model.original_model)
        T = k.shape[1]
        for c, (l, _) in enumerate(chosen):
            cos, sin = rotary(l, T, k)
            k[c] = arch.unrotate(k[c], cos, sin)
            q[c] = arch.unrotate(q[c], cos[response_start:], sin[response_start:])
    return HeadActivations(q.contiguous(), k.contiguous(), response_start, span, tuple(others))


def collect_activations(
    model: TransformerBridge,
    tokens: Tensor,
    response_start: int,
    span: Any,
    heads: Sequence[Head],
    placement: Placement = "post_rope",
    others: Sequence[Any] = (),
) -> HeadActivations:
    """Queries of rows [response_start, T) and keys of [0, T) for the chosen heads; `others`
    are the irrelevant documents' spans (for the contrastive loss).

    The prompt's keys come from the fast prefill's KV cache (post-RoPE, per KV head); only the
    response rows run through the bridge, where the query hook (`arch.model_facts(model).query_hook`)
    gives their queries.
    """
    from fdlib.model.decoding import _as_ids

    ids = _as_ids(tokens)
    T = int(ids.shape[0])
    if not 0 < response_start < T:
        raise ValueError(f"response_start must be in [1, {T - 1}], got {response_start}")
    for s in (span, *others):
        s.check(T)
    chosen = check_heads(model, heads)
    check_trainable(model, placement)
    qs, done = _run_response(model, ids, response_start)
    ks = {l: done.cache.layers[l].keys[0] for l in range(model.cfg.n_layers)}
    return _select(model, qs, ks, chosen, response_start, span, placement, others)


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
    others: tuple[Any, ...] = ()  # fdlib.Spans of the irrelevant documents
    gold_position: int | None = None  # 1-based, in a k-document prompt


def _head_key(kind: str, layer: int, index: int) -> str:
    """Tensor name of one head's queries (`q.L{l}H{h}`) or one KV head's keys (`k.L{l}G{g}`)."""
    return f"q.L{layer}H{index}" if kind == "q" else f"k.L{layer}G{index}"


class ActivationCache:
    """Per training example, one safetensors file with the post-RoPE queries of the response
    rows and the keys of every position, the prompt + response tokens, and the spans; written
    atomically, so an interrupted build resumes at the first missing example. Pre-RoPE
    activations are derived on reading (the rotation is exact and invertible), so they cost no
    disk.

    With `heads`, only what the loss of those heads reads is kept: each head's queries
    (`q.L{l}H{h}`: [rows, d_head]) and each of their KV heads' keys once (`k.L{l}G{g}`:
    [pos, d_head]); without, every layer's (`q{l}`: [rows, head_index, d_head], `k{l}`:
    [kv_head, pos, d_head]). Stored in `dtype` (float16 by default: half the disk; the score it
    gives matches the model's within ~1e-3).
    Layout: `root / <model>[ / <model dtype>] / <training_set>[-t<answer tokens>] / <example id>.safetensors`,
    the model's dtype named unless float32 (the activations a bfloat16 model makes are its own)
    and the answer budget named unless 32 tokens.
    """

    def __init__(self, root: str | Path, model: TransformerBridge, training_set: TrainingSet,
                 dtype: torch.dtype = torch.float16, *, heads: Sequence[Head] | None = None,
                 max_new_tokens: int = 32) -> None:
        if training_set not in TRAINING_SETS:
            raise ValueError(f"training_set must be one of {TRAINING_SETS}, got {training_set!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model = model
        self.training_set = training_set
        self.dtype = dtype
        self.heads = None if heads is None else check_heads(model, heads)
        self.max_new_tokens = max_new_tokens
        made_in = dtype_name(model_dtype(model))
        folder = training_set if max_new_tokens == 32 else f"{training_set}-t{max_new_tokens}"
        self.dir = Path(root) / _slug(model_name(model)) / ("" if made_in == "float32" else made_in) / folder

    def path(self, example_id: str) -> Path:
        return self.dir / f"{_slug(example_id)}.safetensors"

    def __contains__(self, example_id: str) -> bool:
        """Whether the example is on disk with every head this cache keeps."""
        if not self.path(example_id).exists():
            return False
        if self.heads is None:
            return True
        held = self._meta(self.path(example_id)).get("heads")
        return held is None or {tuple(h) for h in held} >= set(self.heads)

    def write(self, example_id: str, ids: Tensor, response_start: int, span: Any, answer: str,
              q_layers: dict[int, Tensor] | None, k_layers: dict[int, Tensor] | None,
              others: Sequence[Any] = (), gold_position: int | None = None) -> Path:
        """One example, atomically; `q_layers=None` records an example with no usable response
        (an empty R_g) so a resumed build does not retry it. `q_layers` / `k_layers`: per layer,
        queries [rows, head_index, d_head] and keys [kv_head, pos, d_head] (post-RoPE);
        `others`: the irrelevant documents' spans."""
        tensors = {"tokens": ids.to(torch.int64).cpu().contiguous()}
        if q_layers is not None and k_layers is not None:
            if self.heads is None:
                for l in range(self.model.cfg.n_layers):
                    tensors[f"q{l}"] = q_layers[l].to(self.dtype).cpu().contiguous()
                    tensors[f"k{l}"] = k_layers[l].to(self.dtype).cpu().contiguous()
            else:
                groups = _kv_groups(self.model)
                for l, h in self.heads:
                    tensors[_head_key("q", l, h)] = q_layers[l][:, h].to(self.dtype).cpu().contiguous()
                    tensors[_head_key("k", l, h // groups)] = k_layers[l][h // groups].to(self.dtype).cpu().contiguous()
        meta = {"format": "fdlib.activations/1", "model_name": model_name(self.model), "id": example_id,
                "training_set": self.training_set, "response_start": response_start,
                "span": [span.start, span.end], "others": [[o.start, o.end] for o in others],
                "answer": answer, "usable": q_layers is not None, "max_new_tokens": self.max_new_tokens,
                "gold_position": gold_position,
                "heads": None if self.heads is None else [list(h) for h in self.heads]}
        path = self.path(example_id)
        # atomic: a crash leaves the old state or the new file, never half a file
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"fdlib": json.dumps(meta)}))
        return path

    def _meta(self, path: Path) -> dict[str, Any]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["fdlib"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not a readable fdlib activation file ({type(err).__name__}: {err})") from None
        if meta["model_name"] != model_name(self.model):
            raise ValueError(f"{path} holds activations of {meta['model_name']!r}, not {model_name(self.model)!r}")
        return meta

    def example(self, example_id: str) -> CachedExample | None:
        """The cached example's metadata, None when its response was empty; raises when absent
        or written for another model."""
        from safetensors import safe_open

        from fdlib.core.spans import Span

        path = self.path(example_id)
        meta = self._meta(path)
        if not meta["usable"]:
            return None
        with safe_open(str(path), framework="pt") as f:
            n_tokens = int(f.get_slice("tokens").get_shape()[0])
        # files written before the irrelevant spans were kept have none: the contrastive loss refuses them
        others = tuple(Span(*o) for o in meta.get("others", []))
        return CachedExample(example_id, path, int(meta["response_start"]), Span(*meta["span"]), n_tokens,
                             meta["answer"], others, meta.get("gold_position"))

    def read(self, example: CachedExample, heads: Sequence[Head], placement: Placement = "post_rope") -> HeadActivations:
        """The chosen heads' activations of one example (only their tensors are read); raises
        naming the heads the file does not hold."""
        from safetensors import safe_open

        chosen = check_heads(self.model, heads)
        groups = _kv_groups(self.model)
        with safe_open(str(example.path), framework="pt") as f:
            names = set(f.keys())
            if all(_head_key("q", l, h) in names for l, h in chosen):
                q = torch.stack([f.get_tensor(_head_key("q", l, h)) for l, h in chosen]).float()
                kv = {(l, h // groups): None for l, h in chosen}
                for l, g in kv:
                    kv[(l, g)] = f.get_tensor(_head_key("k", l, g))
                k = torch.stack([kv[(l, h // groups)] for l, h in chosen]).float()
                return _in_placement(self.model, q, k, chosen, example.response_start, example.span, placement,
                                     example.others)
            layers = sorted({l for l, _ in chosen})
            missing = [f"L{l}H{h}" for l, h in chosen if f"q{l}" not in names and _head_key("q", l, h) not in names]
            if missing:
                raise ValueError(f"{example.path} does not hold the activations of heads {missing}: rebuild the "
                                 f"cache with them")
            q_layers = {l: f.get_tensor(f"q{l}") for l in layers}
            k_layers = {l: f.get_tensor(f"k{l}") for l in layers}
        return _select(self.model, q_layers, k_layers, chosen, example.response_start, example.span, placement,
                       example.others)

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


def shuffled_position(question_id: str, n_docs: int) -> int:
    """The gold document's position (1-based) in a `shuffled` training prompt: uniform over
    1..n_docs, drawn from the question's id (the same on every machine, whatever else is drawn)."""
    import random

    return random.Random(f"fdlib.interventions.training.shuffled:{question_id}").randint(1, n_docs)


# The authors' training prompts: the k-document prompt with the gold document at each of these
# positions, for every training question (billzyx/focus_direction).
AUTHORS_POSITIONS: tuple[int, ...] = (1, 5, 10, 15, 20)
# Their answer budget for R_g (after Liu et al.); fdlib's older training sets used 32 tokens.
AUTHORS_ANSWER_TOKENS = 100
# Their initialisation of d_Q and d_K: N(0, 0.01^2).
AUTHORS_INIT_STD = 0.01


def training_positions(training_set: TrainingSet, question_id: str, n_docs: int,
                       positions: Sequence[int] = AUTHORS_POSITIONS) -> list[int | None]:
    """The gold document's positions (1-based) of one question's training prompts: none for the
    gold-only set (`[None]`), the middle for `long`, one drawn per question for `shuffled`, each
    of `positions` for `positions`."""
    if training_set == "gold":
        return [None]
    if training_set == "long":
        return [(n_docs + 1) // 2]
    if training_set == "shuffled":
        return [shuffled_position(question_id, n_docs)]
    bad = [p for p in positions if not 1 <= p <= n_docs]
    if bad or not positions:
        raise ValueError(f"gold positions must be in 1..{n_docs}, got {list(positions)}")
    return list(positions)


def example_id(question_id: str, training_set: TrainingSet, position: int | None) -> str:
    """A cached example's id: the question's, with the gold position for the `positions` set."""
    return f"{question_id}/g{position}" if training_set == "positions" else question_id


def gold_answer(model: TransformerBridge, cache: ActivationCache, gold: Any) -> list[int]:
    """R_g of one question: the greedy answer's tokens given the gold document alone
    (`cache.max_new_tokens` new tokens), kept in the cache's `answers.json`: read from it when
    there, else computed and merged into it atomically (so answers computed by another process
    for the same cache are kept, and an interrupted run loses at most one)."""
    from fdlib.model.decoding import decode, prefill

    path = cache.dir / "answers.json"
    qid = question_id(gold.id)
    got: dict[str, list[int]] = json.loads(path.read_text()) if path.exists() else {}
    if qid not in got:
        tokens = list(decode(model, prefill(model, gold.input_ids), max_new_tokens=cache.max_new_tokens).tokens)
        got = json.loads(path.read_text()) if path.exists() else {}
        got[qid] = tokens
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(got)))
    return got[qid]


def build_activation_cache(
    model: TransformerBridge,
    cache: ActivationCache,
    *,
    split: str = "train",
    size: Any = "quick",
    n_docs: int = 20,
    positions: Sequence[int] = AUTHORS_POSITIONS,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> list[CachedExample]:
    """Cache the training examples of `split`: R_g is the model's greedy answer given the gold
    document alone (`cache.max_new_tokens` new tokens); the prompt is the gold-only one (`gold`,
    the paper's text), the k-document one with the gold document in the middle (`long`, the
    authors' release), at a position drawn per question (`shuffled`: directions that must find
    the relevant document wherever it is; `shuffled_position`), or at each of `positions`
    (`positions`, the authors' training code: one example per question and position, sharing
    R_g), and the relevant span is the gold document in it. Examples already on disk (with the
    cache's heads) are skipped; examples with an empty R_g are recorded and left out. `shard`
    (i, n) builds every n-th question from the i-th, so n processes can share one cache.
    """
    from tqdm.auto import tqdm

    from fdlib.data.nq import NQBuilder

    builder = NQBuilder(model.tokenizer)
    i, n = shard
    if not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    golds = builder.samples(split=split, size=size, variant="gold")[i::n]
    by_id = {e.id: e for e in builder.examples}
    out: list[CachedExample] = []
    disk = 0
    n_per = len(training_positions(cache.training_set, "", n_docs, positions))
    bar = tqdm(total=len(golds) * n_per, desc=f"caching activations ({cache.training_set})", unit="example",
               disable=not progress)
    for gold in golds:
        qid = question_id(gold.id)
        tokens, last = None, None
        # the last gold position first: each next prompt shares the documents before its gold
        # document with the one before it, and continues that prompt's cache from there
        for position in sorted(training_positions(cache.training_set, qid, n_docs, positions),
                               key=lambda p: -(p or 0)):
            eid = example_id(qid, cache.training_set, position)
            if eid not in cache:
                tokens = gold_answer(model, cache, gold) if tokens is None else tokens
                prompt = gold if position is None else builder.sample(by_id[qid], n_docs=n_docs, gold_position=position)
                others = [d for i, d in enumerate(prompt.doc_spans) if i != prompt.gold_index]
                if not tokens:
                    cache.write(eid, prompt.input_ids, prompt.n_tokens, prompt.gold_span, "", None, None, others,
                                position)
                else:
                    ids = torch.cat([prompt.input_ids, torch.tensor(tokens, dtype=torch.long)])
                    qs, last = _run_response(model, ids, prompt.n_tokens, reuse=last)
                    ks = {l: last.cache.layers[l].keys[0] for l in range(model.cfg.n_layers)}
                    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
                    cache.write(eid, ids, prompt.n_tokens, prompt.gold_span, text, qs, ks, others, position)
            ex = cache.example(eid)
            if ex is not None:
                out.append(ex)
            disk += cache.path(eid).stat().st_size
            bar.update(1)
            bar.set_postfix(disk=f"{disk / 2**20:.0f} MiB")
    bar.close()
    return out


def attention_rows(
    acts: HeadActivations,
    d_q: Tensor,
    d_k: Tensor,
    *,
    scale: float | Tensor,
    rotation: tuple[Tensor, Tensor] | None = None,
    softcap: float | Tensor | None = None,
    window: int | Tensor | None = None,
    logits_dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "n_chosen rows pos"]:
    """The chosen heads' attention from the response rows, as the model computes it with Q + d_Q
    and K + d_K: softmax over visible keys of cap(((Q + d_Q)(K + d_K)^T) * scale).

    Per chosen head (a number applies to all): `scale` the layer's scaling, `softcap` its
    attention-logit cap (None / 0: none), `window` its sliding window (None / 0: none; row i sees
    keys i - window < j <= i). With `rotation` (cos, sin `[T, rot]`, or `[n_chosen, T, rot]` per
    head), Q, K and the directions are pre-RoPE and rotated here, so d_K meets each key at its
    own angle. `logits_dtype`: the dtype q.k is computed in where d_K cancels (post-RoPE, no
    softcap), the model's. `span_score_settings` gives all of these for a model.
    """
    n_c, n_rows, T = acts.q.shape[0], acts.q.shape[1], acts.k.shape[1]
    per_head = lambda v: torch.as_tensor(v, dtype=torch.float32, device=acts.q.device).reshape(-1).expand(n_c)
    if rotation is None and softcap is None:
        # After RoPE and without a softcap, (q_i + d_Q).(k_j + d_K) = q_i.k_j + d_Q.k_j + terms
        # constant in j, which cancel in row i's softmax: the pattern is that of q_i.k_j plus the
        # key bias d_Q.k_j, and d_K has no gradient. q_i.k_j carries no gradient either, so it is
        # computed once, in `logits_dtype` (the model's, as its attention computes it).
        k = acts.k.to(logits_dtype)
        with torch.no_grad():
            base = torch.einsum("hrd,htd->hrt", acts.q.to(logits_dtype), k).float()
        bias = torch.einsum("htd,hd->ht", k, d_q.to(logits_dtype)).float()
        scores = (base + bias[:, None, :]) * per_head(scale)[:, None, None]
        return _softmax_visible(scores, acts.response_start, window)
    q = acts.q + d_q[:, None, :]
    k = acts.k + d_k[:, None, :]
    if rotation is not None:
        cos, sin = rotation
        if cos.ndim == 2:
            cos, sin = cos[None], sin[None]
        rows = slice(acts.response_start, acts.response_start + n_rows)
        q = arch.rotate(q, cos[:, rows], sin[:, rows])
        k = arch.rotate(k, cos[:, :T], sin[:, :T])
    scores = torch.einsum("hrd,htd->hrt", q, k) * per_head(scale)[:, None, None]
    if softcap is not None:
        cap = per_head(softcap)[:, None, None]
        safe = torch.where(cap > 0, cap, torch.ones_like(cap))
        scores = torch.where(cap > 0, torch.tanh(scores / safe) * safe, scores)
    return _softmax_visible(scores, acts.response_start, window)


def _softmax_visible(scores: Float[Tensor, "n_chosen rows pos"], response_start: int,
                     window: int | Tensor | None) -> Float[Tensor, "n_chosen rows pos"]:
    """Softmax of the response rows' scores over the keys each row sees: causal, and within a
    sliding window where a head has one (row i sees keys i - window < j <= i)."""
    n_c, n_rows, T = scores.shape
    rows = torch.arange(response_start, response_start + n_rows, device=scores.device)
    if window is None:  # one additive mask for every head: -inf on the keys after each row
        cols = torch.arange(T, device=scores.device)
        mask = torch.zeros(n_rows, T, device=scores.device).masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        return torch.softmax(scores + mask, dim=-1)
    cols = torch.arange(T, device=scores.device)
    visible = (cols[None, :] <= rows[:, None])[None].expand(n_c, n_rows, T)
    if window is not None:
        w = torch.as_tensor(window, device=scores.device).reshape(-1).expand(n_c)[:, None, None]
        visible = visible & ((w <= 0) | ((rows[:, None] - cols[None, :])[None] < w))
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)


def span_score(acts: HeadActivations, d_q: Tensor, d_k: Tensor, **settings: Any) -> Float[Tensor, "n_chosen"]:
    """S_C per chosen head: the response rows' mean attention on the relevant span, under the
    attention `attention_rows` computes with these settings (scale, rotation, softcap, window)."""
    return _mass(attention_rows(acts, d_q, d_k, **settings), acts.span)


def contrast_score(acts: HeadActivations, d_q: Tensor, d_k: Tensor, **settings: Any) -> Float[Tensor, "n_chosen"]:
    """S_C - S_IRmax per chosen head: the relevant span's score minus the largest score of an
    irrelevant document (`acts.others`), under the same attention as `span_score`."""
    if not acts.others:
        raise ValueError("the contrastive loss needs the irrelevant documents' spans: train on a "
                         "k-document training set ('long' or 'shuffled'), cached with them")
    w = attention_rows(acts, d_q, d_k, **settings)
    return _mass(w, acts.span) - torch.stack([_mass(w, o) for o in acts.others]).max(0).values


def _mass(w: Float[Tensor, "n_chosen rows pos"], span: Any) -> Float[Tensor, "n_chosen"]:
    return w[..., span.start : span.end].sum(-1).mean(-1)


def span_score_settings(model: TransformerBridge, heads: Sequence[Head], placement: Placement, n_pos: int,
                        like: Tensor | None = None) -> dict[str, Any]:
    """The keyword arguments of `span_score` that make it the model's own attention for the
    chosen heads, on activations of up to `n_pos` positions: scale, softcap, window (per head),
    and the per-head rotation for pre-RoPE activations."""
    facts = check_trainable(model, placement)
    chosen = check_heads(model, heads)
    layers = [facts.layers[l] for l, _ in chosen]
    like = like if like is not None else torch.zeros(1)
    device = like.device
    out: dict[str, Any] = {"scale": torch.tensor([lf.scaling for lf in layers], device=device),
                           "logits_dtype": model_dtype(model)}
    if any(lf.softcap for lf in layers):
        out["softcap"] = torch.tensor([lf.softcap or 0.0 for lf in layers], device=device)
    if any(lf.window for lf in layers):
        out["window"] = torch.tensor([lf.window or 0 for lf in layers], device=device)
    if placement == "pre_rope" and facts.rope:
        rotary = arch.RotaryTable(model.original_model)
        cs = [rotary(l, n_pos, like) for l, _ in chosen]
        out["rotation"] = (torch.stack([c for c, _ in cs]), torch.stack([s for _, s in cs]))
    return out


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
    loss: Loss = "relevant",
    max_norm: float | None = None,
    init_std: float = 0.0,
    progress: bool = True,
) -> TrainResult:
    """Per head, d_Q and d_K maximising S_C (`loss="relevant"`, the paper's: loss -S_C) or
    S_C - S_IRmax (`loss="contrast"`), AdamW, one step per sample, samples in a seeded order each
    epoch (the paper's settings as defaults). `max_norm` bounds each head's |d_Q| and |d_K|:
    after every step a direction longer than it is scaled back onto the sphere of that radius.
    The scores reported before and after are S_C whatever the loss. The directions start at
    zero, or drawn from N(0, init_std^2) with `seed` (the authors': 0.01).

    Training runs on the model's device, in float32 whatever the model's dtype (the cached
    activations are read in float32); the loss is read back once per epoch."""
    from tqdm.auto import tqdm

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if max_norm is not None and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0 (or None: no bound), got {max_norm}")
    chosen = check_heads(model, heads)
    check_trainable(model, placement)
    if not activations:
        raise ValueError("no training activations")
    if loss == "contrast":
        # from the cache's metadata where it is lazy, so a long run is refused before it starts
        spans = [e.others for e in activations.examples] if isinstance(activations, CachedActivations) else [
            a.others for a in activations]
        missing = sum(not o for o in spans)
        if missing:
            raise ValueError(f"loss='contrast' needs the irrelevant documents' spans, and {missing} of "
                             f"{len(spans)} training examples have none (a gold-only training set, or a cache "
                             f"written without them: rebuild it)")
    objective = contrast_score if loss == "contrast" else span_score
    d = model.cfg.d_head
    device = next(model.original_model.parameters()).device
    like = torch.zeros(1, device=device)
    if not init_std >= 0:
        raise ValueError(f"init_std must be >= 0, got {init_std}")
    gen = torch.Generator().manual_seed(seed)
    d_q, d_k = (
        (torch.randn(len(chosen), d, generator=gen) * init_std).to(device).requires_grad_(True) for _ in range(2))
    opt = torch.optim.AdamW([d_q, d_k], lr=lr, weight_decay=weight_decay)
    settings_for: dict[str, dict[str, Any]] = {}

    def score_settings(acts: HeadActivations) -> dict[str, Any]:
        # scale / softcap / window per head, and rotations for every position, grown on demand
        # (the examples have different lengths)
        T = acts.k.shape[1]
        got = settings_for.get("s")
        if got is None or ("rotation" in got and got["rotation"][0].shape[1] < T):
            got = span_score_settings(model, chosen, placement, max(T, 2 * (got["rotation"][0].shape[1] if got else 0)), like)
            settings_for["s"] = got
        return got

    def score(acts: HeadActivations) -> Tensor:
        acts = acts.to(device)
        return span_score(acts, d_q, d_k, **score_settings(acts))

    def project() -> None:
        with torch.no_grad():
            for d in (d_q, d_k):
                d.mul_((max_norm / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))

    def examples(order: Sequence[int]) -> abc.Iterator[HeadActivations]:
        # the next example is read (from disk, for a lazy cache) while this one is trained on
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(activations.__getitem__, order[0]) if order else None
            for n in range(len(order)):
                got = ahead.result()
                ahead = pool.submit(activations.__getitem__, order[n + 1]) if n + 1 < len(order) else None
                yield got

    def mean_score() -> Tensor:
        with torch.no_grad():
            return torch.stack([score(a) for a in examples(range(len(activations)))]).mean(0).cpu()

    before = mean_score()
    losses = []
    bar = tqdm(total=epochs * len(activations), desc="training focus directions", unit="step", disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(len(activations), generator=gen).tolist()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for acts in examples(order):
            acts = acts.to(device)
            value = -objective(acts, d_q, d_k, **score_settings(acts)).sum()
            opt.zero_grad()
            value.backward()
            opt.step()
            if max_norm is not None:
                project()
            total += value.detach() / len(chosen)
            bar.update(1)
        losses.append(float(total) / len(activations))
        bar.set_postfix(loss=losses[-1])
    bar.close()
    shape = (model.cfg.n_layers, model.cfg.n_heads, d)
    full_q, full_k = torch.zeros(shape), torch.zeros(shape)
    for c, (l, h) in enumerate(chosen):
        full_q[l, h], full_k[l, h] = d_q.detach()[c].cpu(), d_k.detach()[c].cpu()
    settings = {"lr": lr, "epochs": epochs, "weight_decay": weight_decay, "seed": seed, "loss": loss,
                "max_norm": max_norm, "init_std": init_std, "heads": [f"L{l}H{h}" for l, h in chosen],
                "n_samples": len(activations), "losses": losses}
    dirs = FocusDirections(full_q, full_k, model_name(model), placement, training_set, split_seed, settings)
    return TrainResult(dirs, losses, before, mean_score())


def all_heads(model: TransformerBridge) -> list[Head]:
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def cache_nq_activations(
    model: TransformerBridge,
    *,
    training_set: TrainingSet = "gold",
    size: Any = "quick",
    heads: Sequence[Head] | None = None,
    root: str | Path | None = None,
    n_docs: int = 20,
    positions: Sequence[int] = AUTHORS_POSITIONS,
    max_new_tokens: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> tuple[ActivationCache, list[CachedExample]]:
    """The activation cache `train_nq_directions` trains from, built (resumably) without
    training: with `shard` (i, n), n processes build one cache side by side."""
    from fdlib.model.loading import cache_dir

    authors = training_set == "positions"
    tokens = max_new_tokens or (AUTHORS_ANSWER_TOKENS if authors else 32)
    cache = ActivationCache(Path(root) if root is not None else cache_dir() / "activations", model, training_set,
                            heads=heads if authors else None, max_new_tokens=tokens)
    examples = build_activation_cache(model, cache, split="train", size=size, n_docs=n_docs, positions=positions,
                                      shard=shard, progress=progress)
    return cache, examples


def train_nq_directions(
    model: TransformerBridge,
    *,
    training_set: TrainingSet = "gold",
    placement: Placement = "post_rope",
    size: Any = "quick",
    heads: Sequence[Head] | None = None,
    root: str | Path | None = None,
    n_docs: int = 20,
    positions: Sequence[int] = AUTHORS_POSITIONS,
    max_new_tokens: int | None = None,
    progress: bool = True,
    **train_kwargs: Any,
) -> TrainResult:
    """Cache the NQ training split's activations (resumable) and train directions on them.

    `heads=None` trains every head (and caches every layer), so random-head controls have
    directions of their own; with `heads`, the `positions` set caches only those heads'
    activations. `positions`: the gold positions of the `positions` set (the authors' five by
    default; a subset trains on those only, e.g. to test on the others). `max_new_tokens`: R_g's
    budget, by default the authors' 100 for `positions` and 32 for the older sets; `init_std`
    likewise defaults to the authors' 0.01 for `positions` and 0 otherwise.
    `root` defaults to `<fdlib cache>/activations`. Extra keyword arguments go to
    `train_focus_directions` (lr, epochs, weight_decay, seed, loss, max_norm, init_std).
    """
    import time

    from fdlib.data.nq import SPLIT_SEED

    check_trainable(model, placement)
    train_kwargs.setdefault("init_std", AUTHORS_INIT_STD if training_set == "positions" else 0.0)
    start = time.perf_counter()
    cache, examples = cache_nq_activations(model, training_set=training_set, size=size, heads=heads, root=root,
                                           n_docs=n_docs, positions=positions, max_new_tokens=max_new_tokens,
                                           progress=progress)
    tokens = cache.max_new_tokens
    cached = time.perf_counter()
    chosen = list(heads) if heads is not None else all_heads(model)
    acts = CachedActivations(cache, examples, chosen, placement)
    result = train_focus_directions(model, acts, chosen, placement=placement, training_set=training_set,
                                    split_seed=SPLIT_SEED, progress=progress, **train_kwargs)
    result.directions.settings.update({
        "size": size if isinstance(size, (int, str)) else str(size), "n_docs": n_docs, "max_new_tokens": tokens,
        "positions": sorted({e.gold_position for e in examples if e.gold_position is not None}) or None,
        "n_questions": len({question_id(e.id) for e in examples}),
        "cache_mib": round(sum(e.path.stat().st_size for e in examples) / 2**20, 1),
        "cache_seconds": round(cached - start, 1), "train_seconds": round(time.perf_counter() - cached, 1),
        "dtype": dtype_name(model_dtype(model))})
    return result
