"""Benchmarks, one-off studies beside their results, and the GPU-session harness (not installed)."""
