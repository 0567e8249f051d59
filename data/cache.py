"""One call from a corpus path to ready-to-train shards, cached on disk.

Layout under `cache_dir`:
    tokenizer/                 BPE trained on the corpus (only when no tokenizer is given)
    tokenizer/train_key.json   what it was trained on; a mismatch triggers retraining
    shards-<key>/              token shards (see data.shards), one folder per configuration

A repeated call with the same arguments (and unchanged corpus files) only stats the corpus
files and loads the tokenizer: no corpus loading, tokenizer training or tokenization.

The run's tokenizer is `tokenizer_path` when given, else the BPE in `cache_dir/tokenizer`
(`run_tokenizer_path`): the one checkpoints copy and exports ship. Its fingerprint, computed from
those files and not read from a shard directory, is what a run checks its shards against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from .corpus import load_corpus, source_signature
from .shards import cached_shards, prepare_shards
from .tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

log = logging.getLogger(__name__)


def build_dataset_cache(path: str | None, text_field: str, tokenizer_path: str | None,
                        vocab_size: int | None, seq_len: int, cache_dir: str,
                        val_fraction: float = 0.01, max_files: int | None = None,
                        num_proc: int = 1) -> str:
    """Load corpus -> load or train tokenizer -> prepare shards; returns the shard directory.

    `vocab_size` is the BPE size to train when `tokenizer_path` is None; with a given
    tokenizer it is the model's vocabulary, which must hold every token id (or None).
    """
    cache = Path(cache_dir).expanduser()
    sig = source_signature(path, text_field, max_files)
    # Human-readable prefix for meta.json; the signature covers file names, sizes and mtimes.
    source = f"{path if path is not None else '<stdlib>'}|field={text_field}|max_files={max_files}|{sig}"
    corpus = None

    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        if vocab_size is not None and len(tok) > vocab_size:
            raise ValueError(f"tokenizer at {tokenizer_path} has {len(tok)} tokens, more than "
                             f"vocab_size={vocab_size}")
    else:
        if vocab_size is None:
            raise ValueError("vocab_size is required to train a tokenizer (tokenizer_path is None)")
        tok_dir = cache / "tokenizer"
        train_key = {"source": source, "vocab_size": vocab_size}
        key_file = tok_dir / "train_key.json"
        if not (key_file.is_file() and _read_json(key_file) == train_key):
            log.info("training a %d-token BPE tokenizer into %s", vocab_size, tok_dir)
            corpus = load_corpus(path, text_field, max_files)
            texts = (t for batch in corpus.iter(batch_size=1000) for t in batch["text"])
            train_bpe_tokenizer(texts, vocab_size, str(tok_dir))
            key_file.write_text(json.dumps(train_key), encoding="utf-8")  # after the save: marks it done
        tok = load_tokenizer(str(tok_dir))

    key = {"source": source, "fingerprint": tokenizer_fingerprint(tok), "seq_len": seq_len,
           "val_fraction": val_fraction}
    out = cache / ("shards-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
    if cached_shards(str(out), tok, seq_len, source, val_fraction) is not None:
        log.info("reusing token shards in %s", out)
        return str(out)
    if corpus is None:
        corpus = load_corpus(path, text_field, max_files)
    prepare_shards(corpus, tok, str(out), seq_len, val_fraction=val_fraction, num_proc=num_proc,
                   source=source)
    return str(out)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_tokenizer_path(tokenizer_path: str | None, cache_dir: str) -> Path:
    """Where a run's tokenizer lives: `tokenizer_path` (data.tokenizer), else the BPE that
    build_dataset_cache trains into `cache_dir`/tokenizer."""
    return Path(tokenizer_path if tokenizer_path is not None else Path(cache_dir) / "tokenizer").expanduser()


def run_tokenizer_fingerprint(tokenizer_path: str | None, cache_dir: str) -> str:
    """Fingerprint of the tokenizer a run loads (see run_tokenizer_path), from its own files: the
    independent value to check a shard directory's recorded fingerprint against."""
    return tokenizer_fingerprint(load_tokenizer(str(run_tokenizer_path(tokenizer_path, cache_dir))))


@contextlib.contextmanager
def echo_log(enabled: bool = True) -> Iterator[None]:
    """While inside, this package's INFO lines (training a tokenizer, reusing or preparing shards, the
    special-token strings found in documents) are printed to stdout as ``data: ...``."""
    logger = logging.getLogger(__package__)
    if not enabled:
        yield
        return
    handler, level = logging.StreamHandler(sys.stdout), logger.level
    handler.setFormatter(logging.Formatter("data: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.flush()
