"""What one decoded row does, apart from where it acts and what executes it.

A `RowIntervention` names heads already resolved to a list and what happens to them: span
reweighting (`span_map` + `strength` + `span`), focus directions (`directions` + `alpha`) or
ablation. Two executors run it: the batched engine (`fdlib.interventions.engine`, every row of a
batch its own intervention over a shared prompt cache) and, one row at a time, `intervene`
(hooks on the TransformerBridge: the sequential reference). A study condition becomes a
`RowIntervention` in one place, `fdlib.study.conditions.Condition.row`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from transformer_lens.model_bridge import TransformerBridge

from fdlib.core.heads import Head
from fdlib.core.spans import Span
from fdlib.interventions.directions import FocusDirections, focus_directions
from fdlib.interventions.hooks import ablate_heads, reweight_span
from fdlib.interventions.reweighting import check_strength


@dataclass(frozen=True)
class RowIntervention:
    """What one row does, on heads already resolved to a list.

    Any combination is allowed; a study condition uses one: `span_map` + `strength` + `span`
    (span reweighting), `directions` + `alpha` (focus directions), or `ablate`.
    """

    heads: tuple[Head, ...] = ()
    span_map: str | None = None
    strength: float | None = None
    span: Span | None = None
    directions: FocusDirections | None = None
    alpha: float = 0.0
    ablate: bool = False

    def __post_init__(self) -> None:
        if self.span_map is not None:
            check_strength(self.span_map, self.strength)
            if not isinstance(self.span, Span):
                raise ValueError(f"span reweighting needs a Span to act on, got {self.span!r}")
        if (self.span_map is not None or self.directions is not None or self.ablate) and not self.heads:
            raise ValueError("an intervention needs at least one head")


@contextlib.contextmanager
def intervene(model: TransformerBridge, row: RowIntervention, from_pos: int) -> Iterator[None]:
    """`row` as hooks on the bridge for every query row at position >= `from_pos` (the
    sequential executor): `from_pos = len(prompt) - 1` for the answer rows over a shared prefix,
    0 for every row (prefill the prompt under it with `prefill(..., fast=False)`). Hooks are
    removed on exit, whatever happens."""
    heads = list(row.heads)
    with contextlib.ExitStack() as stack:
        if row.span_map is not None:
            stack.enter_context(reweight_span(model, heads, row.span, row.span_map, row.strength, from_pos=from_pos))
        if row.directions is not None:
            stack.enter_context(focus_directions(model, row.directions, heads, row.alpha, from_pos=from_pos))
        if row.ablate:
            stack.enter_context(ablate_heads(model, heads, from_pos=from_pos))
        yield
