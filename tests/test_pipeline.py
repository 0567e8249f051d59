"""Pipeline parallelism (parallel/pipeline/): the plan, the bad inputs, and real gloo runs of train.py
whose losses, gradient norms, weights and router biases equal one process's with the same global batch.

Every run trains the same 4-layer tiny model (one dense layer, three MoE layers, one MTP depth, the
sequence-wise aux loss on) on a global batch of 8 rows for 10 steps: one process with grad_accum=8 is
the reference; a pipeline reads the same 8 rows as micro-batches of 1 (two pipelines of 4 under ep=2).
DualPipeV runs its paired forward and backward overlapped (parallel.pp_overlap, the default): under ep=2
each of a rank's two stages all-to-alls on its own EP group. Cost (2-core CPU):
the multi-process tests together about 4-5 minutes."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from configs.schema import load_config
from model.hf import weight_reader
from parallel.pipeline.plan import check_pipeline, rank_stages, split_layers, stage_rank
from parallel.state import checkpoint
from tests.train_helpers import ROOT, clean_env, make_corpus, metrics, run_args, spawn_ranks, train

STEPS, SAVED = 10, 5
COMMON = ["model.num_hidden_layers=4", f"train.max_steps={STEPS}", "train.eval_batches=3", f"train.eval_every={SAVED}",
          "train.micro_batch_size=1", "train.keep_last=5", "train.grad_clip=0.5"]
KEYS = ("loss", "lm_loss", "aux_loss", "mtp_loss", "grad_norm")


def _cfg(*overrides: str):  # noqa: ANN202
    return load_config(None, list(overrides))


# ---- the plan: no processes -------------------------------------------------------------------------------

def test_split_is_contiguous_weighs_moe_and_head_and_takes_the_override():
    cfg = _cfg("parallel.pp=2", "model.num_hidden_layers=8")
    split = split_layers(cfg)
    assert sum(split, []) == list(range(8)) and all(split)
    # the last stage carries the output head and MTP, so it gets fewer layers than the first
    assert len(split[-1]) < len(split[0])
    cfg = _cfg("parallel.pp=2", "model.num_hidden_layers=8", "parallel.pp_layers=[3, 5]")
    assert split_layers(cfg) == [[0, 1, 2], [3, 4, 5, 6, 7]]
    cfg = _cfg("parallel.pp=2", "parallel.pp_schedule=interleaved", "model.num_hidden_layers=8")
    assert split_layers(cfg) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_stage_to_rank_maps():
    assert [stage_rank(s, 4, "1f1b") for s in range(4)] == [0, 1, 2, 3]
    assert [stage_rank(s, 2, "interleaved") for s in range(4)] == [0, 1, 0, 1]
    # V: the first and the last stage on rank 0
    assert [rank_stages(r, 3, "dualpipev") for r in range(3)] == [[0, 5], [1, 4], [2, 3]]


@pytest.mark.parametrize("overrides, world, names", [
    (["parallel.pp=2"], 3, "parallel.pp=2"),
    (["parallel.pp=2", "parallel.ep=2"], 6, "parallel.ep=2"),
    (["parallel.pp=2", "parallel.pp_schedule=dualpipev", "model.num_hidden_layers=3"], 2, "more stages than layers"),
    (["parallel.pp=2", "parallel.pp_schedule=dualpipev", "train.grad_accum=3"], 2, "train.grad_accum=3"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved", "model.num_hidden_layers=6"], 2, "interleaved"),
    (["parallel.pp=2", "parallel.pp_layers=[1, 2]"], 2, "parallel.pp_layers=[1, 2]"),
    (["parallel.pp=2", "parallel.sites=2"], 4, "parallel.sites=2"),
    (["parallel.pp=2", "parallel.pp_schedule=dualpipev", "model.num_hidden_layers=4", "train.grad_accum=4",
      "train.activation_checkpointing=true"], 2, "train.activation_checkpointing=true"),
])
def test_bad_layouts_fail_with_one_line(overrides, world, names):
    cfg = _cfg("train.eval_batches=0", *overrides)
    with pytest.raises(ValueError, match="parallel") as e:
        check_pipeline(cfg, world)
    assert names in str(e.value) and "\n" not in str(e.value)


def test_bad_pipeline_value_fails_before_any_process_group(tmp_path):
    p = train(["parallel.pp=2", "train.eval_batches=0", f"train.out_dir={tmp_path / 'run'}"], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: parallel.pp=2") and "world size 1" in last, p.stderr[-2000:]


# ---- real runs ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, grad_accum=8, saving at step 5 and 10."""
    root = tmp_path_factory.mktemp("pipeline")
    corpus = make_corpus(root)
    train(run_args(root, corpus, "one", COMMON + ["train.grad_accum=8", f"train.save_every={SAVED}"]))
    return root, corpus


