"""Benchmark, training and command-line tools for hnae (tasks, models, runs, reports)."""
