"""DeepSeek-V3's native FP8 format: the export's layout against the released checkpoint's, an
independent dequantisation against our weights, transformers loading it on CPU, the FP8 import
round trip, and the bad inputs that must be errors naming the tensor."""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.hf import load_hf, read_safetensors_dir, save_hf
from model.transformer import DeepseekV3
from tests.helpers import YARN, tiny_cfg

FP8 = torch.float8_e4m3fn
E4M3_REL = 2.0 ** -4            # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 of |x|
# The released DeepSeek-V3 headers, written out independently of model/hf/fp8_format.py's rule: the
# tensors stored as F8_E4M3 with a weight_scale_inv (main layers and the MTP layer alike) ...
FP8_SUFFIXES = ("self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.q_proj.weight",
                "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
                "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
                "mlp.shared_experts.down_proj.weight")
FP8_EXPERT = re.compile(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
# ... and the ones that stay high precision (BF16; the router bias F32)
BF16_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "norm.weight", "layernorm.weight", "eh_proj.weight",
                 "shared_head.head.weight", "mlp.gate.weight")


def _model(seed: int = 0, **kw) -> DeepseekV3:
    """Widths that are not multiples of 128, so every quantised weight has partial edge blocks."""
    base = dict(hidden_size=136, intermediate_size=264, moe_intermediate_size=72, q_lora_rank=40,
                kv_lora_rank=40, num_nextn_predict_layers=1, rope_scaling=YARN)
    torch.manual_seed(seed)
    m = DeepseekV3(tiny_cfg(**{**base, **kw})).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.3)
        m.layers[0].self_attn.o_proj.weight[128:] = 0.0             # an all-zero edge block
    return m


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    src = _model()
    out = tmp_path_factory.mktemp("fp8") / "hf"
    save_hf(src, str(out), dtype=FP8, max_shard_size="150KB", mtp="inline")   # sharded, MTP indexed
    return src, out


