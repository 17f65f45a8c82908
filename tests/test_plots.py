import shutil

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from fdlib.views import plots


def test_head_heatmap_hover_and_axes():
    z = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 100
    fig = plots.head_heatmap(z, score_name="relevant")
    assert isinstance(fig, go.Figure)
    hm = fig.data[0]
    assert np.allclose(np.asarray(hm.z), z.numpy())
    assert hm.customdata[2][1] == "L2H1"
    assert "%{customdata}" in hm.hovertemplate and "%{z:.6f}" in hm.hovertemplate
    assert fig.layout.xaxis.title.text == "head" and fig.layout.yaxis.title.text == "layer"
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        plots.head_heatmap(torch.zeros(3))


def test_sink_vs_relevant_points_and_highlight():
    r, s = np.random.rand(5, 3), np.random.rand(5, 3)
    fig = plots.sink_vs_relevant(r, s, highlight=[(4, 2), (0, 1)])
    pts = fig.data[0]
    assert len(pts.x) == 15 and pts.customdata[14] == "L4H2"
    assert pts.x[14] == pytest.approx(s[4, 2]) and pts.y[14] == pytest.approx(r[4, 2])
    assert list(fig.data[1].customdata) == ["L4H2", "L0H1"]
    assert fig.data[1].y[0] == pytest.approx(r[4, 2])
    with pytest.raises(ValueError):
        plots.sink_vs_relevant(r, s[:2])


def test_layer_histogram_counts():
    fig = plots.layer_histogram([(1, 0), (1, 3), (4, 2)], n_layers=6)
    assert list(fig.data[0].y) == [0, 2, 0, 0, 1, 0]
    assert fig.data[0].customdata[1] == "L1H0, L1H3"
    with pytest.raises(ValueError, match="L9H0"):
        plots.layer_histogram([(9, 0)], n_layers=6)


