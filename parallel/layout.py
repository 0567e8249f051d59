"""The training layout a config describes, for the memory plan (model/memory_plan.py): ``--plan``
text plus the config's parallel and deepspeed sections -> a ``Layout``, including the largest EP
rank under an uneven expert placement (the placement is built exactly as the trainer builds it).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from model.memory_plan import DEFAULT_BUCKET, PLAN_FIELDS, Layout, moe_layer_count
from parallel.engine import check_offload, offload_device
from parallel.expert.placement import build_placement, describe, ep_capacities, rank_loads, read_expert_loads
from parallel.pipeline.plan import SCHEDULES, check_pipeline, rank_stages, split_layers

if TYPE_CHECKING:
    import torch

    from configs.schema import Config
    from parallel.expert.placement import Placement
    from parallel.unequal.shares import Shares


def parse_plan(text: str, cfg: Config) -> Layout:
    """``world=W,ep=E,zero=Z,dtype=D[,offload=cpu][,mbs=B,seq=S][,pp=P,schedule=S,accum=M]`` -> Layout. Fields
    not given come from the config (parallel.ep, deepspeed.zero_optimization, train.dtype, micro batch, seq_len);
    world is required. A ValueError names the bad field and its value."""
    zero_cfg = (cfg.deepspeed.get("zero_optimization") or {}) if isinstance(cfg.deepspeed, dict) else {}
    raw: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise ValueError(f"--plan {text!r}: {part!r} is not field=value (fields: {', '.join(PLAN_FIELDS)})")
        if key not in PLAN_FIELDS:
            raise ValueError(f"--plan: unknown field {key!r}; known fields: {', '.join(PLAN_FIELDS)}")
        if key in raw:
            raise ValueError(f"--plan: field {key!r} given twice")
        raw[key] = value.strip()

    def integer(key: str, default: int | None) -> int:
        if key not in raw:
            if default is None:
                raise ValueError(f"--plan {text!r}: {key}=N is required")
            return default
        try:
            v = int(raw[key])
        except ValueError:
            raise ValueError(f"--plan: {key}={raw[key]!r} is not an integer") from None
        if v < 1 and key != "zero":
            raise ValueError(f"--plan: {key}={v} must be >= 1")
        return v

    world = integer("world", None)
    ep = integer("ep", cfg.parallel.ep)
    zero = integer("zero", int(zero_cfg.get("stage", 0)))
    dtype = raw.get("dtype", cfg.train.dtype)
    offload = raw.get("offload", offload_device(cfg.deepspeed))
    if zero not in (0, 1, 2):
        raise ValueError(f"--plan: zero={zero}: supported ZeRO stages are 0, 1 and 2")
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--plan: dtype={dtype!r}: must be fp32 or bf16")
    if offload not in ("cpu", "none"):
        raise ValueError(f"--plan: offload={offload!r}: must be cpu or none")
    if world % ep:
        raise ValueError(f"--plan: ep={ep} does not divide world={world} (world = ep x expert-data-parallel)")
    E = cfg.model.n_routed_experts
    rank_experts, rank_copies = placement_bounds(cfg, ep) if E and ep > 1 else (0, 1.0)
    if E and E % ep and not rank_experts:
        raise ValueError(f"--plan: ep={ep} does not divide model.n_routed_experts={E} (or place experts by "
                         "parallel.expert_placement=capacity)")
    try:   # the trainer's own rule for offload (stage 0 and devices other than cpu fail)
        check_offload({"zero_optimization": {"stage": zero, "offload_optimizer": {"device": offload}}})
    except ValueError as e:
        raise ValueError(f"--plan: offload={offload} with zero={zero}: {e}") from None
    pipe = pipeline_fields(cfg, world, ep, raw, integer, dict(zero_optimization=dict(
        stage=zero, offload_optimizer=dict(device=offload))), dtype)
    return Layout(world=world, ep=ep, zero=zero, dtype=dtype, offload=offload == "cpu",
                  mbs=integer("mbs", cfg.train.micro_batch_size), seq=integer("seq", cfg.data.seq_len),
                  reduce_bucket=int(float(zero_cfg.get("reduce_bucket_size", DEFAULT_BUCKET))),
                  overlap_comm=bool(zero_cfg.get("overlap_comm", False)),
                  expert_calls=cfg.parallel.chunks if ep > 1 and cfg.parallel.overlap else 1,
                  rank_experts=rank_experts, rank_copies=rank_copies, **pipe)


def pipeline_fields(cfg: Config, world: int, ep: int, raw: dict[str, str], integer: Any, ds: dict[str, Any],
                    dtype: str) -> dict[str, Any]:
    """``pp=P[,schedule=S][,accum=M]`` (defaults: parallel.pp, parallel.pp_schedule, train.grad_accum) -> the
    Layout's pipeline fields, checked as the trainer checks them (parallel/pipeline/plan.py)."""
    p = cfg.parallel
    pp, schedule = integer("pp", p.pp), raw.get("schedule", p.pp_schedule)
    if schedule not in SCHEDULES:
        raise ValueError(f"--plan: schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")
    if pp == 1:
        return {}
    trial = copy.deepcopy(cfg)
    trial.parallel.pp, trial.parallel.pp_schedule, trial.parallel.ep = pp, schedule, ep
    trial.train.grad_accum, trial.train.eval_batches = integer("accum", cfg.train.grad_accum), 0
    trial.deepspeed, trial.train.dtype = ds, dtype
    check_pipeline(trial, world)
    split = split_layers(trial)
    return dict(pp=pp, pp_schedule=schedule, micro_batches=trial.train.grad_accum,
                pp_split=tuple(tuple(s) for s in split),
                pp_rank_stages=tuple(tuple(rank_stages(r, pp, schedule)) for r in range(pp)))


