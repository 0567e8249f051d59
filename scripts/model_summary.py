"""Print total and activated parameters and training FLOPs per token of a config.

    python scripts/model_summary.py --config configs/deepseek_v3_671b.yaml [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import load_config  # noqa: E402
from model.flops import count_params  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    p = count_params(cfg.model, seq_len=cfg.data.seq_len)
    out = p.as_dict()
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    b = 1e9
    print(f"config: {args.config or 'configs/tiny.yaml'}")
    print(f"total parameters (main model):      {p.total / b:10.3f} B   (embedding {p.embedding / b:.3f} B, "
          f"lm_head {p.lm_head / b:.3f} B)")
    print(f"activated per token (with embedding): {p.activated / b:8.3f} B")
    print(f"activated per token (no embedding):   {p.activated_no_embedding / b:8.3f} B")
    print(f"MTP modules (shared embedding/head not repeated): total {p.mtp_total / b:.3f} B, "
          f"activated {p.mtp_activated / b:.3f} B")
    print(f"training FLOPs per token at seq_len {p.seq_len}: {p.flops_per_token_train / b:.2f} GFLOP "
          f"({p.flops_per_token_train_with_mtp / b:.2f} with MTP)")
    return out


if __name__ == "__main__":
    main()
