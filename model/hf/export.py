"""Writing an HF DeepSeek-V3 directory tensor by tensor.

The export is planned from metadata alone (names, shapes, dtypes) before any weight is read:
``hf_entries`` maps this project's names to the HF/DeepSeek keys (per-expert, MTP as extra layers),
``plan_files`` fixes every output tensor's dtype (FP8 quantised weights plus their scales for
``--dtype fp8``) and the file it lands in, and ``write_files`` then produces the tensors in plan order
and streams each into its shard. Peak memory is one source tensor (a stacked expert tensor, read
once for all its experts) plus one output tensor, whatever the model's size.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from model.hf import fp8_format
from model.hf.safetensors_stream import SafetensorsWriter

if TYPE_CHECKING:
    from model.config import ModelConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MTP_NAME = "mtp.safetensors"          # --mtp separate: MTP layers outside the index
FP32_KEYS = ("e_score_correction_bias",)   # kept in fp32 whatever the export dtype
FP8 = torch.float8_e4m3fn              # as an export dtype: DeepSeek's FP8 block format (fp8_format.py)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """'2GB' / '500MB' / '10KiB' / 12345 -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"max_shard_size={size!r}: expected a size like 2GB, 500MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ---------------------------------------------------------------- our names -> HF keys

@dataclass(frozen=True)
class Entry:
    """One HF tensor: ``take(source tensor)`` of our tensor ``source``.
    part: "all" (as is), or "gate" / "up" / "down" of expert ``expert`` of a stacked tensor."""
    name: str
    source: str
    part: str
    expert: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def take(self, t: torch.Tensor) -> torch.Tensor:
        if self.part == "all":
            return t
        if self.part == "down":                                        # (E, F, D) -> (D, F)
            return t[self.expert].t().contiguous()
        half = t.shape[2] // 2                                         # (E, D, 2F) -> (F, D)
        cols = slice(0, half) if self.part == "gate" else slice(half, None)
        return t[self.expert, :, cols].t().contiguous()


Meta = dict[str, tuple[tuple[int, ...], torch.dtype]]


