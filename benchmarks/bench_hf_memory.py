"""Peak memory of the streaming HF import and export, measured in fresh processes.

    python benchmarks/bench_hf_memory.py [--work DIR] [--experts 64] [--hidden 1024] [--moe-width 512]

Builds a synthetic model sized so its FP8 export is a few hundred MB, writes it with
``save_hf(dtype=fp8)`` (DeepSeek's format), then runs in separate processes, each reporting its
peak RSS (VmHWM): scripts/import_hf.py on that FP8 directory (-> bf16 model.safetensors), and
scripts/export_hf.py of the import back to FP8 and to bf16. A baseline process imports the same
modules and converts a tiny FP8 directory: its peak is the constant (Python, torch, transformers'
config classes). Prints each peak, the peak above the baseline, and the largest tensor in bf16
(the stacked (E, D, 2F) experts): the import's bound is 2x that plus the constant.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# run in a child: one script's main() under the same imports as the baseline, then its peak RSS.
# VmHWM (this address space's high-water mark), not ru_maxrss: Linux carries ru_maxrss over exec, so a
# child started by a parent that built the model would report the parent's peak
_CHILD = """
import re, sys
sys.path.insert(0, {root!r})
import torch, model.hf, scripts.import_hf, scripts.export_hf
rc = getattr(scripts, {script!r}).main({argv!r})
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print("PEAK_KB", hwm, "RC", rc)
"""


def _peak_mb(script: str, argv: list[str]) -> float:
    code = _CHILD.format(root=str(ROOT), script=script, argv=argv)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("PEAK_KB")]
    if p.returncode or not line or not line[0].endswith("RC 0"):
        raise RuntimeError(f"{script} {argv} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return int(line[0].split()[1]) / 1024


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def _build(path: Path, experts: int, hidden: int, width: int, layers: int) -> dict:
    import torch

    from model.config import ModelConfig
    from model.hf import save_hf
    from model.transformer import DeepseekV3

    cfg = ModelConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=width,
                      num_hidden_layers=layers + 1, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=256,
                      kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                      n_routed_experts=experts, num_experts_per_tok=4, n_group=4, topk_group=2,
                      num_nextn_predict_layers=0)
    torch.manual_seed(0)
    save_hf(DeepseekV3(cfg).to(torch.bfloat16), str(path), dtype=torch.float8_e4m3fn, max_shard_size="100MB")
    return {"largest_bf16_mb": experts * hidden * 2 * width * 2 / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--moe-width", type=int, default=512)
    p.add_argument("--layers", type=int, default=2, help="MoE layers (after one dense layer)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        tmp = Path(tmp)
        info = _build(tmp / "fp8", a.experts, a.hidden, a.moe_width, a.layers)
        _build(tmp / "tiny", 8, 128, 64, 1)
        base = _peak_mb("import_hf", ["--hf", str(tmp / "tiny"), "--out", str(tmp / "tiny_init")])
        rows = {"import fp8 -> bf16": _peak_mb("import_hf", ["--hf", str(tmp / "fp8"), "--out", str(tmp / "init")])}
        for dtype in ("fp8", "bf16"):
            rows[f"export -> {dtype}"] = _peak_mb("export_hf", ["--checkpoint", str(tmp / "init"), "--out",
                                                                str(tmp / f"out_{dtype}"), "--dtype", dtype,
                                                                "--max-shard-size", "100MB"])
        out = {"fp8_dir_mb": round(_dir_mb(tmp / "fp8"), 1), "imported_bf16_mb": round(_dir_mb(tmp / "init"), 1),
               "largest_tensor_bf16_mb": round(info["largest_bf16_mb"], 1), "baseline_peak_mb": round(base, 1),
               "peaks_mb": {k: round(v, 1) for k, v in rows.items()},
               "above_baseline_mb": {k: round(v - base, 1) for k, v in rows.items()},
               "import_bound_mb": round(2 * info["largest_bf16_mb"] + base, 1)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
