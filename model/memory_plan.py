"""Per-rank memory plan of a training layout, from the config alone (no weights allocated).

    layout: world W ranks, expert parallelism ep (world = ep x edp), ZeRO stage Z, dtype, offload,
            micro batch mbs x seq tokens per rank (T = mbs * seq)

Parameters (model/flops.py counts, MTP included): P_e = routed-expert weights of every MoE layer,
P_d = everything else (embedding, head, attention, dense FFNs, shared experts, routers, norms).
A rank holds P = P_d + P_e n / E parameters: dense ones replicated, its n of the E routed experts
of each MoE layer (n = E / ep under the even placement). Its optimizer owns S of them:
  ZeRO-0: S = P (every rank keeps all state of what it holds);
  ZeRO-1/2: S = P_d / W + (P_e n / E) / edp (= (P_d + P_e) / W when even): dense state partitioned
  over all W ranks, expert state over the expert-data-parallel group of the rank's experts (W / ep).
Uneven placements (parallel.expert_placement=capacity | load, parallel/expert/placement.py): the plan is
for the largest rank, an upper bound for every rank: n = the most experts any EP rank holds in any
layer, and the routed copies it computes (below) the most any EP rank computes.
ZeRO-1 partitions the optimizer state only; ZeRO-2 also the gradients. DeepSpeed's alignment
padding (a few elements per group) is ignored. w = bytes per weight: 2 (bf16), 4 (fp32).

State per rank (bytes):
  weights  w * P                         bf16 keeps bf16 weights; fp32 keeps fp32 weights
  master   4 * S                         fp32 masters. ZeRO-1/2 clone their partition even in fp32;
                                         at ZeRO-0 in fp32 the weight is the master (0 bytes), in bf16
                                         DeepSpeed's FP16/BF16 optimizer keeps an fp32 copy (4 * P)
  moments  8 * S                         AdamW exp_avg + exp_avg_sq in fp32
  grads    end of backward, ZeRO-0 and ZeRO-1: w * P (ZeRO-1 reduces at the accumulation boundary);
           ZeRO-2: w * S (gradients are reduced into the owned partition as they come).
           In the step, ZeRO-1/2 walk the optimizer groups in order, each with a flattened fp32
           gradient of its own (a copy, in fp32 too): S_1 = the first group (dense matrices; every
           matrix at ep=1) while the whole partition's gradients (w S) are still alive; S_x = the
           expert group (ep > 1, last; its own gradients are freed once copied): max(w S + 4 S_1, 4 S_x).
           ZeRO-0 in bf16: the FP16 optimizer's fp32 flat gradient, w P + 4 P.
           peak = max(end of backward, step); measured group by group (benchmarks/measure_memory.py)
  offload (offload_optimizer.device=cpu, ZeRO-1/2): master and moments live on the host, with the
           partition's fp32 gradient (4 * S), a w-byte copy of the partition (w * S) and one
           largest-parameter gradient buffer (w * L); the device keeps the weights, gradients until
           they are reduced (ZeRO-1: w * P; ZeRO-2: none of its own) and one more w * L buffer.
  DeepSpeed buffers: ZeRO-1/2 with contiguous_gradients (DeepSpeed's default, forced by offload)
           allocate one reduce bucket of reduce_bucket_size elements (default 5e8) in the gradient
           dtype every backward, two with overlap_comm; the all-gather after the step works in place
           (allgather_bucket_size allocates nothing with all_gather_into_tensor). ZeRO-0 all-reduces
           in flattened buckets of at most allreduce_bucket_size (5e8) elements (under EP the dense and
           the expert gradients in separate ones), transiently.
  Buffers (router bias and token counts, RoPE frequencies) are a few KB and not counted.

Activations: what autograd saves for backward, derived op by op from model/attention.py,
model/moe.py, model/norm.py, model/router.py, model/transformer.py and model/loss.py (see the
helpers below; tests/test_memory_plan.py checks them against torch's saved tensors). a = bytes per
activation (w, but norms, the router and softmax statistics keep fp32 where the code does). Per
token and layer (T tokens on the rank, K experts per token), roughly
  attention: norm input and output, the q/kv low-rank activations, q, k, v and the output of
           attention (v and the output padded from dv to dq heads, as flash-attn and torch's CPU SDPA
           run it; torch SDPA on CUDA saves 2 H (dq - dv) elements fewer), the softmax log-sum-exp
  dense FFN: 4 x intermediate (gate, silu(gate), up, their product)
  MoE: router scores (fp32, E) and top-k ids; 2-3 int64 permutations per routed copy; per copy the
           expert input (D), the gate/up output (2F), silu and its product (2F) and, on one device,
           the gating-weighted product (F) and the expert output (D: index_add keeps its source);
           under EP the expert output (D, kept by index_copy) and the gating weight multiplies the
           combined output instead (2D per copy).
           EP assumes balanced routing over experts: a rank holding n of E experts computes
           T * K * ep * n / E copies (T * K when even); under the load placement, the measured
           loads give each rank's share of the copies instead.
  constants: the chunked loss keeps dh (T, D) and dW (V, D) per head call (main + each MTP depth);
           in bf16 the router's fp32 weight copy (E x D per MoE layer); RoPE cos/sin (S x dr).
  activation checkpointing (model/recompute.py, every block): only each block's input (D) stays,
           plus everything outside the blocks; backward recomputes one block at a time, so the peak
           adds a block's own saved set and what its backward starts with, or (few tokens) the main
           loss's gradients waiting for their weights' other use (model/recompute_plan.py).
  FP8 (model/fp8_linear.py, cache_fp8): each FP8 linear or expert GEMM keeps its input as E4M3
           (1 byte) + one fp32 scale per 1x128 tile instead of the a-byte input, and its weight as
           E4M3 + one fp32 scale per 128x128 block (all local FP8 weights: ~1 byte per parameter).
           Embedding, lm_head, router and the MTP eh_proj stay high precision (model/fp8_swap.py).

Checkpoint on disk (the sharded format): one fp32 master and two fp32 moments per trainable
parameter, once each (12 bytes per parameter), plus the router biases (4 bytes x E per MoE layer).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from model.config import ModelConfig
from model.flops import count_params

GiB = 1024 ** 3
FP8_ROW = 1.0            # E4M3 bytes per element
DEFAULT_BUCKET = int(5e8)  # DeepSpeed's reduce_bucket_size / allreduce_bucket_size default (elements)
PLAN_FIELDS = ("world", "ep", "zero", "dtype", "offload", "mbs", "seq", "pp", "schedule", "accum")


@dataclass(frozen=True)
class Layout:
    world: int
    ep: int
    zero: int
    dtype: str                  # fp32 | bf16
    offload: bool               # optimizer state on the host (ZeRO-Offload)
    mbs: int
    seq: int
    reduce_bucket: int = DEFAULT_BUCKET     # deepspeed.zero_optimization.reduce_bucket_size
    overlap_comm: bool = False              # deepspeed.zero_optimization.overlap_comm (two buckets)
    expert_calls: int = 1                   # expert GEMM calls per MoE layer (EP token chunks, parallel.chunks)
    # uneven expert placement (the largest rank): experts per MoE layer it holds (0: E / ep, even) and
    # the routed token copies its experts compute, as a multiple of the balanced T * K
    rank_experts: int = 0
    rank_copies: float = 1.0
    # pipeline (model/pipeline_plan.py): pp ranks per pipeline, the schedule, micro-batches per step, the
    # layers of each stage and the stages of each pipeline rank (parallel/layout.py fills them)
    pp: int = 1
    pp_schedule: str = "1f1b"
    micro_batches: int = 1
    pp_split: tuple = ()
    pp_rank_stages: tuple = ()
    pp_overlap: bool = True                 # parallel.pp_overlap: DualPipeV's pairs split their backward

    def experts_here(self, n_routed: int) -> int:
        return self.rank_experts or n_routed // self.ep

    @property
    def edp(self) -> int:
        return self.world // self.ep

    @property
    def w(self) -> int:
        return 2 if self.dtype == "bf16" else 4


# ----------------------------------------------------------------------------- parameters

def moe_layer_count(c: ModelConfig) -> int:
    """MoE layers in the main stack and the MTP blocks (an MTP block is MoE when the model has experts)."""
    main = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    return main + (c.num_nextn_predict_layers if c.n_routed_experts > 0 else 0)


@dataclass(frozen=True)
class Params:
    dense: int                 # P_d: replicated on every rank
    experts: int               # P_e: routed experts of all MoE layers, sharded over ep
    largest_local: int         # numel of the largest single parameter a rank holds (offload buffers)
    router_bias: int           # fp32 elements of the router correction biases (checkpointed)

    @property
    def total(self) -> int:
        return self.dense + self.experts


def params(c: ModelConfig, ep: int = 1, rank_experts: int = 0) -> Params:
    """``rank_experts``: routed experts per MoE layer on the rank (0: E / ep), for its largest tensor."""
    p = count_params(c)
    n_moe = moe_layer_count(c)
    experts = n_moe * c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size
    D, H = c.hidden_size, c.num_attention_heads
    shapes = [c.vocab_size * D, D * c.intermediate_size, c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim),
              H * c.v_head_dim * D, (c.q_lora_rank or D) * H * c.qk_head_dim, 2 * D * D]
    if n_moe:
        shapes.append((rank_experts or c.n_routed_experts // ep) * D * 2 * c.moe_intermediate_size)
    return Params(dense=p.total + p.mtp_total - experts, experts=experts, largest_local=max(shapes),
                  router_bias=n_moe * c.n_routed_experts)


# ----------------------------------------------------------------------------- state

@dataclass
class StatePlan:
    """Bytes per rank; *_host are in CPU memory (ZeRO-Offload), the rest on the device."""
    weights: int
    grads: int
    master: int
    moments: int
    buffers: int
    grads_host: int = 0
    master_host: int = 0
    moments_host: int = 0
    buffers_host: int = 0

    @property
    def device(self) -> int:
        return self.weights + self.grads + self.master + self.moments + self.buffers

    @property
    def host(self) -> int:
        return self.grads_host + self.master_host + self.moments_host + self.buffers_host


def state_plan(c: ModelConfig, lay: Layout, pr: Params | None = None) -> StatePlan:
    """``pr``: the parameters the rank's module holds (a pipeline stage's; None: the whole model's)."""
    pr = pr or params(c, lay.ep, lay.rank_experts)
    local = pr.experts * lay.experts_here(c.n_routed_experts) // max(1, c.n_routed_experts)   # P_e n / E
    w, P = lay.w, pr.dense + local
    S = P if lay.zero == 0 else pr.dense / lay.world + local / lay.edp
    bf16 = lay.dtype == "bf16"
    if lay.zero == 0:
        master = 4 * P if bf16 else 0
        grads = w * P + (4 * P if bf16 else 0)          # bf16: the FP16 optimizer's fp32 flat gradient
        buffers = w * min(max(pr.dense, local) if lay.ep > 1 else P, DEFAULT_BUCKET)
        return StatePlan(weights=w * P, grads=int(grads), master=int(master), moments=8 * P, buffers=int(buffers))
    bucket = lay.reduce_bucket * w * (2 if lay.overlap_comm else 1)
    if lay.offload:
        return StatePlan(weights=w * P, grads=int(w * P if lay.zero == 1 else 0), master=0, moments=0,
                         buffers=int(bucket + w * pr.largest_local),
                         grads_host=int(4 * S), master_host=int(4 * S), moments_host=int(8 * S),
                         buffers_host=int(w * S + w * pr.largest_local))
    # the step goes group by group: the first group holds the dense matrices (every matrix at ep=1),
    # the expert group (ep > 1) comes last and frees its low-precision gradients before its fp32 copy
    first = (pr.dense + (pr.experts if lay.ep == 1 else 0)) / lay.world
    experts = local / lay.edp if lay.ep > 1 else 0
    at_step = max(w * S + 4 * first, 4 * experts)
    backward = w * P if lay.zero == 1 else w * S
    return StatePlan(weights=w * P, grads=int(max(backward, at_step)), master=int(4 * S), moments=int(8 * S),
                     buffers=int(bucket))


