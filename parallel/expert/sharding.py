"""Expert parallelism on DeepSpeed: groups, expert sharding and parameter tagging.

world = ep x expert-data-parallel. Groups come from ``deepspeed.utils.groups`` (named
``ep_size_{ep}``), so DeepSpeed's ZeRO-1/2 reduce expert gradients over the
expert-data-parallel group only, once the expert parameters carry DeepSpeed's MoE tags
(``allreduce=False``, ``group_name``) and the optimizer's parameter groups are split with
``split_params_into_different_moe_groups_for_optimizer``.

Placement (parallel/expert/placement.py): EP rank r may hold any set of experts, unequal in number, the
same on every expert-data-parallel replica. Expert parameters then differ in size across EP
ranks; DeepSpeed partitions and reduces them within their expert-data-parallel group (equal
sizes there), and ``align_zero_buckets`` keeps ZeRO-1/2's gradient buckets flushing at the same
points on every rank, so the data-parallel collectives still match.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn

import torch
from torch import nn

from parallel.expert.dispatcher import AllToAllDispatcher
from parallel.link import EmulatedLink
from parallel.state.ownership import model_placement  # noqa: F401  (the placement a sharded model runs under)

if TYPE_CHECKING:
    import torch.distributed as dist

    from parallel.expert.placement import Layer, Placement


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def create_groups(ep: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Create (once) and return (ep_group, expert_data_parallel_group) for this rank."""
    from deepspeed.utils import groups

    name = expert_group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_group(name)


def keep_experts(experts: nn.Module, ids: Iterable[int]) -> None:
    """Keep only the experts ``ids`` (global ids, in this order) of a RoutedExperts that holds all
    E; records them as ``experts.expert_ids`` (parallel/state/ownership.py addresses state by them)."""
    ids = [int(i) for i in ids]
    lo = ids[0] if ids else 0
    with torch.no_grad():
        for pname in ("w_gate_up", "w_down"):
            w = getattr(experts, pname)
            if ids == list(range(lo, lo + len(ids))):         # a contiguous range: a plain slice
                kept = w[lo:lo + len(ids)].clone()
            else:
                kept = w.index_select(0, torch.tensor(ids, device=w.device))
            setattr(experts, pname, nn.Parameter(kept))
    experts.num_experts = len(ids)
    experts.expert_ids = tuple(ids)


def keep_local_experts(experts: nn.Module, rank: int, ep: int) -> None:
    """Slice a RoutedExperts' stacked weights down to rank's n/ep experts (contiguous, in order)."""
    E = experts.num_experts
    if E % ep:
        raise ValueError(f"n_routed_experts={E} is not divisible by parallel.ep={ep}")
    El = E // ep
    keep_experts(experts, range(rank * El, (rank + 1) * El))


def shard_experts(model: nn.Module, ep_group: dist.ProcessGroup, ep: int, overlap: bool = True, chunks: int = 2,
                  link: EmulatedLink | None = None, fp8_dispatch: bool = False,
                  placement: Placement | Layer | None = None) -> list[AllToAllDispatcher]:
    """Keep only this rank's experts in every MoE layer (MTP included), tag them for DeepSpeed,
    and install the all-to-all dispatcher. Returns the dispatchers.

    ``placement`` (parallel/expert/placement.py): per MoE layer (``model.moe_layers()`` order), per EP rank,
    the global expert ids it holds, or one layer's lists for every layer; None: the even placement
    (n_routed_experts / ep contiguous experts per rank). Every rank must pass the same placement."""
    import torch.distributed as dist

    from parallel.expert.placement import check_placement, even_placement, is_even

    rank = dist.get_rank(ep_group)
    link = link or EmulatedLink()
    layers = model.moe_layers()
    E = model.config.n_routed_experts
    plan = (check_placement(placement, len(layers), E, ep) if placement is not None
            else [even_placement(E, ep) for _ in layers])
    dispatchers = []
    for moe, layer in zip(layers, plan):
        keep_experts(moe.experts, layer[rank])
        widest = max(len(ids) for ids in layer)
        for p in moe.experts.parameters():
            p.allreduce = False                       # DeepSpeed: not a data-parallel parameter
            p.group_name = expert_group_name(ep)      # reduced over this expert-data-parallel group
            p.ep_padded_numel = widest * p[0].numel()  # its size on the EP rank with the most experts
        moe.dispatcher = AllToAllDispatcher(ep_group, moe.n_experts, overlap=overlap, chunks=chunks, link=link,
                                            fp8_dispatch=fp8_dispatch, placement=layer)
        dispatchers.append(moe.dispatcher)
    if not all(is_even(layer, E) for layer in plan):
        align_zero_buckets()
    return dispatchers


