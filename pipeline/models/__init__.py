"""Models: loading a teacher or student (`load`), capturing Q/K/V (`capture`), attention geometry (`geometry`).

May import `pipeline.config`, `pipeline.store` and `alignment`; never data, extraction, analysis or pruning.
"""
