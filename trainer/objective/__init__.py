"""The training objective: one forward + loss step (`step`), loss terms and their weights (`losses`),
schedules (`schedules`), and the gradient probe that measures how the terms pull (`grad_probe`).

May import pipeline and alignment; no other trainer sub-package.
"""
