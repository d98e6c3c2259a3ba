"""Stage-1 machinery under `pipeline/extract.py`: store attributes and fingerprint (`store_attrs`), one
chunk of teacher forward + capture + encode (`chunk`), the teacher's top-k log-probs and own accuracy / CE
sums (`teacher_outputs`), the printed summary (`summary`).

May import data, models, cli, config, store and alignment; never analysis or pruning (its siblings).
"""
