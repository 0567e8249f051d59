"""Token shards: tokenize a corpus once, pack it into fixed-length rows, memory-map it back.

On-disk layout of a shard directory:
    train_00000.bin, ...   raw little-endian uint16/uint32 tokens, rows of seq_len + 1
    val_00000.bin, ...     (input = row[:-1], labels = row[1:])
    meta.json              written last; its presence marks a complete directory

Documents are concatenated with EOS after each one, so rows cross document boundaries
(standard GPT pretraining packing, no padding). The tail that does not fill a row is
dropped. Validation is the last ceil-ish `val_fraction` of rows, so it is deterministic
and non-empty even for tiny corpora.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .tokenizer import tokenizer_fingerprint

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT = "moe-token-shards"
FORMAT_VERSION = 1
META_NAME = "meta.json"
REQUIRED_KEYS = ("format", "version", "dtype", "seq_len", "row_len", "vocab_size", "eos_token_id",
                 "tokenizer_fingerprint", "source", "val_fraction", "num_documents", "splits")
_BATCH = 1000  # documents per tokenizer call / per packing step
DEFAULT_ROWS_PER_SHARD = 16384  # 32 MiB shards at seq_len 1024 / uint16


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
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has unknown format version {meta.get('version')!r} "
                         f"(this code reads version {FORMAT_VERSION}); prepare the data again")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise ValueError(f"corrupt shard metadata {path}: missing keys {missing}")
    if (meta["dtype"] not in ("uint16", "uint32") or not _count(meta["seq_len"]) or meta["seq_len"] < 1
            or meta["row_len"] != meta["seq_len"] + 1):
        raise ValueError(f"corrupt shard metadata {path}: dtype={meta['dtype']!r}, "
                         f"seq_len={meta['seq_len']!r}, row_len={meta['row_len']!r}")
    _check_splits(path, meta["splits"])
    return meta


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_splits(path: Path, splits: Any) -> None:
    """Every shard entry is a plain file name in the shard directory with a row count: a listing
    such as "../../x" would otherwise memory-map a file outside it."""
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


def _check_files(d: Path, meta: dict[str, Any], split: str) -> list[tuple[Path, int]]:
    """(file, rows) for each shard of `split`, after checking each file's size against meta."""
    itemsize = np.dtype(meta["dtype"]).itemsize
    out = []
    for shard in meta["splits"][split]["shards"]:
        f = d / shard["file"]
        if not f.is_file():
            raise FileNotFoundError(f"shard file missing: {f} (listed in {d / META_NAME})")
        expected = shard["rows"] * meta["row_len"] * itemsize
        if f.stat().st_size != expected:
            raise ValueError(f"shard {f} has {f.stat().st_size} bytes but {d / META_NAME} says "
                             f"{shard['rows']} rows x {meta['row_len']} tokens x {itemsize} B = "
                             f"{expected}: truncated or corrupt; delete {d} and prepare again")
        out.append((f, shard["rows"]))
    return out


def dataset_content_hash(dataset: datasets.Dataset) -> str:
    """sha256 of all documents' text: the cache key when the caller gives no `source`."""
    h = hashlib.sha256()
    for batch in dataset.select_columns(["text"]).with_format("arrow").iter(batch_size=_BATCH):
        for t in batch.column("text").to_pylist():
            h.update((t or "").encode("utf-8"))
            h.update(b"\xff")  # separator: never appears in UTF-8
    return h.hexdigest()


