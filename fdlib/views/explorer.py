"""An interactive head explorer (ipywidgets + plotly `FigureWidget`) and the plain functions under it.

```python
explorer = fdlib.views.explorer.HeadExplorer(model, samples)   # optional: directions=..., scores=...
explorer                                                 # display in Jupyter
```

A layers x heads heatmap of one score kind (click a cell to select that head); for the selected
head and sample, its attention mass per document (gold in green) and the prompt's tokens coloured
by its attention (mean over the answer rows); controls for the sample, the score kind, an
intervention (none / split-softmax with tau / focus directions with alpha) on the top-k heads.

Why it stays fast on a 2.7k-token prompt: each sample's prompt is prefilled once (`Prefix`, kept
in the explorer, built on first use) and every answer is decoded from that cache, the
interventions acting from the last prompt row on (`from_pos = n_tokens - 1`). Only the selected
head's answer rows are recorded (`HeadRowRecorder`), never a T x T pattern. Selecting another head
for an answer already decoded re-runs the answer rows in one teacher-forced forward instead of a
greedy decode (`head_token_attention`). The compute is in plain functions (`explore_sample`,
`reselect_head`, `token_html`); the class only wires widgets to them and caches their results.
"""

from __future__ import annotations

import html
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, ContextManager, Literal, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head, check_heads, head_label
from fdlib.core.metrics import best_subspan_em
from fdlib.core.spans import Span
from fdlib.data.nq import QASample
from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.row import intervene
from fdlib.model.decoding import Prefix, check_length, decode, hooks
from fdlib.study.conditions import Condition
from fdlib.study.scores import KIND_LABELS, KINDS, kind_scores, top_heads

InterventionKind = Literal["none", "split_softmax", "focus"]
INTERVENTIONS: tuple[str, ...] = ("none", "split_softmax", "focus")  # the explorer's menu
DIRECTIONS = "explorer"  # the name the explorer's one directions set goes by in its conditions
NO_INTERVENTION = Condition.baseline()


def intervention_context(
    model: TransformerBridge, condition: Condition, sample: QASample, directions: FocusDirections | None = None
) -> ContextManager[None]:
    """A condition with an explicit head list as hooks acting from the last prompt row on, so it
    works on a prefix shared with every other setting (`Condition.row`, run by `intervene`)."""
    if condition.is_reweight and sample.gold_span is None:
        raise ValueError(f"sample {sample.id} has no gold document: split-softmax needs one to re-weight")
    if condition.method == "focus" and directions is None:
        raise ValueError("focus directions need trained directions: pass directions=FocusDirections")
    if condition.rows != "response":
        raise ValueError(f"the explorer decodes from a shared prefix: rows must be 'response', got {condition.rows!r}")
    row = condition.row(_heads_of(condition), sample.named_spans(), {DIRECTIONS: directions} if directions is not None else {})
    return intervene(model, row, sample.n_tokens - 1)


def _heads_of(condition: Condition) -> tuple[Head, ...]:
    return tuple(condition.head_list or ())


class HeadRowRecorder:
    """Keeps one head's attention rows at positions >= `from_pos`, columns `[0, n_cols)`.

    Hooked on `blocks.{layer}.attn.hook_pattern`; like `SpanRecorder`, the query rows of a call
    are the last `query_pos` of its `key_pos` positions, so a decode step and a multi-token
    forward over a cache are handled alike. It copies `rows x n_cols` floats of one head only.
    """

    def __init__(self, head: Head, from_pos: int, n_cols: int) -> None:
        if from_pos < 0 or n_cols < 1:
            raise ValueError(f"need from_pos >= 0 and n_cols >= 1, got {from_pos} and {n_cols}")
        self.layer, self.head = int(head[0]), int(head[1])
        self.from_pos = from_pos
        self.n_cols = n_cols
        self._rows: list[Tensor] = []

    def hook(self, pattern: Float[Tensor, "batch head_index query_pos key_pos"], hook: Any) -> None:
        n_q, n_k = pattern.shape[-2], pattern.shape[-1]
        first_row = n_k - n_q  # absolute position of the first query row in this call
        skip = max(0, self.from_pos - first_row)
        if skip >= n_q:
            return
        self._rows.append(pattern[0, self.head, skip:, : self.n_cols].detach().float().cpu())

    def fwd_hooks(self) -> list[tuple[str, Any]]:
        return [(f"blocks.{self.layer}.attn.hook_pattern", self.hook)]

    @property
    def n_rows(self) -> int:
        return sum(int(r.shape[0]) for r in self._rows)

    def rows(self) -> Float[Tensor, "row pos"]:
        if not self._rows:
            return torch.zeros(0, self.n_cols)
        return torch.cat(self._rows, dim=0)

    def mean(self) -> Float[Tensor, "pos"]:
        """Mean over the recorded rows; NaN everywhere when no row was recorded (empty answer)."""
        if not self._rows:
            return torch.full((self.n_cols,), float("nan"))
        return self.rows().mean(dim=0)


