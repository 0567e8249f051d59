"""Mixed hardware: 2 ranks, one emulated at half speed, against the ideal (the sum of the two ranks'
solo speeds), with equal shares and with capacity-weighted shares and experts.

    python benchmarks/studies/mixed_hardware/bench_mixed.py [--out runs/mixed] [--rounds 2] [--steps 14] \
        [--plot benchmarks/studies/mixed_hardware/mixed_rank_times.png]

Every process runs with one CPU thread (OMP_NUM_THREADS=1), so a rank alone and a rank of the pair
have the same resources; the two solo runs run at the same time, one process per core, so each
solo speed is measured beside a busy neighbour core, as a rank of the pair is (alone on the
machine a process runs up to a third faster here: shared caches and memory bandwidth).
configs/tiny.yaml on the embedded corpus, ``--mbs`` rows of ``--seq`` tokens per rank per step (the
global batch is 2 x mbs rows in every run), parallel.ep=2 for the pairs, rank 1 slowed by
``parallel.emulate_slowdown={1: 2.0}`` (it sleeps as long again as it computes). Runs, alternating
in each round so drift hits them alike:

    solo        two single processes at once (ep 1, all experts, the whole global batch each):
                solo_fast, and solo_slow slowed x2 (2x fewer steps, so both run about as long)
                                                            ideal = solo_fast + solo_slow tokens/s
    equal       the pair, equal shares, even experts        (expected near 0.67 of the ideal)
    homog       (diagnostic, not in the default list) the pair with neither rank slowed, equal shares:
                against 2 x solo_fast it shows what ep=2 itself costs on this machine (gloo's loopback
                copies run on the ranks' own cores; the dispatch's permutes)
    true        the pair, rank_capacity=[2, 1], expert_placement=capacity (the true ratio, given)
    true_resumed  (diagnostic, not in the default list) the same, stopped after probe+1 steps and
                resumed, timed after the resume as auto is
    auto        the pair, rank_capacity=auto: a first launch measures the shares over
                capacity_probe_steps steps and saves; the resume places experts by them
                (expert_placement=capacity) and is the one timed
    auto_load   (not in the default list) as auto, but the resume packs experts by the checkpoint's
                router counts and the measured shares (expert_placement=load)

Tokens/s is the median of the logged per-step values past ``--skip`` steps from the start (default
probe + 3: every run times the same steps as auto's resumed launch, since from scratch the router's
expert-load imbalance, and with it the ranks' all-to-all waits, grows over the first ~10 steps).
``--init CKPT`` starts every run from a checkpoint (a resume, resharded to each run's layout), so
the timed steps can be past that transient.
Printed last: each run's tokens/s over the ideal, auto's shares against the true 2:1, and each
rank's step / compute / wait seconds; the per-rank times of the pair runs go to ``--plot``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SLOW = 2.0


def metrics(out: Path) -> list[dict]:
    f = out / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def start(n: int, args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = ([sys.executable, str(ROOT / "train.py")] if n == 1 else
           ["deepspeed", "--num_gpus", str(n), str(ROOT / "train.py")]) + args
    f = open(log, "a")
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    p.log = log
    return p


def finish(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.wait():
            sys.exit(f"{' '.join(map(str, p.args[:4]))} ... failed ({p.returncode}); see {p.log}")


def launch(n: int, args: list[str], log: Path) -> None:
    finish(start(n, args, log))


def common(a, out: Path, rows: int) -> list[str]:
    return [f"train.out_dir={out}", f"train.micro_batch_size={rows}", f"data.seq_len={a.seq}",
            "train.log_every=1", "train.eval_every=100000", "train.eval_batches=0", "train.save_every=100000",
            "logging.progress=false", f"data.cache_dir={a.cache}", "deepspeed.zero_optimization.stage=1",
            f"train.grad_accum={a.accum}", *a.model_args]


def fresh(a, name: str, rnd: int) -> Path:
    out = Path(a.out) / f"{name}_{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def summary(out: Path, first: int) -> dict:
    rec = [r for r in metrics(out) if r["step"] > first]
    res = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rec), "steps": len(rec)}
    if "rank_step_s" in rec[-1]:
        for key in ("rank_step_s", "rank_busy_s", "rank_wait_s"):
            res[key] = [statistics.median(r[key][i] for r in rec) for i in range(2)]
        res["rank_share"] = rec[-1]["rank_share"]
    return res


def init_step(a) -> int:
    """The step of ``--init``'s checkpoint (0 without one): every run starts there."""
    return json.loads((Path(a.init) / "trainer_state.json").read_text())["step"] if a.init else 0


