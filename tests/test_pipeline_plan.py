"""The pipeline's memory plan (model/pipeline_plan.py through parallel/layout.py's --plan): every parameter on
exactly one pipeline rank, the schedules' action orders against torch's own (no process group: torch builds
them from the rank and the counts), the chunks in flight they give, and pp=1 unchanged. No processes; ~3 s."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from configs.schema import load_config
from model.memory_plan import params, plan
from model.pipeline_plan import in_flight, live_chunks, rank_order
from parallel.layout import parse_plan


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "dualpipev"])
def test_every_parameter_is_on_one_pipeline_rank(schedule):
    cfg = load_config("configs/deepseek_v3_16b.yaml", ["model.num_hidden_layers=28"])   # 4 interleaved stages
    lay = parse_plan(f"world=8,ep=2,zero=1,dtype=bf16,mbs=1,seq=4096,pp=2,schedule={schedule},accum=16", cfg)
    ranks = plan(cfg.model, lay).pipeline
    full = params(cfg.model)
    assert sum(r.params.dense for r in ranks) == full.dense
    assert sum(r.params.experts for r in ranks) == full.experts
    assert sorted(i for r in ranks for i in r.layers) == list(range(cfg.model.num_hidden_layers))
    # the plan is the largest rank's
    p = plan(cfg.model, lay)
    assert p.state.device + p.activations["plain"] == max(r.state.device + r.activations["plain"] for r in ranks)
    for v in ("plain", "checkpointed", "fp8", "fp8+checkpointed"):      # what fits: the largest rank per variant
        assert p.device_total(v) == max(r.state.device + r.activations[v] for r in ranks), v


def _torch_order_1f1b(P: int, M: int, rank: int) -> list[tuple]:
    """The actions Schedule1F1B._step_microbatches runs on ``rank`` (its runtime: the schedule IR it also
    offers, _get_pipeline_order, numbers the last rank's forwards from 1), recorded by a stand-in stage."""
    from torch.distributed.pipelining.schedules import Schedule1F1B

    done: list[tuple] = []
    stage = SimpleNamespace(
        stage_index=rank, get_fwd_recv_ops=lambda mb: [], get_bwd_recv_ops=lambda mb: [],
        get_fwd_send_ops=lambda mb: [], get_bwd_send_ops=lambda mb: [], perform_reduce_grad=lambda scale: None,
        forward_one_chunk=lambda mb, *a, **k: done.append((("F", rank, mb),)),
        backward_one_chunk=lambda mb, **k: done.append((("B", rank, mb),)))
    sched = SimpleNamespace(_stage=stage, _n_microbatches=M, _num_stages=P, scale_grads=False,
                            _check_inputs=lambda a, k, t, losses: ([()] * M, [{}] * M),
                            _initialize_stage=lambda *a: None, _maybe_compute_loss=lambda *a: None,
                            _maybe_get_loss=lambda *a: None, _update_losses=lambda *a: None)
    Schedule1F1B._step_microbatches(sched, None, None, None)
    return done


def _torch_sends_held_1f1b(P: int, M: int, rank: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """At every moment of Schedule1F1B._step_microbatches on ``rank`` (after a forward, as a backward starts):
    how many of the sends it made are still referenced by the schedule beyond their chunk (an output whose
    backward has run, any input gradient). The sends are stand-in objects the batched p2p hands back as its
    works (as gloo's work keeps its tensor); a weak set sees which the schedule still holds."""
    import weakref

    from torch.distributed.pipelining import schedules

    class Sent:
        def __init__(self, kind: str, mb: int):
            self.kind, self.mb = kind, mb

    alive: weakref.WeakSet = weakref.WeakSet()
    backward_done: set[int] = set()
    counts: list[int] = []

    def send(kind: str, mb: int, crosses: bool) -> list:
        if not crosses:
            return []
        sent = Sent(kind, mb)
        alive.add(sent)
        return [sent]

    def moment() -> None:                      # no cycles: a stand-in goes as its last reference does
        counts.append(sum(s.kind == "grad" or s.mb in backward_done for s in alive))

    def backward(mb: int, **_: object) -> None:
        moment()
        backward_done.add(mb)

    monkeypatch.setattr(schedules, "_batch_p2p", lambda ops, desc=None: list(ops))
    monkeypatch.setattr(schedules, "_wait_batch_p2p", lambda works: None)
    stage = SimpleNamespace(
        stage_index=rank, get_fwd_recv_ops=lambda mb: [], get_bwd_recv_ops=lambda mb: [],
        get_fwd_send_ops=lambda mb: send("out", mb, rank < P - 1),
        get_bwd_send_ops=lambda mb: send("grad", mb, rank > 0), perform_reduce_grad=lambda scale: None,
        forward_one_chunk=lambda mb, *a, **k: moment(), backward_one_chunk=backward)
    sched = SimpleNamespace(_stage=stage, _n_microbatches=M, _num_stages=P, scale_grads=False,
                            _check_inputs=lambda a, k, t, losses: ([()] * M, [{}] * M),
                            _initialize_stage=lambda *a: None, _maybe_compute_loss=lambda *a: None,
                            _maybe_get_loss=lambda *a: None, _update_losses=lambda *a: None)
    schedules.Schedule1F1B._step_microbatches(sched, None, None, None)
    return counts


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (3, 7), (4, 4)])
def test_sends_held_are_the_ones_torch_keeps(P, M, monkeypatch):
    """Schedule1F1B waits on its sends soon but keeps a reference to some (the previous backward's input
    gradient, the last warm-up output): the plan's count beyond the chunks against torch's own code."""
    from model.pipeline_plan import sends_held

    for r in range(P):
        crosses = {r: (r < P - 1, r > 0)}
        got = _torch_sends_held_1f1b(P, M, r, monkeypatch)
        assert sends_held("1f1b", rank_order("1f1b", P, M, r), crosses) == got, (P, M, r)
    # the runtime schedules (interleaved, DualPipeV) wait on every send at the step's end only: on interleaved
    # rank 1 (stage 1 sends both ways, stage 3 its input gradient) the count never falls; as the last backward
    # (stage 1's) starts, two per earlier stage-1 backward and one per stage-3 backward
    held = sends_held("interleaved", rank_order("interleaved", 2, M, 1), {1: (True, True), 3: (False, True)})
    assert held == sorted(held) and held[-1] == 2 * (M - 1) + M


