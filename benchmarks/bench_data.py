"""Data preparation at scale: wall time and peak memory of preparing synthetic corpora, and the raw
`tokenizers` batch-encode rate on the same text in the same run (the ceiling of tokenizing + packing).

    python benchmarks/bench_data.py [--cases single50,docs50,jsonl100,jsonl1000,txt100] [--code DIR]
                                    [--scratch DIR] [--vocab 4096] [--seq-len 256] [--cap-gb 6]

Each case prepares one corpus from scratch (BPE of --vocab tokens trained on data.tokenizer_sample_bytes,
then tokenize + pack) in a fresh process running the code of `--code` (default: this checkout; another
checkout, e.g. a `git worktree` of an older commit, gives the "before" figures), with HOME pointed at an
empty scratch folder so that anything written outside data.cache_dir is counted. Peak memory is sampled
every 0.1 s over the whole process tree (main process + tokenizer workers: `tree`), and the largest single
process' peak (`max_rss`, getrusage) is printed too. `--cap-gb` limits the address space (ulimit -v) so a
case that would exhaust the machine fails instead. Cases:

  single50   one 50 MB document (one JSON line)          docs50    the same text as 1,000 documents
  jsonl100   100 MB of JSON lines, 31k documents         jsonl1000 1 GB of JSON lines, 310k documents
  txt100     a folder of 10,000 .txt files, 100 MB      txt1000   a folder of 100,000 .txt files, 1 GB
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.synth_corpus import write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASES = {"single50": (50, 1, "jsonl"), "docs50": (50, 1000, "jsonl"), "jsonl100": (100, 31000, "jsonl"),
         "jsonl1000": (1000, 310000, "jsonl"), "txt100": (100, 10000, "dir"), "txt1000": (1000, 100000, "dir")}

PREPARE = """
import json, logging, sys, time
sys.path.insert(0, {code!r})
from data import build_dataset_cache, read_meta
t = time.perf_counter()
events = []
import resource
def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
class Times(logging.Handler):
    def emit(self, record):
        events.append((round(time.perf_counter() - t, 2), record.getMessage()[:24],
                       cpu(resource.RUSAGE_SELF) + cpu(resource.RUSAGE_CHILDREN)))
logging.getLogger("data").addHandler(Times())
logging.getLogger("data").setLevel(logging.INFO)
out = build_dataset_cache({path!r}, "text", None, {vocab}, {seq_len}, {cache!r}, 0.01)
meta = read_meta(out)
print("RESULT", json.dumps({{"seconds": time.perf_counter() - t, "tokens": meta["num_tokens"], "events": events}}))
"""

RAW = """
import json, os, resource, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file({tok!r})
path, docs, size = Path({path!r}), [], 0
for item in (path.open(encoding="utf-8") if path.is_file() else sorted(path.iterdir())):
    docs.append(json.loads(item)["text"] if path.is_file() else item.read_text(encoding="utf-8"))
    size += len(docs[-1])
    if size >= {chars}:
        break
c = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
n = 0
for i in range(0, len(docs), 1000):
    n += sum(len(e.ids) for e in tok.encode_batch_fast(docs[i:i + 1000], add_special_tokens=False))
