"""Expert-parallel MoE layer: forward+backward time with overlap off vs on, side by side,
over several emulated interconnect bandwidths, on 2 gloo processes (CPU).

    python benchmarks/bench_ep.py [--tokens 4096] [--bandwidths 0.5,1,2,4,8,inf] [--chunks 4]

Each process runs one MoE layer (shared + routed experts, ep = 2) with one thread, so the two
ranks own one core each. The emulated link (parallel/link.py) makes every all-to-all complete
no sooner than latency + bytes / bandwidth after it starts; "inf" is the bare loopback. For every
bandwidth the two schedules alternate over the repeats and the median is reported.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank: int, world: int, port: int, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from benchmarks.timing import alternate
    from model.config import ModelConfig
    from model.moe import MoE
    from parallel.expert.dispatcher import AllToAllDispatcher
    from parallel.expert.sharding import keep_local_experts
    from parallel.link import EmulatedLink

    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = ModelConfig(hidden_size=args.hidden, moe_intermediate_size=args.ffn, n_routed_experts=args.experts,
                      num_experts_per_tok=args.topk, n_group=args.experts // 4 if args.experts >= 8 else 1,
                      topk_group=max(1, args.experts // 8), n_shared_experts=1, num_hidden_layers=1,
                      first_k_dense_replace=0, vocab_size=16, num_attention_heads=1, q_lora_rank=None,
                      kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    torch.manual_seed(0)
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    keep_local_experts(moe.experts, rank, world)
    x = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(rank))

    def step(disp) -> None:
        moe.dispatcher = disp
        y, _ = moe(x)
        y.square().mean().backward()

    group = dist.group.WORLD
    rows = []
    for bw in args.bandwidths:
        link = EmulatedLink(None if bw == float("inf") else bw, args.latency_us)
        off = AllToAllDispatcher(group, args.experts, overlap=False, link=link)
        on = AllToAllDispatcher(group, args.experts, overlap=True, chunks=args.chunks, link=link)
        # alternate A/B; the barriers line the two ranks up, so each repeat times the slower one
        times = alternate({"off": lambda off=off: step(off), "on": lambda on=on: step(on)}, args.repeats, args.warmup,
                          sync=dist.barrier)
        per_step = {k: v // (args.warmup + args.repeats) for k, v in off.stats.items()}
        rows.append((bw, times["off"].median, times["on"].median, per_step))
    # FP8 dispatch: the same step's dispatch bytes, E4M3 + 1x128 scales, vs bf16 (2 bytes/element;
    # this CPU run moves fp32, so bf16 is half of the measured fp32 bytes)
    fp8 = AllToAllDispatcher(group, args.experts, overlap=True, chunks=args.chunks, fp8_dispatch=True)
    step(fp8)
    full = AllToAllDispatcher(group, args.experts, overlap=True, chunks=args.chunks)
    step(full)
    fp8_ratio = fp8.stats["dispatch_bytes"] / (full.stats["dispatch_bytes"] / 2)
    if rank == 0:
        results.put((rows, fp8_ratio))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--latency-us", type=float, default=20.0)
    ap.add_argument("--bandwidths", default="0.25,0.5,1,2,4,inf", help="Gbit/s, comma separated")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    args.bandwidths = [float(b) for b in args.bandwidths.split(",")]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.spawn(_run, args=(2, _port(), args, results), nprocs=2, join=True)
    rows, fp8_ratio = results.get()
    print(f"MoE layer fwd+bwd, 2 gloo processes x 1 thread, T={args.tokens}/rank, D={args.hidden}, "
          f"F={args.ffn}, E={args.experts}, K={args.topk}, chunks={args.chunks}, latency {args.latency_us} us")
    print(f"{'link Gbit/s':>11} {'dispatch MB/step':>16} {'overlap off ms':>15} {'overlap on ms':>14} {'on/off':>7}")
    for bw, off, on, stats in rows:
        mb = stats.get("dispatch_bytes", 0) / 1e6
        print(f"{bw:>11} {mb:>16.2f} {off * 1e3:>15.1f} {on * 1e3:>14.1f} {on / off:>7.3f}")
    print(f"FP8 dispatch moves {fp8_ratio:.3f}x the bytes of bf16 dispatch (E4M3 + one fp32 scale per 128 channels)")


if __name__ == "__main__":
    main()
