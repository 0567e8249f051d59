"""Validation loss, as a metrics field: the mean next-token loss over the first ``train.eval_batches``
global batches of the validation split, every ``train.eval_every`` steps and at ``train.max_steps``."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from data import batch_from_rows
from parallel.collectives import mean_over_ranks

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from configs.schema import Config
    from data.shards import TokenShards
    from parallel.metrics.record import StepStats


class Evaluation:
    def __init__(self, engine: DeepSpeedEngine, val_rows: TokenShards | None, cfg: Config, rank: int, world: int,
                 device: torch.device):
        self.engine, self.val_rows, self.rank, self.world, self.device = engine, val_rows, rank, world, device
        self.t = cfg.train

    def due(self, step: int) -> bool:
        return self.val_rows is not None and (step % self.t.eval_every == 0 or step == self.t.max_steps)

    @torch.no_grad()
    def loss(self) -> float:
        """Collective: every rank evaluates its own rows of each global batch; the mean over ranks."""
        self.engine.eval()
        mbs, total = self.t.micro_batch_size, 0.0
        for i in range(self.t.eval_batches):
            start = (i * self.world + self.rank) * mbs
            x, y = batch_from_rows(self.val_rows, [(start + j) % len(self.val_rows) for j in range(mbs)])
            total += float(self.engine(x.to(self.device), y.to(self.device)).lm_loss)
        self.engine.train()
        return mean_over_ranks([total / max(1, self.t.eval_batches)], self.device)[0]

    def fields(self, s: StepStats) -> dict:
        return {"val_loss": self.loss()} if self.due(s.step) else {}
