"""A/B matrices of stage-2 runs (driven by trainer/ablate.py): the matrix config (`config`), running each
arm in a child process (`child_process`), the results file (`results`), per-arm statistics (`stats`), the
report (`report`, the `kvmap-report` command), its plots (`plots`) and the gradient-probe table
(`probe_report`), and every trained student re-evaluated per held-out set and row group (`by_group`).

The top of stage 2 below the entry points: may import every other trainer sub-package, pipeline, alignment.
"""
