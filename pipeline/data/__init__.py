"""Data: reading rows, rendering and tokenising them into segments (`samples`), the default synthetic
task (`default_data`), teacher-written completions (`generate`, `completions`), answer metrics (`metrics`).

May import `pipeline.models`, `pipeline.config`, `pipeline.store`, `pipeline.cli` (for its commands).
"""
