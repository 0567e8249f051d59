"""Parameter and FLOP accounting: the analytic counts equal the built model's, and the
671B preset reproduces DeepSeek-V3's published figures."""
import json
import subprocess
import sys

import pytest
import torch

from model.flops import count_params
from model.transformer import DeepseekV3
from tests.helpers import tiny_cfg


@pytest.mark.parametrize("kw", [dict(num_nextn_predict_layers=2), dict(q_lora_rank=None, attention_bias=True),
                                dict(tie_word_embeddings=True, first_k_dense_replace=0)])
def test_counts_equal_built_model(kw):
    cfg = tiny_cfg(**kw)
    model = DeepseekV3(cfg)
    numel = sum(p.numel() for p in model.parameters())           # shared tensors counted once
    p = count_params(cfg)
    assert p.total + p.mtp_total == numel
    # activated = total minus the routed experts a token does not use
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    idle = n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert p.activated == p.total - idle


def test_671b_summary_figures():
    out = subprocess.run([sys.executable, "scripts/model_summary.py", "--config", "configs/deepseek_v3_671b.yaml",
                          "--json"], capture_output=True, text=True, check=True)
    s = json.loads(out.stdout)
    assert s["total"] == pytest.approx(671e9, rel=0.01)
    # 37B activated counts the matmul weights (embedding lookup excluded); with it, 37.55B
    assert s["activated_no_embedding"] == pytest.approx(37e9, rel=0.02)
    assert s["activated"] == pytest.approx(37e9, rel=0.02)
    assert s["mtp_total"] == pytest.approx(11.6e9, rel=0.02)       # ~14B with its own embedding/head copies
    # 6N dominates at 4K context: ~250 GFLOP per token
    assert 6 * s["activated_no_embedding"] < s["flops_per_token_train"] < 8 * s["activated_no_embedding"]


def test_flops_grow_with_context():
    cfg = tiny_cfg()
    assert count_params(cfg, 2048).flops_per_token_train > count_params(cfg, 128).flops_per_token_train
    assert torch.tensor(count_params(cfg, 128).flops_per_token_train) > 6 * count_params(cfg).activated_no_embedding
