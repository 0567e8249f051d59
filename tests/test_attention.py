"""Attention backends, RoPE layout and YaRN frequencies against independent references."""
import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model.attention import MLA, eager_attention
from model.rope import RotaryEmbedding, apply_rope, yarn_inv_freq
from tests.helpers import YARN, tiny_cfg


@pytest.mark.parametrize("q_lora", [None, 24])
def test_sdpa_equals_eager_reference(q_lora):
    cfg = tiny_cfg(q_lora_rank=q_lora, rope_scaling=YARN)
    torch.manual_seed(0)
    attn = MLA(cfg)
    x = torch.randn(2, 17, cfg.hidden_size)
    rope = RotaryEmbedding(cfg)(17, x.device, x.dtype)
    y_sdpa = attn(x, rope)
    attn.backend = "eager"
    y_eager = attn(x, rope)
    torch.testing.assert_close(y_sdpa, y_eager, rtol=1e-5, atol=1e-6)


def test_attention_is_causal():
    cfg = tiny_cfg()
    attn = MLA(cfg)
    x = torch.randn(1, 10, cfg.hidden_size)
    rope = RotaryEmbedding(cfg)(10, x.device, x.dtype)
    y1 = attn(x, rope)
    x2 = x.clone()
    x2[:, 6:] += 1.0
    y2 = attn(x2, rope)
    torch.testing.assert_close(y1[:, :6], y2[:, :6])
    assert not torch.allclose(y1[:, 6:], y2[:, 6:])


def test_eager_reference_matches_explicit_softmax():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 3)
    out = eager_attention(q, k, v, 0.3)
    for i in range(5):
        w = torch.softmax((q[:, :, i:i + 1] @ k[:, :, :i + 1].transpose(-1, -2)) * 0.3, -1)
        torch.testing.assert_close(out[:, :, i:i + 1], w @ v[:, :, :i + 1])


def test_interleaved_rope_equals_complex_rotation():
    """DeepSeek's reference rotates pairs (x0,x1),(x2,x3).. as complex numbers; our output is the
    same numbers laid out [evens | odds]."""
    cfg = tiny_cfg(qk_rope_head_dim=8)
    cos, sin = RotaryEmbedding(cfg)(6, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 2, 6, 8)
    got = apply_rope(x, cos, sin, interleave=True)
    z = torch.view_as_complex(x.view(1, 2, 6, 4, 2))
    rot = torch.view_as_real(z * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos)))  # (1,2,6,4,2)
    want = torch.cat([rot[..., 0], rot[..., 1]], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_yarn_frequencies_match_transformers():
    rs = dict(YARN, factor=40.0, original_max_position_embeddings=4096)
    hf_cfg = DeepseekV3Config(qk_rope_head_dim=64, max_position_embeddings=163840,
                              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                               **{k: v for k, v in rs.items() if k != "type"}})
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    got, got_factor = yarn_inv_freq(64, 10000.0, rs)
    torch.testing.assert_close(got, want)
    assert got_factor == pytest.approx(want_factor)
    # DeepSeek-V3's mscale_all_dim correction enlarges the softmax scale by (0.1 ln 40 + 1)^2
    from model.config import ModelConfig
    c = ModelConfig(rope_scaling=rs)
    assert c.softmax_scale() == pytest.approx(192 ** -0.5 * (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn runs on CUDA only")
def test_flash_attention_matches_sdpa_on_cuda():
    from model import attention as A
    if A.flash_attn_func is None:
        pytest.skip("flash-attn is not installed")
    cfg = tiny_cfg(v_head_dim=12, qk_nope_head_dim=24, qk_rope_head_dim=8)   # dv < dq: V gets padded
    attn = MLA(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(2, 64, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    rope = RotaryEmbedding(cfg).cuda()(64, x.device, x.dtype)
    attn.backend = "flash"
    y_flash = attn(x, rope)
    attn.backend = "sdpa"
    y_sdpa = attn(x, rope)
    torch.testing.assert_close(y_flash, y_sdpa, rtol=2e-2, atol=2e-2)


def test_flash_requested_where_it_cannot_run_names_the_field():
    cfg = tiny_cfg(attn_impl="flash")
    attn = MLA(cfg)
    x = torch.randn(1, 8, cfg.hidden_size)
    with pytest.raises(ValueError, match=r"model.attn_impl='flash'"):
        attn(x, RotaryEmbedding(cfg)(8, x.device, x.dtype))


def test_flash_wrapper_layout_and_v_padding(monkeypatch):
    """The wrapper's own work (B,H,S,d) <-> (B,S,H,d) and V padded to the q/k head dim, checked on
    CPU against SDPA with a stand-in kernel that, like flash-attn, refuses unequal head dims."""
    from model import attention as A

    def fake_flash(q, k, v, dropout_p, softmax_scale, causal):                 # (B, S, H, d) in and out
        assert q.shape == k.shape == v.shape and causal and dropout_p == 0.0
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=softmax_scale)
        return out.transpose(1, 2)

    monkeypatch.setattr(A, "flash_attn_func", fake_flash)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 16, 24, generator=g), torch.randn(2, 3, 16, 24, generator=g)
    v = torch.randn(2, 3, 16, 12, generator=g)                                 # dv < dq
    torch.testing.assert_close(A.flash_attention(q, k, v, 0.2), A.eager_attention(q, k, v, 0.2))
