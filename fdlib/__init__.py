"""fdlib: contextual heads, split-softmax and focus directions (Zhu et al., 2025) on TransformerLens."""

from fdlib.data import NQBuilder, QASample, qa_samples
from fdlib.directions import FocusDirections, focus_directions, focus_table, key_bias
from fdlib.training import ActivationCache, train_focus_directions, train_nq_directions
from fdlib.decoding import Answer, Prefix, SpanRecorder, decode, hooks, prefill
from fdlib.interventions import ablate_heads, split_softmax
from fdlib.evaluate import best_subspan_em, bootstrap_ci, normalize_answer
from fdlib.models import DEFAULT_MODEL, ModelNotAvailableError, load_model
from fdlib.scoring import (
    KINDS,
    ContextualStudy,
    SampleScores,
    contextual_scores,
    contextual_study,
    head_label,
    head_table,
    heads_above,
    mean_scores,
    score_dataset,
    score_sample,
    top_heads,
)
from fdlib.retrieval import retrieval_heads, retrieval_scores
from fdlib.spans import Span
from fdlib.tasks import TASKS, TaskSample, task_samples

__all__ = [
    "ActivationCache", "Answer", "DEFAULT_MODEL", "FocusDirections", "focus_directions", "focus_table", "key_bias",
    "train_focus_directions", "train_nq_directions", "KINDS", "ModelNotAvailableError", "NQBuilder", "Prefix", "QASample",
    "SampleScores", "Span", "SpanRecorder", "best_subspan_em", "bootstrap_ci", "ContextualStudy", "contextual_scores", "contextual_study",
    "decode", "head_label", "head_table", "heads_above", "hooks", "load_model", "mean_scores",
    "normalize_answer", "prefill", "retrieval_heads", "retrieval_scores", "TASKS", "TaskSample", "task_samples", "qa_samples", "score_dataset", "score_sample", "split_softmax", "ablate_heads", "top_heads",
]
