"""Each rank's random generators in its checkpoint: ``rng_rank{r}.safetensors`` holds torch's (and CUDA's)
generator state as tensors and Python's and NumPy's as JSON metadata, so a resume draws the same numbers."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, safe_open


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    meta = {"python": json.dumps([py[0], list(py[1]), py[2]]), "numpy": json.dumps(np_state)}
    return tensors, meta


def set_rng_state(path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    v, state, gauss = json.loads(meta["python"])
    random.setstate((v, tuple(state), gauss))
    np_state = json.loads(meta["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