def _torch_order(schedule: str, P: int, M: int, rank: int) -> list[tuple]:
    """torch's own action list for ``rank`` (ScheduleDualPipeV and ScheduleInterleaved1F1B compute it per rank
    from the rank count and micro-batches alone), as model/pipeline_plan.py's steps."""
    from torch.distributed.pipelining import schedules as S

    if schedule == "1f1b":
        return _torch_order_1f1b(P, M, rank)
    kind = {S.FORWARD: "F", S.FULL_BACKWARD: "B", S.BACKWARD_INPUT: "I", S.BACKWARD_WEIGHT: "W"}
    if schedule == "dualpipev":
        ops = S.ScheduleDualPipeV._calculate_single_rank_operations(
            SimpleNamespace(pp_group_size=P, _n_microbatches=M), rank)
    else:
        rounds = max(1, M // P)
        ops = S.ScheduleInterleaved1F1B._calculate_single_rank_operations(SimpleNamespace(
            pp_group_size=P, n_local_stages=2, microbatches_per_round=M // rounds, _n_microbatches=M), rank)
    act = lambda a: (kind[a.computation_type], a.stage_index, a.microbatch_index)  # noqa: E731
    return [tuple(act(s) for s in a.sub_actions) if a.computation_type == S.OVERLAP_F_B else (act(a),)
            for a in ops if a is not None and (a.computation_type in kind or a.computation_type == S.OVERLAP_F_B)]


@pytest.mark.parametrize("schedule,P,M", [("1f1b", 2, 4), ("1f1b", 4, 8), ("1f1b", 3, 7), ("1f1b", 4, 4),
                                          ("dualpipev", 2, 4), ("dualpipev", 2, 8), ("dualpipev", 3, 6),
                                          ("dualpipev", 4, 8), ("dualpipev", 4, 16), ("dualpipev", 8, 32),
                                          ("interleaved", 2, 4), ("interleaved", 2, 8), ("interleaved", 3, 6),
                                          ("interleaved", 4, 16)])
def test_action_orders_are_torchs(schedule, P, M):
    for r in range(P):
        assert rank_order(schedule, P, M, r) == _torch_order(schedule, P, M, r), (schedule, P, M, r)


def test_in_flight_micro_batches():
    assert [in_flight("1f1b", 4, 8, r) for r in range(4)] == [{0: 4}, {1: 3}, {2: 2}, {3: 1}]
    assert in_flight("1f1b", 4, 4, 0) == {0: 4}
    # interleaved, 2 ranks, 8 micro-batches in rounds of 2: rank 0 forwards stages 0 0 2 2 (warm-up P + 2(P - 1))
    # and 0 before its first backward
    assert in_flight("interleaved", 2, 8, 0) == {0: 3, 2: 2} and in_flight("interleaved", 2, 8, 1) == {1: 2, 3: 1}
    # DualPipeV, 2 ranks, 4 micro-batches: rank 1 (stages 1, 2) runs F1 F2 F1 F2, then F1 before the first
    # backward (B2): 3 + 2 chunks; rank 0 (stages 0, 3) forwards stage 0 a fourth time in the pair whose
    # backward frees a stage-3 chunk: 4 + 1
    assert in_flight("dualpipev", 2, 4, 1) == {1: 3, 2: 2}
    assert in_flight("dualpipev", 2, 4, 0) == {0: 4, 3: 1}
    assert in_flight("dualpipev", 4, 8, 0) == {0: 8, 7: 1} and in_flight("dualpipev", 4, 8, 3) == {3: 5, 4: 4}
    # weighted by bytes per chunk the peak can be another moment: interleaved rank 1 holds (2, 1) chunks of
    # stages (1, 3) after its warm-up and (3, 0) later; with stage 1's chunks the heavier, the later one
    assert max(m[0].get(1, 0) for m in live_chunks(rank_order("interleaved", 2, 8, 1))) == 3
    assert in_flight("interleaved", 2, 8, 1, {1: 10.0, 3: 1.0}) == {1: 3, 3: 0}


def test_overlapped_pairs_keep_the_backward_chunk_and_its_input_half():
    """parallel.pp_overlap (parallel/pipeline/overlap.py): a pair runs its forward beside the input half of its
    backward, then the weight half; the first stage's backward (no input gradient) whole."""
    plain, overlapped = rank_order("dualpipev", 2, 4, 0), rank_order("dualpipev", 2, 4, 0, overlap=True)
    assert (("F", 0, 3), ("B", 3, 1)) in plain and (("F", 3, 2), ("B", 0, 0)) in plain
    i = overlapped.index((("F", 0, 3), ("I", 3, 1)))
    assert overlapped[i + 1] == (("W", 3, 1),) and (("F", 3, 2), ("B", 0, 0)) in overlapped
    # at that pair: stage 0's fourth chunk beside stage 3's chunk, whose input half is done, its weights not
    moments = live_chunks(overlapped)
    assert ({0: 4, 3: 1}, {0: 0, 3: 1}, (("I", 3),)) in moments
    assert max(sum(m[1].values()) for m in live_chunks(plain)) == 1     # torch's own I3 W3 of step 3


def test_input_half_keeps_what_the_plan_says():
    """The gradients torch's split backward keeps from its input half for its weight half (stage_backward_input's
    param_groups), one dense and one MoE block of the tiny model, against weight_grad_inputs per token."""
    from torch.distributed.pipelining._backward import stage_backward_input

    from model.memory_plan import weight_grad_inputs
    from model.transformer import DeepseekV3

    cfg = load_config(None, [])
    torch.manual_seed(0)
    model = DeepseekV3(cfg.model)
    B, S = 2, 32
    for i in (0, 1):                                   # layer 0 dense, layer 1 MoE
        x = torch.randn(B, S, cfg.model.hidden_size, requires_grad=True)
        h, _ = model.layers[i](x, model.rotary(S, x.device, x.dtype))
        _, groups = stage_backward_input([h], [torch.ones_like(h)], [x], model.layers[i].parameters())
        kept = {g.untyped_storage().data_ptr(): g.untyped_storage().nbytes()
                for group in groups for grads in group.get("grads") or [] for g in grads or () if g is not None}
        want = weight_grad_inputs(cfg.model, cfg.model.is_moe_layer(i), 4) * B * S
        assert sum(kept.values()) == pytest.approx(want, rel=1e-3), i


def test_pp1_plan_is_unchanged_and_bad_pipeline_fields_are_named():
    cfg = load_config("configs/deepseek_v3_16b.yaml", [])
    a = plan(cfg.model, parse_plan("world=8,ep=8,zero=1,dtype=bf16", cfg))
    b = plan(cfg.model, parse_plan("world=8,ep=8,zero=1,dtype=bf16,pp=1", cfg))
    assert a.as_dict() == b.as_dict() and not a.pipeline
    with pytest.raises(ValueError, match="parallel.pp=3"):
        parse_plan("world=8,ep=1,zero=1,dtype=bf16,pp=3", cfg)
    with pytest.raises(ValueError, match="schedule='zb'"):
        parse_plan("world=8,ep=1,zero=1,dtype=bf16,pp=2,schedule=zb", cfg)
    with pytest.raises(ValueError, match="train.grad_accum=2"):
        parse_plan("world=8,ep=1,zero=1,dtype=bf16,pp=2,schedule=dualpipev,accum=2", cfg)
