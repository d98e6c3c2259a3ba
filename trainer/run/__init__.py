"""One training run: the student, aligner, KD term and config checks from a config and a store (`setup`),
the run's accelerator, optimizer + LR schedule and sample stream as one `Run` (`run_setup`), atomic
checkpoints, metrics.jsonl and the saved student (`checkpoint`), the run folder (`run_dir`: writable, and
start / resume / refuse from what it holds), store checks (`store_checks`) and loop helpers (`loop_utils`).
The loop itself is in `trainer/train.py`.

May import trainer.objective, trainer.data, pipeline and alignment; never trainer.eval or trainer.ablation.
"""