def _block_entries(prefix_in: str, meta: Meta, out_prefix: str) -> list[Entry]:
    """One decoder block's tensors, the stacked experts unstacked into per-expert keys."""
    out = []
    for key, (shape, dtype) in meta.items():
        if not key.startswith(prefix_in):
            continue
        rest = key[len(prefix_in):]
        if rest == "mlp.experts.w_gate_up":                            # (E, D, 2F)
            E, D, F2 = shape
            for e in range(E):
                for part in ("gate", "up"):
                    out.append(Entry(f"{out_prefix}mlp.experts.{e}.{part}_proj.weight", key, part, e,
                                     (F2 // 2, D), dtype))
        elif rest == "mlp.experts.w_down":                             # (E, F, D)
            E, F_, D = shape
            for e in range(E):
                out.append(Entry(f"{out_prefix}mlp.experts.{e}.down_proj.weight", key, "down", e, (D, F_), dtype))
        else:
            out.append(Entry(out_prefix + rest, key, "all", 0, shape, dtype))
    return out


def hf_entries(meta: Meta, cfg: ModelConfig) -> list[Entry]:
    """Our tensors (name -> (shape, dtype), in the order to write them) -> HF entries."""
    def whole(hf_name: str, ours: str) -> Entry:
        if ours not in meta:
            raise ValueError(f"the weights lack {ours} (needed for {hf_name})")
        return Entry(hf_name, ours, "all", 0, *meta[ours])

    head = "lm_head.weight" if "lm_head.weight" in meta else "embed_tokens.weight"   # tied: one copy
    out = [whole("model.embed_tokens.weight", "embed_tokens.weight"), whole("model.norm.weight", "norm.weight")]
    if not cfg.tie_word_embeddings:
        out.append(whole("lm_head.weight", "lm_head.weight"))
    L = cfg.num_hidden_layers
    for i in range(L):
        out += _block_entries(f"layers.{i}.", meta, f"model.layers.{i}.")
    for k in range(cfg.num_nextn_predict_layers):
        p = f"model.layers.{L + k}."
        out += [whole(p + f"{n}.weight", f"mtp.{k}.{n}.weight") for n in ("enorm", "hnorm", "eh_proj")]
        out += _block_entries(f"mtp.{k}.block.", meta, p)
        out.append(whole(p + "shared_head.norm.weight", f"mtp.{k}.norm.weight"))
        # DeepSeek's layout repeats the shared embedding and head inside each MTP layer
        out.append(whole(p + "shared_head.head.weight", head))
        out.append(whole(p + "embed_tokens.weight", "embed_tokens.weight"))
    return out


def identity_entries(tensors: dict[str, torch.Tensor]) -> list[Entry]:
    """Entries for tensors that already carry HF names (write_hf_dir's in-memory input)."""
    return [Entry(k, k, "all", 0, tuple(v.shape), v.dtype) for k, v in tensors.items()]


def mtp_key_pattern(cfg: ModelConfig) -> str | None:
    """Regex of the on-disk MTP keys (``model.layers.{L..L+D-1}.*``), None without MTP."""
    D, L = cfg.num_nextn_predict_layers, cfg.num_hidden_layers
    if not D:
        return None
    return r"^model\.layers\.(" + "|".join(str(L + k) for k in range(D)) + r")\."


# ---------------------------------------------------------------- output tensors and files

@dataclass(frozen=True)
class Out:
    """One tensor in the files: entry ``entry`` cast to ``dtype``, or its FP8 data / block scale."""
    name: str
    entry: Entry
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str = "data"            # "data" | "fp8" | "scale"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _outs(entry: Entry, dtype: torch.dtype | None) -> list[Out]:
    floating = entry.dtype.is_floating_point
    if not floating:
        return [Out(entry.name, entry, entry.dtype, entry.shape)]
    if entry.name.endswith(FP32_KEYS) and dtype is not None:
        return [Out(entry.name, entry, torch.float32, entry.shape)]
    if dtype is FP8:
        if fp8_format.is_quantised(entry.name, entry.shape):
            return [Out(entry.name, entry, FP8, entry.shape, "fp8"),
                    Out(fp8_format.scale_name(entry.name), entry, torch.float32, fp8_format.scale_shape(entry.shape),
                        "scale")]
        return [Out(entry.name, entry, torch.bfloat16, entry.shape)]   # DeepSeek keeps these in BF16
    return [Out(entry.name, entry, dtype or entry.dtype, entry.shape)]


@dataclass
class FilePlan:
    files: list[tuple[str, list[Out]]]     # (file name, its tensors in plan order)
    index: dict | None                      # model.safetensors.index.json, None when unsharded
    mtp_dropped: bool


def plan_files(entries: list[Entry], cfg: ModelConfig, dtype: torch.dtype | None = None,
               max_shard_size: int | str | None = None, mtp: str = "auto") -> FilePlan:
    """Which tensor goes where: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards
    plus an index when the weights exceed ``max_shard_size`` (split in entry order, as
    transformers' own sharding does), and the MTP layers by ``mtp`` (see model.hf.write_hf_dir)."""
    if mtp not in ("auto", "inline", "separate", "drop"):
        raise ValueError(f"mtp={mtp!r}: must be auto, inline, separate or drop")
    pattern = mtp_key_pattern(cfg)
    is_mtp = (lambda name: bool(re.search(pattern, name))) if pattern else (lambda name: False)
    outs = [o for e in entries for o in _outs(e, dtype)]
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    if mtp == "auto":
        main_bytes = sum(o.nbytes for o in outs if not is_mtp(o.name))
        mtp = "separate" if limit is None or main_bytes <= limit else "inline"
    side = [o for o in outs if is_mtp(o.name)] if mtp in ("separate", "drop") else []
    main = [o for o in outs if not (side and is_mtp(o.name))] if side else outs
    shards: list[list[Out]] = [[]]
    size = 0
    for o in main:
        if limit is not None and shards[-1] and size + o.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(o)
        size += o.nbytes
    files = [(MTP_NAME, side)] if side and mtp == "separate" else []
    if len(shards) == 1:
        return FilePlan(files + [(WEIGHTS_NAME, shards[0])], None, mtp == "drop" and bool(pattern))
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {o.name: name for name, shard in zip(names, shards) for o in shard}
    index = {"metadata": {"total_size": sum(o.nbytes for o in main)}, "weight_map": weight_map}
    return FilePlan(files + list(zip(names, shards)), index, mtp == "drop" and bool(pattern))


class _Producer:
    """Output tensors in plan order, reading each source once for a run of entries that share it
    (a stacked expert tensor) and quantising an FP8 weight once for its data and its scale."""

    def __init__(self, read: Callable[[str], torch.Tensor]):
        self._read = read
        self._source: tuple[str, torch.Tensor] | None = None
        self._entry: tuple[Entry, dict[str, torch.Tensor]] | None = None

    def __call__(self, o: Out) -> torch.Tensor:
        if self._entry is None or self._entry[0] != o.entry:
            e = o.entry
            if self._source is None or self._source[0] != e.source:
                self._source = None                      # free the previous one before reading
                self._source = (e.source, self._read(e.source))
            t = e.take(self._source[1])
            if tuple(t.shape) != e.shape:
                raise ValueError(f"{e.source}: shape {tuple(self._source[1].shape)} does not give {e.name} {e.shape}")
            self._entry = (e, self._encode(e, t, o))
        return self._entry[1][o.name]

    @staticmethod
    def _encode(e: Entry, t: torch.Tensor, o: Out) -> dict[str, torch.Tensor]:
        if o.kind in ("fp8", "scale"):
            data, scale = fp8_format.quantise(t)
            return {e.name: data, fp8_format.scale_name(e.name): scale}
        return {o.name: t.to(o.dtype)}


def _remove_stale(path: str) -> None:
    for name in os.listdir(path):
        if name in (INDEX_NAME, MTP_NAME) or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", name):
            os.remove(os.path.join(path, name))


def write_files(path: str, plan: FilePlan, read: Callable[[str], torch.Tensor]) -> list[str]:
    """Write the planned files into ``path`` (stale weight files of an earlier export there are
    removed first); ``read(source name)`` returns one source tensor. Returns the file names."""
    os.makedirs(path, exist_ok=True)
    _remove_stale(path)
    produce = _Producer(read)
    written = []
    for name, outs in plan.files:
        specs = [(o.name, o.dtype, o.shape) for o in outs]
        with SafetensorsWriter(os.path.join(path, name), specs, metadata={"format": "pt"}) as w:
            for o in outs:
                w.write(o.name, produce(o))
        written.append(name)
    if plan.index is not None:
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump(plan.index, f, indent=2)
    return written
