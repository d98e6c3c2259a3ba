"""Data: reading rows, rendering and tokenising them into P/R/A segments (`samples`), the default
synthetic task (`default_data`), teacher-written completions (`generate`, `completions`), answer metrics
(`metrics`).

May import models, cli (for its commands), config, store and alignment; never extraction, analysis or
pruning, which stand on it.
"""
