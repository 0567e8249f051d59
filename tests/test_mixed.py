"""Ranks of unequal speed (parallel/unequal/shares.py, parallel/unequal/clock.py): unequal shares of the same
global batch give the equal split's update; the sampler still visits every row once per epoch;
auto's measured shares survive a resume; bad capacities fail naming the field."""
from __future__ import annotations

import numpy as np
import pytest

from configs.schema import load_config
from data import ShardedSampler
from parallel.expert.placement import capacity_counts
from parallel.state import checkpoint
from parallel.unequal.shares import Shares, apportion, check_capacity, initial_shares
from tests.train_helpers import make_corpus, metrics, run_args, spawn_ranks, train

# ---------------------------------------------------------------- shares (no processes)


def test_apportion_by_capacity_in_whole_micro_steps():
    # 12 rows, 2:1 -> 8 and 4
    assert apportion(12, [2.0, 1.0], 1) == [8, 4]
    # 3 ranks 1:1:1 of 10 units: largest remainder, ties to the lower rank -> 4, 3, 3
    assert apportion(10, [1, 1, 1], 1) == [4, 3, 3]
    # grad_accum 2: 16 rows = 8 units, capacities 0.5/0.3/0.2 -> quotas 4, 2.4, 1.6 -> 4, 2, 2 units
    assert apportion(16, [0.5, 0.3, 0.2], 2) == [8, 4, 4]
    # equal capacities reproduce the equal split
    assert apportion(24, [1.0] * 4, 3) == [6] * 4


def test_share_weights_make_the_global_mean():
    s = Shares([8, 4], grad_accum=2)
    assert s.micro(0) == 4 and s.micro(1) == 2
    # (1/W) sum_r w_r * mean_r = sum_r n_r/B * mean_r
    means = [2.0, 5.0]
    assert np.isclose(sum(s.weight(r) * m for r, m in enumerate(means)) / 2, (8 * 2.0 + 4 * 5.0) / 12)
    assert Shares([3, 3], 1).weight(0) == 1.0


def test_too_small_share_is_an_error_naming_the_rank():
    with pytest.raises(ValueError, match=r"parallel.rank_capacity\[1\]=0.01.*less than one full micro-batch"):
        apportion(8, [1.0, 0.01], 2)
    # auto's measured capacities never stop the run: the rank keeps one row per micro-step
    assert apportion(8, [1.0, 0.01], 2, strict=False) == [6, 2]


def test_capacity_checks_against_the_world():
    cfg = load_config(None, ["parallel.rank_capacity=[1.0, 0.5, 0.5]"])
    with pytest.raises(ValueError, match=r"parallel.rank_capacity has 3 entries.*world has 2 ranks"):
        check_capacity(cfg, 2)
    check_capacity(cfg, 3)
    cfg = load_config(None, ["parallel.rank_capacity=[1, 0.001]", "train.micro_batch_size=2"])
    with pytest.raises(ValueError, match=r"parallel.rank_capacity\[1\]=0.001"):
        check_capacity(cfg, 2)
    cfg = load_config(None, ["parallel.sites=2", "parallel.ep=2", "parallel.expert_placement=load"])
    with pytest.raises(ValueError, match="expert_placement=load with parallel.sites=2"):
        check_capacity(cfg, 4)
    cfg = load_config(None, ["parallel.emulate_slowdown={3: 2.0}"])
    with pytest.raises(ValueError, match="emulate_slowdown: rank 3 does not exist"):
        check_capacity(cfg, 2)
    for bad, msg in (("[1, 0]", r"rank_capacity\[1\]=0"), ("[1, -2]", r"rank_capacity\[1\]=-2"),
                     ("[1, .inf]", r"rank_capacity\[1\]=inf"), ("fast", "expected null, 'auto' or a list")):
        with pytest.raises(ValueError, match=msg):
            load_config(None, [f"parallel.rank_capacity={bad}"])


def test_initial_shares_keep_auto_measurement_on_resume():
    cfg = load_config(None, ["parallel.rank_capacity=auto", "train.micro_batch_size=3"])
    assert initial_shares(cfg, 2).rows == [3, 3]
    saved = Shares([4, 2], 1, measured=True).state_dict()
    assert initial_shares(cfg, 2, saved).rows == [4, 2]
    # a saved measurement for another global batch is not reused
    assert initial_shares(cfg, 2, Shares([6, 2], 1, measured=True).state_dict()).rows == [3, 3]


def test_sampler_unequal_shares_cover_the_same_global_batches():
    num_rows, steps = 103, 40                      # 103 // 6: 17 steps per epoch, rollovers included
    one = [ShardedSampler(num_rows, 6, 0, 1, seed=5) for _ in range(1)][0]
    ref = [one.next_batch() for _ in range(steps)]
    ranks = [ShardedSampler(num_rows, 3, r, 2, seed=5) for r in range(2)]
    for s in ranks:
        s.set_shares([4, 2])
    got = [[s.next_batch() for _ in range(steps)] for s in ranks]
    for step in range(steps):
        assert len(got[0][step]) == 4 and len(got[1][step]) == 2
        np.testing.assert_array_equal(np.concatenate([got[0][step], got[1][step]]), ref[step])
    epoch0 = np.concatenate([np.concatenate([got[0][i], got[1][i]]) for i in range(17)])
    assert len(set(epoch0.tolist())) == 17 * 6      # every row of the epoch exactly once
    with pytest.raises(ValueError, match="summing to the global batch of 6"):
        ranks[0].set_shares([4, 1])


