"""The one ordered build of a training model and its DeepSpeed engine (train.py, the benchmarks).

    seed -> model -> fp8 swap -> expert sharding -> pipeline split -> init_from -> activation checkpointing
         -> compile -> engine (-> the pipeline schedule)

Why this order:
1. Every rank seeds the same generators and builds the whole single-device model, so the initial
   weights are identical everywhere (and equal a one-process run's) before anything is sliced.
2. FP8 is a module swap of the built model (model/fp8_swap.py): it changes classes, not parameters,
   so it goes first and every later step sees the final module types.
3. Expert sharding keeps this EP rank's experts and installs the all-to-all dispatcher; it precedes
   the weight init (``train.init_from`` reads only this rank's expert rows) and the engine (DeepSpeed
   must see the expert parameters tagged and the experts-only parameter groups).
3b. The pipeline split (``parallel.pp``) drops the layers and modules of other stages after the sharding
   (whose expert placement is indexed by the single-device MoE layers) and before everything that
   walks the model's modules; kept parameters keep their single-device names.
4. ``train.init_from`` fills the final, sharded parameters (a resume loads later, over it).
5. Activation checkpointing wraps each block's forward; after sharding, so the dispatchers are inside
   what is recomputed, and before compile, which must not trace the recompute hooks.
6. torch.compile of the blocks, after the dispatchers were swapped in (they run behind a graph break).
7. ``deepspeed.initialize`` partitions the final parameters for ZeRO and builds the optimizer.
A new module transform goes into this list, once, at the place its dependencies decide.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.compile import compile_blocks
from model.fp8_swap import apply_fp8
from model.recompute import apply_activation_checkpointing
from model.transformer import DeepseekV3
from parallel.engine import build_engine
from parallel.expert.sharding import create_groups, declare_to_deepspeed, shard_experts
from parallel.link import EmulatedLink
from parallel.multisite.groups import SiteMPU, create_site_expert_groups
from parallel.pipeline.groups import PipeMPU, build_pipe_groups, create_stage_expert_groups
from parallel.pipeline.step import Pipeline
from parallel.state.init_from import load_init_weights

if TYPE_CHECKING:
    from configs.schema import Config
    from parallel.expert.placement import Placement
    from parallel.multisite.groups import Sites


@dataclass
class Built:
    model: DeepseekV3
    engine: Any                                   # deepspeed.DeepSpeedEngine
    dispatchers: list = field(default_factory=list)   # one all-to-all dispatcher per MoE layer (EP), else []
    fp8_report: dict | None = None                # apply_fp8's report (backend, kernel, converted modules)
    compiled: int = 0                             # blocks compiled
    pipeline: Pipeline | None = None              # parallel.pp > 1: this rank's stages and their schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_training(cfg: Config, device: torch.device, dp_size: int, *, sites: Sites | None = None,
                   placement: Placement | None = None, init_from: str | None = None,
                   module_transforms: bool = True) -> Built:
    """Build the model and engine for this rank, in the order above.

    ``dp_size``: the world, or one site's ranks under ``sites`` (DeepSpeed's data-parallel size: that / parallel.pp);
    ``placement``: the expert placement (parallel/layout.py: run_placement; None: even);
    ``init_from``: weights to start from (None when resuming: the checkpoint wins);
    ``module_transforms=False`` leaves out fp8, activation checkpointing and compile (a caller that
    swaps them in itself, as benchmarks/measure_memory.py does per variant)."""
    seed_everything(cfg.train.seed)
    model = DeepseekV3(cfg.model)
    built = Built(model=model, engine=None)
    if module_transforms and cfg.fp8.enabled:
        built.fp8_report = apply_fp8(model, cfg.fp8)
    p = cfg.parallel
    pipe = build_pipe_groups(p.pp) if p.pp > 1 else None     # collective: every rank, before the EP groups
    if p.ep > 1:
        ep_group, _ = (create_site_expert_groups(p.ep, sites) if sites else
                       create_stage_expert_groups(p.ep, pipe) if pipe else create_groups(p.ep))
        link = EmulatedLink(p.link_bandwidth_gbps, p.link_latency_us)
        built.dispatchers = shard_experts(model, ep_group, p.ep, overlap=p.overlap, chunks=p.chunks, link=link,
                                          fp8_dispatch=p.fp8_dispatch, placement=placement)
        declare_to_deepspeed(model, p.ep)
    if pipe is not None:   # keep this rank's stages (full parameter names kept) and their dispatchers
        built.pipeline = Pipeline(cfg, model, pipe)
        kept = {id(m.dispatcher) for m in model.moe_layers()}
        built.dispatchers = [d for d in built.dispatchers if id(d) in kept]
    if init_from:
        load_init_weights(model, init_from, stage_only=pipe is not None)   # every rank, its own experts and stages
    if module_transforms and cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if module_transforms and cfg.train.compile:
        built.compiled = compile_blocks(model)
    mpu = SiteMPU(sites) if sites else PipeMPU(pipe) if pipe else None
    built.engine = build_engine(model.to(device), cfg, dp_size // p.pp, mpu=mpu)
    if built.pipeline is not None:
        built.pipeline.build_schedule(device, torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32)
    return built
