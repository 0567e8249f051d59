"""Resume a checkpoint on another layout (world size or ``parallel.ep``).

DeepSpeed's engine files are layout-specific: ZeRO partitions the optimizer state by
data-parallel rank, and under expert parallelism every rank holds other experts. So each
save also writes a layout-free copy of what the optimizer needs:

    optimizer.safetensors   for every trainable parameter, by its full model name (the naming
                            of model.safetensors, experts gathered over EP into the stacked
                            (E, ...) tensor): ``<name>.exp_avg`` and ``<name>.exp_avg_sq`` (fp32),
                            ``<name>.fp32`` (the fp32 master) only where the module weight is not
                            fp32 (bf16 runs); AdamW's step count in the metadata.

The fp32 master of an fp32 run is model.safetensors itself. On a resume whose layout differs
from the saved one, ``load_resharded`` replaces ``engine.load_checkpoint``: every rank loads
the full weights and states and keeps its own slice (its experts; ZeRO keeps its partition).
Building the file is a collective (ZeRO's full-state helpers all-reduce over each parameter's
data-parallel group, experts are all-gathered over the EP group): every rank iterates the
parameters in the same order. Router biases and RNG are restored by ``checkpoint.load``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, safe_open, save_file

OPTIMIZER = "optimizer.safetensors"
STATE_KEYS = ("exp_avg", "exp_avg_sq")   # torch.optim.AdamW (amsgrad off), as parallel.engine builds it
_EXPERT_WEIGHTS = ("w_gate_up", "w_down")


# ---------------------------------------------------------------- layouts

def saved_layout(state: dict) -> tuple[int, int]:
    """(world size, parallel.ep) a checkpoint was saved with, from its trainer_state.json."""
    return int(state.get("world_size", 1)), int(state.get("config", {}).get("parallel", {}).get("ep", 1))


def current_layout(engine) -> tuple[int, int]:
    """(world size, parallel.ep) of this run, read off the engine's model."""
    eps = [m.dispatcher.ep for m in engine.module.modules()
           if getattr(getattr(m, "dispatcher", None), "group", None) is not None]
    return dist.get_world_size(), max(eps, default=1)


def check_global_batch(engine, state: dict, path: Path) -> None:
    """ValueError naming the fields when this run's global batch differs from the checkpoint's:
    the sampler's data order (and the step's gradient) depend on it, not on the layout."""
    saved = state.get("sampler", {}).get("global_batch_size")
    now = engine.train_batch_size()            # micro_batch_size x grad_accum x world size
    if saved is None or int(saved) == now:
        return
    t = state.get("config", {}).get("train", {})
    world, _ = saved_layout(state)
    raise ValueError(
        f"checkpoint {path} was trained with a global batch of {saved} rows (train.micro_batch_size="
        f"{t.get('micro_batch_size')} x train.grad_accum={t.get('grad_accum')} x {world} processes); this run "
        f"has {now} (train.micro_batch_size={engine.train_micro_batch_size_per_gpu()} x train.grad_accum="
        f"{engine.gradient_accumulation_steps()} x {dist.get_world_size()} processes): choose "
        f"train.micro_batch_size and train.grad_accum so that their product times the number of processes "
        f"is {saved}")


def layout_changed(engine, state: dict) -> bool:
    return saved_layout(state) != current_layout(engine)


# ---------------------------------------------------------------- parameter access

def _expert_groups(model: torch.nn.Module) -> dict[str, object]:
    """Full parameter name -> EP process group, for the expert weights sharded over EP."""
    groups = {}
    for name, module in model.named_modules():
        disp = getattr(module, "dispatcher", None)
        if getattr(disp, "group", None) is not None:
            for pname in _EXPERT_WEIGHTS:
                groups[f"{name}.experts.{pname}"] = disp.group
    return groups


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _flat_slices(engine) -> dict[int, tuple[torch.Tensor, int]]:
    """id(param) -> (fp32 master tensor, offset) for DeepSpeed's FP16 optimizers, which bf16
    without ZeRO uses: the fused one keeps one unpadded flat fp32 copy per parameter group (in
    the group's parameter order), the unfused one an fp32 copy per parameter; AdamW's state is
    keyed by those copies. Empty for every other optimizer."""
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


def _flat_view(engine, p: torch.Tensor, key: str | None, flats) -> torch.Tensor | None:
    master, offset = flats[id(p)]
    src = master if key is None else engine.basic_optimizer.state.get(master, {}).get(key)
    return None if src is None else src.view(-1).narrow(0, offset, p.numel()).view(p.shape)


