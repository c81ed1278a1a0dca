"""Checkpoint formats: detection, key maps and memory-mapped loading."""
