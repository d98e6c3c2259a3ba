#!/usr/bin/env bash
# The long-context retrieval comparisons of docs/results/2026-12-05-structure-on-long-context-retrieval at 10x
# their CPU budgets on one GPU, 5 seeds each, for when a GPU is lent:
#   - the winning one, pruned student (configs/ablations/retrieval_pruned_student.yaml: logit KD vs KD +
#     attention KL on the top-2 and top-4 stored retrieval heads of the kept layers): 240 steps of batch 8
#     instead of 24;
#   - random-init student (configs/ablations/retrieval_random_student.yaml, kd_only vs kd_heads_top4):
#     1,000 steps instead of 100, on 3x the train rows (1,200).
# Not yet run on a GPU: the CPU result is the deliverable. Expected on an H100/H200 (from the CPU step costs
# and the 2026-11-26 GPU step ratios; not measured): data ~10 s, prune ~20 s, stage 1 ~1-2 min, 20 trainings
# ~10-40 s each, the grouped evaluations ~2 min: under 10 minutes.
#   bash benchmarks/gpu_retrieval.sh [OUT_PREFIX]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablations/gpu}
PY=${PY:-python}
STORE=stores/retrieval_gpu.zarr
LONG=stores/retrieval_gpu_long.zarr
EVALS=(--eval heldout $STORE eval data/retrieval/heldout.jsonl --eval heldout_long $LONG train data/retrieval/heldout_long.jsonl)
$PY -m pipeline.data.retrieval_task --out data/retrieval --length 512 --n_train 1200 --n_eval 120 --types needle,two_hop
[ -d students/pruned8 ] || $PY pipeline/prune.py --config configs/pruned.yaml
$PY pipeline/extract.py --config configs/retrieval.yaml extract.store=$STORE data.max_train_samples=1200 extract.batch_size=32
$PY pipeline/extract.py --config configs/retrieval.yaml extract.store=$LONG data.train_path=data/retrieval/heldout_long.jsonl \
    data.eval_path=null data.max_train_samples=96 'extract.components=[logits]' extract.heads=all 'extract.layers=[29]'
$PY trainer/ablate.py --config configs/ablations/retrieval_pruned_student.yaml out_dir=${OUT}_pruned train.store=$STORE \
    extract.store=$STORE train.steps=240 train.warmup_steps=24 'only_arms=[kd_only,kd_heads_top2_prune,kd_heads_top4_prune]'
$PY -m trainer.ablation.by_group ${OUT}_pruned --control kd_only "${EVALS[@]}"
$PY trainer/ablate.py --config configs/ablations/retrieval_random_student.yaml out_dir=${OUT}_random train.store=$STORE \
    extract.store=$STORE train.steps=1000 eval.every=250 'only_arms=[kd_only,kd_heads_top4]'
$PY -m trainer.ablation.by_group ${OUT}_random --control kd_only "${EVALS[@]}"
