"""Configuration: YAML onto dataclasses (`configlib`), the sections of both stages and the assembled
`KVMapConfig` (`kvmap`). Shared by stage 1 and stage 2 (its one home).

May import `pipeline.store` (store locations) and `alignment` (its config sections); nothing else of kvmap.
"""
