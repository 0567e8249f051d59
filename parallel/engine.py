"""Process group, optimizer, LR schedule and ``deepspeed.initialize``.

The DeepSpeed config is the YAML ``deepspeed:`` section merged with the values the
``train:`` section already defines (micro batch, gradient accumulation, clipping, bf16);
giving one of those keys with another value in ``deepspeed:`` is an error naming the key.
The trainer owns the optimizer (``torch.optim.AdamW``, weight decay on matrices only; under
ZeRO-Offload, ``deepspeed.zero_optimization.offload_optimizer.device=cpu`` at stage 1/2,
DeepSpeedCPUAdam with the same groups and hyper-parameters) and
sets the learning rate itself before every optimizer step from ``lr_at(step)`` (model/schedules.py), so the
schedule depends only on the config (``train.max_steps``), never on where a run stopped.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from model.schedules import lr_at

if TYPE_CHECKING:
    import torch.distributed as dist
    from deepspeed import DeepSpeedEngine
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from configs.schema import Config
    from parallel.multisite.groups import SiteMPU

# Keys of the deepspeed section the trainer rejects: it builds these itself.
_OWNED = {"optimizer": "the trainer builds AdamW from train.lr/beta1/beta2/weight_decay",
          "scheduler": "the trainer sets the LR from train.lr_schedule/warmup_steps/max_steps",
          "fp16": "only fp32 and bf16 (train.dtype) are supported"}


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The dict handed to deepspeed.initialize; raises ValueError naming a conflicting key.

    A DeepSpeed user's habit: ``deepspeed.gradient_accumulation_steps`` or
    ``deepspeed.train_micro_batch_size_per_gpu`` given while ``train.grad_accum`` /
    ``train.micro_batch_size`` is still at its default is taken as that train value, and written
    back into ``cfg.train`` (the trainer's loop and the saved config read it there). A train value
    that was changed from its default and disagrees is a real conflict and stays an error. (The
    config does not record which keys were written, so an explicit train value equal to the
    default counts as not given.)"""
    import dataclasses

    ds = copy.deepcopy(cfg.deepspeed)
    t = cfg.train
    for key, why in _OWNED.items():
        if key in ds and not (key == "fp16" and not (ds[key] or {}).get("enabled", False)):
            raise ValueError(f"deepspeed.{key}: not supported here ({why}); remove it")
    defaults = {f.name: f.default for f in dataclasses.fields(t)}
    for key, name in (("gradient_accumulation_steps", "grad_accum"), ("train_micro_batch_size_per_gpu",
                                                                     "micro_batch_size")):
        if key in ds and getattr(t, name) == defaults[name] and ds[key] != defaults[name]:
            value = ds[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"deepspeed.{key}={value!r}: must be a positive integer")
            setattr(t, name, value)
    derived = {"train_micro_batch_size_per_gpu": t.micro_batch_size,
               "gradient_accumulation_steps": t.grad_accum,
               "gradient_clipping": t.grad_clip,
               "train_batch_size": t.micro_batch_size * t.grad_accum * world_size}
    source = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
              "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "train.grad_clip",
              "train_batch_size": f"train.micro_batch_size x train.grad_accum x world size {world_size}"}
    for key, value in derived.items():
        if key in ds and ds[key] != value:
            raise ValueError(f"deepspeed.{key}={ds[key]!r} conflicts with {source[key]} (= {value!r}); "
                             f"remove deepspeed.{key} or make them agree")
        ds[key] = value
    bf16 = t.dtype == "bf16"
    if "bf16" in ds and bool((ds["bf16"] or {}).get("enabled", False)) != bf16:
        raise ValueError(f"deepspeed.bf16.enabled={ds['bf16'].get('enabled')!r} conflicts with "
                         f"train.dtype={t.dtype!r}")
    ds["bf16"] = dict(ds.get("bf16") or {}, enabled=bf16)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2):
        raise ValueError(f"deepspeed.zero_optimization.stage={(zero or {}).get('stage')!r}: "
                         "supported stages are 0, 1 and 2")
    if cfg.parallel.pp > 1:   # the pipeline schedule's backward passes accumulate; engine.step() reduces and steps
        ds["managed_gradient_accumulation"] = False
    ds.setdefault("steps_per_print", 10**9)   # the trainer logs; keep DeepSpeed quiet
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def check_supported(cfg: Config, world_size: int) -> None:
    """Layout checks that need the world size, and features not built yet: fail loudly, early."""
    ep = cfg.parallel.ep
    if world_size % ep:
        raise ValueError(f"parallel.ep={ep}: the world size {world_size} is not divisible by it "
                         "(world = ep x expert-data-parallel)")
    check_offload(cfg.deepspeed)


