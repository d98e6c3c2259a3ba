"""Stage-1 machinery under `pipeline/extract.py`: store attributes and fingerprint (`store_attrs`), the
split a run reads (`inputs`), one chunk of teacher forward + capture + encode (`chunk`), the plan made
before a run (`plan`) and how it is shown and checked against the disk (`plan_report`), the teacher's top-k
log-probs and own accuracy / CE sums (`teacher_outputs`), the printed summary (`summary`).

May import data, models, cli, config, store and alignment; never analysis or pruning (its siblings).
"""
