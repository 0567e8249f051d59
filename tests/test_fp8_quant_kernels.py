"""The fused Triton FP8 quantizers (model/kernels/fp8_quant.py) and the dense Triton FP8 linear, on CPU under
TRITON_INTERPRET=1.

- Every quantizer is BIT-identical to its torch oracle in model/fp8.py (the bytes of the fp8 data and the
  fp32 scales, same shapes), on ragged shapes: rows and K not multiples of 128, all-zero tiles, values past
  448 before scaling, pow2 on and off, no rows, K = 0; per expert segment: empty segments, a one-row
  segment, segments of exact multiples of 128, no rows; 128x128 weight blocks, one matrix or all experts.
  The E4M3 encoder is checked on every code, every midpoint between neighbours (ties to even) and the
  fp32 values one ulp either side.
- The dense "triton" FP8 linear (m-grouped kernel with one group, k-grouped with one segment) against the
  emulated oracle: y, dx, dw to ~1e-7 relative (only fp32 summation order differs), with 0 host syncs.
- Op budgets (counts, not timings): an FP8 linear forward + backward on the triton path issues at most
  LINEAR_BUDGET aten ops + Triton launches (the emulated path: 105), a grouped FP8 GEMM at most
  GROUPED_BUDGET, the same for 4 and 32 experts.
Cost: 27-45 s on 2 CPU cores (load average 1-4), most of it the interpreter (the whole-model step, the
grouped budget).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"          # tests/conftest.py sets it for the session; this file alone too
pytest.importorskip("triton")

from model import fp8  # noqa: E402
from model.fp8_linear import fp8_grouped_mm, fp8_linear, quantized_experts  # noqa: E402
from model.fp8_probe import _probe_linear  # noqa: E402
from model.kernels import fp8_quant  # noqa: E402
from tests.host_sync import HostSyncs  # noqa: E402
from tests.test_triton_kernels import max_rel  # noqa: E402

# measured (a budget is the measured count: any added op fails): linear 17 aten ops + 6 launches = 23 (fp32
# F.linear: 10, the emulated FP8 linear: 105); grouped 27 + 7 = 34 at any E (emulated: 114)
LINEAR_BUDGET = 23
GROUPED_BUDGET = 34
SHAPES = {"ragged": (70, 200), "rows 129, K 300": (129, 300), "one row": (1, 128), "no rows": (0, 96),
          "K = 0": (5, 0), "whole tiles": (256, 256)}


def same_bits(a: fp8.QTensor, b: fp8.QTensor) -> bool:
    return (a.tile == b.tile and a.shape == b.shape and a.data.shape == b.data.shape
            and torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.scale, b.scale))


def ragged_input(M: int, K: int, seed: int = 0) -> torch.Tensor:
    """Values up to ~5000 (past 448 before scaling), an all-zero row and tile, tiny values."""
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(seed)) * 1000
    if M > 3 and K > 0:
        x[1] = 0                                   # an all-zero 1x128 tile in every K block
        x[2, : min(K, 7)] = 1e-30                  # subnormal after scaling
        x[:, -1] = 0                               # an all-zero 128x1 column
    return x


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantizers_bit_identical_to_torch(shape, pow2):
    x = ragged_input(*SHAPES[shape])
    cached = fp8.quantize_act(x, pow2)
    pairs = {"quantize_act": (fp8.quantize_act(x, pow2), fp8_quant.quantize_act(x, pow2)),
             "quantize_wgrad": (fp8.quantize_wgrad(x, pow2), fp8_quant.quantize_wgrad(x, pow2)),
             "retile_wgrad": (fp8.retile_wgrad(cached, pow2), fp8_quant.retile_wgrad(cached, pow2))}
    for i, (ref, got) in enumerate(zip(fp8.quantize_dual(x, pow2), fp8_quant.quantize_dual(x, pow2))):
        pairs[f"quantize_dual[{i}]"] = (ref, got)
    for name, (ref, got) in pairs.items():
        assert same_bits(ref, got), name
    x16 = x.to(torch.bfloat16)                     # any float input dtype: read and widened in the kernel
    assert same_bits(fp8.quantize_act(x16, pow2), fp8_quant.quantize_act(x16, pow2))


@pytest.mark.parametrize("pow2", [False, True])
def test_weight_quantizers_bit_identical_to_torch(pow2):
    g = torch.Generator().manual_seed(5)
    for N, K in ((136, 200), (256, 384), (1, 1), (0, 5), (300, 0)):
        w = torch.randn(N, K, generator=g) * 30
        assert same_bits(fp8.quantize_weight(w, pow2), fp8_quant.quantize_weight(w, pow2)), (N, K)
    for E, K, M in ((3, 200, 96), (4, 130, 260), (0, 16, 16)):
        w = torch.randn(E, K, M, generator=g) * 0.05
        w[:1] = 0                                                          # an all-zero expert
        (rd, rs), (gd, gs) = fp8.quantize_experts(w, pow2), fp8_quant.quantize_experts(w, pow2)
        assert rd.shape == gd.shape and torch.equal(rd.view(torch.uint8), gd.view(torch.uint8)), (E, K, M)
        assert torch.equal(rs, gs), (E, K, M)


def test_e4m3_encoding_every_code_and_tie():
    """A first column of 448 makes every row's scale exactly 1, so the kernel encodes the values as given."""
    codes = torch.arange(0, 127, dtype=torch.uint8).view(fp8.FP8_DTYPE).float()           # 0 .. 448
    mids = (codes[1:] + codes[:-1]) / 2

    def ulp(v: torch.Tensor, d: int) -> torch.Tensor:
        return (v.view(torch.int32) + d).view(torch.float32)
    vals = torch.cat([codes, mids, ulp(mids, 1), ulp(mids, -1), ulp(codes[1:], 1), ulp(codes[1:], -1)])
    rnd = torch.randint(0, 0x43E00000, (20_000,), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    vals = torch.cat([vals, rnd.view(torch.float32)]).clamp(0, 448)
    vals = torch.cat([vals, -vals, torch.zeros(-(2 * vals.numel()) % 127)]).view(-1, 127)
    x = torch.cat([torch.full((vals.shape[0], 1), 448.0), vals], 1)
    ref, got = fp8.quantize_act(x), fp8_quant.quantize_act(x)
    assert torch.equal(ref.scale, torch.ones_like(ref.scale))
    assert same_bits(ref, got)
    assert torch.equal(got.data.view(torch.uint8), x.to(fp8.FP8_DTYPE).view(torch.uint8))   # torch's own cast


SEGMENTS = {"ragged": [70, 0, 37, 150, 1], "one expert": [0, 0, 131], "no rows": [0, 0, 0],
            "whole tiles": [128, 256, 1], "one row": [1]}


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("case", SEGMENTS)
def test_segment_quantizer_bit_identical_to_torch(case, pow2):
    counts = torch.tensor(SEGMENTS[case])
    x = ragged_input(int(counts.sum()), 200, seed=1)
    seg = fp8.segments(counts, x.shape[0])
    cached = fp8.quantize_act(x, pow2)
    pairs = {"high precision": (fp8.quantize_segments(x, seg, pow2), fp8_quant.quantize_segments(x, seg, pow2)),
             "cached 1x128": (fp8.quantize_segments(fp8.dequantize_act_padded(cached)[:, :200], seg, pow2),
                              fp8_quant.quantize_segments(cached, fp8.segments(counts, x.shape[0], with_rows=False),
                                                          pow2))}
    for name, ((rd, rs), (gd, gs)) in pairs.items():
        assert rd.shape == gd.shape and torch.equal(rd.view(torch.uint8), gd.view(torch.uint8)), name
        assert torch.equal(rs, gs), name                                   # unused tile slots: the floor scale too


@pytest.mark.parametrize("bias,cache", [(True, True), (False, False)])
def test_dense_triton_linear_matches_emulated_without_host_syncs(bias, cache):
    g = torch.Generator().manual_seed(3)
    M, N, K = 200, 136, 200                                              # none a multiple of 128
    x, w, dy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05, torch.randn(M, N, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    outs = {}
    for kernel in ("emulated", "triton"):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        with HostSyncs() as syncs:
            y = fp8_linear(xg, wg, b, kernel=kernel, cache_fp8=cache)
            y.backward(dy)
        outs[kernel] = (y.detach(), xg.grad, wg.grad, syncs.events)
    errs = [max_rel(got, ref) for got, ref in zip(outs["triton"][:3], outs["emulated"][:3])]
    print(f"dense triton FP8 linear bias={bias} cache={cache}: y {errs[0]:.2e} dx {errs[1]:.2e} dw {errs[2]:.2e}")
    assert max(errs) < 1e-5
    assert outs["triton"][3] == []


def test_probe_verifies_the_triton_linear_at_every_shape():
    """The probe's own check of the linear kernel (forward, dgrad, wgrad at each (N, K)) passes under the
    interpreter: the same code path that picks it on an sm89 GPU."""
    assert _probe_linear("triton", torch.device("cpu"), [(288, 256), (100, 136), (48, 384)]) is None


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def launches(monkeypatch):
    """A list that grows by one per Triton kernel launch (the interpreter's copies are not counted as ops)."""
    import triton.runtime.interpreter as interp
    from triton.runtime.jit import JITFunction

    seen = []
    for cls in (JITFunction, interp.InterpretedFunction):
        def run(self, *a, _orig=cls.run, **k):
            seen.append(1)
            with torch._C._DisableTorchDispatch():
                return _orig(self, *a, **k)
        monkeypatch.setattr(cls, "run", run)
    return seen


def _ops_and_launches(fn, launches: list) -> int:
    fn()                                                                 # warm: imports, caches
    before = len(launches)
    with _Count() as ops:
        fn()
    return ops.n + len(launches) - before


def test_fp8_linear_op_budget(launches):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 256, generator=g, requires_grad=True)
    w = (torch.randn(192, 256, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(300, 192, generator=g)
    w_fp8 = fp8.quantize_weight(w.detach())                              # FP8Linear's cached copy
    n = _ops_and_launches(lambda: fp8_linear(x, w, kernel="triton", w_fp8=w_fp8).backward(dy), launches)
    print(f"FP8 linear fwd+bwd, triton: {n} aten ops + launches (budget {LINEAR_BUDGET})")
    assert 0 < n <= LINEAR_BUDGET


def test_grouped_fp8_op_budget_independent_of_experts(launches):
    counts = {}
    for E in (4, 32):
        g = torch.Generator().manual_seed(E)
        x = torch.randn(300, 128, generator=g, requires_grad=True)
        w = (torch.randn(E, 128, 96, generator=g) * 0.05).requires_grad_()
        c = torch.bincount(torch.randint(0, E, (300,), generator=g), minlength=E)     # ragged, some empty at E=32
        dy, w_fp8 = torch.randn(300, 96, generator=g), quantized_experts({}, w, False)
        run = (lambda x=x, w=w, c=c, w_fp8=w_fp8, dy=dy:
               fp8_grouped_mm(x, w, c, kernel="triton", w_fp8=w_fp8).backward(dy))
        counts[E] = _ops_and_launches(run, launches)
    print(f"grouped FP8 GEMM fwd+bwd, triton: {counts} aten ops + launches (budget {GROUPED_BUDGET})")
    assert counts[4] == counts[32] and 0 < counts[4] <= GROUPED_BUDGET


def test_whole_model_step_triton_equals_emulated_without_host_syncs():
    """Every FP8 GEMM of a tiny model (linears and experts, MTP included) on the Triton kernels and fused
    quantizers: loss and every gradient as on the emulated path (same bits in, fp32 sums in another order)."""
    import copy

    from configs.schema import FP8Config
    from model.fp8 import rel_err
    from model.fp8_linear import FP8Linear, FP8RoutedExperts
    from model.fp8_swap import apply_fp8, set_fp8_option
    from model.transformer import DeepseekV3
    from tests.helpers import tiny_cfg

    torch.manual_seed(0)
    emulated = DeepseekV3(tiny_cfg(num_nextn_predict_layers=1)).train()
    apply_fp8(emulated, FP8Config(enabled=True, backend="emulated"))
    triton_model = copy.deepcopy(emulated)
    set_fp8_option(triton_model, fp8_kernel="triton")
    fp8_mods = [m for m in triton_model.modules() if isinstance(m, (FP8Linear, FP8RoutedExperts))]
    assert fp8_mods and all(m.fp8_kernel == "triton" for m in fp8_mods)
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(0))
    losses = {}
    for name, model in (("emulated", emulated), ("triton", triton_model)):
        with HostSyncs() as syncs:
            loss = model(ids, labels=ids).loss
            loss.backward()
        losses[name] = loss.item()
        if name == "triton":
            assert syncs.events == []
    grads = {n: [dict(m.named_parameters())[n].grad for m in (emulated, triton_model)]
             for n, p in emulated.named_parameters() if p.grad is not None}
    total = rel_err(*(torch.cat([g[i].flatten() for g in grads.values()]) for i in (1, 0)))
    print(f"tiny model step, {len(fp8_mods)} FP8 modules: loss triton {losses['triton']:.6f} emulated "
          f"{losses['emulated']:.6f}, all-grad rel err {total:.2e}")
    assert abs(losses["triton"] - losses["emulated"]) < 1e-5 * abs(losses["emulated"]) and total < 1e-4


def test_probe_prefers_triton_linear_where_blockwise_is_missing(monkeypatch):
    """The CUDA probe on a simulated sm89 (device name and capability patched, no F.scaled_mm): the linear
    layers land on the Triton kernel, verified by really running it at every shape (here under the
    interpreter on CPU tensors), before rowwise; on sm86 (no fp8 tensor cores) rowwise is next."""
    import torch.nn.functional as F

    from model import fp8_probe

    cap = {"value": (8, 9)}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "simulated GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap["value"])
    monkeypatch.delattr(F, "scaled_mm", raising=False)
    linear, experts = frozenset({(96, 136), (48, 256)}), frozenset({(128, 64), (64, 128)})
    found = fp8_probe._resolve_cuda(torch.device("cpu"), linear, experts)
    print(found)
    assert found["linear"][0] == "triton" and found["experts"][0] == "triton"
    assert "simulated GPU (sm_89)" in found["linear"][1] and "4 GEMM shapes" in found["linear"][1]
    assert fp8_probe.describe(found).startswith("linear fwd/dgrad/wgrad=triton;")
    cap["value"] = (8, 6)
    assert fp8_probe._resolve_cuda(torch.device("cpu"), linear, frozenset())["linear"][0] == "rowwise"
