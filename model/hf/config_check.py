"""An HF directory's config.json checked against its safetensors headers before anything is built.

config.json decides how big the model is; the headers say what the files hold. A config that
promises more layers, experts, or other widths than the weights hold (a typo, or a hostile file: 10^6
layers, 10^7 experts) would otherwise build a meta model for minutes or allocate gigabytes
(``--mtp init``, ``load_hf``) before the first mismatch is noticed. Here the counting sizes
(layers, experts per MoE layer, MTP depth) and the widths (vocab, hidden, FFN) are compared with the
headers, from tensor names and shapes only; every other shape is then compared against a meta model
that these bounds keep small (scripts/import_hf.py, load_hf). One ValueError naming config.json
and the field.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from model.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.gate_up_proj$")
EMBED = "model.embed_tokens.weight"


class Headers(Protocol):       # HFCheckpoint's listing (model/hf/read.py)
    path: Path

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...


def _experts(ckpt: Headers) -> dict[int, tuple[int, int]]:
    """layer -> (experts, expert FFN width) from per-expert gate_proj keys or the fused gate_up tensor."""
    ids: dict[int, set[int]] = {}
    width: dict[int, int] = {}
    for name in ckpt.names():
        if m := _EXPERT.match(name):
            layer, e = int(m.group(1)), int(m.group(2))
            ids.setdefault(layer, set()).add(e)
            if e == 0:
                width[layer] = ckpt.shape(name)[0]                  # (F, D)
        elif (m := _FUSED.match(name)) and len(ckpt.shape(name)) == 3:
            E, F2, _ = ckpt.shape(name)                              # transformers' fused (E, 2F, D)
            ids[int(m.group(1))], width[int(m.group(1))] = set(range(E)), F2 // 2
    return {layer: (len(e), width.get(layer, -1)) for layer, e in ids.items()}


def check_config_against_headers(ckpt: Headers, cfg: ModelConfig) -> None:
    """ValueError naming config.json and the field whose value the safetensors headers contradict."""
    where = Path(ckpt.path) / "config.json"

    def refuse(field: str, value: object, holds: str) -> ValueError:
        return ValueError(f"{where}: {field}={value!r}, but the weights' safetensors headers hold {holds}")

    names = set(ckpt.names())
    if EMBED not in names or len(ckpt.shape(EMBED)) != 2:
        raise ValueError(f"{Path(ckpt.path)}: no 2-D {EMBED} in the safetensors headers: not a DeepSeek-V3 "
                         "checkpoint")
    V, D = ckpt.shape(EMBED)
    if cfg.vocab_size != V:
        raise refuse("vocab_size", cfg.vocab_size, f"{EMBED} of shape {(V, D)}")
    if cfg.hidden_size != D:
        raise refuse("hidden_size", cfg.hidden_size, f"{EMBED} of shape {(V, D)}")
    layers = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    L = cfg.num_hidden_layers
    gap = None if L > len(layers) else next((i for i in range(L) if i not in layers), None)
    if L > len(layers) or gap is not None:
        held = f"layers {min(layers)}..{max(layers)} ({len(layers)} indices)" if layers else "no decoder layers"
        held += f", no layer {gap}" if gap is not None else ""
        raise refuse("num_hidden_layers", L, held)
    if cfg.num_nextn_predict_layers > L:      # fresh MTP layers (--mtp init) are built from this depth
        raise ValueError(f"{where}: num_nextn_predict_layers={cfg.num_nextn_predict_layers} exceeds "
                         f"num_hidden_layers={L} (DeepSeek-V3 uses 1)")
    dense = "model.layers.0.mlp.gate_proj.weight"
    if cfg.first_k_dense_replace > 0 and dense in names and cfg.intermediate_size != ckpt.shape(dense)[0]:
        raise refuse("intermediate_size", cfg.intermediate_size, f"{dense} of shape {ckpt.shape(dense)}")
    experts = _experts(ckpt)
    mtp_held = [layer for layer in range(L, L + cfg.num_nextn_predict_layers) if layer in layers]
    for layer in [*range(cfg.first_k_dense_replace, L), *mtp_held]:
        E, F_ = experts.get(layer, (0, -1))
        if cfg.n_routed_experts != E:
            raise refuse("n_routed_experts", cfg.n_routed_experts, f"{E} experts in layer {layer}")
        if cfg.moe_intermediate_size != F_:
            raise refuse("moe_intermediate_size", cfg.moe_intermediate_size,
                         f"experts of width {F_} in layer {layer}")
