"""Prepare a run's token shards once, offline, before any training job:

    python scripts/prepare_data.py --config C [section.key=value ...]

reads the data section of the config as train.py does (data.path, data.text_field, data.tokenizer or
a BPE of model.vocab_size trained on data.tokenizer_sample_bytes of the corpus, data.seq_len,
data.val_fraction, data.num_proc) and writes the shard directory under data.cache_dir, with a copy of
its tokenizer. Interrupted (SIGTERM, Ctrl-C, a crash), it keeps every finished shard and the same
command resumes. It ends by printing the directory; then every rank of every node reads it as is with

    deepspeed ... train.py --config C data.prepared=DIR

(copy DIR to each node, or put it on a shared filesystem). With data.sources, every source is prepared.
Exits 0 when done, 2 with one line on a bad input, 143 when stopped by SIGTERM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.schema import load_config  # noqa: E402
from data import build_dataset_cache, echo_log  # noqa: E402
from data.prepared import check_prepared  # noqa: E402
from data.stop import PreparationStopped, stop_on_sigterm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    ap.add_argument("--no-progress", action="store_true", help="no progress line")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        d = cfg.data
        with stop_on_sigterm(), echo_log():
            if d.prepared is not None:
                check_prepared(d.prepared, d.seq_len, cfg.model.vocab_size, d.tokenizer)
                print(f"{d.prepared} is prepared and matches the config")
                return 0
            if d.sources or d.val_sources:
                from data.sources import prepare_sources

                print(json.dumps(prepare_sources(d, cfg.model.vocab_size), indent=2))
                return 0
            out = build_dataset_cache(d.path, d.text_field, d.tokenizer, cfg.model.vocab_size, d.seq_len, d.cache_dir,
                                      d.val_fraction, d.max_files, num_proc=d.num_proc,
                                      tokenizer_sample_bytes=d.tokenizer_sample_bytes,
                                      max_skipped_files=d.max_skipped_files, progress=not args.no_progress,
                                      wait_s=d.prepare_wait_s)
    except PreparationStopped:
        print("stopped by SIGTERM: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 143
    except (ValueError, FileNotFoundError, OSError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"prepared in {time.perf_counter() - start:.1f} s: {out}")
    print(f"train on it with: data.prepared={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
