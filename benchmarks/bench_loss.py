"""The output head + cross-entropy, forward and backward: the reference (materialized logits,
``model.loss_impl: full``) against the chunked fused one (``model.loss_impl: chunked``), side by
side in one run, alternating.

    python benchmarks/bench_loss.py [--tokens 2048] [--dim 256] [--vocabs 4096,32768,129280] [--chunk 1024]

Prints, per vocabulary size, the median time of each, their ratio, and the peak bytes each
allocates during forward+backward (torch's allocator, via the profiler, as bench_train.py).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.bench_train import peak_step_bytes  # noqa: E402
from benchmarks.timing import alternate  # noqa: E402
from model.loss import chunked_linear_cross_entropy, cross_entropy  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocabs", default="4096,32768,129280")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from parallel.engine import keep_freed_memory

    keep_freed_memory()                               # as train.py does
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads, fp32; "
          f"{args.tokens} tokens, hidden {args.dim}, chunk {args.chunk}")
    print(f"{'vocab':>7} {'full ms':>9} {'chunked ms':>10} {'speed':>6} {'full MiB':>9} {'chunked MiB':>11} "
          f"{'memory':>7}")
    for V in (int(v) for v in args.vocabs.split(",")):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(args.tokens, args.dim, generator=g).requires_grad_()
        w = (torch.randn(V, args.dim, generator=g) * 0.02).requires_grad_()
        y = torch.randint(0, V, (args.tokens,), generator=g)

        def run(kind: str, h=h, w=w, y=y):
            def step() -> None:
                if kind == "full":
                    loss = cross_entropy(h @ w.t(), y)
                else:
                    loss = chunked_linear_cross_entropy(h, w, y, args.chunk)
                loss.backward()
                h.grad = w.grad = None
            return step

        steps = {"full": run("full"), "chunked": run("chunked")}
        med = {k: t.median * 1e3 for k, t in alternate(steps, args.repeats, warmup=1).items()}
        mem = {k: peak_step_bytes(s) / 2 ** 20 for k, s in steps.items()}
        print(f"{V:>7} {med['full']:>9.1f} {med['chunked']:>10.1f} {med['full'] / med['chunked']:>5.2f}x "
              f"{mem['full']:>9.0f} {mem['chunked']:>11.0f} {mem['chunked'] / mem['full']:>6.2f}x")


if __name__ == "__main__":
    main()
