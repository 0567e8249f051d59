"""Pipeline schedules on this CPU: per-rank idle (bubble) fraction, step time, and the bytes a stage boundary
carries per step against ZeRO's gradient bytes, with real train.py runs (gloo, forked ranks).

    python benchmarks/bench_pipeline.py [--steps 6] [--accum 8] [--layers 8] [--ranks 2,4] [--ep-link 0.5] [--set K=V]

For each P in --ranks and each schedule (1f1b, dualpipev) one run of the tiny model with --layers layers and
M = --accum micro-batches of one row; the idle fraction per rank comes from metrics.jsonl (``pp_idle_fraction``:
the share of the schedule's wall time a rank did not spend in forward/backward chunks), the median over the
steps after the first two. Beside it the textbook fractions: 1F1B (P-1)/(M+P-1); DualPipeV from DeepSeek's
bubble (PP/2 - 1)(F&B + B - 3W) with PP = 2P stages, F:B:W = 1:2:1 per chunk and no overlap (F&B = F + B):
(P-1)(F&B + B - 3W) = 2(P-1) chunk-forwards against a rank's 6M of work. With --ep-link, pp=2 x ep=2 (4 ranks)
for 1f1b and dualpipev with its pairs run in turn and overlapped, each with and without the emulated EP link
(parallel.link_bandwidth_gbps): the exposed all-to-all share of a step as (T_link - T_no_link) / T_link, and as
measured inside each run (``pp_exposed_a2a_fraction``, parallel/exposure.py: the share of the schedule's time in
which every chunk a rank was running waited on an all-to-all; ``pp_exposed_link_fraction``: on the link's
transfer time itself, not a slow peer), which stays meaningful when ranks share cores. The
boundary bytes are counted by the run (``pp_sent_bytes``); the 16B preset's are computed from its config.
Ranks beyond the cores share them: P=4 on a 2-core machine measures time-slicing as well as the schedule.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(root: Path, corpus: Path, name: str, ranks: int, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    from tests.train_helpers import metrics, run_args, spawn_ranks

    common = [f"model.num_hidden_layers={args.layers}", f"train.max_steps={args.steps}", "train.eval_batches=0",
              "train.micro_batch_size=1", f"train.grad_accum={args.accum}", "train.save_every=1000", *args.set]
    spawn_ranks(ranks, run_args(root, corpus, name, common + extra), timeout=900)
    return [r for r in metrics(root / name) if r["step"] > 2]


def summary(records: list[dict]) -> dict:
    idle = [statistics.median(r["pp_idle_fraction"][i] for r in records)
            for i in range(len(records[0]["pp_idle_fraction"]))]
    med = lambda key: [statistics.median(r[key][i] for r in records) for i in range(len(idle))]   # noqa: E731
    return {"idle": idle, "step_s": statistics.median(max(r["pp_schedule_s"]) for r in records),
            "sent": records[-1]["pp_sent_bytes"], "exposed": med("pp_exposed_a2a_fraction"),
            "exposed_link": med("pp_exposed_link_fraction")}


def formulas(P: int, M: int) -> dict:
    return {"1f1b": (P - 1) / (M + P - 1), "dualpipev": 2 * (P - 1) / (6 * M + 2 * (P - 1))}


def bytes_16b(M: int) -> dict:
    """Per step, from configs/deepseek_v3_16b.yaml at 1 x 4096 tokens per micro-batch, bf16, pp=2 (1f1b, ep 4 on
    8 GPUs): one boundary's activations + gradients vs the ring all-reduce of one stage's dense gradients."""
    from configs.schema import load_config
    from model.memory_plan import params

    m = load_config("configs/deepseek_v3_16b.yaml", []).model
    boundary = 2 * M * 4096 * m.hidden_size * (1 + m.num_nextn_predict_layers) * 2
    pr = params(m)
    zero = 2 * (pr.dense / 2 + pr.experts / 2 / 4) * 2 * (4 - 1) / 4    # a stage's grads, ring over its 4 ranks
    return {"boundary_bytes": boundary, "zero_grad_bytes": int(zero)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--ep-link", type=float, default=None, help="Gbit/s of the emulated EP link (pp=2 x ep=2 runs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (e.g. parallel.chunks=4)")
    args = ap.parse_args()
    from tests.train_helpers import make_corpus

    out: dict = {"args": vars(args), "bubble": {}, "overlap": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = make_corpus(root, n_docs=40)
        for P in (int(x) for x in args.ranks.split(",") if x):
            for sched in ("1f1b", "dualpipev"):
                s = summary(run(root, corpus, f"{sched}{P}", P, args,
                                [f"parallel.pp={P}", f"parallel.pp_schedule={sched}"]))
                s["formula"] = formulas(P, args.accum)[sched]
                out["bubble"][f"{sched} P={P}"] = s
                print(f"{sched:9s} P={P} M={args.accum}: idle per rank {[round(x, 3) for x in s['idle']]} "
                      f"(formula {s['formula']:.3f}), step {s['step_s']:.3f} s, boundary bytes sent per step by rank "
                      f"{s['sent']}", flush=True)
        if args.ep_link:   # pp=2 x ep=2: the same run with and without the emulated link, per schedule
            variants = (("1f1b", ["parallel.pp_schedule=1f1b"]),
                        ("dualpipev, pairs in turn", ["parallel.pp_schedule=dualpipev", "parallel.pp_overlap=false"]),
                        ("dualpipev, pairs overlapped", ["parallel.pp_schedule=dualpipev"]))
            for label, flags in variants:
                times = {}
                for link in (None, args.ep_link):
                    extra = ["parallel.pp=2", "parallel.ep=2", *flags] + (
                        [f"parallel.link_bandwidth_gbps={link}"] if link else [])
                    times[link] = summary(run(root, corpus, f"ep_{len(out['overlap'])}_{link}", 4, args, extra))
                slow, fast = times[args.ep_link]["step_s"], times[None]["step_s"]
                out["overlap"][label] = {"step_s_link": slow, "step_s_no_link": fast,
                                         "exposed_fraction": (slow - fast) / slow,
                                         "exposed_in_run_link": times[args.ep_link]["exposed"],
                                         "exposed_in_run_no_link": times[None]["exposed"],
                                         "exposed_link_time": times[args.ep_link]["exposed_link"]}
                print(f"pp=2 ep=2 {label:28s}: step {slow:.3f} s with the {args.ep_link} Gbit/s link, {fast:.3f} s "
                      f"without; (T_link - T_no_link) / T_link {(slow - fast) / slow:.3f}; exposed in the run by rank: "
                      f"{[round(x, 3) for x in times[args.ep_link]['exposed']]} with the link, "
                      f"{[round(x, 3) for x in times[None]['exposed']]} without; of it on the link itself "
                      f"{[round(x, 3) for x in times[args.ep_link]['exposed_link']]}", flush=True)
    out["bytes_16b"] = bytes_16b(args.accum)
    b = out["bytes_16b"]
    print(f"16B preset, pp=2, {args.accum} micro-batches of 1 x 4096: a boundary carries "
          f"{b['boundary_bytes'] / 2**20:.0f} MiB per step; ZeRO's gradient reduction of one stage sends "
          f"{b['zero_grad_bytes'] / 2**30:.2f} GiB per rank ({b['zero_grad_bytes'] / b['boundary_bytes']:.0f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
