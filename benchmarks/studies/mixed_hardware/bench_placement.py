"""Expert placement benchmark (issue 19): the slowest EP rank's time in the expert GEMMs over the
mean, for the even, capacity and load placements, on expert loads measured in a real run.

    python benchmarks/studies/mixed_hardware/bench_placement.py --loads runs/X/metrics.jsonl  # or a checkpoint/run dir
    python benchmarks/studies/mixed_hardware/bench_placement.py                               # trains the loads itself:
        python train.py train.max_steps=60 train.bias_update_speed=0 ... (tiny preset, bias updates off,
        so the router's skew stays), then reads its metrics.jsonl ("expert_load", summed)

For every EP size and capacity set, every placement (parallel/expert/placement.py) of the measured loads
gives each EP rank its experts and, per MoE layer, the token copies they receive in one step
(``--tokens`` tokens per EP rank x top-k copies, spread over the experts as the loads say). Each
rank's work, its experts' SwiGLU grouped GEMMs forward + backward in fp32 (model.moe.RoutedExperts,
the training path), is timed on this CPU, ranks one after another in this one process,
placements interleaved, medians over ``--repeats``. A rank of capacity c is emulated as 1/c times
slower (its time is divided by c). Every MoE layer's all-to-all waits for that layer's slowest
rank, so the figure (the issue's "slowest rank's time in the expert GEMMs over the mean") is

    slowest / mean = sum over layers of max_r t(l, r)  /  sum over layers of mean_r t(l, r)

(1.0: no rank ever waits for another). Printed per case: each rank's median ms summed over the
layers, that ratio measured, and the same ratio from token counts alone (modelled: tokens /
capacity), which does not depend on timing noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.timing import alternate  # noqa: E402
from parallel.expert.placement import build_placement, capacity_counts, rank_loads, read_expert_loads  # noqa: E402


def train_for_loads(out: Path, steps: int, extra: list[str]) -> Path:
    """A short real run of the tiny preset with bias updates off; returns its metrics.jsonl."""
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        print(f"loads: reusing {metrics}")
        return metrics
    cmd = [sys.executable, str(ROOT / "train.py"), f"train.max_steps={steps}", "train.bias_update_speed=0",
           "train.eval_batches=0", "train.save_every=100000", "train.log_every=10", f"train.out_dir={out}",
           "logging.progress=false", *extra]
    print("loads: " + " ".join(cmd[1:]), flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return metrics


def model_dims(loads_path: Path, config: str | None) -> tuple[int, int, int]:
    """(hidden_size, moe_intermediate_size, num_experts_per_tok) of the run the loads came from."""
    if config is None:
        run = loads_path if loads_path.is_dir() else loads_path.parent
        for f in ("trainer_state.json",):
            if (run / f).is_file():
                m = json.loads((run / f).read_text())["config"]["model"]
                return m["hidden_size"], m["moe_intermediate_size"], m["num_experts_per_tok"]
        ckpts = sorted((run / "checkpoints").glob("step_*/trainer_state.json"))
        if ckpts:
            m = json.loads(ckpts[-1].read_text())["config"]["model"]
            return m["hidden_size"], m["moe_intermediate_size"], m["num_experts_per_tok"]
        config = str(ROOT / "configs" / "tiny.yaml")
    from configs.schema import load_config
    m = load_config(config, []).model
    return m.hidden_size, m.moe_intermediate_size, m.num_experts_per_tok


def rank_work(load_row: torch.Tensor, ids: list[int], copies: int, D: int, F: int, gen: torch.Generator):
    """One EP rank's grouped-GEMM inputs for one layer: its experts' copies of a step's ``copies``
    token copies, spread over all experts in proportion to the measured loads."""
    from model.moe import RoutedExperts

    share = load_row / load_row.sum().clamp_min(1e-12)
    counts = torch.round(share[ids] * copies).long()                    # (n_r,)
    experts = RoutedExperts(len(ids), D, F)
    with torch.no_grad():
        experts.w_gate_up.normal_(0, 0.02, generator=gen)
        experts.w_down.normal_(0, 0.02, generator=gen)
    x = torch.randn(int(counts.sum()), D, generator=gen)
    return experts, x, counts


def gemm_step(experts, x, counts):
    """One rank's forward + backward of its experts' grouped GEMMs for one layer, as a call to time."""
    x = x.detach().requires_grad_(True)

    def step() -> None:
        x.grad = None
        experts.zero_grad(set_to_none=True)
        y = experts(x, counts)
        y.backward(torch.ones_like(y))
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", help="metrics.jsonl, a run directory or a checkpoint with 'expert_load'")
    ap.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_placement_loads"),
                    help="where the loads run writes (when --loads is not given)")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--train-arg", action="append", default=[], help="extra train.py override for the loads run")
    ap.add_argument("--config", help="model config for the GEMM sizes (default: the loads run's)")
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--capacities", default="1;2,1",
                    help="';'-separated capacity sets, repeated over the EP ranks (2,1 at ep 4: 2,1,2,1)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per EP rank per step (micro batch x seq)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    path = Path(args.loads) if args.loads else train_for_loads(Path(args.run_dir), args.train_steps, args.train_arg)
    loads = read_expert_loads(path)                                     # (L, E)
    L, E = loads.shape
    D, F, K = model_dims(path, args.config)
    imb = (loads.max(1).values / loads.mean(1)).tolist()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), fp32")
    print(f"loads: {path}: {L} MoE layers x {E} experts, {int(loads.sum())} routed copies; per-layer max/mean "
          f"{', '.join(f'{x:.2f}' for x in imb)}")
    print(f"GEMMs: hidden {D}, expert width {F}, top-{K}, {args.tokens} tokens per EP rank per step, SwiGLU "
          f"forward + backward, median of {args.repeats}")

    results = []
    gen = torch.Generator().manual_seed(0)
    for ep in args.ep:
        cap_sets = []
        for spec in args.capacities.split(";"):                       # a set repeats over the EP ranks
            vals = [float(c) for c in spec.split(",")]
            caps = [vals[i % len(vals)] for i in range(ep)]
            if caps not in cap_sets:
                cap_sets.append(caps)
        for caps in cap_sets:
            copies = args.tokens * ep * K                               # token copies of one step, all ranks
            modes = ["even", "load"] if len(set(caps)) == 1 else ["even", "capacity", "load"]
            if E % ep:
                modes.remove("even")
            work = {}
            for mode in modes:
                pl = build_placement(mode, L, E, ep, caps, loads)
                work[mode] = (pl, [[rank_work(loads[li], pl[li][r], copies, D, F, gen) for li in range(L)]
                                   for r in range(ep)])
            # interleaved: every (placement, rank, layer) once per round, so drift hits all alike
            timed = alternate({(mode, r, li): gemm_step(*w) for mode in modes for r in range(ep)
                               for li, w in enumerate(work[mode][1][r])}, args.repeats, args.warmup)
            times = {m: [[[t / caps[r] for t in timed[m, r, li].seconds]           # [rank][layer]; a rank of
                          for li in range(L)] for r in range(ep)] for m in modes}   # capacity c is 1/c as fast
            print(f"\nep {ep}, capacities {caps} (counts by capacity {capacity_counts(E, caps)}):")
            print(f"  {'placement':<10} {'experts per rank (layer 0)':<28} {'ms per rank (all layers)':<36} "
                  f"{'slowest/mean':>12} {'modelled':>9}")
            for mode in modes:
                pl = work[mode][0]
                med = [[statistics.median(ts) * 1e3 for ts in per_layer] for per_layer in times[mode]]   # [r][l]
                ratio = (sum(max(med[r][li] for r in range(ep)) for li in range(L))
                         / sum(statistics.mean(med[r][li] for r in range(ep)) for li in range(L)))
                tok = [[rank_loads(pl[li], loads[li].tolist())[r] / caps[r] for li in range(L)] for r in range(ep)]
                modelled = (sum(max(tok[r][li] for r in range(ep)) for li in range(L))
                            / sum(statistics.mean(tok[r][li] for r in range(ep)) for li in range(L)))
                per_rank = [sum(m) for m in med]
                counts = "/".join(str(len(ids)) for ids in pl[0])
                print(f"  {mode:<10} {counts:<28} {' '.join(f'{m:7.1f}' for m in per_rank):<36} {ratio:12.3f} "
                      f"{modelled:9.3f}")
                results.append({"ep": ep, "capacities": caps, "placement": mode, "ms_per_rank_layer": med,
                                "slowest_over_mean": ratio, "modelled_slowest_over_mean": modelled,
                                "step_ms": sum(max(med[r][li] for r in range(ep)) for li in range(L)),
                                "experts_per_rank": [[len(ids) for ids in layer] for layer in pl]})
            base = next(r for r in results if r["ep"] == ep and r["capacities"] == caps and r["placement"] == modes[0])
            best = next(r for r in results if r["ep"] == ep and r["capacities"] == caps and r["placement"] == "load")
            print(f"  load vs {modes[0]}: slowest/mean {best['slowest_over_mean']:.3f} vs "
                  f"{base['slowest_over_mean']:.3f} (goal <= 1.1); expert-GEMM time of a step (sum of the "
                  f"layers' slowest ranks) {best['step_ms'] / base['step_ms']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"loads": str(path), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
