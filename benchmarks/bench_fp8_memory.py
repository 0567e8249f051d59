"""Peak memory of one training step (forward + backward) with and without FP8 activation caching.

    python benchmarks/bench_fp8_memory.py [--config configs/tiny.yaml] [--batch 8] [--seq 256]

Three runs of the same model, same batch, side by side:
  fp32            no FP8 (the baseline)
  fp8, hp cache   FP8 GEMMs, but inputs saved for backward in their own dtype (cache_fp8=False)
  fp8, fp8 cache  FP8 GEMMs, inputs saved as FP8 + 1x128 scales (the recipe)

Two measurements, both exact on CPU:
  peak step alloc  max over the step of the bytes held by torch's CPU allocator, counted from the
                   start of the step (weights excluded, gradients included), from the profiler's
                   per-allocation "[memory]" events ("Total Allocated"). Includes transient
                   buffers (the emulated backend's dequantized copies), so it is the honest peak.
  saved for bwd    bytes of the distinct storages autograd keeps between forward and backward
                   (torch.autograd.graph.saved_tensors_hooks): what FP8 caching changes.
Process RSS is not used: glibc keeps freed pages, so it measures the allocator's history, not the step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import load_config  # noqa: E402
from configs.schema import FP8Config  # noqa: E402
from model.fp8_swap import apply_fp8, set_fp8_option  # noqa: E402
from model.transformer import DeepseekV3  # noqa: E402


def step_memory(model: DeepseekV3, ids: torch.Tensor) -> tuple[int, int, float]:
    """-> (peak bytes allocated during fwd+bwd, bytes saved for backward, seconds)."""
    model.zero_grad(set_to_none=True)
    saved: dict[tuple[int, torch.dtype], int] = {}

    def pack(t):
        st = t.untyped_storage()
        saved[(st.data_ptr(), t.dtype)] = st.nbytes()
        return t
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids).loss
        loss.backward()
    dt = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    return peak, sum(saved.values()), dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=None, help="YAML config (default: the embedded tiny preset)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    cfg = load_config(args.config).model
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, fp32")
    print(f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, batch {args.batch} x {args.seq}")

    rows = [("fp32 (no FP8)", *step_memory(model, ids))]
    rep = apply_fp8(model, FP8Config(enabled=True, backend="auto"))
    print(f"fp8: kernel={rep['kernel']} ({rep['reason']}), {len(rep['converted'])} modules converted")
    set_fp8_option(model, cache_fp8=False)
    rows.append(("fp8, hp cache", *step_memory(model, ids)))
    set_fp8_option(model, cache_fp8=True)
    rows.append(("fp8, fp8 cache", *step_memory(model, ids)))

    mib = 2 ** 20
    base_peak, base_saved = rows[0][1], rows[0][2]
    print(f"{'mode':<16}{'peak step alloc':>18}{'ratio':>8}{'saved for bwd':>16}{'ratio':>8}{'time':>8}")
    for name, peak, saved, dt in rows:
        print(f"{name:<16}{peak / mib:>14.1f} MiB{peak / base_peak:>8.3f}{saved / mib:>12.1f} MiB"
              f"{saved / base_saved:>8.3f}{dt:>7.1f}s")
    hp, f8 = rows[1], rows[2]
    print(f"fp8 cache vs hp cache (same FP8 compute): peak x{f8[1] / hp[1]:.3f}, saved x{f8[2] / hp[2]:.3f}")


if __name__ == "__main__":
    main()