def test_save_figure_writes_html_and_png(tmp_path):
    fig = plots.head_heatmap(torch.rand(3, 2))
    png = shutil.which("chromium") is not None
    paths = plots.save_figure(fig, "x", tmp_path, png=png)
    html = (tmp_path / "x.html").read_text()
    assert 'src="plotly.min.js"' in html and (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert len(html) < 100_000
    if png:
        assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(p.exists() for p in paths)
    assert not list(tmp_path.glob(".x*"))  # no temporary file left behind
    plots.save_figure(fig, "x", tmp_path, png=False)
    assert (tmp_path / "x.html").read_text() == html  # regenerating the same figure is byte-identical


def em_table_fixture():
    import pandas as pd

    rows = [dict(input="long", heads="none", tau=np.nan, k=np.nan, em=0.2, lo=0.1, hi=0.3, n=10),
            dict(input="gold", heads="none", tau=np.nan, k=np.nan, em=0.5, lo=0.4, hi=0.6, n=10)]
    for heads in ("contextual", "random"):
        for tau in (0.1, 1000.0):
            for k in (1, 5, 20):
                rows.append(dict(input="long", heads=heads, tau=tau, k=k, em=k / 100 + tau / 1e4, lo=0.0, hi=0.9, n=10))
    return pd.DataFrame(rows)


def test_em_vs_k_lines_baselines_and_hover():
    fig = plots.em_vs_k(em_table_fixture())
    names = [t.name for t in fig.data]
    assert names[:4] == ["tau=0.1, contextual", "tau=0.1, random", "tau=1000, contextual", "tau=1000, random"]
    assert names[4:] == ["long input, no intervention: 0.20 [0.10, 0.30]", "gold input, no intervention: 0.50 [0.40, 0.60]"]
    assert list(fig.data[0].x) == [1, 5, 20] and fig.data[0].y[2] == pytest.approx(0.20001)
    assert fig.data[1].line.dash == "dash"
    assert list(fig.data[5].y) == [0.5, 0.5] and list(fig.data[5].x) == [1, 20]
    assert fig.layout.xaxis.title.text == "number of heads k" and "%{customdata[0]" in fig.data[0].hovertemplate
    with pytest.raises(ValueError, match="lacks columns"):
        plots.em_vs_k(em_table_fixture().drop(columns=["lo"]))


def test_doc_attention_marks_gold():
    fig = plots.doc_attention([0.1, 0.2, 0.3], [0.05, 0.6, 0.1], 1, head="L3H2")
    assert list(fig.data[0].x) == ["doc 1", "doc 2 (gold)", "doc 3"]
    assert list(fig.data[1].y) == [0.05, 0.6, 0.1] and "L3H2" in fig.layout.title.text
    with pytest.raises(ValueError):
        plots.doc_attention([0.1], [0.1, 0.2], 0, head="x")


def test_em_vs_k_alpha_lines_skip_other_methods():
    t = em_table_fixture()
    t["alpha"] = np.nan
    extra = t[t.heads != "none"].copy()
    extra["tau"], extra["alpha"] = np.nan, 0.5
    both = pd.concat([t, extra], ignore_index=True)
    names = [d.name for d in plots.em_vs_k(both, param="alpha").data]
    assert names[:2] == ["alpha=0.5, contextual", "alpha=0.5, random"] and not any("tau" in n for n in names)
    with pytest.raises(ValueError, match="param"):
        plots.em_vs_k(both, param="k")


FIGURE_4_ALPHAS = (-0.5, -0.2, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0)


def _figure_4_rows() -> list[dict]:
    """`em_table` rows of Figure 4's grid: each alpha on contextual and random heads, two k."""
    return [dict(input="long", heads=heads, alpha=a, k=k, em=0.1, lo=0.0, hi=0.2, n=10)
            for a in FIGURE_4_ALPHAS for heads in ("contextual", "random") for k in (1, 10)]


def test_em_vs_k_gives_each_value_of_figure_4s_grid_its_own_colour():
    alphas = FIGURE_4_ALPHAS
    fig = plots.em_vs_k(pd.DataFrame(_figure_4_rows()), param="alpha")
    colour = {d.name: d.line.color for d in fig.data}
    assert len({colour[f"alpha={a:g}, contextual"] for a in alphas}) == len(alphas)
    assert all(colour[f"alpha={a:g}, random"] == colour[f"alpha={a:g}, contextual"] for a in alphas)


def test_em_vs_k_is_tall_enough_for_figure_4s_legend():
    # 16 lines and 3 baselines: at the old fixed 520 px the static image clipped the last entries.
    rows = _figure_4_rows() + [dict(input=i, heads="none", alpha=np.nan, k=np.nan, em=0.1, lo=0.0, hi=0.2, n=10)
             for i in ("long", "gold", "negative")]
    fig = plots.em_vs_k(pd.DataFrame(rows), param="alpha")
    assert len(fig.data) == 19
    margins = 100 + 80  # plotly's default top and bottom margins
    assert fig.layout.height - margins >= 19 * 19  # plotly's legend entry is ~19 px at the default font
    small = plots.em_vs_k(pd.DataFrame(rows[:4]), param="alpha")
    assert small.layout.height == 520  # small grids keep the usual size


def test_key_bias_and_loss_curves():
    fig = plots.key_bias_by_token([0.5, 0.1, 0.2, 0.3, 0.4], list("abcde"), [(1, 3), (3, 5)], 1, head="L1H2")
    by_name = {d.name: d for d in fig.data}
    assert list(by_name["sink"].x) == [0] and list(by_name["doc 2 (gold)"].x) == [3, 4]
    assert "L1H2" in fig.layout.title.text and "%{customdata[0]}" in fig.data[0].hovertemplate
    with pytest.raises(ValueError, match="outside"):
        plots.key_bias_by_token([0.1, 0.2], ["a", "b"], [(1, 3)], None, head="x")
    fig = plots.loss_curves({"gold": [-0.1, -0.2], "long": [-0.05, -0.06]})
    assert [d.name for d in fig.data] == ["gold", "long"] and list(fig.data[0].x) == [1, 2]


def test_save_figure_in_a_model_subfolder_shares_the_galleries_plotly(tmp_path):
    fig = plots.head_heatmap(torch.rand(3, 2))
    plots.save_figure(fig, "x", tmp_path, png=False)
    plots.save_figure(fig, "y", tmp_path / "gemma-3-270m", png=False)
    assert 'src="../plotly.min.js"' in (tmp_path / "gemma-3-270m" / "y.html").read_text()
    assert not (tmp_path / "gemma-3-270m" / "plotly.min.js").exists()
    plots.save_figure(fig, "z", tmp_path / "elsewhere" / "alone", png=False)  # no copy in the parent: its own
    assert (tmp_path / "elsewhere" / "alone" / "plotly.min.js").is_file()


def test_em_vs_alpha_one_line_per_head_choice_and_the_baseline():
    rows = [{"input": "long", "heads": "none", "alpha": np.nan, "k": np.nan, "em": 0.2, "lo": 0.1, "hi": 0.3, "n": 40}]
    for a, e in ((-0.5, 0.1), (0.3, 0.4), (1.0, 0.15)):
        rows.append({"input": "long", "heads": "contextual", "alpha": a, "k": 20, "em": e, "lo": e - 0.05, "hi": e + 0.05, "n": 40})
    rows.append({"input": "long", "heads": "random", "alpha": 0.3, "k": 20, "em": 0.22, "lo": 0.15, "hi": 0.3, "n": 40})
    fig = plots.em_vs_alpha(pd.DataFrame(rows))
    assert [t.name for t in fig.data] == ["contextual heads, k=20", "random heads, k=20",
                                         "long input, no intervention: 0.20 [0.10, 0.30]"]
    assert list(fig.data[0].x) == [-0.5, 0.3, 1.0] and list(fig.data[0].y) == [0.1, 0.4, 0.15]
    assert fig.data[1].line.dash == "dash" and list(fig.data[2].x) == [-0.5, 1.0] and list(fig.data[2].y) == [0.2, 0.2]
    with pytest.raises(ValueError, match="lacks columns"):
        plots.em_vs_alpha(pd.DataFrame(rows).drop(columns=["k"]))
