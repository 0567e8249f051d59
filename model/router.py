"""DeepSeek-V3 router: sigmoid affinities, bias-steered group-limited top-k, dropless.

Shapes: T tokens, D model dim, E routed experts, K experts per token, G groups.

The correction bias (fp32 buffer, updated outside autograd by the aux-loss-free balancing
rule) only decides *which* experts are picked; the gating weights come from the unbiased
sigmoid scores, as in the DeepSeek-V3 report (eq. 16).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


@dataclass
class Routing:
    topk_idx: torch.Tensor      # (T, K) int64 expert ids
    topk_weight: torch.Tensor   # (T, K) fp32 gating weights (already scaled)
    scores: torch.Tensor        # (T, E) fp32 sigmoid affinities (for the balance loss)


def select_experts(scores: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, k: int) -> torch.Tensor:
    """Group-limited top-k on biased scores. scores (T, E) -> expert ids (T, K)."""
    T, E = scores.shape
    biased = scores + bias                                                    # (T, E)
    grouped = biased.view(T, n_group, E // n_group)                           # (T, G, E/G)
    group_score = grouped.topk(2, dim=-1).values.sum(-1)                      # (T, G)
    keep_groups = group_score.topk(topk_group, dim=-1, sorted=False).indices  # (T, topk_group)
    group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    biased = biased.masked_fill(~expert_mask, float("-inf"))
    return biased.topk(k, dim=-1, sorted=False).indices


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.top_k = cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Router:
        # .to(bf16) / .half() must not round the bias: its updates (gamma ~ 1e-3) would vanish
        super()._apply(fn, recurse)
        self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        """x (T, D) -> Routing. Affinities are computed in fp32 whatever the activation dtype."""
        logits = F.linear(x.float(), self.weight.float())                     # (T, E)
        scores = logits.sigmoid()
        with torch.no_grad():
            idx = select_experts(scores, self.e_score_correction_bias.float(),
                                 self.n_group, self.topk_group, self.top_k)
        weight = scores.gather(1, idx)                                        # (T, K), unbiased
        if self.norm_topk_prob:
            weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
        return Routing(idx, weight * self.scaling, scores)


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """Sequence-wise auxiliary loss (DeepSeek-V3 eqs. 17-20), averaged over sequences.

    For each sequence of S tokens: f_i = E / (K S) * #tokens choosing expert i,
    P_i = mean_t s'_{i,t} with s' the affinities normalised over experts; L = alpha * sum_i f_i P_i.
    scores (B*S, E), topk_idx (B*S, K).
    """
    T, E = scores.shape
    K = topk_idx.shape[1]
    S = T // batch
    with torch.no_grad():
        counts = torch.zeros(batch, E, device=scores.device, dtype=scores.dtype)
        counts.scatter_add_(1, topk_idx.view(batch, S * K),
                            torch.ones_like(topk_idx, dtype=scores.dtype).view(batch, S * K))
        f = counts * (E / (K * S))                                            # (B, E)
    p = (scores / scores.sum(-1, keepdim=True)).view(batch, S, E).mean(1)     # (B, E)
    return alpha * (f * p).sum(-1).mean()
