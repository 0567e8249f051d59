"""`data.prepared=DIR`: a shard directory made once, offline (scripts/prepare_data.py), read as it is.

Every rank of every node opens DIR directly: no corpus is read, no tokenizer trained, nothing written,
no rank waits for another. Before any row is read, DIR's meta.json is checked against the run: its
seq_len, its vocabulary (the tokenizer's size must fit model.vocab_size) and its tokenizer fingerprint
against the run's tokenizer (data.tokenizer when given, else the copy DIR/tokenizer that preparation
ships with the shards). A mismatch is one line naming the key and both values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .shards import META_NAME, read_meta
from .tokenizer import load_tokenizer, tokenizer_fingerprint

TOKENIZER_DIR = "tokenizer"   # the tokenizer the shards were made with, copied next to them


def prepared_tokenizer(prepared: str, tokenizer: str | None) -> Path:
    """The run's tokenizer with data.prepared: data.tokenizer when given, else DIR/tokenizer."""
    if tokenizer is not None:
        return Path(tokenizer).expanduser()
    path = Path(prepared).expanduser() / TOKENIZER_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"data.prepared={prepared}: holds no {TOKENIZER_DIR}/ (the tokenizer its shards "
                                "were made with); prepare it with scripts/prepare_data.py or set data.tokenizer")
    return path


def check_prepared(prepared: str, seq_len: int, vocab_size: int, tokenizer: str | None) -> tuple[dict[str, Any], str]:
    """-> (DIR's metadata, the run's tokenizer fingerprint) after checking DIR against the run's config."""
    meta = read_meta(Path(prepared).expanduser())
    where = f"data.prepared={prepared}"
    if meta["seq_len"] != seq_len:
        raise ValueError(f"{where}: seq_len is {meta['seq_len']} in its {META_NAME}, data.seq_len={seq_len} in this "
                         "run's config")
    if meta["vocab_size"] > vocab_size:
        raise ValueError(f"{where}: vocab_size is {meta['vocab_size']} in its {META_NAME} (its tokenizer's), "
                         f"more than model.vocab_size={vocab_size} in this run's config")
    tok_path = prepared_tokenizer(prepared, tokenizer)
    fingerprint = tokenizer_fingerprint(load_tokenizer(str(tok_path)))
    if meta["tokenizer_fingerprint"] != fingerprint:
        name = f"data.tokenizer={tokenizer}" if tokenizer is not None else f"its {TOKENIZER_DIR}/ copy"
        raise ValueError(f"{where}: tokenizer_fingerprint is {meta['tokenizer_fingerprint'][:16]}... in its "
                         f"{META_NAME}, {fingerprint[:16]}... for {name}")
    return meta, fingerprint
