"""kvmap: trainer."""
