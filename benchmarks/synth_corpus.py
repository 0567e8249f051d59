"""Synthetic text corpora for the data-preparation benchmarks and tests: a varied vocabulary (Zipf-distributed
words from a generated lexicon of 50k words, numbers, punctuation, code-like lines), deterministic by seed.

    python benchmarks/synth_corpus.py OUT --mb 100 --docs 31000 [--format jsonl|txt|dir] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_LETTERS = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
_FREQ = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
                  1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])


def lexicon(n: int, rng: np.random.Generator) -> list[str]:
    lengths = np.clip(rng.poisson(5, n) + 1, 1, 16)
    letters = rng.choice(_LETTERS, size=int(lengths.sum()), p=_FREQ / _FREQ.sum())
    out, i = [], 0
    for n_chars in lengths:
        out.append("".join(letters[i:i + n_chars]))
        i += n_chars
    return out


def texts(total_chars: int, n_docs: int, seed: int = 0) -> Iterator[str]:
    """`n_docs` documents of about total_chars / n_docs characters each."""
    rng = np.random.default_rng(seed)
    words = np.array(lexicon(50_000, rng), dtype=object)
    cdf = np.cumsum(1 / np.arange(1, len(words) + 1) ** 1.1)
    cdf /= cdf[-1]
    per_doc = max(1, total_chars // n_docs)
    for _ in range(n_docs):
        n = per_doc // 6 + 8
        doc = words[np.minimum(np.searchsorted(cdf, rng.random(n)), len(words) - 1)]
        cuts = np.cumsum(rng.integers(5, 25, n // 5 + 2))
        parts = []
        for lo, hi in zip(np.r_[0, cuts[:-1]], cuts):
            if lo >= n:
                break
            r = rng.random()
            if r < 0.05:
                sent = f"def f{int(rng.integers(1e6))}(x):\n    return x * {int(rng.integers(1e4))}"
            else:
                sent = " ".join(doc[lo:hi]) + (f" {int(rng.integers(1e9))}" if r < 0.2 else "")
            parts.append(sent[:1].upper() + sent[1:] + (".\n" if r > 0.8 else ". "))
        yield "".join(parts)[:per_doc]


def write(out: str, mb: float, docs: int, fmt: str = "jsonl", seed: int = 0) -> Path:
    total = int(mb * 1e6)
    path = Path(out)
    if fmt == "dir":
        path.mkdir(parents=True, exist_ok=True)
        for i, t in enumerate(texts(total, docs, seed)):
            (path / f"doc{i:07d}.txt").write_text(t, encoding="utf-8")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for t in texts(total, docs, seed):
            f.write(json.dumps({"text": t}) + "\n" if fmt == "jsonl" else t)
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--mb", type=float, default=100)
    ap.add_argument("--docs", type=int, default=31000)
    ap.add_argument("--format", choices=("jsonl", "txt", "dir"), default="jsonl")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    p = write(a.out, a.mb, a.docs, a.format, a.seed)
    print(p, os.path.getsize(p) if p.is_file() else "")
