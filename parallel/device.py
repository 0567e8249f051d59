"""The CUDA settings a training process starts with (train.py's ``start_processes``); on a CPU none applies.

- The caching allocator gets expandable segments (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``)
  unless the user configured it: dropless routing gives the expert buffers a different size every
  step, and fixed-size segments fragment under that until an allocation fails with memory free.
  The variable is read when the allocator starts, so it is set before anything touches CUDA.
- ``train.tf32`` (default true): fp32 matmuls on CUDA use TF32 tensor cores (10-bit mantissa
  products, fp32 accumulation); the bf16 model's fp32 parts (router, loss, norms' statistics) are
  where it matters.
- Batches reach the GPU from pinned host memory without blocking the host (``batch_to_device``).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")   # torch reads either (the second since 2.9)
EXPANDABLE = "expandable_segments:True"


def allocator_env(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Set expandable segments unless ``environ`` already configures the allocator.
    -> the setting the run uses ({name}={value}), or None when neither variable is set."""
    for name in ALLOC_VARS:
        if name in environ:
            return f"{name}={environ[name]}"
    environ[ALLOC_VARS[0]] = EXPANDABLE
    return f"{ALLOC_VARS[0]}={EXPANDABLE}"


def apply_tf32(enabled: bool, device: torch.device) -> bool:
    """TF32 for fp32 matmuls (and cuDNN convolutions) on a CUDA device; nothing elsewhere.
    -> whether TF32 is now on."""
    if device.type != "cuda":
        return False
    precision = "tf32" if enabled else "ieee"
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):          # torch >= 2.9
        matmul.fp32_precision = precision
        cudnn.conv.fp32_precision = precision
    else:
        matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    return enabled


def batch_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on ``device``. To a GPU: copied into pinned memory, then sent without making the
    host wait for the copy (the GPU's queue orders it before the kernels that read it)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