@dataclass(frozen=True)
class HeadView:
    """One greedy answer under one intervention, seen from one head.

    `doc_scores` and `kinds` cover every head (the span recorder sees them all at no extra
    cost); `token_attention` only the selected one: its mean attention from the answer rows on
    each prompt position (NaN for an empty answer).
    """

    sample_id: str
    head: Head
    intervention: Condition
    answer: str
    answer_tokens: tuple[int, ...]
    em: bool
    doc_scores: Float[Tensor, "n_docs n_layers n_heads"]
    kinds: dict[str, Float[Tensor, "n_layers n_heads"]]
    token_attention: Float[Tensor, "pos"]
    seconds: float

    @property
    def doc_attention(self) -> Float[Tensor, "n_docs"]:
        """The selected head's attention mass on each document."""
        return self.doc_scores[:, self.head[0], self.head[1]]

    @property
    def head_scores(self) -> dict[str, float]:
        """The selected head's score of each kind."""
        return {k: float(v[self.head[0], self.head[1]]) for k, v in self.kinds.items()}


def _check_prefix(sample: QASample, prefix: Prefix) -> None:
    if prefix.length != sample.n_tokens or not torch.equal(prefix.tokens.cpu(), sample.input_ids.cpu()):
        raise ValueError(f"the prefix was built from another prompt than sample {sample.id} (prefill(model, sample.input_ids))")


def _one_head(model: TransformerBridge, head: Head) -> Head:
    (checked,) = check_heads(model, [head])
    return checked


def _doc_kinds(
    model: TransformerBridge, sample: QASample, span_scores: dict[str, Tensor]
) -> tuple[Float[Tensor, "n_docs n_layers n_heads"], dict[str, Float[Tensor, "n_layers n_heads"]]]:
    n_docs = len(sample.doc_spans)
    if not span_scores:  # empty answer: no response row to score
        nan = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))
        return torch.full((n_docs, *nan.shape), float("nan")), {k: nan for k in KINDS}
    docs = torch.stack([span_scores[f"doc{i}"] for i in range(n_docs)])
    return docs, kind_scores(docs, sample.gold_index, span_scores["sink"])


