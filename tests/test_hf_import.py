"""Directories users arrive with: saved by transformers itself (its config promises MTP layers it
never writes), with some MTP tensors missing, or imported with freshly initialised MTP layers."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.hf import load_hf, save_hf, weight_reader
from model.transformer import DeepseekV3
from parallel.state import init_from
from scripts.import_hf import import_hf
from tests.helpers import YARN, tiny_cfg

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, n_routed_experts=8, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
             qk_nope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2, num_experts_per_tok=3,
             first_k_dense_replace=1)
# transformers' own DeepseekV3Config with only the sizes changed: num_nextn_predict_layers=1 and
# num_key_value_heads=128 are its defaults; one config with plain RoPE, one with YaRN
TRANSFORMERS_CASES = {
    "default": {},
    "yarn_qproj": dict(q_lora_rank=None, max_position_embeddings=256,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def _transformers_saved(path, **kw):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**{**SMALL, **kw})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.normal_(0, 0.3)              # a bias that matters for the routing
    hf.save_pretrained(str(path))
    return hf


@pytest.mark.parametrize("name", sorted(TRANSFORMERS_CASES))
def test_transformers_saved_directory_loads_without_mtp(name, tmp_path):
    hf = _transformers_saved(tmp_path, **TRANSFORMERS_CASES[name])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 1 and saved["num_key_value_heads"] == 128   # its defaults
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = load_hf(str(tmp_path))
    said = [str(w.message) for w in record if "MTP" in str(w.message)]
    assert len(said) == 1 and "missing model.layers.3.enorm.weight" in said[0], said
    assert ours.config.num_nextn_predict_layers == 0 and len(ours.mtp) == 0
    ids = torch.randint(0, SMALL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print(f"transformers-saved {name}: load_hf vs transformers max-abs logit error {err:.2e} (fp32)")
    assert err < 1e-5


def test_import_of_transformers_saved_directory(tmp_path, capsys):
    """By default without MTP (a warning); --mtp init adds fresh MTP layers that train.init_from loads."""
    _transformers_saved(tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), str(tmp_path / "plain"))
    err = capsys.readouterr().err
    assert "warning:" in err and "no MTP weights (missing model.layers.3." in err and "imported without MTP" in err
    plain = json.loads((tmp_path / "plain" / weight_reader.INIT_CONFIG).read_text())["model"]
    assert plain["num_nextn_predict_layers"] == 0
    assert not [k for k in load_file(str(tmp_path / "plain" / weight_reader.MODEL)) if k.startswith("mtp.")]

    import_hf(str(tmp_path / "hf"), str(tmp_path / "mtp"), mtp="init", seed=3)
    assert "notice:" in capsys.readouterr().err
    cfg_d = json.loads((tmp_path / "mtp" / weight_reader.INIT_CONFIG).read_text())["model"]
    assert cfg_d["num_nextn_predict_layers"] == 1
    with_mtp, without = (load_file(str(tmp_path / d / weight_reader.MODEL)) for d in ("mtp", "plain"))
    fresh = {k: v for k, v in with_mtp.items() if k.startswith("mtp.")}
    assert {k: v for k, v in with_mtp.items() if not k.startswith("mtp.")}.keys() == without.keys()
    from model.config import ModelConfig

    model = DeepseekV3(ModelConfig.from_dict(cfg_d))
    assert fresh.keys() == {k for k in model.state_dict() if k.startswith("mtp.")}
    # initialised as a fresh model would be: N(0, 0.02) matrices, unit norms, zero router bias
    std = cfg_d["initializer_range"]
    assert abs(fresh["mtp.0.eh_proj.weight"].std().item() - std) < 0.1 * std
    assert abs(fresh["mtp.0.block.mlp.experts.w_gate_up"].std().item() - std) < 0.1 * std
    assert torch.equal(fresh["mtp.0.enorm.weight"], torch.ones_like(fresh["mtp.0.enorm.weight"]))
    assert not fresh["mtp.0.block.mlp.gate.e_score_correction_bias"].any()
    init_from.load_init_weights(model, tmp_path / "mtp")        # what train.init_from does
    assert torch.equal(model.mtp[0].eh_proj.weight, fresh["mtp.0.eh_proj.weight"])
    save_hf(model, str(tmp_path / "ours"))
    with pytest.raises(ValueError, match="already has its MTP layers"):
        import_hf(str(tmp_path / "ours"), str(tmp_path / "again"), mtp="init")


def test_some_mtp_tensors_missing_is_an_error_naming_them(tmp_path):
    torch.manual_seed(0)
    src = DeepseekV3(tiny_cfg(num_nextn_predict_layers=1, rope_scaling=YARN)).eval()
    save_hf(src, str(tmp_path / "hf"))
    side = tmp_path / "hf" / "mtp.safetensors"
    tensors = load_file(str(side))
    gone = "model.layers.3.self_attn.o_proj.weight"
    del tensors[gone], tensors["model.layers.3.eh_proj.weight"]
    save_file(tensors, str(side), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"incomplete MTP layers: .* 2 of its \d+ tensors are missing: "
                                         r"\['model\.layers\.3\.eh_proj\.weight', "
                                         r"'model\.layers\.3\.self_attn\.o_proj\.weight'\]"):
        load_hf(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"model\.layers\.3\.eh_proj\.weight"):
        import_hf(str(tmp_path / "hf"), str(tmp_path / "init"))
    assert not (tmp_path / "init").exists()