def configured_placement(cfg: Config, ep: int) -> tuple[Placement | None, torch.Tensor | None]:
    """parallel.expert_placement as the trainer would build it before any measurement -> (placement,
    (L, E) loads or None); (None, None) for the even placement. capacity: from parallel.rank_capacity
    (a list: "auto" is measured at run time, so it cannot be planned); load: from the router counts of
    parallel.expert_load_from."""
    p = cfg.parallel
    if p.expert_placement == "even":
        return None, None
    if p.rank_capacity == "auto":
        raise ValueError(f"--plan: parallel.expert_placement={p.expert_placement} with parallel.rank_capacity=auto: "
                         "the capacities are measured at run time; give them as a list to plan")
    loads = read_expert_loads(p.expert_load_from) if p.expert_placement == "load" and p.expert_load_from else None
    placement = build_placement(p.expert_placement, moe_layer_count(cfg.model), cfg.model.n_routed_experts, ep,
                                ep_capacities(p.rank_capacity, ep), loads)
    return placement, loads


def placement_bounds(cfg: Config, ep: int) -> tuple[int, float]:
    """-> (the most experts an EP rank holds in a MoE layer, the most routed copies an EP rank computes
    as a multiple of the balanced T * K); (0, 1.0) for the even placement. Routing is taken as
    balanced over experts (what the bias-steered router aims at), except under the load placement,
    whose measured loads give each rank's share."""
    placement, loads = configured_placement(cfg, ep)
    if placement is None:
        return 0, 1.0
    E = cfg.model.n_routed_experts
    most = max(len(ids) for layer in placement for ids in layer)
    if loads is None:
        return most, max(ep * len(ids) / E for layer in placement for ids in layer)
    copies = 0.0
    for layer, load in zip(placement, loads.tolist()):
        per_rank = rank_loads(layer, load)
        copies = max(copies, ep * max(per_rank) / max(sum(per_rank), 1e-30))
    return most, copies


def run_placement(cfg: Config, shares: Shares, saved_loads: list[list[float]] | None,
                  n_layers: int) -> tuple[Placement | None, str]:
    """parallel.expert_placement for a run -> (placement or None for the even one, a line for the log).

    capacity: the configured rank capacities, or auto's measured shares (known from the resume
    after the probe; a fresh auto run starts even). load: the router counts of
    parallel.expert_load_from, else ``saved_loads`` (those of the checkpoint being resumed)."""
    p = cfg.parallel
    mode, caps = p.expert_placement, None
    if mode == "even":
        return None, ""
    if isinstance(p.rank_capacity, list):
        caps = ep_capacities(p.rank_capacity, p.ep)
    elif p.rank_capacity == "auto" and shares.measured:
        caps = ep_capacities(shares.rows, p.ep)            # rows per step are proportional to measured speed
    elif mode == "capacity":
        return None, ("expert_placement=capacity: no capacities yet (auto measures them in this run); experts stay "
                      "even until a resume")
    loads = None
    if mode == "load":
        if p.expert_load_from:
            loads = read_expert_loads(p.expert_load_from)
        elif saved_loads and any(any(row) for row in saved_loads):
            loads = saved_loads
    placement = build_placement(mode, n_layers, cfg.model.n_routed_experts, p.ep, caps, loads)
    return placement, f"expert placement {mode}: {describe(placement)}"
