"""The training objective: one forward + loss step (`step`), CE by segment and per-layer cosines
(`losses`), the LR and lambda_kv schedules (`schedules`; the LR schedule is transformers'), and the
gradient probe that measures how the terms pull (`grad_probe`).

May import pipeline and alignment; no other trainer sub-package.
"""
