"""The tokenizer's training sample: about `sample_bytes` of a corpus, spread over all of it, deterministic.

A corpus no larger than the sample is used whole (the BPE is then the one trained on everything). A
larger one contributes from every file in proportion to its size:

  * JSON lines: windows of about 64 KiB (16 to 4096 of them) at evenly spaced offsets from the file's start to
    its end (each from the next line on), so one 100 GB file is sampled along its whole length while
    reading only the sample;
  * text files (one document each): whole files, chosen every size/sample_bytes bytes of the listing;
  * other formats (parquet, JSON arrays, saved datasets): every document whose running length crosses a
    multiple of total/sample_bytes (these are read whole to take the sample).

Documents come as bounded pieces (data/pieces.py), as in packing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from .corpus import JSON_SUFFIXES, PARQUET_SUFFIXES, Corpus
from .pieces import split_text

WINDOW_BYTES = 64 << 10   # a window of the file read in one go (at least 16 windows, at most MAX_WINDOWS)
MAX_WINDOWS = 4096


def sample_pieces(corpus: Corpus, sample_bytes: int) -> Iterator[str]:
    """The pieces of the training sample, in corpus order."""
    if corpus.total_bytes <= sample_bytes:
        for piece, _ in corpus.pieces():
            yield piece
        return
    fraction = sample_bytes / corpus.total_bytes
    if corpus.saved:
        yield from _systematic(corpus.documents(), fraction)
        return
    seen = taken = 0
    for f in corpus.files:
        size = f.stat().st_size
        suffix = f.suffix.lower()
        if corpus.path is not None and suffix in JSON_SUFFIXES and not _is_array(f):
            yield from _jsonl_windows(corpus, f, size, size * fraction)
        elif corpus.path is not None and suffix in JSON_SUFFIXES | PARQUET_SUFFIXES:
            yield from _systematic(corpus.file_documents(f), fraction)
        elif _behind(taken, seen + size, fraction):   # a text file: whole or not
            for doc in corpus.file_documents(f):
                yield from doc
            taken += size
        seen += size


def _behind(taken: int, seen: int, fraction: float) -> bool:
    """Systematic sampling by bytes: the next unit (a document, a text file) is taken while the bytes taken
    are behind ``fraction`` of the bytes seen, the unit included, so the sample stays within one unit of
    ``fraction`` x the bytes seen and spread evenly over the corpus."""
    return taken < fraction * seen


def _is_array(f: Path) -> bool:
    with open(f, "rb") as fh:
        return fh.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _systematic(documents: Iterator[Iterator[str]], fraction: float) -> Iterator[str]:
    seen = taken = 0
    for doc in documents:
        pieces = list(doc)   # bounded: one document's pieces (texts of these formats are held whole anyway)
        size = sum(len(p) for p in pieces)
        seen += size
        if _behind(taken, seen, fraction):
            yield from pieces
            taken += size


def _jsonl_windows(corpus: Corpus, f: Path, size: int, budget: float) -> Iterator[str]:
    """About `budget` bytes of documents from windows spread evenly over the JSON-lines file `f`."""
    windows = max(1, min(MAX_WINDOWS, int(budget) // 4096, max(16, math.ceil(budget / WINDOW_BYTES))))
    per_window = budget / windows
    end = 0   # where the previous window stopped: windows never overlap
    with open(f, "rb") as fh:
        for w in range(windows):
            start = int((size - per_window) * w / (windows - 1)) if windows > 1 else 0   # the last one ends the file
            if start > end:
                fh.seek(start)
                fh.readline()   # the line the offset fell in belongs to the window before
            else:
                fh.seek(end)
            taken = 0
            while taken < per_window and (line := fh.readline()):
                if taken and taken + len(line) > per_window:
                    fh.seek(-len(line), 1)   # the next window may take it
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    continue   # packing reads every line and names a bad one with its row number
                text = record.get(corpus.text_field) if isinstance(record, dict) else None
                if isinstance(text, str) and text.strip():
                    yield from split_text(text)
                    taken += len(line)
            end = fh.tell()
