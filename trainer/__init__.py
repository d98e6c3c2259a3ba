"""kvmap stage 2: train a student on a teacher-state store.

Entry points:
- `accelerate launch trainer/train.py --config configs/default.yaml [key=value ...] [--resume] [--overwrite]`
  (`trainer.train.run_training(cfg, resume=False, overwrite=False) -> dict`, `trainer.train.main(argv)`).
- `python -m trainer.profile_alignment --config ... --mode structured|flat|both --batch_size N --seq_length T
  [--live-teacher] [--num_batches 1|2]`.
- `benchmarks/bench_train.py` (step cost: CE-only vs cached vs online, loader throughput).

Pieces: `trainer.data.loader` (StoreDataset, collate_right_pad, ResumableSampler, make_loader), `trainer.objective.step`
(DistillModel, forward_step), `trainer.objective.losses`, `trainer.objective.schedules` (lr_multiplier, lambda_kv_at),
`trainer.eval.evaluate` (evaluate, alignment_diagnostics), `trainer.eval.greedy` (exact match), `trainer.run.checkpoint`,
`trainer.run.store_checks`, `trainer.run.setup`, `trainer.run.loop_utils`; config sections in `trainer.config`.
"""
