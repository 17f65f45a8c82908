"""Figure builders: each returns a `plotly.graph_objects.Figure` with axis titles and hover text
built from `customdata`; `save_figure` writes interactive HTML and a static PNG."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from torch import Tensor


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


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; figures are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig: go.Figure, name: str, directory: str | Path = "figures", *, png: bool = True) -> list[Path]:
    """Write `{name}.html` (interactive) and `{name}.png` (kaleido, which needs a Chromium:
    Debian's `chromium` package works). Returns the paths.

    The HTML loads `plotly.min.js` from its own directory (written once): it opens offline and
    each figure stays a few kB instead of carrying its own 4.8 MB copy of plotly.js.
    """
    directory = Path(directory)
    html = directory / f"{name}.html"
    js = directory / "plotly.min.js"
    if not js.is_file():
        from plotly.offline import get_plotlyjs

        _atomic_write(js, lambda p: Path(p).write_text(get_plotlyjs(), encoding="utf-8"))
    # A fixed div id keeps a regenerated figure byte-identical when its data did not change.
    _atomic_write(html, lambda p: fig.write_html(p, include_plotlyjs="plotly.min.js", full_html=True, div_id=name))
    written = [html]
    if png:
        target = directory / f"{name}.png"
        _atomic_write(target, lambda p: fig.write_image(p, format="png", scale=2))
        written.append(target)
    return written


_TAU_COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#d62728", "#8c564b", "#17becf"]


def em_vs_k(table: pd.DataFrame, *, title: str = "EM vs number of heads, split-softmax") -> go.Figure:
    """The paper's Figure 3 from `sweeps.em_table`: one line per tau (solid: contextual heads,
    dashed: random heads), CIs as error bars, baselines (no intervention) as horizontal lines."""
    needed = {"input", "heads", "tau", "k", "em", "lo", "hi", "n"}
    if missing := needed - set(table.columns):
        raise ValueError(f"table lacks columns {sorted(missing)}; build it with fdlib.sweeps.em_table")
    fig = go.Figure()
    lines = table[table.heads != "none"]
    for i, tau in enumerate(sorted(lines.tau.unique())):
        color = _TAU_COLORS[i % len(_TAU_COLORS)]
        for heads, dash in (("contextual", "solid"), ("random", "dash")):
            d = lines[(lines.tau == tau) & (lines.heads == heads)].sort_values("k")
            if d.empty:
                continue
            fig.add_trace(
                go.Scatter(
                    x=d.k, y=d.em, mode="lines+markers",
                    line=dict(color=color, dash=dash),
                    error_y=dict(type="data", symmetric=False, array=d.hi - d.em, arrayminus=d.em - d.lo),
                    name=f"tau={tau:g}, {heads}",
                    customdata=np.stack([d.lo, d.hi, d.n], axis=-1),
                    hovertemplate=f"tau={tau:g}, {heads} heads<br>k=%{{x}}<br>EM=%{{y:.3f}} "
                    "[%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>n=%{customdata[2]}<extra></extra>",
                )
            )
    # Baselines as legend entries (not annotations): equal baselines would print on top of each other.
    ks = lines.k.dropna()
    x_span = [ks.min(), ks.max()] if len(ks) else [1, 1]
    base_style = {"long": ("black", "dot"), "gold": ("#2ca02c", "dashdot"), "negative": ("#7f7f7f", "longdash")}
    for _, b in table[table.heads == "none"].iterrows():
        color, dash = base_style.get(b.input, ("gray", "dot"))
        label = f"{b.input} input, no intervention: {b.em:.2f} [{b.lo:.2f}, {b.hi:.2f}]"
        fig.add_trace(go.Scatter(x=x_span, y=[b.em, b.em], mode="lines", line=dict(color=color, dash=dash, width=1.5),
                                 name=label, hovertemplate=label + "<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="number of heads k", yaxis_title="exact match",
                      xaxis_type="log", width=980, height=520)
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
