"""The metrics of a run, owned by one object: per-step accumulators, the logged record, the log line.

``Metrics.after_step`` runs after every optimizer step (progress bar, the interval's tokens and time);
``Metrics.record`` builds one ``metrics.jsonl`` record at a logged step. The core fields are the
step's losses (the global batch's mean: each rank's mean over its share, weighted by that share),
lr, MTP weight, gradient norm, tokens/s and MFU; every other field comes from the feature that owns
it, registered once with ``add_fields(fn)``: ``fn(stats) -> dict`` is called at every record, on
every rank, in registration order (several run collectives, so the order must be the same on all
ranks). Only rank 0 writes (parallel/metrics/monitor.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from parallel.collectives import mean_over_ranks
from parallel.metrics.monitor import Monitor
from parallel.metrics.peak import PeakFlops


@dataclass
class StepStats:
    """What one optimizer step reports (train.py's ``train_step``)."""
    step: int                       # optimizer steps done, this one included (1-based)
    parts: torch.Tensor             # (4,) float64: loss, lm, aux, mtp; this rank's mean over its micro-steps (on
                                    # the device: read at a record only, so a step makes the host wait at most twice)
    weight: float                   # this rank's loss weight (unequal shares; 1 for an equal split)
    lr: float
    mtp_weight: float
    grad_norm: float | torch.Tensor | None   # DeepSpeed's global norm (a device tensor under ZeRO); read at a record
    counts: torch.Tensor            # (L, E) routed tokens of this step, summed over the (site's) ranks
    gamma: float                    # bias update speed applied after this step
    skipped: bool                   # this rank's optimizer step was skipped (non-finite loss/gradient)
    skipped_in_a_row: int
    skip_seen: bool                 # some rank (site) skipped: the step is logged on every rank
    stop: bool                      # some rank was asked to stop (SIGTERM): save and stop after this step
    seconds: float                  # this rank's wall time of the step
    busy_s: float                   # ... of which its own compute (parallel/unequal/clock.py)
    wait_s: float                   # ... and waiting for the other ranks


Fields = Callable[[StepStats], dict]


class Metrics:
    def __init__(self, monitor: Monitor, peak: PeakFlops, tokens_per_step: int, flops_per_token: float,
                 max_steps: int, device: torch.device):
        self.monitor, self.peak, self.device = monitor, peak, device
        self.tokens_per_step, self.flops_per_token, self.max_steps = tokens_per_step, flops_per_token, max_steps
        self._fields: list[Fields] = []
        self._tokens, self._seconds = 0, 0.0            # since the last record

    def add_fields(self, fields: Fields) -> None:
        self._fields.append(fields)

    def after_step(self, s: StepStats) -> None:
        self._tokens += self.tokens_per_step
        self._seconds += s.seconds
        tok_s = self.tokens_per_step / s.seconds
        self.monitor.step(tok_s, self.peak.mfu(tok_s * self.flops_per_token))

    def record(self, s: StepStats) -> dict:
        """Collective: the record of step ``s.step``, written to metrics.jsonl (rank 0) and the log line."""
        loss, lm, aux, mtp = mean_over_ranks((s.parts * s.weight).tolist(), self.device)
        tok_s = self._tokens / self._seconds
        if note := self.peak.recheck(tok_s * self.flops_per_token):
            self.monitor.write(note)
        grad_norm = None if s.grad_norm is None else float(s.grad_norm)
        record = {"step": s.step, "loss": loss, "lm_loss": lm, "aux_loss": aux, "mtp_loss": mtp,
                  "lr": s.lr, "mtp_weight": s.mtp_weight, "grad_norm": grad_norm,
                  "tokens_per_s": tok_s, "mfu": self.peak.mfu(tok_s * self.flops_per_token),
                  "tokens": s.step * self.tokens_per_step, "skipped": s.skipped}
        for fields in self._fields:
            record.update(fields(s))
        self.monitor.log(record)
        self.monitor.write(
            f"step {s.step}/{self.max_steps} loss {loss:.4f} (lm {lm:.4f} aux {aux:.2e} mtp {mtp:.4f})"
            f" lr {s.lr:.2e} {tok_s:,.0f} tok/s mfu {record['mfu']:.2%}"
            + (f" val {record['val_loss']:.4f}" if "val_loss" in record else "")
            + (f" SKIPPED (non-finite loss/gradient; {s.skipped_in_a_row} in a row)" if s.skipped else ""))
        self._tokens, self._seconds = 0, 0.0
        return record
