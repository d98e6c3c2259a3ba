"""Projecting teacher states into student space: head-wise / flat projectors, RoPE pair maps, the
`MapProjectionAligner` and the `AlignerSpec` it is built from, and the initialisation of a pruned
student's projector.

May import alignment.mapping, alignment.geometry and alignment.config; never alignment.losses.
"""
