"""The one check every file name read from an index goes through: a Hugging Face
``model.safetensors.index.json``, a checkpoint's ``state/index.json`` and its manifest, the token
shards' ``meta.json``. Resume, export, import and ``train.init_from`` all call ``inside``.

A name from an index is data, not a path to follow: it must be relative, without ``..`` or empty
parts (a plain file name where ``plain``), and once symlinks are resolved it must still lie inside the
directory. One exception keeps the Hugging Face cache usable: a snapshot directory
(``models--ORG--NAME/snapshots/REV``) holds symlinks to ``../../blobs/SHA``, so inside such a snapshot
the repository folder (``models--ORG--NAME``) is the boundary. Plain ``os.path`` only: model/ stays free
of torch.distributed, and the data code can import it too.
"""
from __future__ import annotations

import os
from pathlib import Path


def boundary(root: str | os.PathLike) -> Path:
    """The directory that files named inside ``root`` must resolve into (see the module docstring)."""
    real = Path(root).resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")) \
            and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def inside(root: str | os.PathLike, name: object, where: str, plain: bool = False) -> Path:
    """``root / name``, after checking that ``name`` (read from ``where``, e.g. an index file) stays
    inside ``root``: ValueError naming ``where`` and the name otherwise. ``plain``: a file name with no
    directory part at all (the weight and shard indexes list only such names)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"{where}: file name {name!r} is not a plain file name")
    parts = name.replace("\\", "/").split("/")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or any(p in ("", ".", "..") for p in parts) \
            or (plain and len(parts) > 1):
        what = "a plain file name" if plain else "a relative path inside the directory"
        raise ValueError(f"{where}: file name {name!r} is not {what} (no absolute paths, '..' or "
                         f"{'directories' if plain else 'empty parts'}): refused")
    path = Path(root) / name
    real, fence = path.resolve(), boundary(root)
    if real != fence and fence not in real.parents:
        raise ValueError(f"{where}: {path} is a symlink to {real}, outside {fence}: refused")
    return path


def listed_files(root: str | os.PathLike, suffix: str, where: str) -> list[str]:
    """The names of the files ending in ``suffix`` directly in ``root`` (sorted), each through ``inside``
    (a symlink out of the directory is refused like a name in an index)."""
    names = sorted(p.name for p in Path(root).iterdir() if p.name.endswith(suffix))
    for name in names:
        inside(root, name, where, plain=True)
    return names
