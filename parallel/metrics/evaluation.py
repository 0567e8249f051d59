"""Validation loss, as a metrics field: the mean next-token loss over the first ``train.eval_batches``
global batches of the validation split, every ``train.eval_every`` steps and at ``train.max_steps``.

With several validation sets (``data.val_sources``, or the splits of ``data.sources``: data/sources.py)
each one is evaluated the same way: ``val_loss_by_source`` holds each set's loss and ``val_loss`` their
mean weighted by the sets' weights."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from data import batch_from_rows
from data.mixture import ValidationSets
from parallel.collectives import mean_over_ranks

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from configs.schema import Config
    from data.shards import TokenShards
    from parallel.metrics.record import StepStats


class Evaluation:
    def __init__(self, engine: DeepSpeedEngine, val_rows: TokenShards | ValidationSets | None, cfg: Config,
                 rank: int, world: int, device: torch.device):
        self.engine, self.val_rows, self.rank, self.world, self.device = engine, val_rows, rank, world, device
        self.t = cfg.train

    def due(self, step: int) -> bool:
        return self.val_rows is not None and (step % self.t.eval_every == 0 or step == self.t.max_steps)

    def _batch(self, rows: TokenShards, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of global evaluation batch ``i``: micro_batch_size rows, in rank order."""
        mbs = self.t.micro_batch_size
        start = (i * self.world + self.rank) * mbs
        return batch_from_rows(rows, [(start + j) % len(rows) for j in range(mbs)])

    def _local_loss(self, rows: TokenShards) -> float:
        """This rank's mean loss over its rows of the first eval_batches global batches of ``rows``."""
        total = 0.0
        for i in range(self.t.eval_batches):
            x, y = self._batch(rows, i)
            total += float(self.engine(x.to(self.device), y.to(self.device)).lm_loss)
        return total / max(1, self.t.eval_batches)

    @torch.no_grad()
    def losses(self) -> list[float]:
        """Collective: every rank evaluates its own rows of each global batch of each set; the means over
        ranks, one per validation set (one collective for all of them)."""
        sets = self.val_rows.rows if isinstance(self.val_rows, ValidationSets) else [self.val_rows]
        self.engine.eval()
        local = [self._local_loss(rows) for rows in sets]
        self.engine.train()
        return mean_over_ranks(local, self.device)

    def loss(self) -> float:
        """Collective: the validation loss (of several sets, their weighted mean)."""
        return self.fields_now()["val_loss"]

    def fields_now(self) -> dict:
        losses = self.losses()
        if not isinstance(self.val_rows, ValidationSets):
            return {"val_loss": losses[0]}
        v = self.val_rows
        return {"val_loss": sum(w * x for w, x in zip(v.weights, losses)) / sum(v.weights),
                "val_loss_by_source": dict(zip(v.names, losses))}

    def fields(self, s: StepStats) -> dict:
        return self.fields_now() if self.due(s.step) else {}
