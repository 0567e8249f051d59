"""Reading an HF DeepSeek-V3 directory tensor by tensor: bf16/fp32 weights, DeepSeek's native FP8
(dequantised block by block, fp8_format.py), per-expert or transformers' fused expert keys, with or
without the MTP layers that transformers never saves.

``HFCheckpoint`` lists the tensors from the safetensors headers and reads one at a time (each read
opens, maps and closes its file, so no page of a multi-GB shard stays resident after its tensor is
copied out). ``import_targets`` plans this project's tensors from those headers, and ``write_ours``
streams them into one model.safetensors, stacking a layer's experts row by row straight into the
file: peak memory is a few experts' tensors, never a stacked expert tensor or the model.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from model.hf import fp8_format
from model.hf.safe_header import read_header
from model.hf.safe_paths import inside, listed_files
from model.hf.safetensors_stream import SafetensorsWriter

if TYPE_CHECKING:
    from model.config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
MTP_NAME = "mtp.safetensors"
MODEL_TYPES = ("deepseek_v3", "kimi_k2")   # Kimi-K2 ships DeepseekV3ForCausalLM under its own model_type
FP32_KEYS = ("e_score_correction_bias",)
# architecture fields of DeepSeek-V3-style config.json files that our model implements in one way only
_FIXED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1}


def read_config(path: str | Path) -> dict:
    """config.json of an HF directory, checked to be a DeepSeek-V3 architecture we implement."""
    f = Path(path) / "config.json"
    if f.exists():
        inside(path, f.name, str(f), plain=True)      # a symlink out of the directory is not followed
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: not a Hugging Face model directory")
    try:
        d = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f}: not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{f}: not a JSON object")
    if d.get("model_type") not in MODEL_TYPES + (None,):
        raise ValueError(f"{f}: model_type={d.get('model_type')!r}, expected one of {list(MODEL_TYPES)}")
    for key, want in _FIXED.items():
        if key in d and d[key] != want:
            raise ValueError(f"{f}: {key}={d[key]!r}: only {key}={want!r} (DeepSeek-V3's) is implemented")
    if d.get("quantization_config") is not None:
        fp8_format.check_quant_config(d["quantization_config"], str(f))
    return d


def read_weight_map(path: Path) -> dict[str, str]:
    """model.safetensors.index.json's weight_map (tensor -> file), each file name checked to be a plain
    name inside ``path`` (safe_paths.inside)."""
    index = path / INDEX_NAME
    inside(path, INDEX_NAME, str(index), plain=True)
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: unreadable: {e}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map is not a JSON object")
    for file in set(weight_map.values()):
        inside(path, file, str(index), plain=True)
    return weight_map


class HFCheckpoint:
    """The tensors of an HF directory (index, or every *.safetensors; mtp.safetensors included).

    ``names()`` are the weights (FP8 block scales are not listed: ``read`` applies them),
    ``shape``/``dtype`` come from the headers, ``read(name, dtype)`` returns one tensor, an FP8
    weight dequantised to ``dtype`` (float32 when None). Inconsistent FP8 metadata (a scale missing,
    of the wrong block shape or without its weight; FP8 weights without a quantization_config) is a
    ValueError naming the tensor when the directory is opened, before anything is read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = read_config(self.path)
        self.fp8 = self.config.get("quantization_config") is not None
        files = self._files()
        self._meta: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
        for name in files:                  # headers checked here: a hostile one is refused by file and field
            for k, t in read_header(self.path / name).tensors.items():
                if k in self._meta:
                    raise ValueError(f"{self.path}: tensor {k} is in both {self._meta[k][0]} and {name}")
                self._meta[k] = (name, t.shape, t.dtype)
        self._check_scales()

    def _files(self) -> list[str]:
        index = self.path / INDEX_NAME
        if index.exists():
            files = sorted(set(read_weight_map(self.path).values()))
            if (self.path / MTP_NAME).exists():
                files.append(MTP_NAME)
        else:
            files = listed_files(self.path, ".safetensors", str(self.path))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {self.path}")
        for name in files:
            inside(self.path, name, str(index) if name != MTP_NAME else str(self.path), plain=True)
            if not (self.path / name).is_file():
                raise FileNotFoundError(f"{self.path / name} (listed in {INDEX_NAME}) not found")
        return files

    def _check_scales(self) -> None:
        for k, (_, shape, dtype) in self._meta.items():
            if k.endswith(fp8_format.SCALE_SUFFIX):
                weight = k[:-len(fp8_format.SCALE_SUFFIX)]
                if weight not in self._meta or self._meta[weight][2] != torch.float8_e4m3fn:
                    raise ValueError(f"{self.path}: {k} scales {weight}, which is not an FP8 weight here")
            elif dtype == torch.float8_e4m3fn:
                if not self.fp8:
                    raise ValueError(f"{self.path}: {k} is float8_e4m3fn but config.json has no "
                                     "quantization_config (DeepSeek's FP8 format declares one)")
                s = fp8_format.scale_name(k)
                if s not in self._meta:
                    raise ValueError(f"{self.path}: FP8 weight {k} has no scale tensor {s}")
                got, want = self._meta[s][1], fp8_format.scale_shape(shape)
                if got != want:
                    raise ValueError(f"{self.path}: {s} has shape {got}, expected {want} (128x128 blocks "
                                     f"of {k} {shape})")
            elif dtype in (torch.float8_e5m2,):
                raise ValueError(f"{self.path}: {k} is {dtype}: only DeepSeek's e4m3 FP8 format can be read")

    def names(self) -> list[str]:
        return [k for k in self._meta if not k.endswith(fp8_format.SCALE_SUFFIX)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][2]

    def _raw(self, name: str) -> torch.Tensor:
        file = self.path / self._meta[name][0]
        try:
            with safe_open(str(file), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:            # changed since the header was checked: name the file
            raise ValueError(f"{file}: cannot read tensor {name}: {e}") from None

    def read(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self._raw(name)
        if t.dtype == torch.float8_e4m3fn:
            return fp8_format.dequantise(name, t, self._raw(fp8_format.scale_name(name)), dtype or torch.float32)
        return t if dtype is None or not t.is_floating_point() else t.to(dtype)


# ---------------------------------------------------------------- HF keys -> our names

_EXPERT_KEY = re.compile(r"(.*)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def ours(key: str, cfg: ModelConfig) -> str | None:
    """Our name for a non-expert HF key (None: not ours, e.g. the MTP layers' copies of the shared
    embedding and head, or layers beyond the config)."""
    if key == "lm_head.weight":
        return key
    if not key.startswith("model."):
        return None
    key = key[len("model."):]
    m = re.match(r"layers\.(\d+)\.(.*)", key)
    if not m:
        return key                                       # embed_tokens, norm
    i, rest = int(m.group(1)), m.group(2)
    L = cfg.num_hidden_layers
    if i < L:
        return f"layers.{i}.{rest}"
    k = i - L
    if k >= cfg.num_nextn_predict_layers:
        return None
    if rest in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
        return f"mtp.{k}.{rest}"
    if rest == "shared_head.norm.weight":
        return f"mtp.{k}.norm.weight"
    if rest in ("shared_head.head.weight", "embed_tokens.weight"):
        return None                                      # copies of the shared weights
    return f"mtp.{k}.block.{rest}"


@dataclass
class Target:
    """One of our tensors and the HF tensors it is made of.
    kind "all": sources [key]; "gate_up": per expert [gate_e, up_e]; "down": per expert [down_e];
    "fused_gate_up" / "fused_down": [key] of transformers' in-memory (E, 2F, D) / (E, D, F)."""
    name: str
    kind: str
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    sources: list = field(default_factory=list)


def import_targets(ckpt: HFCheckpoint, cfg: ModelConfig) -> dict[str, Target]:
    """Plan every tensor of our state dict from the headers (nothing is read)."""
    out: dict[str, Target] = {}
    experts: dict[str, dict[str, dict[int, str]]] = {}
    for key in ckpt.names():
        m = _EXPERT_KEY.match(key)
        if m:
            base = ours(m.group(1) + "mlp.experts.w", cfg)
            if base is not None:
                experts.setdefault(base[:-1], {}).setdefault(m.group(3), {})[int(m.group(2))] = key
            continue
        name = ours(key, cfg)
        if name is None:
            continue
        shape, dtype = ckpt.shape(key), ckpt.dtype(key)
        if name.endswith("mlp.experts.gate_up_proj"):                   # fused (E, 2F, D)
            out[name[:-len("gate_up_proj")] + "w_gate_up"] = Target(
                name[:-len("gate_up_proj")] + "w_gate_up", "fused_gate_up", (shape[0], shape[2], shape[1]), dtype,
                [key])
        elif name.endswith("mlp.experts.down_proj"):                    # fused (E, D, F)
            out[name[:-len("down_proj")] + "w_down"] = Target(
                name[:-len("down_proj")] + "w_down", "fused_down", (shape[0], shape[2], shape[1]), dtype, [key])
        else:
            out[name] = Target(name, "all", shape, dtype, [key])
    E = cfg.n_routed_experts
    for base, parts in experts.items():
        missing = [f"{p}[{e}]" for p in ("gate_proj", "up_proj", "down_proj") for e in range(E)
                   if e not in parts.get(p, {})]
        if missing:
            raise ValueError(f"HF checkpoint lacks expert weights under {base}: {missing[:4]}...")
        gate0 = parts["gate_proj"][0]
        F_, D = ckpt.shape(gate0)
        out[base + "w_gate_up"] = Target(base + "w_gate_up", "gate_up", (E, D, 2 * F_), ckpt.dtype(gate0),
                                         [[parts["gate_proj"][e], parts["up_proj"][e]] for e in range(E)])
        out[base + "w_down"] = Target(base + "w_down", "down", (E, F_, D), ckpt.dtype(parts["down_proj"][0]),
                                      [[parts["down_proj"][e]] for e in range(E)])
    if cfg.tie_word_embeddings and "lm_head.weight" not in out and "embed_tokens.weight" in out:
        t = out["embed_tokens.weight"]
        out["lm_head.weight"] = Target("lm_head.weight", t.kind, t.shape, t.dtype, list(t.sources))
    return out


def resolve_mtp(ckpt: HFCheckpoint, cfg: ModelConfig, where: str) -> list[str]:
    """The HF names of the MTP tensors the config implies but the directory lacks ([] when it has
    them all; the MTP layers' copies of the shared embedding and head are optional). Raises a
    ValueError naming the missing ones when only some are there."""
    from model.hf.export import hf_entries, mtp_key_pattern
    from model.transformer import DeepseekV3

    if not cfg.num_nextn_predict_layers:
        return []
    with torch.device("meta"):
        sd = DeepseekV3(cfg).state_dict()
    pattern = re.compile(mtp_key_pattern(cfg))
    want = [e.name for e in hf_entries({k: (tuple(v.shape), v.dtype) for k, v in sd.items()}, cfg)
            if pattern.search(e.name) and not e.name.endswith(("embed_tokens.weight", "shared_head.head.weight"))]
    have = set(ckpt.names())
    missing = [n for n in want if n not in have and _fused_form(n) not in have]
    if missing and len(missing) < len(want):
        raise ValueError(f"{where}: incomplete MTP layers: config.json has num_nextn_predict_layers="
                         f"{cfg.num_nextn_predict_layers} but {len(missing)} of its {len(want)} tensors are missing: "
                         f"{missing[:6]}")
    return missing


def check_planned_shapes(targets: dict[str, Target], cfg: ModelConfig, where: str | Path,
                         fresh_prefix: str | None = None) -> None:
    """Every planned tensor against the model ``cfg`` describes, built on the meta device (nothing is
    allocated; config_check.py has bounded its layers and experts by the headers first): ValueError
    naming the missing, unexpected and wrong-shaped tensors. ``fresh_prefix``: tensors the caller
    creates itself (``--mtp init``'s "mtp."), not expected among the targets."""
    from model.transformer import DeepseekV3

    with torch.device("meta"):
        want = DeepseekV3(cfg).state_dict()
    shapes = {k: tuple(t.shape) for k, t in targets.items()}
    missing = sorted(k for k in set(want) - set(shapes) if not (fresh_prefix and k.startswith(fresh_prefix)))
    unexpected = sorted(set(shapes) - set(want))
    bad = sorted(k for k in set(want) & set(shapes) if tuple(want[k].shape) != shapes[k])
    if missing or unexpected or bad:
        raise ValueError(f"{where}: weights do not match its config.json: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shape {[(k, shapes[k], tuple(want[k].shape)) for k in bad[:4]]}")


def _fused_form(name: str) -> str | None:
    """transformers' fused in-memory key holding this per-expert key (mlp.experts.gate_up_proj / down_proj)."""
    m = _EXPERT_KEY.match(name)
    if not m:
        return None
    return m.group(1) + "mlp.experts." + ("down_proj" if m.group(3) == "down_proj" else "gate_up_proj")


def warn_no_mtp(where: str, cfg: ModelConfig, missing: list[str]) -> None:
    warnings.warn(f"{where}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but no MTP "
                  f"weights (missing {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}: {len(missing)} "
                  "tensors; transformers never saves them): loaded without MTP layers", stacklevel=3)


def out_dtype(name: str, src: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The stored dtype of an imported tensor: ``dtype`` for floating tensors (the router bias stays
    fp32); None keeps each as on disk and turns FP8 weights into bf16, as DeepSeek's own cast does."""
    if not src.is_floating_point:
        return src
    if name.endswith(FP32_KEYS):
        return torch.float32 if dtype is not None else src
    if dtype is None:
        return torch.bfloat16 if src == torch.float8_e4m3fn else src
    return dtype


def read_target(ckpt: HFCheckpoint, t: Target, dtype: torch.dtype, row: int | None = None) -> torch.Tensor:
    """One target whole, or (``row``: expert e of a per-expert target) its (1, ...) slice."""
    if t.kind == "all":
        return ckpt.read(t.sources[0], dtype)
    if t.kind == "fused_gate_up" or t.kind == "fused_down":
        return ckpt.read(t.sources[0], dtype).transpose(1, 2).contiguous()
    parts = [ckpt.read(k, dtype).t() for k in t.sources[row]]           # gate/up (F, D) -> (D, F)
    return torch.cat(parts, dim=1)[None].contiguous()                  # (1, D, 2F) or (1, F, D)


def write_ours(ckpt: HFCheckpoint, targets: dict[str, Target], file: Path, dtype: torch.dtype | None,
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """Stream ``targets`` (plus the in-memory ``extra`` tensors) into one safetensors file."""
    extra = extra or {}
    specs = [(t.name, out_dtype(t.name, t.dtype, dtype), t.shape) for t in targets.values()]
    specs += [(k, v.dtype, tuple(v.shape)) for k, v in extra.items()]
    with SafetensorsWriter(file, specs, metadata={"format": "pt"}) as w:
        for t in targets.values():
            want = out_dtype(t.name, t.dtype, dtype)
            if t.kind in ("gate_up", "down"):
                for e in range(t.shape[0]):
                    w.write(t.name, read_target(ckpt, t, want, e).to(want), row=e)
            else:
                w.write(t.name, read_target(ckpt, t, want).to(want))
        for k, v in extra.items():
            w.write(k, v)
