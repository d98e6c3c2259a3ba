"""Pruning a teacher into a student (`kvmap-prune`, `pipeline/prune.py`): importance scores, what to keep,
slicing the weights, and the metadata the pruned folder carries.

May import models, config, store and alignment.
"""
