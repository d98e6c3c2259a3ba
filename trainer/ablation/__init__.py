"""A/B matrices: the matrix config (`config`), running each arm in a child process (`child_process`),
the results file (`results`), the report (`report`, `kvmap-report`), its plots and the gradient-probe table.

The top of stage 2 below the entry points: may import every other trainer sub-package, pipeline, alignment.
"""
