"""Per-rank memory plan under a pipeline (``--plan ...,pp=P[,schedule=S][,accum=M]``), from the config alone.

    world W = pp x n;  a stage's ZeRO and EP groups are its n ranks (n = W / pp);  M micro-batches per step

Each rank holds its stages' parameters only: the decoder layers of its stages (parallel/pipeline/plan.py's
split, the one the trainer uses), the embedding on stage 0, the final norm, output head and MTP depths on
the last stage. Its state is model/memory_plan.py's ``state_plan`` over those parameters with world n
(dense state partitioned over the stage's ranks, experts over the stage's expert-data-parallel group).

Activations: a stage keeps the saved tensors of every micro-batch it has run forward but not yet backward.
Peak micro-batches in flight (the schedules' warm-up, before the steady one-forward-one-backward phase):
  1f1b         stage r (rank r): min(M, P - r)                         (the first stage keeps P)
  interleaved  rank r, two looped stages r, r + P: Megatron's warm-up count + 1,
               min(2M, 2 (P - r - 1) + P + 1) chunks, the earlier stage holding the larger half
  dualpipev    rank r runs stages r and 2P-1-r: min(M, 2P - r - 1) of the first (its warm-up F0 steps plus
               the F0F1 pairs), min(M, r + 1) of the second (torch's ScheduleDualPipeV steps 1-2)
A stage's saved set per micro-batch is its blocks' (model/memory_plan.py, op by op) plus, on the last stage,
everything outside the blocks (final norms, MTP glue, the loss's dh; the chunked loss's dW once); a
stage other than the first also keeps what it received, (1 + MTP depths) x D per token. Under activation
checkpointing a micro-batch in flight keeps its blocks' inputs, and the peak adds one block's full set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from model.config import ModelConfig
from model.flops import _block
from model.memory_plan import Layout, Params, StatePlan, activation_plan, params, state_plan


@dataclass
class RankPlan:
    rank: int                      # pipeline rank
    stages: list[int]
    layers: list[int]
    params: Params
    state: StatePlan
    in_flight: dict[int, int]      # stage -> micro-batches in flight at the peak
    activations: dict[str, int]    # variant -> bytes


def in_flight(schedule: str, P: int, M: int, rank: int) -> dict[int, int]:
    """Stage -> micro-batches whose activations rank ``rank`` holds at its peak (module docstring)."""
    if schedule == "1f1b":
        return {rank: min(M, P - rank)}
    if schedule == "interleaved":
        n = min(2 * M, 2 * (P - rank - 1) + P + 1)
        return {rank: math.ceil(n / 2), rank + P: n // 2}
    return {rank: min(M, 2 * P - rank - 1), 2 * P - 1 - rank: min(M, rank + 1)}


def stage_params(c: ModelConfig, split: list[list[int]], stages: list[int], ep: int) -> Params:
    """Params of the modules a rank's ``stages`` run (dense: replicated over the stage; experts: over ep)."""
    D, V, last = c.hidden_size, c.vocab_size, len(split) - 1
    expert = 3 * D * c.moe_intermediate_size * c.n_routed_experts
    dense = experts = 0
    for i in (i for s in stages for i in split[s]):
        moe = c.is_moe_layer(i)
        dense += _block(c, moe)[0] - (expert if moe else 0)
        experts += expert if moe else 0
    if 0 in stages:
        dense += V * D
    if last in stages:
        dense += D + (0 if c.tie_word_embeddings else V * D)
        for _ in range(c.num_nextn_predict_layers):
            moe = c.n_routed_experts > 0
            dense += _block(c, moe)[0] - (expert if moe else 0) + 3 * D + 2 * D * D
            experts += expert if moe else 0
    moe_layers = experts // expert if expert else 0
    return Params(dense=dense, experts=experts, largest_local=params(c, ep).largest_local,
                  router_bias=moe_layers * c.n_routed_experts)


def _stage_activation(c: ModelConfig, lay: Layout, layers: list[int], first: bool, last: bool, count: int,
                      fp8: bool) -> tuple[float, float, float]:
    """-> (saved bytes of ``count`` micro-batches, the same checkpointed, the largest block's own set)."""
    ap = activation_plan(c, lay, fp8)
    T, a, D = ap.tokens, lay.w, c.hidden_size
    L = c.num_hidden_layers
    blocks = list(layers) + (list(range(L, L + c.num_nextn_predict_layers)) if last else [])
    per = sum(T * ap.blocks_per_token[i] + ap.block_constants[i] for i in blocks)
    ckpt = T * ap.block_input * len(blocks)
    outside = T * ap.outside_per_token if last else T * 8 if first else 0.0   # token ids on the first
    received = 0.0 if first else T * (1 + c.num_nextn_predict_layers) * D * a
    plain = count * (per + outside + received) + (ap.outside_constant if last else 0.0)
    checkpointed = count * (ckpt + outside + received) + (ap.outside_constant if last else 0.0)
    largest = max((T * ap.blocks_per_token[i] + ap.block_constants[i] for i in blocks), default=0.0)
    return plain, checkpointed, largest


def rank_plan(c: ModelConfig, lay: Layout, split: list[list[int]], rank: int) -> RankPlan:
    """The plan of pipeline rank ``rank`` under ``lay`` (lay.world: the whole world; lay.pp ranks per pipeline;
    the split and the stage-to-rank map as parallel/layout.py's parse_plan put them in the layout)."""
    n_stages = len(split)
    stages = list(lay.pp_rank_stages[rank])          # parallel/layout.py: the trainer's stage-to-rank map
    flight = in_flight(lay.pp_schedule, lay.pp, lay.micro_batches, rank)
    pr = stage_params(c, split, stages, lay.ep)
    stage_lay = replace(lay, world=lay.world // lay.pp)
    acts = {}
    for variant, fp8 in (("plain", False), ("fp8", True)):
        plain = ckpt = largest = 0.0
        for s in stages:
            p_, c_, l_ = _stage_activation(c, stage_lay, split[s], s == 0, s == n_stages - 1, flight[s], fp8)
            plain, ckpt, largest = plain + p_, ckpt + c_, max(largest, l_)
        acts[variant] = int(plain)
        acts[f"{variant}+checkpointed" if fp8 else "checkpointed"] = int(ckpt + largest)
    return RankPlan(rank=rank, stages=stages, layers=[i for s in stages for i in split[s]], params=pr,
                    state=state_plan(c, stage_lay, pr), in_flight=flight, activations=acts)


def pipeline_ranks(c: ModelConfig, lay: Layout) -> list[RankPlan]:
    split = [list(s) for s in lay.pp_split]
    return [rank_plan(c, lay, split, r) for r in range(lay.pp)]
