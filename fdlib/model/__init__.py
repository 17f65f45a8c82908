"""Layer 3, model: a TransformerBridge and what fdlib knows about it.

`loading` (offline models, `load_model`, stop tokens), `arch` (architecture facts and the
refusals of what a model cannot run), `decoding` (prefill, the sequential greedy decode on the
bridge, the span recorder).
"""
