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

import torch
import torch.distributed as dist


def gamma_at(step: int, t) -> float:
    """Bias update speed after optimizer step ``step`` (0-based) for TrainConfig ``t``."""
    return t.bias_update_speed if step < t.bias_update_stop_fraction * t.max_steps else 0.0


def gather_counts(moe_layers, group=None) -> torch.Tensor:
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
def update_biases(moe_layers, counts: torch.Tensor, gamma: float) -> None:
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
