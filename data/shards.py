"""Token shards: tokenize a corpus once, pack it into fixed-length rows, memory-map it back.

On-disk layout of a shard directory:
    train_00000.bin, ...   raw little-endian uint16/uint32 tokens, rows of seq_len + 1
    val_00000.bin, ...     (input = row[:-1], labels = row[1:])
    meta.json              written last; its presence marks a complete directory

Documents are concatenated with EOS after each one, so rows cross document boundaries
(standard GPT pretraining packing, no padding). The tail that does not fill a row is
dropped. Validation is the last ceil-ish `val_fraction` of rows, so it is deterministic
and non-empty even for tiny corpora.

A document's text is encoded as text: a special token's string inside it (`<|endoftext|>` in
code or a page about GPT-2) becomes ordinary tokens, never the special id, so the only EOS ids
are the separators the packer appends. meta.json counts such strings (`special_tokens_in_text`).

Format version 2 records each shard's largest token id (`max_id`), which the vocabulary check
at start-up reads instead of every token; `scripts/verify_data.py` still reads them all.
Version 1 directories (no `max_id`) still load: their vocabulary check scans every token.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import numpy as np

from .tokenizer import literal_pattern, special_token_strings, tokenizer_fingerprint

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FORMAT = "moe-token-shards"
# 2: document text encoded with special-token strings as text, `max_id` per shard. The version is part
# of the cache key, so a version-1 cache is prepared again rather than reused.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_NAME = "meta.json"
REQUIRED_KEYS = ("format", "version", "dtype", "seq_len", "row_len", "vocab_size", "eos_token_id",
                 "tokenizer_fingerprint", "source", "val_fraction", "num_documents", "splits")
_BATCH = 1000  # documents per tokenizer call / per packing step
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


def _check_files(d: Path, meta: dict[str, Any], split: str) -> list[tuple[Path, dict[str, Any]]]:
    """(file, its entry in meta) for each shard of `split`, after checking each file's size against meta."""
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
        out.append((f, shard))
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
            shard = self.splits[split]["shards"][-1]
            shard["max_id"] = max(shard.get("max_id", 0), int(rows[:k].max()))  # the start-up vocabulary check
            rows, left, self.shard_rows = rows[k:], left - k, self.shard_rows + k
            shard["rows"] += k
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

    specials = special_token_strings(tokenizer)
    index = {t: i for i, t in enumerate(specials)}
    pattern = literal_pattern(specials)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = copy.deepcopy(backend) if backend is not None else None  # the caller's tokenizer stays as it is

    def encode(texts: list[str]) -> dict[str, list[list[int]]]:
        texts = [t for t in texts if t]  # empty documents would add bare EOS tokens
        # A special token's string in a document is text: without this it would be encoded as the special
        # id (`<|endoftext|>` -> EOS, one document silently split in two).
        if plain is not None:  # direct call: no per-text max-length warnings, no python overhead
            plain.encode_special_tokens = True  # on every call: pickling into a num_proc worker drops it
            ids = [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]
        else:
            ids = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        found = [[index[m] for m in pattern.findall(t)] if pattern else [] for t in texts]
        return {"ids": [x + [eos] for x in ids], "specials": found}

    tokenized = dataset.select_columns(["text"]).map(
        encode, batched=True, batch_size=_BATCH, input_columns="text", remove_columns=["text"],
        num_proc=num_proc if num_proc > 1 else None, desc="tokenizing",
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                                    "specials": datasets.List(datasets.Value("int32"))}),
    )
    arrow = tokenized.with_format("arrow")
    num_tokens, in_text, with_specials = 0, np.zeros(len(specials), dtype=np.int64), 0
    for b in arrow.iter(batch_size=_BATCH * 10):
        num_tokens += pc.sum(pc.list_value_length(b.column("ids"))).as_py() or 0
        found = b.column("specials")
        with_specials += pc.sum(pc.greater(pc.list_value_length(found), 0)).as_py() or 0
        in_text += np.bincount(pc.list_flatten(found).to_numpy(), minlength=len(specials))
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
        if np.count_nonzero(flat == eos) != batch.num_rows:  # one appended to each document, no other
            raise ValueError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} encodes document text "
                             f"to its EOS id {eos}: documents could not be told apart in the packed rows")
        buf = np.concatenate([carry, flat])
        full = len(buf) // row_len
        writer.write(buf[: full * row_len].reshape(full, row_len))
        carry = buf[full * row_len:]

    occurrences = {t: int(n) for t, n in zip(specials, in_text) if n}
    meta = dict(want, dtype=dtype.name, row_len=row_len, eos_token_id=eos,
                tokenizer_path=str(getattr(tokenizer, "name_or_path", "")),
                num_documents=len(tokenized), num_tokens=num_tokens,
                dropped_tokens=num_tokens - n_rows * row_len,
                # special-token strings found in documents, kept (and encoded) as text
                special_tokens_in_text={"documents": with_specials, "occurrences": occurrences},
                splits={s: dict(info, tokens=info["rows"] * row_len) for s, info in writer.splits.items()})
    tmp = d / f".{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, d / META_NAME)  # last step: from here on the directory counts as complete
    found = (", ".join(f"{t!r} x{n}" for t, n in occurrences.items()) + f" in {with_specials} document(s)"
             if occurrences else "none")
    log.info("prepared %d documents, %d tokens -> %d train + %d val rows of %d tokens in %s; "
             "special-token strings kept as text: %s", len(tokenized), num_tokens, n_rows - n_val, n_val,
             row_len, d, found)
    return meta


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
        shards = [(f, entry) for f, entry in _check_files(self.path, meta, split) if entry["rows"] > 0]
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
