"""A safetensors file written tensor by tensor: the header first, then each tensor's bytes as
they are produced, so a writer holds one tensor at a time instead of a whole shard.

The file is byte-identical to ``safetensors.torch.save_file`` of the same tensors and metadata
(tests/test_export.py checks it). With more than one metadata key, safetensors orders them
differently from call to call, so only the parsed header can match there; this writer sorts them,
so the same tensors always give the same bytes. The header lists the tensors in the order safetensors itself
chooses (asked of the library on empty stand-ins, so a new version's order is followed, not
guessed), as compact JSON padded with spaces to a multiple of 8 bytes, and the data region holds
the tensors back to back in that order. Because every offset is known from the header, a tensor
may be written in any order, and in pieces along its first dimension (``write(name, part, row)``):
the import stacks a layer's experts straight into the file without building the stacked tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import save

_ALIGN = 8   # safetensors pads the header so the data region starts 8-byte aligned


def _order(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[str]:
    """The tensor order save_file would write, from empty stand-ins."""
    probe = save({name: torch.empty(0, dtype=dtype) for name, dtype, _ in specs})
    n = struct.unpack("<Q", probe[:8])[0]
    header = json.loads(probe[8:8 + n])
    header.pop("__metadata__", None)
    return list(header)


class SafetensorsWriter:
    """Write one safetensors file from a plan of (name, dtype, shape).

    ``write(name, tensor)`` puts a tensor's bytes at its place; ``write(name, part, row=i)`` puts
    ``part`` (shape[1:] equal to the tensor's) at rows i.. of the first dimension. ``close()``
    checks that every byte of every tensor was written (ValueError naming the first one that was
    not), then moves the file into place: a writer that fails leaves no file behind. Used by the
    Hugging Face export / import and by the sharded checkpoints' ShardWriter."""

    def __init__(self, path: str | os.PathLike, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        specs = [(name, dtype, tuple(int(s) for s in shape)) for name, dtype, shape in specs]
        if len({name for name, _, _ in specs}) != len(specs):
            raise ValueError(f"{self.path}: duplicate tensor names in the plan")
        by_name = {name: (dtype, shape) for name, dtype, shape in specs}
        order = _order(specs)
        # metadata keys sorted: safetensors' own order of several keys changes from call to call (a
        # hash map), and the same tensors must give the same bytes (tests/test_determinism.py)
        meta = None if metadata is None else dict(sorted(metadata.items()))
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}   # dtype, shape, begin, nbytes
        header: dict[str, object] = {} if meta is None else {"__metadata__": meta}
        offset = 0
        for name in order:
            dtype, shape = by_name[name]
            nbytes = math.prod(shape) * dtype.itemsize
            self._info[name] = (dtype, shape, offset, nbytes)
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        text += b" " * (-len(text) % _ALIGN)
        self._data_start = 8 + len(text)
        self._written = {name: 0 for name in self._info}
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(struct.pack("<Q", len(text)))
        self._f.write(text)
        self._f.truncate(self._data_start + offset)   # the full size now: pieces land in any order

    def write(self, name: str, tensor: torch.Tensor, row: int = 0) -> None:
        if name not in self._info:
            raise ValueError(f"{self.path}: {name} is not in this file's plan")
        dtype, shape, begin, nbytes = self._info[name]
        if tensor.dtype != dtype:
            raise ValueError(f"{self.path}: {name} planned as {dtype}, got {tensor.dtype}")
        whole = row == 0 and tuple(tensor.shape) == shape
        if not whole and (len(shape) == 0 or tuple(tensor.shape[1:]) != shape[1:]
                          or not 0 <= row <= shape[0] - tensor.shape[0]):
            raise ValueError(f"{self.path}: {name} has shape {shape}; cannot write a {tuple(tensor.shape)} "
                             f"piece at row {row}")
        row_bytes = nbytes // shape[0] if shape and shape[0] else 0
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.seek(self._data_start + begin + row * row_bytes)
        self._f.write(memoryview(data))
        self._written[name] += data.nbytes

    def file_offset(self, name: str) -> int:
        """Byte offset of ``name``'s data from the start of the file."""
        return self._data_start + self._info[name][2]

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())                    # on disk before the rename makes it visible
        self._f.close()
        short = [n for n, (_, _, _, nbytes) in self._info.items() if self._written[n] != nbytes]
        if short:
            self._tmp.unlink(missing_ok=True)
            n = short[0]
            raise ValueError(f"{self.path}: {n} got {self._written[n]} of {self._info[n][3]} bytes "
                             f"({len(short)} tensor(s) incomplete)")
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# safetensors' dtype names (the header's "dtype" field)
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_streaming(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                   metadata: dict[str, str] | None = None) -> None:
    """save_file through the streaming writer (in-memory tensors; the tests compare the two)."""
    with SafetensorsWriter(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
