"""Benchmarks: one script per question; JSON results under ``benchmarks/results/``."""
