"""Per-rank memory plan under a pipeline (``--plan ...,pp=P[,schedule=S][,accum=M]``), from the config alone.

    world W = pp x n;  a stage's ZeRO and EP groups are its n ranks (n = W / pp);  M micro-batches per step

Each rank holds its stages' parameters only: the decoder layers of its stages (parallel/pipeline/plan.py's
split, the one the trainer uses), the embedding on stage 0, the final norm, output head and MTP depths on
the last stage. Its state is model/memory_plan.py's ``state_plan`` over those parameters with world n
(dense state partitioned over the stage's ranks, experts over the stage's expert-data-parallel group).

Activations: a stage keeps one chunk (the saved tensors of one micro-batch) from its forward to its backward.
How many chunks of each stage a rank holds at once follows from the order in which its schedule runs the
actions (``rank_order``: the same order as torch.distributed.pipelining's Schedule1F1B,
ScheduleInterleaved1F1B and ScheduleDualPipeV, which tests/test_pipeline_plan.py checks action by action):
  F   forward of (stage, micro-batch): its chunk is alive from here
  B   full backward: the chunk is freed
  I   input-gradient half of a backward (DualPipeV's zero-bubble steps): torch keeps the graph
      (retain_graph) for the weight half, so the chunk stays alive until its W
  W   weight-gradient half: the chunk is freed
  (F, B) an overlapped pair (DualPipeV's OVERLAP_F_B): the forward's chunk exists before the backward's is
      freed (torch runs the forward first; parallel/pipeline/overlap.py runs the two at once, so it can only
      free sooner)
The bytes grow at a forward, at an input half and as a backward starts (the last stage's backward first
allocates the chunked loss's scaled dW and dh per head call, an input half its dh only), so the rank's peak
is the largest, over those moments, of the sum over its stages of chunks alive x bytes per chunk, plus the
input halves' gradients and the starting backward's allocation. For 1F1B that is min(M, P - r) chunks on
rank r; for DualPipeV the V's middle ranks hold one chunk more than their warm-up count (the forward that
opens the steady phase comes before the first backward).

A stage's chunk: its blocks' saved tensors (model/memory_plan.py, op by op), the stage's outputs (torch's
stage keeps them for the backward: (1 + MTP depths) x D per token), on the first stage the token ids, on the
last stage everything outside the blocks (final norms, MTP glue, the loss's dh) and the chunked loss's dW per
head call (each micro-batch's loss keeps its own until its backward). What a stage receives is not part of
a chunk: torch's PipelineStage would receive into M buffers per boundary allocated once and kept; the trainer
allocates each at its receive and drops it after the backward that reads it (parallel/pipeline/schedule.py,
``release_receives``): a stage's input lives with its chunk, an output gradient from its receive to the end of
the chunk's weight half, (1 + depths) x D per token each (``receives_alive``); a boundary between two stages of
one rank passes the tensor itself.
Under activation checkpointing a chunk keeps its blocks' inputs instead of their saved sets, and a backward
adds the block it recomputes: its full saved set and the gradients its backward starts with
(model/recompute_plan.py), the loss's dW per head call freed by then (the rest of the head side is not: the
final norms and the MTP glue run after the MTP block). What the schedule has sent is held on top (``sent``):
torch's runtime schedules (interleaved, DualPipeV) keep every send's work, and with it the tensor, until the
step ends, so a sent output outlives its chunk and each input gradient sent back stays; Schedule1F1B waits on
its sends soon but keeps one reference: the previous backward's input gradient (through the next backward) and,
on a stage that sends forward with two or more warm-up chunks, the last warm-up send's output (through the
steady phase). Every boundary tensor there is ``boundary_bytes``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

from model.config import ModelConfig
from model.flops import _block
from model.memory_plan import Layout, Params, Plan, StatePlan, activation_plan, checkpoint_bytes, params, state_plan
from model.recompute_plan import blocks_backward, loss_freed_bytes

Act = tuple[str, int, int]      # (kind F | B | I | W, stage, micro-batch)
Step = tuple[Act, ...]          # one action, or an overlapped (forward, backward) pair


@dataclass
class RankPlan:
    rank: int                      # pipeline rank
    stages: list[int]
    layers: list[int]
    params: Params
    state: StatePlan
    in_flight: dict[int, int]      # stage -> chunks (micro-batches) alive at the peak of the plain model
    activations: dict[str, int]    # variant -> bytes (chunks in flight, what is held of sends and receives)
    buffers: int = 0               # the receive buffers alive at the plain peak (bytes; none between steps)


# ----------------------------------------------------------------------------- the schedules' action orders

def _one_f_one_b(P: int, M: int, r: int) -> list[Step]:
    """Schedule1F1B on rank r (stage r): min(M, P - r) forwards, then backward and forward in turn."""
    warm = min(M, P - r)
    steps: list[Step] = [(("F", r, mb),) for mb in range(warm)]
    for mb in range(M):
        steps.append((("B", r, mb),))
        if warm + mb < M:
            steps.append((("F", r, warm + mb),))
    return steps


def _interleaved(P: int, M: int, r: int) -> list[Step]:
    """ScheduleInterleaved1F1B on rank r (stages r, r + P), Megatron's depth-first order: micro-batches in
    rounds of P per stage; (P + 2 (P - 1 - r)) warm-up forwards, then forward and backward in turn."""
    rounds = max(1, M // P)
    per_round = M // rounds
    total = 2 * M                                     # chunks per rank (two stages), each forward and backward
    warm = min(per_round + 2 * (P - 1 - r), total)
    fwd = {r: 0, r + P: 0}
    bwd = {r: 0, r + P: 0}
    steps: list[Step] = []

    def forward(op: int) -> None:
        s = (op // per_round) % 2 * P + r
        steps.append((("F", s, fwd[s]),))
        fwd[s] += 1

    def backward(op: int) -> None:
        s = (1 - (op - warm) // per_round % 2) * P + r
        steps.append((("B", s, bwd[s]),))
        bwd[s] += 1

    for op in range(warm):
        forward(op)
    for op in range(warm, total):
        forward(op)
        backward(op)
    for op in range(total, total + warm):
        backward(op)
    return steps


def _dualpipev(P: int, M: int, r: int) -> list[Step]:
    """ScheduleDualPipeV on rank r, stages a = r (down the V) and b = 2P - 1 - r (back up), DualPipe's steps:
    1 forwards of a to fill the pipe; 2 a and b forwards; 3 zero-bubble backward of b (I then W) and a forward
    of b; 4 the steady phase, overlapped pairs (F a, B b) and (F b, B a) (on the last rank the first pair is
    run as two actions); 5 B b then the pair (F b, B a); 6 backwards of b and a, switching to zero-bubble
    halves midway; 7 a pending weight half and a backward of a; 8 the remaining weight halves."""
    a, b = r, 2 * P - 1 - r
    fwd = {a: 0, b: 0}
    bwd = {a: 0, b: 0}
    pending: list[tuple[int, int]] = []               # (stage, micro-batch) whose W is still to run
    steps: list[Step] = []

    def f(s: int) -> Act:
        fwd[s] += 1
        return ("F", s, fwd[s] - 1)

    def back(s: int, half: bool = False) -> Act:
        bwd[s] += 1
        if half:
            pending.append((s, bwd[s] - 1))
        return ("I" if half else "B", s, bwd[s] - 1)

    def weight() -> None:
        if pending:
            s, mb = pending.pop(0)
            steps.append((("W", s, mb),))

    steps += [(f(a),) for _ in range(2 * (P - r - 1))]                      # 1
    for _ in range(r + 1):                                                   # 2
        steps += [(f(a),), (f(b),)]
    for _ in range(P - r - 1):                                               # 3
        steps.append((back(b, half=True),))
        weight()
        steps.append((f(b),))
    for i in range(M - 2 * P + r + 1):                                       # 4
        if i == 0 and r == P - 1:
            steps += [(f(a),), (back(b),)]
        else:
            steps.append((f(a), back(b)))
        steps.append((f(b), back(a)))
    for _ in range(P - r - 1):                                               # 5
        steps.append((back(b),))
        steps.append((f(b), back(a)))
    half = False
    for i in range(r + 1):                                                   # 6
        half = half or (i == (r + 1) // 2 and r % 2 == 1)
        steps.append((back(b, half),))
        half = half or (i == (r + 1) // 2 and r % 2 == 0)
        steps.append((back(a, half),))
    for _ in range(P - r - 1):                                               # 7
        weight()
        steps.append((back(a, half),))
    for _ in range(r + 1):                                                   # 8
        weight()
    return steps


ORDERS = {"1f1b": _one_f_one_b, "interleaved": _interleaved, "dualpipev": _dualpipev}


def rank_order(schedule: str, P: int, M: int, rank: int, overlap: bool = False) -> list[Step]:
    """The compute actions pipeline rank ``rank`` runs in one step, in order (module docstring). ``overlap``
    (parallel.pp_overlap, DualPipeV): parallel/pipeline/overlap.py runs a pair's forward beside the input half
    of its backward, then the weight half (a backward of the first stage, which has no input gradient, whole)."""
    steps = ORDERS[schedule](P, M, rank)
    if not (overlap and schedule == "dualpipev"):
        return steps
    out: list[Step] = []
    for step in steps:
        if len(step) == 2 and step[1][1] != 0:
            (_, s, mb) = step[1]
            out += [(step[0], ("I", s, mb)), (("W", s, mb),)]
        else:
            out.append(step)
    return out


# stage -> chunks alive; stage -> of them, input halves done; the backwards (B or I, stage) starting now
Moment = tuple[dict[int, int], dict[int, int], tuple[tuple[str, int], ...]]


def live_chunks(order: list[Step]) -> list[Moment]:
    """The chunks alive, and how many of them wait for their weight half, at every moment the bytes can peak:
    after each forward and each input half, and as each backward starts (in a pair, after its forward and its
    input half, before its backward frees)."""
    alive: dict[int, int] = {}
    halves: dict[int, int] = {}
    moments = []
    for step in order:
        for kind, stage, _ in step:
            alive.setdefault(stage, 0)
            halves.setdefault(stage, 0)
            alive[stage] += kind == "F"
            halves[stage] += kind == "I"
        if any(kind in "FIBW" for kind, _, _ in step):
            moments.append((dict(alive), dict(halves), tuple((kind, s) for kind, s, _ in step if kind in "BIW")))
        for kind, stage, _ in step:
            alive[stage] -= kind in "BW"
            halves[stage] -= kind == "W"
    return moments


def in_flight(schedule: str, P: int, M: int, rank: int, chunk_bytes: dict[int, float] | None = None,
              overlap: bool = False) -> dict[int, int]:
    """Stage -> chunks alive at the rank's peak: the moment with the most bytes (``chunk_bytes``: per chunk of
    each stage; default 1, the most chunks); the earliest such moment."""
    moments = live_chunks(rank_order(schedule, P, M, rank, overlap))
    weight = chunk_bytes or {}
    return max(moments, key=lambda m: sum(n * weight.get(s, 1.0) for s, n in m[0].items()))[0]


# ----------------------------------------------------------------------------- parameters and bytes

def stage_params(c: ModelConfig, split: list[list[int]], stages: list[int], ep: int) -> Params:
    """Params of the modules a rank's ``stages`` run (dense: replicated over the stage; experts: over ep)."""
    D, V, last = c.hidden_size, c.vocab_size, len(split) - 1
    expert = 3 * D * c.moe_intermediate_size * c.n_routed_experts
    dense = experts = 0
    for i in (i for s in stages for i in split[s]):
        moe = c.is_moe_layer(i)
        dense += _block(c, moe)[0] - (expert if moe else 0)
        experts += expert if moe else 0
    if 0 in stages:
        dense += V * D
    if last in stages:
        dense += D + (0 if c.tie_word_embeddings else V * D)
        for _ in range(c.num_nextn_predict_layers):
            moe = c.n_routed_experts > 0
            dense += _block(c, moe)[0] - (expert if moe else 0) + 3 * D + 2 * D * D
            experts += expert if moe else 0
    moe_layers = experts // expert if expert else 0
    return Params(dense=dense, experts=experts, largest_local=params(c, ep).largest_local,
                  router_bias=moe_layers * c.n_routed_experts)


