"""Streaming readers, one per file format: each yields a file's documents without loading the file whole
and writes nothing anywhere (no Arrow cache, no temporary files).

  * text files: one document per file, yielded as bounded pieces (data/pieces.py); a file over
    `WHOLE_FILE_BYTES` is read in blocks twice (checked to be UTF-8 first, then split), so memory does
    not grow with the file. A binary (NUL byte) or non-UTF-8 file yields None: the caller counts and names it.
  * JSON lines (.jsonl, or .json not starting with '['): one document per line, parsed line by line; a
    line is held whole while it is parsed (about 3 bytes of memory per byte of the longest line).
  * a .json array: parsed whole (the format has no streaming form in the standard library).
  * parquet: the text column, row group by row group.
  * a `save_to_disk` directory: memory-mapped Arrow, read in batches.

A non-string text value (a number, a list) anywhere is an error naming the file and the row; a null or
blank one is an empty document (dropped, counted).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .pieces import PIECE_CHARS, split_stream, split_text

WHOLE_FILE_BYTES = 16 << 20   # text files up to this size are read at once (one decode, no second pass)
_BLOCK = 1 << 20


def _cause(e: BaseException) -> str:
    """'Type: message' of an exception and up to two of its causes (loaders wrap the useful one)."""
    parts, seen = [], set()
    while e is not None and len(parts) < 3:
        text = f"{type(e).__name__}: {e}".strip()
        if text not in seen:
            parts.append(text)
            seen.add(text)
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


# ---------------------------------------------------------------- text files

def _blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            yield block


def _decoded(path: Path) -> Iterator[str]:
    dec = codecs.getincrementaldecoder("utf-8")()
    for block in _blocks(path):
        yield dec.decode(block)
    yield dec.decode(b"", final=True)


def _big_file_ok(path: Path) -> bool:
    """UTF-8 without NUL bytes and not blank, read block by block (nothing kept)."""
    blank = True
    try:
        for text in _decoded(path):
            if "\x00" in text:
                return False
            blank = blank and not text.strip()
    except UnicodeDecodeError:
        return False
    return not blank


def text_file_pieces(path: Path, limit: int = PIECE_CHARS) -> Iterator[str] | None:
    """The pieces of one text file (one document; empty when it is blank), or None when the file is binary or
    not UTF-8 (skipped: the caller names it)."""
    if path.stat().st_size > WHOLE_FILE_BYTES:
        return split_stream(_decoded(path), limit) if _big_file_ok(path) else None
    raw = path.read_bytes()
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return split_text(text, limit) if text.strip() else iter(())


# ---------------------------------------------------------------- JSON

def _text_of(record: Any, field: str, path: Path, row: int) -> str | None:
    if not isinstance(record, dict):
        raise ValueError(f"cannot read json corpus file(s) {path}: row {row} is a {type(record).__name__}, "
                         f"expected an object with a {field!r} field")
    if field not in record:
        raise ValueError(f"text field {field!r} not found in {path}; available columns: {sorted(record)} (row {row})")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text field {field!r} in {path} has type {type(text).__name__} at row {row} "
                         f"({json.dumps(text)[:40]}), expected strings")
    return text


def json_texts(path: Path, field: str) -> Iterator[str | None]:
    """Each record's text (None for a null value), one JSON line at a time; a file starting with '[' is one
    JSON array, parsed whole."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if head.startswith(b"["):
        yield from _json_array(path, field)
        return
    with open(path, "rb") as f:
        for row, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"cannot read json corpus file(s) {path}: row {row} is not a JSON object "
                                 f"({_cause(e)})") from e
            yield _text_of(record, field, path, row)


def _json_array(path: Path, field: str) -> Iterator[str | None]:
    try:
        records = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read json corpus file(s) {path}: {_cause(e)}") from e
    if not isinstance(records, list):
        raise ValueError(f"cannot read json corpus file(s) {path}: expected JSON lines or an array of objects")
    for row, record in enumerate(records, 1):
        yield _text_of(record, field, path, row)


# ---------------------------------------------------------------- parquet and saved datasets

def parquet_texts(path: Path, field: str) -> Iterator[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # ArrowInvalid, OSError, ...: name the file
        raise ValueError(f"cannot read parquet corpus file(s) {path}: {_cause(e)}") from e
    schema = pf.schema_arrow
    if field not in schema.names:
        raise ValueError(f"text field {field!r} not found in {path}; available columns: {schema.names}")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise ValueError(f"text field {field!r} in {path} has type {kind}, expected strings")
    try:
        for g in range(pf.num_row_groups):
            yield from pf.read_row_group(g, columns=[field]).column(0).to_pylist()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read parquet corpus file(s) {path}: {_cause(e)}") from e


def saved_texts(root: Path, field: str) -> Iterator[str | None]:
    """A `save_to_disk` directory's texts (its "train" split, else the first), memory-mapped; no cache is written."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # pyarrow/datasets raise many types; name the directory
        raise ValueError(f"cannot read the saved dataset {root}: {_cause(e)}") from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train" if "train" in ds else sorted(ds)[0]]
    if field not in ds.column_names:
        raise ValueError(f"text field {field!r} not found in {root}; available columns: {ds.column_names}")
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"text field {field!r} in {root} has type {feature}, expected strings")
    for batch in ds.select_columns([field]).with_format("arrow").iter(batch_size=1000):
        yield from batch.column(field).to_pylist()
