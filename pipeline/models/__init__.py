"""Models: loading a teacher or student and the pad id its batches use (`load`), capturing Q/K/V
(`capture`), attention geometry (`geometry`).

May import cli, config, store and alignment; never data, extraction, analysis or pruning.
"""
