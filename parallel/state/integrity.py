"""A DeepSpeed checkpoint engine that refuses pickled code.

DeepSpeed writes its engine and optimizer state with ``torch.save``; its stock loader reads
them back with ``weights_only=False``, which would run any code a tampered file carries.
``SafeTorchCheckpointEngine`` loads with ``weights_only=True`` and allows only the few
DeepSpeed classes those files legitimately contain. (The SHA-256 manifest of every checkpoint
is model/hf/manifest.py.)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from torch.serialization import MAP_LOCATION


def _allowed_globals() -> list:
    """The non-tensor classes DeepSpeed's own checkpoint files hold (ZeRO-1/2 included)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str, map_location: MAP_LOCATION = None) -> Any:
    with torch.serialization.safe_globals(_allowed_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # UnpicklingError for a disallowed global, or a damaged file
            raise ValueError(f"checkpoint file {path} refused: it is not a plain weights file "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def safe_checkpoint_engine(engine: DeepSpeedEngine) -> None:
    """Make ``engine`` read its checkpoint files with ``weights_only=True`` (call after initialize;
    DeepSpeed creates its checkpoint engine once, in initialize)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"deepspeed checkpoint engine {type(current).__name__} is not supported: only the "
                         "default torch engine is known to be made safe against pickled code")
    current.load = _safe_load   # the instance's load shadows the class method that unpickles anything
    # DeepSpeed also copies its zero_to_fp32.py / zero_to_torch.py beside every save; they read
    # checkpoints with weights_only=False. Ours carry model.safetensors and optimizer.safetensors
    # instead, so those scripts are not shipped.
    engine._copy_recovery_script = lambda save_path: None
