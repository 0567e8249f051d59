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
from tests.host_sync import HostSyncs, start_ep_rank


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
    from parallel.expert.sharding import shard_experts

    group = start_ep_rank(rank, world, port)
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


# ---- the whole step: train.py counted in a forked process ----------------------------------------

def _counted_train(argv: list[str], env: dict[str, str], out_json: str, log: str) -> None:
    """In a process forked from the preloaded server (tests/train_helpers.py): train.py's ``main`` under
    HostSyncs. The events of each step, from one ``train_step`` call to the next (so the step's
    logging, evaluation and saving are in it), are written to ``out_json``."""
    import json
    import sys
    import traceback
    from pathlib import Path

    from tests.train_helpers import ROOT

    os.chdir(ROOT)
    os.environ.clear()
    os.environ.update(env)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    import train

    syncs, marks, step = HostSyncs(), [], train.Trainer.train_step

    def marked(self: train.Trainer, n: int):  # noqa: ANN202
        marks.append(len(syncs.events))
        return step(self, n)

    train.Trainer.train_step = marked
    code = 0
    try:
        with syncs:
            train.main(argv)
    except BaseException:  # noqa: BLE001 - the log says what; the exit code fails the test
        traceback.print_exc()
        code = 1
    marks.append(len(syncs.events))
    Path(out_json).write_text(json.dumps([syncs.events[a:b] for a, b in zip(marks, marks[1:])]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


STEPS = 5   # steps 1 and 5 log (and 5 saves); 2-4 are ordinary steps


def _steps_of_train_py(tmp_path, ranks: int, extra: list[str]) -> list[list[list[tuple[str, str]]]]:
    """Per rank, per step: the host syncs of a short train.py run (tiny model, ZeRO-1) on ``ranks`` ranks."""
    import json

    from tests.train_helpers import _context, _wait, clean_env, launcher_env, make_corpus, rank_env, run_args

    args = run_args(tmp_path, make_corpus(tmp_path), extra=[
        f"train.max_steps={STEPS}", "train.log_every=100", "train.eval_every=100", "train.save_every=100",
        *extra])
    env = launcher_env(ranks) if ranks > 1 else clean_env()   # what spawn_ranks gives each rank
    procs = []
    for r in range(ranks):
        argv = [f"--local_rank={r}", *args] if ranks > 1 else args
        procs.append(_context().Process(target=_counted_train, daemon=False, args=(
            argv, rank_env(env, r) if ranks > 1 else env, str(tmp_path / f"syncs{r}.json"),
            str(tmp_path / f"log{r}.txt"))))
        procs[-1].start()
    code = _wait(procs, 300)
    logs = "\n".join((tmp_path / f"log{r}.txt").read_text()[-3000:] for r in range(ranks))
    assert code == 0, logs
    found = [json.loads((tmp_path / f"syncs{r}.json").read_text()) for r in range(ranks)]
    assert all(len(steps) == STEPS for steps in found), logs
    return found


def _ordinary(steps: list[list[list[str]]]) -> list[list[tuple[str, str]]]:
    """The steps that neither log nor save (2 .. STEPS-1), each as (kind, where) events."""
    return [[tuple(e) for e in events] for events in steps[1:-1]]


def test_a_bf16_step_syncs_at_most_twice(tmp_path):
    """train.py on one rank, bf16, 2 micro-steps: outside logging steps the host waits for the device at
    most twice per step (DeepSpeed's verdict on the global gradient norm, and the ranks' agreement on
    stopping and skipping); losses, counts and the norm are read at logging steps. ~6 s."""
    steps = _steps_of_train_py(tmp_path, 1, ["train.dtype=bf16", "train.grad_accum=2"])[0]
    for n, events in enumerate(_ordinary(steps), start=2):
        assert len(events) <= 2, f"step {n}: {events}"
    assert len(steps[-1]) > 2, steps[-1]    # the record reads what the steps kept on the device


def test_a_zero0_fp32_step_syncs_at_most_twice(tmp_path):
    """ZeRO stage 0 in fp32 steps through the trainer's FiniteAdamW (parallel/engine.py): one read of the
    all-reduced finiteness flag, the clipping factor on the device; with the agreement, 2. ~6 s."""
    steps = _steps_of_train_py(tmp_path, 1, ["deepspeed.zero_optimization.stage=0"])[0]
    for n, events in enumerate(_ordinary(steps), start=2):
        assert len(events) <= 2, f"step {n}: {events}"
    assert len(steps[-1]) > 2, steps[-1]


@pytest.mark.slow
def test_an_expert_parallel_step_syncs_at_most_twice_beside_the_split_sizes(tmp_path):
    """parallel.ep=2 on 2 ranks (fp32, ZeRO-1): besides the all-to-all split sizes (one read per MoE
    layer and micro-step, the budget above) at most 2 host syncs per ordinary step on each rank. ~10 s."""
    from configs.schema import load_config
    from model.memory_plan import moe_layer_count
    from tests.train_helpers import TINY_MODEL

    moe_layers = moe_layer_count(load_config(None, TINY_MODEL).model)
    for rank, steps in enumerate(_steps_of_train_py(tmp_path, 2, ["parallel.ep=2"])):
        for n, events in enumerate(_ordinary(steps), start=2):
            split_sizes = [e for e in events if e[1].startswith("parallel/expert/dispatcher.py")]
            rest = [e for e in events if e not in split_sizes]
            assert len(split_sizes) == moe_layers, f"rank {rank} step {n}: {events}"
            assert len(rest) <= 2, f"rank {rank} step {n}: {rest}"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_a_pipeline_step_syncs_at_most_twice(tmp_path, schedule):
    """parallel.pp=2 on 2 ranks (fp32, ZeRO-1, 4 micro-batches): the pipelined step keeps its loss parts, router
    counts and gradient norm on the device as train.py's step does, so each rank of each stage makes at most 2
    host syncs per ordinary step. DualPipeV's pairs run in turn here: the counter is a dispatch mode, which a
    helper thread (the overlapped pairs) would not see. ~15 s each."""
    steps_per_rank = _steps_of_train_py(tmp_path, 2, [
        "parallel.pp=2", f"parallel.pp_schedule={schedule}", "parallel.pp_overlap=false", "model.num_hidden_layers=4",
        "train.micro_batch_size=1", "train.grad_accum=4", "train.eval_batches=0"])
    for rank, steps in enumerate(steps_per_rank):
        for n, events in enumerate(_ordinary(steps), start=2):
            assert len(events) <= 2, f"rank {rank} step {n}: {events}"
        assert len(steps[-1]) > 2, steps[-1]    # the record reads what the steps kept on the device


def test_bf16_nan_step_is_still_skipped_with_one_read(tmp_path):
    """The single read of DeepSpeed's step (parallel/overflow.py) still skips a non-finite step in bf16
    under ZeRO-1: the state after the skipped step 2 is step 1's, byte for byte, and step 3 trains. ~8 s."""
    from parallel.state import checkpoint
    from tests.train_helpers import make_corpus, metrics, run_args, train

    out = tmp_path / "run"
    p = train(run_args(tmp_path, make_corpus(tmp_path), "run", [
        "train.max_steps=3", "train.save_every=1", "train.keep_last=5", "train.dtype=bf16"]),
        env={"MOE_FAULTS": "nan_loss@2"})
    rec = {r["step"]: r for r in metrics(out)}
    assert [s for s in rec if rec[s]["skipped"]] == [2] and rec[3]["skipped_steps"] == 1, p.stdout[-2000:]
    assert rec[1]["grad_norm"] > 0 and rec[3]["grad_norm"] > 0
    c1, c2, c3 = (out / "checkpoints" / checkpoint.checkpoint_name(s) / checkpoint.SHARDS / "shard-00000.safetensors"
                  for s in (1, 2, 3))
    assert c1.read_bytes() == c2.read_bytes() != c3.read_bytes()
