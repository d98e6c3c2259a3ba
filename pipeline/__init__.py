"""kvmap: pipeline."""
