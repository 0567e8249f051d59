"""Documents inside a packed row: attention, positions and targets kept within one document.

Packing (data/shards.py) concatenates documents, each followed by one EOS token, and cuts the
stream into rows. By default a token attends to everything before it in its row, across
document boundaries, and positions count from the row's start. With ``data.document_mask``
(Megatron's reset_attention_mask/reset_position_ids, torchtitan's document masking) each
token sees only its own document, positions restart at each document, and a target that lies
in the next document is not trained on (neither the next-token target nor an MTP depth's).

Shapes: B batch, S sequence. The EOS that ends a document belongs to that document: the
document index of input token i is the number of EOS tokens strictly before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.loss import IGNORE_INDEX


@dataclass
class Documents:
    index: torch.Tensor       # (B, S) document number of each input token within its row
    ends: torch.Tensor        # (B, S) number of EOS up to and including each input token
    positions: torch.Tensor   # (B, S) position of each input token inside its document

    def attention_mask(self) -> torch.Tensor:
        """(B, 1, S, S) bool, True where query i may attend key j: j <= i in the same document."""
        S = self.index.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=self.index.device).tril()
        same = self.index.unsqueeze(2) == self.index.unsqueeze(1)            # (B, S, S)
        return (same & causal).unsqueeze(1)

    def keep_targets(self, targets: torch.Tensor, k: int) -> torch.Tensor:
        """Depth k's targets (B, S), ``targets[:, i] = labels[:, i+k] = t_{i+k+1}`` (k = 0: the
        next token), with IGNORE_INDEX where that token is in a later document than position i.

        Token t_{i+k+1} belongs to document ``ends[:, i+k]`` (the EOS count through input i+k);
        it stays in position i's document only when no EOS lies in inputs i..i+k."""
        S = targets.shape[1]
        if k >= S:
            return torch.full_like(targets, IGNORE_INDEX)
        target_doc = torch.cat([self.ends[:, k:], self.ends[:, -1:].expand(-1, k)], dim=1)   # (B, S)
        return targets.masked_fill(target_doc != self.index, IGNORE_INDEX)


def split_documents(input_ids: torch.Tensor, eos_id: int) -> Documents:
    """Document numbers and in-document positions of a packed batch (B, S). No host sync."""
    is_eos = (input_ids == eos_id).long()                                    # (B, S)
    ends = is_eos.cumsum(dim=1)                                              # (B, S)
    index = ends - is_eos
    S = input_ids.shape[1]
    pos = torch.arange(S, device=input_ids.device).expand_as(input_ids)      # (B, S)
    # a document starts at 0 or right after an EOS; each position counts from the latest start
    starts = torch.where(torch.cat([is_eos.new_ones(is_eos.shape[0], 1), is_eos[:, :-1]], dim=1) > 0, pos, 0)
    start_of_doc = starts.cummax(dim=1).values                               # (B, S)
    return Documents(index=index, ends=ends, positions=pos - start_of_doc)
