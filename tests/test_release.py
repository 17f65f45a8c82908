"""The paper's released rankings and directions, on the packaged files alone (no model download):
shapes, norms and top heads as the release's README states them, refusal for a model that is
not released, the FocusDirections file round trip, and the packaged data against the source."""

import fnmatch
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny

from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.release import (
    RELEASE_ALPHA,
    RELEASE_K,
    RELEASED_MODELS,
    _package_dir,
    load_release,
    released_directions,
    released_heads,
)

LLAMA = "meta-llama/Llama-3.2-3B-Instruct"
SHAPES = {
    LLAMA: (28, 24, 128),
    "Qwen/Qwen2.5-7B-Instruct": (28, 28, 128),
    "mistralai/Ministral-8B-Instruct-2410": (36, 32, 128),
}
# The release README's top-3 heads, [layer, head].
TOP3 = {
    LLAMA: [(13, 23), (12, 1), (15, 18)],
    "Qwen/Qwen2.5-7B-Instruct": [(19, 15), (19, 22), (22, 7)],
    "mistralai/Ministral-8B-Instruct-2410": [(17, 28), (16, 30), (18, 13)],
}
SOURCE = Path(os.environ.get("FDLIB_RELEASE_SOURCE") or Path(__file__).resolve().parents[2] / "shared" / "data" / "focus-direction-release")


def stub(name, shape):
    """Just what load_release and FocusDirections.check read from a bridge: its name and cfg."""
    n_layers, n_heads, d_head = shape
    return SimpleNamespace(_fdlib_name=name, cfg=SimpleNamespace(n_layers=n_layers, n_heads=n_heads, d_head=d_head))


def test_released_models():
    assert {n: m.shape for n, m in RELEASED_MODELS.items()} == SHAPES
    assert (RELEASE_K, RELEASE_ALPHA) == (20, 0.2)


@pytest.mark.parametrize("name", list(SHAPES))
def test_directions_shape_and_metadata(name):
    d = released_directions(name)
    assert d.shape == SHAPES[name] and d.d_q.dtype == torch.float32 and d.d_k.dtype == torch.float32
    assert d.model_name == name and d.placement == "post_rope" and d.training_set == "long"
    s = d.settings
    assert s["source_commit"] == "359500496f1082b0740616216c197592df7767b6"
    assert s["license"] == "MIT" and "Youxiang Zhu" in s["copyright"]
    assert (s["k"], s["alpha"]) == (20, 0.2)
    assert torch.isfinite(d.d_q).all() and torch.isfinite(d.d_k).all()


@pytest.mark.parametrize("name", list(SHAPES))
def test_norms_as_the_release_states(name):
    """README: mean |d_Q| 27-29 and mean |d_K| 0.6-0.9 over all heads (as rounded there)."""
    d = released_directions(name)
    q = d.d_q.norm(dim=-1).mean().item()
    k = d.d_k.norm(dim=-1).mean().item()
    assert 27 <= round(q) <= 29, q
    assert 0.6 <= round(k, 1) <= 0.9, k
    assert (d.d_q.norm(dim=-1) > 0).all()  # every head has a trained direction


@pytest.mark.parametrize("name", list(SHAPES))
def test_ranking_is_every_head_once(name):
    n_layers, n_heads, _ = SHAPES[name]
    heads = released_heads(name)
    assert all(isinstance(l, int) and isinstance(h, int) for l, h in heads)
    assert len(heads) == n_layers * n_heads
    assert set(heads) == {(l, h) for l in range(n_layers) for h in range(n_heads)}
    assert heads[:3] == TOP3[name]


def test_names_resolve():
    for alias in ("Llama-3.2-3B-Instruct", "meta-llama_Llama-3.2-3B-Instruct", "/models/llama-3.2-3b-instruct/"):
        assert released_heads(alias) == released_heads(LLAMA)
    with pytest.raises(ValueError, match="'gpt2'.*Llama-3.2-3B-Instruct"):
        released_directions("gpt2")


def test_load_release_for_a_released_model():
    model = stub(LLAMA, SHAPES[LLAMA])
    dirs, heads = load_release(model)
    assert dirs.check(model) is dirs
    assert dirs.settings["release_model"] == LLAMA
    assert torch.equal(dirs.d_q, released_directions(LLAMA).d_q)
    assert heads[:3] == TOP3[LLAMA]
    # loaded from a local directory: the directions carry the model's own name
    local = stub("/models/Llama-3.2-3B-Instruct", SHAPES[LLAMA])
    dirs, _ = load_release(local)
    assert dirs.model_name == "/models/Llama-3.2-3B-Instruct" and dirs.check(local) is dirs


