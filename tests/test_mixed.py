"""Ranks of unequal speed (parallel/shares.py, parallel/rank_clock.py): unequal shares of the same
global batch give the equal split's update; the sampler still visits every row once per epoch;
auto's measured shares survive a resume; bad capacities fail naming the field."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from configs.schema import load_config
from data import ShardedSampler
from parallel import checkpoint
from parallel.shares import Shares, apportion, check_capacity, initial_shares
from tests.train_helpers import launch, make_corpus, metrics, run_args, train

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
COMMON = [f"train.max_steps={STEPS}", "train.micro_batch_size=3", "train.grad_clip=0.05", "parallel.ep=2"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    root = tmp_path_factory.mktemp("mixed")
    corpus = make_corpus(root)
    launch(2, run_args(root, corpus, "equal", COMMON + ["train.save_every=100"]))
    return root, corpus, metrics(root / "equal")


@pytest.mark.slow
def test_two_thirds_one_third_equals_equal_split(runs):
    """2 EP ranks, shares 4 and 2 rows of a 6-row global batch (loss weights 4/3 and 2/3) against
    3 and 3: the same losses within 1e-5 relative over 10 steps, clipping active throughout."""
    root, corpus, ref = runs
    launch(2, run_args(root, corpus, "shares", COMMON + ["train.save_every=100", "parallel.rank_capacity=[2, 1]"]))
    got = metrics(root / "shares")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert all(r["grad_norm"] > 0.05 for r in ref)
    for a, b in zip(got, ref):
        assert _rel(a["loss"], b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert _rel(a["grad_norm"], b["grad_norm"]) < 1e-4, (a["step"], a["grad_norm"], b["grad_norm"])
        assert a["rank_share"] == [pytest.approx(2 / 3, abs=1e-6), pytest.approx(1 / 3, abs=1e-6)]
        assert len(a["rank_step_s"]) == len(a["rank_busy_s"]) == len(a["rank_wait_s"]) == 2
    # the routed-token counts are the same tokens, whatever the split
    assert [r["expert_load"] for r in got] == [r["expert_load"] for r in ref]


@pytest.mark.slow
def test_auto_shares_with_slow_rank_keep_the_update_and_resume_exactly(runs):
    """auto + an emulated half-speed rank: the shares are fixed after the probe (whatever they are,
    the losses stay the equal split's), saved in the checkpoint, and a resume from step 5
    continues bit-exactly with them."""
    root, corpus, ref = runs
    extra = ["parallel.rank_capacity=auto", "parallel.capacity_probe_steps=3", "parallel.emulate_slowdown={1: 2.0}",
             "train.save_every=5"]
    p = launch(2, run_args(root, corpus, "auto", COMMON + extra))
    assert "EMULATED SLOWDOWN x2.0" in p.stdout + p.stderr
    got = metrics(root / "auto")
    for a, b in zip(got, ref):
        assert _rel(a["loss"], b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert a["emulated_slowdown"] == {"1": 2.0}
    ck5 = checkpoint.complete_checkpoints(str(root / "auto"))[0]          # step 5
    saved = checkpoint.read_state(ck5)["shares"]
    assert saved["measured"] and sum(saved["rows"]) == 6 and min(saved["rows"]) >= 1
    assert got[-1]["rank_share"] == [pytest.approx(n / 6, abs=1e-6) for n in saved["rows"]]
    # resume from step 5 into a new directory: the same shares, the same steps 6-10 to the bit
    launch(2, run_args(root, corpus, "auto_resumed", COMMON + extra + [f"train.resume={ck5}"]))
    again = metrics(root / "auto_resumed")
    assert [r["step"] for r in again] == list(range(6, STEPS + 1))
    assert [r["loss"] for r in again] == [r["loss"] for r in got[5:]]


def test_wrong_capacity_length_fails_before_any_process_group(tmp_path):
    corpus = make_corpus(tmp_path)
    p = train(run_args(tmp_path, corpus, "bad", ["train.max_steps=1", "parallel.rank_capacity=[1.0, 0.5]"]),
              check=False)
    assert p.returncode == 2
    assert "parallel.rank_capacity has 2 entries" in p.stderr and "world has 1 ranks" in p.stderr
