"""kvmap: alignment."""
