"""Stage 1 of kvmap: run the teacher once over a dataset and store what the student learns from.

The teacher's per-layer Q/K/V (post-RoPE) and top-k log-probs go into a Zarr store; stage 2 (`trainer/`)
trains a student from that store through `alignment/`. Stage 2 also reads this package's shared pieces:
the config schema, model loading and the store reader.

Layers under the entry points (`extract.py`, `prune.py`), each importing only the ones after it and
`alignment` (the stage-1 `layers` contract in pyproject.toml):
    extraction | analysis | pruning   the work under the entry points: one chunk of teacher forward +
                                      capture + encode; looking at a store; pruning a teacher into a student
    data                              rows -> tokenised P/R/A samples, the default task, teacher completions
    models                            loading teachers and students, Q/K/V capture, attention geometry
    cli.py                            one command-line style and one way to fail for every command
    config                            the YAML schema of both stages
    store                             the on-disk (or object-storage) layout: writer, reader, verification

Entry points:
    kvmap-extract   (pipeline/extract.py)                   extract or resume a store
    kvmap-prune     (pipeline/prune.py)                     cut a student out of the teacher's weights
    kvmap-inspect   (pipeline/analysis/inspect_store.py)    a store's schema, sizes, statistics, --check
    python -m pipeline.analysis.attention_profile           the stored teacher's attention, head scores
    python -m pipeline.data.default_data                    write (and check) the default dataset
    python -m pipeline.data.completions                     have the teacher write R and A only
"""
