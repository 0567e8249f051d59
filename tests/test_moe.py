"""Grouped-GEMM MoE path against the loop-over-experts oracle, forward and gradients."""
import copy

import pytest
import torch

from model.grouped_gemm import grouped_mm
from model.moe import MoE
from tests.helpers import tiny_cfg


@pytest.mark.parametrize("native", [True, False])
def test_grouped_mm_matches_per_segment_matmul(native):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])                # empty experts included
    N, K, M = int(counts.sum()), 8, 12
    x = torch.randn(N, K, generator=g, requires_grad=True)
    w = torch.randn(len(counts), K, M, generator=g, requires_grad=True)
    y = grouped_mm(x, w, counts, native=native)
    dy = torch.randn(N, M, generator=g)
    (y * dy).sum().backward()

    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    segs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        segs.append(xr[start:start + c] @ wr[e])
        start += c
    yr = torch.cat(segs)
    (yr * dy).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    assert w.grad[1].abs().sum() == 0 and w.grad[4].abs().sum() == 0


def test_grouped_mm_expanded_gradient():
    """y.sum().backward() hands the kernel a stride-0 gradient; it must still work."""
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 8, 4, requires_grad=True)
    grouped_mm(x, w, torch.tensor([2, 4])).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("kw", [dict(), dict(n_shared_experts=0), dict(n_routed_experts=16, n_group=8, topk_group=3,
                                                                          num_experts_per_tok=5, hidden_size=28)])
def test_moe_grouped_equals_loop_oracle(kw):
    cfg = tiny_cfg(**kw)
    torch.manual_seed(0)
    fast = MoE(cfg)
    for p in fast.parameters():
        torch.nn.init.normal_(p, std=0.2)
    fast.gate.e_score_correction_bias.normal_(0, 0.1)
    fast.train()
    slow = copy.deepcopy(fast)
    slow.impl = "loop"
    x = torch.randn(3, 11, cfg.hidden_size)
    xf, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yf, af = fast(xf)
    ys, as_ = slow(xs)
    torch.testing.assert_close(yf, ys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(af, as_)
    dy = torch.randn_like(yf)
    ((yf * dy).sum() + af).backward()
    ((ys * dy).sum() + as_).backward()
    torch.testing.assert_close(xf.grad, xs.grad, rtol=1e-5, atol=1e-6)
    for (name, pf), ps in zip(fast.named_parameters(), slow.parameters()):
        # the fast path applies the gate weight before the down projection, the oracle after it:
        # fp32 rounding of gradients summed over many rows (|grad| up to ~25 here) stays below 1e-5
        torch.testing.assert_close(pf.grad, ps.grad, rtol=1e-5, atol=1e-5, msg=name)
    # both paths counted the same tokens per expert, every token K times (dropless)
    torch.testing.assert_close(fast.tokens_per_expert, slow.tokens_per_expert)
    assert fast.tokens_per_expert.sum().item() == 3 * 11 * cfg.num_experts_per_tok


def test_token_counting_can_be_switched_off():
    cfg = tiny_cfg()
    moe = MoE(cfg).train()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe(torch.randn(2, 5, cfg.hidden_size))
    first = moe.tokens_per_expert.clone()
    moe.count_tokens = False
    moe(torch.randn(2, 5, cfg.hidden_size))
    assert torch.equal(moe.tokens_per_expert, first)
    moe.eval()
    moe.count_tokens = True
    moe(torch.randn(2, 5, cfg.hidden_size))
    assert torch.equal(moe.tokens_per_expert, first)   # eval passes never count


def test_permute_hand_worked_indices():
    from model.moe import permute, unpermute
    # 3 tokens, K=2: token0 -> experts (2, 0), token1 -> (1, 2), token2 -> (0, 1); E = 4
    topk = torch.tensor([[2, 0], [1, 2], [0, 1]])
    p = permute(topk, 4)
    # flat copies: [2,0,1,2,0,1]; stable sort by expert: e0 <- copies 1,4; e1 <- 2,5; e2 <- 0,3
    assert p.order.tolist() == [1, 4, 2, 5, 0, 3]
    assert p.token_of.tolist() == [0, 2, 1, 2, 0, 1]
    assert p.counts.tolist() == [2, 2, 2, 0]
    y_sorted = torch.arange(6, dtype=torch.float32).unsqueeze(1)          # row i = i
    w = torch.tensor([[10.0, 1.0], [100.0, 1000.0], [0.1, 0.01]])
    out = unpermute(y_sorted, p, w, 3)
    # token0: copy0 (e2, sorted pos 4) * 10 + copy1 (e0, pos 0) * 1
    assert out.squeeze(1).tolist() == pytest.approx([4 * 10 + 0 * 1, 2 * 100 + 5 * 1000, 1 * 0.1 + 3 * 0.01])


def _compiled_vs_eager(device: str, dtype: torch.dtype):
    cfg = tiny_cfg(aux_loss_alpha=0.01)
    torch.manual_seed(0)
    eager = MoE(cfg).train()
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.2)
    eager.gate.e_score_correction_bias.normal_(0, 0.1)
    eager.to(device=device, dtype=dtype)
    compiled = copy.deepcopy(eager)
    run = torch.compile(compiled, fullgraph=True)          # fullgraph: a graph break is an error
    x = torch.randn(2, 16, cfg.hidden_size, device=device, dtype=dtype)
    dy = torch.randn(2, 16, cfg.hidden_size, device=device, dtype=dtype)
    outs = []
    for model, fn in ((eager, eager), (compiled, run)):
        xi = x.clone().requires_grad_()
        y, aux = fn(xi)
        ((y * dy).sum() + aux).backward()
        outs.append((y.detach(), aux.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters()}))
    assert eager.tokens_per_expert.sum().item() == 2 * 16 * cfg.num_experts_per_tok
    torch.testing.assert_close(compiled.tokens_per_expert, eager.tokens_per_expert)
    return outs


def test_moe_layer_compiles_whole_and_matches_eager():
    """torch.compile(fullgraph=True) of the MoE layer: the router, the permutation, the grouped GEMM
    (a custom op) and the balance loss trace with no graph break, and give eager's outputs,
    gradients and token counts."""
    (ye, ae, gxe, gpe), (yc, ac, gxc, gpc) = _compiled_vs_eager("cpu", torch.float32)
    torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ac, ae, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gxc, gxe, rtol=1e-5, atol=1e-6)
    for name in gpe:
        torch.testing.assert_close(gpc[name], gpe[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="torch._grouped_mm in bf16 needs a Hopper GPU (benchmarks/gpu/gpu_check.sh)")
def test_moe_layer_compiles_whole_on_cuda_bf16():
    """The same on Hopper in bf16 (the native grouped GEMM inside the compiled graph); bf16 rounding
    of the fused elementwise work differs from eager's, hence the looser tolerances."""
    (ye, ae, gxe, gpe), (yc, ac, gxc, gpc) = _compiled_vs_eager("cuda", torch.bfloat16)
    torch.testing.assert_close(yc, ye, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(gxc, gxe, rtol=3e-2, atol=3e-2)
    for name in gpe:
        torch.testing.assert_close(gpc[name], gpe[name], rtol=5e-2, atol=5e-2, msg=name)
