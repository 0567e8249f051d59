"""Rank-0 logging: progress bar, ``metrics.jsonl``, wandb; plus the peak-FLOP/s benchmark
that MFU is measured against.

``metrics.jsonl`` gets one JSON object per logged step (keys: step, loss, lm_loss, aux_loss,
mtp_loss, lr, grad_norm, tokens_per_s, mfu, expert_load_imbalance (max/mean count per MoE
layer), bias_gamma, epoch, elapsed_s, ...; ``val_loss`` too on evaluation steps).
``run.json`` beside it records the run: config, world size, parameter counts and the
measured peak. wandb gets the same records and the config, never the environment.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5, n: int = 1024) -> float:
    """Sustained FLOP/s of this process' (n x n) @ (n x n) matmuls: the best of timed repeats."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
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


def machine_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Summed over ranks, measured by all at once (ranks sharing a CPU share its cores)."""
    if dist.is_initialized():
        dist.barrier()
    # on a GPU a 1024^3 product is far from the matrix units' peak (MFU would read high): 8192^3 there
    n = 8192 if device.type == "cuda" else 1024
    peak = torch.tensor([measure_peak_flops(device, dtype, n=n)], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peak)
    return float(peak.item())


class Monitor:
    """Only rank 0 writes; other ranks get a Monitor whose methods do nothing."""

    def __init__(self, cfg, rank: int, start_step: int, run_info: dict[str, Any]):
        self.enabled = rank == 0
        self.pbar = self.wandb = self.file = None
        if not self.enabled:
            return
        out = Path(cfg.train.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps(dict(run_info, config=cfg.to_dict()), indent=1))
        self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.logging.progress:
            from tqdm import tqdm
            self.pbar = tqdm(total=cfg.train.max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.logging.wandb != "disabled":
            import wandb
            # Only the config goes to wandb; keys/tokens stay in the environment.
            self.wandb = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name,
                                    mode=cfg.logging.wandb, dir=str(out), config=cfg.to_dict(),
                                    resume="allow")

    def step(self, loss: float, tokens_per_s: float, mfu: float) -> None:
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}",
                                  refresh=False)
            self.pbar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
            for i, x in enumerate(record.get("expert_load_imbalance", [])):
                flat[f"expert_load_imbalance/moe{i}"] = x
            self.wandb.log(flat, step=record["step"])

    def write(self, text: str) -> None:
        if self.enabled:
            if self.pbar is not None:
                self.pbar.write(text)
            else:
                print(text, flush=True)

    def close(self) -> None:
        if self.pbar is not None:
            self.pbar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
