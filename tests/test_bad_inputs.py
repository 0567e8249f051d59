"""Bad configs and inputs, one table: each fails with ONE clear error (exactly ValueError or
FileNotFoundError, one line) naming the field, the value or the path.

The cases call what train.main calls, in process (configs.schema.load_config, the data
functions, parallel.engine's and parallel.state.checkpoint's checks), so the table runs in seconds;
config errors surface before train.main creates a process group. One slow case goes through
the DeepSpeed launcher and checks that every rank reports the error.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import yaml

from configs.schema import DEFAULT_CONFIG, MIN_BPE_VOCAB_SIZE, load_config
from data import (
    TokenShards,
    build_dataset_cache,
    load_corpus,
    load_tokenizer,
    prepare_shards,
    read_meta,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from data.tokenizer import MIN_VOCAB_SIZE
from parallel.engine import check_supported, deepspeed_config
from parallel.state import checkpoint
from tests.helpers import free_port
from tests.train_helpers import ROOT, TINY_MODEL, clean_env, make_corpus, run_args

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * 7}  # the quick brown fox\n" * (2 + i % 4) for i in range(30)]
TOK_VOCAB = 300


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> SimpleNamespace:
    """A small BPE and a shard directory made with it (the good inputs the cases spoil)."""
    root = tmp_path_factory.mktemp("prepared")
    tok = train_bpe_tokenizer(DOCS, TOK_VOCAB, str(root / "tok"))
    prepare_shards(datasets.Dataset.from_dict({"text": DOCS}), tok, str(root / "shards"), seq_len=16,
                   val_fraction=0.1)
    return SimpleNamespace(tok=str(root / "tok"), shards=root / "shards", fingerprint=tokenizer_fingerprint(tok))


@pytest.fixture
def env(prepared, tmp_path) -> SimpleNamespace:
    return SimpleNamespace(tmp=tmp_path, **vars(prepared))


# ---------------------------------------------------------------- helpers the cases use

def cfg(*overrides: str):
    return load_config(None, list(overrides))


def yaml_file(e, edit) -> str:
    """configs/tiny.yaml with ``edit(raw)`` applied, written into tmp (a config *file* error)."""
    raw = yaml.safe_load(Path(DEFAULT_CONFIG).read_text())
    edit(raw)
    f = e.tmp / "bad.yaml"
    f.write_text(yaml.safe_dump(raw))
    return str(f)


def shards_copy(e, edit_meta=None, edit_files=None) -> str:
    d = e.tmp / "shards"
    shutil.copytree(e.shards, d)
    if edit_meta is not None:
        meta = json.loads((d / "meta.json").read_text())
        edit_meta(meta)
        (d / "meta.json").write_text(json.dumps(meta))
    if edit_files is not None:
        edit_files(d)
    return str(d)


def truncate(name: str, size: int):
    def edit(d: Path) -> None:
        with open(d / name, "r+b") as fh:
            fh.truncate(size)
    return edit


def symlink_out(e, name: str):
    """The shard moved out of its directory (same bytes) and a symlink left in its place."""
    def edit(d: Path) -> None:
        outside = e.tmp / ("outside_" + name)
        (d / name).rename(outside)
        (d / name).symlink_to(outside)
    return edit


def corpus_file(e, name: str, content: str | bytes) -> str:
    f = e.tmp / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(f)


def empty_dir(e, name: str) -> str:
    (e.tmp / name).mkdir()
    return str(e.tmp / name)


def build(e, path: str, tokenizer: str | None = None, vocab_size: int = 512) -> str:
    """data preparation exactly as train.prepare_data calls it"""
    return build_dataset_cache(path, "text", tokenizer, vocab_size, 16, str(e.tmp / "cache"), 0.1)


def ckpt_dir(e, state_text: str | None = None, complete: bool = True) -> Path:
    p = e.tmp / "run" / "checkpoints" / "step_0000004"
    p.mkdir(parents=True)
    if state_text is not None:
        (p / checkpoint.STATE).write_text(state_text)
    if complete:
        (p / checkpoint.MARKER).write_text("{}")
    return p


def saved_state(e, fingerprint: str) -> dict:
    return {"config": cfg(*TINY_MODEL).to_dict(), "tokenizer_fingerprint": fingerprint}


def set_in(raw: dict, section: str, key: str, value) -> None:
    raw.setdefault(section, {})[key] = value


# ---------------------------------------------------------------- the table

V, F = ValueError, FileNotFoundError
CASES = [
    # -- config: divisibility, top-k, layout
    ("experts-not-divisible-by-n_group", lambda e: cfg("model.n_group=3"),
     V, r"model\.n_group=3: n_routed_experts=16 is not divisible by it"),
    ("experts-not-divisible-by-ep", lambda e: cfg("parallel.ep=3"),
     V, r"parallel\.ep=3: model\.n_routed_experts=16 is not divisible by it"),
    ("router-groups-cannot-map-onto-ep", lambda e: cfg("model.n_routed_experts=24", "parallel.ep=6"),
     V, r"parallel\.ep=6: router groups \(model\.n_group=4\) cannot map onto ranks"),
    ("top-k-above-routed-experts", lambda e: cfg("model.num_experts_per_tok=17"),
     V, r"model\.num_experts_per_tok=17: must be in \[1, n_routed_experts=16\]"),
    ("topk_group-above-n_group", lambda e: cfg("model.topk_group=5"),
     V, r"model\.topk_group=5: must be in \[1, n_group=4\]"),
    ("top-k-beyond-the-selected-groups", lambda e: cfg("model.topk_group=1", "model.num_experts_per_tok=5"),
     V, r"model\.num_experts_per_tok=5: more than the 4 experts in topk_group=1 groups"),
    ("world-not-divisible-by-ep", lambda e: check_supported(cfg("parallel.ep=2"), world_size=3),
     V, r"parallel\.ep=2: the world size 3 is not divisible by it"),
    ("deepspeed-section-conflicts-with-train", lambda e: deepspeed_config(cfg("deepspeed.gradient_clipping=5.0"), 1),
     V, r"deepspeed\.gradient_clipping=5\.0 conflicts with train\.grad_clip"),
    # -- config: names and types
    ("unknown-key", lambda e: cfg("train.learning_rate=0.1"),
     V, r"train: unknown key\(s\) \['learning_rate'\]"),
    ("unknown-section", lambda e: cfg("optimizer.lr=0.1"),
     V, r"unknown section\(s\) \['optimizer'\]"),
    ("yaml-string-for-int", lambda e: load_config(yaml_file(e, lambda r: set_in(r, "train", "max_steps", "ten"))),
     V, r"train\.max_steps='ten': expected an integer"),
    ("yaml-section-not-a-mapping", lambda e: load_config(yaml_file(e, lambda r: r.update(train=5))),
     V, r"train: expected a mapping, got 5"),
    ("override-string-for-list", lambda e: cfg("fp8.exclude=lm_head"),
     V, r"fp8\.exclude='lm_head': expected a list of strings"),
    ("config-file-missing", lambda e: load_config(str(e.tmp / "no_such.yaml")),
     F, r"config file not found: .*no_such\.yaml"),
    # -- config: values
    ("negative-lr", lambda e: cfg("train.lr=-0.001"), V, r"train\.lr=-0\.001"),
    ("nan-lr", lambda e: cfg("train.lr=.nan"), V, r"train\.lr=nan: expected a finite number"),
    ("beta2-not-below-1", lambda e: cfg("train.beta2=1.0"), V, r"train\.beta2=1\.0: must be in \[0, 1\)"),
    ("negative-seed", lambda e: cfg("train.seed=-1"), V, r"train\.seed=-1: must be in \[0, 2\*\*32\)"),
    ("seq_len-beyond-positions", lambda e: cfg("data.seq_len=2048"),
     V, r"data\.seq_len=2048: exceeds model\.max_position_embeddings=1024"),
    ("empty-data-path", lambda e: cfg('data.path=""'), V, r"data\.path='': empty"),
    ("zero-max_files", lambda e: cfg("data.max_files=0"), V, r"data\.max_files=0: must be >= 1"),
    ("vocab-too-small-for-the-bpe", lambda e: cfg("model.vocab_size=100"),
     V, rf"model\.vocab_size=100: .* needs >= {MIN_VOCAB_SIZE}"),
    # -- corpus
    ("missing-data-path", lambda e: build(e, str(e.tmp / "no_such_corpus")),
     F, r"corpus path does not exist: .*no_such_corpus"),
    ("empty-data-folder", lambda e: build(e, empty_dir(e, "empty_corpus")),
     V, r"no usable files in corpus folder .*empty_corpus"),
    ("empty-data-path-in-a-library-call", lambda e: load_corpus(""), V, r"corpus path '' is empty"),
    ("jsonl-without-the-text-field",
     lambda e: build(e, corpus_file(e, "docs.jsonl", '{"body": "a b c"}\n{"body": "d e f"}\n')),
     V, r"text field 'text' not found in .*docs\.jsonl; available columns: \['body'\]"),
    ("jsonl-text-field-not-strings", lambda e: build(e, corpus_file(e, "nums.jsonl", '{"text": 5}\n{"text": 6}\n')),
     V, r"text field 'text' in .*nums\.jsonl has type .*expected strings"),
    ("jsonl-not-json", lambda e: build(e, corpus_file(e, "broken.jsonl", b"\x80\x04 not json\n")),
     V, r"cannot read json corpus file\(s\) .*broken\.jsonl"),
    ("parquet-not-parquet", lambda e: build(e, corpus_file(e, "broken.parquet", b"PAR1 then garbage")),
     V, r"cannot read parquet corpus file\(s\) .*broken\.parquet"),
    ("corpus-too-small-for-seq_len",
     lambda e: prepare_shards(datasets.Dataset.from_dict({"text": ["tiny"]}), load_tokenizer(e.tok),
                              str(e.tmp / "out"), seq_len=1000),
     V, r"corpus too small: \d+ tokens make 0 rows of 1001 tokens \(seq_len=1000\)"),
    # -- tokenizer
    ("tokenizer-dir-missing", lambda e: load_tokenizer(str(e.tmp / "no_such_tok")),
     F, r"tokenizer directory does not exist: .*no_such_tok"),
    ("tokenizer-larger-than-the-model-vocab", lambda e: build(e, str(make_corpus(e.tmp)), e.tok, vocab_size=280),
     V, r"tokenizer at .*tok has \d+ tokens, more than vocab_size=280"),
    # -- prepared token shards
    ("shard-dir-missing", lambda e: TokenShards(str(e.tmp / "no_such_shards")),
     F, r"token shard directory does not exist: .*no_such_shards"),
    ("shard-meta-missing", lambda e: TokenShards(shards_copy(e, edit_files=lambda d: (d / "meta.json").unlink())),
     F, r"meta\.json not found: .* holds no complete prepared shards"),
    ("shard-meta-not-json",
     lambda e: TokenShards(shards_copy(e, edit_files=lambda d: (d / "meta.json").write_text('{"format": '))),
     V, r"corrupt shard metadata .*meta\.json"),
    ("shard-meta-other-format", lambda e: TokenShards(shards_copy(e, lambda m: m.update(format="npy"))),
     V, r"meta\.json is not moe-token-shards metadata"),
    ("shard-meta-unknown-version", lambda e: TokenShards(shards_copy(e, lambda m: m.update(version=99))),
     V, r"meta\.json has unknown format version 99"),
    ("shard-meta-bad-dtype", lambda e: TokenShards(shards_copy(e, lambda m: m.update(dtype="object"))),
     V, r"corrupt shard metadata .*dtype='object'"),
    ("shard-meta-missing-key", lambda e: TokenShards(shards_copy(e, lambda m: m.pop("seq_len"))),
     V, r"corrupt shard metadata .*missing keys \['seq_len'\]"),
    ("shard-listed-outside-its-dir",
     lambda e: TokenShards(shards_copy(e, lambda m: m["splits"]["train"]["shards"][0].update(file="../x.bin"))),
     V, r"lists shard file '\.\./x\.bin', not a plain file name inside"),
    ("shard-file-a-symlink-out-of-its-dir",
     lambda e: TokenShards(shards_copy(e, edit_files=symlink_out(e, "train_00000.bin"))),
     V, r"meta\.json: .*train_00000\.bin is a symlink to .*outside"),
    ("shard-row-count-not-a-number",
     lambda e: TokenShards(shards_copy(e, lambda m: m["splits"]["train"]["shards"][0].update(rows="3"))),
     V, r"shard 'train_00000\.bin' has rows='3'"),
    ("shard-file-missing",
     lambda e: TokenShards(shards_copy(e, edit_files=lambda d: (d / "train_00000.bin").unlink())),
     F, r"shard file missing: .*train_00000\.bin"),
    ("shard-file-empty", lambda e: TokenShards(shards_copy(e, edit_files=truncate("train_00000.bin", 0))),
     V, r"shard .*train_00000\.bin has 0 bytes but .*truncated or corrupt"),
    ("shard-file-truncated", lambda e: TokenShards(shards_copy(e, edit_files=truncate("train_00000.bin", 10))),
     V, r"shard .*train_00000\.bin has 10 bytes but .*truncated or corrupt"),
    ("split-empty", lambda e: TokenShards(shards_copy(e, lambda m: m["splits"]["val"].update(shards=[])), "val"),
     V, r"split 'val' in .*shards is empty"),
    ("shards-from-another-tokenizer", lambda e: TokenShards(str(e.shards), expected_fingerprint="0" * 64),
     V, r"shards was prepared with another tokenizer"),
    ("token-id-beyond-the-vocab", lambda e: TokenShards(str(e.shards), expected_vocab_size=260),
     V, r"train_00000\.bin contains token id \d+ >= vocab size 260"),
    # -- checkpoints
    ("checkpoint-from-another-model-shape",
     lambda e: checkpoint.check_compatible(saved_state(e, e.fingerprint), ckpt_dir(e), cfg(
         *TINY_MODEL, "model.hidden_size=96").model.to_dict(), e.fingerprint),
     V, r"step_0000004 is incompatible: it has model\.hidden_size=64, the config has model\.hidden_size=96"),
    ("data-from-another-tokenizer-than-the-checkpoint",
     lambda e: checkpoint.check_compatible(saved_state(e, "0" * 64), ckpt_dir(e), cfg(*TINY_MODEL).model.to_dict(),
                                           e.fingerprint),
     V, r"step_0000004 was trained on data from another tokenizer"),
    ("checkpoint-state-not-json", lambda e: checkpoint.read_state(ckpt_dir(e, '{"step": 4,')),
     V, r"step_0000004: cannot read trainer_state\.json"),
    ("resume-from-an-incomplete-checkpoint",
     lambda e: checkpoint.resolve_resume(str(ckpt_dir(e, "{}", complete=False)), str(e.tmp / "run")),
     V, r"train\.resume='.*step_0000004': not a complete checkpoint"),
]


@pytest.mark.parametrize("call, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_clear_error(env, call, exc, pattern):
    with pytest.raises(Exception) as info:
        call(env)
    err = info.value
    # exactly the type train.cli turns into "error: ..." (a subclass such as pyarrow's ArrowInvalid
    # or a KeyError would mean the input reached code that did not expect it)
    assert type(err) is exc, f"{type(err).__name__}: {err}"
    assert "\n" not in str(err), f"not one line: {err}"
    assert re.search(pattern, str(err)), f"{pattern!r} not in: {err}"


def test_the_table_is_not_vacuous(env):
    """Every spoiled input in the table differs from a good one in just that respect: the good
    ones go through the same calls."""
    load_config(None, [])
    check_supported(cfg("parallel.ep=2"), world_size=4)
    assert len(TokenShards(shards_copy(env), expected_vocab_size=TOK_VOCAB, expected_fingerprint=env.fingerprint))
    assert read_meta(str(env.shards))["splits"]["val"]["shards"]
    assert Path(build(env, str(make_corpus(env.tmp)))).is_dir()
    state = saved_state(env, env.fingerprint)
    checkpoint.check_compatible(state, env.tmp, cfg(*TINY_MODEL).model.to_dict(), env.fingerprint)
    # the config's copy of the tokenizer's lower bound on the BPE vocabulary
    assert MIN_BPE_VOCAB_SIZE == MIN_VOCAB_SIZE
    cfg(f"model.vocab_size={MIN_VOCAB_SIZE}")


# ---------------------------------------------------------------- through the launcher

# Runs train.py for its rank and prefixes each line of its stderr with the rank. Then it waits
# for its peers before exiting: the DeepSpeed launcher kills every rank within a second of the
# first non-zero exit, which would cut off a rank that is slower to reach the error.
_RANK_WRAPPER = """
import os, subprocess, sys, time
from pathlib import Path
rank, world = os.environ["RANK"], int(os.environ["WORLD_SIZE"])
p = subprocess.run([sys.executable, {train!r}, *sys.argv[1:]], stderr=subprocess.PIPE, text=True)
for line in p.stderr.splitlines():
    print(f"[rank {{rank}}] {{line}}", file=sys.stderr, flush=True)
done = Path({done!r})
(done / rank).touch()
deadline = time.time() + 120
while len(list(done.iterdir())) < world and time.time() < deadline:
    time.sleep(0.1)
sys.exit(p.returncode)
"""


@pytest.mark.slow
def test_config_error_is_reported_by_every_rank_under_the_launcher(tmp_path):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    done = tmp_path / "done"
    done.mkdir()
    wrapper = tmp_path / "rank_wrapper.py"
    wrapper.write_text(_RANK_WRAPPER.format(train=str(ROOT / "train.py"), done=str(done)))
    # ep=4 fits the model (16 experts, 4 groups) but not 2 ranks: an error only the world size shows
    args = run_args(tmp_path, make_corpus(tmp_path), "run", ["train.max_steps=2", "parallel.ep=4"])
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(wrapper), *args]
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0, out[-3000:]
    message = "error: parallel.ep=4: the world size 2 is not divisible by it"
    for rank in (0, 1):
        lines = [line for line in p.stderr.splitlines() if line.startswith(f"[rank {rank}] ")]
        assert lines == [f"[rank {rank}] {message} (world = ep x expert-data-parallel)"], out[-3000:]
    # it failed before anything started: no run directory, no data prepared
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
