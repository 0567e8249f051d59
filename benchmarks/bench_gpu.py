"""Single-device training throughput in bf16 and FP8, with MFU against a matmul peak measured in
the same run. Meant for a Hopper GPU (benchmarks/gpu/gpu_check.sh runs it); also runs on a CPU with a
small config as a smoke test.

    python benchmarks/bench_gpu.py [--config configs/small.yaml] [--batch 4] [--steps 10] [--device cuda]

For each precision, alternating over the repeats: forward + backward + AdamW step of the project's
model (MTP and balance loss included, as in training). FP8 is the module swap of model/fp8_swap.py
with the backend it selects (and logs) for this device.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.timing import alternate, cuda_sync  # noqa: E402
from configs import load_config  # noqa: E402
from configs.schema import FP8Config  # noqa: E402
from model.flops import count_params  # noqa: E402
from model.fp8_swap import apply_fp8  # noqa: E402
from model.transformer import DeepseekV3  # noqa: E402
from parallel.engine import adamw_impl  # noqa: E402
from parallel.metrics.peak import measure_peak_flops  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="default: data.seq_len of the config")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = load_config(args.config, args.overrides)
    seq = args.seq or cfg.data.seq_len
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    base = DeepseekV3(cfg.model)
    runs = {"bf16" if dtype == torch.bfloat16 else "fp32": base}
    fp8_model = copy.deepcopy(base)
    report = apply_fp8(fp8_model, FP8Config(enabled=True, backend="auto"))
    runs["fp8"] = fp8_model
    steps = {}
    for name, m in runs.items():
        m.to(device=device, dtype=dtype).train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, **adamw_impl("fused"))   # train.py's default
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, seq + 1), device=device)

        def step(m=m, opt=opt, tokens=tokens) -> None:
            m(tokens[:, :-1], tokens[:, 1:]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = step
    times = alternate(steps, args.steps, args.warmup, sync=cuda_sync(device))
    # the matmul peak train.py measures, at 8192^3 on a GPU (1024^3 is far from its matrix units' peak)
    peak = measure_peak_flops(device, dtype, n=8192 if device.type == "cuda" else 1024)
    flops = count_params(cfg.model, seq).flops_per_token_train_with_mtp
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, config {args.config}, batch {args.batch} x {seq}")
    print(f"fp8 backend: {report['backend']} / {report['kernel']} ({report['reason']}), "
          f"{len(report['converted'])} modules converted")
    print(f"measured {str(dtype).replace('torch.', '')} matmul peak: {peak / 1e12:.1f} TFLOP/s; "
          f"{flops / 1e9:.2f} GFLOP/token (6N + attention, MTP included)")
    med = {k: t.median for k, t in times.items()}
    for k, t in med.items():
        tps = args.batch * seq / t
        print(f"{k:>5}: step {t * 1e3:8.1f} ms  {tps:10.0f} tokens/s  MFU {tps * flops / peak:6.1%}")
    first = next(iter(med))
    print(f"fp8/{first} step time ratio: {med['fp8'] / med[first]:.3f}")


if __name__ == "__main__":
    main()