def boundary_bytes(c: ModelConfig, lay: Layout) -> int:
    """One micro-batch across a stage boundary: the hidden states and one embedding per MTP depth."""
    return (1 + c.num_nextn_predict_layers) * lay.mbs * lay.seq * c.hidden_size * lay.w


class Chunk(NamedTuple):
    """One micro-batch of one stage, bytes."""
    saved: float           # what it keeps from its forward to its backward
    checkpointed: float    # the same with every block checkpointed (block inputs, what is outside the blocks)
    recompute: float       # a checkpointed block's backward, the largest: its saved set and the gradients it
                           # starts with (model/recompute_plan.py)
    loss_freed: float      # the last stage's loss dW per head call, freed before any block is recomputed
    half: float            # what an input half adds until its weight half: the gradients it keeps for the
                           # weights, the input gradients it hands back (0 on the first stage: torch leaves its
                           # input half to the weight half)
    loss_grads: float      # the last stage's backward first: the chunked loss's scaled dW and dh per head call
    loss_dh: float         # an input half's (it needs no weight gradient): the dh only
    weight_grad: float     # each weight's gradient is computed whole before it is added into .grad: the largest


def _stage_chunk(c: ModelConfig, lay: Layout, layers: list[int], first: bool, last: bool, fp8: bool) -> Chunk:
    ap = activation_plan(c, lay, fp8)
    T, L, depths = ap.tokens, c.num_hidden_layers, c.num_nextn_predict_layers
    blocks = list(layers) + (list(range(L, L + depths)) if last else [])
    sets = [T * ap.blocks_per_token[i] + ap.block_constants[i] for i in blocks]
    grads = blocks_backward(c, lay, T, fp8)           # FP8: the first FP8 GEMM's weight gradient (recompute_plan.py)
    head_side = T * ap.outside_per_token + ap.outside_constant if last else 0.0
    glue = boundary_bytes(c, lay) + head_side                      # the outputs the stage keeps
    glue += T * 8 * (1 + depths) if first else 0.0                 # token ids and the MTP depths' next tokens
    half = 0.0 if first else T * (sum(ap.blocks_weight_grads[i] for i in blocks)
                                  + (ap.outside_weight_grads if last else 0.0)) + boundary_bytes(c, lay)
    heads = (1 + depths) * c.hidden_size * lay.w if last else 0.0
    return Chunk(saved=sum(sets) + glue, checkpointed=T * ap.block_input * len(blocks) + glue,
                 recompute=max((b + grads[i] for b, i in zip(sets, blocks)), default=0.0),
                 loss_freed=loss_freed_bytes(c, lay.w) if last else 0.0, half=half,
                 loss_grads=heads * (c.vocab_size + T), loss_dh=heads * T,
                 weight_grad=lay.w * _largest_weight(c, lay, blocks, first, last))