def checkpoint_bytes(c: ModelConfig) -> int:
    """The sharded checkpoint's tensor bytes: 12 per trainable parameter + the fp32 router biases."""
    pr = params(c)
    return 12 * pr.total + 4 * pr.router_bias


# ----------------------------------------------------------------------------- activations

class _Saved:
    """The tensors one token leaves for backward, by name: a tensor several ops save counts once.
    ``linear`` is a GEMM input: the tensor itself, or under FP8 the consumer's own E4M3 copy."""

    def __init__(self, a: int, fp8: bool):
        self.a, self.fp8, self.kept = a, fp8, {}

    def keep(self, name: str, n: float, nbytes: float | None = None) -> None:
        self.kept[name] = n * (self.a if nbytes is None else nbytes)

    def linear(self, consumer: str, name: str, n: int, fp8_able: bool = True) -> None:
        if self.fp8 and fp8_able:
            self.kept[f"{consumer}:fp8"] = n * FP8_ROW + 4 * math.ceil(n / 128)
        else:
            self.keep(name, n)

    def total(self) -> float:
        return sum(self.kept.values())


def _norm(s: _Saved, name: str, x: str, n: int, x_width: int | None = None) -> str:
    """RMSNorm of tensor ``x`` (n wide, stored ``x_width`` wide) -> the name of its output. fp32
    (the hand-written backward): x and 1/rms. bf16 (the reference path): x.float(), 1/rms and
    the normalised bf16 tensor."""
    if s.a == 4:
        s.keep(x, x_width or n)
    else:
        s.keep(f"{name}.x32", n, 4)
        s.keep(f"{name}.xhat", n)
    s.keep(f"{name}.r", 1, 4)
    return f"{name}.out"


