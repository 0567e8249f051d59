"""The pipeline's memory plan (model/pipeline_plan.py through parallel/layout.py's --plan): every parameter on
exactly one pipeline rank, the schedules' in-flight micro-batches, and pp=1 unchanged. No processes; ~2 s."""
from __future__ import annotations

import pytest

from configs.schema import load_config
from model.memory_plan import params, plan
from model.pipeline_plan import in_flight
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


def test_in_flight_micro_batches():
    assert [in_flight("1f1b", 4, 8, r) for r in range(4)] == [{0: 4}, {1: 3}, {2: 2}, {3: 1}]
    assert in_flight("1f1b", 4, 2, 0) == {0: 2}                        # never more than the step has
    assert in_flight("dualpipev", 4, 8, 0) == {0: 7, 7: 1}             # rank 0 runs stages 0 and 7
    assert in_flight("dualpipev", 4, 8, 3) == {3: 4, 4: 4}
    assert in_flight("interleaved", 2, 8, 0) == {0: 3, 2: 2}       # warm-up 2(P-1) + P, + 1


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