def _largest_weight(c: ModelConfig, lay: Layout, blocks: list[int], first: bool, last: bool) -> int:
    """Elements of the stage's largest weight: a backward computes each weight's gradient whole before adding
    it into .grad (the routed experts' w1 of a grouped GEMM, the embedding's dense gradient, ...)."""
    D, H, F = c.hidden_size, c.num_attention_heads, c.moe_intermediate_size
    shapes = [(c.q_lora_rank or D) * H * c.qk_head_dim, D * (c.kv_lora_rank + c.qk_rope_head_dim),
              c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim), H * c.v_head_dim * D]
    moe = [c.is_moe_layer(i) if i < c.num_hidden_layers else c.n_routed_experts > 0 for i in blocks]
    if not all(moe):
        shapes.append(D * c.intermediate_size)
    if any(moe):
        shapes += [lay.experts_here(c.n_routed_experts) * D * 2 * F, D * F * max(1, c.n_shared_experts)]
    if first or last:
        shapes.append(c.vocab_size * D)
    return max(shapes)


def receives_alive(m: Moment, crosses: dict[int, tuple[bool, bool]]) -> int:
    """Boundary tensors received from another rank and alive at moment ``m`` (parallel/pipeline/schedule.py's
    ``release_receives`` allocates each at its receive and drops it after the backward that reads it): a
    stage's input for every chunk alive (the weight half keeps it too), and its output gradient for every
    chunk waiting for its weight half and for the backward (or input half) running. ``crosses``: as in
    ``sends_held``."""
    alive, halves, running = m
    n = sum(alive.get(s, 0) * backward + halves.get(s, 0) * forward for s, (forward, backward) in crosses.items())
    return n + sum(crosses[s][0] for kind, s in running if kind in "BI")


