"""Shared pieces of the training tests: a tiny model config, a small corpus, and a
``python train.py`` runner with a clean environment (no inherited RANK/MASTER_PORT)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128",
    "model.moe_intermediate_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
    "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16",
    "model.qk_rope_head_dim=8", "model.v_head_dim=16",
]
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
             "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


def make_corpus(root: Path, n_docs: int = 12) -> Path:
    """A few small Python-like documents: real enough for a BPE, tiny enough for seconds."""
    d = root / "corpus"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [f"def f{i}_{j}(x, y={j}):\n    return x * {i + j} + y  # doc {i}\n" for j in range(8)]
        (d / f"doc{i:02d}.py").write_text("".join(lines), encoding="utf-8")
    return d


def run_args(tmp: Path, corpus: Path, out: str = "run", extra: list[str] = ()) -> list[str]:
    return TINY_MODEL + [
        f"data.path={corpus}", f"data.cache_dir={tmp / 'cache'}", "data.seq_len=32", "data.val_fraction=0.05",
        f"train.out_dir={tmp / out}", "train.micro_batch_size=4", "train.log_every=1",
        "train.eval_every=4", "train.eval_batches=1", "train.warmup_steps=2", "train.lr=3e-3",
        "train.min_lr=3e-4", "train.bias_update_speed=0.01", "logging.progress=false",
        "deepspeed.zero_optimization.stage=1",
    ] + list(extra)


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train(args: list[str], check: bool = True, timeout: int = 240, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env={**clean_env(), **(env or {})},
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]


def launch(n: int, args: list[str], timeout: int = 600, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus n train.py ARGS`` on a free port; fails the test on a non-zero exit.
    ``env`` adds variables (e.g. MOE_FAULTS) to the clean environment."""
    from tests.helpers import free_port

    cmd = ["deepspeed", "--num_gpus", str(n), "--master_port", str(free_port()), str(ROOT / "train.py"), *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**clean_env(), **(env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return p