def _attention(s: _Saved, c: ModelConfig, p: str, x: str) -> None:
    H, dq, dv, r_kv, dr = c.num_attention_heads, c.qk_head_dim, c.v_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
    h = _norm(s, f"{p}.ln1", x, c.hidden_size)
    if c.q_lora_rank is None:
        s.linear(f"{p}.q_proj", h, c.hidden_size)
    else:
        s.linear(f"{p}.q_a", h, c.hidden_size)
        qa = _norm(s, f"{p}.q_ln", f"{p}.q_a.out", c.q_lora_rank)
        s.linear(f"{p}.q_b", qa, c.q_lora_rank)
    s.linear(f"{p}.kv_a", h, c.hidden_size)
    kva = _norm(s, f"{p}.kv_ln", f"{p}.kv_a.out", r_kv, x_width=r_kv + dr)   # c_kv is a view of kv_a
    s.linear(f"{p}.kv_b", kva, r_kv)
    for t in ("q", "k", "v_padded", "out_padded"):                           # (B, H, S, dq) each
        s.keep(f"{p}.attn.{t}", H * dq)
    s.keep(f"{p}.attn.lse", H, 4)
    s.linear(f"{p}.o_proj", f"{p}.attn.o_in", H * dv)


def _swiglu(s: _Saved, p: str, x: str, hidden: int, width: int) -> None:
    """MLP (dense FFN or shared experts) on the ``width``-wide x: x, gate, silu(gate), up, their product."""
    s.linear(f"{p}.gate_proj", x, width)
    s.linear(f"{p}.up_proj", x, width)
    for t in ("gate", "silu", "up"):
        s.keep(f"{p}.{t}", hidden)
    s.linear(f"{p}.down_proj", f"{p}.prod", hidden)


