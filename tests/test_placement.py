"""Expert placement (parallel/expert/placement.py): the three placements on hand-worked cases, their bad
inputs, the load readers; then over real gloo process groups: a model whose EP ranks hold 10 and 6
(or scattered) experts computes what one process computes, trains through DeepSpeed ZeRO-1/2 like
the even placement, and its checkpoints resume under another placement."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from model.hf import weight_reader
from parallel.expert.placement import (
    build_placement,
    capacity_counts,
    capacity_placement,
    check_placement,
    ep_capacities,
    even_placement,
    load_placement,
    rank_loads,
    ranks_per_token_bound,
    read_expert_loads,
)
from parallel.state import init_from
from tests.helpers import free_port, tiny_cfg

# ---------------------------------------------------------------- placements by hand


def test_even_placement():
    assert even_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert even_placement(6, 3) == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="parallel.expert_placement=capacity"):
        even_placement(10, 4)


def test_capacity_placement_by_hand():
    # 16 x 5/8 = 10, 16 x 3/8 = 6: exact quotas
    assert capacity_placement(16, [5, 3]) == [list(range(10)), list(range(10, 16))]
    # quotas 10.67 / 5.33: floors 10 / 5, the one left goes to the larger remainder (rank 0)
    assert capacity_counts(16, [2, 1]) == [11, 5]
    # quotas 5.33 x 3: floors 5/5/5, the remainders tie: the lower rank gets it
    assert capacity_placement(16, [1, 1, 1]) == [list(range(6)), list(range(6, 11)), list(range(11, 16))]
    # quotas 0.16/0.16/0.16/15.5 -> 0/0/0/15 + 1 (largest remainder: rank 3) = 16; then ranks 0-2 each
    # take one from rank 3 (the only one above 1): at least one expert per rank
    assert capacity_counts(16, [1, 1, 1, 100]) == [1, 1, 1, 13]
    # whole router groups of 4: 4 blocks x 2/3 = 2.67 -> 3 blocks, 1 block
    assert capacity_placement(16, [2, 1], unit=4) == [list(range(12)), list(range(12, 16))]
    assert capacity_placement(8, [1, 1]) == even_placement(8, 2)       # equal capacities: the even one


def test_capacity_bad_inputs():
    with pytest.raises(ValueError, match=r"parallel.expert_placement.*n_routed_experts=3.*parallel.ep=4"):
        capacity_counts(3, [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"parallel.rank_capacity\[1\]=0"):
        capacity_counts(8, [1, 0])
    with pytest.raises(ValueError, match=r"parallel.rank_capacity\[0\]=nan"):
        capacity_counts(8, [float("nan"), 1])
    with pytest.raises(ValueError, match=r"parallel.rank_capacity\[0\]=-1"):
        build_placement("capacity", 2, 8, 2, [-1, 1])
    with pytest.raises(ValueError, match="parallel.rank_capacity=.*3 capacities for 2"):
        build_placement("capacity", 2, 8, 2, [1, 1, 1])
    with pytest.raises(ValueError, match="parallel.rank_capacity=.*not a multiple of parallel.ep=2"):
        ep_capacities([1, 1, 1], 2)
    # the slowest expert-data-parallel replica of each EP index (ranks g with g % ep == i)
    assert ep_capacities([1.0, 2.0, 0.5, 3.0], 2) == [0.5, 2.0]
    assert ep_capacities(None, 3) == [1.0, 1.0, 1.0]


LOADS = [100, 1, 1, 1, 50, 2, 2, 2, 30, 3, 3, 3, 20, 4, 4, 4]     # 230 tokens, four hot experts


def test_load_placement_by_hand():
    # equal capacities, capacity counts (8/8). LPT in decreasing load: 100 -> r0, 50, 30, 20 -> r1
    # (100/100), then the 4s, 3s, 2s, 1s to the earlier finisher (ties: more free slots), the last
    # three 1s to r0 (r1 full): 116/114; one swap (expert 13 (4) <-> 9 (3)) gives 115/115
    pl = load_placement([LOADS], [1, 1])[0]
    assert [len(ids) for ids in pl] == [8, 8]
    assert rank_loads(pl, LOADS) == [115.0, 115.0]                    # perfectly balanced
    assert pl == [[0, 1, 2, 3, 6, 9, 11, 15], [4, 5, 7, 8, 10, 12, 13, 14]]
    # capacities 2:1 -> counts 11/5; rank 0 should carry twice rank 1's tokens: 153.3 / 76.7 ideal
    pl = load_placement([LOADS], [2, 1])[0]
    assert [len(ids) for ids in pl] == [11, 5]
    assert rank_loads(pl, LOADS) == [154.0, 76.0]
    # free counts: any number per rank, at least one
    pl = load_placement([LOADS], [1, 1], counts="free")[0]
    assert rank_loads(pl, LOADS) == [115.0, 115.0]
    # one expert hotter than a rank's share: it bounds the maximum, alone on its rank
    pl = load_placement([[1000, 1, 1, 1]], [1, 1], counts="free")[0]
    assert pl == [[0], [1, 2, 3]]
    # even placement on the same loads: 159 / 71
    assert rank_loads(even_placement(16, 2), LOADS) == [159.0, 71.0]
    # per layer, and all-zero loads still fill every rank
    two = load_placement([LOADS, [0.0] * 16], [1, 1, 1, 1])
    assert len(two) == 2 and all(len(ids) == 4 for layer in two for ids in layer)


def test_load_placement_bad_inputs():
    with pytest.raises(ValueError, match="parallel.expert_load_from.*shape"):
        load_placement([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="parallel.expert_load_from.*finite"):
        load_placement([[1.0, -2.0]], [1, 1])
    with pytest.raises(ValueError, match="parallel.expert_load_from: loads of shape \\(2, 16\\).*3 MoE layers"):
        build_placement("load", 3, 16, 2, loads=[LOADS, LOADS])
    with pytest.raises(ValueError, match="parallel.expert_load_from"):
        build_placement("load", 2, 16, 2)
    with pytest.raises(ValueError, match="every rank needs at least one"):
        load_placement([[1.0, 2.0]], [1, 1, 1], counts="free")


def test_check_placement_names_the_problem():
    E = 8
    ok = check_placement([[0, 1, 2], [3, 4, 5, 6, 7]], 2, E, 2)     # one layer's lists for every layer
    assert ok == [[[0, 1, 2], [3, 4, 5, 6, 7]]] * 2
    with pytest.raises(ValueError, match="parallel.expert_placement.*EP rank 1 holds no experts"):
        check_placement([[list(range(8)), []]], 1, E, 2)
    with pytest.raises(ValueError, match="expert 3 is on two ranks"):
        check_placement([[[0, 1, 2, 3], [3, 4, 5, 6, 7]]], 1, E, 2)
    with pytest.raises(ValueError, match=r"experts \[7\] are on no rank"):
        check_placement([[[0, 1, 2, 3], [4, 5, 6]]], 1, E, 2)
    with pytest.raises(ValueError, match="placement for 1 MoE layers, the model has 2"):
        check_placement([[[0, 1, 2, 3], [4, 5, 6, 7]]], 2, E, 2)
    assert json.loads(json.dumps(build_placement("capacity", 2, 16, 2, [5, 3]))) == [
        [list(range(10)), list(range(10, 16))]] * 2                 # plain JSON


def test_node_limited_bound():
    # 4 groups of 4: even on 2 ranks keeps each group on one rank -> topk_group ranks at most
    assert ranks_per_token_bound(even_placement(16, 4), 4, 2) == 2
    # 10/6: group 2 (ids 8-11) is split, so a token picking groups 2 and x reaches both ranks
    assert ranks_per_token_bound(capacity_placement(16, [5, 3]), 4, 2) == 2
    assert ranks_per_token_bound(capacity_placement(16, [5, 3, 4, 4]), 4, 1) == 2


def test_read_expert_loads(tmp_path):
    ck = tmp_path / "step_0000010"
    ck.mkdir()
    (ck / "trainer_state.json").write_text(json.dumps({"step": 10, "expert_load": [LOADS, LOADS[::-1]]}))
    assert read_expert_loads(ck).tolist() == [LOADS, LOADS[::-1]]
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"step": 1, "loss": 3.0}, {"step": 2, "expert_load": [[1, 2], [3, 4]]},
            {"step": 3, "expert_load": [[10, 20], [30, 40]]}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert read_expert_loads(run / "metrics.jsonl").tolist() == [[11, 22], [33, 44]]
    assert read_expert_loads(run).tolist() == [[11, 22], [33, 44]]            # a run directory
    bad = [
        (tmp_path / "nowhere", "no such file"),
        (tmp_path, "neither trainer_state.json"),
    ]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "trainer_state.json").write_text(json.dumps({"step": 3}))
    bad.append((tmp_path / "old", "has no 'expert_load'"))
    (tmp_path / "m1.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    bad.append((tmp_path / "m1.jsonl", "no record with 'expert_load'"))
    (tmp_path / "m2.jsonl").write_text('{"expert_load": [[1, 2]]}\n{"expert_load": [[1, 2, 3]]}\n')
    bad.append((tmp_path / "m2.jsonl", "line 2 has 'expert_load' of shape \\(1, 3\\)"))
    (tmp_path / "m3.jsonl").write_text('{"expert_load": [1, 2]}\n')
    bad.append((tmp_path / "m3.jsonl", "shape \\(2,\\)"))
    (tmp_path / "m4.jsonl").write_text('{"expert_load": [[1, -2]]}\n')
    bad.append((tmp_path / "m4.jsonl", "negative"))
    (tmp_path / "m5.jsonl").write_text('not json\n')
    bad.append((tmp_path / "m5.jsonl", "line 1 is not JSON"))
    for path, msg in bad:
        with pytest.raises(ValueError, match=msg) as e:
            read_expert_loads(path)
        assert "parallel.expert_load_from=" in str(e.value) and str(path) in str(e.value)


# ---------------------------------------------------------------- multi-process

SCATTERED = [[1, 4, 5, 9, 12, 13, 14, 15], [0, 2, 3, 6, 7, 8, 10, 11]]   # a load-style placement (8/8, shuffled)
UNEVEN = capacity_placement(16, [5, 3])                                  # 10 / 6
MIXED = [[3, 0, 7, 8, 9, 10, 11, 12, 13, 15], [1, 2, 4, 5, 6, 14]]       # 10 / 6, unsorted, scattered


def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    import deepspeed

    from parallel.engine import skip_shm_allreduce_buffers

    torch.set_num_threads(1)
    skip_shm_allreduce_buffers()   # no leaked /dev/shm files per test process
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)


def _cfg():
    return tiny_cfg(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                    num_nextn_predict_layers=1, aux_loss_alpha=0.01)


def _forward_worker(rank, world, port):
    """Forward, backward, token counts and logits of placed EP models vs one process (the oracle)."""
    _init(rank, world, port)
    import torch.distributed as dist

    from model.transformer import DeepseekV3
    from parallel.expert.sharding import create_groups, full_state_dict, load_full_state_dict, shard_experts

    torch.manual_seed(0)
    cfg = _cfg()
    ref = DeepseekV3(cfg).train()
    with torch.no_grad():
        for moe in ref.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    B, S = 4, 10
    tokens = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(7))
    out_ref = ref(tokens[:, :-1], tokens[:, 1:])
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    group, _ = create_groups(world)
    n_moe = len(ref.moe_layers())
    for placement in (UNEVEN, SCATTERED, [MIXED] + [UNEVEN] * (n_moe - 1)):
        model = copy.deepcopy(ref)
        model.zero_grad(set_to_none=True)
        for moe in model.moe_layers():
            moe.tokens_per_expert.zero_()
        shard_experts(model, group, world, chunks=2, placement=placement)
        lo, hi = rank * B // world, (rank + 1) * B // world
        out = model(tokens[lo:hi, :-1], tokens[lo:hi, 1:])
        out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / world, out_ref.loss.detach(), rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            g = p.grad.clone()
            if getattr(p, "allreduce", True) is False:
                ids = model.get_submodule(name.rsplit(".", 1)[0]).expert_ids
                want = ref_params[name].grad[list(ids)]                  # this rank's experts, in its order
                torch.testing.assert_close(g / world, want, rtol=1e-4, atol=1e-6, msg=name)
            else:
                dist.all_reduce(g)
                torch.testing.assert_close(g / world, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        for moe, moe_ref in zip(model.moe_layers(), ref.moe_layers()):
            counts = moe.tokens_per_expert.clone()
            dist.all_reduce(counts)
            torch.testing.assert_close(counts, moe_ref.tokens_per_expert)   # by global id, whatever the placement
            bound = ranks_per_token_bound(moe.dispatcher.placement, cfg.n_group, cfg.topk_group)
            assert 0 < moe.dispatcher.ranks_per_token_max <= bound
        full = full_state_dict(model)                                    # gathered back to global order
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(full[k], v, msg=k)
        other = copy.deepcopy(ref)
        shard_experts(other, group, world, placement=placement)
        load_full_state_dict(other, full)
        for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            torch.testing.assert_close(a, b, msg=k)
        model.eval(), ref.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(tokens[lo:hi, :-1]).logits, ref(tokens[:, :-1]).logits[lo:hi],
                                       rtol=1e-5, atol=1e-5)
        ref.train()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_placed_experts_match_single_process():
    """10/6 contiguous, 8/8 scattered, and a per-layer mix (10/6 unsorted in the first MoE layer)."""
    mp.spawn(_forward_worker, args=(2, free_port()), nprocs=2, join=True)


STEPS, SAVE_AT = 10, 5


def _batches(cfg, world, rank, steps, B=4, S=12):
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(steps):
        t = torch.randint(0, cfg.vocab_size, (B, S + 1), generator=g)
        lo, hi = rank * B // world, (rank + 1) * B // world
        out.append((t[lo:hi, :-1], t[lo:hi, 1:]))
    return out


def _engine(base, cfg, world, ep, stage, placement, bucket):
    import deepspeed

    from parallel.engine import param_groups
    from parallel.expert.sharding import create_groups, declare_to_deepspeed, shard_experts, split_moe_param_groups

    model = copy.deepcopy(base)
    group, _ = create_groups(ep)
    shard_experts(model, group, ep, placement=placement)
    declare_to_deepspeed(model, ep)
    groups = split_moe_param_groups(param_groups(model, 0.1))
    ds = {"train_micro_batch_size_per_gpu": 4 // world, "gradient_accumulation_steps": 1, "gradient_clipping": 0.5,
          "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket},
          "steps_per_print": 10 ** 9}
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    engine.optimizer.check_grad_overflow = True
    return engine


def _train(engine, batches, start, stop):
    """Steps [start, stop): losses and gradient norms, all-reduced over the world."""
    import torch.distributed as dist

    from parallel.balance import gather_counts, update_biases

    out = []
    moes = engine.module.moe_layers()
    for x, y in batches[start:stop]:
        loss = engine(x, y).loss
        engine.backward(loss)
        engine.step()
        update_biases(moes, gather_counts(moes), 0.01)
        total = loss.detach().clone()
        dist.all_reduce(total)
        out.append((float(total) / dist.get_world_size(), float(engine.get_global_grad_norm())))
    return out


def _close(a, b, what, rel=1e-5):
    for i, ((la, na), (lb, nb)) in enumerate(zip(a, b)):
        assert lb == pytest.approx(la, rel=rel), f"{what}: loss of step {i}: {la} vs {lb}"
        assert nb == pytest.approx(na, rel=10 * rel), f"{what}: grad norm of step {i}: {na} vs {nb}"


def _train_worker(rank, world, port, ep, stage, tmp, full):
    """Even vs 10/6 over STEPS AdamW steps through DeepSpeed; saves at SAVE_AT under one placement
    and resumes under another. ``full``: 10/6 contiguous and 10/6 scattered (MIXED), resumes in a
    cycle, init_from; else MIXED only (uneven sizes and scattered ids in one), resumes both ways.

    The reduce bucket (8000 elements) lies between the two ranks' sizes of a stacked expert tensor
    (10 x 1024 and 6 x 1024 for w_gate_up), so without parallel.expert.sharding.align_zero_buckets
    the ranks flush different dense gradients under ZeRO-2 and gloo aborts ("Received data size
    doesn't match expected size", measured)."""
    _init(rank, world, port)
    import torch.distributed as dist

    from model.transformer import DeepseekV3
    from parallel.state import checkpoint

    torch.manual_seed(0)
    cfg = _cfg()
    base = DeepseekV3(cfg).train()
    steps, save_at = (STEPS, SAVE_AT) if full else (6, 3)             # world 4: fewer steps, same checks
    batches = _batches(cfg, world, rank, steps)
    bucket = 8000
    meta = {"config": {"model": cfg.to_dict(), "train": {"dtype": "fp32"}}}
    runs, paths = {}, {}
    second = UNEVEN if full else MIXED
    for name, placement in (("even", None), ("uneven", second), ("mixed", MIXED))[:3 if full else 2]:
        engine = _engine(base, cfg, world, ep, stage, placement, bucket)
        first = _train(engine, batches, 0, save_at)
        paths[name] = checkpoint.save(engine, str(tmp / name), save_at, meta, keep_last=1)
        runs[name] = first + _train(engine, batches, save_at, steps)
    _close(runs["even"], runs["uneven"], "10/6 vs even")
    state = checkpoint.read_state(paths["uneven"])
    assert state["expert_placement"] == [second] * 3                   # 2 MoE layers + MTP's
    moves = [("uneven", "even", None), ("even", "uneven", second)]
    if full:
        _close(runs["even"], runs["mixed"], "scattered 10/6 vs even")
        moves = [("uneven", "even", None), ("even", "mixed", MIXED), ("mixed", "uneven", UNEVEN)]
    for src, dst, placement in moves:                                 # resume across placements
        engine = _engine(base, cfg, world, ep, stage, placement, bucket)
        checkpoint.load(engine, paths[src], checkpoint.read_state(paths[src]))
        _close(runs[src][save_at:], _train(engine, batches, save_at, steps), f"{src} -> {dst}")
    # one copy of every expert on disk, whatever the placement; the weights read back by global id
    if not full:
        dist.barrier()
        dist.destroy_process_group()
        return
    if rank == 0:
        w_even, w_mixed = weight_reader.read_weights(paths["even"]), weight_reader.read_weights(paths["mixed"])
        assert w_even.keys() == w_mixed.keys()
        for k in w_even:   # 5 AdamW steps (lr 3e-3) apart from the even run only by fp32 summation order
            torch.testing.assert_close(w_mixed[k], w_even[k], rtol=1e-4, atol=1e-5, msg=k)
    # train.init_from under a scattered placement reads each rank's experts by global id
    from parallel.expert.sharding import create_groups, shard_experts

    model = copy.deepcopy(base)
    group, _ = create_groups(ep)
    shard_experts(model, group, ep, placement=MIXED)
    init_from.load_init_weights(model, paths["even"])
    full = weight_reader.read_weights(paths["even"])
    for name, p in model.named_parameters():
        want = full[name]
        if getattr(p, "allreduce", True) is False:
            want = want[list(model.get_submodule(name.rsplit(".", 1)[0]).expert_ids)]
        torch.testing.assert_close(p.detach(), want, msg=name)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_uneven_placement_trains_and_resumes_like_even(tmp_path):
    """world 2 / ep 2 under ZeRO-1: 10/6 and scattered vs even, resumes 10/6 -> even -> scattered
    -> 10/6, init_from and the export under a scattered placement."""
    mp.spawn(_train_worker, args=(2, free_port(), 2, 1, tmp_path, True), nprocs=2, join=True)
    from parallel.state import checkpoint

    # the export streams from a checkpoint written under an uneven, scattered placement
    from scripts.export_hf import export
    export(str(checkpoint.complete_checkpoints(str(tmp_path / "mixed"))[-1]), str(tmp_path / "hf"))
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_uneven_placement_with_expert_data_parallel_zero2(tmp_path):
    """world 4 / ep 2 (expert-data-parallel pairs {0,2}, {1,3}) under ZeRO-2, whose partitions cut the
    scattered experts' runs: 10/6 scattered vs even over 6 steps, and resumes at 3 both ways."""
    mp.spawn(_train_worker, args=(4, free_port(), 2, 2, tmp_path, False), nprocs=4, join=True)
