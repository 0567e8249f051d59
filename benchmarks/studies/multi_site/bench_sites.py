"""Multi-site quality and traffic: synchronous 4-rank data parallelism against 2 sites x 2 ranks
(ep=2 inside each) with the DiLoCo-style outer step, same global batch and token count.

    python benchmarks/studies/multi_site/bench_sites.py [--out runs/sites] [--steps 600] [--runs sync,h50_int8,...]
    python benchmarks/studies/multi_site/bench_sites.py --runs sync,h50_int8_lr14_warm100e5 \
        --utilisation                                                          # 2026-12-04's
    python benchmarks/studies/multi_site/bench_sites.py --report-only          # table + plot from finished runs
    python benchmarks/studies/multi_site/bench_sites.py --out /tmp/probe --stop-at 100 \
        --runs sync,every_step_fp32,every_step_fp32_noclip

Each run is ``deepspeed --num_gpus 4 train.py`` on configs/tiny.yaml (the embedded corpus) with
``train.micro_batch_size`` x ``data.seq_len`` per rank (2 x 256 by default: the CPU is small). A
run whose metrics already reach the last step is not repeated. Printed: final validation loss
and its ratio to synchronous; bytes sent across sites per inner step (the outer step's counters,
all ranks) against synchronous data parallelism's gradient reductions (DeepSpeed's comms logger:
all_reduce / reduce_scatter payloads, all ranks) and its parameter all-gathers; steps/s. The
curves go to sites_loss.png beside this file (``--plot``). RUNS: H in {10, 50, 200} x {fp32, int8}
with DiLoCo's outer Nesterov (lr 0.7, momentum 0.9), and at H=50 int8 the outer-optimizer / warm-up variants
(``_avg``: plain averaging; ``_lr14``: outer lr 1.4 = sqrt(2), no momentum; ``_warm100e5``:
``parallel.outer_start_step=100 outer_start_every=5``, a plain mean every 5 steps up to step 100).

``--utilisation`` adds short runs (``--util-steps``, 100 by default: only steps/s matters) over
an emulated 100 Mbit/s / 50 ms wide-area link: H=50 int8 without and with it (and with
outer_overlap=5), and synchronous 4-rank data parallelism with and without its DeepSpeed
reductions on that link (``--train-over-wan``: parallel.link.emulate_wan_on_deepspeed, ranks 0-1
and 2-3 as the two sites). Steps/s is steps over the summed step times past step 10; beside the
ratio between runs (which the shared machine's load moves by 10-20%), each run with the link
gives the in-run ratio: its time blocked on the link against its step time. ``--util-rounds N``
runs util_nolink and util_wan alternating N times (the order flipped each round) and prints each
round's ratio and the median: the cross-run ratio with the machine's drift spread over both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RUNS = {"sync": [],
        **{f"h{h}_{d}": ["parallel.sites=2", f"parallel.outer_every={h}", f"parallel.outer_dtype={d}"]
           for h in (10, 50, 200) for d in ("fp32", "int8")}}
# the outer optimizer and a synchronous warm-up at H=50 int8 (2026-12-04)
AVG = ["parallel.outer_lr=1.0", "parallel.outer_momentum=0"]           # plain averaging
LR14 = ["parallel.outer_lr=1.4", "parallel.outer_momentum=0"]
WARM = ["parallel.outer_start_step=100", "parallel.outer_start_every=5"]   # a mean every 5 steps to step 100
# 2026-12-05: gradient clipping off, inner lr x sqrt(2) (2.83e-3 -> 2.83e-4)
NOCLIP, IN14 = ["train.grad_clip=0"], ["train.lr=2.83e-3", "train.min_lr=2.83e-4"]
H50 = RUNS["h50_int8"]
RUNS.update({"h50_int8_avg": H50 + AVG,
             "h50_int8_m05": H50 + ["parallel.outer_lr=1.0", "parallel.outer_momentum=0.5"],
             "h50_int8_warm20": H50 + ["parallel.outer_start_step=20"],
             "h50_int8_avg_warm20": H50 + AVG + ["parallel.outer_start_step=20"],
             # warm-up: a plain mean every 5 steps up to step 100 (20 exchanges), then H=50 rounds
             "h50_int8_avg_warm100e5": H50 + AVG + WARM,
             # outer lr sqrt(2), no momentum: extrapolates along the sites' mean change (2026-12-05: not
             # a fix for per-site AdamW normalisation, which an inner lr x sqrt(2) would be, and is not)
             "h50_int8_lr14": H50 + LR14,
             "h50_int8_lr14_warm100e5": H50 + LR14 + WARM,
             # diagnostic, not a candidate (about 1/4 of synchronous DP's bytes): a plain fp32 mean after
             # every step for the whole run, so no drift between sites; what is left is each site's
             # AdamW normalising its own half of the batch, and its own gradient clipping
             "every_step_fp32": ["parallel.sites=2", "parallel.outer_every=50", "parallel.outer_dtype=fp32",
                                 "parallel.outer_start_step=600"],
             "h50_int8_lr20_warm100e5": H50 + ["parallel.outer_lr=2.0", "parallel.outer_momentum=0"] + WARM,
             # inner lr x sqrt(2) with a plain mean: the sqrt(2) inside each site's AdamW, on every step,
             # instead of extrapolated by the outer step
             "h50_int8_in14_warm100e5": H50 + AVG + IN14 + WARM})
# where the every-step diagnostic's gap comes from (2026-12-05; short probes with --stop-at 100): gradient
# clipping per site (a half batch's norm is larger, so it is clipped harder) and the inner lr, each with the
# synchronous control
RUNS.update({"sync_noclip": NOCLIP, "sync_in14": IN14,
             "every_step_fp32_noclip": RUNS["every_step_fp32"] + NOCLIP,
             "every_step_fp32_in14": RUNS["every_step_fp32"] + IN14,
             "h50_int8_lr14_warm100e5_noclip": RUNS["h50_int8_lr14_warm100e5"] + NOCLIP,
             # Nesterov 0.7 / 0.5: the outer multiplier ramps from 1.05 (first round after the warm-up,
             # momentum still 0) towards lr / (1 - mu) = 1.4 as the rounds agree
             "h50_int8_m05_warm100e5": H50 + ["parallel.outer_lr=0.7", "parallel.outer_momentum=0.5"] + WARM})
# 2026-12-05, later: h50_int8_lr{14,20}_agree_warm100e5 (the outer lr above 1 only where the sites agree) were
# measured at commit f23c378 and removed with the option: benchmarks/studies/multi_site/results.md
# Streaming DiLoCo's fragments at the best setting: P fragments, each synced every 50 steps, 50/P steps apart
RUNS.update({f"h50_int8_lr14_warm100e5_p{P}": RUNS["h50_int8_lr14_warm100e5"] + [f"parallel.outer_fragments={P}"]
             for P in (5, 10, 50)})
# bound (2026-12-05, later): one site alone, synchronous over half the global batch (4 ranks x mbs/2 rows
# are the rows one site's 2 ranks x mbs take): what H=50 averaging adds over training only one site
RUNS["one_site"] = []                                  # train.micro_batch_size set in run(), from --mbs
# utilisation: H=50 int8 with and without the emulated wide-area link (100 Mbit/s, 50 ms)
WAN = ["parallel.wan_bandwidth_gbps=0.1", "parallel.wan_latency_ms=50"]
UTIL = {"util_nolink": RUNS["h50_int8"], "util_wan": RUNS["h50_int8"] + WAN,
        "util_wan_tau5": RUNS["h50_int8"] + WAN + ["parallel.outer_overlap=5"],
        "util_sync": [], "util_sync_wan": []}
# synchronous 4-rank DP with DeepSpeed's gradient reductions over the same emulated link, as if
# ranks 0-1 and 2-3 were two sites (parallel.link.emulate_wan_on_deepspeed; through --train-over-wan)
SYNC_WAN = ("0.1", "50", "2")
# the synchronous run of 2026-12-02 (same command; the runs are deterministic): used when "sync" has
# not been run in --out, and said so
SYNC_2026_12_02 = {"name": "sync (2026-12-02)", "step": 600, "val_loss": 4.1505, "tokens_per_s": float("nan"),
                   "grad_bytes_per_step": 112_204_868}
GRADIENT_OPS = ("all_reduce", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_fn", "reduce")


def read(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def run(name: str, args: argparse.Namespace) -> None:
    out = Path(args.out) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    rec = read(out)
    steps = args.util_steps if name in UTIL else args.steps
    stop = None if name in UTIL else args.stop_at          # the LR schedule still spans max_steps
    if rec and rec[-1]["step"] >= (stop or steps):
        return
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    extra = {**RUNS, **UTIL}[name] + (["deepspeed.comms_logger.enabled=true", "deepspeed.comms_logger.prof_all=true"]
                          if name == "sync" else [])
    if name == "one_site":
        if args.mbs % 2:
            raise SystemExit(f"one_site: --mbs {args.mbs} is odd; one site's half of the batch needs an even one")
        # twice tiny.yaml's evaluation batches, of half the rows: the same validation rows as the other runs
        sys.path.insert(0, str(ROOT))
        from configs import load_config

        batches = load_config(str(ROOT / "configs/tiny.yaml")).train.eval_batches
        extra = [f"train.micro_batch_size={args.mbs // 2}", f"train.eval_batches={2 * batches}"]
    entry = ([str(Path(__file__).resolve()), "--train-over-wan", *SYNC_WAN] if name == "util_sync_wan"
             else [str(ROOT / "train.py")])
    cmd = ["deepspeed", "--num_gpus", "4", "--master_port", str(29500 + hash(name) % 400), *entry,
           "--config", str(ROOT / "configs/tiny.yaml"), "parallel.ep=2", f"train.max_steps={steps}",
           f"train.micro_batch_size={args.mbs}", f"data.seq_len={args.seq_len}", f"train.out_dir={out}",
           "train.eval_every=100", "train.save_every=100000", "logging.progress=false",
           *([f"train.stop_at={stop}"] if stop else []), *extra]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (Path(args.out) / f"{name}.log").write_text(p.stdout + p.stderr)
    print(f"  exit {p.returncode} after {time.time() - t0:.0f} s", flush=True)


def summary(name: str, rec: list[dict]) -> dict:
    val = [r for r in rec if "val_loss" in r]
    last = rec[-1]
    out = {"name": name, "step": last["step"], "val_loss": val[-1]["val_loss"] if val else None,
           "tokens_per_s": sum(r["tokens_per_s"] for r in rec[-10:]) / len(rec[-10:])}
    if "wan_bytes_total" in last:
        out["cross_bytes_per_step"] = last["wan_bytes_total"] / last["step"]
        out["outer_steps"] = last["outer_steps"]
    if "ds_comm_bytes" in last:   # rank 0's cumulative payloads; the 4 ranks are symmetric
        ds = last["ds_comm_bytes"]
        out["grad_bytes_per_step"] = 4 * sum(v for k, v in ds.items() if k in GRADIENT_OPS) / last["step"]
        out["gather_bytes_per_step"] = 4 * sum(v for k, v in ds.items() if "gather" in k) / last["step"]
    return out


def report(args: argparse.Namespace) -> None:
    rows = {n: summary(n, r) for n in RUNS if (r := read(Path(args.out) / n)) and r[-1]["step"] >= args.end}
    sync = rows.get("sync")
    if sync is None and args.end != 600:
        sync = {}
        print(f"(synchronous: not in {args.out}; no ratios)")
    elif sync is None:
        sync = SYNC_2026_12_02
        print(f"(synchronous: not in {args.out}; the 2026-12-02 run's val loss {sync['val_loss']} and "
              f"{sync['grad_bytes_per_step']:,} gradient bytes per step)")
    print(f"\n{'run':<24} {'step':>5} {'val loss':>9} {'vs sync':>8} {'bytes/step':>12} {'vs sync grads':>14} "
          f"{'tok/s':>7}")
    for n, r in rows.items():
        rel = (f"{r['val_loss'] / sync['val_loss'] - 1:+.2%}" if sync.get("val_loss") and r["val_loss"] else "")
        b = r.get("cross_bytes_per_step", r.get("grad_bytes_per_step"))
        x = sync.get("grad_bytes_per_step", 0) / b if b else 0
        ratio = ((f"1/{x:,.0f}" if x >= 10 else f"1/{x:.2f}") if "cross_bytes_per_step" in r and x else "")
        print(f"{n:<24} {r['step']:>5} {r['val_loss'] or float('nan'):>9.4f} {rel:>8} {b or 0:>12,.0f} {ratio:>14} "
              f"{r['tokens_per_s']:>7,.0f}")
    if "gather_bytes_per_step" in sync:
        print(f"(synchronous: gradient reductions {sync['grad_bytes_per_step']:,.0f} B/step, ZeRO parameter "
              f"all-gathers {sync['gather_bytes_per_step']:,.0f} B/step, all ranks)")
    if rows:
        plot(args, [n for n in RUNS if read(Path(args.out) / n)])   # unfinished runs too, labelled so
    report_util(Path(args.out))


def report_util(out: Path) -> float | None:
    """Prints the utilisation runs found in ``out``; -> util_wan's steps/s over util_nolink's."""
    util = {n: rec for n in UTIL if (rec := read(out / n))}
    if "util_nolink" not in util:
        return None
    base = _steps_per_s(util["util_nolink"])
    print(f"\nutilisation in {out} ({util['util_nolink'][-1]['step']} steps; steps/s over the summed step "
          f"times past step 10): H=50 int8, no link emulation: {base:.3f} steps/s")
    for n in ("util_wan", "util_wan_tau5", "util_sync", "util_sync_wan"):
        if n not in util:
            continue
        r, last = _steps_per_s(util[n]), util[n][-1]
        blocked = last.get("wan_blocked_s_total")
        wan = [json.loads(f.read_text()) for f in sorted((out / n).glob("wan_rank*.json"))]
        if wan:
            blocked = sum(w["blocked_s"] for w in wan) / len(wan)
        line = f"  {n}: {r:.3f} steps/s ({r / base:.1%} of H=50 int8 with no link, another run)"
        if blocked is not None:   # the in-run ratio: the same steps without the time spent blocked
            share = blocked / last["step"] * r            # blocked per step x steps/s
            line += (f"; blocked on the link {blocked:.2f} s in {last['step']} steps (mean of ranks), "
                     f"{share:.1%} of the step time: {1 - share:.1%} of the same run's steps/s without it")
        print(line)
    return _steps_per_s(util["util_wan"]) / base if "util_wan" in util else None


def utilisation_rounds(args: argparse.Namespace) -> None:
    """util_nolink and util_wan alternating, ``--util-rounds`` times (nolink first in even rounds,
    the link first in odd ones), each pair in ``<out>/util_round<i>``: load drift on a shared
    machine hits both alike; prints each round's ratio and their median."""
    ratios = []
    for i in range(args.util_rounds):
        sub = argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / f"util_round{i}")})
        for name in (["util_nolink", "util_wan"] if i % 2 == 0 else ["util_wan", "util_nolink"]):
            run(name, sub)
        if (ratio := report_util(Path(sub.out))) is not None:
            ratios.append(ratio)
    if ratios:
        print(f"\nutil_wan / util_nolink by round: {', '.join(f'{r:.1%}' for r in ratios)}; "
              f"median {statistics.median(ratios):.1%}")


