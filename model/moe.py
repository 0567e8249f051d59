"""DeepSeekMoE block: shared experts + fine-grained routed experts.

Shapes: B batch, S sequence, T = B*S tokens, D model dim, F expert hidden (moe_intermediate_size),
E routed experts, K experts per token, N = T*K routed token copies.

Flow: router -> sort token copies by expert (permute) -> dispatcher.dispatch -> grouped GEMM
over local experts (SwiGLU) -> dispatcher.combine -> unpermute, weight, sum; plus shared experts.
The dispatcher is an object handed in from outside: ``LocalDispatcher`` (identity) on one
device; ``parallel/`` swaps in an all-to-all one that also overlaps communication with the
shared experts and with other token chunks. Nothing here knows about ranks.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.grouped_gemm import grouped_mm
from model.router import Router, sequence_balance_loss


class MLP(nn.Module):
    """SwiGLU feed-forward (dense layers and the shared experts)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored stacked, in (in, out) layout for the grouped GEMM.

    w_gate_up[e] = [W_gate^T | W_up^T] (D, 2F);  w_down[e] = W_down^T (F, D).
    """
    traceable = True   # torch.compile can trace grouped_mm (a custom op with a shape function)

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden, dim))

    def forward(self, x: torch.Tensor, counts: torch.Tensor, row_weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x (N, D) sorted by local expert, counts (E_local,) -> (N, D).

        ``row_weight`` (N, 1), optional: each row's gating weight, applied to the (N, F) hidden
        activation instead of the (N, D) output: the same product (the down projection is linear)
        for half the elementwise work when F < D, as fine-grained experts have."""
        h = self.grouped_mm(x, self.w_gate_up, counts)                       # (N, 2F)
        gate, up = h.split(self.hidden, dim=-1)
        act = F.silu(gate) * up                                              # (N, F)
        if row_weight is not None:
            act = act * row_weight
        return self.grouped_mm(act, self.w_down, counts)                     # (N, D)

    def grouped_mm(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The GEMM both projections use; the FP8 swap overrides only this."""
        return grouped_mm(x, w, counts)

    def forward_reference(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """Test oracle: loop over experts, gather the tokens that chose each, scatter-add back.

        x (T, D), topk_idx/topk_weight (T, K) -> (T, D). No sorting, no grouped GEMM.
        """
        out = torch.zeros_like(x)
        F_ = self.hidden
        for e in range(self.num_experts):
            tok, slot = torch.where(topk_idx == e)
            if tok.numel() == 0:
                continue
            w = self.w_gate_up[e]
            h = x[tok] @ w
            y = (F.silu(h[:, :F_]) * h[:, F_:]) @ self.w_down[e]
            out.index_add_(0, tok, y * topk_weight[tok, slot, None].to(y.dtype))
        return out


@dataclass
class Permutation:
    """Token copies sorted by expert. N = T*K copies; copy j of token t is flat index t*K + j."""
    order: torch.Tensor      # (N,) flat copy index at each sorted position
    token_of: torch.Tensor   # (N,) source token of each sorted position
    counts: torch.Tensor     # (E,) copies routed to each expert


def expert_counts(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """topk_idx (...) -> (E,) int64 copies per expert. A scatter-add rather than torch.bincount,
    whose output length depends on the data: this one has a static shape, so it traces."""
    flat = topk_idx.flatten()
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def permute(topk_idx: torch.Tensor, n_experts: int) -> Permutation:
    """topk_idx (T, K) -> the stable sort of its copies by expert id (hand-checked in tests)."""
    flat_expert = topk_idx.flatten()                                         # (N,)
    order = torch.argsort(flat_expert, stable=True)
    return Permutation(order, order // topk_idx.shape[1], expert_counts(flat_expert, n_experts))


def sorted_weights(topk_weight: torch.Tensor, perm: Permutation, dtype: torch.dtype) -> torch.Tensor:
    """topk_weight (T, K) -> (N, 1): the gating weight of each copy, in expert order."""
    return topk_weight.flatten()[perm.order].unsqueeze(-1).to(dtype)


def unpermute(y_sorted: torch.Tensor, perm: Permutation, topk_weight: torch.Tensor | None, n_tokens: int
              ) -> torch.Tensor:
    """y_sorted (N, D) in expert order -> (T, D): weight each copy (unless ``topk_weight`` is None:
    already weighted), sum the K copies of a token."""
    if topk_weight is not None:
        y_sorted = y_sorted * sorted_weights(topk_weight, perm, y_sorted.dtype)
    return y_sorted.new_zeros(n_tokens, y_sorted.shape[1]).index_add_(0, perm.token_of, y_sorted)


class LocalDispatcher:
    """Single device: every expert is local. permute -> grouped GEMM -> unpermute, then the
    shared experts. ``parallel.expert.dispatcher.AllToAllDispatcher`` has the same call signature."""

    traceable = True   # static shapes, no collectives: torch.compile takes it into the block's graph

    def __call__(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                 experts: RoutedExperts, shared: nn.Module | None) -> torch.Tensor:
        perm = permute(topk_idx, experts.num_experts)
        # index_select, not x[idx]: its backward (index_add) sums in a fixed order on CPU, so runs
        # are bit-reproducible without torch.use_deterministic_algorithms
        y_sorted = experts(x.index_select(0, perm.token_of), perm.counts,
                           row_weight=sorted_weights(topk_weight, perm, x.dtype))   # weighted inside
        y = unpermute(y_sorted, perm, None, x.shape[0])
        return y if shared is None else y + shared(x)


def _plain_call(dispatcher: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    return dispatcher(*args)


# torch.compiler.disable(_plain_call), set by model/compile.py before it compiles anything: built on
# demand because it imports torch._dynamo (about a second of every process start otherwise)
_eager_under_compile: Callable[..., torch.Tensor] | None = None


def run_dispatch_eagerly_under_compile() -> None:
    """Called before blocks are compiled (model/compile.py): from then on an all-to-all dispatcher or
    FP8 experts run behind a graph break, eagerly, even inside a compiled block (they issue
    collectives with data-dependent split sizes, or loop on the host)."""
    global _eager_under_compile
    if _eager_under_compile is None:
        _eager_under_compile = torch.compiler.disable(_plain_call)


def _eager_dispatch(dispatcher: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """A plain call when nothing is compiled; behind a graph break once blocks are compiled."""
    if _eager_under_compile is not None:
        return _eager_under_compile(dispatcher, *args)
    return dispatcher(*args)


def _dispatch(dispatcher: Callable[..., torch.Tensor], x: torch.Tensor, topk_idx: torch.Tensor,
              topk_weight: torch.Tensor, experts: RoutedExperts, shared: nn.Module | None) -> torch.Tensor:
    """The local dispatcher with the plain grouped GEMM traces (a compiled block holds the whole MoE
    layer); an all-to-all one, or FP8 experts (host-side loops over expert segments), run eagerly."""
    args = (x, topk_idx, topk_weight, experts, shared)
    if getattr(dispatcher, "traceable", False) and experts.traceable:
        return dispatcher(*args)
    return _eager_dispatch(dispatcher, *args)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts > 0 else None)
        self.aux_alpha = cfg.aux_loss_alpha
        self.impl = cfg.moe_impl
        self.dispatcher = LocalDispatcher()
        # tokens routed to each expert since the trainer last read and zeroed it (bias update)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.count_tokens = True  # the trainer turns this off during activation recomputation

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> (y (B, S, D), sequence-wise aux loss (scalar))."""
        B, S, D = x.shape
        flat = x.reshape(B * S, D)                                           # (T, D)
        r = self.gate(flat)
        if self.training and self.count_tokens:
            with torch.no_grad():
                self.tokens_per_expert += expert_counts(r.topk_idx, self.n_experts).float()
        if self.impl == "loop":
            y = self.experts.forward_reference(flat, r.topk_idx, r.topk_weight)
            y = y if self.shared_experts is None else y + self.shared_experts(flat)
        else:
            y = _dispatch(self.dispatcher, flat, r.topk_idx, r.topk_weight, self.experts, self.shared_experts)
        aux = (sequence_balance_loss(r.scores, r.topk_idx, B, self.aux_alpha)
               if self.training and self.aux_alpha > 0 else flat.new_zeros(()))
        return y.view(B, S, D), aux
