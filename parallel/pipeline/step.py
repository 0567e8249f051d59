"""The pipelined optimizer step (train.py's ``Trainer.train_step`` delegates here when parallel.pp > 1).

    rows of this pipeline's share of the global batch (every rank of a pipeline reads the same rows)
    -> schedule.step: grad_accum micro-batches through the stages (forward, backward, in the schedule's order)
    -> engine.step(): DeepSpeed reduces the accumulated gradients over the stage's data-parallel ranks
       (ZeRO-1: its partitions) and steps; the norm and the non-finite flag span every stage (groups.py)
    -> router counts: each stage's own MoE layers, summed over its stage group; biases updated per stage;
       the (L, E) table of all layers assembled over the pipe group for the log and the checkpoint
    -> loss parts: lm and MTP from the last stage, aux summed over the stages, shared over the pipe group

DeepSpeed's engine runs with ``managed_gradient_accumulation: false`` (parallel/engine.py): the schedule's
backward passes only accumulate into ``.grad``; ``engine.step()`` is the accumulation boundary.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining.schedules import OVERLAP_F_B

from data import batch_from_rows
from model.loss import IGNORE_INDEX
from model.schedules import gamma_at, lr_at, mtp_weight_at
from model.transformer import DeepseekV3, shift_left
from parallel.balance import gather_counts, update_biases
from parallel.collectives import agree_on_step
from parallel.device import batch_to_device
from parallel.engine import set_lr
from parallel.expert.dispatcher import AllToAllDispatcher
from parallel.metrics.record import StepStats
from parallel.pipeline.overlap import overlapped_pair, own_ep_group
from parallel.pipeline.plan import num_stages, rank_stages, split_layers
from parallel.pipeline.schedule import StageClock, build_schedule, run_sub_action
from parallel.pipeline.stages import StageModule, keep_stages, next_tokens

if TYPE_CHECKING:
    from configs.schema import Config
    from parallel.pipeline.groups import PipeGroups


def moe_keys(model: DeepseekV3) -> list[str]:
    """Module names of the MoE layers in ``model.moe_layers()`` order (layers, then MTP)."""
    from model.moe import MoE
    return [name for name, m in model.named_modules() if isinstance(m, MoE)]


class Pipeline:
    """This rank's stages of the model, the schedule over them, and the pipelined step."""

    def __init__(self, cfg: Config, model: DeepseekV3, groups: PipeGroups):
        p = cfg.parallel
        self.cfg, self.model, self.groups = cfg, model, groups
        self.n_stages = num_stages(cfg)
        self.split = split_layers(cfg)
        self.stages = rank_stages(groups.pipe_rank, p.pp, p.pp_schedule)
        all_moe = moe_keys(model)                          # before dropping: the single-device order
        keep_stages(model, self.split, self.stages)
        self.moe_index = [all_moe.index(k) for k in moe_keys(model)]   # rows of the (L, E) table this rank owns
        self.total_moe = len(all_moe)
        self.modules = [StageModule(model, self.split[s], s, self.n_stages) for s in self.stages]
        self.first, self.last = 0 in self.stages, self.n_stages - 1 in self.stages
        self.schedule: Any = None
        self._lm: list[torch.Tensor] = []
        self._mtp: list[torch.Tensor] = []
        self.loss_scale = 1.0
        self.overlap = False

    def describe(self) -> str:
        return (f"pipeline: pp {self.cfg.parallel.pp}, {self.cfg.parallel.pp_schedule}, {self.n_stages} stages of "
                f"{[len(s) for s in self.split]} layers; this rank runs stages {self.stages}"
                + ("; paired forward/backward overlapped" if self.overlap else ""))

    def build_schedule(self, device: torch.device, dtype: torch.dtype) -> None:
        t = self.cfg.train
        self.schedule, stages = build_schedule(self.modules, self.n_stages, self.cfg.parallel.pp_schedule,
                                               t.grad_accum, t.micro_batch_size, self.cfg.data.seq_len, dtype,
                                               device, self.groups.pipe_group, self.loss_fn)
        depths, D = self.model.config.num_nextn_predict_layers, self.model.config.hidden_size
        boundary = (1 + depths) * t.micro_batch_size * self.cfg.data.seq_len * D * torch.finfo(dtype).bits // 8
        self.clock = StageClock(stages, self.groups.pipe_rank, boundary)
        for m in self.model.modules():                   # expert-parallel waits report to the clock's meter
            if isinstance(getattr(m, "dispatcher", None), AllToAllDispatcher):
                m.dispatcher.meter = self.clock.exposed
        p = self.cfg.parallel
        self.overlap = p.pp_schedule == "dualpipev" and p.pp_overlap   # paired forward and backward at once
        if self.overlap:
            if p.ep > 1:
                own_ep_group(self.modules[1], p.ep, self.groups.size, p.pp)
            self.schedule.register_custom_function(OVERLAP_F_B, overlapped_pair(run_sub_action))
        self.device, self.dtype = device, dtype
        self._wall = self._busy = 0.0

    def loss_fn(self, outputs: tuple[torch.Tensor, ...], labels: torch.Tensor) -> torch.Tensor:
        """The last stage's loss of one micro-batch: the output head on the normed states, MTP's on each depth's
        (as DeepseekV3.forward), divided by the micro-batch count (the aux losses get theirs in stages.py)."""
        model = self.model
        lm, _ = model.head_loss(outputs[0], labels)
        mtp_losses = [model.head_loss(o, shift_left(labels, k, fill=IGNORE_INDEX))[0]
                      for k, o in enumerate(outputs[1:], start=1)]
        mtp = (model.mtp_loss_weight / len(mtp_losses) * torch.stack(mtp_losses).sum()
               if mtp_losses else lm.new_zeros(()))
        self._lm.append(lm.detach())
        self._mtp.append(mtp.detach())
        return (lm + mtp) * self.loss_scale / self.cfg.train.grad_accum

    def run_micro_batches(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step's micro-batches through the schedule -> (3,) float64 sums of lm, aux, mtp over them on the
        device, this rank's part (lm and mtp on the last stage, aux on every stage with MoE layers)."""
        depths = self.model.config.num_nextn_predict_layers
        for m in self.modules:
            m.aux_values.clear()
            m.aux_scale = 1.0 / self.cfg.train.grad_accum
        self._lm.clear()
        self._mtp.clear()
        args = ((x, next_tokens(y, depths)) if depths else (x,)) if self.first else ()
        t0, busy0 = time.perf_counter(), self.clock.busy_s
        self.schedule.step(*args, target=y if self.last else None, return_outputs=False)
        self._wall += time.perf_counter() - t0
        self._busy += self.clock.busy_s - busy0
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        total = lambda vals: torch.stack(vals).double().sum() if vals else zero   # noqa: E731
        # on the device: read at logging steps only (as train.py's step)
        return torch.stack([total(self._lm), sum((total(m.aux_values) for m in self.modules), zero),
                            total(self._mtp)])

    def fields(self, s: StepStats) -> dict:
        """Collective (metrics record): per rank, the seconds the schedule ran and the share of them it did not
        compute (the bubble and the waits on neighbours), since the last record; bytes sent to other stages; the
        share in which every chunk it was running waited on an expert-parallel exchange (0 without EP), and in
        which every one waited on the (emulated) link's transfer time."""
        t = torch.tensor([self._wall, self._busy, float(self.clock.sent_bytes), *self.clock.exposed.take()],
                         dtype=torch.float64, device=self.device)
        parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        self._wall = self._busy = 0.0
        self.clock.sent_bytes = 0
        return {"pp_schedule_s": [round(float(p[0]), 6) for p in parts],
                "pp_idle_fraction": [round(1 - float(p[1]) / max(float(p[0]), 1e-12), 6) for p in parts],
                "pp_sent_bytes": [int(p[2]) for p in parts],
                # parallel/exposure.py: the share of the schedule's time every running chunk waited on an all-to-all
                "pp_exposed_a2a_fraction": [round(float(p[3]) / max(float(p[0]), 1e-12), 6) for p in parts],
                "pp_exposed_link_fraction": [round(float(p[4]) / max(float(p[0]), 1e-12), 6) for p in parts]}

    def train_step(self, trainer: Any, step: int) -> StepStats:
        """train.py's Trainer.train_step under parallel.pp (same record, same order of collectives per rank)."""
        t, engine, device = trainer.t, trainer.engine, trainer.device
        trainer.faults.before_step(step)
        t0 = time.perf_counter()
        lr = lr_at(step - 1, t)
        set_lr(engine, lr)
        self.model.mtp_loss_weight = mtp_weight = mtp_weight_at(step - 1, t, self.cfg.model.mtp_loss_weight)
        self.loss_scale = trainer.faults.loss_scale(step)
        rows = trainer.sampler.next_batch()                      # (grad_accum x mbs,) this pipeline's rows
        x, y = batch_from_rows(trainer.train_rows, rows)
        lm_aux_mtp = self.run_micro_batches(batch_to_device(x, device), batch_to_device(y, device))
        engine.step()                                            # reduce over the stage group, then the update
        dist.all_reduce(lm_aux_mtp, group=self.groups.pipe_group)   # lm, mtp: the last stage's; aux: every stage's
        parts = torch.cat([lm_aux_mtp.sum(0, keepdim=True), lm_aux_mtp])   # (4,) loss, lm, aux, mtp on the device
        local = gather_counts(trainer.moes, self.groups.stage_group)   # (L_here, E) this rank's MoE layers
        counts = torch.zeros(self.total_moe, self.cfg.model.n_routed_experts, device=device)
        if local.numel():
            counts[self.moe_index] = local.to(device)
        dist.all_reduce(counts, group=self.groups.pipe_group)    # every layer's row from the stage that runs it
        trainer.expert_load.add(counts)
        stop, skipped, skip_seen = agree_on_step(trainer.stop_signal.requested, not engine.was_step_applied(),
                                                 device)
        gamma = gamma_at(step - 1, t)
        if not skipped:
            update_biases(trainer.moes, local, gamma)
        trainer.skipped_in_a_row = trainer.skipped_in_a_row + 1 if skipped else 0
        grad_norm = engine.get_global_grad_norm()                # a device tensor under ZeRO: read when logged
        seconds = time.perf_counter() - t0
        busy, wait = trainer.clock.step_end(seconds)
        return StepStats(step=step, parts=parts / t.grad_accum, weight=1.0, lr=lr, mtp_weight=mtp_weight,
                         grad_norm=grad_norm, counts=counts, gamma=gamma,
                         skipped=skipped, skipped_in_a_row=trainer.skipped_in_a_row, skip_seen=skip_seen, stop=stop,
                         seconds=seconds, busy_s=busy, wait_s=wait)
