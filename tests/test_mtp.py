"""Multi-token prediction: the padded full-length implementation against DeepSeek's
truncated-sequence formulation, computed independently from the model's parts."""
import pytest
import torch
import torch.nn.functional as F

from model.transformer import DeepseekV3
from tests.helpers import tiny_cfg


def test_mtp_losses_match_truncated_formulation():
    D_mtp = 2
    cfg = tiny_cfg(num_nextn_predict_layers=D_mtp, mtp_loss_weight=0.3, aux_loss_alpha=0.0)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    B, S = 2, 12
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1))
    out = model(tokens[:, :S], tokens[:, 1:])

    with torch.no_grad():
        # main trunk, hidden states before the final norm
        h = model.embed_tokens(tokens[:, :S])
        rope = model.rotary(S, h.device, h.dtype)
        for layer in model.layers:
            h, _ = layer(h, rope)
        lm = F.cross_entropy(model.lm_head(model.norm(h)).flatten(0, 1), tokens[:, 1:].flatten())
        # depth k at position i: [Emb(t_{i+k}); h^{k-1}_i] -> predicts t_{i+k+1}; sequences shrink by k
        losses, h_prev = [], h
        for k in range(1, D_mtp + 1):
            L = S - k
            mod = model.mtp[k - 1]
            rope_k = model.rotary(L, h.device, h.dtype)
            h_prev, _ = mod(h_prev[:, :L], model.embed_tokens(tokens[:, k:k + L]), rope_k)
            logits = model.lm_head(mod.norm(h_prev))
            losses.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, k + 1:k + 1 + L].flatten()))
    torch.testing.assert_close(out.lm_loss, lm)
    for got, want in zip(out.mtp_losses, losses):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mtp_loss, 0.3 / D_mtp * sum(losses))
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss + out.mtp_loss)


def test_mtp_gradients_reach_trunk_and_shared_head():
    cfg = tiny_cfg(num_nextn_predict_layers=1, aux_loss_alpha=0.0)
    model = DeepseekV3(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.mtp_loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.layers[0].self_attn.o_proj.weight.grad.abs().sum() > 0  # through h^0


def test_eval_without_labels_skips_mtp_and_aux():
    cfg = tiny_cfg(num_nextn_predict_layers=1)
    model = DeepseekV3(cfg).eval()
    out = model(torch.randint(0, cfg.vocab_size, (1, 5)))
    assert out.logits.shape == (1, 5, cfg.vocab_size) and out.loss is None


def test_mtp_weight_schedule_and_the_model_attribute():
    from configs import load_config
    from model.schedules import mtp_weight_at

    t = load_config(None, ["train.max_steps=10", "train.mtp_loss_weight_late=0.1", "train.mtp_late_fraction=0.5"]).train
    assert [mtp_weight_at(s, t, 0.3) for s in range(10)] == [0.3] * 5 + [0.1] * 5
    t = load_config(None, ["train.max_steps=10"]).train                  # no late weight: constant
    assert {mtp_weight_at(s, t, 0.3) for s in range(10)} == {0.3}

    cfg = tiny_cfg(num_nextn_predict_layers=1, mtp_loss_weight=0.3)
    torch.manual_seed(0)
    model = DeepseekV3(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    early = model(tokens[:, :-1], tokens[:, 1:])
    model.mtp_loss_weight = 0.1                                           # what train.py sets per step
    late = model(tokens[:, :-1], tokens[:, 1:])
    torch.testing.assert_close(early.mtp_loss, 0.3 * early.mtp_losses[0])
    torch.testing.assert_close(late.mtp_loss, 0.1 * late.mtp_losses[0])
    torch.testing.assert_close(late.mtp_losses[0], early.mtp_losses[0])


@pytest.mark.parametrize("override,message", [
    ("train.mtp_loss_weight_late=-0.1", "train.mtp_loss_weight_late=-0.1"),
    ("train.mtp_late_fraction=1.5", "train.mtp_late_fraction=1.5"),
])
def test_bad_mtp_schedule_is_named(override, message):
    from configs import load_config

    with pytest.raises(ValueError, match=message):
        load_config(None, [override])
