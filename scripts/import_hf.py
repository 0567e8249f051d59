"""Import a local Hugging Face DeepSeek-V3 directory for training: bf16/fp32 weights, or DeepSeek's
native FP8 (float8_e4m3fn + 128x128 weight_scale_inv, as DeepSeek-V3/R1/V3.1 and Kimi-K2 ship).

    python scripts/import_hf.py --hf path/to/hf_dir --out init/NAME [--dtype auto|bf16|fp32] [--mtp init]
    python train.py ... train.init_from=init/NAME data.tokenizer=init/NAME/tokenizer

Writes model.safetensors (the full model in this project's naming, stacked experts), model_config.json
({"model": {...}}: the config section train.py checks against) and tokenizer/ (the HF directory's
tokenizer files, when it has them). Reads only JSON and safetensors, one tensor at a time: FP8 weights
are dequantised block by block on the CPU and each layer's experts are stacked row by row straight
into the output file, so peak memory stays near the largest single tensor, never the model.

--dtype auto (default) keeps the stored dtypes (FP8 weights become bf16, as DeepSeek's own cast does);
the router bias stays fp32. A directory whose config.json promises MTP layers that its weights lack
(transformers never saves them) is imported without MTP, with a warning; --mtp init adds freshly
initialised MTP layers instead (depth num_nextn_predict_layers, or 1 where config.json says 0), for
continued training with the MTP loss. The reverse of
scripts/export_hf.py: import -> export gives back the same tensors bit for bit (bf16/fp32 sources).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.hf import (
    from_hf_config,  # noqa: E402
    weight_reader,  # noqa: E402
)
from model.hf.config_check import check_config_against_headers  # noqa: E402
from model.hf.manifest import write_manifest  # noqa: E402
from model.hf.read import (  # noqa: E402
    HFCheckpoint,
    check_planned_shapes,
    import_targets,
    out_dtype,
    resolve_mtp,
    write_ours,
)
from model.hf.safe_paths import inside  # noqa: E402

if TYPE_CHECKING:
    from model.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "tiktoken.model")
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def import_hf(hf: str, out: str, dtype: str = "auto", mtp: str = "auto", seed: int = 0) -> Path:
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: must be one of {sorted(DTYPES)}")
    if mtp not in ("auto", "init"):
        raise ValueError(f"--mtp {mtp}: must be auto or init")
    src = Path(hf).expanduser()
    ckpt = HFCheckpoint(src)      # config.json, every safetensors header, index names inside src, FP8 scales
    cfg = from_hf_config(ckpt.config, str(src / "config.json"))   # finite, positive floats; one line naming it
    check_config_against_headers(ckpt, cfg)      # layers, experts, widths: before any model, meta or not
    if mtp == "init" and not cfg.num_nextn_predict_layers:
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=1)      # DeepSeek-V3's depth
    missing = resolve_mtp(ckpt, cfg, str(src))    # some-but-not-all MTP tensors: ValueError naming them
    if missing and mtp != "init":                # (with --mtp init they are created below, once shapes are checked)
        print(f"warning: {src}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but no MTP "
              f"weights (missing {missing[0]}, ...: {len(missing)} tensors; transformers never saves them): imported "
              "without MTP layers (--mtp init adds fresh ones)", file=sys.stderr)
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=0)
    elif mtp == "init" and not missing and cfg.num_nextn_predict_layers:
        raise ValueError(f"--mtp init: {src} already has its MTP layers (drop --mtp init to import them)")
    _check_mtp_copies(ckpt, cfg)
    targets = import_targets(ckpt, cfg)
    check_planned_shapes(targets, cfg, src, fresh_prefix="mtp." if missing and mtp == "init" else None)
    fresh: dict[str, torch.Tensor] = {}
    if missing and mtp == "init":
        fresh = fresh_mtp(cfg, seed, _main_dtype(ckpt, DTYPES[dtype]))
        print(f"notice: {src} has no MTP weights: added {cfg.num_nextn_predict_layers} freshly initialised MTP "
              f"layer(s) ({len(fresh)} tensors, seed {seed}) for continued training", file=sys.stderr)
    out_p = Path(out).expanduser()
    out_p.mkdir(parents=True, exist_ok=True)
    write_ours(ckpt, targets, out_p / weight_reader.MODEL, DTYPES[dtype], extra=fresh)
    (out_p / weight_reader.INIT_CONFIG).write_text(json.dumps(
        {"format": "moe-trainer-init", "source": str(src.resolve()), "model": cfg.to_dict()}, indent=1))
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file() and inside(src, n, str(src), plain=True)]
    if copied:
        (out_p / weight_reader.TOKENIZER).mkdir(exist_ok=True)
        for n in copied:
            (out_p / weight_reader.TOKENIZER / n).write_bytes((src / n).read_bytes())
    write_manifest(out_p)   # train.init_from and export check the files against it
    n_params = sum(torch.Size(t.shape).numel() for t in targets.values()) + sum(v.numel() for v in fresh.values())
    print(f"imported {src} -> {out_p}: {len(targets) + len(fresh)} tensors, {n_params / 1e6:.2f}M parameters"
          + (" (FP8 dequantised)" if ckpt.fp8 else "")
          + (f", tokenizer ({len(copied)} files)" if copied else ", no tokenizer files found"))
    return out_p


def _main_dtype(ckpt: HFCheckpoint, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the imported embedding gets: what fresh MTP layers are stored in."""
    return out_dtype("model.embed_tokens.weight", ckpt.dtype("model.embed_tokens.weight"), dtype)


