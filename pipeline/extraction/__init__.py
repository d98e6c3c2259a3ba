"""Stage-1 machinery under `pipeline/extract.py`: store attributes and fingerprint (`store_attrs`), one
chunk of teacher forward + capture + encode (`chunk`), the printed summary (`summary`).

May import data, models, config and store; never analysis or pruning.
"""