def _steps_per_s(rec: list[dict]) -> float:
    """Steps/s past the first 10 steps: steps over the summed step times (each logged interval's
    time is its tokens over its tokens/s; evaluation is outside the step time), so the intervals
    holding an outer step's wait count in full."""
    per_step = rec[0]["tokens"] / rec[0]["step"]
    steps = secs = 0.0
    for prev, r in zip(rec, rec[1:]):
        if prev["step"] >= 10 and r["step"] > prev["step"]:
            steps += r["step"] - prev["step"]
            secs += (r["step"] - prev["step"]) * per_step / r["tokens_per_s"]
    return steps / secs


def train_over_wan(argv: list[str]) -> int:
    """A rank of ``deepspeed ... bench_sites.py --train-over-wan GBPS MS SITE_SIZE <train.py args>``:
    train.py with DeepSpeed's reductions over the emulated link; writes the link's counters."""
    sys.path.insert(0, str(ROOT))
    from parallel.link import emulate_wan_on_deepspeed

    gbps, ms, site_size = argv[:3]
    link = emulate_wan_on_deepspeed(float(gbps), float(ms), int(site_size))
    import train

    rc = train.main(argv[3:])
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("train.out_dir="))
    rank = int(os.environ.get("RANK", 0))
    (Path(out) / f"wan_rank{rank}.json").write_text(json.dumps({"sent_bytes": link.sent_bytes,
                                                                 "blocked_s": link.blocked_s}))
    return rc


