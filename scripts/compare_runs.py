"""Overlay the loss curves of several runs and print how far their final losses are apart.

    python scripts/compare_runs.py RUN_A RUN_B [...] [--labels fp32,fp8] [--out benchmarks/results/compare.png]

"final" is the mean of the last ``--tail`` logged training losses (single steps are noisy at
small batch); the relative difference is against the first run.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plot_metrics import read_metrics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--labels", default=None, help="comma separated, one per run")
    ap.add_argument("--key", default="loss", help="metric to compare (loss, lm_loss, val_loss, ...)")
    ap.add_argument("--tail", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    series = {}
    for label, run in zip(labels, args.runs):
        recs = [r for r in read_metrics(run) if r.get(args.key) is not None]
        series[label] = ([r["step"] for r in recs], [r[args.key] for r in recs])
    base = None
    for label, (steps, vals) in series.items():
        tail = vals[-args.tail:]
        final = sum(tail) / len(tail)
        base = final if base is None else base
        print(f"{label:>10}: steps {steps[-1]}, {args.key} first {vals[0]:.4f}, final (mean of last {len(tail)}) "
              f"{final:.4f}, last {vals[-1]:.4f}, relative to {labels[0]}: {(final - base) / base:+.2%}")
    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, (steps, vals) in series.items():
            ax.plot(steps, vals, label=label, alpha=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel(args.key)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=120)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