def _ckpt(out_dir, step: int):  # noqa: ANN202
    return out_dir / "checkpoints" / checkpoint.checkpoint_name(step)


def _same_losses(ref: list[dict], got: list[dict], what: str, same_val_rows: bool = True, rel: float = 1e-5) -> None:
    """Every step's losses and norm; the validation loss (steps 5 and 10) where both runs evaluated the same
    rows: one pipeline reads what one process reads, two pipelines each half of a global batch twice as big."""
    assert [r["step"] for r in got] == [r["step"] for r in ref], what
    for a, b in zip(ref, got):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=rel), f"{what} step {a['step']} {key}"
        assert ("val_loss" in a) == ("val_loss" in b), f"{what} step {a['step']}"
        if "val_loss" in a and same_val_rows:
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=rel), f"{what} step {a['step']} val_loss"


def _same_weights(a_dir, b_dir, what: str, exact_biases: bool = True) -> None:
    wa, wb = weight_reader.read_weights(a_dir), weight_reader.read_weights(b_dir)
    assert list(wa) == list(wb), what
    for k in wa:
        if k.endswith("e_score_correction_bias") and exact_biases:   # +-gamma steps from the same counts
            assert torch.equal(wa[k], wb[k]), f"{what} {k}"
        else:
            # 10 AdamW steps from gradients equal to rounding: a near-zero gradient's sign may flip an update
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def pp2(reference):
    """pp=2 (1F1B) on 2 ranks, saving at step 5 and 10."""
    root, corpus = reference
    spawn_ranks(2, run_args(root, corpus, "pp2", COMMON + ["parallel.pp=2", "train.grad_accum=8",
                                                           f"train.save_every={SAVED}"]))
    return root / "pp2"


def _check_run(root, name: str, same_val_rows: bool = True) -> None:
    _same_losses(metrics(root / "one"), metrics(root / name), name, same_val_rows)
    assert [r["step"] for r in metrics(root / name) if "val_loss" in r] == [SAVED, STEPS], name
    _same_weights(_ckpt(root / "one", STEPS), _ckpt(root / name, STEPS), name)
    rows = [r["expert_load"] for r in metrics(root / name)]
    assert rows == [r["expert_load"] for r in metrics(root / "one")]     # every stage's router counts, logged


@pytest.mark.slow
def test_pp2_1f1b_equals_one_process(reference, pp2):
    _check_run(reference[0], "pp2")


