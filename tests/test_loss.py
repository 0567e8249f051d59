"""The chunked head+loss (model/loss.py) against the reference: materialized logits, then
F.cross_entropy. Same loss and gradients, fewer bytes kept for backward."""
import pytest
import torch

from model.config import ModelConfig
from model.fp8_swap import apply_fp8
from model.loss import IGNORE_INDEX, chunked_linear_cross_entropy, cross_entropy
from model.transformer import DeepseekV3
from tests.helpers import tiny_cfg


def _inputs(T=37, D=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g).requires_grad_()
    w = torch.randn(V, D, generator=g).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    y[[0, 5, 6, 36]] = IGNORE_INDEX
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 7, 36, 37, 1024])
def test_chunked_matches_reference_loss_and_grads(chunk):
    h, w, y = _inputs()
    ref = cross_entropy(h @ w.t(), y)
    (ref * 2.5).backward()                        # a non-unit incoming gradient
    want = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    got = chunked_linear_cross_entropy(h, w, y, chunk)
    (got * 2.5).backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.grad, want[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, want[1], rtol=1e-5, atol=1e-7)
    assert h.grad[[0, 5, 6, 36]].abs().max() == 0          # ignored rows get no gradient


def test_frozen_head_and_no_grad_compute_only_what_is_needed():
    h, w, y = _inputs()
    ref = cross_entropy(h @ w.t(), y)
    ref.backward()
    want_h = h.grad.clone()
    h.grad = w.grad = None
    w.requires_grad_(False)
    chunked_linear_cross_entropy(h, w, y, 8).backward()
    assert w.grad is None
    torch.testing.assert_close(h.grad, want_h, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(chunked_linear_cross_entropy(h, w, y, 8), ref.detach(), rtol=1e-6, atol=1e-6)


def test_every_label_ignored_gives_nan_loss_and_zero_grads_like_the_reference():
    h, w, y = _inputs()
    y[:] = IGNORE_INDEX
    assert torch.isnan(cross_entropy(h @ w.t(), y))
    loss = chunked_linear_cross_entropy(h, w, y, 8)
    assert torch.isnan(loss)
    loss.backward()
    assert h.grad.abs().max() == 0 and w.grad.abs().max() == 0


def test_bf16_weights_stay_close_to_fp32():
    h, w, y = _inputs(T=64, D=32, V=96)
    ref = cross_entropy(h @ w.t(), y)
    got = chunked_linear_cross_entropy(h.detach().bfloat16(), w.detach().bfloat16(), y, 16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref.detach(), rtol=2e-2, atol=2e-2)


def test_saves_chunk_sized_memory_not_logits():
    """Bytes autograd keeps for backward: the reference keeps (T, V) logits-sized tensors, the
    chunked loss only dh (T, D) and dW (V, D)."""
    T, D, V = 512, 32, 4096
    h, w, y = _inputs(T=T, D=D, V=V)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype)] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    full = saved_bytes(lambda: cross_entropy(h @ w.t(), y))
    chunked = saved_bytes(lambda: chunked_linear_cross_entropy(h, w, y, 128))
    assert full >= T * V * 4                      # at least one fp32 logits-sized tensor
    assert chunked <= (T * D + V * D) * 4 + 64    # dh, dW and a scalar count
    assert chunked * 10 < full


@pytest.mark.parametrize("tied", [False, True])
def test_model_chunked_loss_matches_full_loss(tied):
    kw = dict(num_nextn_predict_layers=1, mtp_loss_weight=0.3, tie_word_embeddings=tied)
    cfg = tiny_cfg(loss_chunk=7, **kw)
    torch.manual_seed(0)
    chunked = DeepseekV3(cfg).train()
    full = DeepseekV3(tiny_cfg(loss_impl="full", **kw)).train()
    full.load_state_dict(chunked.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 13))
    a, b = chunked(tokens[:, :-1], tokens[:, 1:]), full(tokens[:, :-1], tokens[:, 1:])
    assert a.logits is None and b.logits.shape == (2, 12, cfg.vocab_size)
    for key in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-6, atol=1e-6, msg=key)
    a.loss.backward()
    b.loss.backward()
    grads = dict(full.named_parameters())
    for name, p in chunked.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():                         # without labels: logits as always
        torch.testing.assert_close(chunked.eval()(tokens).logits, full.eval()(tokens).logits)


def test_fp8_swapped_head_takes_the_reference_path():
    class FP8Cfg:
        enabled, backend, include, exclude = True, "emulated", ["lm_head"], []
    model = DeepseekV3(tiny_cfg()).train()
    report = apply_fp8(model, FP8Cfg())
    assert "lm_head" in report["converted"]
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert out.logits is not None and torch.isfinite(out.loss)


@pytest.mark.parametrize("field,value", [("loss_impl", "fused"), ("loss_chunk", 0)])
def test_bad_loss_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}={value!r}"):
        ModelConfig(**{field: value}).validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu/gpu_check.sh)")
def test_cuda_bf16_chunked_loss_matches_reference_and_peaks_lower():
    T, D, V = 4096, 512, 32768
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(T, D, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    peaks, results = [], []
    for fn in (lambda: cross_entropy(h @ w.t(), y), lambda: chunked_linear_cross_entropy(h, w, y, 1024)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        results.append((loss.detach().float(), h.grad.float(), w.grad.float()))
        h.grad = w.grad = None
    (l0, dh0, dw0), (l1, dh1, dw1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-2, atol=1e-2)
    for a, b in ((dh1, dh0), (dw1, dw0)):
        assert (a - b).norm() / b.norm() < 2e-2
    assert peaks[1] < 0.5 * peaks[0], peaks
