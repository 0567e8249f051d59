"""Aten ops (about kernel launches on a GPU) and host syncs of the FP8 expert GEMMs, beside bf16.

    python benchmarks/bench_fp8_ops.py [--experts 16 64 256] [--config configs/tiny.yaml] [--triton] [--no-step] [--ep]
                                       [--top 15]

Three measurements, all exact counts (no timing), on whatever machine runs it:
  grouped GEMM   ops of ONE grouped GEMM forward + backward (x (N, K) sorted by expert,
                 w (E, K, M), ragged counts with empty experts) at each expert count: FP8 (the
                 kernel given by --kernel, the CPU default is emulated) against the high-precision
                 grouped_mm (bf16 on a GPU, fp32 here; the op count is the same).
  per step       ops and host syncs of one forward + backward of the config's model (one micro-batch),
                 FP8 against no FP8, and host syncs per MoE layer; FP8 twice: a micro-step that reuses
                 the FP8 weight copies, and the first one after an optimizer step (weights quantized).
  --ep           host syncs per MoE layer of one micro-step with parallel.ep=2 (2 gloo ranks), FP8 and not.
  --triton       also counts the Triton FP8 path (grouped GEMMs, dense FP8 linears, the fused quantizers of
                 model/kernels/fp8_quant.py): aten ops plus Triton launches, run through the interpreter
                 (TRITON_INTERPRET=1 is set here when no GPU is present), per grouped GEMM, per FP8 linear
                 and per step (with the most frequent ops of the step, --top).

Ops are counted with a TorchDispatchMode (every aten call, views included); host syncs with
tests/host_sync.py (the same counter the budget tests use).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import load_config  # noqa: E402
from configs.schema import FP8Config  # noqa: E402
from model.fp8_linear import _WEIGHT_EPOCH, fp8_grouped_mm  # noqa: E402
from model.fp8_swap import apply_fp8, set_fp8_option  # noqa: E402
from model.grouped_gemm import grouped_mm  # noqa: E402
from model.transformer import DeepseekV3  # noqa: E402
from tests.host_sync import HostSyncs, start_ep_rank  # noqa: E402


class OpCount(TorchDispatchMode):
    """Counts aten calls while active: ``n`` all of them, ``compute`` those that are not views (a view,
    ``t``, ``alias``, ``unsqueeze`` ... launches no kernel on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = self.compute = 0
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += 1
        self.compute += not func.is_view
        self.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _launches() -> Callable[[], int]:
    """Patch Triton's JIT launcher to count launches; returns a reader of the count."""
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    count = [0]
    for cls in (JITFunction, interp.InterpretedFunction):
        orig = cls.run

        def run(self, *a, _orig=orig, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
            count[0] += 1
            # the interpreter's own tensor copies are not the launch's: keep them out of the op count
            with torch._C._DisableTorchDispatch():
                return _orig(self, *a, **k)
        cls.run = run
    return lambda: count[0]


def ragged_counts(E: int, N: int, seed: int = 0) -> torch.Tensor:
    """(E,) int64 summing to N, skewed, about one expert in eight empty."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(E, generator=g) ** 3
    w[torch.randperm(E, generator=g)[: max(1, E // 8)]] = 0
    counts = torch.floor(w / w.sum() * N).long()
    counts[int(torch.argmax(w))] += N - int(counts.sum())
    return counts


def grouped_ops(E: int, fn: Callable, N: int = 1024, K: int = 256, M: int = 128) -> tuple[int, int, int]:
    """(aten ops, of which not views, host syncs) of one forward + backward of fn(x, w, counts)."""
    g = torch.Generator().manual_seed(1)
    counts = ragged_counts(E, N)
    x = torch.randn(N, K, generator=g, requires_grad=True)
    w = (torch.randn(E, K, M, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(N, M, generator=g)
    fn(x, w, counts).backward(dy)                           # warm: caches, lazy imports
    with HostSyncs() as syncs, OpCount() as ops:
        fn(x, w, counts).backward(dy)
    return ops.n, ops.compute, len(syncs.events)


def linear_ops(fn: Callable, M: int = 2048, K: int = 256, N: int = 256) -> tuple[int, int]:
    """(aten ops, of which not views) of one forward + backward of fn(x, w) (x (M, K), w (N, K))."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = (torch.randn(N, K, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    fn(x, w).backward(dy)                                    # warm
    with OpCount() as ops:
        fn(x, w).backward(dy)
    return ops.n, ops.compute


def step_ops(cfg_path: str, fp8: bool, kernel: str | None = None, launches: Callable[[], int] | None = None) -> dict:
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = DeepseekV3(cfg.model).train()
    if fp8:
        apply_fp8(model, FP8Config(enabled=True, backend="emulated"))
        if kernel:
            set_fp8_option(model, fp8_kernel=kernel)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len),
                        generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()                   # warm
    model.zero_grad(set_to_none=True)
    before = launches() if launches else 0
    with HostSyncs() as syncs, OpCount() as ops:
        model(ids, labels=ids).loss.backward()
    out = {"ops": ops.n, "compute": ops.compute, "syncs": len(syncs.events), "moe_layers": len(model.moe_layers()),
           "where": sorted({w for _, w in syncs.events}), "launches": launches() - before if launches else 0,
           "top": ops.by_op.most_common()}
    if fp8:   # the first micro-step after an optimizer step: every FP8 weight copy is quantized again
        _WEIGHT_EPOCH[0] += 1                                # what the optimizer's step hook does
        model.zero_grad(set_to_none=True)
        before = launches() if launches else 0
        with OpCount() as ops:
            model(ids, labels=ids).loss.backward()
        out["requant"] = ops.n + (launches() - before if launches else 0)
    return out


def print_linear_ops(launches: Callable[[], int], M: int = 2048, K: int = 256, N: int = 256) -> None:
    """Ops of one linear forward + backward: fp32 F.linear, FP8 emulated, FP8 triton (+ its launches); the
    FP8 weight copy reused, as FP8Linear does between optimizer steps, and (once per step) quantized."""
    import torch.nn.functional as F

    from model.fp8 import quantize_weight
    from model.fp8_linear import cached_fp8, fp8_linear

    cache: dict = {}

    def fp8(kernel: str, reuse: bool = True) -> Callable:
        return lambda x, w: fp8_linear(x, w, kernel=kernel,
                                       w_fp8=cached_fp8(cache, w, False, quantize_weight) if reuse else None)
    print(f"\none linear fwd+bwd (x ({M}, {K}), w ({N}, {K}), no bias, x cached in FP8)")
    for name, fn in (("fp32 F.linear", F.linear), ("fp8 emulated, weight copy reused", fp8("emulated")),
                     ("fp8 emulated, weight quantized", fp8("emulated", False)),
                     ("fp8 triton, weight copy reused", fp8("triton")),
                     ("fp8 triton, weight quantized", fp8("triton", False))):
        before = launches()
        ops, compute = linear_ops(fn, M, K, N)
        n = (launches() - before) // 2                       # warm + counted
        print(f"  {name}: {ops} ops ({compute} not views)" + (f" + {n} triton launches = {ops + n}" if n else ""))


def _ep_worker(rank: int, world: int, port: int, fp8: bool) -> None:
    """One forward + backward of a tiny model with parallel.ep=2 (overlap, 2 chunks); rank 0 prints its syncs."""
    from parallel.expert.sharding import shard_experts
    from tests.helpers import tiny_cfg

    group = start_ep_rank(rank, world, port)
    torch.manual_seed(0)
    cfg = tiny_cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, num_nextn_predict_layers=1)
    model = DeepseekV3(cfg).train()
    if fp8:
        apply_fp8(model, FP8Config(enabled=True, backend="emulated"))
    shard_experts(model, group, world, overlap=True, chunks=2)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
    with HostSyncs() as syncs:
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    if rank == 0:
        n, layers = len(syncs.events), len(model.moe_layers())
        print(f"  {'fp8' if fp8 else 'no fp8'}, ep=2: {n} host syncs per micro-step on rank 0, {layers} MoE layers "
              f"({n / layers:.1f} per layer) {sorted({w for _, w in syncs.events})}", flush=True)


