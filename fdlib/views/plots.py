"""Figure builders: each returns a `plotly.graph_objects.Figure` with axis titles and hover text
built from `customdata`; `save_figure` writes interactive HTML and a static PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor

from fdlib.core.store import atomic_write


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _labels(n_layers: int, n_heads: int) -> np.ndarray:
    return np.array([[f"L{l}H{h}" for h in range(n_heads)] for l in range(n_layers)], dtype=object)


def head_heatmap(
    scores: Float[Tensor, "n_layers n_heads"] | np.ndarray,
    *,
    title: str = "Relevant-document score per head",
    score_name: str = "score",
    zmax: float | None = None,
) -> go.Figure:
    """Layers x heads heatmap; hover gives the head label `L{l}H{h}` and the exact value."""
    z = _np(scores).astype(float)
    if z.ndim != 2:
        raise ValueError(f"scores must be [n_layers, n_heads], got shape {z.shape}")
    n_layers, n_heads = z.shape
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(n_heads)),
            y=list(range(n_layers)),
            customdata=_labels(n_layers, n_heads),
            hovertemplate="%{customdata}<br>" + score_name + " = %{z:.6f}<extra></extra>",
            colorscale="Viridis",
            zmin=0,
            zmax=zmax,
            colorbar=dict(title=score_name),
        )
    )
    fig.update_layout(title=title, xaxis_title="head", yaxis_title="layer", width=520, height=640)
    fig.update_xaxes(dtick=1)
    return fig


def sink_vs_relevant(
    relevant: Float[Tensor, "n_layers n_heads"] | np.ndarray,
    sink: Float[Tensor, "n_layers n_heads"] | np.ndarray,
    *,
    highlight: Sequence[tuple[int, int]] = (),
    title: str = "Sink score vs relevant score, per head",
) -> go.Figure:
    """One point per head, coloured by layer; `highlight` heads (e.g. the top-k) are ringed."""
    r, s = _np(relevant).astype(float), _np(sink).astype(float)
    if r.shape != s.shape or r.ndim != 2:
        raise ValueError(f"relevant and sink must both be [n_layers, n_heads], got {r.shape} and {s.shape}")
    n_layers, n_heads = r.shape
    layers = np.repeat(np.arange(n_layers), n_heads)
    labels = _labels(n_layers, n_heads).ravel()
    fig = go.Figure(
        go.Scatter(
            x=s.ravel(),
            y=r.ravel(),
            mode="markers",
            marker=dict(color=layers, colorscale="Plasma", size=7, colorbar=dict(title="layer")),
            customdata=labels,
            hovertemplate="%{customdata}<br>sink = %{x:.4f}<br>relevant = %{y:.4f}<extra></extra>",
            name="heads",
        )
    )
    if highlight:
        hl = np.array(highlight)
        fig.add_trace(
            go.Scatter(
                x=s[hl[:, 0], hl[:, 1]],
                y=r[hl[:, 0], hl[:, 1]],
                mode="markers",
                marker=dict(size=14, color="rgba(0,0,0,0)", line=dict(color="red", width=2)),
                customdata=[f"L{l}H{h}" for l, h in highlight],
                hovertemplate="%{customdata} (top head)<extra></extra>",
                name=f"top-{len(highlight)}",
            )
        )
    fig.update_layout(
        title=title,
        xaxis_title="sink score",
        yaxis_title="relevant score",
        width=640,
        height=480,
        legend=dict(orientation="h", x=0, y=1.0, yanchor="bottom"),  # clear of the colour bar
    )
    return fig


def layer_histogram(
    heads: Sequence[tuple[int, int]],
    n_layers: int,
    *,
    title: str = "Layers of the contextual heads",
) -> go.Figure:
    """How many of the given heads sit in each layer; hover lists them."""
    counts = np.zeros(n_layers, dtype=int)
    names: list[list[str]] = [[] for _ in range(n_layers)]
    for l, h in heads:
        if not 0 <= l < n_layers:
            raise ValueError(f"head L{l}H{h} is outside a model with {n_layers} layers")
        counts[l] += 1
        names[l].append(f"L{l}H{h}")
    fig = go.Figure(
        go.Bar(
            x=list(range(n_layers)),
            y=counts,
            customdata=[", ".join(n) or "-" for n in names],
            hovertemplate="layer %{x}: %{y} heads<br>%{customdata}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title="number of heads", width=640, height=360)
    return fig


def save_figure(fig: go.Figure, name: str, directory: str | Path = "figures", *, png: bool = True) -> list[Path]:
    """Write `{name}.html` (interactive) and `{name}.png` (kaleido, which needs a Chromium:
    Debian's `chromium` package works). Returns the paths.

    The HTML loads `plotly.min.js` from its own directory, or from the parent's when that has
    one (a model's subfolder of the gallery), written once: it opens offline and each figure
    stays a few kB instead of carrying its own 4.8 MB copy of plotly.js.
    """
    directory = Path(directory)
    html = directory / f"{name}.html"
    src = "plotly.min.js"
    if (directory.parent / src).is_file() and not (directory / src).is_file():
        src = f"../{src}"
    js = directory / src
    if not js.is_file():
        from plotly.offline import get_plotlyjs

        atomic_write(js, lambda p: Path(p).write_text(get_plotlyjs(), encoding="utf-8"))
    # A fixed div id keeps a regenerated figure byte-identical when its data did not change.
    atomic_write(html, lambda p: fig.write_html(p, include_plotlyjs=src, full_html=True, div_id=name))
    written = [html]
    if png:
        target = directory / f"{name}.png"
        atomic_write(target, lambda p: fig.write_image(p, format="png", scale=2))
        written.append(target)
    return written


# One colour per parameter value: Figure 4's grid has 8 alphas (a repeat would merge two lines).
_TAU_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#d62728", "#8c564b", "#17becf", "#e377c2", "#bcbd22"]


def em_vs_k(
    table: pd.DataFrame,
    *,
    param: str = "tau",
    title: str = "EM vs number of heads, split-softmax",
) -> go.Figure:
    """The paper's Figures 3 (`param="tau"`) and 4 (`param="alpha"`) from `sweeps.em_table`:
    one line per value of the parameter (solid: contextual heads, dashed: random heads), CIs as
    error bars, baselines (no intervention) as horizontal lines. Rows of other methods (their
    `param` is NaN) are left out."""
    if param not in ("tau", "alpha"):
        raise ValueError(f"param must be 'tau' or 'alpha', got {param!r}")
    needed = {"input", "heads", param, "k", "em", "lo", "hi", "n"}
    if missing := needed - set(table.columns):
        raise ValueError(f"table lacks columns {sorted(missing)}; build it with fdlib.experiments.sweeps.em_table")
    fig = go.Figure()
    lines = table[(table.heads != "none") & table[param].notna()]
    for i, tau in enumerate(sorted(lines[param].unique())):
        color = _TAU_COLORS[i % len(_TAU_COLORS)]
        for heads, dash in (("contextual", "solid"), ("random", "dash")):
            d = lines[(lines[param] == tau) & (lines.heads == heads)].sort_values("k")
            if d.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=d.k, y=d.em, mode="lines+markers",
                    line=dict(color=color, dash=dash),
                    error_y=dict(type="data", symmetric=False, array=d.hi - d.em, arrayminus=d.em - d.lo),
                    name=f"{param}={tau:g}, {heads}",
                    customdata=np.stack([d.lo, d.hi, d.n], axis=-1),
                    hovertemplate=f"{param}={tau:g}, {heads} heads<br>k=%{{x}}<br>EM=%{{y:.3f}} "
                    "[%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>n=%{customdata[2]}<extra></extra>",
                )
            )
    # Baselines as legend entries (not annotations): equal baselines would print on top of each other.
    ks = lines.k.dropna()
    x_span = [ks.min(), ks.max()] if len(ks) else [1, 1]
    if x_span[0] == x_span[1]:  # one k: widen so the baseline lines are visible on the log axis
        x_span = [x_span[0] / 2, x_span[1] * 2]
    base_style = {"long": ("black", "dot"), "gold": ("#2ca02c", "dashdot"), "negative": ("#7f7f7f", "longdash")}
    for _, b in table[table.heads == "none"].iterrows():
        color, dash = base_style.get(b.input, ("gray", "dot"))
        label = f"{b.input} input, no intervention: {b.em:.2f} [{b.lo:.2f}, {b.hi:.2f}]"
        fig.add_trace(go.Scatter(x=x_span, y=[b.em, b.em], mode="lines", line=dict(color=color, dash=dash, width=1.5),
                                 name=label, hovertemplate=label + "<extra></extra>"))
    # Tall enough for every legend entry (~20 px each): Figure 4's grid has 16 lines and 3 baselines,
    # and a static image cannot scroll its legend.
    fig.update_layout(title=title, xaxis_title="number of heads k", yaxis_title="exact match",
                      xaxis_type="log", width=980, height=max(520, 20 * len(fig.data) + 180))
    return fig


def em_vs_alpha(table: pd.DataFrame, *, title: str = "EM vs alpha, focus directions") -> go.Figure:
    """The alpha curve from `sweeps.em_table`: EM per alpha for each head choice and k (solid:
    contextual heads, dashed: random heads), CIs as error bars, and the long input without an
    intervention as a horizontal line (the curve's alpha = 0)."""
    needed = {"input", "heads", "alpha", "k", "em", "lo", "hi", "n"}
    if missing := needed - set(table.columns):
        raise ValueError(f"table lacks columns {sorted(missing)}; build it with fdlib.experiments.sweeps.em_table")
    fig = go.Figure()
    lines = table[(table.heads != "none") & table.alpha.notna()]
    for i, ((heads, k), d) in enumerate(lines.groupby(["heads", "k"], sort=True)):
        d = d.sort_values("alpha")
        fig.add_trace(go.Scatter(
            x=d.alpha, y=d.em, mode="lines+markers", name=f"{heads} heads, k={int(k)}",
            line=dict(color=_TAU_COLORS[i % len(_TAU_COLORS)], dash="dash" if heads == "random" else "solid"),
            error_y=dict(type="data", symmetric=False, array=d.hi - d.em, arrayminus=d.em - d.lo),
            customdata=np.stack([d.lo, d.hi, d.n], axis=-1),
            hovertemplate=f"{heads} heads, k={int(k)}<br>alpha=%{{x:g}}<br>EM=%{{y:.3f}} "
            "[%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>n=%{customdata[2]}<extra></extra>"))
    alphas = lines.alpha.dropna()
    span = [alphas.min(), alphas.max()] if len(alphas) else [0, 1]
    for _, b in table[(table.heads == "none") & (table.input == "long")].iterrows():
        label = f"long input, no intervention: {b.em:.2f} [{b.lo:.2f}, {b.hi:.2f}]"
        fig.add_trace(go.Scatter(x=span, y=[b.em, b.em], mode="lines", line=dict(color="black", dash="dot", width=1.5),
                                 name=label, hovertemplate=label + "<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="alpha", yaxis_title="exact match", width=900, height=520)
    return fig


def doc_attention(
    before: Sequence[float] | np.ndarray,
    after: Sequence[float] | np.ndarray,
    gold_index: int | None,
    *,
    head: str,
    after_label: str = "after",
    title: str | None = None,
) -> go.Figure:
    """A head's attention mass per document, before and after an intervention; gold marked."""
    b, a = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if b.shape != a.shape or b.ndim != 1:
        raise ValueError(f"before and after must be equal-length 1-D, got {b.shape} and {a.shape}")
    docs = [f"doc {i + 1}" + (" (gold)" if i == gold_index else "") for i in range(len(b))]
    fig = go.Figure()
    for vals, name, color in ((b, "before", "#7f7f7f"), (a, after_label, "#d62728")):
        fig.add_trace(go.Bar(x=docs, y=vals, name=name, marker_color=color, customdata=docs,
                             hovertemplate="%{customdata}<br>" + name + ": %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title or f"{head}: attention mass per document", barmode="group",
                      xaxis_title="document", yaxis_title="attention from the answer rows", width=820, height=420)
    return fig


def key_bias_by_token(
    bias: Sequence[float] | np.ndarray,
    tokens: Sequence[str],
    doc_spans: Sequence[tuple[int, int]],
    gold_index: int | None,
    *,
    head: str,
    title: str | None = None,
) -> go.Figure:
    """The logit bias a head's focus direction adds to each prompt token, coloured by document
    (gold in red, the first token - the sink - in black); hover shows the token."""
    b = np.asarray(bias, dtype=float)
    if b.ndim != 1 or len(tokens) != len(b):
        raise ValueError(f"bias and tokens must be 1-D of equal length, got {b.shape} and {len(tokens)}")
    where = np.array(["prompt"] * len(b), dtype=object)
    for i, (start, end) in enumerate(doc_spans):
        if not 0 <= start < end <= len(b):
            raise ValueError(f"document span {(start, end)} is outside the {len(b)} positions")
        where[start:end] = f"doc {i + 1}" + (" (gold)" if i == gold_index else "")
    where[0] = "sink"
    fig = go.Figure()
    groups = [("sink", "black"), ("prompt", "#7f7f7f")]
    groups += [(w, "#d62728" if "gold" in w else "#1f77b4") for w in dict.fromkeys(where) if w.startswith("doc")]
    for name, color in groups:
        idx = np.flatnonzero(where == name)
        if not len(idx):
            continue
        custom = np.stack([np.array([tokens[i] for i in idx], dtype=object), where[idx]], axis=-1)
        fig.add_trace(go.Scattergl(
            x=idx, y=b[idx], mode="markers", marker=dict(color=color, size=4), customdata=custom,
            name=name if name in ("sink", "prompt") or "gold" in name else "other documents",
            legendgroup="docs" if name.startswith("doc") and "gold" not in name else name,
            showlegend=name in ("sink", "prompt") or "gold" in name or name == "doc 1",
            hovertemplate="position %{x}: %{customdata[0]}<br>%{customdata[1]}<br>bias %{y:.3f}<extra></extra>",
        ))
    fig.update_layout(title=title or f"{head}: logit bias its focus direction adds to each prompt token",
                      xaxis_title="prompt position", yaxis_title="added attention logit", width=980, height=420)
    return fig


# --- head explorer (fdlib.views.explorer) ------------------------------------------------------------


def head_doc_mass(
    values: Sequence[float] | np.ndarray,
    gold_index: int | None,
    *,
    head: str,
    titles: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """One head's attention mass per document from the answer rows; the gold document's bar is
    green, the others grey; hover gives the document's title and the exact mass."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D (one mass per document), got shape {v.shape}")
    if gold_index is not None and not 0 <= gold_index < len(v):
        raise ValueError(f"gold_index {gold_index} is outside the {len(v)} documents")
    if titles is not None and len(titles) != len(v):
        raise ValueError(f"{len(titles)} titles for {len(v)} documents")
    names = [f"doc {i + 1}" + (" (gold)" if i == gold_index else "") for i in range(len(v))]
    hover = [f"{n}: {t}" for n, t in zip(names, titles)] if titles is not None else names
    colors = ["#2ca02c" if i == gold_index else "#7f7f7f" for i in range(len(v))]
    fig = go.Figure(
        go.Bar(x=names, y=v, marker_color=colors, customdata=hover, name=head,
               hovertemplate="%{customdata}<br>mass = %{y:.4f}<extra></extra>")
    )
    fig.update_layout(title=title or f"{head}: attention mass per document", xaxis_title="document",
                      yaxis_title="attention from the answer rows", width=620, height=380, showlegend=False)
    return fig


def explorer_snapshot(
    scores: Float[Tensor, "n_layers n_heads"] | np.ndarray,
    doc_values: Sequence[float] | np.ndarray,
    gold_index: int | None,
    *,
    head: tuple[int, int],
    score_name: str = "relevant",
    marked: Sequence[tuple[int, int]] = (),
    titles: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """A static picture of the head explorer: the layers x heads heatmap (selected head boxed in
    red, `marked` heads crossed) beside the selected head's attention mass per document."""
    from plotly.subplots import make_subplots

    heat = head_heatmap(scores, score_name=score_name)
    n_layers, n_heads = _np(scores).shape
    layer, h = head
    if not (0 <= layer < n_layers and 0 <= h < n_heads):
        raise ValueError(f"head L{layer}H{h} is outside the scores ({n_layers} layers x {n_heads} heads)")
    bars = head_doc_mass(doc_values, gold_index, head=f"L{layer}H{h}", titles=titles)
    spacing, left = 0.18, 0.42  # room between the panels for the colour bar and the bars' axis title
    fig = make_subplots(rows=1, cols=2, column_widths=[left, 1 - left], horizontal_spacing=spacing,
                        subplot_titles=(f"{score_name} score per head", f"L{layer}H{h}: attention mass per document"))
    hm = heat.data[0]
    hm.colorbar.update(x=left * (1 - spacing) + 0.01, xanchor="left", len=0.9)
    fig.add_trace(hm, row=1, col=1)
    if marked:
        m = np.asarray(marked)
        fig.add_trace(go.Scatter(x=m[:, 1], y=m[:, 0], mode="markers", name="intervened heads",
                                 marker=dict(symbol="x", size=9, color="white", line=dict(color="black", width=1)),
                                 customdata=[f"L{a}H{b}" for a, b in marked],
                                 hovertemplate="%{customdata} (intervened)<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=[h], y=[layer], mode="markers", name="selected head",
                             marker=dict(symbol="square-open", size=13, color="red", line=dict(width=3)),
                             hovertemplate=f"L{layer}H{h} (selected)<extra></extra>"), row=1, col=1)
    fig.add_trace(bars.data[0].update(showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="head", dtick=1, row=1, col=1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="document", row=1, col=2)
    fig.update_yaxes(title_text="attention from the answer rows", row=1, col=2)
    fig.update_layout(title=title or "Head explorer", width=1200, height=600,
                      legend=dict(orientation="h", x=0, y=-0.12))
    return fig


def loss_curves(curves: dict[str, Sequence[float]], *, title: str = "Focus-direction training loss") -> go.Figure:
    """One line per run: the mean loss (-S_C per head) after each epoch."""
    if not curves:
        raise ValueError("no loss curves to draw")
    fig = go.Figure()
    for name, losses in curves.items():
        y = np.asarray(losses, dtype=float)
        fig.add_trace(go.Scatter(x=np.arange(1, len(y) + 1), y=y, mode="lines+markers", name=name,
                                 customdata=np.full(len(y), name, dtype=object),
                                 hovertemplate="%{customdata}<br>epoch %{x}: loss %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="loss = -S_C (mean over heads)", width=720, height=420)
    return fig


# --- long-context studies (fdlib.experiments.longctx) -------------------------------------------------------

_CONDITION_COLORS = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]


def versus_baseline_heatmap(
    table: pd.DataFrame,
    *,
    baseline: str = "baseline",
    title: str = "Score per task and length, against the baseline",
    value_name: str = "score",
    n: pd.Series | None = None,
) -> go.Figure:
    """A table laid out as the paper's Table 2 (rows: e.g. task x length; columns: the baseline,
    then each condition) as a heatmap of each cell minus its row's baseline: green better, red
    worse, white equal; each cell is written with its value, hover gives row, column, value,
    baseline and difference. `n` (indexed as the table's rows, e.g. `longctx.table2_n`) adds each
    row's sample count to its label and hover."""
    if baseline not in table.columns:
        raise ValueError(f"no column {baseline!r} in the table; columns: {list(table.columns)}")
    values = table.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    if values.size == 0:
        raise ValueError("the table is empty")
    if n is not None and (missing := [r for r in table.index if r not in n.index]):
        raise ValueError(f"n lacks rows {missing} of the table")
    base = values[:, list(table.columns).index(baseline)][:, None]
    diff = values - base
    rows = [" · ".join(map(str, r)) if isinstance(r, tuple) else str(r) for r in table.index]
    counts = ["" if n is None else str(int(n.loc[r])) for r in table.index]
    if n is not None:
        rows = [f"{r} (n={c})" for r, c in zip(rows, counts)]
    cols = [str(c) for c in table.columns]
    custom = np.empty(values.shape + (4,), dtype=object)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            custom[i, j] = (r, c, f"{base[i, 0]:.3f}", counts[i])
    span = float(np.nanmax(np.abs(diff))) if np.isfinite(diff).any() else 0.0
    span = span or 1.0  # an all-equal table still gets a colour scale
    fig = go.Figure(
        go.Heatmap(
            z=diff, x=cols, y=rows, customdata=custom, text=np.vectorize(lambda v: "" if np.isnan(v) else f"{v:.2f}")(values),
            texttemplate="%{text}", colorscale=[[0, "#d62728"], [0.5, "#ffffff"], [1, "#2ca02c"]],
            zmin=-span, zmax=span, colorbar=dict(title=f"{value_name} -<br>baseline"),
            hovertemplate="%{customdata[0]}<br>%{customdata[1]}: %{text}<br>baseline %{customdata[2]}"
                          "<br>difference %{z:+.3f}" + ("" if n is None else "<br>n=%{customdata[3]}") + "<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title="condition", yaxis_title="task · length",
                      width=max(560, 110 * len(cols) + 220), height=max(320, 36 * len(rows) + 200))
    fig.update_yaxes(autorange="reversed")  # first row on top, as in the table
    return fig


def em_vs_position(
    table: pd.DataFrame,
    *,
    title: str = "Lost in the middle: EM and the contextual heads' attention vs gold position",
    heads_label: str = "top-5 contextual heads",
) -> go.Figure:
    """From `fdlib.experiments.longctx.position_table`: left, EM vs the gold document's position with CIs,
    one line per condition; right, the mean relevant-document score of the heads from the
    answer rows, per position and condition."""
    from plotly.subplots import make_subplots

    needed = {"label", "position", "em", "lo", "hi", "n", "relevant", "relevant_lo", "relevant_hi"}
    if missing := needed - set(table.columns):
        raise ValueError(f"table lacks columns {sorted(missing)}; build it with fdlib.experiments.longctx.position_table")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12,
                        subplot_titles=("exact match", f"relevant-document score, {heads_label}"))
    for i, (label, g) in enumerate(table.groupby("label", sort=False, observed=True)):
        g = g.sort_values("position")
        color = _CONDITION_COLORS[i % len(_CONDITION_COLORS)]
        names = np.full(len(g), str(label), dtype=object)
        for col, (y, lo, hi) in ((1, ("em", "lo", "hi")), (2, ("relevant", "relevant_lo", "relevant_hi"))):
            fig.add_trace(go.Scatter(
                x=g["position"], y=g[y], mode="lines+markers", name=str(label), legendgroup=str(label),
                showlegend=col == 1, line=dict(color=color),
                error_y=dict(type="data", symmetric=False, array=g[hi] - g[y], arrayminus=g[y] - g[lo]),
                customdata=np.stack([names, g["lo" if col == 1 else "relevant_lo"], g["hi" if col == 1 else "relevant_hi"],
                                     g["n"]], axis=-1),
                hovertemplate="%{customdata[0]}<br>gold at %{x}: %{y:.3f} [%{customdata[1]:.3f}, %{customdata[2]:.3f}]"
                              "<br>n = %{customdata[3]}<extra></extra>",
            ), row=1, col=col)
    fig.update_xaxes(title_text="position of the gold document", row=1, col=1)
    fig.update_xaxes(title_text="position of the gold document", row=1, col=2)
    fig.update_yaxes(title_text="exact match", row=1, col=1)
    fig.update_yaxes(title_text="attention on the gold document", row=1, col=2)
    fig.update_layout(title=title, width=1100, height=460, legend=dict(orientation="h", x=0, y=-0.2))
    return fig


_SET_COLORS = ("#eeeeee", "#1f77b4", "#ff7f0e", "#9467bd")


def head_sets_map(
    first: Sequence[tuple[int, int]],
    second: Sequence[tuple[int, int]],
    n_layers: int,
    n_heads: int,
    *,
    names: tuple[str, str] = ("retrieval", "contextual"),
    scores: dict[str, Float[Tensor, "n_layers n_heads"] | np.ndarray] | None = None,
    title: str | None = None,
) -> go.Figure:
    """The paper's Figure 9: a layers x heads map marking the heads in the first set only, the
    second only, or both; hover gives `L{l}H{h}`, its set, and each of `scores` (e.g. the
    retrieval and relevant scores) at that head."""
    from fdlib.experiments.longctx import head_set_grid

    grid = head_set_grid(first, second, n_layers, n_heads)  # 0 neither, 1 first only, 2 second only, 3 both
    kinds = np.array(["neither", f"{names[0]} only", f"{names[1]} only", "both"], dtype=object)
    extra = ""
    parts = [_labels(n_layers, n_heads), kinds[grid]]
    for name, s in (scores or {}).items():
        arr = _np(s).astype(float)
        if arr.shape != grid.shape:
            raise ValueError(f"scores {name!r} have shape {arr.shape}, expected {grid.shape}")
        extra += f"<br>{name} score %{{customdata[{len(parts)}]:.4f}}"
        parts.append(arr)
    custom = np.stack(parts, axis=-1)
    # A discrete colour per kind: each value owns a quarter of the colour scale.
    scale = []
    for v, c in enumerate(_SET_COLORS):
        scale += [[v / 4, c], [(v + 1) / 4, c]]
    fig = go.Figure(go.Heatmap(
        z=grid, x=list(range(n_heads)), y=list(range(n_layers)), customdata=custom, zmin=-0.5, zmax=3.5,
        colorscale=scale, xgap=1, ygap=1,
        colorbar=dict(tickvals=[0, 1, 2, 3], ticktext=list(kinds), title="head set"),
        hovertemplate="%{customdata[0]}: %{customdata[1]}" + extra + "<extra></extra>",
    ))
    n_both = int((grid == 3).sum())
    fig.update_layout(title=title or f"Top-{len(first)} {names[0]} vs top-{len(second)} {names[1]} heads ({n_both} in both)",
                      xaxis_title="head", yaxis_title="layer", width=560, height=680)
    fig.update_xaxes(dtick=1)
    return fig


def em_by_condition(
    table: pd.DataFrame,
    *,
    title: str = "Exact match per condition",
    value: str = "em",
) -> go.Figure:
    """One bar per condition (`label`) with its bootstrap CI, coloured by method; from
    `fdlib.experiments.longctx.condition_table`."""
    needed = {"label", "method", value, "lo", "hi", "n"}
    if missing := needed - set(table.columns):
        raise ValueError(f"table lacks columns {sorted(missing)}; build it with fdlib.experiments.longctx.condition_table")
    colors = {"baseline": "#7f7f7f", "split": "#2ca02c", "focus": "#1f77b4", "ablate": "#d62728"}
    labels = [str(x) for x in table["label"]]
    fig = go.Figure(go.Bar(
        x=labels, y=table[value], marker_color=[colors.get(m, "#17becf") for m in table["method"]],
        error_y=dict(type="data", symmetric=False, array=table["hi"] - table[value], arrayminus=table[value] - table["lo"]),
        customdata=np.stack([np.array(labels, dtype=object), table["lo"], table["hi"], table["n"]], axis=-1),
        hovertemplate="%{customdata[0]}<br>%{y:.3f} [%{customdata[1]:.3f}, %{customdata[2]:.3f}], n = %{customdata[3]}<extra></extra>",
    ))
    fig.update_layout(title=title, xaxis_title="condition", yaxis_title="exact match", width=820, height=440)
    return fig


_FAMILY_COLORS = {"label-using": "#2ca02c", "label-free": "#1f77b4", "random-head control": "#bdbdbd"}


def em_gain(table: pd.DataFrame, *, title: str = "EM gain over no intervention") -> go.Figure:
    """One bar per method's chosen setting (coloured by family: label-using, label-free) and one
    per its random-head control (grey), the EM gain over the baseline with its paired bootstrap
    CI; from `fdlib.experiments.compare.comparison_table`. Hover: the setting, EM, n, questions gained and
    lost, McNemar's p."""
    needed = {"method", "family", "setting", "em", "gain", "gain_lo", "gain_hi", "n", "gained", "lost", "p_value"}
    if missing := needed - set(table.columns):
        raise ValueError(f"table lacks columns {sorted(missing)}; build it with fdlib.experiments.compare.comparison_table")
    t = table[table.family != "baseline"]
    fig = go.Figure()
    for family, color in _FAMILY_COLORS.items():
        d = t[t.family == family]
        if d.empty:
            continue
        fig.add_trace(go.Bar(
            x=d.method, y=d.gain, name=family, marker_color=color,
            error_y=dict(type="data", symmetric=False, array=d.gain_hi - d.gain, arrayminus=d.gain - d.gain_lo),
            customdata=np.stack([d.setting.astype(str), d.em, d.n, d.gained, d.lost, d.p_value], axis=-1),
            hovertemplate="%{x}: %{customdata[0]}<br>gain %{y:+.3f}, EM %{customdata[1]:.3f} (n = %{customdata[2]})"
                          "<br>gained %{customdata[3]}, lost %{customdata[4]}, McNemar p = %{customdata[5]:.3g}<extra></extra>",
        ))
    order = list(dict.fromkeys(list(t[t.family == "label-using"].method) + list(t[t.family == "label-free"].method)))
    fig.update_layout(title=title, barmode="group", xaxis=dict(categoryorder="array", categoryarray=order),
                      xaxis_title="method (chosen on train questions)", yaxis_title="EM gain over the baseline",
                      width=900, height=460)
    return fig
