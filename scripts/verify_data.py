"""Read every token of a prepared shard directory and check it: each shard's size against meta.json,
its largest token id against the one recorded when it was prepared, and against the vocabulary.

    python scripts/verify_data.py DIR [--vocab-size N]

DIR is a token-shard directory (data.cache_dir/shards-<key>, the `shard_dir` in a run's run.json).
--vocab-size is the model's vocabulary (model.vocab_size); without it, the tokenizer's, from meta.json.
Training itself reads only the recorded largest ids at start-up (data/shards.py); this is the full scan,
for a directory copied between machines, restored from a backup or suspected of damage.
Prints one line per shard; exits 1 naming the first bad shard, 2 if DIR holds no readable metadata.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import read_meta, verify_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="token-shard directory (holds meta.json)")
    ap.add_argument("--vocab-size", type=int, default=None,
                    help="the model's vocabulary size (default: the tokenizer's, from meta.json)")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        meta = read_meta(args.dir)
        vocab = meta["vocab_size"] if args.vocab_size is None else args.vocab_size
        checks, first_bad = 0, None
        for c in verify_shards(args.dir, args.vocab_size):
            checks += 1
            recorded = "not recorded (format version 1)" if c.recorded is None else f"recorded {c.recorded}"
            found = "" if c.max_id is None else f", largest id {c.max_id}"
            print(f"{'BAD' if c.problem else 'ok '} {c.split:5s} {c.file.name}: {c.rows} rows{found} ({recorded})"
                  + (f": {c.problem}" if c.problem else ""), flush=True)
            if c.problem and first_bad is None:
                first_bad = c
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if first_bad is not None:
        print(f"error: {first_bad.file}: {first_bad.problem}", file=sys.stderr)
        return 1
    tokens = sum(info["rows"] for info in meta["splits"].values()) * meta["row_len"]
    print(f"{args.dir}: {checks} shards, {tokens} tokens read in {time.perf_counter() - start:.2f} s, all "
          f"below vocab size {vocab} and equal to their recorded largest ids")
    return 0


if __name__ == "__main__":
    sys.exit(main())
