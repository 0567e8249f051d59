"""Start-up of a rank on a prepared corpus: opening the shards now (each shard's largest id recorded at
preparation) against the full scan every rank made before (TokenShards._check_ids of commit 323d2ea,
reproduced below: the max over 65,536-row chunks of every shard).

    python benchmarks/bench_data_startup.py SHARD_DIR [--vocab 4096]

SHARD_DIR: a prepared `shards-*` directory (e.g. `python benchmarks/bench_data.py --cases jsonl1000
--keep-cache` leaves one under /tmp/bench_data/cache-jsonl1000). "cold" drops the page cache first
(needs root; it says when it could not), "warm" runs right after.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.shards import TokenShards  # noqa: E402


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def old_full_scan(shards: TokenShards) -> None:
    for m in shards._maps:
        for start in range(0, len(m), 65536):
            int(m[start:start + 65536].max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shard_dir")
    ap.add_argument("--vocab", type=int, default=4096)
    a = ap.parse_args()
    for label in ("cold", "warm"):
        dropped = drop_page_cache() if label == "cold" else None
        t = time.perf_counter()
        shards = TokenShards(a.shard_dir, "train", expected_vocab_size=a.vocab)
        t_open = time.perf_counter() - t
        if label == "cold":
            drop_page_cache()
        t = time.perf_counter()
        old_full_scan(shards)
        t_scan = time.perf_counter() - t
        size = sum(f.stat().st_size for f in shards._files) / 1e9
        print(f"{label}{'' if dropped in (None, True) else ' (page cache NOT dropped: not root)'}: {len(shards)} rows, "
              f"{size:.2f} GB of shards: open now {t_open * 1e3:.1f} ms; before, the full scan added {t_scan:.2f} s")


if __name__ == "__main__":
    main()
