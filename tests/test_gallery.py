"""The README gallery is built from what is on disk: every figure of every notebook, findings."""

import json

import pytest

from fdlib.views import gallery


def layout(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "figures").mkdir()
    for nb in ("01_alpha", "02_beta"):
        (tmp_path / "notebooks" / f"{nb}.ipynb").write_text("{}")
    for fig in ("01_a", "01_b", "02_c"):
        (tmp_path / "figures" / f"{fig}.png").write_bytes(b"png")
        (tmp_path / "figures" / f"{fig}.html").write_text("<html>")
    return tmp_path


def test_gallery_lists_every_figure_and_the_findings(tmp_path):
    root = layout(tmp_path)
    gallery.record_findings("01_alpha", [{"finding": "EM long", "value": 0.0712, "lo": 0.03, "hi": 0.12, "n": 100},
                                         {"finding": "heads > 0.05", "value": 5}], root / "figures")
    md = gallery.gallery_markdown(root / "figures", root / "notebooks")
    for fig in ("01_a", "01_b", "02_c"):
        assert f"[![{fig}](figures/{fig}.png)](figures/{fig}.html)" in md
    assert md.index("01_alpha") < md.index("01_a.png") < md.index("02_beta") < md.index("02_c.png")
    assert "| [`01`](notebooks/01_alpha.ipynb) | EM long | 0.07 | [0.03, 0.12] | 100 |" in md
    assert "| heads > 0.05 | 5.00 |  |  |" in md


def test_update_readme_replaces_only_the_marked_block(tmp_path):
    root = layout(tmp_path)
    readme = root / "README.md"
    readme.write_text(f"intro\n{gallery.START}\nold\n{gallery.END}\nrest\n")
    assert gallery.update_readme(readme, root / "figures", root / "notebooks")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{gallery.END}\nrest\n") and "old" not in text
    assert "02_c.png" in text
    assert not gallery.update_readme(readme, root / "figures", root / "notebooks")  # idempotent
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="gallery:start"):
        gallery.update_readme(readme, root / "figures", root / "notebooks")


def test_bad_findings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="notebook must look like"):
        gallery.record_findings("alpha", [], tmp_path)
    with pytest.raises(ValueError, match="needs 'finding' and 'value'"):
        gallery.record_findings("01_alpha", [{"value": 1}], tmp_path)
    p = gallery.record_findings("01_alpha", [{"finding": "x", "value": 1, "lo": None}], tmp_path)
    assert json.loads(p.read_text())["findings"] == [{"finding": "x", "value": 1.0}]


def test_other_models_get_their_own_folders_and_findings(tmp_path):
    root = layout(tmp_path)
    other = root / "figures" / "gemma-3-270m"
    other.mkdir()
    (other / "01_a.png").write_bytes(b"png")
    gallery.record_findings("01_alpha", [{"finding": "EM gold only", "value": 0.5, "lo": 0.2, "hi": 0.8, "n": 10}], other)
    md = gallery.gallery_markdown(root / "figures", root / "notebooks")
    assert "**Findings on `gemma-3-270m`**" in md
    assert "| [`01`](notebooks/01_alpha.ipynb) | EM gold only | 0.50 | [0.20, 0.80] | 10 | ?, float32 |" in md
    assert "[![01_a](figures/gemma-3-270m/01_a.png)](figures/gemma-3-270m/01_a.png)" in md
    assert md.index("02_c.png") < md.index("gemma-3-270m")  # after the default model's gallery


def test_findings_carry_their_dtype_and_each_dtype_has_its_gallery(tmp_path):
    root = layout(tmp_path)
    p = gallery.record_findings("01_alpha", [{"finding": "EM long", "value": 0.25, "n": 4}], root / "figures",
                                size="paper", dtype="float32")
    assert json.loads(p.read_text())["dtype"] == "float32"
    assert "dtype" not in json.loads(gallery.record_findings("02_beta", [], root / "figures", size=3).read_text())
    assert gallery.run_label({"size": "paper"}) == "paper, float32"  # written before the dtype was a setting
    bf16 = root / "figures" / "bfloat16"
    gemma_bf16 = root / "figures" / "gemma-3-270m" / "bfloat16"
    for folder, value in ((bf16, 0.5), (gemma_bf16, 0.75)):
        folder.mkdir(parents=True)
        (folder / "01_a.png").write_bytes(b"png")
        gallery.record_findings("01_alpha", [{"finding": "EM long", "value": value, "n": 4}], folder,
                                size="paper", dtype="bfloat16")
    md = gallery.gallery_markdown(root / "figures", root / "notebooks")
    assert "| EM long | 0.25 |  | 4 | paper, float32 |" in md
    assert "| size, dtype |" in md
    assert "**Findings in `bfloat16`** (`FDLIB_DTYPE=bfloat16`)" in md and "Findings on `bfloat16`" not in md
    assert "| EM long | 0.50 |  | 4 | paper, bfloat16 |" in md
    assert "[![01_a](figures/bfloat16/01_a.png)](figures/bfloat16/01_a.png)" in md
    assert "**Findings on `gemma-3-270m` in `bfloat16`** (`FDLIB_MODEL=gemma-3-270m FDLIB_DTYPE=bfloat16`)" in md
    assert "| EM long | 0.75 |  | 4 | paper, bfloat16 |" in md
    assert "[![01_a](figures/gemma-3-270m/bfloat16/01_a.png)](figures/gemma-3-270m/bfloat16/01_a.png)" in md
    assert md.index("0.25") < md.index("0.50") < md.index("0.75")  # float32 first, then the default model's others
