"""Sites: the world split into S equal sites in rank order, and the process groups inside them.

    world W = S sites x n ranks;  site s = global ranks [s*n, (s+1)*n)  (node order under a hostfile)
    inside a site:  ep groups of ep consecutive ranks; expert-data-parallel groups of the n/ep ranks
                    with the same ep index; the ZeRO data-parallel group = the whole site
    across sites:   the "counterpart" group of rank i of every site (sites have identical layouts,
                    so counterparts own the same fragments of every parameter): the only groups
                    whose traffic crosses the wide-area link (parallel/multisite/outer.py)

DeepSpeed takes the data-parallel group from an ``mpu`` object passed to ``deepspeed.initialize``
(``deepspeed.utils.groups._get_data_parallel_group`` asks it), so ZeRO partitions and reduces
gradients over the site; the same object answers a model-parallel group of one rank (no tensor
or pipeline parallelism here). The expert groups are DeepSpeed's own, made with its "ranks per
stage" stride set to the site size, so they never leave a site either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

if TYPE_CHECKING:
    import torch

    from configs.schema import Config


def check_sites(cfg: Config, world_size: int) -> None:
    """Layout checks that need the world size: fail before any process group exists."""
    p = cfg.parallel
    if world_size % p.sites:
        raise ValueError(f"parallel.sites={p.sites}: the world size {world_size} is not divisible by it "
                         "(sites are equal)")
    n = world_size // p.sites
    if n % p.ep:
        raise ValueError(f"parallel.ep={p.ep}: the site size {n} (world {world_size} / parallel.sites="
                         f"{p.sites}) is not divisible by it (expert parallelism stays inside a site)")


@dataclass
class Sites:
    count: int                 # S
    size: int                  # n ranks per site
    index: int                 # this rank's site
    rank: int                  # this rank's index inside its site
    group: Any                 # this site's ranks: ZeRO data parallelism, router counts
    cross: Any                 # rank `rank` of every site: the cross-site exchange
    singleton: Any             # this rank alone: DeepSpeed's model-parallel group

    def site_ranks(self, s: int) -> list[int]:
        return list(range(s * self.size, (s + 1) * self.size))


def build_sites(count: int) -> Sites:
    """Create every site, counterpart and one-rank group (collective: all ranks call it, once)."""
    world, me = dist.get_world_size(), dist.get_rank()
    n = world // count
    mine = {}
    # dist.new_group must be entered by every rank for every group, in the same order
    for s in range(count):
        g = dist.new_group(list(range(s * n, (s + 1) * n)))
        if me // n == s:
            mine["group"] = g
    for i in range(n):
        g = dist.new_group([s * n + i for s in range(count)])
        if me % n == i:
            mine["cross"] = g
    for r in range(world):
        g = dist.new_group([r])
        if r == me:
            mine["singleton"] = g
    return Sites(count, n, me // n, me % n, **mine)


def create_site_expert_groups(ep: int, sites: Sites) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """DeepSpeed's expert groups (named ``ep_size_{ep}``), kept inside each site -> (ep_group,
    expert_data_parallel_group). Its "pipeline stage" stride is the site size, which makes the
    expert-data-parallel groups the ranks of one site with the same ep index; the ep groups are
    consecutive ranks and stay in a site because ep divides its size."""
    from deepspeed.utils import groups

    from parallel.expert.sharding import expert_group_name

    name = expert_group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep, pp_size=sites.count)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


class SiteMPU:
    """The ``mpu`` handed to ``deepspeed.initialize``: data parallelism = this rank's site, no model
    parallelism (a group of one rank, so DeepSpeed's model-parallel norm and overflow all-reduces
    are no-ops)."""

    def __init__(self, sites: Sites):
        self.sites = sites

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.sites.group

    def get_data_parallel_world_size(self) -> int:
        return self.sites.size

    def get_data_parallel_rank(self) -> int:
        return self.sites.rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.sites.site_ranks(self.sites.index)

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.sites.singleton

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_rank()


def site_losses(loss: float, sites: Sites, device: torch.device) -> list[float]:
    """Each site's mean loss (collective over the world)."""
    import torch

    t = torch.zeros(sites.count, dtype=torch.float64, device=device)
    t[sites.index] = loss / sites.size
    dist.all_reduce(t)
    return t.tolist()
