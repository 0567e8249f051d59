"""Reading the sharded training state's files without a process group: the global index that
parallel/state/storage.py's ShardWriter writes (``index.json``: fqn -> dtype, full size, chunks with
offset, size, file), checks of the shard files' own headers against it, and reads of any element
range of one flattened tensor. A single-process export and ``train.init_from`` read weights this way.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

INDEX = "index.json"
# the shard files' own header keys, as torch.distributed.checkpoint's safetensors writer names them
# (parallel/state/storage.py writes through it and checks at import that the names still agree):
# plain strings here, so reading weights needs no torch.distributed
CUSTOM_METADATA_KEY = "DCP_SHARDING_INFO"
SAVED_OFFSETS_KEY = "saved_offsets"


def read_index(path: str | os.PathLike) -> dict[str, dict]:
    """The global index written by ShardWriter: fqn -> {dtype, size, chunks: [{offset, size, file}]}."""
    f = Path(path) / INDEX
    if not f.is_file():
        raise FileNotFoundError(f"sharded checkpoint {path}: {f} is missing")
    try:
        return json.loads(f.read_text(encoding="utf-8"))["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"sharded checkpoint {path}: {f} is unreadable: {e}") from e


def check_index(path: str | os.PathLike, index: dict[str, dict], found: dict[tuple[str, int], tuple[str, int]]) -> None:
    """``found``: (fqn, offset) -> (file, size) from the shard files' own headers. Raise a ValueError
    naming the path unless the files hold exactly the chunks of the index, each slice once, covering
    every tensor."""
    want = {}
    for fqn, md in index.items():
        chunks = sorted((c["offset"][0], c["size"][0], c["file"]) for c in md["chunks"])
        end = 0
        for off, size, file in chunks:
            if off < end:
                raise ValueError(f"sharded checkpoint {path}: two chunks claim elements {off}..{end} of {fqn} "
                                 f"({file} and another shard)")
            if off > end:
                raise ValueError(f"sharded checkpoint {path}: elements {end}..{off} of {fqn} are in no shard")
            end = off + size
            want[(fqn, off)] = (file, size)
        if end != md["size"][0]:
            raise ValueError(f"sharded checkpoint {path}: {fqn} has {end} of its {md['size'][0]} elements")
    for key, (file, size) in found.items():
        if key not in want:
            raise ValueError(f"sharded checkpoint {path}: {Path(path) / file} holds {key[0]}[{key[1]}:] which "
                             f"{INDEX} does not list (a stale or foreign shard)")
        if want[key] != (file, size):
            raise ValueError(f"sharded checkpoint {path}: {INDEX} puts {key[0]}[{key[1]}:] in {want[key][0]} "
                             f"({want[key][1]} elements), {file} holds {size}")
    missing = sorted(set(want) - set(found))
    if missing:
        fqn, off = missing[0]
        raise ValueError(f"sharded checkpoint {path}: {Path(path) / want[missing[0]][0]} should hold {fqn}[{off}:] "
                         "and does not (missing or replaced shard)")


def scan_shards(path: str | os.PathLike) -> dict[tuple[str, int], tuple[str, int]]:
    """(fqn, offset) -> (file name, elements) from every shard's safetensors header."""
    from safetensors import safe_open

    found: dict[tuple[str, int], tuple[str, int]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                sharding = json.loads((f.metadata() or {}).get(CUSTOM_METADATA_KEY, "{}"))
                for key in f.keys():
                    off = sharding.get(key, {}).get(SAVED_OFFSETS_KEY, [0])[0]
                    fqn = sharding.get(key, {}).get("fqn", key)
                    if (fqn, off) in found:
                        raise ValueError(f"sharded checkpoint {path}: {file} and {found[(fqn, off)][0]} both "
                                         f"hold {fqn}[{off}:]")
                    found[(fqn, off)] = (file.name, f.get_slice(key).get_shape()[0])
        except ValueError:
            raise
        except Exception as e:                          # safetensors' own error for a damaged header
            raise ValueError(f"sharded checkpoint {path}: {file} is not a readable safetensors file: {e}") from e
    return found


def check_shards(path: str | os.PathLike) -> dict[str, dict]:
    """Check the shard files of ``path`` against its index (ValueError naming the path); the index."""
    index = read_index(path)
    check_index(path, index, scan_shards(path))
    return index


def read_flat(path: str | os.PathLike, index: dict[str, dict], fqn: str, start: int = 0,
              stop: int | None = None) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor ``fqn``, read from the chunks that hold them
    (no process group needed: scripts read one tensor at a time this way)."""
    from safetensors import safe_open

    md = index[fqn]
    stop = md["size"][0] if stop is None else stop
    out = torch.empty(stop - start, dtype=getattr(torch, md["dtype"]))
    for c in md["chunks"]:
        off, size = c["offset"][0], c["size"][0]
        lo, hi = max(start, off), min(stop, off + size)
        if lo < hi:
            with safe_open(str(Path(path) / c["file"]), framework="pt") as f:
                out[lo - start:hi - start] = f.get_slice(c.get("key", fqn))[lo - off:hi - off]
    return out