def _running(kind: str, ch: Chunk, checkpointed: bool) -> float:
    """What a backward (B), input half (I) or weight half (W) of a chunk allocates while it runs. Checkpointed,
    a backward also recomputes its blocks one at a time, the loss's dW freed by then; a block's weight
    gradients come late in its backward, once most of its set is freed: a moment of their own."""
    recompute = ch.recompute - ch.loss_freed if checkpointed else 0.0
    if kind == "B":
        return max(ch.loss_grads, ch.weight_grad, recompute)
    return max(ch.loss_dh, recompute) if kind == "I" else ch.weight_grad


def _held(m: Moment, chunk: dict[int, Chunk], checkpointed: bool = False, sent: float = 0.0) -> float:
    """Bytes at moment ``m``: the chunks alive, the input halves, what a backward running then allocates and
    ``sent``: what the schedule still holds of its sends."""
    alive = sum(n * (chunk[s].checkpointed if checkpointed else chunk[s].saved) + m[1].get(s, 0) * chunk[s].half
                for s, n in m[0].items())
    return alive + sent + max((_running(kind, chunk[s], checkpointed) for kind, s in m[2]), default=0.0)


def sends_held(schedule: str, order: list[Step], crosses: dict[int, tuple[bool, bool]]) -> list[int]:
    """Per moment of ``live_chunks(order)`` (one per step), the boundary tensors the schedule still holds of
    what it sent beyond the chunks alive (module docstring). ``crosses``: stage -> (its output goes to another
    rank, its input gradient goes to another rank)."""
    held, out = 0, []
    for i, step in enumerate(order):
        out.append(held + (_one_f_one_b_warm_send(order, i, crosses) if schedule == "1f1b" else 0))
        for kind, s, _ in step:
            forward, backward = crosses[s]
            if schedule != "1f1b":           # the runtime: every send held to the step's end (an input half's
                held += (kind in "BW") * (forward + backward)    # gradient is in the chunk's half until its W)
            elif kind == "B":
                held = int(backward)         # the previous backward's input gradient, until the next one's
    return out


