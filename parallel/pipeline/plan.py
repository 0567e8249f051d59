"""The pipeline's shape from the config alone (no process group, no weights): how many stages,
which layers each holds, which rank runs each stage, and the config checks that fail before any
process group exists.

    pp ranks per pipeline; stages per rank: 1 (1f1b), 2 (interleaved: looped, dualpipev: V-shaped)
    world = pp x stage_dp;  stage_dp = ep x expert-data-parallel   (EP and ZeRO inside a stage)
    stage 0 also holds the embedding; the last stage the final norm, the output head and MTP

Layers are split into contiguous runs whose planned cost (training FLOPs per token: activated
parameters x 6 plus attention; a MoE layer costs its shared and K routed experts, a dense layer its
wide MLP) is as even as possible; the head and the MTP depths count on the last stage.
``parallel.pp_layers`` overrides the split.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from model.flops import _attention_flops, _block
from parallel.engine import offload_device

if TYPE_CHECKING:
    from configs.schema import Config
    from model.config import ModelConfig

SCHEDULES = ("1f1b", "interleaved", "dualpipev")


def stages_per_rank(schedule: str) -> int:
    return 1 if schedule == "1f1b" else 2


def num_stages(cfg: Config) -> int:
    return cfg.parallel.pp * stages_per_rank(cfg.parallel.pp_schedule)


def stage_rank(stage: int, pp: int, schedule: str) -> int:
    """The pipeline rank that runs ``stage``: looped (stage s on rank s mod pp) or V-shaped (rank r runs
    stages r and 2pp-1-r, so the first and the last stage share rank 0)."""
    if schedule == "dualpipev":
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def rank_stages(rank: int, pp: int, schedule: str) -> list[int]:
    """The stages pipeline rank ``rank`` runs, ascending."""
    return [s for s in range(pp * stages_per_rank(schedule)) if stage_rank(s, pp, schedule) == rank]


def layer_costs(m: ModelConfig, seq_len: int) -> list[float]:
    """Planned training FLOPs per token of each decoder layer (dense and MoE differ)."""
    attn = _attention_flops(m, seq_len)
    return [6 * _block(m, m.is_moe_layer(i))[1] + attn for i in range(m.num_hidden_layers)]


def head_cost(m: ModelConfig, seq_len: int) -> float:
    """Planned FLOPs per token of what the last stage adds: output head and the MTP depths."""
    D, V = m.hidden_size, m.vocab_size
    mtp = 6 * (_block(m, m.n_routed_experts > 0)[1] + 2 * D * D + V * D) + _attention_flops(m, seq_len)
    return 6 * V * D + m.num_nextn_predict_layers * mtp


def split_layers(cfg: Config) -> list[list[int]]:
    """Layer indices per stage of the configured run (``split_for``)."""
    p = cfg.parallel
    return split_for(cfg.model, p.pp, p.pp_schedule, cfg.data.seq_len, p.pp_layers)


def split_for(m: ModelConfig, pp: int, schedule: str, seq_len: int, pp_layers: list[int] | None = None
              ) -> list[list[int]]:
    """Layer indices per stage: ``pp_layers`` if given; under interleaved equal runs; else the contiguous split
    that minimises the largest stage cost (every stage at least one layer)."""
    n = pp * stages_per_rank(schedule)
    if pp_layers:
        bounds, start = [], 0
        for count in pp_layers:
            bounds.append(list(range(start, start + count)))
            start += count
        return bounds
    if schedule == "interleaved":   # virtual stages of equal depth (checked: n divides the layers)
        per = m.num_hidden_layers // n
        return [list(range(k * per, (k + 1) * per)) for k in range(n)]
    costs = layer_costs(m, seq_len)
    costs[-1] += head_cost(m, seq_len)
    return _min_max_split(costs, n)


def _min_max_split(costs: list[float], n: int) -> list[list[int]]:
    """Contiguous split of ``costs`` into ``n`` non-empty runs minimising the largest run's sum
    (dynamic programme over (layers used, runs made); a few hundred layers at most)."""
    L = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(L + 1)]   # best[i][k]: first i layers in k runs
    cut = [[0] * (n + 1) for _ in range(L + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for i in range(k, L - (n - k) + 1):
            for j in range(k - 1, i):
                v = max(best[j][k - 1], prefix[i] - prefix[j])
                if v < best[i][k]:
                    best[i][k], cut[i][k] = v, j
    runs, i = [], L
    for k in range(n, 0, -1):
        j = cut[i][k]
        runs.append(list(range(j, i)))
        i = j
    return runs[::-1]


def check_pipeline(cfg: Config, world_size: int) -> None:
    """Layout checks of parallel.pp that need the world size: one line naming the field and value,
    before any process group exists."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    if p.pp == 1:
        return
    if world_size % p.pp:
        raise ValueError(f"parallel.pp={p.pp}: the world size {world_size} is not divisible by it "
                         "(world = pp x ep x expert-data-parallel)")
    if world_size % (p.pp * p.ep):
        raise ValueError(f"parallel.pp={p.pp} x parallel.ep={p.ep}: the world size {world_size} is not divisible "
                         "by it (expert parallelism stays inside a pipeline stage)")
    n = num_stages(cfg)
    if n > m.num_hidden_layers:
        raise ValueError(f"parallel.pp={p.pp}: {n} pipeline stages ({stages_per_rank(p.pp_schedule)} per rank under "
                         f"parallel.pp_schedule={p.pp_schedule}) for model.num_hidden_layers={m.num_hidden_layers}: "
                         "more stages than layers")
    if p.pp_layers is not None:
        if len(p.pp_layers) != n or sum(p.pp_layers) != m.num_hidden_layers:
            raise ValueError(f"parallel.pp_layers={p.pp_layers}: needs {n} counts (one per stage) summing to "
                             f"model.num_hidden_layers={m.num_hidden_layers}")
    elif p.pp_schedule == "interleaved" and m.num_hidden_layers % n:
        raise ValueError(f"parallel.pp_schedule=interleaved with parallel.pp={p.pp}: {n} stages do not divide "
                         f"model.num_hidden_layers={m.num_hidden_layers} (give parallel.pp_layers)")
    if p.pp_schedule == "dualpipev" and t.grad_accum < 2 * p.pp:
        raise ValueError(f"parallel.pp_schedule=dualpipev: train.grad_accum={t.grad_accum} micro-batches, needs at "
                         f"least 2 x parallel.pp = {2 * p.pp}")
    if p.pp_schedule == "interleaved" and t.grad_accum % p.pp:
        raise ValueError(f"parallel.pp_schedule=interleaved: train.grad_accum={t.grad_accum} micro-batches, must be "
                         f"a multiple of parallel.pp={p.pp}")
    _check_unsupported(cfg)


