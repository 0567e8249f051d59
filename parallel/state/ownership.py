"""Which slice of which parameter this rank owns: the layout-free address of training state.

Every trainable parameter is addressed by its full name (the single-device model's
``state_dict`` key; routed experts stacked over all E experts in global order) and a range of
its flattened elements. A rank's *owned slice* of a parameter is the part of its fp32 master and
AdamW moments that this rank's optimizer updates:

- ZeRO-1/2 (and DeepSpeed's bf16 optimizer): the slice of the parameter that falls into this
  rank's partition of the flat fp32 buffer (``param._hp_mapping``); possibly none.
- ZeRO-0: the whole parameter, replicated over the data-parallel ranks (fp32: the weight is its
  own master; bf16: DeepSpeed's FP16 optimizer keeps flat fp32 copies outside the module).
- Experts under ``parallel.ep``: the same, offset by where this rank's experts sit in the stacked
  (E, ...) tensor; a rank whose experts are not consecutive ids gets one owned slice per run.

Replicated owned slices (ZeRO-0, or experts replicated over expert-data-parallel ranks) are found
on several ranks at the same address; the checkpoint writer keeps one copy. Sharded checkpoints
(parallel/state/checkpoint.py) and the cross-site outer step both work on these owned slices, so neither
needs to know how DeepSpeed lays out its buffers.

Shape legend: E experts in the model, El experts on this rank, N = numel of one parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

STATE_KEYS = ("exp_avg", "exp_avg_sq")   # torch.optim.AdamW (amsgrad off), as parallel.engine builds it
_EXPERT_WEIGHTS = ("w_gate_up", "w_down")


@dataclass
class OwnedSlice:
    """This rank's part of one parameter: ``numel`` elements from ``offset`` of the flattened full
    tensor ``shape``. ``master`` and ``states[key]`` are 1-D fp32 views into the optimizer's own
    buffers (writing them writes the optimizer state)."""
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    param: nn.Parameter
    local_start: int                     # where the owned slice starts in the flattened local parameter
    master: torch.Tensor
    states: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def full_numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ExpertLayout:
    """Where the experts of one stacked expert parameter live: this rank's global expert ids."""
    num_experts: int                     # E
    expert_ids: tuple[int, ...]          # global ids of this rank's El local experts, in local order


def expert_layouts(model: nn.Module) -> dict[str, ExpertLayout]:
    """Full parameter name -> ExpertLayout, for the expert weights sharded over EP."""
    import torch.distributed as dist

    out = {}
    for name, module in model.named_modules():
        disp = getattr(module, "dispatcher", None)
        if getattr(disp, "group", None) is None:
            continue
        El = module.experts.num_experts
        ids = getattr(module.experts, "expert_ids", None)
        if ids is None:                                   # contiguous, in rank order (the even placement)
            r = dist.get_rank(disp.group)
            ids = range(r * El, (r + 1) * El)
        for pname in _EXPERT_WEIGHTS:
            out[f"{name}.experts.{pname}"] = ExpertLayout(module.n_experts, tuple(int(i) for i in ids))
    return out


def model_placement(model: nn.Module) -> list[list[list[int]]] | None:
    """The expert placement a sharded model runs under: per MoE layer, per EP rank, the global
    expert ids it holds (parallel/expert/placement.py; plain JSON). None when no MoE layer is sharded."""
    out = []
    for module in model.modules():
        placement = getattr(getattr(module, "dispatcher", None), "placement", None)
        if placement is not None:
            out.append([list(ids) for ids in placement])
    return out or None