def align_zero_buckets() -> None:
    """Make DeepSpeed's ZeRO-1/2 gradient buckets flush at the same points on every rank when EP
    ranks hold unequal numbers of experts (installed once, by ``shard_experts``).

    ZeRO-1/2 copies each gradient into a bucket as it becomes ready and reduces the bucket when the
    next gradient would overflow ``reduce_bucket_size``: dense gradients over all data-parallel
    ranks, expert gradients over their expert-data-parallel group. The flush points follow the
    gradients' sizes, so with unequal expert tensors two ranks would flush different sets of dense
    gradients, and their data-parallel collectives would no longer match (a hang, or a size
    error). Here the flush decision counts every expert gradient at its size on the widest EP rank
    (``ep_padded_numel``, set by shard_experts), the same on every rank; the real copy is smaller,
    so the bucket never overflows. Ranks whose expert tensor is below the bucket size also mirror
    the empty flush DeepSpeed makes before a tensor larger than the bucket. For an optimizer with
    no uneven expert tensor (even placements, ep=1) the original method runs unchanged."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if getattr(DeepSpeedZeroOptimizer, "_ep_aligned", False):
        return
    original = DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads

    def flush(opt: Any, dtype: torch.dtype) -> None:
        opt.reduce_ipg_grads(comm_dtype=dtype)
        if opt.contiguous_gradients and opt.overlap_comm:
            opt.ipg_buckets[dtype].index = 1 - opt.ipg_buckets[dtype].index

    def reduce_aligned(self: Any, param: torch.Tensor, i: int) -> None:
        uneven = self.__dict__.get("_ep_uneven")
        if uneven is None:
            uneven = self._ep_uneven = any(getattr(p, "ep_padded_numel", p.numel()) != p.numel()
                                           for g in self.bit16_groups for p in g)
            self._ep_virtual = {}
        if not uneven or param.numel() == 0:
            return original(self, param, i)
        dtype = self.get_param_comm_dtype(param)
        bucket = self.ipg_buckets[dtype]
        size = self.reduce_bucket_size
        padded = getattr(param, "ep_padded_numel", param.numel())
        virtual = self._ep_virtual.get(dtype, 0) if bucket.elements else 0
        if bucket.elements and virtual + padded > size:
            flush(self, dtype)
            virtual = 0
        if padded > size >= param.numel():
            flush(self, dtype)             # DeepSpeed flushes (an empty bucket) before a tensor > size
        original(self, param, i)
        self._ep_virtual[dtype] = virtual + padded

    DeepSpeedZeroOptimizer.reduce_independent_p_g_buckets_and_remove_grads = reduce_aligned
    DeepSpeedZeroOptimizer._ep_aligned = True


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def _marker_class() -> type[nn.Module]:
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

        def forward(self, *args: Any, **kwargs: Any) -> NoReturn:  # never called
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
    """The model's state dict with every MoE layer's experts gathered from all EP ranks, rows in
    global expert order whatever the placement (collective over each EP group: call it on every
    rank). At ep=1 it is just the state dict."""
    import torch.distributed as dist

    sd = {k: v.detach() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        disp = getattr(module, "dispatcher", None)
        if getattr(disp, "group", None) is None:
            continue
        widest = max(disp.n_per_rank)
        for pname in ("w_gate_up", "w_down"):
            key = f"{name}.experts.{pname}"
            local = sd[key].contiguous()
            padded = local.new_zeros((widest, *local.shape[1:]))
            padded[:local.shape[0]] = local
            parts = [torch.empty_like(padded) for _ in range(disp.ep)]
            dist.all_gather(parts, padded, group=disp.group)
            full = local.new_empty((disp.n_experts, *local.shape[1:]))
            for part, ids in zip(parts, disp.placement):
                full[torch.tensor(ids, device=full.device)] = part[:len(ids)]
            sd[key] = full                                                    # (E, ...) global order
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
            disp = module.dispatcher
            ids = disp.placement[dist.get_rank(disp.group)]
            value = value.index_select(0, torch.tensor(ids, device=value.device))
        sliced[key] = value
    missing, unexpected = model.load_state_dict(sliced, strict=False)
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
