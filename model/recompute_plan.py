"""What a checkpointed block's backward holds beyond its recomputed saved set, and what the loss has freed by then.

Under activation checkpointing (model/recompute.py) a block's backward first recomputes its forward, so its
whole saved set (model/memory_plan.py, op by op) is alive again, then walks it back. Its peak is that set plus
what the recompute's last ops and the backward's first ones allocate before much of the set is released
(measured op by op: tests/test_memory_plan.py; tiny.yaml at 512, 1024, 2048 tokens above the set: dense 2.5,
5.0, 10.0 MiB, MoE 2.0, 2.1, 4.1 MiB; in the pipeline runs under EP 4.0-5.9 MiB at 512 tokens):
  dense FFN  the down projection's input gradient (I wide) beside the gradient arriving at the block's output
             and the one its residual branch starts for the block's input (D each)
  MoE        the recompute ends with the shared expert's and the routed combine's outputs (D each) beside the
             whole set (torch's checkpoint stops once every saved tensor is back), or the backward's first
             expert GEMM computes the routed down projection's weight gradient whole (F x D per local expert),
             whichever is larger; under EP the gradient all-to-all also holds the rows it sends (a contiguous
             copy of the combine's gradient, K per token) and receives (the rank's routed copies, Kx)
The other weight gradients come later in the block's backward, once most of the saved set is freed: a separate
moment (model/pipeline_plan.py's weight_grad), not added on top.

The loss: autograd runs the nodes created last first. On a pipeline's last stage every head's loss is computed
after the stage's forward (parallel/pipeline/step.py's loss_fn), so all of them run, and the output head's
weight gradient is summed and added, before any block is recomputed: the chunked loss's dW per head call is
freed (``loss_freed_bytes``). What else the head side keeps per token (final norms, the MTP glue, the loss's dh
turned into the gradient it scales) is still alive during the MTP block's recompute (those nodes were created
before the block's, so they run after it). At pp=1 the losses come in between: ``peak_checkpointed``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from model.config import ModelConfig

if TYPE_CHECKING:
    from model.memory_plan import ActivationPlan, Layout


def block_backward_bytes(c: ModelConfig, lay: Layout, moe: bool, tokens: int) -> float:
    """Bytes a block's recompute and backward allocate on top of its recomputed saved set, ``tokens`` tokens
    (module docstring). Under an uneven placement, the rank's experts and routed copies (``lay``)."""
    D, K, a = c.hidden_size, c.num_experts_per_tok, lay.w
    if not moe:
        return tokens * (c.intermediate_size + 2 * D) * a
    start = max(tokens * 2 * D, lay.experts_here(c.n_routed_experts) * c.moe_intermediate_size * D) * a
    return start + (tokens * (K + K * lay.rank_copies) * D * a if lay.ep > 1 else 0.0)


def blocks_backward(c: ModelConfig, lay: Layout, tokens: int) -> list[float]:
    """``block_backward_bytes`` of every decoder block, main stack then MTP (an MTP block is MoE when the model
    has experts), in model/memory_plan.py's order."""
    moes = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] + [c.n_routed_experts > 0] * \
        c.num_nextn_predict_layers
    return [block_backward_bytes(c, lay, moe, tokens) for moe in moes]


def loss_freed_bytes(c: ModelConfig, w: int) -> float:
    """Bytes the loss's backward frees before any block is recomputed: the chunked loss's dW (V, D) per head
    call (main and each MTP depth), scaled and added into the head's .grad."""
    return (1 + c.num_nextn_predict_layers) * c.vocab_size * c.hidden_size * w


def peak_checkpointed(c: ModelConfig, lay: Layout, ap: ActivationPlan) -> int:
    """The whole model's (pp=1) peak with every block checkpointed: what the forward keeps plus the larger of
    two moments. DeepseekV3.forward computes each head's loss right after its part (the main head before the
    MTP blocks, the MTP depths' token embeddings after it), and autograd runs the nodes created last first:
      recompute  the block whose recompute and backward hold the most; before the last MTP block, the last
                 head's loss has run: its saved dW is freed, but its scaled dW waits in autograd's input buffer
                 of the shared output head for the main head's use, so nothing is freed (without MTP the only
                 loss runs first and its dW is gone)
      main loss  after the MTP blocks: the main head's scaled dW is made while the MTP head's scaled dW and
                 the MTP embeddings' dense gradient (the embedding's other use is the first op) wait in their
                 weights' input buffers: two (V, D) more than the forward kept (one without MTP)
    (measured at pp=1, 128 and 512 tokens: benchmarks/results/pipeline.md)."""
    grads = blocks_backward(c, lay, ap.tokens)
    largest = max((ap.tokens * b + g + k for b, g, k in zip(ap.blocks_per_token, grads, ap.block_constants)),
                  default=0.0)
    head = c.vocab_size * c.hidden_size * lay.w
    mtp = c.num_nextn_predict_layers > 0
    return int(ap.saved_checkpointed + max(largest - (0 if mtp else head), head * (2 if mtp else 1)))
