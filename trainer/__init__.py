"""kvmap stage 2: train a student on a teacher-state store that stage 1 (`pipeline/`) wrote.

Stage 2 owns the student side: reading the store into batches, the objective (CE + logit KD + lambda_kv x
the structural loss of `alignment/`), the training loop with exact resume, held-out evaluation, and A/B
matrices of runs with their report. The teacher itself is never loaded (except `kvmap-profile
--live-teacher`); its geometry comes from the store. The config sections it reads are defined in
`pipeline.config` (`kvmap.KVMapConfig`, `train.TrainConfig` / `EvalConfig`).

Entry points (console scripts in pyproject.toml):
- `kvmap-train` = `accelerate launch trainer/train.py --config ... [key=value ...] [--resume] [--overwrite]`:
  one run (`trainer.train.run_training(cfg, resume, overwrite) -> metrics`).
- `kvmap-ablate` = `trainer/ablate.py --config configs/ablations/... [--dry-run]`: arms x seeds, resumable.
- `kvmap-report RUN_DIR` (`trainer.ablation.report`): a matrix's tables and plots.
- `kvmap-profile` (`trainer/profile_alignment.py`): one or two batches through the aligner vs the student.
- `python -m trainer.eval.eval_student --config ...`: held-out metrics of a student before any step.
- `benchmarks/bench_train.py`: step cost (CE-only vs cached vs online) and loader throughput.

Sub-packages, top to bottom (import-linter's stage-2 contract: each imports only those below it):
- `trainer.ablation`: the matrix config, child processes, the results file, report, plots, statistics.
- `trainer.eval`: CE per segment, answer accuracy, teacher agreement, greedy exact match.
- `trainer.run`: one run's setup (student, aligner, losses, optimizer and LR schedule, accelerator, sample
  stream), checkpoints and the run folder, store checks, loop helpers.
- `trainer.objective` | `trainer.data`: the forward + loss step, loss terms, schedules, gradient probe |
  the store dataset, collate, resumable sampler, in-RAM preload, shard-window order.

Every command fails one way (`pipeline.cli.run_command`): one line `NAME: error: ...` on stderr, exit 2 for
bad input, 1 for a failure found while running (a NaN/inf stop, a failed run); results go to stdout,
messages to stderr.
"""
