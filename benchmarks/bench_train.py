"""Training throughput: this project's DeepSeek-V3 vs transformers' DeepseekV3ForCausalLM, built
from the same config with identical weights (via model/hf/convert.py), same batch, same threads,
alternating A/B steps in one run.

    python benchmarks/bench_train.py [--config configs/tiny.yaml] [--batch 8] [--seq 256] [--repeats 10]

Both train the same computation: MTP and the sequence-wise aux loss are switched off, because
transformers' model trains neither (it ignores MTP weights and has no sequence-wise loss).
Prints tokens/s, the ratio, MFU against an fp32 matmul peak measured in the same run, and the
peak memory a training step allocates for each (torch's allocator, via the profiler).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks.timing import alternate, once  # noqa: E402
from parallel.engine import ADAMW_IMPLS, adamw_impl  # noqa: E402
from parallel.metrics.peak import measure_peak_flops  # noqa: E402

# ops that are matrix-product arithmetic: aten's GEMMs, torch's CPU grouped GEMM (transformers'
# experts), our grouped GEMM custom ops (model/grouped_gemm.py), and transformers' attention bmm
GEMM_OPS = {"aten.mm.default", "aten.mm.out", "aten.addmm.default", "aten.addmm_.default",
            "aten.bmm.default", "aten._grouped_mm.default", "moe_trainer.grouped_mm.default",
            "moe_trainer.grouped_mm_wgrad.default"}
# torch's fused CPU attention kernel (ours; transformers' MLA on CPU computes attention with bmm)
ATTENTION_OPS = {"aten._scaled_dot_product_flash_attention_for_cpu.default",
                 "aten._scaled_dot_product_flash_attention_for_cpu_backward.default"}


class OpTimer(TorchDispatchMode):
    """Wall time of every aten (and custom) op a step dispatches, per op overload. CPU ops run
    synchronously, so perf_counter around the call is the op's time. Used instead of torch.profiler
    for the breakdown: on this machine the profiler made the loss head's (1024,256)x(256,4096)
    GEMM read 40 ms when it takes 12.5 ms unprofiled; this timer adds ~10-16% to a step, spread
    over ~1,000 calls, and leaves each op's own time alone."""

    def __init__(self):
        super().__init__()
        self.seconds, self.calls = collections.Counter(), collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[str(func)] += time.perf_counter() - t
        self.calls[str(func)] += 1
        return out


def matmul_peak_gflops(seconds: float) -> float:
    """fp32 (2048 x 2048) @ (2048 x 2048) on this CPU: the best of the repeats in ``seconds``."""
    return measure_peak_flops(torch.device("cpu"), torch.float32, seconds=seconds, n=2048) / 1e9


def build(config: str | None, overrides: list[str], which: str):
    from configs import load_config
    from model.hf import save_hf
    from model.transformer import DeepseekV3

    cfg = load_config(config, ["model.num_nextn_predict_layers=0", "model.aux_loss_alpha=0.0", *overrides]).model
    torch.manual_seed(0)
    ours = DeepseekV3(cfg)
    if which == "ours":
        return cfg, ours
    from transformers import DeepseekV3ForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)
    return cfg, hf


