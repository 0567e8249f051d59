"""bf16/fp16 grouped expert GEMMs on pre-Hopper cards through DeepSpeed 0.19.8's Triton grouped GEMM.

On sm80-sm89 (A100, A6000, RTX 30xx/40xx) ``torch._grouped_mm`` has no fused kernel: it runs one
matmul per expert after copying the offsets to the host. DeepSpeed, our engine, ships
``deepspeed/ops/triton_ops/group_gemm_triton.py``: one launch for all groups (forward, grad of the
input, grad of the weights), empty groups allowed, no host sync. This module only calls it.

Under TRITON_INTERPRET=1 (tests on CPU) DeepSpeed's module would not define its kernels (it asks the
CUDA driver whether Triton can run) and its ``triton.autotune`` would time configs on a GPU. So
``_interpreted_module`` loads a private copy with Triton marked available and the autotuner replaced
by its first config (the smallest tiles); the kernels themselves are DeepSpeed's, unchanged.
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import Any

import torch

MODULE = "deepspeed.ops.triton_ops.group_gemm_triton"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class _FirstConfig:
    """Stands in for triton.autotune's Autotuner: launches ``fn`` with the first config's meta-parameters."""

    def __init__(self, fn: Any, config: Any) -> None:
        self.fn, self.config = fn, config

    def __getitem__(self, grid: Any) -> Callable:
        def launch(*args: Any, **kwargs: Any) -> Any:
            meta = {**kwargs, **self.config.kwargs}
            return self.fn[grid(meta) if callable(grid) else grid](*args, **meta)
        return launch


@cache
def _interpreted_module() -> ModuleType:
    import triton
    from deepspeed.ops.triton_ops import _triton

    spec = importlib.util.find_spec(MODULE)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(f"{MODULE}_interpreted",
                                                                                       spec.origin))
    saved = _triton._TRITON_AVAILABLE, triton.autotune
    _triton._TRITON_AVAILABLE = True
    triton.autotune = lambda configs, key, **_: (lambda fn: _FirstConfig(fn, configs[0]))
    try:
        module.__spec__.loader.exec_module(module)
    finally:
        _triton._TRITON_AVAILABLE, triton.autotune = saved
    return module


def _module() -> ModuleType:
    if interpreting():
        return _interpreted_module()
    return importlib.import_module(MODULE)


def available(device: torch.device) -> str | None:
    """Why DeepSpeed's Triton grouped GEMM cannot run on ``device`` (None: it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and not interpreting():
        return f"a {device.type} tensor outside the Triton interpreter"
    return None


@torch.compiler.disable     # DeepSpeed's autotuned launcher stays outside compiled graphs (a graph break)
def ds_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (N, K) sorted by group, w (E, K, M) contiguous, counts (E,) -> (N, M); autograd through
    DeepSpeed's autograd.Function (dx and dw are grouped launches too)."""
    offs = counts.cumsum(0).to(torch.int32)                          # cumulative row ends, stays on the device
    return _module().group_gemm_triton(x.contiguous(), w.contiguous(), offs)
