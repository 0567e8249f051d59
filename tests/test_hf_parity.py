"""Parity with transformers' DeepseekV3ForCausalLM in fp32, weights moved through model/hf/convert.py
both ways (our model -> save_hf -> from_pretrained, and save_pretrained -> load_hf)."""
import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from model.hf import load_hf, save_hf
from model.router import select_experts
from model.transformer import DeepseekV3
from tests.helpers import YARN, tiny_cfg

CASES = {
    # plain q_proj, 4 groups (top-2 groups), YaRN with mscale, 2 dense layers, 2 shared experts
    "qproj_groups_yarn": dict(q_lora_rank=None, n_group=4, topk_group=2, rope_scaling=YARN,
                              num_hidden_layers=4, first_k_dense_replace=2, n_shared_experts=2),
    # low-rank q, one group, plain RoPE, non-interleaved rotary layout, MTP weights on disk
    "qlora_onegroup": dict(q_lora_rank=24, n_group=1, topk_group=1, rope_interleave=False,
                           num_nextn_predict_layers=1),
    # many small groups, top-k spread over 3 of 8 groups, no score normalisation
    "eight_groups_nonorm": dict(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4,
                                norm_topk_prob=False, rope_scaling=YARN, routed_scaling_factor=1.7),
}

MAX_ABS = 1e-4


def _model_with_bias(cfg, seed=0):
    torch.manual_seed(seed)
    m = DeepseekV3(cfg).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.weight.normal_(0, 0.5)  # spread the affinities so the bias matters
            moe.gate.e_score_correction_bias.normal_(0, 0.3)
    return m


@pytest.mark.parametrize("name", sorted(CASES))
def test_ours_to_hf(name, tmp_path):
    cfg = tiny_cfg(**CASES[name])
    ours = _model_with_bias(cfg)
    save_hf(ours, str(tmp_path))
    hf = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print(f"{name}: ours->HF max-abs logit error {err:.2e}")
    assert err < MAX_ABS


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_to_ours(name, tmp_path):
    cfg = tiny_cfg(**CASES[name])
    # build the HF model from our config mapping, give it random weights and a non-zero bias
    src = _model_with_bias(cfg, seed=3)
    save_hf(src, str(tmp_path / "src"))
    hf = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "src"), dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.01)   # weights that our model never produced
    hf.save_pretrained(str(tmp_path / "hf"))
    ours = load_hf(str(tmp_path / "hf"), num_nextn_predict_layers=0)
    ids = torch.randint(0, cfg.vocab_size, (3, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        err = (ours(ids).logits - hf(ids).logits).abs().max().item()
    print(f"{name}: HF->ours max-abs logit error {err:.2e}")
    assert err < MAX_ABS


def test_bias_changes_selection_and_parity_holds(tmp_path):
    """The correction bias must change which experts are picked (so parity above covers it)."""
    cfg = tiny_cfg(**CASES["qproj_groups_yarn"])
    m = _model_with_bias(cfg)
    moe = m.moe_layers()[0]
    x = torch.randn(64, cfg.hidden_size)
    scores = torch.sigmoid(x @ moe.gate.weight.t())
    with_bias = select_experts(scores, moe.gate.e_score_correction_bias, cfg.n_group, cfg.topk_group, 3)
    without = select_experts(scores, torch.zeros_like(moe.gate.e_score_correction_bias), cfg.n_group,
                             cfg.topk_group, 3)
    changed = (with_bias.sort(-1).values != without.sort(-1).values).any(-1).float().mean().item()
    assert changed > 0.2, f"bias changed the selection of only {changed:.0%} of tokens"


def test_hf_round_trip_is_lossless(tmp_path):
    cfg = tiny_cfg(num_nextn_predict_layers=1, rope_scaling=YARN)
    a = _model_with_bias(cfg)
    save_hf(a, str(tmp_path))
    b = load_hf(str(tmp_path))
    assert b.config == a.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
