"""Packing on disk: rows streamed into shard files, the progress record that makes preparation resumable,
and the final split of the tail into validation shards.

Files of a directory being prepared (see data/shards.py for the finished format):
    train_00000.bin, ...   finished shards, each renamed in when full
    .train_00007.bin.tmp   the shard being written (deleted on resume)
    progress.json          the finished shards and the point of the stream where the next one starts
    meta.json              written last; its presence marks the directory complete (progress.json goes)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .shards import META_NAME, scan_max_id

PROGRESS_NAME = "progress.json"
_COPY_ROWS = 8192   # rows per read/write when the validation tail is copied out


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def save_progress(d: Path, state: dict[str, Any]) -> None:
    tmp = d / f".{PROGRESS_NAME}.tmp"
    tmp.write_text(json.dumps(state), encoding="utf-8")
    _fsync_replace(tmp, d / PROGRESS_NAME)


def load_progress(d: Path, want: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded progress of an interrupted preparation with exactly the key `want`, else None. Shards it
    lists must still be there at their recorded size."""
    try:
        state = json.loads((d / PROGRESS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("key") != want:
        return None
    for shard in state.get("shards", []) if state.get("val") is None else []:   # once val is out, train is cut
        if not (d / shard["file"]).is_file():
            return None
    for f in d.glob(".*.tmp"):
        f.unlink(missing_ok=True)   # the shard that was being written: written again
    return state


def clear(d: Path) -> None:
    """Remove a previous build (metadata first, so it can never be mistaken for complete)."""
    (d / META_NAME).unlink(missing_ok=True)
    (d / PROGRESS_NAME).unlink(missing_ok=True)
    for f in d.iterdir():
        if f.is_file() and (f.name.endswith(".tmp") or
                            (f.suffix == ".bin" and f.name.split("_")[0] in ("train", "val"))):
            f.unlink()


class RowWriter:
    """Packs a stream of token ids into rows of `row_len` and the rows into train shards of `rows_per_shard`;
    `on_shard(shards, batch_start)` is called after each shard is renamed in (batch_start: the stream counters
    at the start of the batch being written, set by the caller)."""

    def __init__(self, d: Path, dtype: np.dtype, rows_per_shard: int, row_len: int, done: list[dict[str, Any]],
                 on_shard: Callable[[list[dict[str, Any]], Any], None]):
        self.d, self.dtype, self.rows_per_shard, self.row_len = d, dtype, rows_per_shard, row_len
        self.shards, self.on_shard = [dict(s) for s in done], on_shard
        self.carry = np.zeros(0, dtype=np.int64)
        self.fh, self.rows, self.max_id = None, 0, 0
        self.batch_start: Any = None

    @property
    def total_rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def _name(self) -> str:
        return f"train_{len(self.shards):05d}.bin"

    def write(self, ids: np.ndarray) -> None:
        buf = np.concatenate([self.carry, ids]) if len(self.carry) else ids
        full = len(buf) // self.row_len
        rows = buf[:full * self.row_len].reshape(full, self.row_len)   # (full, row_len)
        self.carry = buf[full * self.row_len:].copy()
        while len(rows):
            if self.fh is None:
                self.fh, self.rows, self.max_id = open(self.d / f".{self._name()}.tmp", "wb"), 0, 0
            k = min(len(rows), self.rows_per_shard - self.rows)
            self.fh.write(np.ascontiguousarray(rows[:k], dtype=self.dtype).tobytes())
            self.max_id = max(self.max_id, int(rows[:k].max()))
            self.rows += k
            rows = rows[k:]
            if self.rows == self.rows_per_shard:
                self._finish()

    def _finish(self) -> None:
        name = self._name()
        self.fh.close()
        self.fh = None
        _fsync_replace(self.d / f".{name}.tmp", self.d / name)
        self.shards.append({"file": name, "rows": self.rows, "max_id": self.max_id})
        self.on_shard(list(self.shards), self.batch_start)

    def close(self) -> None:
        """The last, partial shard is finished; the tail that does not fill a row is dropped."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            name = self._name()
            _fsync_replace(self.d / f".{name}.tmp", self.d / name)
            self.shards.append({"file": name, "rows": self.rows, "max_id": self.max_id})


def _tail_segments(shards: list[dict[str, Any]], first: int) -> list[tuple[str, int, int]]:
    """(file, start row, end row) pieces of the shards that hold global rows first..end."""
    out, start = [], 0
    for s in shards:
        lo, hi = max(first, start), start + s["rows"]
        if lo < hi:
            out.append((s["file"], lo - start, hi - start))
        start = hi
    return out


def _copy_val(d: Path, shards: list[dict[str, Any]], first: int, rows_per_shard: int, row_len: int,
              dtype: np.dtype) -> list[dict[str, Any]]:
    """Copy global rows first.. (the tail) into val shards; -> their entries."""
    out: list[dict[str, Any]] = []
    fh = None
    for name, lo, hi in _tail_segments(shards, first):
        src = np.memmap(d / name, dtype=dtype, mode="r").reshape(-1, row_len)   # (rows, row_len)
        while lo < hi:
            if fh is None:
                out.append({"file": f"val_{len(out):05d}.bin", "rows": 0, "max_id": 0})
                fh = open(d / f".{out[-1]['file']}.tmp", "wb")
            k = min(hi - lo, rows_per_shard - out[-1]["rows"], _COPY_ROWS)
            chunk = np.asarray(src[lo:lo + k])
            fh.write(chunk.tobytes())
            out[-1]["rows"] += k
            out[-1]["max_id"] = max(out[-1]["max_id"], int(chunk.max()))
            lo += k
            if out[-1]["rows"] == rows_per_shard:
                fh.close()
                fh = None
                _fsync_replace(d / f".{out[-1]['file']}.tmp", d / out[-1]["file"])
        del src
    if fh is not None:
        fh.close()
        _fsync_replace(d / f".{out[-1]['file']}.tmp", d / out[-1]["file"])
    return out


def _cut_train(d: Path, shards: list[dict[str, Any]], keep: int, row_len: int, dtype: np.dtype) -> list[dict]:
    """Train shards cut to their first `keep` rows (files past it removed, the one across it truncated)."""
    out, start = [], 0
    for s in shards:
        rows = min(s["rows"], max(0, keep - start))
        start += s["rows"]
        f = d / s["file"]
        if rows == 0:
            f.unlink(missing_ok=True)
            continue
        entry = dict(s)
        if rows < s["rows"]:
            size = rows * row_len * dtype.itemsize
            if f.stat().st_size > size:
                os.truncate(f, size)
            entry.update(rows=rows, max_id=scan_max_id(np.memmap(f, dtype=dtype, mode="r", shape=(rows, row_len))))
        out.append(entry)
    return out


def finalize(d: Path, state: dict[str, Any], val_fraction: float, seq_len: int,
             base: dict[str, Any]) -> dict[str, Any]:
    """Validation shards from the tail, train shards cut before it, meta.json written (each step
    recorded, so an interruption here resumes here); -> the metadata."""
    row_len, dtype = seq_len + 1, np.dtype(base["dtype"])
    n_rows, tokens = state["total"], state["tokens"]
    n_val = max(1, int(n_rows * val_fraction)) if val_fraction > 0 else 0
    if n_rows - n_val < 1:
        raise ValueError(f"corpus too small: {tokens} tokens make {n_rows} rows of {row_len} "
                         f"tokens (seq_len={seq_len}), need at least {1 + (n_val or 0)}")
    if state.get("val") is None:
        state["val"] = _copy_val(d, state["shards"], n_rows - n_val, state["key"]["rows_per_shard"], row_len, dtype)
        save_progress(d, state)
    train = _cut_train(d, state["shards"], n_rows - n_val, row_len, dtype)
    stream = state["stream"]
    occurrences = {t: int(n) for t, n in zip(state["specials"], stream["special_counts"]) if n}
    meta = dict(base, row_len=row_len, num_documents=state["documents"], num_tokens=tokens,
                dropped_tokens=tokens - n_rows * row_len,
                # special-token strings found in documents, kept (and encoded) as text
                special_tokens_in_text={"documents": stream["special_docs"], "occurrences": occurrences},
                splits={name: {"rows": sum(s["rows"] for s in shards), "shards": shards,
                               "tokens": sum(s["rows"] for s in shards) * row_len}
                        for name, shards in (("train", train), ("val", state["val"]))})
    tmp = d / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    _fsync_replace(tmp, d / META_NAME)   # from here on the directory counts as complete
    (d / PROGRESS_NAME).unlink(missing_ok=True)
    return meta
