"""Expert parallelism over real gloo process groups: 2 and 4 ranks with ep = world size
reproduce the single-process model (outputs, token counts and gradients), with overlap on
(several chunk counts) and off."""
import copy
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import free_port, tiny_cfg


def _worker(rank, world, port, chunks, overlap, fp8=False, n_group=4, topk_group=2):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed
    import torch.distributed as dist

    from model.transformer import DeepseekV3
    from parallel.engine import skip_shm_allreduce_buffers
    from parallel.expert.sharding import create_groups, shard_experts

    skip_shm_allreduce_buffers()   # no leaked /dev/shm files per test process
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    cfg = tiny_cfg(n_routed_experts=8, n_group=n_group, topk_group=topk_group, num_experts_per_tok=3,
                   num_nextn_predict_layers=1, aux_loss_alpha=0.01,
                   hidden_size=128 if fp8 else 32)   # FP8: a whole 128-channel tile per row
    ref = DeepseekV3(cfg).train()
    with torch.no_grad():
        for moe in ref.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    if fp8:
        # the oracle for FP8 dispatch: the same rows quantized to E4M3 (1x128 tiles) right where
        # they would leave the rank, gradients passed straight through
        from model.fp8 import quantize_act
        from model.moe import RoutedExperts

        for moe in ref.moe_layers():
            ex = moe.experts
            ex.forward = lambda x, c, row_weight=None, ex=ex: RoutedExperts.forward(
                ex, x + (quantize_act(x.detach()).dequantize() - x.detach()), c, row_weight)
    B, S = 4, 10
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(7))
    out_ref = ref(tokens[:, :-1], tokens[:, 1:])
    out_ref.loss.backward()

    ep_model = copy.deepcopy(ref)
    for moe in ep_model.moe_layers():
        moe.experts.__dict__.pop("forward", None)
    ep_model.zero_grad(set_to_none=True)
    for moe in ep_model.moe_layers():
        moe.tokens_per_expert.zero_()
    ep_group, _ = create_groups(world)
    dispatchers = shard_experts(ep_model, ep_group, world, overlap=overlap, chunks=chunks, fp8_dispatch=fp8)
    lo, hi = rank * B // world, (rank + 1) * B // world
    out = ep_model(tokens[lo:hi, :-1], tokens[lo:hi, 1:])
    out.loss.backward()

    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss / world, out_ref.loss.detach(), rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    El = cfg.n_routed_experts // world
    for name, p in ep_model.named_parameters():
        g = p.grad.clone()
        if getattr(p, "allreduce", True) is False:
            # the owner's expert gradient already holds every rank's tokens: scale like a DP mean
            want = ref_params[name].grad[rank * El:(rank + 1) * El]
            torch.testing.assert_close(g / world, want, rtol=1e-4, atol=1e-6, msg=name)
        else:
            dist.all_reduce(g)
            torch.testing.assert_close(g / world, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    for moe_ep, moe_ref in zip(ep_model.moe_layers(), ref.moe_layers()):
        counts = moe_ep.tokens_per_expert.clone()
        dist.all_reduce(counts)
        torch.testing.assert_close(counts, moe_ref.tokens_per_expert)
        # node-limited routing: router groups sit on whole ranks (ep | n_group) or span whole
        # "nodes" of world/n_group ranks (n_group | ep); a token reaches at most topk_group of them
        ranks_per_group = max(1, world // cfg.n_group)
        assert 0 < moe_ep.dispatcher.ranks_per_token_max <= cfg.topk_group * ranks_per_group
    if fp8:
        # E4M3 payload + one fp32 scale per 128 channels vs 2 bytes per element in bf16
        sent = sum(d.stats["dispatch_bytes"] for d in dispatchers)
        rows = sent / (cfg.hidden_size + 4 * -(-cfg.hidden_size // 128))
        assert sent <= 0.55 * rows * cfg.hidden_size * 2 + 1e-9
    # the training forward's loss never materializes logits (model/loss.py): compare them in
    # eval mode, which routes the same tokens
    ep_model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ep_model(tokens[lo:hi, :-1]).logits, ref(tokens[:, :-1]).logits[lo:hi],
                                   rtol=1e-5, atol=1e-5)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,chunks,overlap,fp8,groups", [
    (2, 1, False, False, (4, 2)), (2, 3, True, False, (4, 2)), (4, 2, True, False, (4, 2)),
    (2, 2, True, True, (4, 2)),
    (4, 2, True, False, (2, 1)),   # 2 "nodes" of 2 ranks, topk_group=1: each token stays in one node
])
def test_ep_matches_single_process(world, chunks, overlap, fp8, groups):
    mp.spawn(_worker, args=(world, free_port(), chunks, overlap, fp8, *groups), nprocs=world, join=True)


def _engine_worker(rank, world, port, stage):
    """One clipped AdamW step through deepspeed.initialize with EP = world: every parameter
    (experts as this rank's slice) must equal a single-process step on the full batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed

    from model.transformer import DeepseekV3
    from parallel.engine import FiniteAdamW, skip_shm_allreduce_buffers
    from parallel.expert.sharding import create_groups, declare_to_deepspeed, shard_experts, split_moe_param_groups

    skip_shm_allreduce_buffers()   # no leaked /dev/shm files per test process
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(0)
    cfg = tiny_cfg(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, num_nextn_predict_layers=1)
    ref = DeepseekV3(cfg).train()
    ep_model = copy.deepcopy(ref)
    B, S = 4, 10
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    ref(tokens[:, :-1], tokens[:, 1:]).loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))   # active: norm ~1.5
    opt.step()

    group, _ = create_groups(world)
    shard_experts(ep_model, group, world)
    declare_to_deepspeed(ep_model, world)
    groups = split_moe_param_groups([{"params": list(ep_model.parameters()), "weight_decay": 0.1}])
    ds = {"train_micro_batch_size_per_gpu": B // world, "gradient_accumulation_steps": 1,
          "gradient_clipping": 0.05, "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
    if stage == 0:   # what build_engine does: DeepSpeed's stage-0 clip averages per-rank norms
        opt, ds["gradient_clipping"] = FiniteAdamW(groups, max_grad_norm=0.05, lr=1e-2), 0.0
    else:
        opt = torch.optim.AdamW(groups, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=ep_model, optimizer=opt, config=ds)
    lo, hi = rank * B // world, (rank + 1) * B // world
    engine.backward(engine(tokens[lo:hi, :-1], tokens[lo:hi, 1:]).loss)
    engine.step()
    # the norm clipped with is the global one: every rank's experts and the shared weights once
    assert engine.get_global_grad_norm() == pytest.approx(ref_norm, rel=1e-5)
    El = cfg.n_routed_experts // world
    ref_params = dict(ref.named_parameters())
    for name, p in ep_model.named_parameters():
        want = ref_params[name]
        if getattr(p, "allreduce", True) is False:
            want = want[rank * El:(rank + 1) * El]
        torch.testing.assert_close(p.detach(), want.detach(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_step_with_ep_matches_single_process(stage):
    """DeepSpeed reduces non-expert gradients over all ranks, expert gradients over the
    expert-data-parallel group, and clips with the global norm (experts included)."""
    mp.spawn(_engine_worker, args=(2, free_port(), stage), nprocs=2, join=True)
