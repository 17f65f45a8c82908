"""fdlib: contextual heads, split-softmax and focus directions (Zhu et al., 2025) on TransformerLens.

The layers, bottom up (each imports only those before it):
- engine: `models` (loading, offline models), `arch` (model facts, refusals), `decoding`
  (prefill, the sequential decode on the bridge, span recorders), `engine` (batched decoding over
  a shared prompt cache);
- interventions: `reweighting` (what span reweighting does to a row), `interventions` (where:
  hooks for reweighting and ablation), `directions` (the focus-directions file format and hook),
  `training` (learning them), `release` (the paper's own);
- studies: `conditions` (the one condition type), `study` (the one runner and reader), `store`,
  `scoring`, `sweeps`, `longctx`, `retrieval`, `evaluate`;
- data: `spans`, `data` (NQ), `tasks` (long-context tasks), `heads`;
- views: `plots`, `explorer`, `gallery`, `exercises`;
- runs: `workspace` (a size's stores and figures; committed results read-only), `paper` (the
  paper-size run), `reproduce` (render the notebooks and the README).
"""

from fdlib.conditions import Condition
from fdlib.data import NQBuilder, QASample, qa_samples
from fdlib.decoding import Answer, Prefix, SpanRecorder, decode, hooks, prefill
from fdlib.directions import FocusDirections, focus_directions, key_bias
from fdlib.engine import RowIntervention, decode_batch
from fdlib.evaluate import best_subspan_em, bootstrap_ci, normalize_answer
from fdlib.heads import head_label, random_heads
from fdlib.interventions import ablate_heads, reweight_span, split_softmax
from fdlib.models import DEFAULT_MODEL, ModelNotAvailableError, load_model
from fdlib.release import load_release, released_directions, released_heads
from fdlib.retrieval import retrieval_heads, retrieval_scores
from fdlib.scoring import (
    KINDS,
    ContextualStudy,
    SampleScores,
    contextual_scores,
    contextual_study,
    focus_table,
    head_table,
    heads_above,
    mean_scores,
    score_dataset,
    score_sample,
    top_heads,
)
from fdlib.spans import Span
from fdlib.store import Store, merge_stores
from fdlib.study import StudySample, run_study, study_frame
from fdlib.tasks import TASKS, TaskSample, task_samples
from fdlib.training import ActivationCache, train_focus_directions, train_nq_directions

__all__ = [
    "ActivationCache", "Answer", "Condition", "ContextualStudy", "DEFAULT_MODEL", "FocusDirections", "KINDS",
    "ModelNotAvailableError", "NQBuilder", "Prefix", "QASample", "RowIntervention", "SampleScores", "Span",
    "SpanRecorder", "Store", "StudySample", "TASKS", "TaskSample", "ablate_heads", "best_subspan_em", "bootstrap_ci",
    "contextual_scores", "contextual_study", "decode", "decode_batch", "focus_directions", "focus_table", "head_label",
    "head_table", "heads_above", "hooks", "key_bias", "load_model", "load_release", "mean_scores", "merge_stores",
    "normalize_answer", "prefill", "qa_samples", "random_heads", "released_directions", "released_heads",
    "retrieval_heads", "retrieval_scores", "reweight_span", "run_study", "score_dataset", "score_sample",
    "split_softmax", "study_frame", "task_samples", "top_heads", "train_focus_directions", "train_nq_directions",
]
