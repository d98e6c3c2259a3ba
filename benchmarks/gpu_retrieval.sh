#!/usr/bin/env bash
# The long-context retrieval comparison (configs/ablations/retrieval_random_student.yaml: logit KD vs KD +
# attention KL on the teacher's top-4 retrieval heads, random-init student, 5 seeds) at 10x the CPU budget
# (1,000 steps of batch 8 instead of 100) and 3x the train rows (1,200), on one GPU. Prepared for a lent GPU,
# not yet run on one: the CPU result (docs/results/2026-12-05-structure-on-long-context-retrieval) is the
# deliverable. Expected on an H100/H200 (from the CPU step costs and the 2026-11-26 GPU step ratios; not
# measured): data ~10 s, stage 1 ~1 min, 10 trainings ~30-60 s each, the grouped evaluation ~2 min.
#   bash benchmarks/gpu_retrieval.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablations/retrieval_random_student_gpu}
PY=${PY:-python}
STORE=stores/retrieval_gpu.zarr
LONG=stores/retrieval_gpu_long.zarr
$PY -m pipeline.data.retrieval_task --out data/retrieval --length 512 --n_train 1200 --n_eval 120 --types needle,two_hop
$PY pipeline/extract.py --config configs/retrieval.yaml extract.store=$STORE data.max_train_samples=1200 extract.batch_size=32
$PY pipeline/extract.py --config configs/retrieval.yaml extract.store=$LONG data.train_path=data/retrieval/heldout_long.jsonl \
    data.eval_path=null data.max_train_samples=96 'extract.components=[logits]' extract.heads=all 'extract.layers=[29]'
$PY trainer/ablate.py --config configs/ablations/retrieval_random_student.yaml out_dir=$OUT train.store=$STORE \
    extract.store=$STORE train.steps=1000 eval.every=250 'only_arms=[kd_only,kd_heads_top4]'
$PY -m trainer.ablation.by_group $OUT --control kd_only \
    --eval heldout $STORE eval data/retrieval/heldout.jsonl \
    --eval heldout_long $LONG train data/retrieval/heldout_long.jsonl