def check_offload(ds: dict[str, Any]) -> None:
    """ZeRO-Offload of the optimizer: device cpu at ZeRO stage 1 or 2; the combinations DeepSpeed
    itself does not handle fail here, naming the upstream cause."""
    device = offload_device(ds)
    if device == "none":
        return
    key = "deepspeed.zero_optimization.offload_optimizer.device"
    if device != "cpu":
        raise ValueError(f"{key}={device!r}: only 'cpu' (or 'none') is supported. DeepSpeed swaps optimizer "
                         "state to NVMe only under ZeRO-3 (ZeRO-Infinity), which this trainer does not run; "
                         "ZeRO-1/2 would treat any device as cpu")
    zero = ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage == 0:
        raise ValueError(f"{key}='cpu' with deepspeed.zero_optimization.stage=0: DeepSpeed offloads only "
                         "the partition a ZeRO-1/2 optimizer owns; at stage 0 it ignores offload_optimizer "
                         "and steps the optimizer where the weights are (DeepSpeedCPUAdam then refuses GPU "
                         "tensors). Use stage 1 or 2")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (and stacked expert matrices), none on
    norms, biases and other vectors."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def skip_shm_allreduce_buffers() -> None:
    """Keep DeepSpeed from creating its CPU shared-memory all-reduce buffers.

    On CPU, DeepSpeed's torch backend builds a shared-memory op at init and gives every rank a
    ~69 MB file in /dev/shm (``deepspeed_allreduce_buffer_*``) that nothing ever removes, even on
    a clean exit. /dev/shm is RAM: a few hundred multi-process runs (a test suite) fill it and the
    OOM killer ends the job. That op serves only DeepSpeed's inference all-reduce, which training
    never calls (its collectives go through torch.distributed), so it is not built at all.
    Call before ``deepspeed.init_distributed``."""
    import importlib

    # importlib, not "import deepspeed.comm.torch as m": the package's attribute "torch" is torch itself
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Start the process group (nccl on CUDA, gloo on CPU) -> (rank, world_size, local_rank).

    Under a launcher the env vars are set; a plain ``python train.py`` gets a 1-process group.
    A collective that waits longer than ``timeout_s`` (a rank hung or dead) raises instead of
    blocking the job forever.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # no launcher: a 1-process group on this machine
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", _free_port())
    timeout = datetime.timedelta(seconds=timeout_s)
    # DeepSpeed (ZeRO, expert and data-parallel groups) and torch create sub-groups without a
    # timeout argument, which then falls back to torch's 30-minute default instead of the world's:
    # make that default ours, so a hung rank fails every collective after timeout_s, not just some
    import torch.distributed.distributed_c10d as c10d
    c10d.default_pg_timeout = timeout
    if isinstance(getattr(c10d, "default_pg_nccl_timeout", None), datetime.timedelta):
        c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        skip_shm_allreduce_buffers()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), timeout=timeout)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def cpu_threads_per_rank() -> None:
    """On CPU, split the cores between the ranks of this machine instead of oversubscribing."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def keep_freed_memory() -> bool:
    """Stop glibc's malloc from handing large freed blocks back to the OS. By default every
    activation above its mmap threshold is a fresh mmap, so each training step pays a page fault
    per 4 KiB of every large temporary (logits, attention scores, expert buffers): on a CPU that
    is a large share of the step (benchmarks/results/training_speed.md). The price: the process keeps its peak heap
    as resident memory. Returns False where it does not apply (not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3        # <malloc.h>
    ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1  # large blocks come from the heap, not mmap
    ok &= libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1  # and the heap top is never trimmed
    return bool(ok)


def build_engine(model: nn.Module, cfg: Config, world_size: int, mpu: SiteMPU | None = None) -> DeepSpeedEngine:
    """deepspeed.initialize with AdamW (DeepSpeedCPUAdam under ZeRO-Offload) -> engine; keeps the
    router state in fp32. ``world_size`` is the data-parallel size; ``mpu`` (parallel/multisite/groups.py) gives
    DeepSpeed a data-parallel group smaller than the world (one site)."""
    import deepspeed

    t = cfg.train
    groups = param_groups(model, t.weight_decay)
    if cfg.parallel.ep > 1:  # expert weights get their own groups, reduced over expert-data-parallel ranks
        from parallel.expert.sharding import split_moe_param_groups
        groups = split_moe_param_groups(groups)
    ds_config = deepspeed_config(cfg, world_size)
    plain = ds_config["zero_optimization"].get("stage", 0) == 0 and t.dtype == "fp32"
    adam = dict(lr=lr_at(0, t), betas=(t.beta1, t.beta2), eps=1e-8)
    if offload_device(ds_config) == "cpu":
        opt = cpu_adamw(groups, **adam)
    elif plain:
        # DeepSpeed's stage-0 fp32 clipping averages per-rank norms, which is not the global norm
        # once ranks hold different experts: FiniteAdamW clips with the true one instead.
        opt = FiniteAdamW(groups, max_grad_norm=ds_config["gradient_clipping"], **adam,
                          **adamw_impl(t.optimizer_impl),
                          group=None if mpu is None else mpu.get_data_parallel_group(),
                          pipe_group=getattr(mpu, "pipe_group", None))
        ds_config["gradient_clipping"] = 0.0
    else:
        opt = torch.optim.AdamW(groups, **adam, **adamw_impl(t.optimizer_impl))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=mpu)
    if hasattr(engine.optimizer, "check_grad_overflow"):
        # ZeRO in fp32 checks gradients only when clipping computes a norm: always check, so a
        # NaN/inf gradient on any rank skips the step on all (the flag is all-reduced with MAX)
        engine.optimizer.check_grad_overflow = True
        from parallel.overflow import one_overflow_read
        one_overflow_read(engine.optimizer)   # the global norm decides: one host read per step
    elif not plain and not hasattr(engine.optimizer, "overflow"):
        raise ValueError(f"deepspeed optimizer {type(engine.optimizer).__name__}: no non-finite-gradient "
                         "check known for it (supported: ZeRO 0/1/2 in fp32 or bf16)")
    from parallel.state.integrity import safe_checkpoint_engine
    safe_checkpoint_engine(engine)   # DeepSpeed's .pt files are read with weights_only=True
    # bf16 engines cast every buffer; the balancing bias and token counts must stay fp32.
    for moe in model.moe_layers():
        moe.gate.e_score_correction_bias = moe.gate.e_score_correction_bias.float()
        moe.tokens_per_expert = moe.tokens_per_expert.float()
    return engine