class _InitHolder(torch.nn.Module):
    """DeepseekV3.init_weights reads only ``self.config`` and ``self.modules()``: holding one submodule
    lets it initialise that submodule alone, by the same rules as a freshly built model."""

    def __init__(self, cfg: ModelConfig, part: torch.nn.Module):
        super().__init__()
        self.config = cfg
        self.part = part


def fresh_mtp(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Freshly initialised MTP layers in our naming. Built on the meta device and materialised one
    submodule at a time, so at most one tensor (a stacked expert tensor) is ever in fp32."""
    from model.transformer import DeepseekV3, MTPModule

    torch.manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for k in range(cfg.num_nextn_predict_layers):
        with torch.device("meta"):
            mtp = MTPModule(cfg)
        for name, sub in mtp.named_modules():
            own = dict(sub.named_parameters(recurse=False)) | dict(sub.named_buffers(recurse=False))
            if not own:
                continue
            sub.to_empty(device="cpu", recurse=False)
            DeepseekV3.init_weights(_InitHolder(cfg, sub))
            for pname, t in sub.state_dict().items():
                if "." in pname:                  # a child's tensor: its own turn comes
                    continue
                key = f"mtp.{k}.{name + '.' if name else ''}{pname}"
                out[key] = t.detach().to(torch.float32 if key.endswith("e_score_correction_bias") else dtype).clone()
            sub.to_empty(device="meta", recurse=False)
    return out


def _check_mtp_copies(ckpt: HFCheckpoint, cfg: ModelConfig) -> None:
    """DeepSeek's MTP layers repeat the shared embedding and head; the import keeps one copy, so they
    must be equal to the main ones (else the export would not give back the same tensors)."""
    L = cfg.num_hidden_layers
    names = set(ckpt.names())
    head = "lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"
    for k in range(cfg.num_nextn_predict_layers):
        for name, main in (("embed_tokens.weight", "model.embed_tokens.weight"), ("shared_head.head.weight", head)):
            key = f"model.layers.{L + k}.{name}"
            if key in names and not torch.equal(ckpt.read(key), ckpt.read(main)):
                raise ValueError(f"{key} differs from {main}: MTP layers with their own embedding/head "
                                 "are not supported (this model shares them)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="local Hugging Face DeepSeek-V3 directory (bf16/fp32 or FP8)")
    p.add_argument("--out", required=True, help="output directory for train.init_from")
    p.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                   help="stored dtype (auto: as on disk, FP8 -> bf16; the router bias stays fp32)")
    p.add_argument("--mtp", default="auto", choices=["auto", "init"],
                   help="auto: import the MTP layers, or none when the directory has none; init: add freshly "
                        "initialised MTP layers to a directory without them")
    p.add_argument("--seed", type=int, default=0, help="seed of --mtp init")
    a = p.parse_args(argv)
    try:
        import_hf(a.hf, a.out, a.dtype, a.mtp, a.seed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
