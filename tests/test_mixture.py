"""Issue 32, weighted mixtures and separate validation sets: data.sources / data.val_sources
(configs/sources.py, data/sources.py, data/mixture.py, parallel/metrics/evaluation.py).

Sampler level (fast): the measured share of each source's tokens over 1,000 steps at 0.7/0.3; a resume
at other world sizes (and unequal shares) draws the same global batches as an uninterrupted run; states
from another data order are refused. Real files: the mixed rows read each source's shards. Real runs:
two sources trained, resumed at the same and at another world size; bad inputs give one line."""
from __future__ import annotations

import json
import re

import datasets
import numpy as np
import pytest

from configs.schema import load_config
from data import ShardedSampler, TokenShards, load_tokenizer, prepare_shards, train_bpe_tokenizer
from data.mixture import MixtureRows, MixtureSampler, deficit_counts
from data.sources import check_sources, load_sources
from parallel.state import checkpoint
from tests.train_helpers import TINY_MODEL, make_corpus, metrics, run_args, spawn_ranks, train

SIZES, WEIGHTS, SEQ = [500, 200], [0.7, 0.3], 32


def _global(samplers: list[MixtureSampler]) -> np.ndarray:
    """One step of every rank's sampler, concatenated in rank order: the global batch."""
    return np.concatenate([s.next_batch() for s in samplers])


def test_measured_token_shares_over_1000_steps_at_07_03():
    s = MixtureSampler(SIZES, WEIGHTS, 8, 0, 1, seed=1234, names=["web", "code"], seq_len=SEQ)
    batches = np.stack([s.next_batch() for _ in range(1000)])            # (1000 steps, 8 rows)
    source = (batches >= SIZES[0]).astype(np.int64)                      # rows 500.. are the second source's
    tokens = np.bincount(source.ravel(), minlength=2) * SEQ
    shares = tokens / tokens.sum()
    print(f"measured token shares over 1,000 steps x 8 rows x {SEQ} tokens: web {shares[0]:.4f}, "
          f"code {shares[1]:.4f}")
    assert abs(shares[0] - 0.7) <= 1 / 8000 and abs(shares[1] - 0.3) <= 1 / 8000
    assert s.fields()["tokens_by_source"] == {"web": int(tokens[0]), "code": int(tokens[1])}
    # after every step, each source is within one row of its share of the rows drawn so far
    drawn = np.cumsum(np.stack([(source == k).sum(1) for k in (0, 1)], 1), 0)   # (steps, 2)
    target = np.outer(np.arange(1, 1001) * 8, WEIGHTS)
    assert np.abs(drawn - target).max() < 1
    # the rows' places in the global batch change from step to step (seeded by step)
    assert len({tuple(row) for row in source}) > 10
    # every row of a source is read once per pass: the first 500 web draws, first 200 code draws
    flat = batches.ravel()
    assert sorted(flat[flat < 500][:500]) == list(range(500))
    assert sorted(flat[flat >= 500][:200]) == list(range(500, 700))


def test_three_sources_take_their_exact_counts_per_batch():
    assert deficit_counts([0.5, 0.3, 0.2], [0, 0, 0], 10) == [5, 3, 2]
    assert deficit_counts([5, 3, 2], [5, 3, 2], 10) == [5, 3, 2]     # weights are normalised
    assert deficit_counts([1, 1], [3, 0], 3) == [0, 3]               # a source behind catches up first


@pytest.mark.parametrize("world, shares", [(1, None), (2, None), (3, None), (4, None), (3, [5, 4, 3]),
                                           (2, [1, 11])])
