"""Stage-2 data: the map-style dataset over a store, collate and resumable sampler (`loader`), the
in-RAM preload (`preload`), the shard-window order for object storage (`sample_order`) and, for a student on
another tokenizer, the split re-tokenised and aligned by character overlap (`cross_tokens`).

May import pipeline.store, pipeline.config, pipeline.data (the renderer) and alignment.mapping (the alignment
W); no other trainer sub-package.
"""
