"""A safetensors file's header read and checked by this project before any tensor is touched, so a
hostile or damaged header is one ValueError naming the file, the tensor and the field (the library's
own errors name neither the file nor, for a dtype it lacks, what was wrong).

The rules are safetensors' own format rules (its ``Metadata::validate``): an 8-byte little-endian
header length no larger than ``MAX_HEADER_BYTES`` and the file; a JSON object of tensors plus an
optional ``__metadata__`` of strings; each tensor a known dtype, a shape of non-negative integers and
``data_offsets`` [begin, end] whose length is the shape's bytes; the tensors tiling the data region in
order, without overlap or gap, up to the end of the file. Readers here also need a torch dtype for
each one: a dtype outside ``DTYPES`` (e.g. ``U32``) is refused by name.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

MAX_HEADER_BYTES = 100_000_000    # safetensors' own limit (N_MAX_HEADER in its Rust source)
METADATA = "__metadata__"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
          "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int                     # byte offsets in the data region (after the header)
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def _int_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def read_header(path: str | os.PathLike) -> Header:
    """The checked header of safetensors file ``path``; ValueError naming the file and field otherwise."""
    where = str(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{where}: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(f"{where}: header length {n} exceeds "
                                 f"{'the file' if n <= MAX_HEADER_BYTES else 'the safetensors limit'} (the file has "
                                 f"{size} bytes, the limit is {MAX_HEADER_BYTES}): not a safetensors file or truncated")
            text = f.read(n)
    except OSError as e:
        raise ValueError(f"{where}: cannot read: {e.strerror or e}") from None
    try:
        raw = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where}: header is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: header is not a JSON object")
    meta = raw.pop(METADATA, None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{where}: {METADATA} must map strings to strings")
    tensors = {name: _tensor(where, name, entry) for name, entry in raw.items()}
    _check_tiling(where, tensors, size - 8 - n)
    return Header(tensors, meta)


def _tensor(where: str, name: str, entry: object) -> TensorInfo:
    at = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{at}: entry is not a JSON object")
    dtype = entry.get("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"{at}: dtype {dtype!r} is not one this reader handles ({', '.join(DTYPES)})")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _int_list(shape) or any(s < 0 for s in shape):
        raise ValueError(f"{at}: shape {shape!r} is not a list of non-negative integers")
    if not _int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise ValueError(f"{at}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(f"{at}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, its shape {shape} of "
                         f"{dtype} needs {nbytes}")
    return TensorInfo(DTYPES[dtype], tuple(shape), offsets[0], offsets[1])


def _check_tiling(where: str, tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    end, last = 0, None
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != end:
            kind = "overlaps" if t.begin < end else "leaves a gap after"
            raise ValueError(f"{where}: tensor {name!r} at bytes {t.begin}..{t.end} {kind} "
                             f"{repr(last) if last else 'the start of the data'} (which ends at {end})")
        end, last = t.end, name
    if end != data_bytes:
        raise ValueError(f"{where}: the tensors end at data byte {end}, the file holds {data_bytes} "
                         f"({'truncated' if end > data_bytes else 'trailing bytes'})")
