"""Corpus: a local path (or nothing) opened for streaming, one document at a time.

Accepted inputs (all local; nothing is ever fetched from a hub):
  * one text file, or a folder of text files (recursive; one document per file; binary / non-UTF-8
    files are skipped, counted and named in the log, and refused above data.max_skipped_files)
  * a .jsonl / .json / .parquet file, or a folder of them, with a string field `text_field`
  * a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
  * None: the embedded default corpus, this interpreter's standard-library .py sources

Documents are read by the streaming readers of data/readers.py and cut into bounded pieces
(data/pieces.py): memory does not grow with the corpus, nor (for text files) with the longest document.
Files are read in their sorted relative order. Nothing here unpickles: a file given by name whose
suffix marks serialized objects or tensors (.pkl, .pt, .npy, ...) is refused, and inside folders only
the suffixes above are read. Every reader error is a ValueError naming the file (and the row).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .pieces import split_text
from .readers import json_texts, parquet_texts, saved_texts, text_file_pieces

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)
# text files that are binary or not UTF-8, skipped with their names in the log; more is an error
DEFAULT_MAX_SKIPPED = 100


TEXT_SUFFIXES = {
    ".txt", ".text", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp",
    ".rs", ".go", ".java", ".js", ".ts", ".sh", ".tex", ".html", ".css", ".yaml", ".yml",
    ".toml", ".cfg", ".ini",
}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
# Serialized objects / tensors, never a corpus: refused by name so that a pickle is neither
# unpickled nor (protocol 0 is ASCII) trained on as if it were text.
SERIALIZED_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".joblib", ".bin",
                       ".safetensors", ".arrow"}
# Test suites roughly double the stdlib's size; leaving them out keeps the default
# corpus at ~12 MB of ordinary library code.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def stdlib_files(max_files: int | None = None) -> list[Path]:
    """The default corpus' files: stdlib .py sources in a deterministic (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files[:max_files] if max_files is not None else files


def _list_files(root: Path, max_files: int | None) -> list[Path]:
    if root.is_file():
        if root.suffix.lower() in SERIALIZED_SUFFIXES:
            raise ValueError(f"corpus file {root}: {root.suffix} files hold serialized objects or tensors, not "
                             "text, and are never loaded (unpickling can run code); give text files, "
                             ".jsonl/.json, .parquet or a save_to_disk directory")
        return [root]
    files = sorted((p for p in root.rglob("*") if p.is_file() and not _hidden(p, root)),
                   key=lambda p: p.relative_to(root).as_posix())
    usable = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES]
    return usable[:max_files] if max_files is not None else usable


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def _is_saved_dataset(root: Path) -> bool:
    # save_to_disk writes state.json + dataset_info.json (Dataset) or dataset_dict.json (DatasetDict).
    return root.is_dir() and (
        ((root / "state.json").is_file() and (root / "dataset_info.json").is_file())
        or (root / "dataset_dict.json").is_file()
    )


def _corpus_root(path: str) -> Path:
    if not str(path).strip():
        # Path("") is the current directory: never read it by accident
        raise ValueError(f"corpus path {path!r} is empty (use None for the default corpus)")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    return root


