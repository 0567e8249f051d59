"""Triton kernels on CPU under TRITON_INTERPRET=1, each against the slow reference, on small ragged
shapes (an empty expert, a one-row expert, rows and K not multiples of 128).

- FP8 m-grouped (forward, dgrad) and k-grouped (wgrad) kernels vs ``fp8_grouped_reference`` (one
  expert at a time, per-tensor quantizers, emulated fp8_mm). Same tiles and scales on both sides, so
  only fp32 summation order differs: measured max relative error ~2e-7; asserted < 1e-5.
- DeepSpeed 0.19.8's Triton grouped GEMM (fwd, dx, dw) vs the per-expert loop, in fp32 and fp16.
  bf16 is not tested here: the 3.9 interpreter returns garbage for bf16 operands (max error ~1e9),
  while fp16 and fp32 match.
The GEMM kernels only load fp8 (an exact upcast); these tests feed them torch's FP8. The fused Triton
quantizers that feed them in training are checked bit for bit against torch's in
tests/test_fp8_quant_kernels.py (they encode E4M3 with integer arithmetic: Triton 3.9's interpreter
rounds fp32 -> fp8 conversions wrongly, triton issue 8322).
Cost: about 15 s in all on 2 CPU cores (the interpreter runs every program in numpy).
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # tests/conftest.py sets it for the whole session (triton may be imported before this module); this
    # line keeps the file runnable on its own
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from model.fp8 import quantize_act, quantize_experts, quantize_segments, segments  # noqa: E402
from model.fp8_linear import fp8_grouped_mm, fp8_grouped_reference  # noqa: E402
from model.grouped_gemm import _LoopGroupedMM, kernel_for  # noqa: E402
from model.kernels.fp8_grouped import k_grouped_fp8, m_grouped_fp8, tile_plan  # noqa: E402
from tests.host_sync import HostSyncs  # noqa: E402

BOUND = 1e-5
CASES = {"ragged": [70, 0, 37, 150, 1], "one expert": [0, 0, 131], "no rows": [0, 0, 0]}


def max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (0 when both are empty or zero)."""
    if ref.numel() == 0:
        return 0.0
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def _setup(counts: list[int], K: int = 200, M: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N = sum(counts)
    return (torch.tensor(counts), torch.randn(N, K, generator=g), torch.randn(len(counts), K, M, generator=g) * 0.05,
            torch.randn(N, M, generator=g))


@pytest.mark.parametrize("case", CASES)
def test_m_grouped_forward_and_dgrad_match_reference(case):
    counts, x, w, dy = _setup(CASES[case])
    ref_y, ref_dx, _ = fp8_grouped_reference(x, w, CASES[case], dy)
    w_data, w_scale = quantize_experts(w)
    plan = tile_plan(counts, x.shape[0], 32)                          # 32-row tiles: several per expert
    xq, dyq = quantize_act(x), quantize_act(dy)
    y = m_grouped_fp8(xq.data, xq.scale, w_data, w_scale, plan, block_n=32)
    dx = m_grouped_fp8(dyq.data, dyq.scale, w_data, w_scale, plan, transpose_b=True, block_n=64)
    errs = max_rel(y, ref_y), max_rel(dx, ref_dx)
    print(f"m-grouped {case}: forward max rel err {errs[0]:.2e}, dgrad {errs[1]:.2e}")
    assert y.shape == ref_y.shape and dx.shape == ref_dx.shape and max(errs) < BOUND


@pytest.mark.parametrize("case", CASES)
def test_k_grouped_wgrad_matches_reference(case):
    counts, x, w, dy = _setup(CASES[case])
    ref_dw = fp8_grouped_reference(x, w, CASES[case], dy)[2]
    seg = segments(counts, x.shape[0])
    # the reference re-tiles the 1x128-cached x: so does the fast path (dequantized 1x128 x as input)
    xq = quantize_act(x)
    x_hp = xq.dequantize()
    dw = k_grouped_fp8(*quantize_segments(x_hp, seg), *quantize_segments(dy, seg), seg.start, seg.end,
                       seg.tile_first, block_k=64, block_n=32)
    err = max_rel(dw, ref_dw)
    print(f"k-grouped {case}: wgrad max rel err {err:.2e}")
    assert err < BOUND
    empty = [e for e, n in enumerate(CASES[case]) if n == 0]
    assert all(dw[e].abs().sum() == 0 for e in empty)                   # empty experts: zero gradient


def test_fp8_grouped_mm_triton_end_to_end_without_host_syncs():
    """The autograd function with the production launch shapes, vs the reference, counted for syncs."""
    rows = [60, 0, 9, 1]
    counts, x, w, dy = _setup(rows, K=136, M=48, seed=1)
    ref = fp8_grouped_reference(x, w, rows, dy)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with HostSyncs() as syncs:
        y = fp8_grouped_mm(xg, wg, counts, kernel="triton")
        y.backward(dy)
    errs = [max_rel(a, r) for a, r in zip((y.detach(), xg.grad, wg.grad), ref)]
    print(f"fp8_grouped_mm triton: y {errs[0]:.2e} dx {errs[1]:.2e} dw {errs[2]:.2e}")
    assert max(errs) < BOUND
    assert syncs.events == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_deepspeed_triton_grouped_gemm_matches_loop(dtype):
    from model.kernels.ds_grouped import ds_grouped_mm

    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([40, 0, 9, 1])
    N = int(counts.sum())
    x = torch.randn(N, 40, generator=g).to(dtype).requires_grad_()
    w = torch.randn(4, 40, 24, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(N, 24, generator=g).to(dtype)
    outs = []
    for fn in (ds_grouped_mm, _LoopGroupedMM.apply):
        y = fn(x, w, counts)
        y.backward(dy)
        outs.append((y.detach(), x.grad, w.grad))
        x.grad = w.grad = None
    errs = [max_rel(a.float(), b.float()) for a, b in zip(*outs)]
    print(f"deepspeed triton grouped gemm {dtype}: y {errs[0]:.2e} dx {errs[1]:.2e} dw {errs[2]:.2e}")
    assert max(errs) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert outs[0][2][1].abs().sum() == 0


def test_grouped_gemm_kernel_by_capability():
    assert kernel_for("cuda", torch.bfloat16, (8, 0)) == "deepspeed-triton"    # A100
    assert kernel_for("cuda", torch.float16, (8, 9)) == "deepspeed-triton"     # RTX 40xx
    assert kernel_for("cuda", torch.bfloat16, (9, 0)) == "torch"               # H100: torch._grouped_mm
    assert kernel_for("cuda", torch.float32, (8, 6)) == "loop"
    assert kernel_for("cpu", torch.float32) == "torch"
