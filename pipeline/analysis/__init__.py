"""Looking at a store: the teacher's attention profile (`attention_profile`), head scores and their
sidecar file (`head_scores`, also read by stage 2's head selection), `kvmap-inspect` (`inspect_store`).

May import data, models, cli, config, store and alignment; never extraction or pruning (its siblings).
Nothing else in stage 1 imports it; stage 2 reads the head scores.
"""
