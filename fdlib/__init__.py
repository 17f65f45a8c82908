"""fdlib: contextual heads, split-softmax and focus directions (Zhu et al., 2025) on TransformerLens.

The names a notebook needs are here; everything else is imported from its layer. The layers,
bottom up, each importing only those below it (`tests/test_layout.py` holds the code to it):

1. `fdlib.core`: spans, heads, metrics, the results store;
2. `fdlib.data`: NQ prompts and the long-context tasks;
3. `fdlib.model`: loading, architecture facts, prefill and the sequential decode;
4. `fdlib.interventions`: what a row does (span maps, focus directions, ablation), the hooks
   and the batched engine that execute it, training, the paper's release;
5. `fdlib.study`: conditions, contextual scores, the one runner and its reader;
6. `fdlib.experiments`: the paper's studies;
7. `fdlib.views`: plots, the head explorer, the gallery, the workshop's exercises;
8. `fdlib.runs`: a size's workspace, the paper-size run, reproducing the README.

`python -m fdlib --help` lists the command line. Names and layers load on first use, so
`import fdlib` itself is fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

LAYERS: tuple[str, ...] = ("core", "data", "model", "interventions", "study", "experiments", "views", "runs")

# name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Span": "fdlib.core.spans",
    "head_label": "fdlib.core.heads",
    "best_subspan_em": "fdlib.core.metrics",
    "bootstrap_ci": "fdlib.core.metrics",
    "NQBuilder": "fdlib.data.nq",
    "task_samples": "fdlib.data.tasks",
    "DEFAULT_MODEL": "fdlib.model.loading",
    "ModelNotAvailableError": "fdlib.model.loading",
    "load_model": "fdlib.model.loading",
    "prefill": "fdlib.model.decoding",
    "decode": "fdlib.model.decoding",
    "hooks": "fdlib.model.decoding",
    "split_softmax": "fdlib.interventions.hooks",
    "reweight_span": "fdlib.interventions.hooks",
    "ablate_heads": "fdlib.interventions.hooks",
    "FocusDirections": "fdlib.interventions.directions",
    "focus_directions": "fdlib.interventions.directions",
    "train_nq_directions": "fdlib.interventions.training",
    "load_release": "fdlib.interventions.release",
    "Condition": "fdlib.study.conditions",
    "contextual_scores": "fdlib.study.scores",
    "score_sample": "fdlib.study.scores",
    "mean_scores": "fdlib.study.scores",
    "top_heads": "fdlib.study.scores",
    "heads_above": "fdlib.study.scores",
    "run_study": "fdlib.study.runner",
    "study_frame": "fdlib.study.runner",
    "contextual_study": "fdlib.experiments.contextual",
    "Workspace": "fdlib.runs.workspace",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from fdlib.core.heads import head_label
    from fdlib.core.metrics import best_subspan_em, bootstrap_ci
    from fdlib.core.spans import Span
    from fdlib.data.nq import NQBuilder
    from fdlib.data.tasks import task_samples
    from fdlib.experiments.contextual import contextual_study
    from fdlib.interventions.directions import FocusDirections, focus_directions
    from fdlib.interventions.hooks import ablate_heads, reweight_span, split_softmax
    from fdlib.interventions.release import load_release
    from fdlib.interventions.training import train_nq_directions
    from fdlib.model.decoding import decode, hooks, prefill
    from fdlib.model.loading import DEFAULT_MODEL, ModelNotAvailableError, load_model
    from fdlib.runs.workspace import Workspace
    from fdlib.study.conditions import Condition
    from fdlib.study.runner import run_study, study_frame
    from fdlib.study.scores import contextual_scores, heads_above, mean_scores, score_sample, top_heads


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in LAYERS:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'fdlib' has no attribute {name!r}; other names are imported from their layer "
                             f"({', '.join('fdlib.' + layer for layer in LAYERS)})")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(LAYERS))
