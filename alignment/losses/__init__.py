"""Losses on aligned states: `StructuralKVLoss`, attention KL (streaming and naive), relation KD, logit KD
and state diagnostics.

May import alignment.geometry and alignment.mapping; never alignment.projection.
"""
