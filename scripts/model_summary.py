"""Print total and activated parameters and training FLOPs per token of a config, and with
``--plan`` the per-rank memory of a training layout (model/memory_plan.py).

    python scripts/model_summary.py --config configs/deepseek_v3_671b.yaml [--json]
    python scripts/model_summary.py --config C --plan world=W,ep=E,zero=Z,dtype=D[,offload=cpu][,mbs=B,seq=S]
        [--gpu-gib 80]   (also: does it fit on such cards, and the smallest world that does)
    ... --plan world=W,...,pp=P[,schedule=1f1b|interleaved|dualpipev][,accum=M]   (a pipeline: every rank's
        stages, state and in-flight activations; the largest rank is the plan)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import load_config  # noqa: E402
from model.flops import count_params  # noqa: E402
from model.memory_plan import GiB, fits, plan, smallest_worlds  # noqa: E402
from parallel.layout import parse_plan  # noqa: E402

if TYPE_CHECKING:
    from configs.schema import Config
    from model.memory_plan import Layout, Plan

VARIANTS = (("plain", "no activation checkpointing"), ("checkpointed", "activation checkpointing"),
            ("fp8", "FP8 (cached E4M3 inputs)"), ("fp8+checkpointed", "FP8 + activation checkpointing"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--plan", default=None, help="world=W,ep=E,zero=Z,dtype=fp32|bf16[,offload=cpu][,mbs=B,seq=S]"
                    "[,pp=P,schedule=S,accum=M]")
    ap.add_argument("--gpu-gib", type=float, default=None, help="with --plan: say what fits on cards this large")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.plan is not None:
        return print_plan(cfg, args)
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


def print_plan(cfg: Config, args: argparse.Namespace) -> dict:
    lay = parse_plan(args.plan, cfg)
    pl = plan(cfg.model, lay)
    out = pl.as_dict()
    cap = None if args.gpu_gib is None else args.gpu_gib * GiB
    if cap is not None:
        out["fits"] = {v: fits(pl, v, cap) for v, _ in VARIANTS}
    if cap is not None and lay.pp == 1:
        out["smallest_world"] = {
            v: None if w is None else {"world": w.world, "ep": w.ep, "device": plan(cfg.model, w).device_total(v),
                                       "host": plan(cfg.model, w).state.host}
            for v, w in smallest_worlds(cfg.model, lay, cap).items()}
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    g = lambda b: f"{b / GiB:9.2f}"  # noqa: E731
    st, pr = pl.state, pl.params
    E = max(1, cfg.model.n_routed_experts)
    here = lay.experts_here(E)
    print(f"memory plan: {args.config or 'configs/tiny.yaml'}, world {lay.world}, ep {lay.ep} (expert data "
          f"parallel {lay.edp}), ZeRO-{lay.zero}, {lay.dtype}{', optimizer offloaded to CPU' if lay.offload else ''}, "
          f"{lay.mbs} x {lay.seq} tokens per rank")
    print(f"parameters: {pr.total / 1e9:.2f} B ({pr.dense / 1e9:.2f} B replicated on every rank, routed experts "
          f"{pr.experts / 1e9:.2f} B over ep {lay.ep}); per rank {(pr.dense + pr.experts * here / E) / 1e9:.2f} B")
    if lay.rank_experts:
        print(f"expert placement {cfg.parallel.expert_placement}: the plan is for the largest rank, {here} of {E} "
              f"experts per MoE layer, {lay.rank_copies:.2f}x the balanced routed copies")
    if pl.pipeline:
        print_pipeline(pl, lay)
    print(f"{'per rank, GiB':34s} {'device':>9s} {'host':>9s}")
    for name, dev, host in (("weights", st.weights, 0), ("gradients (peak)", st.grads, st.grads_host),
                            ("fp32 master weights", st.master, st.master_host),
                            ("AdamW moments (2 x fp32)", st.moments, st.moments_host),
                            ("DeepSpeed buffers", st.buffers, st.buffers_host),
                            ("state in all", st.device, st.host)):
        print(f"  {name:32s} {g(dev)} {g(host)}")
    for v, label in VARIANTS:
        fit = "" if cap is None else ("  fits" if fits(pl, v, cap) else "  does not fit")
        print(f"  activations, {label:32s} {g(pl.activations[v])}   device total {g(pl.device_total(v))}{fit}")
    print(f"checkpoint on disk: {pl.checkpoint_total / GiB:.2f} GiB (12 bytes per parameter + router biases), "
          f"{pl.checkpoint_per_rank / GiB:.2f} GiB written by each rank")
    if cap is not None and lay.pp == 1:
        print(f"on {args.gpu_gib:g} GiB cards (the plan may fill 90%), smallest world that fits, with the largest "
              "ep dividing it and the experts:")
        for v, label in VARIANTS:
            w = out["smallest_world"][v]
            print(f"  {label:40s} " + ("none up to 8192 ranks" if w is None else
                                        f"world {w['world']}, ep {w['ep']}: {w['device'] / GiB:.1f} GiB on the device"
                                        + (f", {w['host'] / GiB:.1f} GiB of host memory per rank" if w["host"]
                                           else "")))
    return out


def print_pipeline(pl: Plan, lay: Layout) -> None:
    """One line per pipeline rank: its stages, layers, micro-batches in flight, state and activations."""
    g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
    print(f"pipeline: pp {lay.pp}, {lay.pp_schedule}, {lay.micro_batches} micro-batches, stages of "
          f"{[len(s) for s in lay.pp_split]} layers; ZeRO and EP over the {lay.world // lay.pp} ranks of a stage")
    print(f"  {'rank':>4s} {'stages':>9s} {'layers':>6s} {'in flight':>10s} {'params B':>8s} {'state':>7s} "
          f"{'plain':>7s} {'ckpt':>7s}   (GiB; the largest rank is planned below)")
    for r in pl.pipeline:
        print(f"  {r.rank:4d} {str(r.stages):>9s} {len(r.layers):6d} {str(list(r.in_flight.values())):>10s} "
              f"{(r.params.dense + r.params.experts / lay.ep) / 1e9:8.2f} {g(r.state.device)} "
              f"{g(r.activations['plain'])} {g(r.activations['checkpointed'])}")


if __name__ == "__main__":
    main()
