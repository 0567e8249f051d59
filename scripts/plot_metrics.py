"""Plot a run's metrics.jsonl: loss (total, LM, MTP, validation), learning rate, expert load.

    python scripts/plot_metrics.py OUT_DIR [--out PNG]      (default: OUT_DIR/metrics.png)

A resumed run appends to metrics.jsonl; for a step logged twice the last record wins.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {out_dir} a training run's out_dir?")
    by_step: dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    if not by_step:
        raise ValueError(f"{path} holds no records")
    return [by_step[s] for s in sorted(by_step)]


def plot(records: list[dict], png: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    fig, (ax_loss, ax_lr, ax_load) = plt.subplots(3, 1, figsize=(8, 9), sharex=True,
                                                  gridspec_kw={"height_ratios": [3, 1, 1.5]})
    ax_loss.plot(steps, [r["loss"] for r in records], label="loss (lm + aux + mtp)", alpha=0.6)
    ax_loss.plot(steps, [r["lm_loss"] for r in records], label="lm loss")
    ax_loss.plot(steps, [r["mtp_loss"] for r in records], label="mtp loss (weighted)", alpha=0.7)
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax_loss.plot(*zip(*val), "o-", label="val lm loss")
    ax_loss.set_ylabel("loss (nats)")
    ax_loss.set_title(title)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.grid(alpha=0.3)
    loads = [r.get("expert_load_imbalance") or [] for r in records]
    for i in range(max(map(len, loads), default=0)):
        ax_load.plot(steps, [x[i] if i < len(x) else float("nan") for x in loads], label=f"MoE layer {i}")
    ax_load.axhline(1.0, color="k", lw=0.5)
    ax_load.set_ylabel("expert load\nmax / mean")
    ax_load.set_xlabel("step")
    ax_load.grid(alpha=0.3)
    if loads and loads[0]:
        ax_load.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--out", type=Path, default=None, help="PNG path (default OUT_DIR/metrics.png)")
    args = p.parse_args(argv)
    try:
        records = read_metrics(args.out_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    png = args.out or args.out_dir / "metrics.png"
    last = records[-1]
    plot(records, png, f"{args.out_dir.name}: step {last['step']}, lm loss {last['lm_loss']:.3f}")
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
