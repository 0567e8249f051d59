"""Token-shard cache for the one-call GPU check (benchmarks/gpu/gpu_train_check.sh): built here on a CPU,
carried to the device in .gpucache/, found there instead of rebuilt.

    python benchmarks/gpu/gpu_build_cache.py corpus [--mb 7]       # copy stdlib .py files into .gpucache/corpus
    python benchmarks/gpu/gpu_build_cache.py touch                 # fixed mtimes (the cache key includes them)
    python benchmarks/gpu/gpu_build_cache.py build --config C [overrides]   # tokenizer + shards, as train.py would
    python benchmarks/gpu/gpu_build_cache.py check --config C [overrides]   # hit or miss, builds nothing (exit 1)

Why a corpus folder and fixed mtimes: the key of data/cache.py is the corpus path string as given, each
file's relative name, size and mtime (data.corpus.source_signature), the tokenizer fingerprint, seq_len
and val_fraction. The embedded default (data.path=null) is the interpreter's own stdlib, which differs
between this machine and the device, so its key can never match. A relative data.path/cache_dir and
mtimes set to one constant on both machines make the key machine-independent, whatever the copy to the
device does to mtimes. `check` goes through data.cache.build_dataset_cache itself with the building
steps replaced by a raise, so it answers exactly what train.py's data step would do.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

FIXED_MTIME_NS = 1_700_000_000 * 10**9      # 2023-11-14, any constant will do
DEFAULT_CORPUS = ".gpucache/corpus"


class Miss(Exception):
    """A building step of data.cache was reached: the cache would be (re)built."""


def make_corpus(dest: str, megabytes: float) -> None:
    """The first stdlib .py files (data.corpus' own order) up to `megabytes`, flat, in sorted order."""
    import sysconfig

    from data.corpus import stdlib_files  # the default corpus' files

    def _read_text(f: Path) -> str | None:   # UTF-8 text without NUL bytes, else None (as the corpus skips it)
        raw = f.read_bytes()
        try:
            return None if b"\x00" in raw else raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    root = Path(sysconfig.get_paths()["stdlib"])
    out = Path(dest)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    total, n = 0, 0
    for f in stdlib_files():
        text = _read_text(f)
        if not text or not text.strip():
            continue
        name = f"{n:05d}_" + f.relative_to(root).as_posix().replace("/", "__")
        (out / name).write_text(text, encoding="utf-8")
        total += len(text.encode("utf-8"))
        n += 1
        if total >= megabytes * 1e6:
            break
    touch(dest)
    print(f"corpus: {n} files, {total / 1e6:.2f} MB in {out}")


def touch(dest: str) -> int:
    n = 0
    for dirpath, _, filenames in os.walk(dest):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))
            n += 1
    print(f"touch: {n} files under {dest} set to mtime {FIXED_MTIME_NS // 10**9}")
    return n


def build(cfg, check_only: bool) -> str:
    from data import cache

    d = cfg.data
    if check_only:
        def miss(what):
            def f(*a, **k):
                raise Miss(what)
            return f
        cache.load_corpus = miss("the corpus would be loaded (tokenizer or shards missing/stale)")
        cache.train_bpe_tokenizer = miss("the tokenizer would be trained")
        cache.prepare_shards = miss("the token shards would be prepared")
    return cache.build_dataset_cache(d.path, d.text_field, d.tokenizer, cfg.model.vocab_size, d.seq_len,
                                     d.cache_dir, d.val_fraction, d.max_files)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["corpus", "touch", "build", "check"])
    ap.add_argument("--dest", default=DEFAULT_CORPUS, help="corpus folder (corpus, touch)")
    ap.add_argument("--mb", type=float, default=7.0, help="corpus size in MB of text (corpus)")
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args()
    if a.action == "corpus":
        make_corpus(a.dest, a.mb)
        return 0
    if a.action == "touch":
        return 0 if touch(a.dest) else 1
    from configs.schema import load_config
    from data.shards import read_meta

    cfg = load_config(a.config, a.overrides)
    if cfg.data.path is not None and Path(cfg.data.path).is_dir():
        touch(cfg.data.path)
    try:
        out = build(cfg, a.action == "check")
    except Miss as e:
        print(f"cache MISS: {e} (data.path={cfg.data.path}, data.cache_dir={cfg.data.cache_dir})")
        return 1
    meta = read_meta(out)
    print(f"cache {'HIT' if a.action == 'check' else 'ready'}: {out} "
          f"(train {meta['splits']['train']['rows']} rows, val {meta['splits'].get('val', {}).get('rows', 0)} rows "
          f"of {meta['seq_len']} + 1 tokens, vocab {meta['vocab_size']}, {meta['num_tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