def _get(engine, p: torch.Tensor, key: str | None, flats) -> torch.Tensor | None:
    """This rank's full (unpartitioned) fp32 master (key None) or optimizer state of p.
    Under ZeRO-1/2 or DeepSpeed's bf16 optimizer: an all-reduce over p's data-parallel group."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hasattr(p, "_hp_mapping"):
        return safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
    if id(p) in flats:
        return _flat_view(engine, p, key, flats)
    if key is None:                               # no separate master copy: the weight itself
        return p.detach()
    return engine.basic_optimizer.state.get(p, {}).get(key)


def _set(engine, p: torch.Tensor, value: torch.Tensor, key: str | None, flats) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(device=p.device, dtype=torch.float32).contiguous()
    if hasattr(p, "_hp_mapping"):                 # writes only this rank's partition of it
        if key is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, key)
    elif id(p) in flats:
        _flat_view(engine, p, key, flats).copy_(value)
    elif key is not None:
        engine.basic_optimizer.state[p][key].copy_(value.to(p.dtype))


def _gather_experts(local: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)                       # (E, ...) in global expert order


def _optimizer_step(engine) -> int:
    steps = [int(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s]
    return max(steps, default=0)


_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _engine_counters(engine) -> dict[str, int]:
    return {k: int(getattr(engine, k)) for k in _COUNTERS if hasattr(engine, k)}


# ---------------------------------------------------------------- save

def _link_states(engine) -> bool:
    """Point DeepSpeed's per-parameter views at AdamW's current state tensors (DeepSpeed links them
    only after an applied optimizer step; a load or a skipped step can leave them stale or unset).
    False when AdamW has no state yet (no step applied): the moments are then zero."""
    if not any("step" in s for s in engine.basic_optimizer.state.values()):
        return False
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    return True


def save_optimizer_state(engine, path: Path) -> None:
    """Collective: write ``path/optimizer.safetensors`` (rank 0 writes; every rank takes part)."""
    rank = dist.get_rank()
    experts = _expert_groups(engine.module)
    has_state = _link_states(engine)              # the same on every rank: steps are skipped on all alike
    flats = _flat_slices(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trainable(engine):
        keys = STATE_KEYS if p.dtype == torch.float32 else (None, *STATE_KEYS)
        for key in keys:
            # same parameter order on every rank: the collectives inside line up
            value = _get(engine, p, key, flats) if has_state or key is None else torch.zeros(p.shape, device=p.device)
            if value is None:
                raise ValueError(f"optimizer state {key!r} of parameter {name} not found")
            if name in experts:
                value = _gather_experts(value.float(), experts[name])
            if rank == 0:
                tensors[f"{name}.{key or 'fp32'}"] = value.detach().float().cpu().contiguous()
    step = _optimizer_step(engine)
    if rank == 0:
        world, ep = current_layout(engine)
        tmp = path / f".{OPTIMIZER}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt", "step": str(step),
                                               "engine_counters": json.dumps(_engine_counters(engine)),
                                               "saved_layout": json.dumps({"world_size": world, "ep": ep})})
        os.replace(tmp, path / OPTIMIZER)


# ---------------------------------------------------------------- load

def _init_optimizer_state(engine, step: int) -> None:
    """Give every fp32 tensor the (ZeRO-flattened) AdamW works on a state with ``step`` and zero
    moments, and point DeepSpeed's per-parameter views at it (it links them after the first
    optimizer step otherwise)."""
    opt = engine.basic_optimizer
    for group in opt.param_groups:
        on_device = group.get("capturable") or group.get("fused")
        for q in group["params"]:
            st = opt.state[q]
            st["step"] = torch.tensor(float(step), device=q.device if on_device else "cpu")
            for key in STATE_KEYS:
                if key not in st:
                    st[key] = torch.zeros_like(q, memory_format=torch.preserve_format)
    _link_states(engine)


def _slice(value: torch.Tensor, local: torch.Tensor, name: str, experts: dict[str, object]) -> torch.Tensor:
    if value.shape == local.shape:
        return value
    if name not in experts or value.shape[1:] != local.shape[1:] or value.shape[0] % local.shape[0]:
        raise ValueError(f"{name}: saved shape {tuple(value.shape)} does not fit this run's {tuple(local.shape)}")
    n = local.shape[0]
    r = dist.get_rank(experts[name])
    return value[r * n:(r + 1) * n]


def load_resharded(engine, path: Path) -> int:
    """Collective: load the model weights, fp32 masters and AdamW states of checkpoint ``path``
    (saved on any layout) into this engine, each rank keeping its slice. Returns the AdamW step."""
    from parallel.checkpoint import MODEL
    from parallel.expert_parallel import load_full_state_dict

    files = [path / MODEL, path / OPTIMIZER]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint {path} was saved on another layout (world size / parallel.ep) and has no "
                         f"{' or '.join(missing)} to reshard from (saved by an older version?): resume it with "
                         "the world size and parallel.ep it was saved with")
    raw = load_file(str(files[0]))
    own = engine.module.state_dict()
    with torch.no_grad():                                   # the module (maybe low-precision) weights
        load_full_state_dict(engine.module, {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v
                                             for k, v in raw.items()})
    states = load_file(str(files[1]))
    with safe_open(str(files[1]), framework="pt") as f:
        meta = f.metadata()
    step = int(meta["step"])
    _init_optimizer_state(engine, step)
    experts = _expert_groups(engine.module)
    flats = _flat_slices(engine)
    with torch.no_grad():
        for name, p in _trainable(engine):
            master = states.get(f"{name}.fp32", raw[name])  # bf16 runs store it; fp32: the weight file
            _set(engine, p, _slice(master, p, name, experts), None, flats)
            for key in STATE_KEYS:
                full = states.get(f"{name}.{key}")
                if full is None:
                    raise ValueError(f"checkpoint {path}: {OPTIMIZER} has no {name}.{key}")
                _set(engine, p, _slice(full, p, name, experts), key, flats)
    for key, value in json.loads(meta.get("engine_counters", "{}")).items():
        setattr(engine, key, int(value))                    # DeepSpeed's own counters, as its loader sets them
    return step