def _moe(s: _Saved, c: ModelConfig, p: str, x: str, ep: int, copies: float = 1.0) -> None:
    """``copies``: routed copies the rank's experts compute per local token, as a multiple of K."""
    D, F, E, K = c.hidden_size, c.moe_intermediate_size, c.n_routed_experts, c.num_experts_per_tok
    # router (fp32 whatever the dtype): its input (a fp32 copy in bf16), scores, top-k ids and weights
    s.keep(x if s.a == 4 else f"{p}.router.x32", D, 4)
    s.keep(f"{p}.router.scores", E, 4)
    s.keep(f"{p}.router.idx", K, 8)
    s.keep(f"{p}.router.weights", K + 1, 4)                                  # gathered + their sum
    if c.aux_loss_alpha > 0:
        s.keep(f"{p}.balance.sum", 1, 4)
    if c.n_shared_experts:
        _swiglu(s, f"{p}.shared", x, F * c.n_shared_experts, D)
    # routed copies (K per token; Kx on the rank's experts): expert input, gate/up output, silu, product
    Kx = K * copies
    s.linear(f"{p}.experts.w1", f"{p}.experts.x", Kx * D)
    s.keep(f"{p}.experts.h", Kx * 2 * F)
    s.keep(f"{p}.experts.silu", Kx * F)
    if ep == 1:   # LocalDispatcher: the gate weight scales the F-wide product, index_add keeps y
        s.keep(f"{p}.experts.act", K * F)
        s.keep(f"{p}.experts.row_weight", K)
        s.linear(f"{p}.experts.w2", f"{p}.experts.act_w", K * F)
        s.keep(f"{p}.combine.y", K * D)
        s.keep(f"{p}.perm", 2 * K, 8)                                        # order, token_of
    else:         # AllToAllDispatcher: the weight multiplies the combined (N, D) output
        s.linear(f"{p}.experts.w2", f"{p}.experts.act", Kx * F)
        s.keep(f"{p}.experts.y", Kx * D)                                     # index_copy keeps its source
        s.keep(f"{p}.combine.y", K * D)                                      # back at the tokens' rank
        s.keep(f"{p}.combine.weight", K)
        s.keep(f"{p}.combine.weighted", K * D)
        s.keep(f"{p}.perm", 2 * K + Kx, 8)                                   # order, token_of; regroup


