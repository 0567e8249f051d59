"""Rank-0 logging: progress bar, ``metrics.jsonl``, wandb.

``metrics.jsonl`` gets one JSON object per logged step (keys: step, loss, lm_loss, aux_loss,
mtp_loss, lr, grad_norm, tokens_per_s, mfu, expert_load_imbalance (max/mean count per MoE
layer), bias_gamma, epoch, elapsed_s, ...; ``val_loss`` too on evaluation steps).
``run.json`` beside it records the run: config, world size, parameter counts and the
peak FLOP/s (parallel/metrics/peak.py). wandb gets the same records and the config, never the environment.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from configs.schema import Config


class Monitor:
    """Only rank 0 writes; other ranks get a Monitor whose methods do nothing."""

    def __init__(self, cfg: Config, rank: int, start_step: int, run_info: dict[str, Any]):
        self.enabled = rank == 0
        self.pbar = self.wandb = self.file = None
        self._postfix: OrderedDict[str, str] = OrderedDict()   # the bar's loss, tok_s, mfu
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

    def step(self, tokens_per_s: float, mfu: float) -> None:
        """After every step: the bar advances with this step's speed; its loss is the last record's (a
        per-step loss would cost a host sync every step), shown from the first record on."""
        if self.pbar is not None:
            self._postfix.update(tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
            self.pbar.set_postfix(self._postfix, refresh=False)
            self.pbar.update(1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.pbar is not None and "loss" in record:
            self._postfix["loss"] = f"{record['loss']:.3f}"
            self._postfix.move_to_end("loss", last=False)
            self.pbar.set_postfix(self._postfix)
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