def from_init(a) -> list[str]:
    return [f"train.resume={a.init}"] if a.init else []


def run_solo(a, rnd: int) -> tuple[dict, dict]:
    """Both solo runs at once, one per core (the fast one twice as many steps, so they overlap)."""
    fast, slow = fresh(a, "solo_fast", rnd), fresh(a, "solo_slow", rnd)
    base = a.base
    p = start(1, common(a, fast, 2 * a.mbs) + from_init(a) + [f"train.max_steps={base + 2 * a.steps}"],
              fast / "log.txt")
    q = start(1, common(a, slow, 2 * a.mbs) + from_init(a) + [f"train.max_steps={base + a.steps}",
                                                              f"parallel.emulate_slowdown={{0: {SLOW}}}"],
              slow / "log.txt")
    finish(p, q)
    return summary(fast, base + a.skip), summary(slow, base + a.skip)


def run(name: str, a, rnd: int) -> dict:
    out = fresh(a, name, rnd)
    log = out / "log.txt"
    base = a.base
    steps = [f"train.max_steps={base + a.steps}"]
    start_args = steps + from_init(a)    # a launch from the start (or --init); resumes add train.resume=auto
    pair = ["parallel.ep=2", f"parallel.emulate_slowdown={{1: {SLOW}}}", *a.pair_args]
    first = base + a.skip            # the same timed steps in every run (--skip, default: auto's)
    if name == "equal":
        launch(2, common(a, out, a.mbs) + start_args + pair, log)
    elif name == "homog":          # reference: the pair with no slowed rank (equal shares, even experts)
        launch(2, common(a, out, a.mbs) + start_args + ["parallel.ep=2", *a.pair_args], log)
    elif name == "true":
        launch(2, common(a, out, a.mbs) + start_args + pair + ["parallel.rank_capacity=[2, 1]",
                                                               "parallel.expert_placement=capacity"], log)
    elif name == "true_resumed":   # diagnostic: the [2, 1] run timed after a resume, as auto's is
        cap = pair + ["parallel.rank_capacity=[2, 1]", "parallel.expert_placement=capacity"]
        launch(2, common(a, out, a.mbs) + start_args + cap + [f"train.stop_at={base + a.probe + 1}"], log)
        launch(2, common(a, out, a.mbs) + steps + cap + ["train.resume=auto"], log)
    elif name in ("auto", "auto_load"):
        probe = ["parallel.rank_capacity=auto", f"parallel.capacity_probe_steps={a.probe}"]
        # the probe's launch stops (and saves) one step after the shares are fixed
        launch(2, common(a, out, a.mbs) + start_args + pair + probe + [f"train.stop_at={base + a.probe + 1}"],
               log)
        place = "capacity" if name == "auto" else "load"
        launch(2, common(a, out, a.mbs) + steps + pair + probe + ["train.resume=auto",
                                                               f"parallel.expert_placement={place}"], log)
    return summary(out, first)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("equal", "true", "auto", "auto_load") if n in results]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, n in enumerate(names):
        r = results[n]
        for rank in range(2):
            x = i * 3 + rank
            ax.bar(x, r["rank_busy_s"][rank], color="tab:blue", label="compute" if x == 0 else None)
            ax.bar(x, r["rank_wait_s"][rank], bottom=r["rank_busy_s"][rank], color="tab:orange",
                   label="waiting" if x == 0 else None)
            ax.text(x, 0, f"r{rank}\n{r['rank_share'][rank]:.2f}", ha="center", va="bottom", fontsize=7, color="w")
    ax.set_xticks([i * 3 + 0.5 for i in range(len(names))],
                  [{"equal": "equal shares", "true": "capacity [2,1]", "auto": "auto + capacity",
                   "auto_load": "auto + load"}[n] for n in names])
    ax.set_ylabel("seconds per step (median)")
    ax.set_title("rank 1 emulated at half speed: per-rank step time (labels: token share)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mixed")
    p.add_argument("--cache", default=".cache/data")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--probe", type=int, default=4)
    p.add_argument("--mbs", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--accum", type=int, default=1, help="train.grad_accum: micro-batches per step")
    p.add_argument("--runs", default="solo,equal,true,auto")
    p.add_argument("--model-args", nargs="*", default=[],
                   help="train.py overrides for every run, solo included (e.g. model.moe_intermediate_size=512)")
    p.add_argument("--pair-args", nargs="*", default=[], help="more train.py overrides for the pair runs")
    p.add_argument("--plot", default=None)
    p.add_argument("--init", default=None, help="a checkpoint every run resumes from (e.g. one past the "
                   "router's first imbalance, so the timed steps are the steady state)")
    p.add_argument("--skip", type=int, default=None, help="steps after the start not timed "
                   "(default probe + 3: auto's probe launch, its first step and two more after the resume)")
    a = p.parse_args()
    a.skip = a.probe + 3 if a.skip is None else a.skip
    a.base = init_step(a)
    names = a.runs.split(",")
    per_round: dict[str, list[dict]] = {}
    for rnd in range(a.rounds):
        for n in names:
            got = dict(zip(("solo_fast", "solo_slow"), run_solo(a, rnd))) if n == "solo" else {n: run(n, a, rnd)}
            for k, v in got.items():
                per_round.setdefault(k, []).append(v)
                print(f"round {rnd} {k}: {v}", flush=True)
    results = {}
    for n, rs in per_round.items():
        results[n] = dict(rs[-1], tokens_per_s=statistics.median(r["tokens_per_s"] for r in rs),
                          rounds=[round(r["tokens_per_s"], 1) for r in rs])
    print("\nmachine: 2-core CPU, 1 thread per process (solo runs side by side), fp32; rank 1 slowed x2; "
          f"global batch {2 * a.mbs * a.accum} x {a.seq} tokens ({a.accum} micro-batches per step)"
          + (f"; {' '.join(a.model_args)}" if a.model_args else "")
          + (f"; pairs: {' '.join(a.pair_args)}" if a.pair_args else ""))
    ideal = None
    if "solo_fast" in results and "solo_slow" in results:
        ideal = results["solo_fast"]["tokens_per_s"] + results["solo_slow"]["tokens_per_s"]
        print(f"ideal (solo fast + solo slow) {ideal:,.1f} tok/s "
              f"(solo {results['solo_fast']['tokens_per_s']:,.1f} + {results['solo_slow']['tokens_per_s']:,.1f})")
    print(f"{'run':<10} {'tok/s':>9} {'x ideal':>8}  rounds        shares          step s (r0, r1)   "
          "compute s        wait s")
    for n, r in results.items():
        ratio = f"{r['tokens_per_s'] / ideal:.3f}" if ideal else "-"
        extra = ""
        if "rank_share" in r:
            extra = (f"{[round(x, 3) for x in r['rank_share']]!s:<15} {[round(x, 3) for x in r['rank_step_s']]!s:<17}"
                     f" {[round(x, 3) for x in r['rank_busy_s']]!s:<16} {[round(x, 3) for x in r['rank_wait_s']]}")
        print(f"{n:<10} {r['tokens_per_s']:>9,.1f} {ratio:>8}  {r['rounds']!s:<13} {extra}")
    if "homog" in results and "solo_fast" in results:
        homog = results["homog"]["tokens_per_s"] / (2 * results["solo_fast"]["tokens_per_s"])
        print(f"homog (no rank slowed) / (2 x solo_fast): {homog:.3f}"
              " (what ep=2 costs at equal speeds; solo_fast ran beside the slowed solo)")
    if "auto" in results:
        s = results["auto"]["rank_share"]
        print(f"auto's shares {s[0]:.3f} : {s[1]:.3f} = {s[0] / s[1]:.2f} : 1 (true 2 : 1)")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))
    if a.plot:
        plot(results, a.plot)


if __name__ == "__main__":
    main()