class Corpus:
    """A corpus path opened for streaming: its files are listed (and checked) at once, their documents
    read on each pass over `pieces()` or `documents()` (see data/readers.py: nothing is loaded whole,
    nothing is written). Counts of the last pass: `n_documents`, `n_empty` (blank or null texts, dropped),
    `skipped` (text files that are binary or not UTF-8, named in the log; more than `max_skipped_files`
    of them is an error). `bytes_read` grows during a pass, towards `total_bytes` (the progress line)."""

    def __init__(self, path: str | None, text_field: str = "text", max_files: int | None = None,
                 max_skipped_files: int | None = DEFAULT_MAX_SKIPPED):
        if max_files is not None and max_files < 1:
            raise ValueError(f"max_files must be >= 1 or None, got {max_files}")
        self.path, self.text_field, self.max_skipped_files = path, text_field, max_skipped_files
        if path is None:
            self.root, self.saved = Path(sysconfig.get_paths()["stdlib"]), False
            self.files = stdlib_files(max_files)
        else:
            self.root = _corpus_root(path)
            self.saved = _is_saved_dataset(self.root)
            self.files = sorted(p for p in self.root.rglob("*") if p.is_file()) if self.saved else \
                _list_files(self.root, max_files)
            if not self.files:
                raise ValueError(f"no usable files in corpus folder {path} (looked for "
                                 f"{sorted(TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES)})")
        self.total_bytes = sum(f.stat().st_size for f in self.files)
        self.n_documents = self.n_empty = self.bytes_read = 0
        self.skipped: list[Path] = []

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"<default corpus: {self.root}>"

    def texts_of(self, f: Path) -> Iterator[str | None]:
        """The texts of one (non-text) file: JSON lines or array, parquet."""
        suffix = f.suffix.lower()
        return json_texts(f, self.text_field) if suffix in JSON_SUFFIXES else parquet_texts(f, self.text_field)

    def file_documents(self, f: Path) -> Iterator[Iterator[str]]:
        """Each document of file `f` as an iterator of its pieces (a skipped file yields nothing)."""
        if self.path is None or f.suffix.lower() not in JSON_SUFFIXES | PARQUET_SUFFIXES:
            pieces = text_file_pieces(f)
            if pieces is None:
                self._skip(f)
            else:
                yield pieces
            return
        for text in self.texts_of(f):
            yield split_text(text) if text and text.strip() else iter(())

    def documents(self) -> Iterator[Iterator[str]]:
        """Every document as an iterator of its pieces, in corpus order (blank ones included, as empty
        iterators: `pieces()` counts and drops them)."""
        self.n_documents = self.n_empty = self.bytes_read = 0
        self.skipped = []
        if self.saved:
            for text in saved_texts(self.root, self.text_field):
                yield split_text(text) if text and text.strip() else iter(())
            self.bytes_read = self.total_bytes
            return
        for f in self.files:
            yield from self.file_documents(f)
            self.bytes_read += f.stat().st_size

    def pieces(self) -> Iterator[tuple[str, bool]]:
        """(piece, ends its document) for every non-blank document, in order; at the end of the pass the
        skipped files are named in the log, and a corpus without any document is an error."""
        for doc in self.documents():
            prev = None
            for piece in doc:
                if prev is not None:
                    yield prev, False
                prev = piece
            if prev is None:
                self.n_empty += 1
                continue
            self.n_documents += 1
            yield prev, True
        self.report()

    def report(self) -> None:
        if self.skipped:
            log.warning("skipped %d of %d files of %s (binary or not UTF-8): %s", len(self.skipped), len(self.files),
                        self, self._names(self.skipped))
        if self.n_documents == 0:
            raise ValueError(f"corpus {self} contains no non-empty documents" + (
                f" (no readable UTF-8 text: {len(self.skipped)} files were binary or undecodable)"
                if self.skipped else ""))

    def _names(self, files: list[Path], shown: int = 20) -> str:
        names = [f.relative_to(self.root).as_posix() if f != self.root else f.name for f in files[:shown]]
        return ", ".join(names) + (f", ... ({len(files)} in all)" if len(files) > shown else "")

    def _skip(self, f: Path) -> None:
        self.skipped.append(f)
        if self.max_skipped_files is not None and len(self.skipped) > self.max_skipped_files:
            raise ValueError(f"corpus {self}: {len(self.skipped)} files are binary or not UTF-8, more than "
                             f"data.max_skipped_files={self.max_skipped_files}: {self._names(self.skipped)}; "
                             "convert them to UTF-8, remove them, or raise data.max_skipped_files")


def load_corpus(path: str | None, text_field: str = "text", max_files: int | None = None,
                max_skipped_files: int | None = DEFAULT_MAX_SKIPPED) -> datasets.Dataset:
    """A small corpus in memory, as a Dataset with one "text" column (one row per non-blank document).
    Preparation streams through `Corpus` instead; this holds every document at once."""
    import datasets  # on demand: only preparation needs it

    corpus = Corpus(path, text_field, max_files, max_skipped_files)
    texts, parts = [], []
    for piece, last in corpus.pieces():
        parts.append(piece)
        if last:
            texts.append("".join(parts))
            parts = []
    return datasets.Dataset.from_dict({"text": texts})


def source_signature(path: str | None, text_field: str = "text", max_files: int | None = None) -> str:
    """Cheap sha256 identity of a corpus: file names, sizes and mtimes (no content read).

    Used as a cache key, so edits to the corpus invalidate prepared shards.
    """
    h = hashlib.sha256()
    h.update(repr((path, text_field, max_files)).encode())
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = stdlib_files(max_files)
    else:
        root = _corpus_root(path).resolve()
        if _is_saved_dataset(root):
            files = sorted(p for p in root.rglob("*") if p.is_file())
        else:
            files = _list_files(root, max_files)
    for f in files:
        st = f.stat()
        rel = f.relative_to(root).as_posix() if f != root else f.name
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
