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

from model.hf.safe_header import DTYPES, Header, read_header
from model.hf.safe_paths import inside, listed_files

INDEX = "index.json"
DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in DTYPES.values()}   # index.json's dtype strings
# the shard files' own header keys, as torch.distributed.checkpoint's safetensors writer names them
# (parallel/state/storage.py writes through it and checks at import that the names still agree):
# plain strings here, so reading weights needs no torch.distributed
CUSTOM_METADATA_KEY = "DCP_SHARDING_INFO"
SAVED_OFFSETS_KEY = "saved_offsets"


def read_index(path: str | os.PathLike) -> dict[str, dict]:
    """The global index written by ShardWriter: fqn -> {dtype, size, chunks: [{offset, size, file[, key]}]},
    checked for form: a known dtype, 1-D sizes and offsets of non-negative integers, and every file a
    plain name inside ``path`` (safe_paths.inside: the one check resume, export and init_from share)."""
    f = Path(path) / INDEX
    if not f.is_file():
        raise FileNotFoundError(f"sharded checkpoint {path}: {f} is missing")
    try:
        index = json.loads(f.read_text(encoding="utf-8"))["tensors"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"sharded checkpoint {path}: {f} is unreadable: {e}") from e
    if not isinstance(index, dict):
        raise ValueError(f"sharded checkpoint {path}: {f}: 'tensors' is not a JSON object")
    for fqn, md in index.items():
        _check_entry(path, f, fqn, md)
    return index


def _count(v: object) -> bool:
    return isinstance(v, list) and len(v) == 1 and isinstance(v[0], int) and not isinstance(v[0], bool) and v[0] >= 0


def _check_entry(path: str | os.PathLike, f: Path, fqn: str, md: object) -> None:
    at = f"sharded checkpoint {path}: {f}: {fqn}"
    if not isinstance(md, dict) or md.get("dtype") not in DTYPE_NAMES or not _count(md.get("size")) \
            or not isinstance(md.get("chunks"), list):
        raise ValueError(f"{at}: expected {{dtype: one of {sorted(DTYPE_NAMES)}, size: [n], chunks: [...]}}, "
                         f"got {str(md)[:200]}")
    for c in md["chunks"]:
        if not isinstance(c, dict) or not _count(c.get("offset")) or not _count(c.get("size")) \
                or not isinstance(c.get("key", fqn), str):
            raise ValueError(f"{at}: chunk {str(c)[:200]} is not {{offset: [n], size: [n], file, key}}")
        inside(path, c.get("file"), str(f), plain=True)


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


def shard_headers(path: str | os.PathLike) -> dict[str, Header]:
    """file name -> checked safetensors header, for every shard file in ``path`` (symlinks out refused)."""
    out = {}
    for name in listed_files(path, ".safetensors", f"sharded checkpoint {path}"):
        file = Path(path) / name
        try:
            out[name] = read_header(file)
        except ValueError as e:
            raise ValueError(f"sharded checkpoint {path}: {file} is not a readable safetensors file: "
                             f"{str(e).removeprefix(f'{file}: ')}") from None
    return out


def scan_shards(path: str | os.PathLike,
                headers: dict[str, Header] | None = None) -> dict[tuple[str, int], tuple[str, int]]:
    """(fqn, offset) -> (file name, elements) from every shard's safetensors header."""
    found: dict[tuple[str, int], tuple[str, int]] = {}
    for name, header in (shard_headers(path) if headers is None else headers).items():
        file = Path(path) / name
        try:
            sharding = json.loads(header.metadata.get(CUSTOM_METADATA_KEY, "{}"))
            for key, t in header.tensors.items():
                off = sharding.get(key, {}).get(SAVED_OFFSETS_KEY, [0])[0]
                fqn = sharding.get(key, {}).get("fqn", key)
                if (fqn, off) in found:
                    raise ValueError(f"sharded checkpoint {path}: {file} and {found[(fqn, off)][0]} both "
                                     f"hold {fqn}[{off}:]")
                if len(t.shape) != 1:
                    raise ValueError(f"sharded checkpoint {path}: {file}: {key} has shape {t.shape}, not a 1-D slice")
                found[(fqn, off)] = (name, t.shape[0])
        except (AttributeError, TypeError, IndexError, KeyError, ValueError) as e:
            if isinstance(e, ValueError) and str(e).startswith("sharded checkpoint"):
                raise
            raise ValueError(f"sharded checkpoint {path}: {file}: malformed {CUSTOM_METADATA_KEY} metadata: "
                             f"{e}") from None
    return found


def check_shards(path: str | os.PathLike) -> dict[str, dict]:
    """Check the shard files of ``path`` against its index (ValueError naming the path): every
    element of every tensor in exactly one chunk, each chunk in the file the index names, under the
    name and with the dtype it gives. Returns the index."""
    index = read_index(path)
    headers = shard_headers(path)
    check_index(path, index, scan_shards(path, headers))
    for fqn, md in index.items():
        for c in md["chunks"]:
            t = headers[c["file"]].tensors.get(c.get("key", fqn))
            if t is None or t.dtype != DTYPE_NAMES[md["dtype"]]:
                raise ValueError(f"sharded checkpoint {path}: {Path(path) / c['file']} holds {c.get('key', fqn)} as "
                                 f"{t.dtype if t else 'nothing'}, {INDEX} says {md['dtype']}")
    return index


def read_flat(path: str | os.PathLike, index: dict[str, dict], fqn: str, start: int = 0,
              stop: int | None = None) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor ``fqn``, read from the chunks that hold them
    (no process group needed: scripts read one tensor at a time this way)."""
    from safetensors import safe_open

    md = index[fqn]
    stop = md["size"][0] if stop is None else stop
    if not 0 <= start <= stop <= md["size"][0]:
        raise ValueError(f"sharded checkpoint {path}: elements [{start}, {stop}) of {fqn}, which has {md['size'][0]}")
    out = torch.empty(stop - start, dtype=DTYPE_NAMES[md["dtype"]])
    covered = 0
    for c in md["chunks"]:
        off, size = c["offset"][0], c["size"][0]
        lo, hi = max(start, off), min(stop, off + size)
        if lo < hi:
            file = inside(path, c["file"], str(Path(path) / INDEX), plain=True)
            with safe_open(str(file), framework="pt") as f:
                out[lo - start:hi - start] = f.get_slice(c.get("key", fqn))[lo - off:hi - off]
            covered += hi - lo
    if covered != stop - start:     # never hand out torch.empty's leftover memory as weights
        raise ValueError(f"sharded checkpoint {path}: {INDEX} covers {covered} of elements [{start}, {stop}) of {fqn}")
    return out