@torch.no_grad()
def explore_sample(
    model: TransformerBridge,
    sample: QASample,
    prefix: Prefix,
    head: Head,
    intervention: Condition = NO_INTERVENTION,
    *,
    directions: FocusDirections | None = None,
    max_new_tokens: int = 32,
) -> HeadView:
    """Decode the greedy answer from `prefix` (restored afterwards) under `intervention`,
    recording every head's mass on each span and `head`'s rows over the prompt positions."""
    start = time.perf_counter()
    head = _one_head(model, head)
    _check_prefix(sample, prefix)
    rows = HeadRowRecorder(head, from_pos=sample.n_tokens, n_cols=sample.n_tokens)
    with intervention_context(model, intervention, sample, directions):
        answer = decode(
            model, prefix, max_new_tokens=max_new_tokens, spans=sample.named_spans(), extra_hooks=rows.fwd_hooks()
        )
    docs, kinds = _doc_kinds(model, sample, answer.scores)
    return HeadView(
        sample_id=sample.id, head=head, intervention=intervention, answer=answer.text,
        answer_tokens=tuple(answer.tokens), em=best_subspan_em(answer.text, sample.answers),
        doc_scores=docs, kinds=kinds, token_attention=rows.mean(), seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def head_token_attention(
    model: TransformerBridge,
    sample: QASample,
    prefix: Prefix,
    answer_tokens: Sequence[int],
    head: Head,
    intervention: Condition = NO_INTERVENTION,
    *,
    directions: FocusDirections | None = None,
) -> Float[Tensor, "pos"]:
    """`head`'s mean attention from the answer rows on each prompt position, for a known answer:
    the last prompt token and the answer run in one teacher-forced forward over the prefix's
    cache (one pass instead of one per answer token), which is then cropped back."""
    head = _one_head(model, head)
    _check_prefix(sample, prefix)
    rows = HeadRowRecorder(head, from_pos=sample.n_tokens, n_cols=sample.n_tokens)
    if not answer_tokens:
        return rows.mean()
    check_length(model, prefix.length + len(answer_tokens))
    device = prefix.tokens.device
    ids = torch.cat([prefix.tokens[-1:], torch.as_tensor(list(answer_tokens), dtype=torch.long, device=device)])
    keep = prefix.length - 1
    try:
        with intervention_context(model, intervention, sample, directions), hooks(model, rows.fwd_hooks()):
            model(ids[None, :], past_key_values=prefix.cache, return_type=None)
    finally:
        # Each layer back to the prompt by its own excess: after a failure midway through the
        # layers, the ones not reached yet hold nothing to drop.
        for layer in prefix.cache.layers:
            excess = int(layer.get_seq_length()) - keep
            if excess > 0:
                layer.crop(-excess)
    return rows.mean()


def reselect_head(
    model: TransformerBridge,
    sample: QASample,
    prefix: Prefix,
    view: HeadView,
    head: Head,
    *,
    directions: FocusDirections | None = None,
) -> HeadView:
    """The same answer seen from another head: scores are reused, only the token rows rerun."""
    if view.sample_id != sample.id:
        raise ValueError(f"the view is of sample {view.sample_id}, not {sample.id}")
    start = time.perf_counter()
    head = _one_head(model, head)
    tokens = head_token_attention(
        model, sample, prefix, view.answer_tokens, head, view.intervention, directions=directions
    )
    return replace(view, head=head, token_attention=tokens, seconds=time.perf_counter() - start)


def token_strings(tokenizer: Any, ids: Sequence[int] | Tensor) -> list[str]:
    """Each token's own text (decoded alone, so a word piece shows as it reads)."""
    return [tokenizer.decode([int(t)]) for t in ids]


def token_html(
    tokens: Sequence[str],
    values: Float[Tensor, "pos"] | np.ndarray,
    *,
    gold: Span | None = None,
    sink: Span | None = None,
    max_height_px: int = 280,
) -> str:
    """The tokens coloured by `values` as ONE HTML string (a 2.7k-token prompt stays cheap: one
    widget value, not a widget per token). Colour is the value over the largest value outside
    `sink` (the first token takes most of many heads' mass and would wash everything else out);
    hovering a token shows its position and exact value; the gold document is outlined."""
    v = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=float)
    if v.ndim != 1 or len(v) != len(tokens):
        raise ValueError(f"values must be 1-D with one value per token ({len(tokens)}), got shape {v.shape}")
    finite = np.isfinite(v)
    rest = finite.copy()
    if sink is not None:
        rest[sink.slice] = False
    vmax = float(v[rest].max()) if rest.any() else 0.0
    vmax = vmax if vmax > 0 else 1.0
    out: list[str] = []
    for i, (tok, x) in enumerate(zip(tokens, v)):
        if gold is not None and i == gold.start:
            out.append('<span style="outline:2px solid #2ca02c;outline-offset:1px">')
        text = html.escape(tok)
        if not np.isfinite(x):
            out.append(f'<span title="{i}: no answer row">{text}</span>')
        else:
            a = min(1.0, max(0.0, float(x) / vmax))
            style = f' style="background:rgba(214,39,40,{a:.2f})"' if a >= 0.01 else ""
            out.append(f'<span{style} title="{i}: {float(x):.5f}">{text}</span>')
        if gold is not None and i == gold.end - 1:
            out.append("</span>")
    note = (
        f"colour: attention / {vmax:.4f} (the largest outside the sink); hover a token for its value"
        if finite.any() else "empty answer: no answer row to average"
    )
    return (
        f'<div style="font-size:11px;color:#555">{note}; green outline: gold document</div>'
        f'<div class="fd-tokens" style="font-family:monospace;font-size:12px;white-space:pre-wrap;line-height:1.6;'
        f'max-height:{int(max_height_px)}px;overflow-y:auto;border:1px solid #ddd;padding:6px">'
        + "".join(out) + "</div>"
    )


