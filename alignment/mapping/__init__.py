"""What teacher piece goes where: the layer map, segment time warping, head maps and head selection.

May import alignment.geometry only (today it needs nothing else of kvmap).
"""