def expert_runs(ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Consecutive runs of global ids -> [(local index, global id, length)]."""
    runs: list[list[int]] = []
    for j, e in enumerate(ids):
        if runs and e == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([j, e, 1])
    return [tuple(r) for r in runs]


def _to_global(name: str, p: torch.Tensor, start: int, numel: int,
               layouts: dict[str, ExpertLayout]) -> list[tuple[tuple[int, ...], int, int, int]]:
    """A local flat range [start, start + numel) of parameter ``p`` -> [(full shape, global offset,
    local start, numel)], split where this rank's expert ids are not consecutive."""
    lay = layouts.get(name)
    if lay is None:
        return [(tuple(p.shape), start, start, numel)]
    per = p[0].numel()                                    # elements of one expert
    shape = (lay.num_experts, *p.shape[1:])
    out = []
    for j, e, n in expert_runs(lay.expert_ids):
        lo, hi = max(start, j * per), min(start + numel, (j + n) * per)
        if lo < hi:
            out.append((shape, e * per + (lo - j * per), lo, hi - lo))
    return out


def _fp16_optimizer_masters(engine: DeepSpeedEngine) -> dict[int, tuple[torch.Tensor, int]]:
    """id(param) -> (fp32 master tensor, offset) for DeepSpeed's FP16 optimizers, which bf16
    without ZeRO uses: the fused one keeps one unpadded flat fp32 copy per parameter group (in
    the group's parameter order), the unfused one an fp32 copy per parameter."""
    opt = engine.optimizer
    out = {}
    for params, flat in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups_flat", ())):
        offset = 0
        for q in params:
            out[id(q)] = (flat, offset)
            offset += q.numel()
    for params, copies in zip(getattr(opt, "fp16_groups", ()), getattr(opt, "fp32_groups", ())):
        for q, q32 in zip(params, copies):
            out[id(q)] = (q32, 0)
    return out


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def has_optimizer_state(engine: DeepSpeedEngine) -> bool:
    return any("step" in s for s in engine.basic_optimizer.state.values())


def link_optimizer_state(engine: DeepSpeedEngine) -> None:
    """Point DeepSpeed's per-parameter views at AdamW's current state tensors (DeepSpeed links them
    only after an applied optimizer step; a load or a skipped step can leave them stale or unset)."""
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def ensure_optimizer_state(engine: DeepSpeedEngine, step: int = 0) -> None:
    """Give every tensor AdamW works on a state (zero moments, ``step``) if it has none yet, so the
    owned slices have moment views to save into or load into before the first optimizer step."""
    opt = engine.basic_optimizer
    for group in opt.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for q in group["params"]:
            st = opt.state[q]
            if "step" not in st:
                st["step"] = torch.tensor(float(step), device=q.device if on_device else "cpu")
            for key in STATE_KEYS:
                if key not in st:
                    st[key] = torch.zeros_like(q, memory_format=torch.preserve_format)
    link_optimizer_state(engine)


def set_optimizer_step(engine: DeepSpeedEngine, step: int) -> None:
    for st in engine.basic_optimizer.state.values():
        if isinstance(st.get("step"), torch.Tensor):
            st["step"].fill_(float(step))
        elif "step" in st:                     # DeepSpeedCPUAdam (offload) keeps a Python int once it stepped
            st["step"] = int(step)


def optimizer_step(engine: DeepSpeedEngine) -> int:
    steps = [int(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s]
    return max(steps, default=0)


def owned_slices(engine: DeepSpeedEngine, with_states: bool = True) -> list[OwnedSlice]:
    """This rank's fragments of every trainable parameter, in parameter order. ``with_states``
    needs the optimizer state to exist (``ensure_optimizer_state``)."""
    layouts = expert_layouts(engine.module)
    masters = _fp16_optimizer_masters(engine)
    state = engine.basic_optimizer.state
    out = []
    for name, p in trainable(engine.module):
        if hasattr(p, "_hp_mapping"):                        # ZeRO-1/2, DeepSpeed's bf16 optimizer
            hp = p._hp_mapping
            if hp is None:                                   # no part of it in this rank's partition
                continue
            start, numel = hp.lp_fragment_address.start, hp.lp_fragment_address.numel
            master = hp.get_hp_fragment()
            states = {k: hp.get_hp_fragment(k) for k in STATE_KEYS} if with_states else {}
        elif id(p) in masters:                               # bf16 at ZeRO-0
            flat, off = masters[id(p)]
            start, numel = 0, p.numel()
            master = flat.view(-1).narrow(0, off, numel)
            states = ({k: state[flat][k].view(-1).narrow(0, off, numel) for k in STATE_KEYS}
                      if with_states else {})
        else:                                                # fp32 at ZeRO-0: the weight is the master
            start, numel = 0, p.numel()
            master = p.detach().view(-1)
            states = {k: state[p][k].view(-1) for k in STATE_KEYS} if with_states else {}
        for shape, offset, local_start, n in _to_global(name, p, start, numel, layouts):
            cut = local_start - start
            out.append(OwnedSlice(name, shape, offset, n, p, local_start, master.narrow(0, cut, n),
                                {k: v.narrow(0, cut, n) for k, v in states.items()}))
    return out


@torch.no_grad()
def update_module_weights(engine: DeepSpeedEngine) -> None:
    """After the fp32 masters were written: make the module's (possibly bf16, possibly only
    partly owned) weights equal to them on every rank, as the optimizer step does."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):                     # ZeRO-1/2, bf16 optimizer: cast + all-gather
        opt.update_lp_params()
        return
    by_id = {id(p): p for _, p in trainable(engine.module)}
    for q_id, (flat, off) in _fp16_optimizer_masters(engine).items():
        if (p := by_id.get(q_id)) is not None:
            p.data.copy_(flat.view(-1).narrow(0, off, p.numel()).view(p.shape))
    # fp32 at ZeRO-0: the masters are the weights already
