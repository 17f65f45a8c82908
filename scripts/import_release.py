"""Regenerate fdlib/data/focus-direction-release/ from the authors' released artifacts.

    .venv/bin/python scripts/import_release.py [--source DIR] [--out DIR]

The source is the data of the authors' repository billzyx/focus_direction (MIT, Copyright (c)
2025 Youxiang Zhu), laid out as in its README:

    contextual_heads_scores_full_seq/<owner>_<name>/relevant_heads.json
    head_features/<owner>_<name>/direction_relevant/head_{q,k}_directions_<layer>.pth

For each model of `fdlib.interventions.release.RELEASED_MODELS` it writes, into `--out`:

- `<owner>_<name>.safetensors`: an fdlib focus-directions file (`FocusDirections.save`): d_q and
  d_k stacked over layers to [n_layers, n_heads, d_head] float32, exact copies of the .pth
  Parameters; placement post_rope, training_set long, the release's settings in the header;
- `<owner>_<name>.relevant_heads.json`: the ranking, every head as [layer, head], best first,
  exactly as released;

and copies the source's LICENSE and README.md (as SOURCE_README.md) beside them. The packaged
README.md is written by hand and is left alone. tests/test_release.py checks the packaged files
against the source whenever the source folder exists.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from fdlib.interventions.directions import FocusDirections
from fdlib.interventions.release import RELEASED_MODELS, ReleasedModel, _package_dir, _release_settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "focus-direction-release"


def read_directions(
    source: Path, spec: ReleasedModel
) -> tuple[Float[Tensor, "n_layers n_heads d_head"], Float[Tensor, "n_layers n_heads d_head"]]:
    """d_q, d_k of one model from the per-layer .pth files: [n_layers, n_heads, d_head] each."""
    folder = source / "head_features" / spec.slug / "direction_relevant"
    out = []
    for kind in ("q", "k"):
        layers = []
        for layer in range(spec.n_layers):
            t = torch.load(folder / f"head_{kind}_directions_{layer}.pth", map_location="cpu", weights_only=True)
            t = t.detach().float()
            if tuple(t.shape) != (spec.n_heads, spec.d_head):
                raise ValueError(f"{spec.hf_name}: layer {layer} d_{kind} has shape {tuple(t.shape)}, expected {(spec.n_heads, spec.d_head)}")
            layers.append(t)
        extra = folder / f"head_{kind}_directions_{spec.n_layers}.pth"
        if extra.exists():
            raise ValueError(f"{spec.hf_name}: {extra} exists: more layers than the {spec.n_layers} expected")
        out.append(torch.stack(layers).contiguous())
    return out[0], out[1]


def read_heads(source: Path, spec: ReleasedModel) -> list[list[int]]:
    heads = json.loads((source / "contextual_heads_scores_full_seq" / spec.slug / "relevant_heads.json").read_text())
    pairs = [(int(l), int(h)) for l, h in heads]
    every = {(l, h) for l in range(spec.n_layers) for h in range(spec.n_heads)}
    if len(pairs) != len(every) or set(pairs) != every:
        raise ValueError(f"{spec.hf_name}: relevant_heads.json is not a permutation of its {len(every)} heads")
    return [[l, h] for l, h in pairs]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    ap.add_argument("--out", type=Path, default=None, help="default: the package's data folder")
    args = ap.parse_args(argv)
    source: Path = args.source
    out: Path = args.out or _package_dir()
    if not (source / "LICENSE").is_file():
        raise SystemExit(f"{source}: no LICENSE here; is this the release folder?")
    out.mkdir(parents=True, exist_ok=True)
    for spec in RELEASED_MODELS.values():
        d_q, d_k = read_directions(source, spec)
        FocusDirections(d_q, d_k, spec.hf_name, placement="post_rope", training_set="long",
                        settings=_release_settings()).save(out / f"{spec.slug}.safetensors")
        heads = read_heads(source, spec)
        (out / f"{spec.slug}.relevant_heads.json").write_text(json.dumps(heads, separators=(",", ":")) + "\n")
        print(f"{spec.hf_name}: {tuple(d_q.shape)}, {len(heads)} heads")
    shutil.copyfile(source / "LICENSE", out / "LICENSE")
    shutil.copyfile(source / "README.md", out / "SOURCE_README.md")
    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