def offload_device(ds: dict[str, Any]) -> str:
    """deepspeed.zero_optimization.offload_optimizer.device of a deepspeed section: 'none' when unset."""
    zero = ds.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        return "none"
    if zero.get("cpu_offload"):              # DeepSpeed's deprecated spelling of offload_optimizer.device=cpu
        return "cpu"
    offload = zero.get("offload_optimizer") or {}
    return str(offload.get("device", "none") if isinstance(offload, dict) else offload).lower()


def cpu_adamw(groups: list[dict[str, Any]], **adam: Any) -> DeepSpeedCPUAdam:
    """DeepSpeedCPUAdam in AdamW mode with the same groups and hyper-parameters as the AdamW of the
    other modes. ZeRO-Offload keeps the fp32 masters and both moments in CPU memory and runs the
    update there; DeepSpeed refuses a client torch optimizer for that (unless
    ``zero_force_ds_cpu_optimizer: false``) and tests its offload path with this one. The C++ op is
    compiled on first use (~1-3 min, cached under ~/.cache/torch_extensions). Its state keys
    (exp_avg, exp_avg_sq, step) are torch's, except that ``step`` is a Python int, not a tensor."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, adamw_mode=True, **adam)


# torch.optim.AdamW keywords for each train.optimizer_impl
ADAMW_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def adamw_impl(name: str) -> dict[str, bool]:
    """torch.optim.AdamW keywords for train.optimizer_impl. torch's default on CPU is the loop, one
    tensor at a time (~10 elementwise passes per parameter); the fused kernel does the update in
    one pass and measured 5.7x faster on the tiny model's 8.2M parameters (27.7 -> 4.9 ms, 2 cores).
    DeepSpeed's ZeRO hands it flat fp32 partitions, which it takes as they are."""
    return ADAMW_IMPLS[name]


