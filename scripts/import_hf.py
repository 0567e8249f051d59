"""Import a local Hugging Face DeepSeek-V3 directory (bf16/fp32 weights) for training.

    python scripts/import_hf.py --hf path/to/hf_dir --out init/NAME
    python train.py ... train.init_from=init/NAME data.tokenizer=init/NAME/tokenizer

Writes model.safetensors (the full model in this project's naming, dtypes as on disk, stacked
experts), model_config.json ({"model": {...}}: the config section train.py checks against) and
tokenizer/ (the HF directory's tokenizer files, when it has them). Reads only JSON and
safetensors. The reverse of scripts/export_hf.py: import -> export gives back the same tensors
bit for bit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.hf import from_hf_config, from_hf_state_dict, read_safetensors_dir  # noqa: E402
from parallel import checkpoint  # noqa: E402
from parallel.integrity import write_manifest  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def import_hf(hf: str, out: str) -> Path:
    src = Path(hf).expanduser()
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a Hugging Face model directory")
    hf_cfg = json.loads(cfg_file.read_text())
    if hf_cfg.get("model_type") not in ("deepseek_v3", None):
        raise ValueError(f"{cfg_file}: model_type={hf_cfg.get('model_type')!r}, expected 'deepseek_v3'")
    if hf_cfg.get("quantization_config"):
        raise ValueError(f"{cfg_file}: quantized weights ({hf_cfg['quantization_config'].get('quant_method')}) "
                         "are not supported: convert them to bf16 first")
    cfg = from_hf_config(hf_cfg)
    hf_sd = read_safetensors_dir(str(src))
    scales = [k for k in hf_sd if k.endswith("scale_inv")]
    if scales:
        raise ValueError(f"{src}: FP8 weights with block scales ({scales[0]}): convert them to bf16 first")
    _check_mtp_copies(hf_sd, cfg)
    sd = from_hf_state_dict(hf_sd, cfg)
    _check_keys(sd, cfg, src)
    out_p = Path(out).expanduser()
    out_p.mkdir(parents=True, exist_ok=True)
    checkpoint.save_model(sd, out_p / checkpoint.MODEL)
    (out_p / checkpoint.INIT_CONFIG).write_text(json.dumps(
        {"format": "moe-trainer-init", "source": str(src.resolve()), "model": cfg.to_dict()}, indent=1))
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if copied:
        (out_p / checkpoint.TOKENIZER).mkdir(exist_ok=True)
        for n in copied:
            (out_p / checkpoint.TOKENIZER / n).write_bytes((src / n).read_bytes())
    write_manifest(out_p)   # train.init_from and export check the files against it
    print(f"imported {src} -> {out_p}: {len(sd)} tensors, "
          f"{sum(v.numel() for v in sd.values()) / 1e6:.2f}M parameters"
          + (f", tokenizer ({len(copied)} files)" if copied else ", no tokenizer files found"))
    return out_p


def _check_mtp_copies(hf_sd: dict[str, torch.Tensor], cfg) -> None:
    """DeepSeek's MTP layers repeat the shared embedding and head; the import keeps one copy, so they
    must be equal to the main ones (else the export would not give back the same tensors)."""
    L = cfg.num_hidden_layers
    for k in range(cfg.num_nextn_predict_layers):
        for name, main in (("embed_tokens.weight", "model.embed_tokens.weight"),
                           ("shared_head.head.weight", "lm_head.weight" if "lm_head.weight" in hf_sd
                            else "model.embed_tokens.weight")):
            key = f"model.layers.{L + k}.{name}"
            if key in hf_sd and not torch.equal(hf_sd[key], hf_sd[main]):
                raise ValueError(f"{key} differs from {main}: MTP layers with their own embedding/head "
                                 "are not supported (this model shares them)")


def _check_keys(sd: dict[str, torch.Tensor], cfg, src: Path) -> None:
    from model.transformer import DeepseekV3

    with torch.device("meta"):
        want = DeepseekV3(cfg).state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    bad = [k for k in set(want) & set(sd) if tuple(want[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{src}: weights do not match its config.json: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shape {bad[:4]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="local Hugging Face DeepSeek-V3 directory")
    p.add_argument("--out", required=True, help="output directory for train.init_from")
    a = p.parse_args(argv)
    try:
        import_hf(a.hf, a.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
