"""One call from a corpus path to ready-to-train shards, cached on disk.

Layout under `cache_dir` (everything preparation writes goes here; nothing under ~/.cache):
    .prepare.lock              held by the one process preparing into this cache (data/lock.py)
    signatures/                remembered file hashes of the corpora (data/signature.py)
    tokenizer/                 BPE trained on a sample of the corpus (only when no tokenizer is given)
    tokenizer/train_key.json   what it was trained on; a mismatch triggers retraining
    tokenizer/sample.json      the sample it was trained on (bytes, pieces; recorded in meta.json too)
    shards-<key>/              token shards (data/shards.py), one folder per configuration, with a copy of
                               their tokenizer in shards-<key>/tokenizer (what data.prepared reads)

The key is the corpus' content (data/signature.py), not its path or modification times: the same
corpus moved, copied or touched is found again. A repeated call hashes only files whose size, mtime or
inode changed and loads the tokenizer: no tokenizer training, no tokenization.

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

from .corpus import DEFAULT_MAX_SKIPPED, Corpus
from .lock import PrepareLock
from .prepare import cached_shards, default_num_proc, prepare_shards
from .prepared import TOKENIZER_DIR
from .sample import sample_pieces
from .signature import content_signature
from .tokenizer import load_tokenizer, save_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

log = logging.getLogger(__name__)

# Bytes of text the BPE is trained on (data.tokenizer_sample_bytes). 256 MB: BPE merges are decided by
# the frequent pairs, which a few hundred MB of text already ranks (nanochat trains on 2 B characters
# for a 65k vocabulary, GPT-2's 40 GB corpus was deduplicated to far less for its BPE); training reads
# the sample at ~2 MB/s on one core of this machine (about 2 minutes) and its word counts stay within
# the memory bound of preparation (docs/data.md), where training on a whole 1 GB corpus took 489 s.
DEFAULT_SAMPLE_BYTES = 256 * 10**6


SMALL_CORPUS_BYTES = 16 * 2 ** 20   # tokenized in seconds in one process, on the tokenizers library's threads


def build_dataset_cache(path: str | None, text_field: str, tokenizer_path: str | None,
                        vocab_size: int | None, seq_len: int, cache_dir: str,
                        val_fraction: float = 0.01, max_files: int | None = None,
                        num_proc: int | None = None, tokenizer_sample_bytes: int = DEFAULT_SAMPLE_BYTES,
                        max_skipped_files: int | None = DEFAULT_MAX_SKIPPED, progress: bool = True,
                        wait_s: float | None = None) -> str:
    """Open the corpus -> load or train the tokenizer -> prepare shards; returns the shard directory.

    `vocab_size` is the BPE size to train when `tokenizer_path` is None; with a given
    tokenizer it is the model's vocabulary, which must hold every token id (or None).
    `num_proc`: tokenizer processes (None: the cores available, or one for a corpus under SMALL_CORPUS_BYTES,
    which worker processes would not repay: their start can cost seconds). One process at a time prepares into
    `cache_dir` (others wait up to `wait_s` seconds, None: without limit, then reuse its result).
    """
    cache = Path(cache_dir).expanduser()
    corpus = Corpus(path, text_field, max_files, max_skipped_files)   # lists the files: errors name the path
    num_proc = num_proc or (1 if corpus.total_bytes < SMALL_CORPUS_BYTES else default_num_proc())
    with PrepareLock(cache, wait_s):
        sig = content_signature(corpus, cache / "signatures", threads=num_proc)
        # the content decides, never the path: a moved or touched corpus keeps its shards
        source = f"{'saved' if corpus.saved else 'files'}|field={text_field}|max_files={max_files}|content-sha256:{sig}"
        tok, sample = _tokenizer(corpus, source, tokenizer_path, vocab_size, cache, tokenizer_sample_bytes)
        key = {"source": source, "fingerprint": tokenizer_fingerprint(tok), "seq_len": seq_len,
               "val_fraction": val_fraction}
        out = cache / ("shards-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])
        if cached_shards(str(out), tok, seq_len, source, val_fraction) is not None:
            log.info("reusing token shards in %s", out)
        else:
            log.info("preparing token shards of %s (%.1f MB) in %s with %d process(es)", corpus,
                     corpus.total_bytes / 1e6, out, num_proc)
            prepare_shards(corpus, tok, str(out), seq_len, val_fraction=val_fraction, num_proc=num_proc,
                           source=source, progress=progress,
                           extra_meta={"corpus_path": str(corpus), "tokenizer_sample": sample})
        if not (out / TOKENIZER_DIR).is_dir():   # the shards ship their tokenizer: data.prepared=out needs no other
            save_tokenizer(tok, out / TOKENIZER_DIR)
    return str(out)


def _tokenizer(corpus: Corpus, source: str, tokenizer_path: str | None, vocab_size: int | None, cache: Path,
               sample_bytes: int) -> tuple[object, dict | None]:
    """-> (the tokenizer, what it was trained on (None for a given one)): loaded, or trained on a sample."""
    if tokenizer_path is not None:
        tok = load_tokenizer(tokenizer_path)
        if vocab_size is not None and len(tok) > vocab_size:
            raise ValueError(f"tokenizer at {tokenizer_path} has {len(tok)} tokens, more than "
                             f"vocab_size={vocab_size}")
        return tok, None
    if vocab_size is None:
        raise ValueError("vocab_size is required to train a tokenizer (tokenizer_path is None)")
    tok_dir = cache / "tokenizer"
    train_key = {"source": source, "vocab_size": vocab_size, "sample_bytes": sample_bytes}
    key_file = tok_dir / "train_key.json"
    if not (key_file.is_file() and _read_json(key_file) == train_key):
        log.info("training a %d-token BPE tokenizer on a %.0f MB sample of %s (%.1f MB) into %s", vocab_size,
                 min(sample_bytes, corpus.total_bytes) / 1e6, corpus, corpus.total_bytes / 1e6, tok_dir)
        used = {"chars": 0, "pieces": 0}

        def counted() -> Iterator[str]:
            for piece in sample_pieces(corpus, sample_bytes):
                used["chars"] += len(piece)
                used["pieces"] += 1
                yield piece

        train_bpe_tokenizer(counted(), vocab_size, str(tok_dir))
        sample = {"requested_bytes": sample_bytes, "corpus_bytes": corpus.total_bytes, **used,
                  "whole_corpus": corpus.total_bytes <= sample_bytes}
        (tok_dir / "sample.json").write_text(json.dumps(sample), encoding="utf-8")
        key_file.write_text(json.dumps(train_key), encoding="utf-8")  # after the save: marks it done
    return load_tokenizer(str(tok_dir)), _read_json(tok_dir / "sample.json")


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
