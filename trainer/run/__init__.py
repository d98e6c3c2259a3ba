"""One training run: building the student, aligner and losses from a config and a store (`setup`),
the run's loader / optimizer / accelerator (`run_setup`), checkpoints, the run folder, store checks and
loop helpers. The loop itself is in `trainer/train.py`.

May import trainer.objective, trainer.data, pipeline and alignment; never trainer.eval or trainer.ablation.
"""
