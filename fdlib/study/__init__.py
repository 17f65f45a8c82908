"""Layer 5, study: one runner for every study.

`conditions` (the one condition type), `scores` (contextual scores and their four kinds),
`runner` (prefill a sample once, decode its conditions, store one row per sample and
condition; read them back as a frame).
"""