r = resource.getrusage(resource.RUSAGE_SELF)
cpu = r.ru_utime + r.ru_stime - c.ru_utime - c.ru_stime
print("RESULT", json.dumps({{"seconds": time.perf_counter() - t, "tokens": n, "cpu_s": cpu}}))
"""


def tree_rss(pid: int) -> int:
    """Proportional resident bytes (PSS: pages shared after fork counted once) of pid and its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def run(code: str, env: dict[str, str], cap_gb: float | None) -> dict:
    """Run python code in a fresh process; -> its RESULT json + peak tree RSS, max single RSS, wall time."""
    limit = f"ulimit -v {int(cap_gb * 2**20)}; " if cap_gb else ""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    p = subprocess.Popen(["bash", "-c", f'{limit}exec "{sys.executable}" -c "$0"', code], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while p.poll() is None:
            peak[0] = max(peak[0], tree_rss(p.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = p.communicate()
    sampler.join()
    wall = time.perf_counter() - t
    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    result = json.loads(line[7:]) if line and p.returncode == 0 else {"failed": p.returncode,
                                                                      "error": err.strip().splitlines()[-1:]}
    return {**result, "wall_s": wall, "peak_tree_gb": peak[0] / 1e9,
            "max_rss_gb": max_rss / 1e9 if max_rss > before * 1024 else None}


def corpus(scratch: Path, case: str) -> Path:
    mb, docs, fmt = CASES[case]
    path = scratch / "corpora" / (f"{case}.jsonl" if fmt == "jsonl" else case)
    if not path.exists():
        if case == "single50":   # the same text as docs50, as one document
            text = "".join(json.loads(line)["text"] for line in corpus(scratch, "docs50").open())
            path.write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
        else:
            write(str(path), mb, docs, fmt, seed=0)
    return path


def outside_bytes(home: Path) -> int:
    return sum(f.stat().st_size for f in home.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="single50,docs50,jsonl100")
    ap.add_argument("--code", default=str(ROOT), help="checkout whose data/ prepares (default: this one)")
    ap.add_argument("--scratch", default="/tmp/bench_data")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--cap-gb", type=float, default=None)
    ap.add_argument("--raw-mb", type=float, default=20, help="text for the raw tokenizers rate (MB)")
    ap.add_argument("--keep-cache", action="store_true", help="keep each case's prepared cache (SCRATCH/cache-CASE)")
    a = ap.parse_args()
    scratch = Path(a.scratch)
    (scratch / "corpora").mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} available), code: {a.code}")
    for case in a.cases.split(","):
        path = corpus(scratch, case)
        home, cache = scratch / "home", scratch / f"cache-{case}"
        for d in (home, cache):
            shutil.rmtree(d, ignore_errors=True)
        home.mkdir()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_"))}, "HOME": str(home),
               "PYTHONPATH": f"{a.code}{os.pathsep}{ROOT}"}
        r = run(PREPARE.format(code=a.code, path=str(path), vocab=a.vocab, seq_len=a.seq_len, cache=str(cache)),
                env, a.cap_gb)
        r["outside_cache_mb"] = outside_bytes(home) / 1e6
        size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*"))) / 1e6
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "events"}
        print(f"{case}: {size:.0f} MB -> {json.dumps(shown)}", flush=True)
        at = {msg.split(" ")[0]: (secs, cpu) for secs, msg, cpu in r.get("events", [])}
        if "preparing" in at and "prepared" in at:   # this checkout's log: training ends where preparing starts
            r["bpe_s"], r["pack_s"] = at["preparing"][0], at["prepared"][0] - at["preparing"][0]
            r["pack_cpu_s"] = at["prepared"][1] - at["preparing"][1]   # the workers' CPU included (joined by then)
        tok = cache / "tokenizer" / "tokenizer.json"
        if tok.is_file() and "tokens" in r:
            same = corpus(scratch, "docs50") if case == "single50" else path   # its text as documents
            raw = run(RAW.format(tok=str(tok), path=str(same), chars=int(a.raw_mb * 1e6)), env, None)
            rate = raw["tokens"] / raw["seconds"]
            print(f"  raw tokenizers encode_batch_fast on the first {a.raw_mb:.0f} MB of its documents: "
                  f"{rate / 1e6:.2f}M tokens/s; this preparation {r['tokens'] / r['seconds'] / 1e6:.2f}M tokens/s "
                  "end to end "
                  f"({r['tokens'] / r['seconds'] / rate:.2f} of raw, tokenizer training included)"
                  + (f"; tokenizing + packing alone {r['tokens'] / r['pack_s'] / 1e6:.2f}M tokens/s "
                     f"({r['tokens'] / r['pack_s'] / rate:.2f} of raw)" if r.get("pack_s") else ""), flush=True)
            if r.get("pack_cpu_s"):   # CPU seconds per token: what a shared machine's load does not distort
                raw_cpu = raw["cpu_s"] / raw["tokens"]
                print(f"  CPU per token: raw {raw_cpu * 1e6:.2f} us (its parse of the text excluded), tokenizing + "
                      f"packing {r['pack_cpu_s'] / r['tokens'] * 1e6:.2f} us (reading and parsing the corpus "
                      f"included): raw/ours = {raw_cpu * r['tokens'] / r['pack_cpu_s']:.2f}", flush=True)
        if not a.keep_cache:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
