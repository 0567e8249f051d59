"""Token shards: packed rows of token ids on disk, memory-mapped back; their metadata and checks.

On-disk layout of a shard directory (written by data/prepare.py):
    train_00000.bin, ...   raw little-endian uint16/uint32 tokens, rows of seq_len + 1
    val_00000.bin, ...     (input = row[:-1], labels = row[1:])
    meta.json              written last; its presence marks a complete directory

Documents are concatenated with EOS after each one, so rows cross document boundaries
(standard GPT pretraining packing, no padding). The tail that does not fill a row is
dropped. Validation is the last `val_fraction` of rows (at least one), so it is deterministic
and non-empty even for tiny corpora.

A document's text is encoded as text: a special token's string inside it (`<|endoftext|>` in
code or a page about GPT-2) becomes ordinary tokens, never the special id, so the only EOS ids
are the separators the packer appends. meta.json counts such strings (`special_tokens_in_text`).

Format version 2 records each shard's largest token id (`max_id`), which the vocabulary check
at start-up reads instead of every token; `scripts/verify_data.py` still reads them all.
Version 1 directories (no `max_id`) still load: their vocabulary check scans every token.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "moe-token-shards"
# 2: document text encoded with special-token strings as text, `max_id` per shard. The version is part
# of the cache key, so a version-1 cache is prepared again rather than reused.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_NAME = "meta.json"
REQUIRED_KEYS = ("format", "version", "dtype", "seq_len", "row_len", "vocab_size", "eos_token_id",
                 "tokenizer_fingerprint", "source", "val_fraction", "num_documents", "splits")
DEFAULT_ROWS_PER_SHARD = 16384  # 32 MiB shards at seq_len 1024 / uint16
_SCAN_TOKENS = 1 << 24  # tokens per chunk of a full scan (memory stays flat)


def shard_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype holding every id < vocab_size (halves disk for vocabs <= 65536)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_meta(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate the metadata of a shard directory (errors name the path)."""
    d = Path(out_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"token shard directory does not exist: {d}")
    path = d / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {d} holds no complete prepared shards "
                                "(never prepared, or preparation was interrupted)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt shard metadata {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not {FORMAT} metadata")
    if meta.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} has unknown format version {meta.get('version')!r} "
                         f"(this code reads versions {', '.join(map(str, READABLE_VERSIONS))}); prepare the data again")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"corrupt shard metadata {path}: missing keys {missing}")
    if (meta["dtype"] not in ("uint16", "uint32") or not _count(meta["seq_len"]) or meta["seq_len"] < 1
            or meta["row_len"] != meta["seq_len"] + 1):
        raise ValueError(f"corrupt shard metadata {path}: dtype={meta['dtype']!r}, "
                         f"seq_len={meta['seq_len']!r}, row_len={meta['row_len']!r}")
    _check_splits(path, meta["splits"], needs_max_id=meta["version"] >= 2)
    return meta


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_splits(path: Path, splits: Any, needs_max_id: bool) -> None:
    """Every shard entry is a plain file name in the shard directory with a row count (and, from
    version 2, its largest token id): a listing such as "../../x" would otherwise memory-map a file
    outside it."""
    if not isinstance(splits, dict):
        raise ValueError(f"corrupt shard metadata {path}: splits={splits!r} is not a mapping")
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise ValueError(f"corrupt shard metadata {path}: split {split!r} has no list of shards")
        for entry in shards:
            name = entry.get("file") if isinstance(entry, dict) else None
            rows = entry.get("rows") if isinstance(entry, dict) else None
            if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
                raise ValueError(f"corrupt shard metadata {path}: split {split!r} lists shard file {name!r}, "
                                 f"not a plain file name inside {path.parent}")
            if not _count(rows):
                raise ValueError(f"corrupt shard metadata {path}: shard {name!r} has rows={rows!r}, "
                                 "expected a count >= 0")
            if (needs_max_id or "max_id" in entry) and rows and not _count(entry.get("max_id")):
                raise ValueError(f"corrupt shard metadata {path}: shard {name!r} has max_id="
                                 f"{entry.get('max_id')!r}, expected its largest token id")


