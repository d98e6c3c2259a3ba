"""kvmap stage 2: train a student on a teacher-state store.

Entry points:
- `accelerate launch trainer/train.py --config configs/default.yaml [key=value ...] [--resume] [--overwrite]`
  (`trainer.train.run_training(cfg, resume=False, overwrite=False) -> dict`, `trainer.train.main(argv)`).
- `python -m trainer.profile_alignment --config ... --mode structured|flat|both --batch_size N --seq_length T
  [--live-teacher] [--num_batches 1|2]`.
- `benchmarks/bench_train.py` (step cost: CE-only vs cached vs online, loader throughput).

Pieces: `trainer.data` (StoreDataset, collate_right_pad, ResumableSampler, make_loader), `trainer.step`
(DistillModel, forward_step), `trainer.losses`, `trainer.schedules` (lr_multiplier, lambda_kv_at),
`trainer.evaluate` (evaluate, alignment_diagnostics), `trainer.greedy` (exact match), `trainer.checkpoint`,
`trainer.store_checks`, `trainer.setup`, `trainer.loop_utils`; config sections in `trainer.config`.
"""