@pytest.mark.slow
@pytest.mark.parametrize("ranks, layout", [
    (2, ["parallel.pp=2", "parallel.pp_schedule=dualpipev", "train.grad_accum=8"]),
    (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved", "train.grad_accum=8"]),
    (4, ["parallel.pp=2", "parallel.ep=2", "train.grad_accum=4"]),
    (4, ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipev", "train.grad_accum=4"]),
    (2, ["parallel.pp=2", "train.grad_accum=8", "train.activation_checkpointing=true"]),
], ids=["dualpipev", "interleaved", "pp2-ep2", "dualpipev-ep2", "1f1b-checkpointed"])
def test_pipeline_equals_one_process(reference, ranks, layout):
    root, corpus = reference
    name = "pp_" + "_".join(x.split("=")[1] for x in layout if not x.startswith("train.activation"))
    name += "_ckpt" if "train.activation_checkpointing=true" in layout else ""
    spawn_ranks(ranks, run_args(root, corpus, name, COMMON + layout + [f"train.save_every={STEPS}"]))
    _check_run(root, name, same_val_rows=ranks == 2)      # 4 ranks: two pipelines, a twice bigger eval batch


@pytest.mark.slow
def test_non_finite_loss_on_the_last_stage_skips_the_step_on_every_stage(reference):
    """A NaN loss on rank 1 (the last stage) at step 2: both stages skip that step (DeepSpeed's overflow flag
    is ORed over the pipe group; agree_on_step raises if the ranks disagree), training goes on after it."""
    root, corpus = reference
    spawn_ranks(2, run_args(root, corpus, "pp_nan", COMMON[:1] + COMMON[2:] + [
        "train.max_steps=3", "parallel.pp=2", "train.grad_accum=8", "train.save_every=3"]),
        env={"MOE_FAULTS": "nan_loss@2/1"})
    got = metrics(root / "pp_nan")
    assert [r["skipped"] for r in got] == [False, True, False]
    ref = metrics(root / "one")
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=1e-5)   # step 1 as the reference's


def _export(src, out):  # noqa: ANN001, ANN202
    subprocess.run([sys.executable, str(ROOT / "scripts" / "export_hf.py"), "--checkpoint", str(src), "--out",
                    str(out)], cwd=ROOT, env=clean_env(), check=True, capture_output=True, timeout=180)
    from safetensors.torch import load_file
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.slow
def test_checkpoints_resume_across_pipeline_layouts_and_export(reference, pp2, tmp_path):
    root, corpus = reference
    # a pp=2 checkpoint at pp=1, a pp=1 checkpoint at pp=2: the remaining steps equal the uninterrupted run's
    train(run_args(root, corpus, "to_pp1", COMMON + ["train.grad_accum=8", f"train.save_every={STEPS}",
                                                     f"train.resume={_ckpt(pp2, SAVED)}"]))
    spawn_ranks(2, run_args(root, corpus, "to_pp2", COMMON + ["parallel.pp=2", "train.grad_accum=8",
                                                              f"train.save_every={STEPS}",
                                                              f"train.resume={_ckpt(root / 'one', SAVED)}"]))
    ref = [r for r in metrics(root / "one") if r["step"] > SAVED]
    _same_losses(ref, metrics(root / "to_pp1"), "pp=2 -> pp=1")
    _same_losses(ref, metrics(root / "to_pp2"), "pp=1 -> pp=2")
    # the pp=2 checkpoint names every stage's tensors by its single-device name, in the single-device order
    one_state, pp_state = (checkpoint.read_state(_ckpt(d, SAVED)) for d in (root / "one", pp2))
    assert list(pp_state["tensors"].items()) == list(one_state["tensors"].items())
    # export: the pp=1 run's step-5 weights, carried into a pp=2 checkpoint unchanged (one step at lr 1e-30 and
    # bias speed 0), export to the same tensors, bit for bit, as the pp=1 checkpoint itself
    spawn_ranks(2, run_args(root, corpus, "pp2_same", COMMON[:1] + COMMON[2:] + [
        "parallel.pp=2", "train.grad_accum=8", f"train.max_steps={SAVED + 1}", f"train.save_every={SAVED + 1}",
        "train.lr=1e-30", "train.min_lr=0", "train.warmup_steps=0", "train.bias_update_speed=0",
        f"train.resume={_ckpt(root / 'one', SAVED)}"]))
    a = _export(_ckpt(root / "one", SAVED), tmp_path / "from_pp1")
    b = _export(_ckpt(root / "pp2_same", SAVED + 1), tmp_path / "from_pp2")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_an_overlapped_pair_runs_the_weight_gradients_after_both_sides():
    """parallel/pipeline/overlap.py: the forward (helper thread) and the backward's input gradients run
    together, the backward's deferred weight gradients only after both have finished; an error on the
    forward's thread is raised on the schedule's thread, and the weight part is then not run."""
    import threading
    from types import SimpleNamespace

    from parallel.pipeline.overlap import overlapped_pair

    events, both_running = [], threading.Barrier(2, timeout=10)

    def run_action(sub, ctx, defer_weight=False):  # noqa: ANN001, ANN202
        both_running.wait()                      # deadlocks (then times out) unless the two sides run at once
        if sub == "F" and ctx == "fail":
            raise RuntimeError("forward failed")
        events.append(sub)
        return (lambda: events.append("W")) if sub == "B" and defer_weight else None

    pair = overlapped_pair(run_action)
    pair(SimpleNamespace(sub_actions=("F", "B")), "ok")
    assert sorted(events[:2]) == ["B", "F"] and events[2:] == ["W"]
    events.clear()
    with pytest.raises(RuntimeError, match="forward failed"):
        pair(SimpleNamespace(sub_actions=("F", "B")), "fail")
    assert events == ["B"]


@pytest.mark.slow
def test_init_from_and_fp8_under_a_pipeline(reference):
    """train.init_from at pp=2 (each rank reads its own stages' tensors): one step at lr 1e-30 and bias speed 0
    saves exactly the step-5 weights of the one-process run it started from. FP8 (every linear and the experts
    emulated on the CPU) at pp=2 gives one process's FP8 losses and norm: within 1e-5 at step 1 (same weights),
    2e-3 over 3 steps. ~30 s."""
    root, corpus = reference
    base = COMMON[:1] + COMMON[2:] + ["train.grad_accum=8"]
    spawn_ranks(2, run_args(root, corpus, "pp2_init", base + [
        "parallel.pp=2", "train.max_steps=1", "train.save_every=1", "train.lr=1e-30", "train.min_lr=0",
        "train.warmup_steps=0", "train.bias_update_speed=0", f"train.init_from={_ckpt(root / 'one', SAVED)}"]))
    start, saved = (weight_reader.read_weights(_ckpt(d, s)) for d, s in ((root / "one", SAVED), (root / "pp2_init", 1)))
    assert list(saved) == list(start)
    for k in start:
        assert torch.equal(saved[k], start[k]), k
    fp8 = ["train.max_steps=3", "fp8.enabled=true"]
    train(run_args(root, corpus, "one_fp8", base + fp8))
    spawn_ranks(2, run_args(root, corpus, "pp2_fp8", base + fp8 + ["parallel.pp=2"]))
    one, pp = metrics(root / "one_fp8"), metrics(root / "pp2_fp8")
    _same_losses(one[:1], pp[:1], "fp8")     # the same weights: the gradients' rounding differs, that is all
    # after AdamW steps from gradients equal to rounding (a near-zero gradient's update may flip sign), some FP8
    # elements round the other way (E4M3 steps of 2^-3 relative): measured 3e-5 (loss) and 7.5e-4 (norm) at step 3
    _same_losses(one, pp, "fp8", rel=2e-3)
    assert "fp8" in (root / "pp2_fp8" / "run.json").read_text()


@pytest.mark.slow
def test_sigterm_under_a_pipeline_saves_and_resumes_to_the_same_losses(reference, pp2, tmp_path):
    """SIGTERM to the launcher's whole job at pp=2 (1F1B): both stages agree to stop after the current step,
    save it and exit; resume=auto then gives the uninterrupted pp=2 run's losses at every step. ~40 s."""
    from tests.test_reliability import _steps, sigterm_after_first_record

    root, corpus = reference
    out = root / "pp2_term"
    args = run_args(root, corpus, "pp2_term", COMMON + ["parallel.pp=2", "train.grad_accum=8",
                                                        f"train.save_every={SAVED}"])
    log = sigterm_after_first_record(2, args, out, tmp_path / "term.log", faults=f"sleep=1@1-{STEPS}")   # slow steps
    stopped = _steps(out)
    assert len(stopped) == 1 and 1 <= stopped[0] < SAVED, log[-3000:]
    assert f"stopped by SIGTERM at step {stopped[0]}" in log
    spawn_ranks(2, args + ["train.resume=auto"])
    resumed = {r["step"]: r for r in metrics(out)}      # later records of a step overwrite earlier ones
    _same_losses(metrics(pp2), [resumed[s] for s in sorted(resumed)], "SIGTERM and resume at pp=2")