def _build_key(tokenizer: PreTrainedTokenizerBase, seq_len: int, val_fraction: float, rows_per_shard: int,
               source: str) -> dict[str, Any]:
    """Everything a build depends on; all of it must match for a cached build to be reused."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "seq_len": seq_len,
            "vocab_size": len(tokenizer), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "val_fraction": val_fraction, "rows_per_shard": rows_per_shard, "source": source}


def cached_shards(out_dir: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, source: str,
                  val_fraction: float = 0.01, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> dict[str, Any] | None:
    """Metadata of a complete, matching build in `out_dir`, or None: lets callers skip
    loading the corpus at all on a cache hit."""
    return _cache_hit(Path(out_dir), _build_key(tokenizer, seq_len, val_fraction, rows_per_shard, source))


def _cache_hit(d: Path, want: dict[str, Any]) -> dict[str, Any] | None:
    """The existing metadata if `d` is complete and was built with exactly `want`; else None."""
    try:
        meta = read_meta(d)
        for split in meta["splits"]:
            _check_files(d, meta, split)
    except (FileNotFoundError, ValueError):
        return None
    if all(meta.get(k) == v for k, v in want.items()):
        return meta
    log.info("shard cache in %s was built with other parameters; rebuilding", d)
    return None


def _clear(d: Path) -> None:
    """Remove a previous build (metadata first, so it can never be mistaken for complete)."""
    (d / META_NAME).unlink(missing_ok=True)
    for f in d.iterdir():
        if f.is_file() and (f.name.endswith(".tmp") or
                            (f.suffix == ".bin" and f.name.split("_")[0] in ("train", "val"))):
            f.unlink()


class _RowWriter:
    """Streams packed rows into train shards, then val shards, each file renamed in when full."""

    def __init__(self, d: Path, dtype: np.dtype, rows_per_shard: int, plan: list[tuple[str, int]]):
        self.d, self.dtype, self.rows_per_shard = d, dtype, rows_per_shard
        self.plan = [(s, n) for s, n in plan if n > 0]
        self.splits: dict[str, dict[str, Any]] = {s: {"rows": 0, "shards": []} for s, _ in plan}
        self.fh = None
        self.shard_rows = 0

    def write(self, rows: np.ndarray) -> None:
        while len(rows) and self.plan:
            split, left = self.plan[0]
            if self.fh is None:
                name = f"{split}_{len(self.splits[split]['shards']):05d}.bin"
                self.splits[split]["shards"].append({"file": name, "rows": 0})
                self.fh, self.shard_rows = open(self.d / f".{name}.tmp", "wb"), 0
            k = min(len(rows), left, self.rows_per_shard - self.shard_rows)
            self.fh.write(np.ascontiguousarray(rows[:k], dtype=self.dtype).tobytes())
            rows, left, self.shard_rows = rows[k:], left - k, self.shard_rows + k
            self.splits[split]["shards"][-1]["rows"] += k
            self.splits[split]["rows"] += k
            self.plan[0] = (split, left)
            if left == 0 or self.shard_rows == self.rows_per_shard:
                self._finish_shard(split)
            if left == 0:
                self.plan.pop(0)

    def _finish_shard(self, split: str) -> None:
        name = self.splits[split]["shards"][-1]["file"]
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        os.replace(self.d / f".{name}.tmp", self.d / name)


def prepare_shards(dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, out_dir: str, seq_len: int,
                   val_fraction: float = 0.01, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, num_proc: int = 1,
                   source: str | None = None) -> dict[str, Any]:
    """Tokenize `dataset` (column "text"), pack rows of seq_len + 1 tokens, write shards.

    Returns the metadata dict. If `out_dir` already holds a complete build with the same
    tokenizer fingerprint, seq_len, val_fraction, rows_per_shard and source (`source`, or a
    hash of the text when None), it is reused untouched; otherwise it is rebuilt.
    """
    import datasets  # on demand: only preparation needs it
    import pyarrow.compute as pc  # on demand: only preparation needs it

    if seq_len < 1 or rows_per_shard < 1:
        raise ValueError(f"seq_len and rows_per_shard must be >= 1, got {seq_len}, {rows_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token; one is needed to separate documents")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    vocab_size, row_len = len(tokenizer), seq_len + 1
    if source is None:
        source = "text-sha256:" + dataset_content_hash(dataset)
    want = _build_key(tokenizer, seq_len, val_fraction, rows_per_shard, source)
    hit = _cache_hit(d, want)
    if hit is not None:
        return hit
    _clear(d)

    backend = getattr(tokenizer, "backend_tokenizer", None)

    def encode(texts: list[str]) -> dict[str, list[list[int]]]:
        texts = [t for t in texts if t]  # empty documents would add bare EOS tokens
        if backend is not None:  # direct call: no per-text max-length warnings, no python overhead
            ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        else:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"ids": [x + [eos] for x in ids]}

    tokenized = dataset.select_columns(["text"]).map(
        encode, batched=True, batch_size=_BATCH, input_columns="text", remove_columns=["text"],
        num_proc=num_proc if num_proc > 1 else None, desc="tokenizing",
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
    )
    arrow = tokenized.with_format("arrow")
    num_tokens = sum(pc.sum(pc.list_value_length(b.column("ids"))).as_py() or 0
                     for b in arrow.iter(batch_size=_BATCH * 10))
    n_rows = num_tokens // row_len
    n_val = max(1, int(n_rows * val_fraction)) if val_fraction > 0 else 0
    if n_rows - n_val < 1:
        raise ValueError(f"corpus too small: {num_tokens} tokens make {n_rows} rows of {row_len} "
                         f"tokens (seq_len={seq_len}), need at least {1 + (n_val or 0)}")

    dtype = shard_dtype(vocab_size)
    writer = _RowWriter(d, dtype, rows_per_shard, [("train", n_rows - n_val), ("val", n_val)])
    carry = np.zeros(0, dtype=np.int64)
    for batch in arrow.iter(batch_size=_BATCH):
        flat = pc.list_flatten(batch.column("ids")).to_numpy()
        if len(flat) and (flat.max() >= vocab_size or flat.min() < 0):
            raise ValueError(f"tokenizer produced id {flat.max()} outside [0, {vocab_size})")
        buf = np.concatenate([carry, flat])
        full = len(buf) // row_len
        writer.write(buf[: full * row_len].reshape(full, row_len))
        carry = buf[full * row_len:]

    meta = dict(want, dtype=dtype.name, row_len=row_len, eos_token_id=eos,
                tokenizer_path=str(getattr(tokenizer, "name_or_path", "")),
                num_documents=len(tokenized), num_tokens=num_tokens,
                dropped_tokens=num_tokens - n_rows * row_len,
                splits={s: dict(info, tokens=info["rows"] * row_len) for s, info in writer.splits.items()})
    tmp = d / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, d / META_NAME)  # last step: from here on the directory counts as complete
    return meta


class TokenShards:
    """Read-only, memory-mapped rows of one split; `ds[i]` is an int64 array of seq_len + 1."""

    def __init__(self, out_dir: str, split: str = "train", expected_vocab_size: int | None = None,
                 expected_fingerprint: str | None = None):
        self.path = Path(out_dir)
        self.meta = meta = read_meta(self.path)
        if split not in meta["splits"]:
            raise ValueError(f"split {split!r} not in {self.path} (has {sorted(meta['splits'])})")
        if expected_fingerprint is not None and meta["tokenizer_fingerprint"] != expected_fingerprint:
            raise ValueError(
                f"{self.path} was prepared with another tokenizer (fingerprint "
                f"{meta['tokenizer_fingerprint'][:12]}..., expected {expected_fingerprint[:12]}...); "
                "prepare the data again with this tokenizer")
        files = _check_files(self.path, meta, split)
        self.split, self.seq_len, self.vocab_size = split, meta["seq_len"], meta["vocab_size"]
        self._maps = [np.memmap(f, dtype=meta["dtype"], mode="r", shape=(rows, meta["row_len"]))
                      for f, rows in files if rows > 0]
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])
        if len(self) == 0:
            raise ValueError(f"split {split!r} in {self.path} is empty (val_fraction=0 or tiny corpus)")
        if expected_vocab_size is not None:
            self._check_ids(expected_vocab_size, [f for f, rows in files if rows > 0])

    def _check_ids(self, vocab_size: int, files: list[Path]) -> None:
        # A full vectorized scan (chunked, so memory stays flat): catches a model/tokenizer
        # vocab mismatch before it becomes an out-of-range embedding lookup mid-training.
        for m, f in zip(self._maps, files):
            for start in range(0, len(m), 65536):
                top = int(m[start:start + 65536].max())
                if top >= vocab_size:
                    raise ValueError(f"{f} contains token id {top} >= vocab size {vocab_size} "
                                     f"(data in {self.path} does not fit this model's vocabulary)")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows in {self.path} ({self.split})")
        i %= n
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return np.asarray(self._maps[s][i - self._starts[s]], dtype=np.int64)

    def get_rows(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(B, seq_len + 1) int64 array of the given rows."""
        return np.stack([self[i] for i in indices])
