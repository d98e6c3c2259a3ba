"""Configuration: YAML onto dataclasses with strict keys (`configlib`), the sections of both stages
(`train`: train and eval, `prune`; the stage-1 sections live in `kvmap`) and the assembled `KVMapConfig`
(`kvmap`). Shared by stage 1 and stage 2 (its one home).

May import `pipeline.store` (store locations, storage options) and `alignment` (its config sections and
the relation-loss check); nothing else of kvmap.
"""
