"""The model split into pipeline stages, parameters keeping their full names.

Every rank builds the whole single-device model (same seeds, same initial weights as one process),
then ``keep_stages`` drops what its stages do not run: decoder layers of other stages, the
embedding unless it runs stage 0, the final norm, output head and MTP unless it runs the last stage.
The kept layers stay at ``layers.{i}`` (``StageLayers``), so ``model.named_parameters()`` gives
the single-device names: checkpoints, exports and the optimizer state are addressed as at pp=1.

A ``StageModule`` runs one stage on the shared modules. What crosses a stage boundary:

    stage 0 in:   input_ids (B, S), next tokens of each MTP depth (B, S, Dm) (from the labels)
    between:      hidden states h (B, S, D), and the embedded next tokens (B, S, D) per MTP depth:
                  the MTP modules on the last stage use the embedding of stage 0, whose gradient
                  comes back through the same boundaries (exact; DeepSeek keeps both on one rank,
                  which dualpipev does too)
    last out:     the final-normed hidden states and each MTP depth's normed states; the loss
                  function (parallel/pipeline/step.py) applies the shared output head

Each stage's MoE balance loss (sequence-wise aux loss) does not travel: ``AuxGradient`` hands it
its gradient when the gradient of the stage's output arrives, so every stage's aux loss gets the
same gradient as in the single-device sum ``lm + aux + mtp``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.transformer import DeepseekV3, shift_left


class StageLayers(nn.ModuleDict):
    """The decoder layers one rank keeps, under their model-wide indices; iterates like the ModuleList
    it replaces (model/recompute.py, model/compile.py walk ``model.layers``)."""

    def __iter__(self):  # noqa: ANN204
        return iter(self.values())

    def __getitem__(self, i: int | str) -> nn.Module:
        return super().__getitem__(str(i))


def keep_stages(model: DeepseekV3, split: list[list[int]], stages: list[int]) -> None:
    """Drop the modules none of ``stages`` runs (in place); the kept ones keep their names."""
    last = len(split) - 1
    mine = sorted(i for s in stages for i in split[s])
    model.layers = StageLayers({str(i): model.layers[i] for i in mine})
    if 0 not in stages:
        model.embed_tokens = nn.Identity()
    if last not in stages:
        model.norm, model.lm_head, model.mtp = nn.Identity(), nn.Identity(), nn.ModuleList()


class AuxGradient(torch.autograd.Function):
    """Identity on ``h``; in backward, gives ``aux`` the gradient ``scale`` (1/micro-batches, as the loss's)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return h.clone()     # not a view: the schedule detaches its outputs in place after the backward

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad.device), None


class StageModule(nn.Module):
    """Stage ``index`` of ``n_stages``: its layers, plus the embedding on the first and the norm, output head
    and MTP on the last, as children (the schedule's weight-gradient step walks ``parameters()``); the same
    module objects as the engine's model. ``aux_values`` collects each micro-batch's detached aux loss."""

    def __init__(self, model: DeepseekV3, layers: list[int], index: int, n_stages: int):
        super().__init__()
        self.index, self.first, self.last = index, index == 0, index == n_stages - 1
        self.rotary = model.rotary
        self.embed_tokens = model.embed_tokens if self.first else None
        self.blocks = nn.ModuleList(model.layers[i] for i in layers)
        if self.last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
        self.depths, self.hidden = model.config.num_nextn_predict_layers, model.config.hidden_size
        self.aux_scale = 1.0
        self.aux_values: list[torch.Tensor] = []

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.first:
            input_ids, *rest = inputs                                              # (B, S), (B, S, Dm)
            h = self.embed_tokens(input_ids)                                       # (B, S, D)
            embs = [self.embed_tokens(rest[0][..., k]) for k in range(self.depths)]   # each (B, S, D)
        else:
            h, *embs = inputs
        rope = self.rotary(h.shape[1], h.device, h.dtype)
        aux = h.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            h, a = block(h, rope)
            aux = aux + a
        if not self.last:
            outs = [h, *(e.clone() for e in embs)]   # passed on; copies, not views (see AuxGradient)
        else:
            outs = [self.norm(h)]
            h_prev = h
            for module, emb in zip(self.mtp, embs):
                h_prev, a = module(h_prev, emb, rope)
                aux = aux + a
                outs.append(module.norm(h_prev))
        self.aux_values.append(aux.detach())
        if aux.requires_grad:      # only a stage with MoE layers has a balance loss to train
            outs[0] = AuxGradient.apply(outs[0], aux, self.aux_scale)
        return tuple(outs)


def next_tokens(labels: torch.Tensor, depths: int) -> torch.Tensor:
    """(B, S) labels -> (B, S, depths): the token MTP depth k embeds at each position (t_{i+k}), as
    model/transformer.py's forward computes it."""
    cols = [shift_left(labels, k - 1, fill=0).clamp_min(0) for k in range(1, depths + 1)]
    return torch.stack(cols, dim=-1) if cols else labels.new_zeros((*labels.shape, 0))


def _canonical(name: str) -> tuple[int, int, int]:
    """Sort key giving the single-device model's order: parameters (embedding, layers by index, norm, head,
    MTP depths), then the router-bias buffers in the same order."""
    parts = name.split(".")
    top = ["embed_tokens", "layers", "norm", "lm_head", "mtp"]
    section = top.index(parts[0]) if parts[0] in top else len(top)
    index = int(parts[1]) if parts[0] in ("layers", "mtp") and parts[1].isdigit() else 0
    return (int(name.endswith("e_score_correction_bias")), section, index)


def merge_stage_shapes(local: dict[str, list[int]], group: Any) -> dict[str, list[int]]:
    """Collective: every rank's full-name -> full-shape table merged, in the single-device order (the
    checkpoint's ``tensors``: under parallel.pp no rank holds every parameter)."""
    import torch.distributed as dist

    tables: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(tables, local, group=group)
    merged: dict[str, list[int]] = {}
    for table in tables:
        for name, shape in table.items():
            merged.setdefault(name, shape)
    return dict(sorted(merged.items(), key=lambda kv: _canonical(kv[0])))
