"""The identity of a corpus by its content, for the cache key: a moved, copied or touched corpus keeps it.

The signature is a sha256 over, for each file in reading order: its name relative to the corpus root
(a folder's layout decides the document order; a single file's own name does not count, its suffix
does), its size and the sha256 of its whole content. It is exact: any changed byte changes it. Hashing
reads the corpus once (about 1 GB/s per core; threads over files); the file hashes are remembered in
`memo_dir` under (real path, size, mtime, inode), so a later start re-reads only files that changed,
moved or were touched, and a corpus that is only moved or touched is hashed again but not prepared again.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .corpus import Corpus


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def _load_memo(memo: Path | None) -> dict[str, str]:
    if memo is None:
        return {}
    try:
        data = json.loads(memo.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_memo(memo: Path, data: dict[str, str]) -> None:
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, memo)   # concurrent writers: the last complete one wins, never half a file


def content_signature(corpus: Corpus, memo_dir: str | os.PathLike | None = None, threads: int = 1) -> str:
    """sha256 identity of the corpus' content (see the module docstring). `memo_dir`: where the per-file
    hashes are remembered (data.cache_dir/signatures), None to hash everything."""
    root = corpus.root.resolve()
    memo = Path(memo_dir) / (hashlib.sha256(str(root).encode()).hexdigest()[:16] + ".json") if memo_dir else None
    known = _load_memo(memo)
    keys = [_stat_key(f) for f in corpus.files]
    todo = [(k, f) for k, f in zip(keys, corpus.files) if k not in known]
    with ThreadPoolExecutor(max(1, threads)) as pool:   # hashlib releases the GIL on large reads
        for (k, _), digest in zip(todo, pool.map(lambda kf: file_sha256(kf[1]), todo)):
            known[k] = digest
    h = hashlib.sha256()
    h.update(repr(("saved" if corpus.saved else "files", corpus.text_field, corpus.path is None)).encode())
    for k, f in zip(keys, corpus.files):
        rel = f.relative_to(corpus.root).as_posix() if f != corpus.root else f.suffix.lower()
        h.update(f"{rel}\0{f.stat().st_size}\0{known[k]}\n".encode())
    if memo is not None and todo:
        _save_memo(memo, {k: known[k] for k in keys})
    return h.hexdigest()
