"""Tokenize a corpus and pack it into token shards (the format of data/shards.py), streaming, resumable.

One pass: documents are read as bounded pieces (data/corpus.py), encoded in worker processes
(data/encode.py) and packed into rows of seq_len + 1 tokens that go straight into shard files of
`rows_per_shard` rows (data/pack.py). Memory holds a few batches of text and ids, never the corpus.

Resumable: each finished shard is renamed in and recorded in `progress.json` with the point of the
document stream it ends at; a preparation interrupted (SIGTERM, a crash, a lost node) and started again
with the same key keeps those shards and continues from there. When the stream ends, the last
`val_fraction` of the rows become the validation shards (copied out of the tail of the train shards,
which are then cut) and meta.json is written: from then on the directory counts as complete.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .encode import Encoder, encode_stream
from .pack import RowWriter, clear, finalize, load_progress, save_progress
from .pieces import split_text
from .progress import Progress
from .shards import FORMAT, FORMAT_VERSION, check_files, read_meta, shard_dtype
from .tokenizer import tokenizer_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_ROWS_PER_SHARD = 16384  # 32 MiB shards at seq_len 1024 / uint16


def default_num_proc() -> int:
    """The cores this process may run on (its affinity mask, as a scheduler's cgroup sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not Linux
        return max(1, os.cpu_count() or 1)


def build_key(tokenizer: PreTrainedTokenizerBase, seq_len: int, val_fraction: float, rows_per_shard: int,
              source: str) -> dict[str, Any]:
    """Everything a build depends on; all of it must match for a cached build to be reused."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "seq_len": seq_len,
            "vocab_size": len(tokenizer), "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "val_fraction": val_fraction, "rows_per_shard": rows_per_shard, "source": source}


def cached_shards(out_dir: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, source: str,
                  val_fraction: float = 0.01, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD) -> dict[str, Any] | None:
    """Metadata of a complete, matching build in `out_dir`, or None: lets callers skip reading the corpus."""
    return cache_hit(Path(out_dir), build_key(tokenizer, seq_len, val_fraction, rows_per_shard, source))


def cache_hit(d: Path, want: dict[str, Any]) -> dict[str, Any] | None:
    """The existing metadata if `d` is complete and was built with exactly `want`; else None."""
    try:
        meta = read_meta(d)
        for split in meta["splits"]:
            check_files(d, meta, split)
    except (FileNotFoundError, ValueError):
        return None
    if all(meta.get(k) == v for k, v in want.items()):
        return meta
    log.info("shard cache in %s was built with other parameters; rebuilding", d)
    return None


def _texts(documents: Any) -> Iterator[str]:
    """The document texts of a Dataset (column "text") or of an iterable of strings."""
    if hasattr(documents, "select_columns") and hasattr(documents, "with_format"):
        for batch in documents.select_columns(["text"]).with_format("arrow").iter(batch_size=1000):
            yield from batch.column("text").to_pylist()
    else:
        yield from documents


def text_sha256(documents: Any) -> str:
    """sha256 of all documents' text: the cache key when the caller gives no `source`."""
    import hashlib

    h = hashlib.sha256()
    for t in _texts(documents):
        h.update((t or "").encode("utf-8"))
        h.update(b"\xff")  # separator: never appears in UTF-8
    return h.hexdigest()


class _Texts:
    """A Dataset or list of strings as a piece source, like a Corpus (no files: progress counts documents)."""

    def __init__(self, documents: Any):
        self.documents, self.n_documents = documents, 0
        self.total_bytes = len(documents) if hasattr(documents, "__len__") else 0
        self.bytes_read = 0

    def pieces(self) -> Iterator[tuple[str, bool]]:
        self.n_documents = self.bytes_read = 0
        for text in _texts(self.documents):
            self.bytes_read += 1
            if not text or not text.strip():   # empty documents would only add stray EOS tokens
                continue
            *head, last = split_text(text)
            for piece in head:
                yield piece, False
            self.n_documents += 1
            yield last, True


def prepare_shards(documents: Any, tokenizer: PreTrainedTokenizerBase, out_dir: str, seq_len: int,
                   val_fraction: float = 0.01, rows_per_shard: int = DEFAULT_ROWS_PER_SHARD, num_proc: int = 1,
                   source: str | None = None, progress: bool = True,
                   extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenize `documents` (a data.corpus.Corpus, a Dataset with a "text" column, or strings), pack rows of
    seq_len + 1 tokens into shards in `out_dir`; returns the metadata dict.

    A complete build in `out_dir` with the same tokenizer fingerprint, seq_len, val_fraction, rows_per_shard
    and source (`source`, or a hash of the text when None) is reused untouched; an interrupted one with the
    same key is resumed; anything else there is replaced. `extra_meta` is added to meta.json."""
    if seq_len < 1 or rows_per_shard < 1:
        raise ValueError(f"seq_len and rows_per_shard must be >= 1, got {seq_len}, {rows_per_shard}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token; one is needed to separate documents")
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    if source is None:
        if not hasattr(documents, "pieces"):
            documents = documents if hasattr(documents, "__len__") else list(documents)
        source = "text-sha256:" + text_sha256(documents)
    want = build_key(tokenizer, seq_len, val_fraction, rows_per_shard, source)
    hit = cache_hit(d, want)
    if hit is not None:
        return hit
    state = load_progress(d, want)
    if state is None:
        clear(d)
        state = {"key": want, "shards": [], "stream": None}
    else:
        log.info("resuming the preparation in %s: %d finished shard(s) kept", d, len(state["shards"]))
    source_docs = documents if hasattr(documents, "pieces") else _Texts(documents)
    if state.get("total") is None:
        _stream(source_docs, Encoder(tokenizer), d, state, seq_len + 1, shard_dtype(len(tokenizer)),
                rows_per_shard, max(1, num_proc), progress)
    base = dict(want, dtype=shard_dtype(len(tokenizer)).name, eos_token_id=tokenizer.eos_token_id,
                tokenizer_path=str(getattr(tokenizer, "name_or_path", "")), **(extra_meta or {}))
    meta = finalize(d, state, val_fraction, seq_len, base)
    _log_done(d, meta)
    return meta


def _stream(corpus: Any, encoder: Encoder, d: Path, state: dict[str, Any], row_len: int, dtype: np.dtype,
            rows_per_shard: int, num_proc: int, progress: bool) -> None:
    """Encode and pack the whole stream (after what `state` says is done) into train shards; records the
    totals in `state` (and progress.json) at the end."""
    state["specials"] = encoder.specials
    start = state["stream"] or {"pieces": 0, "tokens": 0, "documents": 0, "in_special_doc": False,
                                "special_docs": 0, "special_counts": [0] * len(encoder.specials)}
    counters = dict(start, special_counts=np.array(start["special_counts"], dtype=np.int64))
    # tokens of the stream before `start` that are already in finished shards: dropped when met again
    discard = sum(s["rows"] for s in state["shards"]) * row_len - start["tokens"] if state["shards"] else 0

    def snapshot() -> dict[str, Any]:
        return dict(counters, special_counts=counters["special_counts"].tolist())

    writer = RowWriter(d, dtype, rows_per_shard, row_len, state["shards"],
                       on_shard=lambda shards, at: save_progress(d, dict(state, shards=shards, stream=at)))
    bar = Progress(f"tokenizing {d.name}", corpus.total_bytes, enabled=progress)
    pieces = _skip(corpus.pieces(), start["pieces"])
    try:
        for enc in encode_stream(pieces, encoder, num_proc):
            writer.batch_start = snapshot()
            ids = enc.ids[discard:] if discard else enc.ids
            discard = max(0, discard - len(enc.ids))
            writer.write(ids)
            _count(counters, enc)
            bar.update(corpus.bytes_read, counters["tokens"])
    finally:
        bar.close()
    writer.close()
    state.update(shards=writer.shards, stream=snapshot(), total=writer.total_rows,
                 documents=counters["documents"], tokens=counters["tokens"])
    save_progress(d, state)


def _skip(pieces: Iterator[tuple[str, bool]], n: int) -> Iterator[tuple[str, bool]]:
    """`pieces` after its first n (read again, not encoded: a resumed preparation)."""
    for i, item in enumerate(pieces):
        if i >= n:
            yield item


def _count(counters: dict[str, Any], enc: Any) -> None:
    """Add a batch to the stream's counters; a document counts once if any of its pieces holds a special string."""
    counters["pieces"] += enc.pieces
    counters["tokens"] += len(enc.ids)
    counters["documents"] += enc.ends
    counters["special_counts"] += enc.special_counts
    # walk the pieces' flags with the document ends: the flag of a document spans its pieces (and batches)
    ends = enc.end_flags
    for found, end in zip(enc.special_pieces, ends):
        counters["in_special_doc"] = counters["in_special_doc"] or bool(found)
        if end:
            counters["special_docs"] += counters["in_special_doc"]
            counters["in_special_doc"] = False


def _log_done(d: Path, meta: dict[str, Any]) -> None:
    found = meta["special_tokens_in_text"]
    occ = found["occurrences"]
    text = (", ".join(f"{t!r} x{n}" for t, n in occ.items()) + f" in {found['documents']} document(s)"
            if occ else "none")
    log.info("prepared %d documents, %d tokens -> %d train + %d val rows of %d tokens in %s; "
             "special-token strings kept as text: %s", meta["num_documents"], meta["num_tokens"],
             meta["splits"]["train"]["rows"], meta["splits"].get("val", {}).get("rows", 0), meta["row_len"], d, text)


