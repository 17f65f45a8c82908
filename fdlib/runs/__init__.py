"""Layer 8, runs: notebooks at a size, the paper-size run and the rendering of the README.

`workspace` (a size's stores and figures; committed results read-only), `paper` (the
paper-size run: run, status, merge, export), `reproduce` (execute the notebooks, render the
README).
"""
