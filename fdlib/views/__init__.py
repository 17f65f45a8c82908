"""Layer 7, views: what a person looks at.

`plots` (plotly figures, each returning `go.Figure`), `explorer` (the interactive head
explorer), `gallery` (findings and the README's gallery), `exercises` (the workshop's checks).
"""
