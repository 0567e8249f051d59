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

Under FP8 (model/fp8_linear.py, the emulated kernels: the CPU's, and the oracle of the others) the block peaks
inside its first FP8 GEMM's weight gradient instead, which re-makes both operands in fp32 (``fp8_backward_bytes``;
measured op by op in fp32, tiny.yaml at 512 and 2048 tokens: dense 5.2 and 20.6 MiB above the set, MoE 8.8 and
34.9; the rule above gave 2.5/10.0 and 2.0/4.0; bf16 is not measured). The GPU kernels read FP8 operands
directly (and Triton's quantizers fuse the re-tiling), so there this figure is an upper bound. The blocks' FP8
weight copies are cached in their modules from one optimizer step to the next (``cached_fp8``): the recompute
quantizes nothing again.

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


def block_backward_bytes(c: ModelConfig, lay: Layout, moe: bool, tokens: int, fp8: bool = False) -> float:
    """Bytes a block's recompute and backward allocate on top of its recomputed saved set, ``tokens`` tokens
    (module docstring). Under an uneven placement, the rank's experts and routed copies (``lay``)."""
    if fp8:
        return fp8_backward_bytes(c, lay, moe, tokens)
    D, K, a = c.hidden_size, c.num_experts_per_tok, lay.w
    if not moe:
        return tokens * (c.intermediate_size + 2 * D) * a
    start = max(tokens * 2 * D, lay.experts_here(c.n_routed_experts) * c.moe_intermediate_size * D) * a
    return start + (tokens * (K + K * lay.rank_copies) * D * a if lay.ep > 1 else 0.0)


def fp8_backward_bytes(c: ModelConfig, lay: Layout, moe: bool, tokens: int) -> float:
    """``block_backward_bytes`` of an FP8 block (emulated kernels). Its backward starts with the GEMM its forward
    ended with, whose weight gradient (model/fp8_linear.py) holds, beside the input gradient it made first, the
    FP8 copies of its output gradient and of its input re-tiled 128x1, and peaks making the fp32 operands of the
    emulated GEMM: the output gradient dequantized, the input's fp32 copy and its scaled product (measured op by
    op: tests/test_memory_plan.py).
      dense FFN  the down projection: input gradient (I, a), dy quantized twice (2D) and x re-tiled (I), then
                 dy dequantized (4D) and x's two fp32 tensors (8I), or at few tokens the recompute's down
                 projection forward; the recompute ends a block input (D, a) short of the set (as without FP8)
      MoE        the routed down projection over the copies of one expert call (all at ep=1, a token chunk's
                 under EP): per copy the input gradient (F, a), the cached input dequantized, re-tiled and
                 dequantized again (4F + F + 4F), and dy re-tiled per expert segment (D) and re-made in fp32 as
                 a float copy, a per-row scale and their product (12D). At ep=1 the shared expert's backward has
                 run (its set freed) and the combine's kept output has become the rows' gradient (same size);
                 under EP the shared expert runs after the routed chunks. At few tokens the gate/up projection's
                 dgrad rules (its weights dequantized)."""
    from model.memory_plan import _Saved, _swiglu

    D, F, K, a = c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok, lay.w
    if not moe:
        I = c.intermediate_size  # noqa: E741
        wgrad = tokens * (I * a + 2 * D + I + 4 * D + 8 * I - D * a)
        # at few tokens the recompute's own down projection rules: its input (I, a; the set keeps only its FP8
        # copy), that copy (I) dequantized (4I), beside the (D, I) weight dequantized twice
        forward = tokens * (I * a + 5 * I - D * a) + 8 * _tiles(D) * _tiles(I)
        return max(wgrad, forward)
    rows = tokens * K * lay.rank_copies / lay.expert_calls                 # the copies of one expert call
    down = rows * (F * a + 9 * F + 13 * D)
    # the gate/up projection's dgrad: the local experts' (E_l, D, 2F) weights dequantized to fp32 (a float copy
    # and its padded copy, then the padded one and the scaled product), rules at few tokens
    gate_up = 8 * lay.experts_here(c.n_routed_experts) * _tiles(D) * _tiles(2 * F)
    if lay.ep > 1:
        # every chunk's combine has run its backward (created after all expert calls): their kept outputs (y and
        # its weighted copy, K each) are freed, the contiguous copy of the gradient they send (K) is in flight; the
        # received rows replace the experts' kept output (Kx, as at ep=1)
        return max(down, gate_up) - tokens * K * D * a
    shared = _Saved(a, fp8=True)                                            # its FP8 input copies included
    if c.n_shared_experts:
        _swiglu(shared, "shared", "x", F * c.n_shared_experts, D)
    # by then each copy's down projection input (F), gate/up output, silu, product (4F, a), its gate weight
    # and the combine's kept output (a, D a) are freed; its gate/up gradient and its FP8 copy (2F a + 2F) alive
    gate_up += rows * (2 * F * a + 2 * F - (4 * F * a + a + F + D * a))
    return max(down, gate_up) - tokens * shared.total()


def _tiles(n: int) -> int:
    """n padded to whole 128-wide FP8 tiles."""
    return -(-n // 128) * 128


def blocks_backward(c: ModelConfig, lay: Layout, tokens: int, fp8: bool = False) -> list[float]:
    """``block_backward_bytes`` of every decoder block, main stack then MTP (an MTP block is MoE when the model
    has experts), in model/memory_plan.py's order."""
    moes = [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] + [c.n_routed_experts > 0] * \
        c.num_nextn_predict_layers
    return [block_backward_bytes(c, lay, moe, tokens, fp8) for moe in moes]


def loss_freed_bytes(c: ModelConfig, w: int) -> float:
    """Bytes the loss's backward frees before any block is recomputed: the chunked loss's dW (V, D) per head
    call (main and each MTP depth), scaled and added into the head's .grad."""
    return (1 + c.num_nextn_predict_layers) * c.vocab_size * c.hidden_size * w


def peak_checkpointed(c: ModelConfig, lay: Layout, ap: ActivationPlan, fp8: bool = False) -> int:
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
    grads = blocks_backward(c, lay, ap.tokens, fp8)
    largest = max((ap.tokens * b + g + k for b, g, k in zip(ap.blocks_per_token, grads, ap.block_constants)),
                  default=0.0)
    head = c.vocab_size * c.hidden_size * lay.w
    mtp = c.num_nextn_predict_layers > 0
    return int(ap.saved_checkpointed + max(largest - (0 if mtp else head), head * (2 if mtp else 1)))
