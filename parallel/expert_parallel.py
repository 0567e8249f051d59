"""Expert parallelism on DeepSpeed: groups, expert sharding and parameter tagging.

world = ep x expert-data-parallel. Groups come from ``deepspeed.utils.groups`` (named
``ep_size_{ep}``), so DeepSpeed's ZeRO-1/2 reduce expert gradients over the
expert-data-parallel group only, once the expert parameters carry DeepSpeed's MoE tags
(``allreduce=False``, ``group_name``) and the optimizer's parameter groups are split with
``split_params_into_different_moe_groups_for_optimizer``.
"""
from __future__ import annotations

import torch
from torch import nn

from parallel.dispatcher import AllToAllDispatcher
from parallel.link import EmulatedLink


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def create_groups(ep: int):
    """Create (once) and return (ep_group, expert_data_parallel_group) for this rank."""
    from deepspeed.utils import groups

    name = expert_group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def keep_local_experts(experts: nn.Module, rank: int, ep: int) -> None:
    """Slice a RoutedExperts' stacked weights down to rank's n/ep experts (contiguous, in order)."""
    E = experts.num_experts
    if E % ep:
        raise ValueError(f"n_routed_experts={E} is not divisible by parallel.ep={ep}")
    El = E // ep
    with torch.no_grad():
        experts.w_gate_up = nn.Parameter(experts.w_gate_up[rank * El:(rank + 1) * El].clone())
        experts.w_down = nn.Parameter(experts.w_down[rank * El:(rank + 1) * El].clone())
    experts.num_experts = El


def shard_experts(model: nn.Module, ep_group, ep: int, overlap: bool = True, chunks: int = 2,
                  link: EmulatedLink | None = None, fp8_dispatch: bool = False) -> list[AllToAllDispatcher]:
    """Keep only this rank's n_routed_experts/ep experts in every MoE layer (MTP included),
    tag them for DeepSpeed, and install the all-to-all dispatcher. Returns the dispatchers."""
    import torch.distributed as dist

    rank = dist.get_rank(ep_group)
    link = link or EmulatedLink()
    dispatchers = []
    for moe in model.moe_layers():
        keep_local_experts(moe.experts, rank, ep)
        for p in moe.experts.parameters():
            p.allreduce = False                       # DeepSpeed: not a data-parallel parameter
            p.group_name = expert_group_name(ep)      # reduced over this expert-data-parallel group
        moe.dispatcher = AllToAllDispatcher(ep_group, moe.n_experts, overlap=overlap, chunks=chunks, link=link,
                                            fp8_dispatch=fp8_dispatch)
        dispatchers.append(moe.dispatcher)
    return dispatchers


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def _marker_class():
    """A parameter-less stand-in for ``deepspeed.moe.layer.MoE``.

    DeepSpeed switches on its MoE support (expert-data-parallel gradient reduction in ZeRO-1/2,
    per-group broadcasts, MoE param groups) only when it finds an instance of its own MoE class
    in the model. Our MoE blocks are plain modules, so one marker per model declares the expert
    layout; it owns no weights, so DeepSpeed writes no expert files for it (the trainer saves
    each rank's expert shard itself, by global expert index).
    """
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelMarker(DeepSpeedMoE):
        def __init__(self, num_experts: int, ep: int):
            nn.Module.__init__(self)  # skip DeepSpeed's layer construction: no gate, no experts
            self.num_experts, self.ep_size = num_experts, ep
            self.num_local_experts = 0          # no expert tensors under this module
            self.expert_group_name = expert_group_name(ep)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            create_groups(self.ep_size)

        def forward(self, *args, **kwargs):  # never called
            raise RuntimeError("ExpertParallelMarker is a declaration, not a layer")

    return ExpertParallelMarker


def declare_to_deepspeed(model: nn.Module, ep: int) -> None:
    """Attach the marker so ``deepspeed.initialize`` configures MoE gradient reduction."""
    E = model.config.n_routed_experts
    model.add_module("deepspeed_ep_marker", _marker_class()(E, ep))


def split_moe_param_groups(groups: list[dict]) -> list[dict]:
    """Name the optimizer groups and move expert parameters into DeepSpeed's MoE groups, so that
    ZeRO reduces their gradients over the expert-data-parallel group only."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    for i, g in enumerate(groups):
        g.setdefault("name", f"group{i}")
    return split_params_into_different_moe_groups_for_optimizer(groups)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every MoE layer's experts gathered from all EP ranks
    (collective over each EP group: call it on every rank). At ep=1 it is just the state dict."""
    import torch.distributed as dist

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        disp = getattr(module, "dispatcher", None)
        if getattr(disp, "group", None) is None:
            continue
        for pname in ("w_gate_up", "w_down"):
            key = f"{name}.experts.{pname}"
            local = sd[key].contiguous()
            parts = [torch.empty_like(local) for _ in range(disp.ep)]
            dist.all_gather(parts, local, group=disp.group)
            sd[key] = torch.cat(parts)                                        # (E, ...) global order
    return sd


def load_full_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a full (gathered) state dict into a model that may hold only its EP rank's experts:
    each rank copies its own slice, whatever ep the checkpoint was saved with."""
    import torch.distributed as dist

    own = model.state_dict()
    sliced = {}
    for key, value in sd.items():
        if key in own and own[key].shape != value.shape and key.endswith(("experts.w_gate_up", "experts.w_down")):
            module = model.get_submodule(key.rsplit(".", 2)[0])
            n_local = own[key].shape[0]
            rank = dist.get_rank(module.dispatcher.group)
            value = value[rank * n_local:(rank + 1) * n_local]
        sliced[key] = value
    missing, unexpected = model.load_state_dict(sliced, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def comm_bytes(dispatchers) -> dict[str, int]:
    """Cumulative all-to-all bytes this rank sent, by kind (dispatch, combine, and their gradients)."""
    total: dict[str, int] = {}
    for d in dispatchers:
        for k, v in d.stats.items():
            total[k] = total.get(k, 0) + v
    return total