def make_step(model, which: str, ids: torch.Tensor, labels: torch.Tensor, optimizer_impl: str = "fused"):
    # the same AdamW for both: fused is what train.py uses and what HF's Trainer defaults to
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw_impl(optimizer_impl))
    model.train()

    def step() -> None:
        if which == "ours":
            loss = model(ids, labels).loss
        else:  # transformers shifts the labels itself: CE(logits[:, :-1], ids[:, 1:])
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peak_step_bytes(step) -> int:
    """Peak bytes held by torch's CPU allocator during one training step, counted from the step's
    start (weights and optimizer state already allocated are excluded), from the profiler's
    per-allocation memory events. Process RSS would measure glibc's page cache, not the step."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as fh:
            events = json.load(fh)["traceEvents"]
    allocs = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(allocs) - min(allocs) if allocs else 0


def print_profile(steps: dict, times: dict, n: int, compiled: set) -> None:
    """Time every op of n steps of each eager model, alternating, and print what bounds the ratio:
    the time spent in library kernels that both implementations call as they are (GEMMs, and our
    attention kernel), as medians over the n steps (one step on a shared machine is noisy).
    Compiled models are left out: under a dispatch mode torch.compile runs the eager code."""
    for k in compiled:
        print(f"\n{k}: compiled, so not timed op by op (the timer's dispatch mode makes torch.compile "
              f"fall back to eager)")
    steps = {k: s for k, s in steps.items() if k not in compiled}
    if not {"ours", "transformers"} <= steps.keys():
        return
    parts = {k: {"gemm": [], "attention": [], "ops": [], "step": []} for k in steps}
    last = {}
    for _ in range(n):
        for k, s in steps.items():
            timer = last[k] = OpTimer()
            with timer:
                parts[k]["step"].append(once(s))
            sec = timer.seconds
            parts[k]["gemm"].append(sum(v for op, v in sec.items() if op in GEMM_OPS))
            parts[k]["attention"].append(sum(v for op, v in sec.items() if op in ATTENTION_OPS))
            parts[k]["ops"].append(sum(sec.values()))
    for k in steps:
        print(f"\n--- {k}: top ops by time, the last of {n} timed steps ---")
        for op, v in last[k].seconds.most_common(12):
            print(f"  {v * 1e3:8.2f} ms {last[k].calls[op]:5d} calls  {op}")
    med = {k: statistics.median(v) for k, v in times.items()}
    mid = {k: {q: statistics.median(v) for q, v in parts[k].items()} for k in steps}   # seconds
    for k, p in mid.items():
        other, outside = p["ops"] - p["gemm"] - p["attention"], p["step"] - p["ops"]
        print(f"{k}: step {p['step'] * 1e3:.0f} ms under the timer ({med[k] * 1e3:.0f} ms untimed): matrix "
              f"products {p['gemm'] * 1e3:.0f} ms, attention kernel {p['attention'] * 1e3:.0f} ms, all other ops "
              f"{other * 1e3:.0f} ms, outside ops (Python, autograd, the timer) {outside * 1e3:.0f} ms; "
              f"medians of {n} timed steps")
    # the bound that counts: our GEMMs and attention kernel at the time they actually take in the
    # step, everything else at zero cost, against transformers' untimed median step
    kernels = mid["ours"]["gemm"] + mid["ours"]["attention"]
    print(f"our GEMMs + attention kernel ~ {kernels * 1e3:.0f} ms a step: if everything else took no time, ours "
          f"would run at most {med['transformers'] / kernels:.2f}x transformers' speed "
          f"(GEMMs alone: {med['transformers'] / mid['ours']['gemm']:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", action="store_true",
                    help="time every op of --profile-steps steps of each model: top ops, and the bound that the "
                         "library kernels (GEMMs, attention) put on the ratio")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: glibc keeps freed memory, as train.py sets it (both models get it); "
                         "default: glibc's mmap/trim behaviour")
    ap.add_argument("--compile", choices=["none", "both", "ours"], default="none",
                    help="both: torch.compile both models' decoder blocks and final norm (ours: "
                         "model/compile.py, as train.compile does; transformers': the same modules); "
                         "ours: add a compiled copy of our model as a third contender, the others eager")
    ap.add_argument("--optimizer", choices=list(ADAMW_IMPLS), default="fused",
                    help="AdamW kernel for both models (train.optimizer_impl; fused: train.py's default "
                         "and HF Trainer's adamw_torch_fused)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from model.flops import count_params
    from parallel.engine import keep_freed_memory

    kept = keep_freed_memory() if args.malloc == "keep" else False

    cfg, ours = build(args.config, args.overrides, "ours")
    _, hf = build(args.config, args.overrides, "hf")
    compiled, compiled_keys = None, set()          # compiled_keys: contenders the op timer cannot see into
    if args.compile != "none":
        from model.compile import compile_blocks

        if args.compile == "ours":
            compiled = build(args.config, args.overrides, "ours")[1]     # same seed: same weights
            compile_blocks(compiled)
            compiled_keys = {"ours compiled"}
        else:
            compile_blocks(ours)
            for m in list(hf.model.layers) + [hf.model.norm]:
                m.compile()
            compiled_keys = {"ours", "transformers"}
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    ids, labels = tokens[:, :-1], tokens[:, 1:]
    steps = {"ours": make_step(ours, "ours", ids, labels, args.optimizer),
             "transformers": make_step(hf, "hf", ids, labels, args.optimizer)}
    if compiled is not None:
        steps["ours compiled"] = make_step(compiled, "ours", ids, labels, args.optimizer)
    peaks = [matmul_peak_gflops(seconds=1.0)]
    # alternate A/B so drift hits both; the machine's speed drifts, so the peak is sampled after every round
    timed = alternate(steps, args.repeats, args.warmup,
                      between=lambda: peaks.append(matmul_peak_gflops(seconds=0.2)))
    times = {k: t.seconds for k, t in timed.items()}
    peak = max(peaks)                                    # the most favourable peak: a conservative bound
    mem = {k: peak_step_bytes(s) / 2 ** 20 for k, s in steps.items()}
    flops_tok = count_params(cfg, seq_len=args.seq).flops_per_token_train
    ntok = args.batch * args.seq
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, fp32; "
          f"batch {args.batch} x {args.seq}; HF experts implementation: {hf.config._experts_implementation}; "
          f"malloc keeps freed memory: {kept}; torch.compile: {args.compile}; AdamW: {args.optimizer}")
    print(f"measured fp32 matmul peak: {peak:.1f} GFLOP/s (best of {len(peaks)} samples over the run, lowest "
          f"{min(peaks):.1f}); model: {flops_tok / 1e6:.1f} MFLOP/token (6N + attention)")
    print(f"{'model':<14} {'median step ms':>14} {'tokens/s':>10} {'MFU':>7} {'peak step MiB':>13}")
    tps = {}
    for k in steps:
        med = statistics.median(times[k])
        tps[k] = ntok / med
        print(f"{k:<14} {med * 1e3:>14.1f} {tps[k]:>10.0f} {tps[k] * flops_tok / peak / 1e9:>7.1%} {mem[k]:>13.0f}")
    print(f"speed ratio ours/transformers: {tps['ours'] / tps['transformers']:.2f}x")
    if compiled is not None:
        print(f"speed ratio ours compiled/transformers: {tps['ours compiled'] / tps['transformers']:.2f}x; "
              f"ours compiled/ours: {tps['ours compiled'] / tps['ours']:.2f}x")
    # Roofline: the step's FLOPs (6N + attention) at the measured matmul peak is the fastest any
    # implementation of this model could run here, so transformers' time over it bounds the ratio
    floor_ms = flops_tok * ntok / (peak * 1e9) * 1e3
    print(f"roofline: every FLOP at the measured peak = {floor_ms:.1f} ms/step, so no implementation can "
          f"beat transformers by more than {statistics.median(times['transformers']) * 1e3 / floor_ms:.2f}x here")
    if args.profile:
        print_profile(steps, times, args.profile_steps, compiled_keys)


if __name__ == "__main__":
    main()