def _block(s: _Saved, c: ModelConfig, p: str, x: str, moe: bool, ep: int, copies: float = 1.0) -> None:
    _attention(s, c, f"{p}.attn", x)
    h = _norm(s, f"{p}.ln2", f"{p}.resid", c.hidden_size)
    if moe:
        _moe(s, c, f"{p}.moe", h, ep, copies)
    else:
        _swiglu(s, f"{p}.mlp", h, c.intermediate_size, c.hidden_size)


def _outside_blocks(s: _Saved, c: ModelConfig) -> None:
    """Per token, everything not inside a decoder block: embedding ids, final norms, MTP glue,
    the chunked loss's dh per head call."""
    D = c.hidden_size
    s.keep("ids", 1, 8)
    _norm(s, "final_norm", "h_out", D)
    s.keep("loss.dh", D)
    for k in range(c.num_nextn_predict_layers):
        s.keep(f"mtp{k}.ids", 1, 8)
        _norm(s, f"mtp{k}.enorm", f"mtp{k}.emb", D)
        _norm(s, f"mtp{k}.hnorm", "h_out" if k == 0 else f"mtp{k - 1}.out", D)
        s.linear(f"mtp{k}.eh_proj", f"mtp{k}.cat", 2 * D, fp8_able=False)
        _norm(s, f"mtp{k}.norm", f"mtp{k}.out", D)
        s.keep(f"mtp{k}.loss.dh", D)


def _blocks(c: ModelConfig) -> list[bool]:
    """Every decoder block, main stack then MTP: is it MoE?"""
    return [c.is_moe_layer(i) for i in range(c.num_hidden_layers)] + \
           [c.n_routed_experts > 0] * c.num_nextn_predict_layers


