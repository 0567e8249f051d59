"""``data.sources`` and ``data.val_sources`` (validated in configs/sources.py): each source checked
before any process group, prepared to its own shard directory with the run's one tokenizer, and
opened as a ``MixtureRows`` (training) or ``ValidationSets`` (validation) of data/mixture.py.

The tokenizer is the run's usual one: ``data.tokenizer`` when given, else the byte-level BPE in
``data.cache_dir/tokenizer`` (the one checkpoints copy). For a mixture it is trained once on a sample
of the training sources (an equal part of data.tokenizer_sample_bytes from each, taken in turn: every
source shapes the vocabulary), then every source, validation sources included, is tokenized with it
into its own shard directory (data/cache.py: keyed by content, one preparer at a time). Without
``data.sources`` the training corpus is ``data.path``, prepared as before, and its tokenizer
tokenizes the validation sources.

A validation source is prepared whole (val_fraction 0: all of its rows in the shard directory's
"train" split) and read as validation rows. With ``data.sources`` and no ``data.val_sources`` each
source's own val_fraction split is its validation set, weighted as in the mixture.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import build_dataset_cache, run_tokenizer_fingerprint, run_tokenizer_path
from .corpus import Corpus
from .lock import PrepareLock
from .mixture import MixtureRows, ValidationSets
from .prepare import default_num_proc
from .sample import sample_pieces
from .shards import TokenShards
from .signature import content_signature
from .tokenizer import train_bpe_tokenizer

if TYPE_CHECKING:
    from configs.schema import Config, DataConfig

log = logging.getLogger(__name__)

Prepare = Callable[[Callable[[], Any]], Any]   # runs a build on the preparing rank, gives every rank its result


def _where(key: str, i: int, src: dict[str, Any]) -> str:
    return f"{key}[{i}] ({src['name']!r}, path {src['path']!r})"


def _opts(d: DataConfig) -> dict[str, Any]:
    """The preparation settings every source shares (the data.* keys of data/cache.py)."""
    return {"num_proc": d.num_proc, "max_skipped_files": d.max_skipped_files, "wait_s": d.prepare_wait_s}


def check_sources(d: DataConfig) -> None:
    """Before any process group: every source exists and holds a document, read only as far as its first
    document (data/corpus.py's reading rules). Raises ValueError naming the source."""
    for key, sources in (("data.sources", d.sources), ("data.val_sources", d.val_sources)):
        for i, src in enumerate(sources or []):
            try:
                corpus = Corpus(src["path"], src["text_field"], src["max_files"], d.max_skipped_files)
                next(corpus.pieces())   # a corpus with no document raises when its pieces run out
            except (ValueError, FileNotFoundError, OSError) as e:
                raise ValueError(f"{_where(key, i, src)}: {e}") from e


def _interleave(streams: list[Iterator[str]]) -> Iterator[str]:
    """One item from each stream in turn until all are used up."""
    while streams:
        for it in list(streams):
            item = next(it, None)
            if item is None:
                streams.remove(it)
            else:
                yield item


def mixture_tokenizer(d: DataConfig, vocab_size: int) -> str:
    """The run's tokenizer directory for a mixture: data.tokenizer, or a BPE trained once into
    data.cache_dir/tokenizer on data.tokenizer_sample_bytes of text, an equal part from each training
    source (data/sample.py spreads each part over its source), taken in turn. The key is the sources'
    content, not their weights: runs that only change the weights share the tokenizer and the shards, so
    their losses compare. Retrained when a source's content or the vocabulary changes."""
    if d.tokenizer is not None:
        return d.tokenizer
    cache, tok_dir = Path(d.cache_dir).expanduser(), run_tokenizer_path(None, d.cache_dir)
    corpora = [Corpus(s["path"], s["text_field"], s["max_files"], d.max_skipped_files) for s in d.sources]
    part = max(1, d.tokenizer_sample_bytes // len(corpora))
    with PrepareLock(cache, d.prepare_wait_s):   # one writer of data.cache_dir/tokenizer
        sigs = [content_signature(c, cache / "signatures", threads=d.num_proc or default_num_proc()) for c in corpora]
        key = {"sources": [[s["text_field"], s["max_files"], sig] for s, sig in zip(d.sources, sigs)],
               "vocab_size": vocab_size, "sample_bytes": d.tokenizer_sample_bytes}
        key_file = tok_dir / "train_key.json"
        try:
            if json.loads(key_file.read_text(encoding="utf-8")) == key:
                return str(tok_dir)
        except (OSError, ValueError):
            pass
        log.info("training a %d-token BPE tokenizer on %d sources (up to %.0f MB of each) into %s", vocab_size,
                 len(corpora), part / 1e6, tok_dir)
        train_bpe_tokenizer(_interleave([sample_pieces(c, part) for c in corpora]), vocab_size, str(tok_dir))
        sample = {s["name"]: {"requested_bytes": part, "corpus_bytes": c.total_bytes}
                  for s, c in zip(d.sources, corpora)}
        (tok_dir / "sample.json").write_text(json.dumps({"sources": sample}), encoding="utf-8")
        key_file.write_text(json.dumps(key), encoding="utf-8")   # after the save: marks it done
    return str(tok_dir)


def _prepare_each(key: str, sources: list[dict[str, Any]], tokenizer: str, vocab_size: int, d: DataConfig,
                  val_fraction: float) -> dict[str, str]:
    """{name: shard directory} for each source, its errors naming it."""
    out = {}
    for i, src in enumerate(sources):
        try:
            out[src["name"]] = build_dataset_cache(src["path"], src["text_field"], tokenizer, vocab_size, d.seq_len,
                                                   d.cache_dir, val_fraction, src["max_files"], **_opts(d))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{_where(key, i, src)}: {e}") from e
    return out


def prepare_sources(d: DataConfig, vocab_size: int) -> dict[str, Any]:
    """On the preparing rank (train.py's prepare_data; scripts/prepare_data.py): {"train": {name: dir},
    "val": {name: dir}}, and without data.sources "path": data.path's shard directory, prepared first (as a
    run without sources prepares it): its tokenizer tokenizes the validation sources."""
    out: dict[str, Any] = {}
    if d.sources:
        tokenizer = mixture_tokenizer(d, vocab_size)
    else:
        out["path"] = build_dataset_cache(d.path, d.text_field, d.tokenizer, vocab_size, d.seq_len, d.cache_dir,
                                          d.val_fraction, d.max_files, tokenizer_sample_bytes=d.tokenizer_sample_bytes,
                                          **_opts(d))
        tokenizer = str(run_tokenizer_path(d.tokenizer, d.cache_dir))
    out["train"] = _prepare_each("data.sources", d.sources or [], tokenizer, vocab_size, d, d.val_fraction)
    out["val"] = _prepare_each("data.val_sources", d.val_sources or [], tokenizer, vocab_size, d, 0.0)
    return out


def load_sources(cfg: Config, prepare: Prepare) -> tuple[Any, str, TokenShards | MixtureRows,
                                                         TokenShards | ValidationSets | None]:
    """train.py's load_data with data.sources or data.val_sources: -> (shard dir(s), tokenizer fingerprint,
    training rows, validation rows or None). ``prepare(build)`` runs ``build`` on the preparing rank
    and returns its result (JSON) on every rank."""
    d, t, vocab = cfg.data, cfg.train, cfg.model.vocab_size
    dirs = prepare(lambda: prepare_sources(d, vocab))
    train_dir = dirs.get("path")   # without data.sources: data.path's shards, as a run without sources
    fingerprint = run_tokenizer_fingerprint(d.tokenizer, d.cache_dir)
    open_rows = lambda path, split: TokenShards(path, split, expected_vocab_size=vocab,  # noqa: E731
                                                expected_fingerprint=fingerprint)
    if d.sources:
        train = MixtureRows([s["name"] for s in d.sources], [open_rows(dirs["train"][s["name"]], "train")
                                                            for s in d.sources], [s["weight"] for s in d.sources])
        shard_dir: Any = dirs
    else:
        train, shard_dir = open_rows(train_dir, "train"), train_dir
    val = None
    if t.eval_batches > 0 and d.val_sources:
        val = ValidationSets([s["name"] for s in d.val_sources],
                             [open_rows(dirs["val"][s["name"]], "train") for s in d.val_sources],
                             [s["weight"] for s in d.val_sources])
    elif t.eval_batches > 0 and d.val_fraction > 0:
        val = (ValidationSets(train.names, [open_rows(dirs["train"][n], "val") for n in train.names], train.weights)
               if d.sources else open_rows(train_dir, "val"))
    return shard_dir, fingerprint, train, val
