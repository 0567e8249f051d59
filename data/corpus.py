"""Corpus readers: turn a local path (or nothing) into a `datasets.Dataset` with one "text" column.

Accepted inputs (all local; nothing is ever fetched from a hub):
  * one text file, or a folder of text files (recursive; one document per file;
    binary / non-UTF-8 files are skipped)
  * a .jsonl / .json / .parquet file, or a folder of them, with a string field `text_field`
  * a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
  * None: the embedded default corpus, this interpreter's standard-library .py sources

Nothing here unpickles: a file given by name whose suffix marks serialized objects or tensors
(.pkl, .pt, .npy, ...) is refused, and inside folders only the suffixes above are read.
Every loader error is re-raised as a ValueError naming the files.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import datasets


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


def _read_text(path: Path) -> str | None:
    """File content, or None for binary / undecodable files (skipped, not fatal)."""
    raw = path.read_bytes()
    if b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _text_dataset(files: list[Path]) -> datasets.Dataset:
    import datasets  # on demand: only preparation needs it

    texts = [t for t in map(_read_text, files) if t and t.strip()]
    return datasets.Dataset.from_dict({"text": texts})


def _pick_text_column(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    import datasets  # on demand: only preparation needs it

    if text_field not in ds.column_names:
        raise ValueError(f"text field {text_field!r} not found in {where}; "
                         f"available columns: {ds.column_names}")
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"text field {text_field!r} in {where} has type {feature}, expected strings")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    # Null / blank documents would only add stray EOS tokens.
    return ds.filter(lambda t: [bool(x and x.strip()) for x in t], input_columns="text",
                     batched=True, desc="dropping empty documents")


def _corpus_root(path: str) -> Path:
    if not str(path).strip():
        # Path("") is the current directory: never read it by accident
        raise ValueError(f"corpus path {path!r} is empty (use None for the default corpus)")
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"corpus path does not exist: {path}")
    return root


def _cause(e: BaseException) -> str:
    """'Type: message' of an exception and up to two of its causes (loaders wrap the useful one)."""
    parts, seen = [], set()
    while e is not None and len(parts) < 3:
        text = f"{type(e).__name__}: {e}".strip()
        if text not in seen:
            parts.append(text)
            seen.add(text)
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


def load_corpus(path: str | None, text_field: str = "text",
                max_files: int | None = None) -> datasets.Dataset:
    """Load a local corpus as a Dataset with a single "text" column (one row per document)."""
    import datasets  # on demand: only preparation needs it

    if max_files is not None and max_files < 1:
        raise ValueError(f"max_files must be >= 1 or None, got {max_files}")
    if path is None:
        files = stdlib_files(max_files)
        ds = _text_dataset(files)
        if len(ds) == 0:
            raise ValueError(f"default corpus: no readable .py files under {sysconfig.get_paths()['stdlib']}")
        return ds

    root = _corpus_root(path)
    if _is_saved_dataset(root):
        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as e:  # pyarrow/datasets raise many types; name the directory
            raise ValueError(f"cannot read the saved dataset {root}: {_cause(e)}") from e
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else sorted(loaded)[0]
            loaded = loaded[split]
        ds = _pick_text_column(loaded, text_field, str(root))
    else:
        files = _list_files(root, max_files)
        if not files:
            raise ValueError(f"no usable files in corpus folder {path} (looked for "
                             f"{sorted(TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES)})")
        parts = _load_files(files, text_field, str(root))
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        raise ValueError(f"corpus {path} contains no non-empty documents")
    return ds


def _load_files(files: list[Path], text_field: str, where: str) -> list[datasets.Dataset]:
    """Group files by kind and load each group with the matching local `datasets` loader."""
    import datasets  # on demand: only preparation needs it

    by_kind: dict[str, list[str]] = {"json": [], "parquet": [], "text": []}
    for f in files:
        suffix = f.suffix.lower()
        kind = "json" if suffix in JSON_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else "text"
        by_kind[kind].append(str(f))
    parts = []
    for kind in ("json", "parquet"):
        if by_kind[kind]:
            names = by_kind[kind]
            try:
                ds = datasets.load_dataset(kind, data_files=names, split="train")
            except Exception as e:  # DatasetGenerationError, ArrowInvalid, ...: name the files
                shown = ", ".join(names[:3]) + (f", ... ({len(names)} files)" if len(names) > 3 else "")
                raise ValueError(f"cannot read {kind} corpus file(s) {shown} in {where}: {_cause(e)}") from e
            parts.append(_pick_text_column(ds, text_field, where))
    if by_kind["text"]:
        # One document per file (the "text" loader would split into lines); read directly
        # so that binary files can be skipped instead of aborting the whole load.
        ds = _text_dataset([Path(f) for f in by_kind["text"]])
        if len(ds) == 0 and not parts:
            raise ValueError(f"no readable UTF-8 text in {where} ({len(by_kind['text'])} files were "
                             "binary, undecodable or empty)")
        parts.append(ds)
    return parts


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
