"""The paper's released head rankings and focus directions, by model name.

The authors (Zhu et al., 2025; repository billzyx/focus_direction, MIT licence, Copyright (c) 2025
Youxiang Zhu) released, for three models, every head ranked by its contextual (relevant) score
and a trained d_Q / d_K for every head. fdlib ships them in `fdlib/data/focus-direction-release/`
(see the README and LICENSE there; `scripts/import_release.py` regenerates them):

    model = fdlib.load_model("meta-llama/Llama-3.2-3B-Instruct", device="cuda")
    directions, heads = load_release(model)
    with fdlib.focus_directions(model, directions, heads[:RELEASE_K], alpha=RELEASE_ALPHA, from_pos=...):
        ...

The directions are post-RoPE (fdlib's `placement="post_rope"`), trained on the 20-document prompt
with the gold-only answer appended (`training_set="long"`); release defaults k = 20 heads,
alpha = 0.2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformer_lens.model_bridge import TransformerBridge

if TYPE_CHECKING:
    import pandas as pd

from fdlib.core.heads import Head
from fdlib.interventions.directions import FocusDirections
from fdlib.model.loading import model_name

RELEASE_K = 20
RELEASE_ALPHA = 0.2
_SOURCE = "https://github.com/billzyx/focus_direction"
_SOURCE_COMMIT = "359500496f1082b0740616216c197592df7767b6"


@dataclass(frozen=True)
class ReleasedModel:
    """One model of the release: its Hugging Face name and head shape (query heads)."""

    hf_name: str
    n_layers: int
    n_heads: int
    d_head: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_layers, n_heads, d_head), as `model.cfg` gives them."""
        return (self.n_layers, self.n_heads, self.d_head)

    @property
    def slug(self) -> str:
        """The release's folder name: `owner_name`."""
        return self.hf_name.replace("/", "_")


RELEASED_MODELS: dict[str, ReleasedModel] = {
    m.hf_name: m
    for m in (
        ReleasedModel("meta-llama/Llama-3.2-3B-Instruct", 28, 24, 128),
        ReleasedModel("Qwen/Qwen2.5-7B-Instruct", 28, 28, 128),
        ReleasedModel("mistralai/Ministral-8B-Instruct-2410", 36, 32, 128),
    )
}


def _package_dir() -> Path:
    """The folder of the packaged release files."""
    return Path(str(resources.files("fdlib") / "data" / "focus-direction-release"))


def _release_settings() -> dict[str, Any]:
    """The `settings` stored with the released directions: where they come from and how to use them."""
    return {
        "source": _SOURCE,
        "source_commit": _SOURCE_COMMIT,
        "license": "MIT",
        "copyright": "Copyright (c) 2025 Youxiang Zhu",
        "k": RELEASE_K,
        "alpha": RELEASE_ALPHA,
        "heads": "contextual_heads_scores_full_seq/<model>/relevant_heads.json (fdlib.interventions.release.released_heads)",
        "n_docs": 20,
        "optimizer": "AdamW",
        "lr": 1e-3,
        "epochs": 10,
    }


def _released(name: str) -> ReleasedModel:
    """The released model `name` refers to: its Hugging Face name, `owner_name` folder name, the
    name without its owner, or a local directory whose last part is one of those (any case)."""
    if name in RELEASED_MODELS:
        return RELEASED_MODELS[name]
    key = name.rstrip("/").lower()
    tail = key.rsplit("/", 1)[-1]
    for spec in RELEASED_MODELS.values():
        names = {spec.hf_name.lower(), spec.slug.lower(), spec.hf_name.split("/")[-1].lower()}
        if key in names or tail in names:
            return spec
    raise ValueError(
        f"no released focus directions for model {name!r}: the release covers {', '.join(RELEASED_MODELS)}"
    )


def released_heads(name: str) -> list[Head]:
    """Every head of the released model `name` as (layer, head), ranked by the authors' mean
    contextual (relevant) score, best first. The release uses the first `RELEASE_K`."""
    spec = _released(name)
    text = (resources.files("fdlib") / "data" / "focus-direction-release" / f"{spec.slug}.relevant_heads.json").read_text()
    return [(int(layer), int(head)) for layer, head in json.loads(text)]


def released_directions(name: str) -> FocusDirections:
    """The authors' d_Q and d_K of every head of the released model `name`:
    d_q, d_k [n_layers, n_heads, d_head] float32, placement "post_rope", training_set "long";
    `settings` holds the source, its commit, the licence and the defaults k = 20, alpha = 0.2."""
    spec = _released(name)
    with resources.as_file(resources.files("fdlib") / "data" / "focus-direction-release" / f"{spec.slug}.safetensors") as path:
        directions = FocusDirections.load(path)
    if directions.model_name != spec.hf_name or directions.shape != spec.shape:
        raise ValueError(f"packaged release file for {spec.hf_name!r} holds {directions.model_name!r} {directions.shape}")
    return directions


def load_release(model: TransformerBridge) -> tuple[FocusDirections, list[Head]]:
    """The released directions and head ranking for a loaded model, checked against it.

    The model's name (`fdlib.model.loading.model_name`) must be one of `RELEASED_MODELS` (or a local
    directory named like one) and its (n_layers, n_heads, d_head) must match the release;
    otherwise ValueError, naming the model and what differs. The directions returned carry the
    model's own name (so `focus_directions(model, ...)` accepts them) and the released model's
    Hugging Face name in `settings["release_model"]`.
    """
    name = model_name(model)
    spec = _released(name)
    have = (int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head))
    if have != spec.shape:
        raise ValueError(
            f"model {name!r} has (n_layers, n_heads, d_head) = {have} but the release for {spec.hf_name!r} "
            f"has {spec.shape}: not the released model"
        )
    directions = released_directions(spec.hf_name)
    directions = dataclasses.replace(
        directions, model_name=name, settings={**directions.settings, "release_model": spec.hf_name}
    )
    return directions.check(model), released_heads(spec.hf_name)


def release_norms(k: int = RELEASE_K) -> pd.DataFrame:
    """`direction_norms` of every released model's top-k heads (its own ranking): the scale of
    the authors' directions, to compare trained ones with."""
    import pandas as pd

    from fdlib.interventions.directions import direction_norms

    return pd.concat([direction_norms(released_directions(m), released_heads(m)[:k], source=m)
                      for m in RELEASED_MODELS], ignore_index=True)
