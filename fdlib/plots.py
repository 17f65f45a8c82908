"""Figure builders: each returns a `plotly.graph_objects.Figure` with axis titles and hover text
built from `customdata`; `save_figure` writes interactive HTML and a static PNG."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
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
    _atomic_write(html, lambda p: fig.write_html(p, include_plotlyjs="plotly.min.js", full_html=True))
    written = [html]
    if png:
        target = directory / f"{name}.png"
        _atomic_write(target, lambda p: fig.write_image(p, format="png", scale=2))
        written.append(target)
    return written