def block_bytes_per_token(c: ModelConfig, moe: bool, a: int, fp8: bool, ep: int, copies: float = 1.0) -> float:
    s = _Saved(a, fp8)
    _block(s, c, "b", "x", moe, ep, copies)
    return s.total()


def _block_constant(c: ModelConfig, moe: bool, lay: Layout, fp8: bool) -> float:
    """A block's saved bytes that do not scale with tokens: in bf16 the router's fp32 weight copy;
    under FP8 the E4M3 copy (+ 128x128 scales) of every weight the block's FP8 GEMMs read, one per
    expert GEMM call (EP runs the experts once per token chunk)."""
    D, H, E = c.hidden_size, c.num_attention_heads, c.n_routed_experts
    out = 4 * E * D if moe and lay.dtype == "bf16" else 0.0
    if fp8:
        q = D * H * c.qk_head_dim if c.q_lora_rank is None else c.q_lora_rank * (D + H * c.qk_head_dim)
        attn = q + D * (c.kv_lora_rank + c.qk_rope_head_dim) \
            + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D
        if moe:
            experts = lay.expert_calls * lay.experts_here(E) * 3 * D * c.moe_intermediate_size
            ffn = 3 * D * c.moe_intermediate_size * c.n_shared_experts + experts
        else:
            ffn = 3 * D * c.intermediate_size
        out += (attn + ffn) * (FP8_ROW + 4 / 128 ** 2)
    return out


def weight_grad_inputs(c: ModelConfig, moe: bool, a: int, copies: float = 1.0) -> float:
    """Bytes per token a split backward's input half keeps for its weight half, one block (pipeline schedules
    with zero-bubble steps: torch.distributed.pipelining's stage_backward_input keeps the gradient arriving at
    every op that reads a weight): each weight GEMM's output gradient, each RMSNorm's, the router's in fp32."""
    D, H, F, K = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size, c.num_experts_per_tok
    q = H * c.qk_head_dim + (c.q_lora_rank or 0)                       # q_proj, or q_a and q_b
    attn = q + c.kv_lora_rank + c.qk_rope_head_dim + H * (c.qk_nope_head_dim + c.v_head_dim) + D
    norms = 2 * D + (c.q_lora_rank or 0) + c.kv_lora_rank             # ln1, ln2, q_ln, kv_ln
    if not moe:
        return (attn + norms + 2 * c.intermediate_size + D) * a
    shared = 2 * F * c.n_shared_experts + D if c.n_shared_experts else 0
    routed = K * copies * (2 * F + D)                                   # w1 (gate and up) and w2 per copy
    return (attn + norms + shared + routed) * a + 4 * c.n_routed_experts


@dataclass
class ActivationPlan:
    tokens: int
    blocks_per_token: list[float]          # every decoder block's saved bytes per token
    block_constants: list[float]           # and its token-independent part
    outside_per_token: float               # embedding ids, final norms, MTP glue, loss dh
    outside_constant: float                # the head's dW per head call, RoPE cos/sin
    block_input: int                       # bytes per token a checkpointed block keeps (its input)
    # a split backward's input half (pipelines): what it keeps for the weight half, per token
    blocks_weight_grads: list[float] = field(default_factory=list)
    outside_weight_grads: float = 0.0      # final norm; per MTP depth its three norms and eh_proj

    @property
    def saved(self) -> int:
        """What autograd keeps for backward at the end of the forward."""
        return int(self.tokens * (sum(self.blocks_per_token) + self.outside_per_token)
                   + sum(self.block_constants) + self.outside_constant)

    @property
    def saved_checkpointed(self) -> int:
        """The same with every block checkpointed: block inputs and everything outside the blocks."""
        n = len(self.blocks_per_token)
        return int(self.tokens * (n * self.block_input + self.outside_per_token) + self.outside_constant)


