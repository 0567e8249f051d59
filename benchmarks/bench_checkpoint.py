"""Checkpoint cost per rank: peak RSS increase during a save and a resume, bytes on disk, and the
training stall of an async save against a synchronous save of the same state, in one run.

    deepspeed --num_gpus 4 benchmarks/bench_checkpoint.py --config configs/tiny.yaml parallel.ep=4 \
        [model.hidden_size=512 ...] [--rounds 2] [--out /tmp/bench_ckpt]

Every rank builds the engine as train.py does (EP sharding, DeepSpeed ZeRO from the config), takes
one optimizer step on random tokens (so AdamW has its moments), then for each round: a synchronous
save, an async save followed by two training steps while it writes (the stall is the time until
save() returns), and a resume of the synchronous one into the same engine. RSS is sampled every
2 ms from /proc/self/statm in a thread; "increase" is the peak during the call minus the RSS
just before it. "share" is the rank's own training state: the fp32 masters and two AdamW moments
of the slices it owns (parallel/state/ownership.py), 12 bytes per owned element.

``--legacy`` runs the same protocol through the API of the pre-sharded checkpoints
(``checkpoint.save`` / ``checkpoint.load``), for a side-by-side figure from an older checkout:
``PYTHONPATH=/path/to/old/checkout deepspeed ... benchmarks/bench_checkpoint.py --legacy ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

if "--legacy" not in sys.argv:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def params_total(path) -> int:
    from model.hf import weight_reader  # not in an older checkout (--legacy)

    return sum(v.numel() for v in weight_reader.read_weights(path).values())


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRss:
    """Peak resident bytes above the value at entry, sampled in a thread while the block runs."""

    def __enter__(self):
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())
        self.increase = self.peak - self.base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="/tmp/bench_ckpt")
    ap.add_argument("--legacy", action="store_true", help="the pre-sharded checkpoint API (an older checkout)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from configs.schema import load_config
    from parallel.engine import cpu_threads_per_rank, init_distributed
    from parallel.state import checkpoint

    cfg = load_config(args.config, args.overrides)
    rank, world, _ = init_distributed()
    cpu_threads_per_rank()
    if args.legacy:   # an older checkout: its own build
        from model.transformer import DeepseekV3
        from parallel.engine import build_engine
        from parallel.expert.sharding import create_groups, declare_to_deepspeed, shard_experts

        torch.manual_seed(cfg.train.seed)
        model = DeepseekV3(cfg.model)
        if cfg.parallel.ep > 1:
            ep_group, _ = create_groups(cfg.parallel.ep)
            shard_experts(model, ep_group, cfg.parallel.ep)
            declare_to_deepspeed(model, cfg.parallel.ep)
        engine = build_engine(model, cfg, world)
    else:
        from parallel.build import build_training

        built = build_training(cfg, torch.device("cpu"), world)
        engine, model = built.engine, built.model
    t = cfg.train
    gen = torch.Generator().manual_seed(rank)

    def train_step():
        for _ in range(t.grad_accum):
            x = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
            out = engine(x[:, :-1], x[:, 1:])
            engine.backward(out.loss)
            engine.step()

    train_step()
    params = sum(p.numel() for p in model.parameters())
    if args.legacy:
        share = None
    else:
        from parallel.state import ownership
        ownership.ensure_optimizer_state(engine)
        share = sum(f.numel * 4 * 3 for f in ownership.owned_slices(engine))
        saver_sync, saver_async = checkpoint.Checkpointer(False), checkpoint.Checkpointer(True)
    state = {"sampler": {"global_batch_size": engine.train_batch_size()}, "config": cfg.to_dict(),
             "tokenizer_fingerprint": "bench", "world_size": world}
    out = Path(args.out)
    rows = []
    for r in range(args.rounds):
        step = 10 * (r + 1)
        dist.barrier()
        with PeakRss() as m:
            t0 = time.perf_counter()
            if args.legacy:
                path = checkpoint.save(engine, str(out), step, state, keep_last=10)
            else:
                path = saver_sync.save(engine, str(out), step, state, keep_last=10)
            sync_s = time.perf_counter() - t0
        save_inc = m.increase
        dist.barrier()
        row = {"round": r, "sync_save_s": sync_s, "save_rss_increase": save_inc}
        if not args.legacy:
            with PeakRss() as m:
                t0 = time.perf_counter()
                saver_async.save(engine, str(out), step + 1, state, keep_last=10)
                row["async_stall_s"] = time.perf_counter() - t0
                t1 = time.perf_counter()
                train_step()                       # training goes on while the shards are written
                train_step()
                row["steps_during_async_s"] = time.perf_counter() - t1
                saver_async.wait()
                row["async_total_s"] = time.perf_counter() - t0
            row["async_rss_increase"] = m.increase
        dist.barrier()
        loaded_state = checkpoint.read_state(path)
        with PeakRss() as m:
            t0 = time.perf_counter()
            checkpoint.load(engine, path, loaded_state)
            row["load_s"] = time.perf_counter() - t0
        row["load_rss_increase"] = m.increase
        row["disk_bytes"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        rows.append(row)
    gathered = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "share": share, "params_local": params, "rows": rows})
    if rank == 0:
        print(json.dumps({"world": world, "ep": cfg.parallel.ep, "legacy": args.legacy,
                          "zero": cfg.deepspeed.get("zero_optimization", {}).get("stage", 0),
                          "params_total": None if args.legacy else params_total(path), "ranks": gathered}, indent=1))
        mb = 2 ** 20
        print(f"\n{'rank':>4} {'share MB':>9} {'save +MB':>9} {'resume +MB':>10} {'save/share':>10} "
              f"{'resume/share':>12}")
        for g in gathered:
            s = max(x["save_rss_increase"] for x in g["rows"])
            lo = max(x["load_rss_increase"] for x in g["rows"])
            sh = g["share"]
            print(f"{g['rank']:>4} {(sh or 0) / mb:9.1f} {s / mb:9.1f} {lo / mb:10.1f} "
                  f"{(s / sh if sh else float('nan')):10.2f} {(lo / sh if sh else float('nan')):12.2f}")
        if not args.legacy:
            sync = statistics.median(x["sync_save_s"] for g in gathered for x in g["rows"] if g["rank"] == 0)
            stall = statistics.median(x["async_stall_s"] for g in gathered for x in g["rows"] if g["rank"] == 0)
            print(f"\nsync save {sync:.3f} s, async stall {stall:.3f} s: ratio {stall / sync:.3f} (rank 0 medians)")
        print(f"disk per checkpoint: {rows[-1]['disk_bytes'] / mb:.1f} MB")
    dist.barrier()


if __name__ == "__main__":
    main()
