"""Peak FLOP/s: the one measurement MFU is taken against (train.py, the benchmarks, the GPU scripts).

``measure_peak_flops`` times (n x n) @ (n x n) matmuls in this process and keeps the best repeat.
``PeakFlops`` is the run's peak: ``train.peak_tflops`` when given (a datasheet figure, say), else
measured by every rank at once at the start (ranks sharing a CPU share its cores) and summed. A start
on a busy machine under-reads it (another job on the cores, a pip install beside the run), and MFU
would then read above 100%. So the peak is the best measurement of the run: at a metrics record where
some rank achieved more than the peak, the ranks measure it again and keep the higher figure (the log
says so), and MFU is capped at 100% while the machine stays too busy for the benchmark to read true.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, n: int = 1024,
                       generator: torch.Generator | None = None) -> float:
    """Sustained FLOP/s of this process' (n x n) @ (n x n) matmuls: the best of timed repeats. The
    operands come from ``generator`` (None: the global one)."""
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def machine_peak_flops(device: torch.device, dtype: torch.dtype, generator: torch.Generator | None = None) -> float:
    """Summed over ranks, measured by all at once (ranks sharing a CPU share its cores)."""
    if dist.is_initialized():
        dist.barrier()
    # on a GPU a 1024^3 product is far from the matrix units' peak (MFU would read high): 8192^3 there
    n = 8192 if device.type == "cuda" else 1024
    mine = measure_peak_flops(device, dtype, n=n, generator=generator)
    peak = torch.tensor([mine], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peak)
    return float(peak.item())


class PeakFlops:
    """The peak of this run, in FLOP/s (``value``), and where it came from (``source``)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, fixed_tflops: float | None = None):
        self.device, self.dtype, self.fixed = device, dtype, fixed_tflops is not None
        if self.fixed:
            self.value, self.source = float(fixed_tflops) * 1e12, "train.peak_tflops"
        else:
            self.value, self.source = machine_peak_flops(device, dtype), "matmul benchmark at start"

    def mfu(self, achieved_flops: float) -> float:
        """achieved / peak, never above 1: a rate above the peak means the peak read low (``recheck``
        measures it again at the next record)."""
        return achieved_flops / max(self.value, achieved_flops)

    def recheck(self, achieved_flops: float) -> str | None:
        """Collective (every rank, at a metrics record): if a rank achieved more than the measured peak,
        every rank measures it again and the best measurement is kept. -> a line for the log, or None."""
        if self.fixed:
            return None
        low = torch.tensor([float(achieved_flops > self.value)], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(low, op=dist.ReduceOp.MAX)
        if not low.item():
            return None
        # a private generator: a measurement that the machine's load triggers must not move the run's
        # random state (the one at the start draws from the global generator, at a fixed point)
        gen = torch.Generator(device=self.device).manual_seed(0)
        before, again = self.value, machine_peak_flops(self.device, self.dtype, gen)
        if again <= before:
            return None
        self.value, self.source = again, "best matmul benchmark of the run (re-measured when a step beat it)"
        return (f"peak re-measured: {again / 1e9:.1f} GFLOP/s (the start's {before / 1e9:.1f} read low: the machine "
                "was busy); MFU is against the best measurement")
