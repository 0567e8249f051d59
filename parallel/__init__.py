"""Everything that knows about ranks (``model/`` stays single-device).

Training side: ``engine`` (process group, AdamW, LR schedule, ``deepspeed.initialize``),
``balance`` (aux-loss-free bias update with counts summed over data-parallel ranks),
``recompute`` (activation checkpointing that does not double-count routed tokens),
``checkpoint`` (DeepSpeed state + trainer state, complete-or-ignored) and ``monitor``
(rank-0 progress bar, metrics.jsonl, wandb, peak-FLOP/s benchmark).
"""
