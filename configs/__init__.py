"""YAML presets and the typed schema they are validated into (see configs/schema.py)."""
from configs.schema import Config, load_config

__all__ = ["Config", "load_config"]
