"""Hostile and careless inputs (issue 31): nothing lost, nothing trusted unchecked, one line per refusal.

1. Runs own their directory: a fresh run into a ``train.out_dir`` that holds another run's complete
   checkpoints stops before any process group and changes no byte of them; ``train.resume=auto`` continues
   them; ``train.overwrite=true`` replaces them; pruning never deletes another run's checkpoints (also
   those written before run ids, which ``resume=auto`` still resumes). Real short runs of train.py.
2. No silent full-size defaults: a config file without a ``model:`` section (or with an empty one) is
   refused, naming the file.
3. YAML strictness: anchors/aliases (an alias bomb), merge keys, duplicate keys at any depth, unknown keys
   in ``model.rope_scaling`` and at the top of ``deepspeed:`` (checked against DeepSpeed's own parser)
   are one-line ValueErrors naming the file, key or value.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from configs.schema import DEFAULT_CONFIG, load_config
from model.hf.manifest import write_manifest
from parallel.state import checkpoint, run_owner
from tests.train_helpers import make_corpus, metrics, run_args, train

# ---------------------------------------------------------------- 1. runs own their directory


def _snapshot(out: Path) -> dict[str, str]:
    """Every file under OUT/checkpoints -> its SHA-256."""
    root = checkpoint.checkpoint_root(str(out))
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_ids(out: Path) -> dict[str, str | None]:
    return {p.name: json.loads((p / checkpoint.STATE).read_text()).get("run_id")
            for p in checkpoint.complete_checkpoints(str(out))}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _args(tmp: Path, corpus: Path, *extra: str, out: str = "run") -> list[str]:
    # one data cache per module: the runs below share it
    return run_args(tmp, corpus, out=out, extra=["train.eval_every=100", *extra])


def test_a_fresh_run_into_a_used_out_dir_stops_and_changes_nothing(tmp_path, corpus):
    out = tmp_path / "run"
    train(_args(tmp_path, corpus, "train.max_steps=4", "train.save_every=2"))
    before, log_before, first = _snapshot(out), (out / "metrics.jsonl").read_bytes(), _run_ids(out)

    # the case: another fresh run (other steps, other lr) into the same out_dir
    p = train(_args(tmp_path, corpus, "train.max_steps=3", "train.save_every=1", "train.lr=1e-3"), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: train.out_dir={out} already holds checkpoints of another run (newest step_0000004): "
                      "resume it with train.resume=auto, choose another train.out_dir, or set "
                      "train.overwrite=true to replace them"], p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert _snapshot(out) == before                                  # not a byte changed
    assert (out / "metrics.jsonl").read_bytes() == log_before       # stopped before the monitor opened it
    assert list(first) == ["step_0000002", "step_0000004"] and len(set(first.values())) == 1
    (run_id,) = set(first.values())
    assert run_id and len(run_id) == 32

    # resume=auto continues the first run, under its id; its own pruning keeps the newest two
    p = train(_args(tmp_path, corpus, "train.max_steps=6", "train.save_every=1", "train.resume=auto"))
    assert "resuming from" in p.stdout and "step_0000004" in p.stdout
    assert _run_ids(out) == {"step_0000005": run_id, "step_0000006": run_id}
    assert [m["step"] for m in metrics(out)][-2:] == [5, 6]


def test_overwrite_replaces_the_other_runs_checkpoints(tmp_path, corpus):
    out = tmp_path / "run"
    train(_args(tmp_path, corpus, "train.max_steps=2", "train.save_every=1", "train.keep_last=5"))
    old_ids = set(_run_ids(out).values())
    p = train(_args(tmp_path, corpus, "train.max_steps=1", "train.overwrite=true"))
    assert "train.overwrite=true: removed 2 checkpoint(s) of another run" in p.stdout
    ids = _run_ids(out)
    assert list(ids) == ["step_0000001"] and set(ids.values()).isdisjoint(old_ids)
    assert [m["step"] for m in metrics(out)] == [1]                 # the old run's log went with it
    # overwrite is for fresh runs: with a resume it is a contradiction, refused before anything runs
    with pytest.raises(ValueError, match=r"train\.overwrite=true with train\.resume='auto'"):
        load_config(None, ["train.overwrite=true", "train.resume=auto"])


def test_pruning_never_deletes_another_runs_checkpoints(tmp_path, corpus):
    """Run B owns out_dir B (step 1); run A's step-2 checkpoint is resumed into B (explicit path: the
    run keeps A's id) with keep_last=1: its pruning deletes its own step 3, never B's step 1."""
    a, b = tmp_path / "a", tmp_path / "b"
    train(_args(tmp_path, corpus, "train.max_steps=2", "train.save_every=2", out="a"))
    train(_args(tmp_path, corpus, "train.max_steps=1", out="b"))
    (a_id,), (b_id,) = set(_run_ids(a).values()), set(_run_ids(b).values())
    b_step1 = _snapshot(b)
    ckpt = checkpoint.complete_checkpoints(str(a))[-1]
    train(_args(tmp_path, corpus, "train.max_steps=4", "train.save_every=1", "train.keep_last=1",
                f"train.resume={ckpt}", out="b"))
    assert _run_ids(b) == {"step_0000001": b_id, "step_0000004": a_id}
    assert {k: v for k, v in _snapshot(b).items() if k.startswith("step_0000001/")} == b_step1

    # resuming B's step 1 now is refused: A's newer step 4 would be replaced, and resume=auto would mix them
    b1 = checkpoint.complete_checkpoints(str(b))[0]
    p = train(_args(tmp_path, corpus, "train.max_steps=6", f"train.resume={b1}", out="b"), check=False)
    assert p.returncode == 2
    assert f"error: train.out_dir={b} holds checkpoints of another run newer than {b1} (newest step_0000004)" \
        in p.stderr, p.stderr[-2000:]


def test_checkpoints_from_before_run_ids_resume_and_are_never_pruned(tmp_path, corpus):
    out = tmp_path / "run"
    train(_args(tmp_path, corpus, "train.max_steps=2", "train.save_every=1", "train.keep_last=5"))
    for p in checkpoint.complete_checkpoints(str(out)):   # as written before run ids (manifest re-made)
        state = json.loads((p / checkpoint.STATE).read_text())
        state.pop("run_id", None)
        (p / checkpoint.STATE).write_text(json.dumps(state, indent=1))
        write_manifest(p)
    legacy = _snapshot(out)
    # they count as another run's for a fresh run ...
    p = train(_args(tmp_path, corpus, "train.max_steps=3"), check=False)
    assert p.returncode == 2 and "already holds checkpoints of another run (newest step_0000002)" in p.stderr
    # ... and resume=auto continues them under a new id; keep_last=1 prunes only the new run's
    p = train(_args(tmp_path, corpus, "train.max_steps=4", "train.save_every=1", "train.keep_last=1",
                    "train.resume=auto"))
    assert "has no run id (written before run ids)" in p.stdout
    ids = _run_ids(out)
    assert list(ids) == ["step_0000001", "step_0000002", "step_0000004"]
    assert ids["step_0000001"] is None and ids["step_0000002"] is None and len(ids["step_0000004"]) == 32
    assert {k: v for k, v in _snapshot(out).items() if not k.startswith("step_0000004/")} == legacy


def _fake_ckpt(out: Path, step: int, run_id: str | None, complete: bool = True) -> Path:
    p = checkpoint.checkpoint_root(str(out)) / checkpoint.checkpoint_name(step)
    p.mkdir(parents=True)
    (p / checkpoint.STATE).write_text(json.dumps({"step": step, **({"run_id": run_id} if run_id else {})}))
    if complete:
        (p / checkpoint.MARKER).write_text("{}")
    return p


def test_prune_and_save_touch_only_the_current_run(tmp_path):
    mine, other = "a" * 32, "b" * 32
    for s, rid in ((1, other), (2, mine), (3, None), (4, mine), (5, other), (6, mine)):
        _fake_ckpt(tmp_path, s, rid)
    _fake_ckpt(tmp_path, 7, other, complete=False)               # another run's crashed save: not ours
    _fake_ckpt(tmp_path, 8, mine, complete=False)                # ours, older than our newest complete one
    (checkpoint.checkpoint_root(str(tmp_path)) / "step_0000009").mkdir()   # no trainer_state: nobody's
    _fake_ckpt(tmp_path, 10, mine)
    checkpoint.prune(str(tmp_path), keep_last=2, run_id=mine)
    left = sorted(p.name for p in checkpoint.checkpoint_root(str(tmp_path)).iterdir())
    assert left == ["step_0000001", "step_0000003", "step_0000005", "step_0000006", "step_0000007", "step_0000010"]
    # a save never replaces a complete checkpoint of another run (each rank checks before rank 0 deletes)
    with pytest.raises(ValueError, match=r"step_0000005 is a complete checkpoint of another run \(run id b+; "):
        run_owner.refuse_foreign(checkpoint.checkpoint_root(str(tmp_path)) / "step_0000005", mine)
    run_owner.refuse_foreign(checkpoint.checkpoint_root(str(tmp_path)) / "step_0000006", mine)   # ours: fine
    # a malformed run id in a resumed checkpoint is named, not trusted
    with pytest.raises(ValueError, match=r"run_id='\.\./x' in trainer_state\.json is not a run id"):
        run_owner.run_id_for({"run_id": "../x"}, tmp_path)


# ---------------------------------------------------------------- 2. no silent full-size defaults

@pytest.mark.parametrize("text, what", [("train:\n  max_steps: 3\n", "no"), ("", "no"),
                                        ("model:\ntrain:\n  max_steps: 3\n", "an empty"), ("model: {}\n", "an empty")])
def test_a_config_without_a_model_section_is_refused(tmp_path, text, what):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config(str(f), ["model.hidden_size=64"])   # an override does not make the rest of 671B right
    msg = str(e.value)
    assert msg == (f"{f} has {what} model: section (the defaults are the full DeepSeek-V3-671B); copy one from "
                   "configs/tiny.yaml or another preset in configs/")
    assert load_config(None).model.hidden_size == 256   # no --config: the embedded tiny default
    assert load_config(DEFAULT_CONFIG).model.hidden_size == 256


# ---------------------------------------------------------------- 3. YAML strictness

TINY = Path(DEFAULT_CONFIG).read_text()

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def _config_with(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    f = tmp_path / name
    f.write_text(text)
    return str(f)


def _bomb_config(tmp_path: Path) -> str:
    """configs/tiny.yaml with a billion-laughs list (9^9 strings once expanded) in the deepspeed section,
    which is handed on as it is: before, it loaded, and copying the config (run.json, the checkpoint's
    config) never finished."""
    assert TINY.endswith("deepspeed:\n  zero_optimization: {stage: 1}\n")
    return _config_with(tmp_path, TINY + "  hybrid_engine:\n" + "".join(f"    {line}\n" for line in BOMB.splitlines()))


def _line(text: str, needle: str, nth: int = 0) -> int:
    """The 1-based number of the nth line that contains needle."""
    return [i + 1 for i, line in enumerate(text.splitlines()) if needle in line][nth]


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    path = _bomb_config(tmp_path)
    assert len(Path(path).read_text()) - len(TINY) < 1100
    with pytest.raises(ValueError, match=rf"^{path}: line \d+: YAML anchors and aliases \(&a / \*a\) are not "
                       "allowed in config files; write the value out$"):
        load_config(path)
    # any anchor, even a harmless one, and merge keys: config files hold plain values
    text = TINY.replace("  lr: 2.0e-3", "  lr: &lr 2.0e-3")
    with pytest.raises(ValueError, match=rf"line {_line(text, '&lr')}: YAML anchors and aliases \(&lr / \*lr\)"):
        load_config(_config_with(tmp_path, text))
    text = TINY.replace("deepspeed:\n", "deepspeed:\n  <<: {steps_per_print: 5}\n")
    with pytest.raises(ValueError, match=rf"line {_line(text, '<<')}: YAML merge keys \(<<\) are not allowed"):
        load_config(_config_with(tmp_path, text))
    with pytest.raises(ValueError, match=r"anchors and aliases"):
        load_config(None, ["train.fp8=&x [1]"])


def test_an_alias_bomb_ends_train_py_with_one_line(tmp_path):
    path = _bomb_config(tmp_path)
    p = train(["--config", path, "logging.progress=false", f"train.out_dir={tmp_path / 'run'}"],
              check=False, timeout=120)
    assert p.returncode == 2
    assert [line for line in p.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {path}: line {_line(Path(path).read_text(), 'a: &a')}: YAML anchors and aliases (&a / *a) are not "
        "allowed in config files; write the value out"], p.stderr[-2000:]


@pytest.mark.parametrize("edit, key, needle", [
    (lambda t: t + "train:\n  lr: 1.0e-3\n", "train", "train:"),                      # a whole section
    (lambda t: t.replace("  lr: 2.0e-3\n", "  lr: 2.0e-3\n  max_steps: 7\n"), "train.max_steps", "max_steps:"),
    (lambda t: t.replace("zero_optimization: {stage: 1}", "zero_optimization: {stage: 1, stage: 2}"),
     "deepspeed.zero_optimization.stage", "stage: 2"),                                 # both on one line
    (lambda t: t.replace("beta_fast: 32,", "beta_fast: 32, beta_fast: 8,"), "model.rope_scaling.beta_fast",
     "beta_fast:"),
])
def test_a_duplicate_key_at_any_depth_is_named(tmp_path, edit, key, needle):
    text = edit(TINY)
    path = _config_with(tmp_path, text)
    with pytest.raises(ValueError) as e:
        load_config(path)
    first, second = _line(text, needle, 0), _line(text, needle, -1)
    assert str(e.value) == f"{path}: line {second}: duplicate key {key!r} (first on line {first})"


def test_a_duplicate_key_in_an_override_is_named():
    with pytest.raises(ValueError) as e:
        load_config(None, ["parallel.emulate_slowdown={0: 2, 0: 3}"])
    assert str(e.value) == ("override 'parallel.emulate_slowdown={0: 2, 0: 3}': line 1: duplicate key '0' "
                            "(first on line 1)")


def test_deep_nesting_is_one_line_not_a_recursion_error(tmp_path):
    path = _config_with(tmp_path, TINY + "fp8:\n  include: " + "[" * 600 + "]" * 600 + "\n")   # 1.2 kB
    with pytest.raises(ValueError, match=rf"^{path}: line {TINY.count(chr(10)) + 2}: nested deeper than 32 levels$"):
        load_config(path)


def test_yaml_syntax_errors_are_one_line(tmp_path):
    path = _config_with(tmp_path, TINY + "train:\n  lr: [1\n")
    with pytest.raises(ValueError, match=rf"^{path}: line \d+, column \d+: invalid YAML: ") as e:
        load_config(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, match", [
    ("model.rope_scaling.betafast=32",
     r"^model\.rope_scaling\.betafast: unknown key; known keys: \['attention_factor'"),
    ("model.rope_scaling.rope_theta=5e5", r"^model\.rope_scaling\.rope_theta: unknown key \(it is model\.rope_theta\)"),
    ("model.rope_scaling.factor=abc", r"^model\.rope_scaling\.factor='abc': expected a finite number$"),
    ("model.rope_scaling.original_max_position_embeddings=0",
     r"^model\.rope_scaling\.original_max_position_embeddings=0: expected a positive integer$"),
])
def test_unknown_or_mistyped_rope_scaling_keys_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_rope_scaling_keys_the_yarn_code_reads_are_accepted(tmp_path):
    cfg = load_config(None, ["model.rope_scaling={type: yarn, factor: 4e0, original_max_position_embeddings: 256, "
                             "beta_fast: 32, beta_slow: 1, mscale: 1.0, mscale_all_dim: 1.0, attention_factor: null, "
                             "truncate: true}"])
    assert cfg.model.rope_scaling["factor"] == 4.0
    path = _config_with(tmp_path, TINY.replace("beta_fast: 32,", "beta_fast: 32, betafast: 8,"))
    with pytest.raises(ValueError, match=r"model\.rope_scaling\.betafast: unknown key"):
        load_config(path)


def test_unknown_deepspeed_keys_are_named_against_deepspeeds_own_parser(tmp_path):
    import deepspeed

    from configs.nested_keys import deepspeed_keys

    version, known, removed = deepspeed_keys()
    assert version == deepspeed.__version__
    # the set comes from DeepSpeed's parser (zero, precision, monitors, profiler, ... read by their own modules)
    assert {"zero_optimization", "bf16", "fp16", "gradient_clipping", "steps_per_print", "wall_clock_breakdown",
            "activation_checkpointing", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comms_logger",
            "aio", "checkpoint", "data_types", "compile", "train_batch_size"} <= known
    assert len(known) > 40 and not known & set(removed)
    path = _config_with(tmp_path, TINY.replace("zero_optimization:", "zero_optimisation:"))
    with pytest.raises(ValueError, match=r"^deepspeed\.zero_optimisation: not a key of DeepSpeed .*'s config "
                                         r"\(did you mean 'zero_optimization'\?\); known keys: \["):
        load_config(path)
    with pytest.raises(ValueError, match=r"^deepspeed\.stepsperprint: not a key"):
        load_config(None, ["deepspeed.stepsperprint=5"])
    if "amp" in removed:   # a key DeepSpeed has removed: its own reason, on one line
        with pytest.raises(ValueError, match=r"^deepspeed\.amp: removed from DeepSpeed [^\n]*$"):
            load_config(None, ["deepspeed.amp={enabled: true}"])
    # what the presets use still loads
    for name in ("tiny", "small", "deepseek_v3_16b", "deepseek_v3_671b", "kimi_k2", "moonlight_16b_a3b"):
        load_config(f"configs/{name}.yaml")
    load_config(None, ["deepspeed.zero_optimization={stage: 2, offload_optimizer: {device: cpu}}",
                       "deepspeed.flops_profiler={enabled: false}"])
    shutil.rmtree(tmp_path, ignore_errors=True)
