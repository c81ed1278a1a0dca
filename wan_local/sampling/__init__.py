"""Schedules, solvers, per-task conditioning and the denoise loop."""
