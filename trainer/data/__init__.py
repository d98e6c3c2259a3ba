"""Stage-2 data: the map-style dataset over a store, collate and resumable sampler (`loader`), the
in-RAM preload (`preload`) and the shard-window order for object storage (`sample_order`).

May import pipeline.store and pipeline.config; no other trainer sub-package.
"""