def test_refuses_a_model_that_is_not_released(tiny):
    from fdlib.model.loading import model_name

    name = model_name(tiny.model)
    assert name not in RELEASED_MODELS
    with pytest.raises(ValueError) as err:
        load_release(tiny.model)
    assert repr(name) in str(err.value) and LLAMA in str(err.value)


def test_refuses_a_released_name_with_the_wrong_shape():
    model = build_tiny(seed=1).model
    model.__dict__["_fdlib_name"] = LLAMA  # named like the release, but 2 layers x 4 heads x 8
    with pytest.raises(ValueError) as err:
        load_release(model)
    msg = str(err.value)
    assert repr(LLAMA) in msg and "(2, 4, 8)" in msg and "(28, 24, 128)" in msg
    with pytest.raises(ValueError, match="shape"):
        released_directions(LLAMA).check(model)


def test_round_trip_through_the_file_format(tmp_path):
    d = released_directions("Qwen/Qwen2.5-7B-Instruct")
    back = FocusDirections.load(d.save(tmp_path / "qwen.safetensors"))
    assert torch.equal(back.d_q, d.d_q) and torch.equal(back.d_k, d.d_k)
    assert (back.model_name, back.placement, back.training_set, back.split_seed, back.settings) == (
        d.model_name, d.placement, d.training_set, d.split_seed, d.settings)
    model = stub(LLAMA, SHAPES[LLAMA])
    dirs, _ = load_release(model)
    again = FocusDirections.load(dirs.save(tmp_path / "llama.safetensors"), model)
    assert torch.equal(again.d_q, dirs.d_q) and again.settings == dirs.settings


def test_package_ships_its_files_with_the_licence():
    folder = _package_dir()
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    for m in RELEASED_MODELS.values():
        assert f"{m.slug}.safetensors" in files and f"{m.slug}.relevant_heads.json" in files
    assert {"LICENSE", "README.md", "SOURCE_README.md"} <= set(files)
    assert "Copyright (c) 2025 Youxiang Zhu" in (folder / "LICENSE").read_text()
    assert "Copyright (c) 2025 Youxiang Zhu" in (folder / "README.md").read_text()
    assert sum((folder / f).stat().st_size for f in files) < 4 * 2**20
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["fdlib"]
    for f in files:
        assert any(fnmatch.fnmatch(f"data/focus-direction-release/{f}", g) for g in globs), f


def test_packaged_data_equals_the_source():
    if not (SOURCE / "LICENSE").is_file():
        pytest.skip(f"release source {SOURCE} not here")
    folder = _package_dir()
    assert (folder / "LICENSE").read_bytes() == (SOURCE / "LICENSE").read_bytes()
    assert (folder / "SOURCE_README.md").read_bytes() == (SOURCE / "README.md").read_bytes()
    for name, m in RELEASED_MODELS.items():
        src_heads = json.loads((SOURCE / "contextual_heads_scores_full_seq" / m.slug / "relevant_heads.json").read_text())
        assert released_heads(name) == [tuple(x) for x in src_heads]
        d = released_directions(name)
        pth = SOURCE / "head_features" / m.slug / "direction_relevant"
        assert len(list(pth.glob("*.pth"))) == 2 * m.n_layers
        for layer in range(m.n_layers):
            for kind, got in (("q", d.d_q), ("k", d.d_k)):
                want = torch.load(pth / f"head_{kind}_directions_{layer}.pth", map_location="cpu", weights_only=True)
                assert torch.equal(got[layer], want.detach().float()), (name, kind, layer)


def test_release_norms_per_head_and_per_sqrt_d_head():
    from fdlib.interventions.directions import direction_norms
    from fdlib.interventions.release import release_norms

    t = release_norms(5)
    assert len(t) == 3 * 5 and set(t["rank"]) == {1, 2, 3, 4, 5}
    name = "meta-llama/Llama-3.2-3B-Instruct"
    d, (l, h) = released_directions(name), released_heads(name)[0]
    row = t[(t.source == name) & (t["rank"] == 1)].iloc[0]
    assert row["head"] == f"L{l}H{h}" and row.dq_norm == pytest.approx(float(d.d_q[l, h].norm()))
    assert row.dq_per_sqrt_d == pytest.approx(row.dq_norm / 128 ** 0.5)
    assert list(direction_norms(d, [(0, 0)]).columns)[:4] == ["source", "rank", "head", "d_head"]
