"""Stage-1 machinery under `pipeline/extract.py`: store attributes and fingerprint (`store_attrs`), one
chunk of teacher forward + capture + encode (`chunk`), the printed summary (`summary`).

May import data, models, cli, config, store and alignment; never analysis or pruning (its siblings).
"""
