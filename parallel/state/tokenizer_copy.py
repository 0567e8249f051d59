"""The run's tokenizer copied into each checkpoint (``tokenizer/``), so an export ships the tokenizer the
weights were trained with."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

_TOKENIZER_SKIP = {"train_key.json"}


def tokenizer_source(config: dict[str, Any]) -> Path | None:
    """Where the run's tokenizer lives: data.tokenizer, else the BPE trained into data.cache_dir."""
    data = config.get("data", {})
    if data.get("tokenizer"):
        return Path(data["tokenizer"]).expanduser()
    if data.get("cache_dir"):
        return Path(data["cache_dir"]).expanduser() / "tokenizer"
    return None


def copy_tokenizer(config: dict[str, Any], dest: Path) -> bool:
    """Copy the run's tokenizer files into dest (the export ships them); False if none is found."""
    src = tokenizer_source(config)
    if src is None or not src.is_dir():
        return False
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in _TOKENIZER_SKIP and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
    return True
