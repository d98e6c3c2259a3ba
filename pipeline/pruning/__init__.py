"""Pruning a teacher into a student (`kvmap-prune`, `pipeline/prune.py`): importance scores (`importance`),
depth by measured removal cost of contiguous blocks (`block_removal`), what to keep (`select`), slicing the
weights (`slicing`), and the metadata the pruned folder carries (`meta`, also read by `kvmap-extract`'s layer
choice and stage 2's `align.init: from_prune`).

May import data, models, cli, config, store and alignment; never extraction or analysis (its siblings).
"""
