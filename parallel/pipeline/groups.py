"""The process groups of a pipeline, and the ``mpu`` DeepSpeed gets for one stage.

    world W = pp pipeline ranks x n ranks per stage (n = ep x expert-data-parallel), stage-major:
    pipeline rank r = global ranks [r*n, (r+1)*n)   (the layout DeepSpeed's own pipeline groups use)
    stage group:     those n ranks: ZeRO data parallelism and router counts of this rank's stages
    pipe group:      rank i of every pipeline rank: the activations and gradients between stages
    EP groups:       DeepSpeed's expert groups with its pipeline stride n, so they stay inside a stage

DeepSpeed sees the stage group as its data-parallel group and the pipe group as its
"model-parallel" group: ZeRO sums the gradient norm and ORs the non-finite flag over the
model-parallel group after the data-parallel one, which makes the clipping norm the whole model's
and the skip decision every stage's. Every stage holds different parameters, so each counts its
own: the model-parallel rank answered is 0 on every rank (DeepSpeed counts a parameter that is not
tensor-parallel only on model-parallel rank 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass
class PipeGroups:
    pp: int                    # pipeline ranks
    size: int                  # ranks per stage (n)
    pipe_rank: int             # this rank's position in its pipeline
    dp_rank: int               # this rank's index inside its stage group (the data-parallel rank)
    stage_group: Any
    pipe_group: Any

    @property
    def count(self) -> int:    # DeepSpeed's expert-group builder calls the stride "pp_size"
        return self.pp

    def stage_ranks(self) -> list[int]:
        return list(range(self.pipe_rank * self.size, (self.pipe_rank + 1) * self.size))


def build_pipe_groups(pp: int) -> PipeGroups:
    """Create every stage and pipe group (collective: all ranks call it, once, in the same order)."""
    world, me = dist.get_world_size(), dist.get_rank()
    n = world // pp
    mine: dict[str, Any] = {}
    for r in range(pp):
        g = dist.new_group(list(range(r * n, (r + 1) * n)))
        if me // n == r:
            mine["stage_group"] = g
    for i in range(n):
        g = dist.new_group([r * n + i for r in range(pp)])
        if me % n == i:
            mine["pipe_group"] = g
    return PipeGroups(pp, n, me // n, me % n, **mine)


def create_stage_expert_groups(ep: int, groups: PipeGroups) -> tuple[Any, Any]:
    """DeepSpeed's expert groups kept inside each stage -> (ep_group, expert_data_parallel_group)."""
    from deepspeed.utils import groups as ds_groups

    from parallel.expert.sharding import expert_group_name

    name = expert_group_name(ep)
    if name not in ds_groups._get_expert_parallel_group_dict():
        ds_groups._create_expert_and_data_parallel(ep, pp_size=groups.pp)
    return ds_groups._get_expert_parallel_group(name), ds_groups._get_expert_data_parallel_group(name)


class PipeMPU:
    """The ``mpu`` handed to ``deepspeed.initialize`` for one stage (see the module docstring)."""

    def __init__(self, groups: PipeGroups):
        self.groups = groups
        self.pipe_group = groups.pipe_group       # parallel/engine.py's FiniteAdamW sums its norm over it

    def get_data_parallel_group(self) -> Any:
        return self.groups.stage_group

    def get_data_parallel_world_size(self) -> int:
        return self.groups.size

    def get_data_parallel_rank(self) -> int:
        return self.groups.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.groups.stage_ranks()

    def get_model_parallel_group(self) -> Any:
        return self.groups.pipe_group

    def get_model_parallel_world_size(self) -> int:
        return self.groups.pp

    def get_model_parallel_rank(self) -> int:
        return 0    # every stage counts its own parameters in the norm (module docstring)

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1    # no tensor parallelism: DeepSpeed must not split or fold anything by it

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()
