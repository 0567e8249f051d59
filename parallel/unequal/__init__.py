"""Ranks of unequal speed: ``shares`` (per-rank token shares with loss weighting, and ``auto``'s
capacity probe) and ``clock`` (each rank's compute vs waiting time, the slowdown emulation)."""