class FiniteAdamW(torch.optim.AdamW):
    """AdamW for ZeRO stage 0 in fp32 (DeepSpeed calls the client optimizer directly there):
    skips a step in which any rank has a NaN/inf gradient, on every rank alike, and clips with
    the true global gradient norm.

    Both need the world: expert gradients are reduced only within their expert-data-parallel
    group, so each rank sees its own experts' gradients. Non-expert gradients are identical on
    every rank (all-reduced), expert gradients identical within an expert-data-parallel group,
    so  |g|^2 = |g_dense|^2 + sum over ranks of |g_experts|^2 / edp_size.  DeepSpeed reads
    ``overflow`` to count the step as skipped and ``_global_grad_norm`` for the logged norm."""

    overflow = False
    _global_grad_norm = None

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], max_grad_norm: float = 0.0,
                 group: dist.ProcessGroup | None = None, pipe_group: dist.ProcessGroup | None = None,
                 **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.group = group                    # the data-parallel ranks (a site or a pipeline stage; None: the world)
        self.pipe_group = pipe_group          # parallel.pp: the other stages, whose parameters the norm also sums

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        import torch.distributed as dist
        from deepspeed.utils import groups as ds_groups

        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = params[0].device if params else "cpu"                 # nccl needs it on the GPU
        def sum_sq(ps: list[torch.Tensor]) -> torch.Tensor:            # one foreach kernel per list
            if not ps:
                return torch.zeros((), device=device)
            return torch.stack(torch._foreach_norm([p.grad for p in ps])).float().pow(2).sum()

        dense = [p for p in params if getattr(p, "allreduce", True) is not False]
        experts: dict[str, list] = {}                                   # EP-sharded weights by group
        for p in params:
            if getattr(p, "allreduce", True) is False:
                experts.setdefault(p.group_name, []).append(p)
        dense_sq = sum_sq(dense)
        # [ranks with a non-finite gradient, sum of expert squared norms / edp size]
        shared = torch.zeros(2, device=device)
        for name, ps in experts.items():
            shared[1] += sum_sq(ps) / ds_groups._get_expert_data_parallel_world_size(name)
        shared[0] = (~torch.isfinite(dense_sq + shared[1])).float()    # on the device: one read, below
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(shared, group=self.group)
        if self.pipe_group is not None:       # each stage's dense sum is the same on its ranks: add the stages'
            shared[1] += dense_sq
            dense_sq = torch.zeros_like(dense_sq)
            dist.all_reduce(shared, group=self.pipe_group)
        self.overflow = bool(shared[0].item() > 0)
        if self.overflow:
            self._global_grad_norm = None
            self.zero_grad(set_to_none=True)
            return None
        norm = (dense_sq + shared[1]).sqrt()
        self._global_grad_norm = norm                                   # a tensor: read when logged
        if self.max_grad_norm > 0:
            # max / (norm + 1e-6) in float64, as a Python float would be, then capped at 1 (x * 1 is x): no read
            coef = torch.full_like(norm, self.max_grad_norm, dtype=torch.float64) / (norm.double() + 1e-6)
            torch._foreach_mul_([p.grad for p in params], coef.clamp(max=1.0).float())
        return super().step(closure)


def set_lr(engine: DeepSpeedEngine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