def activation_plan(c: ModelConfig, lay: Layout, fp8: bool = False) -> ActivationPlan:
    outside = _Saved(lay.w, fp8)
    _outside_blocks(outside, c)
    moes = _blocks(c)
    heads = 1 + c.num_nextn_predict_layers
    return ActivationPlan(
        tokens=lay.mbs * lay.seq,
        blocks_per_token=[block_bytes_per_token(c, moe, lay.w, fp8, lay.ep, lay.rank_copies) for moe in moes],
        block_constants=[_block_constant(c, moe, lay, fp8) for moe in moes],
        outside_per_token=outside.total(),
        # the chunked loss's dW (V, D) per head call; RoPE cos/sin (S, dr/2) each
        outside_constant=(heads * c.vocab_size * c.hidden_size + lay.seq * c.qk_rope_head_dim) * lay.w,
        block_input=c.hidden_size * lay.w,
        blocks_weight_grads=[weight_grad_inputs(c, moe, lay.w, lay.rank_copies) for moe in moes],
        outside_weight_grads=(1 + 4 * c.num_nextn_predict_layers) * c.hidden_size * lay.w)


# ----------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    layout: Layout
    params: Params
    state: StatePlan
    activations: dict[str, int] = field(default_factory=dict)
    checkpoint_total: int = 0
    checkpoint_per_rank: int = 0
    pipeline: list = field(default_factory=list)   # parallel.pp > 1: every pipeline rank's plan (the largest above)

    def device_total(self, variant: str) -> int:
        """Under a pipeline, the largest rank's for this variant (not always the one above)."""
        return max((r.state.device + r.activations[variant] for r in self.pipeline),
                   default=self.state.device + self.activations[variant])

    def as_dict(self) -> dict:
        out = asdict(self)
        out["state"].update(device=self.state.device, host=self.state.host)
        out["device_total"] = {k: self.device_total(k) for k in self.activations}
        return out


def plan(c: ModelConfig, lay: Layout) -> Plan:
    """Every figure of the memory plan for one layout (bytes per rank; under a pipeline, the largest rank's)."""
    if lay.pp > 1:
        from model.pipeline_plan import pipeline_plan
        return pipeline_plan(c, lay)
    from model.recompute_plan import peak_checkpointed
    plain, f8 = activation_plan(c, lay), activation_plan(c, lay, fp8=True)
    acts = {"plain": plain.saved, "checkpointed": peak_checkpointed(c, lay, plain),
            "fp8": f8.saved, "fp8+checkpointed": peak_checkpointed(c, lay, f8, fp8=True)}
    total = checkpoint_bytes(c)
    return Plan(layout=lay, params=params(c, lay.ep, lay.rank_experts), state=state_plan(c, lay), activations=acts,
                checkpoint_total=total, checkpoint_per_rank=math.ceil(total / lay.world))


# ----------------------------------------------------------------------------- what fits

USABLE = 0.9   # of a card's memory the plan may fill: the rest is the CUDA context, NCCL and fragmentation


def fits(p: Plan, variant: str, capacity: float) -> bool:
    return p.device_total(variant) <= USABLE * capacity


def smallest_worlds(c: ModelConfig, lay: Layout, capacity: float, max_world: int = 8192
                    ) -> dict[str, Layout | None]:
    """Per activation variant, the smallest world (1, 2, 4, then multiples of 8: whole 8-GPU nodes)
    at which it fits, with the largest ep that divides both the world and the expert count (more
    ep, fewer local experts) and the even placement; None if none up to ``max_world`` does. The rest is ``lay``'s. Host
    memory (offload) is not a constraint here: the caller reports it."""
    from dataclasses import replace

    E = max(1, c.n_routed_experts)
    found: dict[str, Layout | None] = {}
    for world in [1, 2, 4] + list(range(8, max_world + 1, 8)):
        ep = max(d for d in range(1, min(world, E) + 1) if world % d == 0 and E % d == 0)
        cand = replace(lay, world=world, ep=ep, rank_experts=0, rank_copies=1.0)   # even placements
        p = plan(c, cand)
        for v in p.activations:
            if v not in found and fits(p, v, capacity):
                found[v] = cand
        if len(found) == len(p.activations):
            break
    return {v: found.get(v) for v in ("plain", "checkpointed", "fp8", "fp8+checkpointed")}
