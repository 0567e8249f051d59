"""Schedules over optimizer steps, from the config alone (never from where a run stopped): the
learning rate, the MTP loss weight and the router bias update speed. ``t`` is the ``train:``
section (configs/schema.py); ``step`` is the 0-based optimizer step about to be taken.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from configs.schema import TrainConfig


def mtp_weight_at(step: int, t: TrainConfig, early: float) -> float:
    """MTP loss weight of optimizer step ``step`` (0-based): ``early`` (model.mtp_loss_weight)
    before mtp_late_fraction of max_steps, then train.mtp_loss_weight_late (if set)."""
    if t.mtp_loss_weight_late is None or step < t.mtp_late_fraction * t.max_steps:
        return early
    return t.mtp_loss_weight_late


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) for TrainConfig ``t``.

    Linear warmup over ``warmup_steps`` (step 0 gets lr / warmup_steps), then
    cosine: from lr down to min_lr at the last step;
    wsd: constant lr, then a linear decay to min_lr over the last wsd_decay_fraction of steps;
    constant: lr.
    """
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    last = t.max_steps - 1
    if t.lr_schedule == "constant" or last <= t.warmup_steps:
        return t.lr
    if t.lr_schedule == "cosine":
        progress = min(1.0, (step - t.warmup_steps) / (last - t.warmup_steps))
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))
    # wsd
    decay_steps = max(1, round(t.wsd_decay_fraction * t.max_steps))
    decay_start = max(t.warmup_steps, last - decay_steps)
    if step <= decay_start:
        return t.lr
    progress = min(1.0, (step - decay_start) / (last - decay_start))
    return t.lr + (t.min_lr - t.lr) * progress


def gamma_at(step: int, t: TrainConfig) -> float:
    """Bias update speed after optimizer step ``step`` (0-based) for TrainConfig ``t``."""
    return t.bias_update_speed if step < t.bias_update_stop_fraction * t.max_steps else 0.0