def _check_scores(model: TransformerBridge, scores: dict[str, Any] | None) -> dict[str, Tensor] | None:
    if scores is None:
        return None
    want = (model.cfg.n_layers, model.cfg.n_heads)
    out = {}
    for kind, value in scores.items():
        if kind not in KINDS:
            raise ValueError(f"unknown score kind {kind!r}: expected one of {KINDS}")
        t = torch.as_tensor(np.asarray(value, dtype=np.float32))
        if tuple(t.shape) != want:
            raise ValueError(f"scores[{kind!r}] has shape {tuple(t.shape)}, the model has {want} (layers, heads)")
        out[kind] = t
    if "relevant" not in out:
        raise ValueError("scores must hold 'relevant': it ranks the heads to intervene on")
    return out


class HeadExplorer:
    """Widgets over `explore_sample`; display the instance (or `.widget`) in Jupyter.

    `scores` (optional, e.g. study means `{kind: [n_layers, n_heads]}` with at least
    `relevant`) ranks the heads to intervene on and can be shown in the heatmap; without it the
    ranking is the current sample's relevant score with no intervention. Every decoded answer is
    cached per (sample, intervention, head), so going back to a setting costs nothing.
    `last_update_s` is the wall time of the last update (compute and redraw), also shown in the UI.
    """

    def __init__(
        self,
        model: TransformerBridge,
        samples: Sequence[QASample],
        *,
        directions: FocusDirections | None = None,
        scores: dict[str, Any] | None = None,
        head: Head | None = None,
        kind: str = "relevant",
        intervention: InterventionKind = "none",
        top_k: int = 5,
        tau: float = 0.1,
        alpha: float = 0.3,
        max_new_tokens: int = 32,
        cache_size: int = 64,
    ) -> None:
        import ipywidgets as W
        import plotly.graph_objects as go

        from fdlib.views import plots

        self.model = model
        self.samples = list(samples)
        if not self.samples:
            raise ValueError("no samples to explore")
        if kind not in KINDS:
            raise ValueError(f"unknown score kind {kind!r}: expected one of {KINDS}")
        if intervention not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {intervention!r}: expected one of {INTERVENTIONS}")
        if intervention == "focus" and directions is None:
            raise ValueError("intervention='focus' needs directions")
        self.directions = directions.check(model) if directions is not None else None
        self.scores = _check_scores(model, scores)
        self.n_layers, self.n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
        if not 1 <= top_k <= self.n_layers * self.n_heads:
            raise ValueError(f"top_k must be in [1, {self.n_layers * self.n_heads}], got {top_k}")
        self.max_new_tokens = max_new_tokens
        self.head: Head | None = _one_head(model, head) if head is not None else None
        self.view: HeadView | None = None
        self.error: str | None = None
        self.last_update_s: float = float("nan")
        self.last_source: str = ""  # how the last view was obtained: decoded / teacher-forced / cached
        self._cache_size = cache_size
        self._prefixes: dict[int, Prefix] = {}
        self._tokens: dict[int, list[str]] = {}
        self._views: OrderedDict[tuple[int, Condition, Head], HeadView] = OrderedDict()

        # --- controls ---
        style = {"description_width": "initial"}
        self.sample_dropdown = W.Dropdown(
            options=[(f"{i}: {s.question[:70]} ({s.variant}, {len(s.doc_spans)} docs, {s.n_tokens} tokens)", i)
                     for i, s in enumerate(self.samples)],
            value=0, description="sample", style=style, layout=W.Layout(width="640px"),
        )
        self.kind_dropdown = W.Dropdown(
            options=[(f"{KIND_LABELS[k]} ({k})", k) for k in KINDS], value=kind, description="score", style=style,
            layout=W.Layout(width="220px"),
        )
        self.source_toggle = W.ToggleButtons(
            options=[("this answer", "answer"), ("given scores", "given")], value="answer",
            disabled=self.scores is None, tooltips=["scores of the answer shown", "the scores passed to the explorer"],
            style={"button_width": "110px"},
        )
        options = [("none", "none"), ("split-softmax", "split_softmax")]
        if self.directions is not None:  # without directions the option is not offered at all
            options.append(("focus directions", "focus"))
        self.intervention_dropdown = W.Dropdown(options=options, value=intervention, description="intervention",
                                                style=style, layout=W.Layout(width="260px"))
        self.top_k_slider = W.IntSlider(value=top_k, min=1, max=self.n_layers * self.n_heads, description="top-k heads",
                                        continuous_update=False, style=style)
        self.tau_slider = W.FloatSlider(value=tau, min=0.0, max=2.0, step=0.05, description="tau",
                                        continuous_update=False, readout_format=".2f")
        self.alpha_slider = W.FloatSlider(value=alpha, min=-2.0, max=2.0, step=0.05, description="alpha",
                                          continuous_update=False, readout_format=".2f",
                                          tooltip="" if directions is not None else "no focus directions given")
        self.head_label = W.HTML()
        self.head_label.add_class("fd-selected-head")
        self.timing_label = W.HTML()
        self.timing_label.add_class("fd-update-time")
        self.status = W.HTML()
        self.tokens_html = W.HTML(layout=W.Layout(width="100%"))

        # --- figures ---
        heat = plots.head_heatmap(np.zeros((self.n_layers, self.n_heads)), score_name=kind, title="")
        heat.add_trace(go.Scatter(x=[], y=[], mode="markers", name="intervened heads", customdata=[],
                                  marker=dict(symbol="x", size=8, color="white", line=dict(color="black", width=1)),
                                  hoverinfo="skip", showlegend=False))
        heat.add_trace(go.Scatter(x=[], y=[], mode="markers", name="selected head", customdata=[],
                                  marker=dict(symbol="square-open", size=12, color="red", line=dict(width=3)),
                                  hoverinfo="skip", showlegend=False))
        heat.update_layout(width=440, height=max(420, 18 * self.n_layers + 120), margin=dict(l=50, r=10, t=80, b=40))
        # Fixed ranges: the marker overlays must not pad the axes, so cell (l, h) stays where a
        # click (or the browser check) expects it.
        heat.update_xaxes(range=[-0.5, self.n_heads - 0.5], autorange=False)
        heat.update_yaxes(range=[-0.5, self.n_layers - 0.5], autorange=False)
        self.heatmap = go.FigureWidget(heat)
        # The overlays skip hover, so a click on a marker reaches the heatmap cell under it.
        self.heatmap.data[0].on_click(self.on_head_click)
        docs = plots.head_doc_mass(np.zeros(len(self.samples[0].doc_spans)), None, head="")
        docs.update_layout(width=580, height=max(420, 18 * self.n_layers + 120), margin=dict(l=60, r=10, t=80, b=80))
        self.doc_figure = go.FigureWidget(docs)

        for w in (self.sample_dropdown, self.kind_dropdown, self.source_toggle, self.intervention_dropdown,
                  self.top_k_slider, self.tau_slider, self.alpha_slider):
            w.observe(self.on_control_change, names="value")
        self._sync_enabled()
        self.widget = W.VBox([
            W.HBox([self.sample_dropdown]),
            W.HBox([self.kind_dropdown, self.source_toggle]),
            W.HBox([self.intervention_dropdown, self.top_k_slider, self.tau_slider, self.alpha_slider]),
            W.HBox([self.head_label, self.timing_label], layout=W.Layout(justify_content="space-between")),
            self.status,
            W.HBox([self.heatmap, self.doc_figure]),
            self.tokens_html,
        ])
        self.widget.add_class("fd-head-explorer")  # a handle for scripts/browser_check.py
        self.update()

    # --- state -----------------------------------------------------------------------------

    @property
    def sample_index(self) -> int:
        return int(self.sample_dropdown.value)

    @property
    def sample(self) -> QASample:
        return self.samples[self.sample_index]

    @property
    def kind(self) -> str:
        return str(self.kind_dropdown.value)

    def prefix(self, index: int) -> Prefix:
        """The prompt's KV cache, built on first use and kept by this explorer."""
        if index not in self._prefixes:
            from fdlib.model.decoding import prefill

            self._prefixes[index] = prefill(self.model, self.samples[index].input_ids)
        return self._prefixes[index]

    def ranking(self, index: int) -> Float[Tensor, "n_layers n_heads"]:
        """What ranks the heads to intervene on: the given relevant scores, else the sample's
        relevant scores without intervention (decoded once, from any head's view)."""
        if self.scores is not None:
            return self.scores["relevant"]
        for (i, iv, _), view in self._views.items():
            if i == index and iv == NO_INTERVENTION:
                return view.kinds["relevant"]
        head = self.head if self.head is not None else (0, 0)
        return self._view(index, head, NO_INTERVENTION)[0].kinds["relevant"]

    def current_intervention(self) -> Condition:
        kind = self.intervention_dropdown.value
        if kind == "none":
            return NO_INTERVENTION
        heads = top_heads(self.ranking(self.sample_index), int(self.top_k_slider.value))
        if kind == "split_softmax":
            return Condition.split(float(self.tau_slider.value), heads)
        return Condition.focus(float(self.alpha_slider.value), DIRECTIONS, heads)

    def _view(self, index: int, head: Head, intervention: Condition) -> tuple[HeadView, str]:
        key = (index, intervention, head)
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key], "cached"
        sample, prefix = self.samples[index], self.prefix(index)
        same_answer = next((v for (i, iv, _), v in self._views.items() if i == index and iv == intervention), None)
        if same_answer is not None:  # the answer is known: only the new head's rows are needed
            view = reselect_head(self.model, sample, prefix, same_answer, head, directions=self.directions)
            source = "teacher-forced"
        else:
            view = explore_sample(self.model, sample, prefix, head, intervention, directions=self.directions,
                                  max_new_tokens=self.max_new_tokens)
            source = "decoded"
        self._views[key] = view
        while len(self._views) > self._cache_size:
            self._views.popitem(last=False)
        return view, source

    # --- callbacks (plain methods: tests call them directly) --------------------------------

    def select_head(self, layer: int, head: int) -> None:
        """Select a head (ValueError if outside the model) and update."""
        self.head = _one_head(self.model, (layer, head))
        self.update()

    def on_head_click(self, trace: Any, points: Any, state: Any = None) -> None:
        """FigureWidget `on_click` callback: x is the head, y the layer of the clicked cell."""
        xs, ys = list(getattr(points, "xs", []) or []), list(getattr(points, "ys", []) or [])
        if not xs or not ys:
            return  # plotly calls every trace's callback; those not clicked get no point
        self.select_head(int(round(float(ys[0]))), int(round(float(xs[0]))))

    def on_control_change(self, change: Any = None) -> None:
        """Any control changed: enable the sliders that apply, then update."""
        self._sync_enabled()
        self.update()

    def _sync_enabled(self) -> None:
        kind = self.intervention_dropdown.value
        self.tau_slider.disabled = kind != "split_softmax"
        self.alpha_slider.disabled = kind != "focus" or self.directions is None
        self.top_k_slider.disabled = kind == "none"

    # --- update ------------------------------------------------------------------------------

    def update(self) -> None:
        """Recompute what the controls ask for (from caches where possible) and redraw; a bad
        setting (e.g. split-softmax on a sample without gold) is shown, not raised."""
        start = time.perf_counter()
        try:
            index = self.sample_index
            if self.head is None:
                ranking = self.ranking(index)
                self.head = top_heads(ranking, 1)[0]
            intervention = self.current_intervention()
            self.view, self.last_source = self._view(index, self.head, intervention)
            self.error = None
        except ValueError as err:
            self.error = str(err)
        if self.view is not None:
            self._redraw()
        self.last_update_s = time.perf_counter() - start
        self._show_status()

    def heatmap_scores(self) -> Float[Tensor, "n_layers n_heads"]:
        """What the heatmap shows: the current answer's scores, or the given ones."""
        if self.source_toggle.value == "given" and self.scores is not None:
            given = self.scores.get(self.kind)
            if given is not None:
                return given
        assert self.view is not None
        return self.view.kinds[self.kind]

    def _redraw(self) -> None:
        view = self.view
        assert view is not None
        sample = next(s for s in self.samples if s.id == view.sample_id)
        index = self.samples.index(sample)
        layer, h = view.head
        label = head_label(layer, h)
        z = self.heatmap_scores().numpy().astype(float)
        marked = _heads_of(view.intervention)
        name = KIND_LABELS[self.kind]
        with self.heatmap.batch_update():
            hm = self.heatmap.data[0]
            hm.z = z
            hm.hovertemplate = "%{customdata}<br>" + name + " = %{z:.6f}<extra></extra>"
            hm.colorbar.title.text = name
            self.heatmap.data[1].update(x=[b for _, b in marked], y=[a for a, _ in marked],
                                        customdata=[head_label(a, b) for a, b in marked])
            self.heatmap.data[2].update(x=[h], y=[layer], customdata=[label])
            source = "given scores" if self.source_toggle.value == "given" and self.scores is not None else "this answer"
            self.heatmap.layout.title.text = f"{name} per head ({source})"
        values = view.doc_attention.numpy().astype(float)
        names = [f"doc {i + 1}" + (" (gold)" if i == sample.gold_index else "") for i in range(len(values))]
        hover = [f"{n}: {d.title}" for n, d in zip(names, sample.documents)]
        with self.doc_figure.batch_update():
            bar = self.doc_figure.data[0]
            bar.update(x=names, y=values, customdata=hover,
                       marker=dict(color=["#2ca02c" if i == sample.gold_index else "#7f7f7f" for i in range(len(values))]))
            self.doc_figure.layout.title.text = f"{label}: attention mass per document ({view.intervention.label})"
        if index not in self._tokens:
            self._tokens[index] = token_strings(self.model.tokenizer, sample.input_ids)
        self.tokens_html.value = (
            f"<b>{label}</b>: attention from the answer rows on each prompt token"
            + token_html(self._tokens[index], view.token_attention, gold=sample.gold_span, sink=sample.sink_span)
        )

    def _show_status(self) -> None:
        if self.head is not None:
            self.head_label.value = f"selected head: <b>{head_label(*self.head)}</b>"
        self.timing_label.value = f"last update: <b>{self.last_update_s:.2f} s</b> ({self.last_source or '-'})"
        parts = []
        if self.view is not None:
            v = self.view
            sample = next(s for s in self.samples if s.id == v.sample_id)
            scores = ", ".join(f"{KIND_LABELS[k]} {x:.4f}" for k, x in v.head_scores.items())
            em = "correct" if v.em else "wrong"
            parts.append(
                f"<b>answer</b> ({v.intervention.label}): <code>{html.escape(v.answer) or '(empty)'}</code> "
                f"&mdash; EM: <b>{em}</b> (gold: {html.escape(' / '.join(sample.answers[:3]))})"
                f"<br>{head_label(*v.head)}: {scores}"
            )
        if self.error:
            parts.append(f'<span style="color:#d62728">cannot show this setting: {html.escape(self.error)}</span>')
        self.status.value = "<br>".join(parts)

    # --- display and static export ---------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def snapshot(self, title: str | None = None):
        """A static `go.Figure` of the heatmap and the per-document view, for `save_figure`."""
        from fdlib.views import plots

        if self.view is None:
            raise ValueError(f"nothing to draw yet: {self.error}")
        v = self.view
        sample = next(s for s in self.samples if s.id == v.sample_id)
        return plots.explorer_snapshot(
            self.heatmap_scores(), v.doc_attention.numpy(), sample.gold_index, head=v.head,
            score_name=KIND_LABELS[self.kind], marked=_heads_of(v.intervention),
            titles=[d.title for d in sample.documents],
            title=title or f"{sample.question} -> {v.answer!r} ({v.intervention.label})",
        )