def check_files(d: Path, meta: dict[str, Any], split: str) -> list[tuple[Path, dict[str, Any]]]:
    """(file, its entry in meta) for each shard of `split`, after checking each file's size against meta."""
    from model.hf.safe_paths import inside  # the one check every index's file names go through

    itemsize = np.dtype(meta["dtype"]).itemsize
    out = []
    for shard in meta["splits"][split]["shards"]:
        f = inside(d, shard["file"], str(d / META_NAME), plain=True)   # a symlink out of d is refused too
        if not f.is_file():
            raise FileNotFoundError(f"shard file missing: {f} (listed in {d / META_NAME})")
        expected = shard["rows"] * meta["row_len"] * itemsize
        if f.stat().st_size != expected:
            raise ValueError(f"shard {f} has {f.stat().st_size} bytes but {d / META_NAME} says "
                             f"{shard['rows']} rows x {meta['row_len']} tokens x {itemsize} B = "
                             f"{expected}: truncated or corrupt; delete {d} and prepare again")
        out.append((f, shard))
    return out


def prepare_shards(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Tokenize and pack a corpus into a shard directory: data/prepare.py (streaming, resumable)."""
    from .prepare import prepare_shards as prepare

    return prepare(*args, **kwargs)


def cached_shards(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Metadata of a complete, matching build, or None: data/prepare.py."""
    from .prepare import cached_shards as cached

    return cached(*args, **kwargs)


class TokenShards:
    """Read-only, memory-mapped rows of one split; `ds[i]` is an int64 array of seq_len + 1.

    `expected_fingerprint`: the fingerprint of the tokenizer the caller uses (not one read from this
    directory); shards prepared with another are refused. `expected_vocab_size`: the model's vocabulary.
    Each shard's largest token id, recorded at preparation, must be below it: start-up reads no tokens
    for that (format version 1 shards, which have none recorded, are scanned in full, as before). Every
    row read afterwards is checked against its shard's recorded largest id, so a file changed since it
    was prepared still never puts an id outside the vocabulary into a batch: it fails naming the shard.
    """

    def __init__(self, out_dir: str, split: str = "train", expected_vocab_size: int | None = None,
                 expected_fingerprint: str | None = None):
        self.path = Path(out_dir)
        self.meta = meta = read_meta(self.path)
        if split not in meta["splits"]:
            raise ValueError(f"split {split!r} not in {self.path} (has {sorted(meta['splits'])})")
        if expected_fingerprint is not None and meta["tokenizer_fingerprint"] != expected_fingerprint:
            raise ValueError(
                f"{self.path} was prepared with another tokenizer (fingerprint {meta['tokenizer_fingerprint'][:16]}... "
                f"in its {META_NAME}) than this run's (fingerprint {expected_fingerprint[:16]}...); "
                "prepare the data again with this tokenizer")
        shards = [(f, entry) for f, entry in check_files(self.path, meta, split) if entry["rows"] > 0]
        self.split, self.seq_len, self.vocab_size = split, meta["seq_len"], meta["vocab_size"]
        self._files = [f for f, _ in shards]
        self._maps = [np.memmap(f, dtype=meta["dtype"], mode="r", shape=(entry["rows"], meta["row_len"]))
                      for f, entry in shards]
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])
        if len(self) == 0:
            raise ValueError(f"split {split!r} in {self.path} is empty (val_fraction=0 or tiny corpus)")
        self._vocab, self._limits = expected_vocab_size, None   # per shard: every id read must be below
        if expected_vocab_size is not None:
            self._limits = self._check_ids(expected_vocab_size, shards)
            self.get_rows([0, -1])   # two rows read: a file replaced from its start or end fails here

    def _check_ids(self, vocab_size: int, shards: list[tuple[Path, dict[str, Any]]]) -> list[int]:
        """Catches a model/tokenizer vocabulary mismatch before it becomes an out-of-range embedding
        lookup mid-training, from each shard's recorded largest id (a version-1 shard, with none, is
        scanned in full); `scripts/verify_data.py` reads every token of a directory. -> per shard, the
        bound every id read from it must stay below."""
        unrecorded = [f.name for f, entry in shards if "max_id" not in entry]
        if unrecorded:
            log.warning("%s was prepared before shards recorded their largest token id (format version %s): "
                        "reading all %d shard(s) of %r to check the vocabulary; prepare it again to skip this scan",
                        self.path, self.meta["version"], len(unrecorded), self.split)
        limits = []
        for m, (f, entry) in zip(self._maps, shards):
            recorded = entry.get("max_id")
            top = recorded if recorded is not None else scan_max_id(m)
            if top >= vocab_size:
                how = f"its largest, recorded in {META_NAME}" if recorded is not None else "found by a full scan"
                raise ValueError(f"{f} contains token id {top} >= vocab size {vocab_size} ({how}): the data in "
                                 f"{self.path} does not fit this model's vocabulary")
            limits.append(top + 1)
        return limits

    def _refuse(self, s: int, row: int, top: int) -> NoReturn:
        f, recorded = self._files[s], self._limits[s] - 1
        if top >= self._vocab:
            raise ValueError(f"{f} contains token id {top} >= vocab size {self._vocab} (in row {row}; its largest "
                             f"id was {recorded} when it was prepared): the file was changed since; check the "
                             f"directory with python scripts/verify_data.py {self.path}")
        raise ValueError(f"{f} contains token id {top} in row {row}, above the largest id {recorded} recorded in "
                         f"{META_NAME} when it was prepared: the file was changed since; check the directory with "
                         f"python scripts/verify_data.py {self.path}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows in {self.path} ({self.split})")
        i %= n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        row = np.asarray(self._maps[s][i - self._starts[s]], dtype=np.int64)
        if self._limits is not None and (top := int(row.max())) >= self._limits[s]:
            self._refuse(s, i - int(self._starts[s]), top)
        return row

    def get_rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(B, seq_len + 1) int64 array of the given rows."""
        return np.stack([self[i] for i in indices])


def scan_max_id(rows: np.ndarray) -> int:
    """The largest token id in a (rows, row_len) array or memory map, read in chunks (memory stays flat)."""
    step = max(1, _SCAN_TOKENS // max(1, rows.shape[1]))
    return max(int(rows[start:start + step].max()) for start in range(0, len(rows), step))


class ShardCheck(NamedTuple):
    """One shard's full scan by `verify_shards`; `problem` is None for a good shard."""
    split: str
    file: Path
    rows: int
    max_id: int | None  # found by reading every token (None: the file could not be read)
    recorded: int | None  # from meta.json (None: version 1, or no rows)
    problem: str | None