def plot(args: argparse.Namespace, rows: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for n in rows:
        rec = read(Path(args.out) / n)
        style = dict(lw=2, color="k") if n == "sync" else dict(lw=1, ls="--" if "int8" in n else "-")
        if rec[-1]["step"] < args.end:
            n = f"{n} (stopped at {rec[-1]['step']})"
        a.plot([r["step"] for r in rec], [r["lm_loss"] for r in rec], label=n, **style)
        val = [r for r in rec if "val_loss" in r]
        b.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label=n, **style)
    a.set(xlabel="inner step", ylabel="train LM loss (mean of ranks)", title="training", ylim=(3, 8))
    if "sync" not in rows and args.end == 600:
        b.axhline(SYNC_2026_12_02["val_loss"], color="k", lw=2, label="sync, step 600 (2026-12-02)")
    b.set(xlabel="inner step", ylabel="validation loss", title="validation")
    b.legend()
    fig.suptitle(f"2 sites x 2 ranks (ep=2) vs synchronous 4-rank DP, configs/tiny.yaml, {args.steps} steps")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


def main() -> int:
    if "--train-over-wan" in sys.argv:
        i = sys.argv.index("--train-over-wan")
        return train_over_wan(sys.argv[i + 1:] + sys.argv[1:i])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/sites")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--stop-at", type=int, default=None,
                    help="end each run after this step (train.stop_at: the LR schedule still spans --steps)")
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parent / "sites_loss.png"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--utilisation", action="store_true", help="also the short runs with the emulated link")
    ap.add_argument("--util-steps", type=int, default=100)
    ap.add_argument("--util-rounds", type=int, default=0,
                    help="util_nolink / util_wan alternating this many times, in <out>/util_round<i>")
    ap.add_argument("--no-report", action="store_true", help="only run")
    args = ap.parse_args()
    args.end = args.stop_at or args.steps              # the last step of a finished (or stopped) run
    if not args.report_only:
        for name in [n for n in args.runs.split(",") if n] + (list(UTIL) if args.utilisation else []):
            run(name, args)
    if args.util_rounds:
        utilisation_rounds(args)
    if not args.no_report:
        report(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
