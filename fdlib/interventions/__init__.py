"""Layer 4, interventions: what a row does to attention, and what executes it.

`reweighting` (the span maps: what split-softmax, odds and boost do to one attention row),
`hooks` (the sequential executor: bridge hooks for reweighting, ablation and a whole row's
intervention), `directions` (the focus-directions file format and hook), `engine` (the batched
executor over a shared prompt cache, and `RowIntervention`, what one row does), `training`
(learning focus directions), `release` (the paper's own directions and head rankings).
"""
