"""Validation loss under parallel.pp: each evaluation batch goes forward through the stages in order.

    first stage's rank: embed -> its layers -> send (h, MTP embeddings) to the next stage's rank
    ...                  recv -> its layers -> send ...                  (a rank's adjacent stages: handed over)
    last stage's rank:   recv -> its layers -> norm, head (and MTP) -> the lm loss of the batch

No schedule: evaluation is forward only, a few batches every ``train.eval_every`` steps, so one batch at a time
through the stages in turn is enough and needs nothing from the training schedule (torch's ``schedule.eval``
still walks the training order, backward actions and all). Each evaluation batch has the rows a
data-parallel rank reads at pp=1 (``data_position``: the ranks of one pipeline read the same rows), so the
validation loss is the same at any ``pp``. Expert-parallel ranks of a stage run the same sequence, so their
all-to-alls meet.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from parallel.device import batch_to_device
from parallel.metrics.evaluation import Evaluation
from parallel.pipeline.plan import data_position, stage_rank
from parallel.pipeline.schedule import boundary_shapes
from parallel.pipeline.stages import next_tokens

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from configs.schema import Config
    from data.mixture import ValidationSets
    from data.shards import TokenShards
    from parallel.pipeline.step import Pipeline


class PipelineEvaluation(Evaluation):
    """``Evaluation`` whose batches run through this rank's stages; ``rank``/``world`` are the data-parallel
    position (which rows), the loss is the last stage's, shared over the pipe group."""

    def __init__(self, pipeline: Pipeline, engine: DeepSpeedEngine, val_rows: TokenShards | ValidationSets | None,
                 cfg: Config, data_rank: int, data_world: int, device: torch.device):
        super().__init__(engine, val_rows, cfg, data_rank, data_world, device)
        self.pipeline = pipeline

    def _local_loss(self, rows: TokenShards) -> float:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(self.t.eval_batches):
            x, y = self._batch(rows, i)
            total += forward_loss(self.pipeline, batch_to_device(x, self.device), batch_to_device(y, self.device))
        dist.all_reduce(total, group=self.pipeline.groups.pipe_group)   # the last stage's sum, on every stage
        return float(total) / max(1, self.t.eval_batches)


def evaluation_for(pipeline: Pipeline | None, engine: DeepSpeedEngine, val_rows: TokenShards | ValidationSets | None,
                   cfg: Config, rank: int, world: int, device: torch.device) -> Evaluation:
    """train.py's evaluation: through the engine at pp=1, through the stages under parallel.pp."""
    if pipeline is None:
        return Evaluation(engine, val_rows, cfg, rank, world, device)
    return PipelineEvaluation(pipeline, engine, val_rows, cfg, *data_position(cfg, rank, world), device)


def forward_loss(pipe: Pipeline, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y (mbs, S) -> the batch's mean next-token loss (float64 scalar) on the last stage's rank, 0 elsewhere.
    Collective over the pipe group (point-to-point between the ranks of adjacent stages)."""
    p, group, me = pipe.cfg.parallel, pipe.groups.pipe_group, pipe.groups.pipe_rank
    owner = [stage_rank(s, p.pp, p.pp_schedule) for s in range(pipe.n_stages)]
    mine = dict(zip(pipe.stages, pipe.modules))
    depths = pipe.model.config.num_nextn_predict_layers
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    out: tuple[torch.Tensor, ...] = ()
    for s in range(pipe.n_stages):
        if owner[s] != me:
            continue
        if s == 0:
            inputs: tuple[torch.Tensor, ...] = (x, next_tokens(y, depths)) if depths else (x,)
        elif owner[s - 1] == me:
            inputs = out                                           # the V's turn: the rank's own previous stage
        else:
            inputs = boundary_shapes(x.shape[0], x.shape[1], pipe.model.config.hidden_size, depths,
                                     pipe.dtype, False, x.device)
            inputs = tuple(t.detach() for t in inputs)
            for t in inputs:                                       # each (mbs, S, D)
                dist.recv(t, group=group, group_src=owner[s - 1])
        out = mine[s](*inputs)
        if s == pipe.n_stages - 1:
            loss = pipe.model.head_loss(out[0], y)[0].double()
        elif owner[s + 1] != me:
            for t in out:
                dist.send(t.contiguous(), group=group, group_dst=owner[s + 1])
    for m in pipe.modules:
        m.aux_values.clear()
    return loss
