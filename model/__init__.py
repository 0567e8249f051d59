"""Single-device DeepSeek-V3 model code (no torch.distributed in this package)."""
from model.config import ModelConfig
from model.transformer import DeepseekV3, ModelOutput

__all__ = ["ModelConfig", "DeepseekV3", "ModelOutput"]
