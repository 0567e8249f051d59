"""Export a training checkpoint to a Hugging Face DeepSeek-V3 directory (no remote code).

    python scripts/export_hf.py --checkpoint runs/tiny --out hf/tiny [--dtype bf16|fp32|fp8]

--checkpoint is a checkpoint directory (runs/X/checkpoints/step_NNNNNNN), a run directory (its
newest complete checkpoint is used) or a directory written by scripts/import_hf.py. The weights are
read tensor by tensor through model.hf.weight_reader.open_weights and the HF shards written tensor by
tensor (peak memory: one stacked expert tensor plus one HF tensor); besides them only JSON is read
(trainer_state.json / model_config.json) and the tokenizer copy. Written: config.json
(model_type deepseek_v3, no auto_map), generation_config.json, model.safetensors or shards plus
model.safetensors.index.json above --max-shard-size, and the tokenizer files. The router bias
(mlp.gate.e_score_correction_bias) stays fp32 whatever --dtype is. MTP layers are written in
DeepSeek-V3's layout, model.layers.{num_hidden_layers + k}.* (see --mtp). --dtype fp8 writes
DeepSeek-V3's own FP8 format (float8_e4m3fn weights with a float32 weight_scale_inv per 128x128 block
for the tensors DeepSeek quantises, the rest bf16, quantization_config in config.json: README "FP8
export").
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import ModelConfig  # noqa: E402
from model.hf import (  # noqa: E402
    DTYPES,
    hf_entries,
    weight_reader,  # noqa: E402
    write_hf_entries,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def resolve_source(path: str) -> Path:
    """A complete checkpoint, an import_hf.py directory, or a run dir's newest complete checkpoint."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--checkpoint {p}: does not exist")
    if weight_reader.is_complete(p) or (p / weight_reader.INIT_CONFIG).is_file():
        return p
    if (p / weight_reader.STATE).is_file() or re.fullmatch(r"step_\d+", p.name):
        raise ValueError(f"--checkpoint {p}: incomplete checkpoint (no {weight_reader.MARKER} marker: the save "
                         "was interrupted or is still running)")
    found = weight_reader.complete_checkpoints(str(p))
    if found:
        return found[-1]
    raise ValueError(f"--checkpoint {p}: no complete checkpoint found (expected a step_NNNNNNN directory "
                     f"with a {weight_reader.MARKER} marker, a run directory holding checkpoints/, or an "
                     "import_hf.py directory)")


def copy_tokenizer_files(src: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
            copied.append(name)
    return copied


def check_tokenizer(src: Path, fingerprint: str | None) -> None:
    if not fingerprint:
        return
    from data.tokenizer import load_tokenizer, tokenizer_fingerprint

    got = tokenizer_fingerprint(load_tokenizer(str(src)))
    if got != fingerprint:
        raise ValueError(f"tokenizer {src} is not the one the checkpoint was trained with (fingerprint "
                         f"{got[:12]}..., the checkpoint has {fingerprint[:12]}...)")


def export(checkpoint_dir: str, out: str, dtype: str = "auto", max_shard_size: str | int = "2GB",
           mtp: str = "auto", tokenizer: str | None = None) -> Path:
    """Stream the checkpoint's weights into an HF directory: the whole export is planned from the
    tensors' names, shapes and dtypes, then each source tensor is read once (a stacked expert
    tensor for all its experts) and each HF tensor written into its shard as it is produced, so the
    model is never in memory; only model.hf.weight_reader's WeightReader touches the checkpoint."""
    src = resolve_source(checkpoint_dir)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: must be auto, bf16, fp32 or fp8")
    reader = weight_reader.open_weights(src)          # checks every file against the manifest first
    cfg = ModelConfig.from_dict(reader.config, where=f"{src} model")
    # sorted: the order the gathered model.safetensors was read in before, so shards split as they did
    meta = {n: (tuple(reader.shape(n)), reader.dtype(n)) for n in sorted(reader.names())}
    out_p = Path(out).expanduser()
    out_p.mkdir(parents=True, exist_ok=True)
    files = write_hf_entries(hf_entries(meta, cfg), reader.read, cfg, str(out_p),
                             None if dtype == "auto" else DTYPES[dtype], max_shard_size, mtp)
    tok_src = Path(tokenizer).expanduser() if tokenizer else src / weight_reader.TOKENIZER
    if tok_src.is_dir():
        state = src / weight_reader.STATE
        fp = json.loads(state.read_text()).get("tokenizer_fingerprint") if state.is_file() else None
        check_tokenizer(tok_src, fp)
        files += copy_tokenizer_files(tok_src, out_p)
    else:
        print(f"warning: no tokenizer at {tok_src}: the export has none (pass --tokenizer DIR)", file=sys.stderr)
    print(f"exported {src} -> {out_p}: {', '.join(files)}")
    return out_p


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, run dir, or import_hf.py dir")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp8"],
                   help="weight dtype (auto: as stored; fp8: DeepSeek-V3's FP8 block format; the router bias "
                        "is always fp32)")
    p.add_argument("--max-shard-size", default="2GB", help="shard above this size, with an index (default 2GB)")
    p.add_argument("--mtp", default="auto", choices=["auto", "inline", "separate", "drop"],
                   help="auto (default): separate when the weights fit in one file, inline when sharded. "
                        "inline: MTP layers in the weight index, as DeepSeek-V3 ships them (serving engines use "
                        "them; transformers lists them as unexpected unless the model has 61 layers); separate: "
                        "in mtp.safetensors outside the index (silent transformers load; an unsharded export "
                        "still shows them to engines that read every *.safetensors); drop: no MTP")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint's copy)")
    a = p.parse_args(argv)
    try:
        export(a.checkpoint, a.out, a.dtype, a.max_shard_size, a.mtp, a.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