# ---------------------------------------------------------------- real runs

STEPS = 10
COMMON = [f"train.max_steps={STEPS}", "train.micro_batch_size=3", "train.grad_clip=0.05", "parallel.ep=2",
          "train.keep_last=3"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    corpus = make_corpus(root)
    spawn_ranks(2, run_args(root, corpus, "equal", COMMON + ["train.save_every=100"]))
    return root, corpus, metrics(root / "equal")


@pytest.mark.slow
def test_shares_and_placement_keep_the_equal_split_update_through_reshards(runs):
    """One chain of runs on 2 EP ranks, each against the equal split with the even placement (the
    oracle), clipping active throughout:
    A. shares 4 and 2 rows of a 6-row global batch (loss weights 4/3, 2/3) and experts 10 and 6 of
       16 (rank_capacity=[10, 6], expert_placement=capacity): losses within 1e-5 over 10 steps;
    B. resume A's step 4 with rank_capacity=auto, rank 1 emulated at half speed and
       expert_placement=capacity: a reshard from 10/6 to even experts (no measurement yet), the
       probe fixes the shares after step 7; within 1e-5 of the oracle;
    C. resume B's step 8 with the same shares and placement: steps 9-10 bit-exact with B's;
    D. resume B's step 8 with capacity placement, now by auto's measured shares (a second reshard):
       within 1e-5."""
    root, corpus, ref = runs
    assert all(r["grad_norm"] > 0.05 for r in ref)

    def close(got, first):
        assert [r["step"] for r in got] == list(range(first, STEPS + 1))
        for a in got:
            b = ref[a["step"] - 1]
            assert _rel(a["loss"], b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
            assert _rel(a["grad_norm"], b["grad_norm"]) < 1e-4, (a["step"], a["grad_norm"], b["grad_norm"])

    a = COMMON + ["train.save_every=4", "parallel.rank_capacity=[10, 6]", "parallel.expert_placement=capacity"]
    spawn_ranks(2, run_args(root, corpus, "A", a))
    got = metrics(root / "A")
    close(got, 1)
    assert all(r["rank_share"] == [pytest.approx(2 / 3, abs=1e-6), pytest.approx(1 / 3, abs=1e-6)] for r in got)
    assert all(len(r["rank_step_s"]) == len(r["rank_busy_s"]) == len(r["rank_wait_s"]) == 2 for r in got)
    # the routed-token counts are the same tokens, whatever the split and the placement
    assert [r["expert_load"] for r in got] == [r["expert_load"] for r in ref]
    a4 = checkpoint.complete_checkpoints(str(root / "A"))[0]
    assert checkpoint.read_state(a4)["expert_placement"][0] == [list(range(10)), list(range(10, 16))]

    auto = COMMON + ["train.save_every=4", "parallel.rank_capacity=auto", "parallel.capacity_probe_steps=3",
                     "parallel.emulate_slowdown={1: 2.0}"]
    p = spawn_ranks(2, run_args(root, corpus, "B", auto + ["parallel.expert_placement=capacity", f"train.resume={a4}"]))
    assert "EMULATED SLOWDOWN x2.0" in p.stdout + p.stderr
    b_run = metrics(root / "B")
    close(b_run, 5)
    assert all(r["emulated_slowdown"] == {"1": 2.0} for r in b_run)
    b8 = [c for c in checkpoint.complete_checkpoints(str(root / "B")) if c.name.endswith("8")][0]
    state = checkpoint.read_state(b8)
    assert state["expert_placement"][0] == [list(range(8)), list(range(8, 16))]      # even until measured
    saved = state["shares"]
    assert saved["measured"] and sum(saved["rows"]) == 6 and min(saved["rows"]) >= 1
    assert b_run[-1]["rank_share"] == [pytest.approx(n / 6, abs=1e-6) for n in saved["rows"]]

    spawn_ranks(2, run_args(root, corpus, "C", auto + [f"train.resume={b8}"]))
    assert [r["loss"] for r in metrics(root / "C")] == [r["loss"] for r in b_run[4:]]

    spawn_ranks(2, run_args(root, corpus, "D", auto + ["parallel.expert_placement=capacity", f"train.resume={b8}"]))
    close(metrics(root / "D"), 9)
    counts = [len(ids) for ids in checkpoint.read_state(checkpoint.complete_checkpoints(str(root / "D"))[-1])
              ["expert_placement"][0]]
    assert counts == capacity_counts(16, saved["rows"])      # experts in proportion to the measured shares


def test_wrong_capacity_length_fails_before_any_process_group(tmp_path):
    corpus = make_corpus(tmp_path)
    p = train(run_args(tmp_path, corpus, "bad", ["train.max_steps=1", "parallel.rank_capacity=[1.0, 0.5]"]),
              check=False)
    assert p.returncode == 2
    assert "parallel.rank_capacity has 2 entries" in p.stderr and "world has 1 ranks" in p.stderr
