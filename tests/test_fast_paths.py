"""Fast paths against their reference oracles, forward and backward, fp32 on CPU:
RMSNorm with its hand-written backward, SDPA with v padded to the q/k head dim (so that the
CPU flash kernel runs instead of the unfused math path), the fused AdamW, and the MoE layer
compiled whole (the grouped GEMM as a custom op) against eager."""
from __future__ import annotations

import pytest
import torch

from model.attention import eager_attention, sdpa_attention
from model.norm import RMSNorm


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return out.detach(), [t.grad for t in inputs]


def test_fused_rmsnorm_equals_reference():
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(4, 7, 96) * 3
    y_fast, (gx_fast,) = _grads(norm, x)
    y_ref, (gx_ref,) = _grads(norm.forward_reference, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-5, atol=1e-5)
    # and the weight gradient
    norm.zero_grad()
    norm(x).sum().backward()
    gw_fast = norm.weight.grad.clone()
    norm.zero_grad()
    norm.forward_reference(x).sum().backward()
    torch.testing.assert_close(gw_fast, norm.weight.grad, rtol=1e-5, atol=1e-5)


def test_rmsnorm_backward_passes_gradcheck():
    """The hand-written backward against finite differences, in float64."""
    from model.norm import _RMSNormFn

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), (x, w))


def test_fused_adamw_matches_the_loop_reference():
    """train.optimizer_impl: the three AdamW kernels give the same parameters after a few steps
    (weight decay on one group, none on the other, as param_groups builds them)."""
    from parallel.engine import adamw_impl

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(16, 8, generator=g), torch.randn(8, generator=g)]
    grads = [[torch.randn_like(p) for p in init] for _ in range(4)]
    results = {}
    for impl in ("loop", "foreach", "fused"):
        ps = [torch.nn.Parameter(p.clone()) for p in init]
        opt = torch.optim.AdamW([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}],
                                lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **adamw_impl(impl))
        for step_grads in grads:
            for p, gr in zip(ps, step_grads):
                p.grad = gr.clone()
            opt.step()
        results[impl] = [p.detach() for p in ps]
    for impl in ("foreach", "fused"):
        for a, b in zip(results[impl], results["loop"]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results["fused"][0], init[0])     # the steps did move the weights


@pytest.mark.parametrize("dv", [16, 24])
def test_padded_sdpa_equals_eager_reference_with_gradients(dv):
    torch.manual_seed(0)
    B, H, S, dq = 2, 3, 37, 24
    q, k, v = torch.randn(B, H, S, dq), torch.randn(B, H, S, dq), torch.randn(B, H, S, dv)
    y_fast, g_fast = _grads(lambda q, k, v: sdpa_attention(q, k, v, 0.2), q, k, v)
    y_ref, g_ref = _grads(lambda q, k, v: eager_attention(q, k, v, 0.2), q, k, v)
    assert y_fast.shape == (B, H, S, dv)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    for a, b, name in zip(g_fast, g_ref, "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"d{name}")


def test_padding_selects_the_fused_cpu_kernel():
    """The point of the padding: with dv < dq, torch's CPU SDPA would take the math path."""
    from torch.profiler import profile

    q, k, v = torch.randn(1, 2, 16, 24), torch.randn(1, 2, 16, 24), torch.randn(1, 2, 16, 16)
    with profile() as prof:
        sdpa_attention(q, k, v, 0.2)
    names = {e.key for e in prof.key_averages()}
    assert any("flash_attention" in n for n in names), sorted(names)
    assert not any("attention_math" in n for n in names), sorted(names)
