"""Layer 1, core: what every other layer speaks in, with no model and no data.

`spans` (token spans), `heads` (head labels `L{l}H{h}`, head lists), `metrics` (EM, bootstrap
intervals over questions, the one paired McNemar test), `store` (the results store and atomic
writes).
"""
