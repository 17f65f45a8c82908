"""Layer 6, experiments: the paper's studies, each a set of conditions for `run_study` and the
tables read from its frame.

`contextual` (contextual heads, Tables 1 and 3), `sweeps` (Figure 3's and Figure 4's grids),
`longctx` (long-context tasks, lost in the middle), `retrieval` (retrieval heads), `compare`
(the interventions compared, settings chosen on train questions).
"""