def _independent_dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """fp8 * scale_inv, one 128x128 block at a time (not model/hf/fp8_format.py's row-strip code)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
            out[block] = q[block].to(torch.float32) * s[i, j]
    return out


def test_layout_matches_deepseek_release(fp8_export):
    src, out = fp8_export
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk = read_safetensors_dir(str(out))
    assert set(index["weight_map"]) == set(on_disk)                 # scales are indexed, like DeepSeek's
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in on_disk.values())
    weights = [k for k in on_disk if not k.endswith("_scale_inv")]
    n_fp8 = 0
    for k in weights:
        v = on_disk[k]
        if k.endswith(FP8_SUFFIXES) or FP8_EXPERT.search(k):
            n_fp8 += 1
            s = on_disk[k + "_scale_inv"]
            assert v.dtype == FP8 and s.dtype == torch.float32, k
            assert tuple(s.shape) == (math.ceil(v.shape[0] / 128), math.ceil(v.shape[1] / 128)), k
        elif k.endswith("e_score_correction_bias"):
            assert v.dtype == torch.float32 and k + "_scale_inv" not in on_disk, k
        else:
            assert k.endswith(BF16_SUFFIXES), f"{k}: neither quantised nor high precision in DeepSeek's layout"
            assert v.dtype == torch.bfloat16 and k + "_scale_inv" not in on_disk, k
    assert len([k for k in on_disk if k.endswith("_scale_inv")]) == n_fp8
    L = src.config.num_hidden_layers                               # the MTP layer is quantised too
    assert on_disk[f"model.layers.{L}.self_attn.o_proj.weight"].dtype == FP8
    assert on_disk[f"model.layers.{L}.eh_proj.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_independent_dequantisation_matches_our_weights(fp8_export):
    """Every quantised tensor within e4m3's rounding of the source weights, block by block, with
    the scale exactly amax(block) / 448 as DeepSeek computes it."""
    src, out = fp8_export
    on_disk = read_safetensors_dir(str(out))
    from model.hf import to_hf_state_dict

    ref = to_hf_state_dict(src)
    worst = {}
    for k, s in ((k, v) for k, v in on_disk.items() if k.endswith("_scale_inv")):
        name = k[:-len("_scale_inv")]
        w, q = ref[name].float(), on_disk[name]
        deq = _independent_dequant(q, s)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                block = (slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1)))
                amax = w[block].abs().max()
                if amax == 0:
                    assert (deq[block] == 0).all(), (name, i, j)
                    continue
                assert s[i, j] == amax / 448, (name, i, j)
                err = (deq[block] - w[block]).abs()
                # relative rounding for normal e4m3 values, half a subnormal step (2^-10 scale) below
                assert (err <= E4M3_REL * w[block].abs() + 2.0 ** -10 * s[i, j]).all(), (name, i, j)
        worst[name] = ((deq - w).abs().max() / w.abs().max()).item()
    print(f"FP8 export: {len(worst)} quantised tensors, max |deq - w| / amax: worst {max(worst.values()):.4f} "
          f"({max(worst, key=worst.get)}), median {sorted(worst.values())[len(worst) // 2]:.4f}")
    assert max(worst.values()) <= E4M3_REL
    # the high-precision tensors are the bf16 weights, bit for bit
    assert torch.equal(on_disk["model.embed_tokens.weight"], ref["model.embed_tokens.weight"].bfloat16())


def test_fp8_round_trip_through_import(fp8_export, tmp_path):
    """export --dtype fp8 -> import (bf16 and fp32) -> our model: the weights within e4m3's bound
    of the bf16 weights, the logits close to the unquantised model's, the size about half of bf16."""
    from scripts.import_hf import import_hf

    src, out = fp8_export
    save_hf(src, str(tmp_path / "bf16"), dtype=torch.bfloat16, max_shard_size="150KB", mtp="inline")
    size = {d: sum(f.stat().st_size for f in (p).glob("*.safetensors")) for d, p in
            (("fp8", out), ("bf16", tmp_path / "bf16"))}
    import_hf(str(out), str(tmp_path / "init"), dtype="fp32")
    import_hf(str(out), str(tmp_path / "init16"))                       # auto: FP8 -> bf16
    got = load_file(str(tmp_path / "init" / "model.safetensors"))
    got16 = load_file(str(tmp_path / "init16" / "model.safetensors"))
    assert got16["layers.1.mlp.experts.w_gate_up"].dtype == torch.bfloat16
    assert got16["layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    bf16 = {k: v.bfloat16().float() for k, v in src.state_dict().items()}
    rel = {k: ((got[k].float() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
           for k, w in bf16.items() if w.dim() >= 2}
    assert max(rel.values()) <= E4M3_REL, max(rel, key=rel.get)
    back = DeepseekV3(src.config).eval()
    back.load_state_dict(got)
    ids = torch.randint(0, src.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, approx = src(ids).logits, back(ids).logits
    logit_err = (approx - ref).abs().max().item()
    print(f"FP8 round trip: per-tensor max rel error vs bf16 weights: worst {max(rel.values()):.4f}, median "
          f"{sorted(rel.values())[len(rel) // 2]:.4f}; max-abs logit diff vs unquantised {logit_err:.2e} "
          f"(logit std {ref.std().item():.2e}); export size {size['fp8']} B = {size['fp8'] / size['bf16']:.3f}x bf16")
    assert logit_err < 0.1 * ref.abs().max().item()
    assert size["fp8"] < 0.65 * size["bf16"]
    with warnings.catch_warnings(record=True) as record:       # load_hf reads the same FP8 directory
        warnings.simplefilter("always")
        loaded = load_hf(str(out))
    assert not [w for w in record if "MTP" in str(w.message)], "the MTP layer is in this export"
    assert torch.equal(loaded.state_dict()["layers.1.mlp.experts.w_down"], got["layers.1.mlp.experts.w_down"])


def test_transformers_loads_block_aligned_fp8_export_on_cpu(tmp_path):
    """transformers 5.23 without a GPU dequantises FP8 checkpoints at load (finegrained_fp8, needs
    accelerate), taking the block size from weight shape / scale shape: right only where every
    quantised dim is a multiple of 128 (it refuses DeepSeek-V3's own 576-row kv_a_proj_with_mqa and
    misreads other partial blocks), so this model is block-aligned. Its weights equal load_hf's
    dequantisation exactly and its fp32 logits match."""
    pytest.importorskip("accelerate")                # transformers' FP8 loader needs it (requirements-test)
    from transformers import AutoModelForCausalLM

    src = _model(seed=4, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128,
                 kv_lora_rank=128, num_attention_heads=1, qk_nope_head_dim=128, qk_rope_head_dim=128,
                 v_head_dim=128)
    save_hf(src, str(tmp_path), dtype=FP8)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).float().eval()
    ours = load_hf(str(tmp_path))
    from model.hf import to_hf_state_dict

    theirs = hf.state_dict()
    for k, v in to_hf_state_dict(ours).items():
        if k in theirs and theirs[k].shape == v.shape:           # transformers fuses the experts
            assert torch.equal(theirs[k], v), k
    assert torch.equal(theirs["model.layers.1.mlp.experts.down_proj"],
                       ours.layers[1].mlp.experts.w_down.transpose(1, 2))
    ids = torch.randint(0, src.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        err = (hf(ids).logits - ours(ids).logits).abs().max().item()
    print(f"transformers FP8 (CPU dequant) vs load_hf: max-abs logit error {err:.2e}")
    assert err < 1e-5


# ---------------------------------------------------------------- bad input

def _tamper(out: Path, name: str, edit) -> None:
    """Rewrite the shard holding tensor ``name`` with edit(tensors) applied."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    file = out / index["weight_map"][name]
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata=meta)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != file.name}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))


W = "model.layers.0.mlp.down_proj.weight"      # (136, 264): 2 x 3 blocks, the last row and column partial
S = W + "_scale_inv"


def _missing(t):
    t.pop(S)


def _wrong_block(t):
    t[S] = torch.ones(1, 1)


def _nan(t):
    t[S] = t[S].clone()
    t[S][0, -1] = float("nan")


@pytest.mark.parametrize("edit, message", [
    (_missing, rf"FP8 weight {re.escape(W)} has no scale tensor {re.escape(S)}"),
    (_wrong_block, rf"{re.escape(S)} has shape \(1, 1\), expected \(2, 3\)"),
    (_nan, rf"{re.escape(S)}: non-finite scale nan at block \(0, 2\)"),
])
def test_bad_scales_are_errors_naming_the_tensor(fp8_export, tmp_path, edit, message):
    from scripts.import_hf import import_hf

    _, out = fp8_export
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    _tamper(bad, S, edit)
    with pytest.raises(ValueError, match=message):
        load_hf(str(bad))
    with pytest.raises(ValueError, match=message):
        import_hf(str(bad), str(tmp_path / "init"))
    assert not (tmp_path / "init" / "model.safetensors").exists()


@pytest.mark.parametrize("change, message", [
    ({"weight_block_size": [64, 64]}, r"quantization_config\.weight_block_size=\[64, 64\]"),
    ({"fmt": "e5m2"}, r"quantization_config\.fmt='e5m2'"),
    ({"quant_method": "fbgemm_fp8"}, r"quantization_config\.quant_method='fbgemm_fp8'"),
])
def test_other_quantisation_configs_are_errors(fp8_export, tmp_path, change, message):
    _, out = fp8_export
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"].update(change)
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_hf(str(bad))


def test_fp8_weights_without_quantization_config_are_an_error(fp8_export, tmp_path):
    _, out = fp8_export
    cfg = json.loads((out / "config.json").read_text())
    del cfg["quantization_config"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"is float8_e4m3fn but config\.json has no quantization_config"):
        load_hf(str(bad))
