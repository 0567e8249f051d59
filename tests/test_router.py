"""Router and balance loss against brute-force per-token references."""
import itertools

import pytest
import torch

from model.router import Router, select_experts, sequence_balance_loss
from tests.helpers import tiny_cfg


def brute_force_select(scores_row, bias_row, n_group, topk_group, k):
    """Enumerate every set of topk_group groups; keep the set with the best summed group score,
    then take the k best biased experts inside it."""
    E = len(scores_row)
    per = E // n_group
    biased = [s + b for s, b in zip(scores_row, bias_row)]
    group_score = [sum(sorted(biased[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
    best = max(itertools.combinations(range(n_group), topk_group), key=lambda gs: sum(group_score[g] for g in gs))
    allowed = [e for g in best for e in range(g * per, (g + 1) * per)]
    return set(sorted(allowed, key=lambda e: biased[e], reverse=True)[:k])


@pytest.mark.parametrize("E,G,TG,K", [(8, 4, 2, 3), (16, 8, 3, 4), (12, 1, 1, 5), (16, 4, 1, 2)])
def test_select_experts_matches_brute_force(E, G, TG, K):
    g = torch.Generator().manual_seed(E * 100 + K)
    scores = torch.rand(200, E, generator=g, dtype=torch.float64)
    bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.2
    got = select_experts(scores, bias, G, TG, K)
    for t in range(scores.shape[0]):
        want = brute_force_select(scores[t].tolist(), bias.tolist(), G, TG, K)
        assert set(got[t].tolist()) == want, f"token {t}"


@pytest.mark.parametrize("norm", [True, False])
def test_router_weights_use_unbiased_scores(norm):
    cfg = tiny_cfg(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
                   norm_topk_prob=norm, routed_scaling_factor=2.5)
    r = Router(cfg)
    torch.nn.init.normal_(r.weight, std=0.5)
    r.e_score_correction_bias.copy_(torch.tensor([0.5, 0, 0, 0, -0.5, 0, 0.3, 0]))
    x = torch.randn(50, cfg.hidden_size)
    out = r(x)
    scores = torch.sigmoid(x @ r.weight.t())
    for t in range(50):
        idx = out.topk_idx[t]
        w = scores[t, idx]
        if norm:
            w = w / w.sum()
        torch.testing.assert_close(out.topk_weight[t], w * 2.5)
    # dropless: every token gets exactly K distinct experts
    assert all(len(set(row.tolist())) == 2 for row in out.topk_idx)


def test_router_scores_are_fp32_for_bf16_inputs():
    cfg = tiny_cfg()
    r = Router(cfg).to(torch.bfloat16)
    out = r(torch.randn(10, cfg.hidden_size, dtype=torch.bfloat16))
    assert out.scores.dtype == torch.float32 and out.topk_weight.dtype == torch.float32
    assert r.e_score_correction_bias.dtype == torch.float32  # kept fp32 through .to(bf16)
    assert r.weight.dtype == torch.bfloat16


def test_sequence_balance_loss_brute_force():
    B, S, E, K, alpha = 3, 7, 8, 2, 0.01
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(B * S, E, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(B * S)])
    got = sequence_balance_loss(scores, idx, B, alpha)
    total = 0.0
    for b in range(B):
        rows = range(b * S, (b + 1) * S)
        for i in range(E):
            f = E / (K * S) * sum(int(i in idx[t].tolist()) for t in rows)
            p = sum((scores[t, i] / scores[t].sum()).item() for t in rows) / S
            total += f * p
    assert got.item() == pytest.approx(alpha * total / B, rel=1e-5)
    # perfectly balanced routing with uniform scores gives alpha * 1
    uni = torch.ones(S * 1, 4)
    bal = torch.tensor([[0, 1], [2, 3]] * 2)[:4]
    assert sequence_balance_loss(uni[:4], bal, 1, alpha).item() == pytest.approx(alpha)
