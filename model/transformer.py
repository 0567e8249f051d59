"""The DeepSeek-V3 language model: embedding, decoder blocks (dense then MoE), final norm,
output head, and D multi-token-prediction (MTP) modules that share embedding and head.

Shapes: B batch, S sequence, D model dim, V vocab.
Module names mirror transformers' DeepseekV3ForCausalLM so the state-dict mapping in
``model/hf/convert.py`` is a rename, not a reshuffle (except the stacked experts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.attention import MLA
from model.config import ModelConfig
from model.documents import split_documents
from model.loss import IGNORE_INDEX, chunked_linear_cross_entropy, cross_entropy
from model.moe import MLP, MoE, RoutedExperts
from model.norm import RMSNorm
from model.rope import RotaryEmbedding
from model.router import Router


@dataclass
class ModelOutput:
    logits: torch.Tensor | None              # (B, S, V); None when the chunked loss never made them
    loss: torch.Tensor | None = None         # lm + aux + MTP, what the optimizer sees
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None     # sequence-wise balance loss, summed over MoE layers
    mtp_loss: torch.Tensor | None = None     # lambda / D * sum_k CE_k
    mtp_losses: list[torch.Tensor] | None = None  # per depth, unweighted


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, aux = self.mlp(h)
        else:
            y, aux = self.mlp(h), x.new_zeros(())
        return x + y, aux


class MTPModule(nn.Module):
    """One MTP depth k (DeepSeek-V3 sec. 2.2): h'_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)],
    then one transformer block, then its own final norm before the shared output head.

    The concatenation order (embedding first) and the names (enorm, hnorm, eh_proj,
    shared_head.norm) follow DeepSeek-V3's released MTP weights, so exports serve as drafts.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = DecoderLayer(cfg, moe=cfg.n_routed_experts > 0)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)

    def forward(self, h_prev: torch.Tensor, next_emb: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(h_prev)], dim=-1))  # (B, S, D)
        return self.block(h, rope, mask)


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        # lambda of the MTP loss; the trainer may change it during training (train.mtp_loss_weight_late)
        self.mtp_loss_weight = cfg.mtp_loss_weight
        # the data's EOS id when packed documents are kept apart (data.document_mask); None: off
        self.document_eos_id: int | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """N(0, initializer_range) for every matrix (as HF and DeepSeek's configs specify),
        ones for norms, zeros for the router's correction bias."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                m.e_score_correction_bias.zero_()
            elif isinstance(m, RoutedExperts):
                nn.init.normal_(m.w_gate_up, mean=0.0, std=std)
                nn.init.normal_(m.w_down, mean=0.0, std=std)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, S); labels (B, S) aligned with the inputs (labels[:, i] = token i+1),
        IGNORE_INDEX where no loss is wanted. MTP runs only when labels are given."""
        B, S = input_ids.shape
        h = self.embed_tokens(input_ids)                                     # (B, S, D)
        docs = None if self.document_eos_id is None else split_documents(input_ids, self.document_eos_id)
        rope = self.rotary(S, h.device, h.dtype, None if docs is None else docs.positions)
        mask = None if docs is None else docs.attention_mask()              # (B, 1, S, S)
        aux = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            h, a = layer(h, rope, mask)
            aux = aux + a
        if labels is None:
            return ModelOutput(logits=self.lm_head(self.norm(h)))            # (B, S, V)

        keep = (lambda t, k: t) if docs is None else docs.keep_targets
        lm_loss, logits = self.head_loss(self.norm(h), keep(labels, 0))
        mtp_losses = []
        h_prev = h
        for k, module in enumerate(self.mtp, start=1):
            # depth k at position i sees token t_{i+k} (= labels[:, i+k-1]) and predicts t_{i+k+1}
            next_tok = shift_left(labels, k - 1, fill=0).clamp_min(0)
            target = keep(shift_left(labels, k, fill=IGNORE_INDEX), k)
            h_prev, a = module(h_prev, self.embed_tokens(next_tok), rope, mask)
            aux = aux + a
            mtp_losses.append(self.head_loss(module.norm(h_prev), target)[0])
        mtp_loss = (self.mtp_loss_weight / len(mtp_losses) * torch.stack(mtp_losses).sum()
                    if mtp_losses else lm_loss.new_zeros(()))
        return ModelOutput(logits=logits, loss=lm_loss + aux + mtp_loss, lm_loss=lm_loss,
                           aux_loss=aux, mtp_loss=mtp_loss, mtp_losses=mtp_losses)

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-entropy of the output head on normed hidden states h (B, S, D) -> (loss, logits).

        ``loss_impl: chunked`` fuses the head's GEMM with the loss and never materializes the
        (B, S, V) logits (logits comes back None); ``full`` is the reference. An FP8-swapped
        head is not a plain Linear, so it always takes the reference path."""
        if self.config.loss_impl == "chunked" and type(self.lm_head) is nn.Linear:
            return chunked_linear_cross_entropy(h, self.lm_head.weight, labels, self.config.loss_chunk), None
        logits = self.lm_head(h)
        return cross_entropy(logits, labels), logits


def shift_left(t: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """(B, S) -> (B, S): t[:, i + k], padded with ``fill`` past the end."""
    if k == 0:
        return t
    return torch.cat([t[:, k:], t.new_full((t.shape[0], k), fill)], dim=1)
