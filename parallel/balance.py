"""Auxiliary-loss-free load balancing (DeepSeek-V3 sec. 2.1.2), across data-parallel ranks.

After each optimizer step every MoE layer's routed-token counts (accumulated by the model
over all micro-steps since the last update) are summed over the data-parallel ranks, then

    bias_e += gamma * sign(mean_e' count_e' - count_e)

so overloaded experts become less likely to be selected. All ranks apply the same update
from the same summed counts, so the biases stay identical and the update does not depend
on how the global batch was split. gamma is ``train.bias_update_speed`` until
``train.bias_update_stop_fraction`` of ``train.max_steps``, then 0.

Shapes: L MoE layers (MTP's included), E routed experts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from model.moe import MoE


def gather_counts(moe_layers: list[MoE], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(L, E) routed-token counts summed over the ranks of ``group``; zeroes the local ones."""
    if not moe_layers:
        return torch.zeros(0, 0)
    counts = torch.stack([m.tokens_per_expert.float() for m in moe_layers])  # (L, E)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    for m in moe_layers:
        m.tokens_per_expert.zero_()
    return counts


@torch.no_grad()
def update_biases(moe_layers: list[MoE], counts: torch.Tensor, gamma: float) -> None:
    """bias += gamma * sign(mean - count), per layer. counts (L, E) as from gather_counts."""
    if gamma == 0.0:
        return
    for m, c in zip(moe_layers, counts):
        bias = m.gate.e_score_correction_bias
        bias += (gamma * torch.sign(c.mean() - c)).to(device=bias.device, dtype=bias.dtype)


def imbalance(counts: torch.Tensor) -> list[float]:
    """Per layer max/mean token count (1.0 = perfectly balanced). counts (L, E)."""
    mean = counts.mean(dim=1).clamp_min(1e-9)
    return [round(float(x), 4) for x in counts.max(dim=1).values / mean]


class ExpertLoad:
    """Routed tokens per (MoE layer, expert), summed over the data-parallel ranks: over the whole run
    (checkpointed: ``parallel.expert_placement=load`` places experts by it at a resume) and since the
    last metrics record (logged as ``expert_load``). Shapes: (L, E)."""

    def __init__(self, n_layers: int, n_experts: int):
        self.total = torch.zeros(n_layers, n_experts, dtype=torch.float64)
        self.interval = torch.zeros_like(self.total)

    def add(self, counts: torch.Tensor) -> None:
        if counts.numel():
            c = counts.double()   # summed where the counts are: read at a record or a save, not every step
            if self.total.device != c.device:
                self.total, self.interval = self.total.to(c.device), self.interval.to(c.device)
            self.total += c
            self.interval += c

    def take_interval(self) -> list[list[int]]:
        """The counts since the last call (rounded), then zeroed."""
        out = self.interval.round().long().tolist()
        self.interval.zero_()
        return out

    def state_dict(self) -> list[list[int]]:
        return self.total.round().long().tolist()

    def load_state_dict(self, saved: list[list[int]] | None) -> None:
        if saved:
            self.total = torch.tensor(saved, dtype=torch.float64)
