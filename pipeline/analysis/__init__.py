"""Looking at a store: the teacher's attention profile, head scores (retrieval heads), `kvmap-inspect`.

May import models, config, store, cli and alignment; nothing imports analysis but entry points and stage 2.
"""