def _one_f_one_b_warm_send(order: list[Step], i: int, crosses: dict[int, tuple[bool, bool]]) -> int:
    """1 if at step ``i`` Schedule1F1B still holds the output of its last fired warm-up send beyond its chunk:
    from after that micro-batch's backward (warm - 2: the last warm-up forward's send is fused with the first
    backward) to the backward that ends the steady phase (the last one before which a forward still ran)."""
    kinds = [step[0][0] for step in order]
    warm = kinds.index("B") if "B" in kinds else len(kinds)
    stage = order[0][0][1]
    if warm < 2 or not crosses[stage][0]:
        return 0
    backs = [j for j, k in enumerate(kinds) if k == "B"]
    freed = backs[warm - 2]                              # the backward of micro-batch warm - 2
    last_f = max(j for j, k in enumerate(kinds) if k == "F")
    ends = min((j for j in backs if j > last_f), default=len(kinds))
    return int(freed < i <= ends)


def rank_plan(c: ModelConfig, lay: Layout, split: list[list[int]], rank: int) -> RankPlan:
    """The plan of pipeline rank ``rank`` under ``lay`` (lay.world: the whole world; lay.pp ranks per pipeline;
    the split and the stage-to-rank map as parallel/layout.py's parse_plan put them in the layout)."""
    n_stages = len(split)
    stages = list(lay.pp_rank_stages[rank])          # parallel/layout.py: the trainer's stage-to-rank map
    pr = stage_params(c, split, stages, lay.ep)
    stage_lay = replace(lay, world=lay.world // lay.pp)
    order = rank_order(lay.pp_schedule, lay.pp, lay.micro_batches, rank, lay.pp_overlap)
    owner = {s: r for r, ss in enumerate(lay.pp_rank_stages) for s in ss}
    crosses = {s: (s < n_stages - 1 and owner[s + 1] != rank, s > 0 and owner[s - 1] != rank) for s in stages}
    moments = list(zip(live_chunks(order), (n * boundary_bytes(c, stage_lay) for n in sends_held(
        lay.pp_schedule, order, crosses))))
    bb = boundary_bytes(c, stage_lay)
    moments = [(m, sent + bb * receives_alive(m, crosses)) for m, sent in moments]   # both: boundary tensors
    acts, flight, buffers = {}, {}, 0
    for variant, fp8 in (("plain", False), ("fp8", True)):
        chunk = {s: _stage_chunk(c, stage_lay, split[s], s == 0, s == n_stages - 1, fp8) for s in stages}
        peak = max(moments, key=lambda m: _held(m[0], chunk, sent=m[1]))
        acts[variant] = int(_held(peak[0], chunk, sent=peak[1]))
        acts[f"{variant}+checkpointed" if fp8 else "checkpointed"] = int(
            max(_held(m, chunk, True, sent) for m, sent in moments))
        flight = flight or peak[0][0]
        buffers = buffers if fp8 else bb * receives_alive(peak[0], crosses)
    return RankPlan(rank=rank, stages=stages, layers=[i for s in stages for i in split[s]], params=pr,
                    state=state_plan(c, stage_lay, pr), in_flight={s: flight.get(s, 0) for s in stages},
                    activations=acts, buffers=buffers)


def pipeline_ranks(c: ModelConfig, lay: Layout) -> list[RankPlan]:
    split = [list(s) for s in lay.pp_split]
    return [rank_plan(c, lay, split, r) for r in range(lay.pp)]


def pipeline_plan(c: ModelConfig, lay: Layout) -> Plan:
    """model/memory_plan.py's Plan under a pipeline: every rank's; parameters and state of the rank with the
    largest plain total, activations per variant of the rank largest for it (Plan.device_total: its total)."""
    ranks = pipeline_ranks(c, lay)
    top = max(ranks, key=lambda r: r.state.device + r.activations["plain"])
    acts = {v: max(ranks, key=lambda r: r.state.device + r.activations[v]).activations[v] for v in top.activations}
    total = checkpoint_bytes(c)
    return Plan(layout=lay, params=top.params, state=top.state, activations=acts,
                checkpoint_total=total, checkpoint_per_rank=math.ceil(total / lay.world), pipeline=ranks)
