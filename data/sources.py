"""``data.sources`` and ``data.val_sources`` (validated in configs/sources.py): each source checked
before any process group, prepared to its own shard directory with the run's one tokenizer, and
opened as a ``MixtureRows`` (training) or ``ValidationSets`` (validation) of data/mixture.py.

The tokenizer is the run's usual one: ``data.tokenizer`` when given, else the byte-level BPE in
``data.cache_dir/tokenizer`` (the one checkpoints copy). For a mixture it is trained once on the
training sources' documents taken in turn (one from each source, then the next: every source shapes
the vocabulary), then every source, validation sources included, is tokenized with it. Without
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
from .corpus import JSON_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES, load_corpus, source_signature
from .mixture import MixtureRows, ValidationSets
from .shards import TokenShards
from .tokenizer import train_bpe_tokenizer

if TYPE_CHECKING:
    from configs.schema import Config, DataConfig

log = logging.getLogger(__name__)

Prepare = Callable[[Callable[[], Any] | None], Any]   # runs a build once (rank 0), gives every rank its result


def _where(key: str, i: int, src: dict[str, Any]) -> str:
    return f"{key}[{i}] ({src['name']!r}, path {src['path']!r})"


def check_sources(d: DataConfig) -> None:
    """Before any process group: every source exists and holds a document (reads each one only up to its
    first document). Raises ValueError/FileNotFoundError naming the source."""
    for key, sources in (("data.sources", d.sources), ("data.val_sources", d.val_sources)):
        for i, src in enumerate(sources or []):
            where = _where(key, i, src)
            try:
                if not has_document(src["path"], src["text_field"], src["max_files"]):
                    raise ValueError("holds no documents (every file is empty, binary, or has no non-empty "
                                     f"{src['text_field']!r} field)")
            except (ValueError, FileNotFoundError, OSError) as e:
                raise ValueError(f"{where}: {e}") from e


def has_document(path: str | None, text_field: str, max_files: int | None) -> bool:
    """Whether the corpus at ``path`` holds a non-empty document, read only as far as the first one."""
    if path is None:
        return True   # the default corpus: the interpreter's own sources
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no such file or folder {path}")
    if root.is_dir() and ((root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file()):
        return _saved_has_document(root, text_field)
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
        and p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES)
    return any(_file_has_document(f, text_field) for f in files[:max_files])


def _saved_has_document(root: Path, text_field: str) -> bool:
    """A save_to_disk directory (memory-mapped: opening it reads no rows), split as data/corpus.py picks it."""
    import datasets

    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train" if "train" in ds else sorted(ds)[0]]
    if text_field not in ds.column_names:
        raise ValueError(f"{root} has no column {text_field!r} (columns: {ds.column_names})")
    return any(isinstance(t, str) and t.strip() for batch in ds.select_columns([text_field]).iter(batch_size=1000)
               for t in batch[text_field])


def _file_has_document(f: Path, text_field: str) -> bool:
    suffix = f.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{f} has no column {text_field!r} (columns: {pf.schema_arrow.names})")
        return any(str(t or "").strip() for g in range(pf.num_row_groups)
                   for t in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist())
    if suffix in JSON_SUFFIXES:
        with open(f, "rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    return True   # not JSON lines (one JSON document): left to the loader, which names problems
                text = record.get(text_field) if isinstance(record, dict) else None
                if isinstance(text, str) and text.strip():
                    return True
        return False
    raw = f.read_bytes()   # a text file is one document
    if b"\x00" in raw:
        return False
    try:
        return bool(raw.decode("utf-8").strip())
    except UnicodeDecodeError:
        return False


def _interleave(corpora: list[Any]) -> Iterator[str]:
    """One document from each corpus in turn until all are used up."""
    iters = [(t for batch in c.iter(batch_size=1000) for t in batch["text"]) for c in corpora]
    while iters:
        for it in list(iters):
            text = next(it, None)
            if text is None:
                iters.remove(it)
            else:
                yield text


def mixture_tokenizer(d: DataConfig, vocab_size: int) -> str:
    """The run's tokenizer directory for a mixture: data.tokenizer, or a BPE trained once on every
    training source into data.cache_dir/tokenizer (retrained when a source or the vocabulary changes)."""
    if d.tokenizer is not None:
        return d.tokenizer
    tok_dir = run_tokenizer_path(None, d.cache_dir)   # where a run without data.tokenizer keeps its BPE
    key = {"sources": [[s["path"], s["text_field"], s["max_files"], source_signature(s["path"], s["text_field"],
                                                                                     s["max_files"])]
                       for s in d.sources], "vocab_size": vocab_size}
    key_file = tok_dir / "train_key.json"
    try:
        if json.loads(key_file.read_text(encoding="utf-8")) == key:
            return str(tok_dir)
    except (OSError, ValueError):
        pass
    log.info("training a %d-token BPE tokenizer on %d sources into %s", vocab_size, len(d.sources), tok_dir)
    corpora = [load_corpus(s["path"], s["text_field"], s["max_files"]) for s in d.sources]
    train_bpe_tokenizer(_interleave(corpora), vocab_size, str(tok_dir))
    key_file.write_text(json.dumps(key), encoding="utf-8")   # after the save: marks it done
    return str(tok_dir)


def _prepare_each(key: str, sources: list[dict[str, Any]], tokenizer: str, vocab_size: int, d: DataConfig,
                  val_fraction: float) -> dict[str, str]:
    """{name: shard directory} for each source, its errors naming it."""
    out = {}
    for i, src in enumerate(sources):
        try:
            out[src["name"]] = build_dataset_cache(src["path"], src["text_field"], tokenizer, vocab_size, d.seq_len,
                                                   d.cache_dir, val_fraction, src["max_files"])
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"{_where(key, i, src)}: {e}") from e
    return out


def prepare_sources(d: DataConfig, vocab_size: int) -> dict[str, dict[str, str]]:
    """On the preparing rank (the others call it again after, and find everything prepared):
    {"train": {name: dir}, "val": {name: dir}}. Without data.sources the training corpus (data.path)
    must already be prepared: its tokenizer tokenizes the validation sources."""
    tokenizer = mixture_tokenizer(d, vocab_size) if d.sources else str(run_tokenizer_path(d.tokenizer, d.cache_dir))
    train = _prepare_each("data.sources", d.sources or [], tokenizer, vocab_size, d, d.val_fraction)
    val = _prepare_each("data.val_sources", d.val_sources or [], tokenizer, vocab_size, d, 0.0)
    return {"train": train, "val": val}


def load_sources(cfg: Config, prepare: Prepare) -> tuple[Any, str, TokenShards | MixtureRows,
                                                         TokenShards | ValidationSets | None]:
    """train.py's load_data with data.sources or data.val_sources: -> (shard dir(s), tokenizer fingerprint,
    training rows, validation rows or None). ``prepare(build)`` runs ``build`` on the preparing rank
    and returns its result on every rank; ``prepare(None)`` prepares data.path as a run without sources."""
    d, t, vocab = cfg.data, cfg.train, cfg.model.vocab_size
    train_dir = prepare(None) if not d.sources else None          # data.path, as without sources
    dirs = prepare(lambda: prepare_sources(d, vocab))
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