def ep_syncs() -> None:
    import torch.multiprocessing as mp

    from tests.helpers import free_port

    print("\nexpert parallelism (2 gloo ranks, tiny test model, one micro-step fwd+bwd)")
    for fp8 in (False, True):
        mp.spawn(_ep_worker, args=(2, free_port(), fp8), nprocs=2, join=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--kernel", default="emulated", help="FP8 kernel of the grouped GEMM")
    ap.add_argument("--triton", action="store_true", help="also count the Triton FP8 grouped path")
    ap.add_argument("--no-step", action="store_true", help="only the grouped GEMM table")
    ap.add_argument("--ep", action="store_true", help="also host syncs per MoE layer with parallel.ep=2")
    ap.add_argument("--top", type=int, default=15, help="most frequent ops of the FP8 step to list")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"# {platform.node()} {platform.machine()} torch {torch.__version__}, {os.cpu_count()} CPUs")
    rows = {"hp grouped_mm": lambda x, w, c: grouped_mm(x, w, c),
            f"fp8 {args.kernel}": lambda x, w, c: fp8_grouped_mm(x, w, c, kernel=args.kernel)}
    launches = None
    if args.triton:
        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
        launches = _launches()
        rows["fp8 triton"] = lambda x, w, c: fp8_grouped_mm(x, w, c, kernel="triton")
    print("| grouped GEMM fwd+bwd | " + " | ".join(f"E={e}" for e in args.experts) + " |")
    print("|---|" + "---|" * len(args.experts))
    for name, fn in rows.items():
        cells = []
        for E in args.experts:
            before = launches() if launches and name == "fp8 triton" else 0
            ops, compute, syncs = grouped_ops(E, fn)
            extra = launches() - before if launches and name == "fp8 triton" else 0
            # grouped_ops runs fn twice (warm + counted); launches are counted over both
            cells.append(f"{ops} ({compute} not views)" + (f" + {extra // 2} triton" if extra else "")
                         + f" ops, {syncs} syncs")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if launches:
        print_linear_ops(launches)
    if args.ep:
        ep_syncs()
    if args.no_step:
        return
    hp, f8 = step_ops(args.config, False), step_ops(args.config, True, args.kernel)
    print(f"\nper step ({os.path.relpath(args.config, ROOT)}, one micro-batch fwd+bwd, {hp['moe_layers']} MoE layers)")
    print(f"  no fp8: {hp['ops']} ops ({hp['compute']} not views), {hp['syncs']} host syncs {hp['where']}")
    runs = [(args.kernel, f8)]
    if launches:
        runs.append(("triton", step_ops(args.config, True, "triton", launches)))
    for kernel, f in runs:
        total = f["ops"] + f["launches"]
        print(f"  fp8 {kernel}: {f['ops']} ops ({f['compute']} not views, {f['compute'] / hp['compute']:.2f}x)"
              + (f" + {f['launches']} triton launches = {total}" if f["launches"] else "")
              + f" ({total / hp['ops']:.2f}x no fp8), {f['syncs']} host syncs "
              f"({f['syncs'] / f['moe_layers']:.1f} per MoE layer) {f['where']}")
        print(f"    after an optimizer step (FP8 weight copies quantized again): {f['requant']} ops"
              + (" + launches" if f["launches"] else "") + f" ({f['requant'] / hp['ops']:.2f}x no fp8)")
    print(f"  most frequent ops, fp8 {runs[-1][0]} (no fp8 beside): "
          + ", ".join(f"{op} {n} ({dict(hp['top']).get(op, 0)})" for op, n in runs[-1][1]["top"][: args.top]))


if __name__ == "__main__":
    main()
