"""Host syncs on a budget (tests/host_sync.py counts them on the CPU): none in a MoE layer on one
device, one per MoE layer and micro-step with expert parallelism (the all-to-all split sizes),
and the rank clock synchronises the device only in steps whose times it measures."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from model.transformer import DeepseekV3
from tests.helpers import free_port, tiny_cfg
from tests.host_sync import HostSyncs


def _cfg():
    return tiny_cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, num_nextn_predict_layers=1)


def test_counter_sees_what_would_sync():
    x = torch.tensor([1, 0, 2])
    with HostSyncs() as syncs:
        from model.moe import permute  # noqa: F401  (imported outside the counted calls below)
        x.tolist()
    assert syncs.events == []           # a call from a test file is not the project's
    import model.flops as flops_module
    code = compile("def f(x):\n    x.tolist(); x.nonzero(); bool(x.sum()); x.repeat_interleave(x); x.cpu()\n",
                   flops_module.__file__, "exec")        # as if written in model/flops.py
    scope: dict = {}
    exec(code, scope)
    with HostSyncs() as syncs:
        scope["f"](x)
    assert [k for k, _ in syncs.events] == ["tolist", "nonzero", "_local_scalar_dense",
                                            "repeat_interleave without output_size", "cpu"]


def test_moe_layers_on_one_device_never_sync():
    torch.manual_seed(0)
    cfg = _cfg()
    model = DeepseekV3(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, 17))
    with HostSyncs() as syncs:
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert len(model.moe_layers()) == 3
    assert syncs.events == []


def _ep_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from parallel.engine import skip_shm_allreduce_buffers
    from parallel.expert.sharding import create_groups, shard_experts

    torch.set_num_threads(1)
    skip_shm_allreduce_buffers()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    group, _ = create_groups(world)
    found = []
    for overlap, chunks in ((True, 2), (True, 3), (False, 1)):
        torch.manual_seed(0)
        cfg = _cfg()
        model = DeepseekV3(cfg).train()
        shard_experts(model, group, world, overlap=overlap, chunks=chunks)
        tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
        with HostSyncs() as syncs:
            model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        found.append((len(model.moe_layers()), sorted(set(syncs.events)), len(syncs.events)))
    torch.save(found, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_expert_parallel_syncs_once_per_moe_layer(tmp_path):
    """The split sizes of every chunk's all-to-all come to the host in one read per layer; the
    regrouping of received rows knows its length from them (repeat_interleave's output_size)."""
    mp.spawn(_ep_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for layers, events, n in torch.load(tmp_path / f"rank{rank}.pt", weights_only=True):
            assert n == layers == 3, events
            assert {kind for kind, _ in events} == {"tolist"}
            assert all(where.startswith("parallel/expert/dispatcher.py") for _, where in events)


def test_rank_clock_synchronises_only_while_it_measures():
    from parallel.unequal.clock import RankClock

    engine = SimpleNamespace(allreduce_gradients=lambda *a, **k: None)
    dispatchers = [SimpleNamespace(wait_s=0.0, on_sync=None) for _ in range(3)]
    clock = RankClock(engine, dispatchers, device=torch.device("cuda"))    # only its device type is read
    measuring = [False]
    clock.measuring = lambda: measuring[0]

    def micro_step() -> int:
        with HostSyncs() as syncs:
            clock.micro_start()
            for d in dispatchers:       # each all-to-all wait of the layers
                d.on_sync()
            engine.allreduce_gradients()
        return sum(1 for kind, _ in syncs.events if kind == "cuda.synchronize")

    assert micro_step() == 0                    # an ordinary step: the overlap is left alone
    measuring[0] = True
    assert micro_step() == 1 + len(dispatchers) + 1   # start, every wait, the gradient reduction