def _check_unsupported(cfg: Config) -> None:
    """Combinations the pipeline does not run: one line naming both keys."""
    p, t = cfg.parallel, cfg.train
    zero = (cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0) if isinstance(cfg.deepspeed, dict) else 0
    pairs = [(p.sites > 1, f"parallel.sites={p.sites}"),
             (p.rank_capacity is not None, f"parallel.rank_capacity={p.rank_capacity!r}"),
             (p.expert_placement != "even", f"parallel.expert_placement={p.expert_placement}"),
             (p.emulate_slowdown is not None, "parallel.emulate_slowdown"),
             (zero not in (0, 1), f"deepspeed.zero_optimization.stage={zero} (the pipeline runs ZeRO 0 and 1)"),
             (t.dtype == "bf16" and zero == 0, "train.dtype=bf16 with deepspeed.zero_optimization.stage=0"),
             (offload_device(cfg.deepspeed) != "none", "deepspeed.zero_optimization.offload_optimizer"),
             (bool(getattr(cfg.data, "document_mask", False)), "data.document_mask"),
             # its split backward (input, then weight gradients) recomputes a checkpointed block twice, and
             # model/recompute.py's recompute context can be entered once
             (p.pp_schedule == "dualpipev" and t.activation_checkpointing,
              "parallel.pp_schedule=dualpipev and train.activation_checkpointing=true"),
             # the same split retains a compiled block's backward graph, which AOTAutograd's donated buffers
             # forbid; without them the weight half re-runs the whole compiled backward (docs/pipeline.md)
             (p.pp_schedule == "dualpipev" and t.compile, "parallel.pp_schedule=dualpipev and train.compile=true")]
    for bad, what in pairs:
        if bad:
            raise ValueError(f"parallel.pp={p.pp} with {what}: not supported together")


def data_position(cfg: Config, rank: int, world: int) -> tuple[int, int]:
    """-> (data-parallel rank, data-parallel size): which share of the global batch ``rank`` reads. The pp
    ranks of one pipeline (rank i of each stage block) read the same rows."""
    n = world // cfg.parallel.pp
    return rank % n, n
