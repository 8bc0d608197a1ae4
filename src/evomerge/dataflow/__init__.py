"""Data-flow-space merging: the path tokens take through the layers of several models.

`path` (what a path is and its rules), `pool` (the models taking part, read from their configs),
`space` (genome <-> path), `model` (the in-memory path model over live layers), `modeling` (the
exported model's class), `export` (a path as a model dir), `backend` (evaluating paths), `draw` (the
report's picture), `guard` (ps+dfs: a path replaces the parameter-space merge only beyond the noise).
"""