def verify_shards(out_dir: str | os.PathLike, vocab_size: int | None = None) -> Iterator[ShardCheck]:
    """Read every token of every shard: its size against meta.json, its largest id against the one
    recorded at preparation and against `vocab_size` (default: the tokenizer's, from meta.json).
    Yields one check per shard, in meta.json's order; raises only for unreadable metadata."""
    d = Path(out_dir)
    meta = read_meta(d)
    vocab = meta["vocab_size"] if vocab_size is None else vocab_size
    dtype, row_len = np.dtype(meta["dtype"]), meta["row_len"]
    for split, info in meta["splits"].items():
        for entry in info["shards"]:
            f, rows, recorded = d / entry["file"], entry["rows"], entry.get("max_id")
            expected = rows * row_len * dtype.itemsize
            size = f.stat().st_size if f.is_file() else None
            if size != expected:
                problem = "missing" if size is None else f"{size} bytes, expected {expected}: truncated or corrupt"
                yield ShardCheck(split, f, rows, None, recorded, problem)
                continue
            top = scan_max_id(np.memmap(f, dtype=dtype, mode="r", shape=(rows, row_len))) if rows else None
            problem = None
            if top is not None and top >= vocab:
                problem = f"contains token id {top} >= vocab size {vocab}"
            elif recorded is not None and top != recorded:
                problem = (f"its largest token id is {top}, but {META_NAME} recorded {recorded} when it was "
                           "prepared: the file was changed since")
            yield ShardCheck(split, f, rows, top, recorded, problem)