def test_resume_at_another_world_size_gives_the_same_global_batches(world, shares):
    sizes, bpr, seed, steps, stop = [50, 20], 12, 7, 40, 17           # several passes over each source
    ref = MixtureSampler(sizes, WEIGHTS, bpr, 0, 1, seed)
    expected = [ref.next_batch() for _ in range(steps)]
    first = MixtureSampler(sizes, WEIGHTS, bpr, 0, 1, seed)
    for _ in range(stop):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))                 # as trainer_state.json holds it
    ranks = [MixtureSampler(sizes, WEIGHTS, bpr // world, r, world, seed) for r in range(world)]
    for r in ranks:
        r.load_state_dict(state)
        if shares:
            r.set_shares(shares)
    for step in range(stop, steps):
        np.testing.assert_array_equal(_global(ranks), expected[step], err_msg=f"step {step + 1}")
    assert ranks[0].drawn == ref.drawn and ranks[0].epoch == ref.epoch >= 2


def test_a_state_from_another_data_order_is_refused():
    s = MixtureSampler(SIZES, WEIGHTS, 4, 0, 1, seed=1, names=["web", "code"])
    s.next_batch()
    state = s.state_dict()
    for other, field in ((MixtureSampler(SIZES, [0.5, 0.5], 4, 0, 1, 1, ["web", "code"]), "sources"),
                         (MixtureSampler(SIZES, WEIGHTS, 2, 0, 1, 1, ["web", "code"]), "global_batch_size"),
                         (MixtureSampler(SIZES, WEIGHTS, 4, 0, 1, 2, ["web", "code"]), "seed")):
        with pytest.raises(ValueError, match=f"sampler state has {field}=.*resuming would change the data order"):
            other.load_state_dict(state)
    single = ShardedSampler(700, 4, 0, 1, 1)
    with pytest.raises(ValueError, match="mixes data.sources; this run reads one corpus"):
        single.load_state_dict(state)
    with pytest.raises(ValueError, match=r"one corpus \(data.path\); this run mixes data.sources"):
        s.load_state_dict(single.state_dict())


def test_mixed_rows_read_each_sources_shards(tmp_path):
    docs = {"code": [f"def f{i}(x):\n    return x * {i}\n" * 4 for i in range(30)],
            "prose": [f"The fox number {i} jumped over {i + 2} lazy dogs. " * 4 for i in range(30)]}
    train_bpe_tokenizer([t for d in docs.values() for t in d], vocab_size=300, out_dir=str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    parts = []
    for name, texts in docs.items():
        prepare_shards(datasets.Dataset.from_dict({"text": texts}), tok, str(tmp_path / name), seq_len=16,
                       val_fraction=0.1, rows_per_shard=5)
        parts.append(TokenShards(str(tmp_path / name)))
    rows = MixtureRows(list(docs), parts, [0.7, 0.3])
    assert len(rows) == len(parts[0]) + len(parts[1])
    picks = [0, len(parts[0]) - 1, len(parts[0]), len(rows) - 1]
    np.testing.assert_array_equal(rows.get_rows(picks), np.stack([parts[0][0], parts[0][-1], parts[1][0],
                                                                   parts[1][-1]]))
    assert rows.source_of(picks).tolist() == [0, 0, 1, 1]


def _cfg(*overrides: str):
    return load_config(None, [*TINY_MODEL, *overrides])


@pytest.mark.parametrize("override, message", [
    ("data.sources=[]", r"data.sources=\[\]: expected a non-empty list"),
    ("data.sources={path: a}", r"data.sources=\{'path': 'a'\}: expected a non-empty list"),
    ("data.sources=[{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0}]",
     r"data.sources\[1\] \('b'\): weight=0: must be a finite number > 0"),
    ("data.sources=[{path: a, weight: -1}]", r"data.sources\[0\] \('a'\): weight=-1: must be a finite number > 0"),
    ("data.sources=[{path: a, weight: .nan}]", r"data.sources\[0\] \('a'\): weight=nan: must be a finite"),
    ("data.sources=[{path: a, weight: .inf}]", r"data.sources\[0\] \('a'\): weight=inf: must be a finite"),
    ("data.sources=[{path: a, weight: lots}]", r"data.sources\[0\] \('a'\): weight='lots': must be a finite"),
    ("data.sources=[{path: a, weight: true}]", r"data.sources\[0\] \('a'\): weight=True: must be a finite"),
    ("data.sources=[{weight: 1}]", r"data.sources\[0\]: path is required"),
    ("data.sources=[{path: a, wieght: 1}]", r"data.sources\[0\]: unknown key\(s\) \['wieght'\]"),
    ("data.sources=[{path: x/a.jsonl}, {path: y/a.jsonl}]",
     r"data.sources\[0\] and data.sources\[1\] are both named 'a'; give each a distinct name"),
    ("data.sources=[{path: a, name: 'web text'}]", r"data.sources\[0\]: name='web text': use letters"),
    ("data.val_sources=[{path: a, weight: -2}]", r"data.val_sources\[0\] \('a'\): weight=-2: must be"),
])
def test_bad_sources_are_named_in_one_line(override, message):
    with pytest.raises(ValueError, match=message) as e:
        _cfg(override)
    assert "\n" not in str(e.value)


def test_data_path_and_sources_together_are_refused():
    with pytest.raises(ValueError, match=r"data.path='c' with data.sources: give that corpus as one of"):
        _cfg("data.path=c", "data.sources=[{path: a}]")
    d = _cfg("data.sources=[{path: data/web.jsonl, weight: 7}, {path: null, weight: 3}]").data   # defaults filled in
    filled = {"text_field": "text", "max_files": None}
    assert d.sources == [{"name": "web", "path": "data/web.jsonl", "weight": 7.0, **filled},
                         {"name": "stdlib", "path": None, "weight": 3.0, **filled}]


def test_a_source_without_documents_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.jsonl").write_text("\n\n")
    (tmp_path / "other_field.jsonl").write_text('{"content": "text under another key"}\n' * 3)
    (tmp_path / "spaces.txt").write_text("   \n\t\n")
    (tmp_path / "good.jsonl").write_text('{"text": ""}\n{"text": "a document"}\n')
    for bad, why in (("empty", "no usable files in corpus folder"), ("blank.jsonl", "contains no non-empty documents"),
                     ("spaces.txt", "contains no non-empty documents"),
                     ("other_field.jsonl", r"text field 'text' not found in .*; available columns: \['content'\]")):
        d = _cfg(f"data.sources=[{{path: {tmp_path / 'good.jsonl'}, weight: 0.7}}, "
                 f"{{path: {tmp_path / bad}, weight: 0.3, name: bad}}]").data
        with pytest.raises(ValueError, match=rf"data.sources\[1\] \('bad', path '.*{bad}'\): .*{why}") as e:
            check_sources(d)
        assert "\n" not in str(e.value)
    d = _cfg(f"data.val_sources=[{{path: {tmp_path / 'missing.jsonl'}}}]").data
    with pytest.raises(ValueError, match=r"data.val_sources\[0\] \('missing', .*\): corpus path does not exist"):
        check_sources(d)
    check_sources(_cfg(f"data.sources=[{{path: {tmp_path / 'good.jsonl'}}}]").data)   # a good one passes


def _two_sources(tmp_path) -> list[str]:
    """Two training sources (Python-like files; prose JSONL under "content") and a separate validation set."""
    code = make_corpus(tmp_path)
    prose, held = tmp_path / "prose.jsonl", tmp_path / "held.jsonl"
    prose.write_text("".join(json.dumps({"content": f"The fox number {i} jumped over {3 * i} lazy dogs. " * 6})
                             + "\n" for i in range(40)))
    held.write_text("".join(json.dumps({"text": f"A held-out fox {i} slept under {i + 1} trees. " * 6}) + "\n"
                            for i in range(10)))
    return [f"data.sources=[{{path: {code}, weight: 0.7, name: code}}, "
            f"{{path: {prose}, weight: 0.3, text_field: content}}]",
            f"data.val_sources=[{{path: {held}}}]"]


def _args(tmp_path, out: str, extra: list[str]) -> list[str]:
    return [a for a in run_args(tmp_path, tmp_path / "unused", out, extra) if not a.startswith("data.path=")]


def test_val_sources_beside_one_corpus(tmp_path):
    """data.path trains; a separate validation set is tokenized with data.path's tokenizer and read whole.
    ``prepare`` runs the build in this process (train.py hands it to the node's preparer)."""
    held = _two_sources(tmp_path)[1]
    cfg = _cfg(f"data.path={make_corpus(tmp_path)}", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
               "data.val_fraction=0.05", held)
    shard_dir, fingerprint, rows, val = load_sources(cfg, lambda build: build())
    assert isinstance(rows, TokenShards) and str(rows.path) == shard_dir
    assert val.names == ["held"] and val.weights == [1.0]
    meta = val.rows[0].meta
    assert meta["tokenizer_fingerprint"] == fingerprint == rows.meta["tokenizer_fingerprint"]
    assert meta["val_fraction"] == 0.0 and len(val.rows[0]) == meta["splits"]["train"]["rows"] > 0


def test_a_source_without_documents_stops_train_py_in_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    code = make_corpus(tmp_path)
    p = train(_args(tmp_path, "run", [f"data.sources=[{{path: {code}}}, {{path: {tmp_path / 'empty.jsonl'}}}]"]),
              check=False)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.match(r"error: data.sources\[1\] \('empty', path '.*empty.jsonl'\): corpus .* contains no non-empty "
                    "documents", errors[0])
    assert "data:" not in p.stdout   # nothing was prepared


@pytest.mark.slow
def test_two_sources_train_and_resume_at_another_world_size(tmp_path):
    """A 6-step run on two sources at weights 0.7/0.3, saved at step 3; resumed from there on 1 process
    (the same layout: bit-identical) and on 2 processes (the same global batch of 4 rows)."""
    sources = _two_sources(tmp_path)
    common = sources + ["train.max_steps=6", "train.eval_every=3", "train.keep_last=5"]
    train(_args(tmp_path, "ref", common + ["train.save_every=3"]))
    ckpt = tmp_path / "ref" / "checkpoints" / checkpoint.checkpoint_name(3)
    train(_args(tmp_path, "same", common + [f"train.resume={ckpt}", "train.save_every=100"]))
    spawn_ranks(2, _args(tmp_path, "two", common + [f"train.resume={ckpt}", "train.save_every=100",
                                                    "train.micro_batch_size=2"]))
    ref = metrics(tmp_path / "ref")
    assert [r["step"] for r in ref] == [1, 2, 3, 4, 5, 6]
    for r in ref:   # 4 rows x 32 tokens per step, 0.7 / 0.3 within one row
        assert sum(r["tokens_by_source"].values()) == r["tokens"]
        assert abs(r["tokens_by_source"]["code"] - 0.7 * r["tokens"]) < 32
    last = ref[-1]
    assert set(last["val_loss_by_source"]) == {"held"} and last["val_loss"] == last["val_loss_by_source"]["held"]
    keys = ("loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "val_loss")
    same, two = metrics(tmp_path / "same"), metrics(tmp_path / "two")
    assert [r["step"] for r in same] == [r["step"] for r in two] == [4, 5, 6]
    for a, b, c in zip(ref[3:], same, two):
        assert b["tokens_by_source"] == c["tokens_by_source"] == a["tokens_by_source"]
        assert {k: b.get(k) for k in keys} == {k: a.get(k) for k in keys}, f"step {a['step']}"
        for k in keys:
            if k in a:
                assert c[k] == pytest.approx(a[k], rel=1e-5), f"2 processes, step {a['step']} {k}"


@pytest.mark.slow
def test_without_val_sources_each_source_split_has_its_val_loss(tmp_path):
    train(_args(tmp_path, "run", _two_sources(tmp_path)[:1] + ["train.max_steps=2", "train.eval_every=2"]))
    last = metrics(tmp_path / "run")[-1]
    by = last["val_loss_by_source"]
    assert set(by) == {"code", "prose"}
    assert last["val_loss"] == pytest.approx(0.7 * by["code"] + 0.3 * by["prose"], rel=1e-12)


def test_prepare_data_script_prepares_every_source_once(tmp_path, capsys):
    """scripts/prepare_data.py with data.sources prepares the tokenizer and every source; a run with the same
    config then only finds them (the tokenizer is not trained again, no source is prepared again)."""
    from scripts.prepare_data import main as prepare_data

    overrides = [*TINY_MODEL, f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32", *_two_sources(tmp_path)]
    assert prepare_data(["--no-progress", *overrides]) == 0
    out = capsys.readouterr().out    # the "data: ..." log lines, then the directories as JSON
    printed = json.loads(out[out.index("\n{") + 1:])
    assert set(printed["train"]) == {"code", "prose"} and set(printed["val"]) == {"held"}
    tok_key = tmp_path / "cache" / "tokenizer" / "train_key.json"
    stamps = {p: p.stat().st_mtime_ns for p in [tok_key, *(tmp_path / "cache").glob("shards-*/meta.json")]}
    shard_dir, _, rows, val = load_sources(_cfg(*overrides), lambda build: build())
    assert shard_dir["train"] == printed["train"] and shard_dir["val"] == printed["val"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert rows.names == ["code", "prose"] and val.names == ["held"]
