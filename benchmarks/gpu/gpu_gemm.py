"""One MoE layer's routed experts, bf16 grouped GEMM against the FP8 swap, forward + backward, side by side.

    python benchmarks/gpu/gpu_gemm.py [--config configs/small.yaml] [--tokens 8192] [--repeats 20]

The experts of one layer (``model.moe.RoutedExperts``: gate/up and down projections, SwiGLU) with the
config's expert count and widths, the rows of ``--tokens`` tokens x top-k routed with a skewed
(Zipf-like) load, empty experts included; the FP8 copy is the same weights through model/fp8_swap.py's
swap with the backend it picks for this device (its report names the kernel of each GEMM kind). Times
are medians of alternating rounds (benchmarks/timing.py), printed with the FP8/bf16 ratio. On a CPU
(the rehearsal of gpu_train_check.sh) it runs a few rows of tiny.yaml's experts.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def routed_counts(tokens: int, topk: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """(E,) rows per expert: tokens x topk rows over a Zipf-like popularity (the last experts often get none)."""
    popularity = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    picks = torch.multinomial(popularity, tokens * topk, replacement=True, generator=gen)
    return torch.bincount(picks, minlength=experts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    from benchmarks.timing import alternate, cuda_sync
    from configs.schema import FP8Config, load_config
    from model.fp8_swap import apply_fp8
    from model.moe import RoutedExperts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        a.config, a.tokens, a.repeats = "configs/tiny.yaml", min(a.tokens, 256), min(a.repeats, 3)
    m = load_config(a.config, []).model
    gen = torch.Generator().manual_seed(0)
    counts = routed_counts(a.tokens, m.num_experts_per_tok, m.n_routed_experts, gen).to(device)
    rows = int(counts.sum())
    holder = nn.Module()
    holder.experts = RoutedExperts(m.n_routed_experts, m.hidden_size, m.moe_intermediate_size)
    nn.init.normal_(holder.experts.w_gate_up, std=0.02)
    nn.init.normal_(holder.experts.w_down, std=0.02)
    holder = holder.to(device=device, dtype=torch.bfloat16)
    fp8 = copy.deepcopy(holder)
    report = apply_fp8(fp8, FP8Config(enabled=True))
    x = torch.randn(rows, m.hidden_size, device=device, dtype=torch.bfloat16)
    dy = torch.randn_like(x)

    def step(mod: nn.Module) -> None:
        xi = x.detach().requires_grad_()
        mod.experts(xi, counts).backward(dy)

    flops = 3 * 2 * rows * m.hidden_size * 3 * m.moe_intermediate_size   # fwd + 2 bwd GEMMs of both projections
    times = alternate({"bf16": lambda: step(holder), "fp8": lambda: step(fp8)}, rounds=a.repeats, warmup=2,
                      sync=cuda_sync(device))
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {a.config}: "
          f"{m.n_routed_experts} experts, D {m.hidden_size}, F {m.moe_intermediate_size}, {rows} routed rows "
          f"({int((counts == 0).sum())} empty experts)")
    print(f"fp8 swap: {report.get('reason', report)}")
    for k, t in times.items():
        print(f"{k}: {t.median * 1e3:.3f} ms fwd+bwd, {flops / t.median / 1e12:.1f} TFLOP/s")
    print(f"fp8/bf16 time ratio: {times['fp8'].median / times['bf16'].median:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
