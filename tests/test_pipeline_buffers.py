"""torch's pipeline receive buffers (parallel/pipeline/schedule.py, ``release_receives``): torch allocates one
per micro-batch for every stage input and output gradient that arrives from another rank and keeps all M from
step to step. Here they exist only from the receive to the end of the micro-batch's backward (input half), so a
rank holds none between steps and, inside a step, fewer than the M per boundary torch kept. Real train.py runs
on 2 gloo ranks, the buffers read from the rank's own stage objects at every chunk boundary. The last stage's
per-micro-batch losses, which torch's schedule keeps to the step's end, are detached once their backward has run:
their graph's AccumulateGrad nodes would keep every received input alive (1 MiB a micro-batch at 2 x 256 tokens,
benchmarks/results/pipeline.md)."""
from __future__ import annotations

import json
import os

import pytest

from tests.train_helpers import make_corpus, run_args, spawn_each

M, STEPS, MBS, SEQ, HIDDEN = 8, 3, 1, 32, 64       # tests/train_helpers.py's TINY_MODEL is 64 wide


def _held(stages: list) -> int:
    """Bytes of receive buffers this rank's stages hold right now."""
    return sum(i.buffer.nbytes for st in stages for recs in (st.args_recv_info, st.grad_recv_info)
               for infos in recs.values() for i in infos if not i.is_root_arg and i.buffer is not None)


def _record_buffers() -> None:
    """In a forked rank, before train.py: this rank's receive buffers sampled at the start of every step and of
    every forward and backward chunk; per step [start, max, graphs kept by the schedule's losses after their
    backward], rewritten after each step to $HELD_DIR/held{RANK}.json."""
    from parallel.pipeline import schedule
    from parallel.pipeline.step import Pipeline

    stages, steps = [], []
    real_release, real_run = schedule.release_receives, Pipeline.run_micro_batches

    def sample(fn, losses: list | None = None):  # noqa: ANN001, ANN202
        def run(mb: int, *a, **k):  # noqa: ANN002, ANN003, ANN202
            steps[-1][1] = max(steps[-1][1], _held(stages))
            out = fn(mb, *a, **k)
            if losses is not None:     # the last stage: losses whose backward ran and still hold their graph
                steps[-1][2] += sum(loss.grad_fn is not None for loss in losses[:mb + 1])
            return out
        return run

    def release(sts: list, losses: list) -> None:
        real_release(sts, losses)
        stages.extend(sts)
        for st in sts:
            st.forward_one_chunk = sample(st.forward_one_chunk)
            st.backward_one_chunk = sample(st.backward_one_chunk, losses if st.is_last else None)

    def run_micro_batches(self, *args):  # noqa: ANN001, ANN002, ANN202
        held = _held(stages)
        steps.append([held, held, 0])
        out = real_run(self, *args)
        with open(f"{os.environ['HELD_DIR']}/held{os.environ['RANK']}.json", "w") as f:
            json.dump(steps, f)
        return out

    schedule.release_receives, Pipeline.run_micro_batches = release, run_micro_batches


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_a_rank_holds_no_receive_buffers_between_steps(tmp_path, schedule):
    """pp=2 on 2 ranks, M = 8 micro-batches of 1 x 32 tokens, one MTP depth (each boundary tensor 32 KiB, two per
    micro-batch: 8 KiB each, 16 KiB a micro-batch). torch kept M per boundary that crosses ranks: 8 x 16 KiB on each
    rank (1F1B), 16 x 16 KiB (DualPipeV: both of a rank's stages face the other rank). Inside a step a rank now
    holds the inputs of its micro-batches in flight (which their backward needs anyway) and the gradient being
    received: measured 16 KiB on both 1F1B ranks, 48 and 112 KiB on DualPipeV's. ~10 s each."""
    args = run_args(tmp_path, make_corpus(tmp_path), extra=[
        f"train.max_steps={STEPS}", "train.log_every=100", "train.eval_every=100", "train.save_every=100",
        "train.eval_batches=0", "parallel.pp=2", f"parallel.pp_schedule={schedule}", "model.num_hidden_layers=4",
        f"train.micro_batch_size={MBS}", f"train.grad_accum={M}", f"data.seq_len={SEQ}"])
    ranks = spawn_each(2, args, {0: _record_buffers, 1: _record_buffers}, env={"HELD_DIR": str(tmp_path)},
                       timeout=300)
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(p.stderr[-3000:] for p in ranks)
    per_mb = 2 * MBS * SEQ * HIDDEN * 4                       # the hidden states and the MTP embedding, fp32
    torch_kept = M * per_mb * (1 if schedule == "1f1b" else 2)
    for r in range(2):
        steps = json.loads((tmp_path / f"held{r}.json").read_text())
        assert len(steps) == STEPS
        assert all(start == 0 for start, _, _ in steps[1:]), (r, steps)   # nothing carried from the last step
        assert all(graphs == 0 for _, _, graphs in steps), (r, steps)     # a loss's graph would hold its inputs
        peak = max(top for _, top, _ in steps)
        assert 0 < peak < torch_kept, (r, peak, torch_kept)
        print(f"{schedule} rank {r}: receive buffers held at most {peak / 1024:.0f} KiB inside a step, 0 between "
              f"steps (torch kept {torch_kept / 1024:.0f} KiB)")
