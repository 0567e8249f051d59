"""Metrics: ``record`` (the one object that owns the record: accumulators, fields added by each
feature, the log line), ``monitor`` (rank 0's metrics.jsonl, progress bar, wandb), ``peak`` (the one
peak FLOP/s measurement MFU is against), ``traffic`` (bytes sent), ``evaluation`` (validation loss)."""
