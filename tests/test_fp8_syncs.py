"""FP8 adds no host sync (issue 29's budget, counted by tests/host_sync.py on the CPU): the experts'
weights are quantized in one pass, the 128-token tiles of the weight gradient are laid out from the
counts on the device, and each grouped GEMM takes the counts as a device tensor. So an FP8 MoE layer
on one device syncs 0 times (as bf16), and with expert parallelism once per layer (the split sizes,
as bf16). The whole-step budgets of train.py are in tests/test_host_syncs.py."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from configs.schema import FP8Config
from model.fp8_swap import apply_fp8
from model.transformer import DeepseekV3
from tests.helpers import free_port, tiny_cfg
from tests.host_sync import HostSyncs, start_ep_rank


def _model() -> DeepseekV3:
    torch.manual_seed(0)
    cfg = tiny_cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, num_nextn_predict_layers=1,
                   moe_intermediate_size=20)          # 2F = 40, F = 20: not multiples of 128 (nor of 16)
    model = DeepseekV3(cfg).train()
    apply_fp8(model, FP8Config(enabled=True, backend="emulated"))
    return model


def test_fp8_moe_layers_on_one_device_never_sync():
    """Forward and backward of an FP8 model (three MoE layers, MTP included), ~1 s."""
    model = _model()
    tokens = torch.randint(0, model.config.vocab_size, (2, 17))
    with HostSyncs() as syncs:
        model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    assert len(model.moe_layers()) == 3
    assert syncs.events == []


def _ep_fp8_worker(rank: int, world: int, port: int, out: str) -> None:
    from parallel.expert.sharding import shard_experts

    group = start_ep_rank(rank, world, port)
    found = []
    for fp8_dispatch in (False, True):
        model = _model()                              # the build order: fp8 swap, then expert sharding
        shard_experts(model, group, world, overlap=True, chunks=2, fp8_dispatch=fp8_dispatch)
        tokens = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(rank))
        with HostSyncs() as syncs:
            model(tokens[:, :-1], tokens[:, 1:]).loss.backward()
        found.append((len(model.moe_layers()), sorted(set(syncs.events)), len(syncs.events)))
    torch.save(found, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_fp8_expert_parallel_syncs_once_per_moe_layer(tmp_path):
    """parallel.ep=2 with FP8 experts (and FP8 dispatch): the split sizes only, as in bf16. ~8 s."""
    mp.spawn(_ep_fp8_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        for layers, events, n in torch.load(tmp_path / f"rank{rank}.pt", weights_only=True):
            assert n == layers == 3, events
            assert all(where.startswith("parallel/expert/dispatcher.py") for _, where in events), events
