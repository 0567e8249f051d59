"""Load an exported Hugging Face directory with transformers and run it (the GPU check's last stage).

    python benchmarks/gpu/gpu_hf_check.py --hf DIR --shards SHARD_DIR [--rows 32] [--batch 8] [--json OUT]

`AutoModelForCausalLM.from_pretrained` (no remote code), then the language-model loss on the first
`--rows` rows of the validation split: the rows train.py's evaluate() reads with micro batch 8 and
eval_batches 4 on one rank, so the number is comparable with the run's last val_loss (same weights,
bf16 on the GPU, transformers' kernels instead of ours).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--shards", required=True, help="token shard directory (run.json's shard_dir)")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    from data import TokenShards, batch_from_rows

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rec = {"transformers": transformers.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "dtype": str(dtype).replace("torch.", "")}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.hf, dtype=dtype, trust_remote_code=False).to(device).eval()
    if cuda:
        torch.cuda.synchronize()
    rec.update(cls=type(model).__name__, load_s=round(time.perf_counter() - t0, 2),
               params=sum(p.numel() for p in model.parameters()))
    val = TokenShards(a.shards, "val")
    total, n, finite = 0.0, 0, True
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, a.rows, a.batch):
            x, y = batch_from_rows(val, [(start + j) % len(val) for j in range(a.batch)])
            logits = model(input_ids=x.to(device)).logits
            finite &= bool(torch.isfinite(logits).all())
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
            total += float(loss)
            n += 1
    if cuda:
        torch.cuda.synchronize()
    rec.update(forward_s=round(time.perf_counter() - t0, 2), batches=n, batch=a.batch, seq=int(x.shape[1]),
               logits_shape=list(logits.shape), logits_finite=finite, val_loss=total / n,
               max_allocated=torch.cuda.max_memory_allocated() if cuda else None)
    rec["ok"] = bool(finite and math.isfinite(rec["val_loss"]))
    print("hf check: " + json.dumps(rec))
    if a.json:
        Path(a.json).write_text(json.dumps(rec, indent=1))
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
