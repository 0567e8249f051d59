"""Data pipeline tests: real small files in tmp_path, no mocks."""

from __future__ import annotations

import json
import os
import re

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from data import (
    ShardedSampler,
    TokenShards,
    batch_from_rows,
    build_dataset_cache,
    load_corpus,
    load_tokenizer,
    prepare_shards,
    read_meta,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)

DOCS = [f"Document {i}: the quick brown fox {i * 7} jumps over the lazy dog.\n" * (3 + i % 5)
        for i in range(40)]


# ---------------------------------------------------------------- corpus

def _texts(ds: datasets.Dataset) -> list[str]:
    assert ds.column_names == ["text"]
    return list(ds["text"])


def test_load_text_file_and_folder(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("hello world\n")
    assert _texts(load_corpus(str(f))) == ["hello world\n"]

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("alpha")
    (folder / "sub" / "b.py").write_text("print('beta')")
    (folder / "c.rst").write_text("gamma")
    (folder / "blob.txt").write_bytes(b"\x00\x01\xff\xfe binary")  # skipped, not fatal
    (folder / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # undecodable: skipped
    (folder / "image.png").write_bytes(b"\x89PNG")  # unknown suffix: ignored
    assert _texts(load_corpus(str(folder))) == ["alpha", "gamma", "print('beta')"]
    assert len(load_corpus(str(folder), max_files=1)) == 1


def test_load_jsonl_parquet_and_saved(tmp_path):
    rows = [{"body": f"doc {i}", "n": i} for i in range(5)] + [{"body": "", "n": 5}]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert _texts(load_corpus(str(jl), text_field="body")) == [f"doc {i}" for i in range(5)]

    pq_dir = tmp_path / "pq"
    pq_dir.mkdir()
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(pq_dir / "part0.parquet"))
    datasets.Dataset.from_list(rows[3:5]).to_parquet(str(pq_dir / "part1.parquet"))
    assert _texts(load_corpus(str(pq_dir), text_field="body")) == [f"doc {i}" for i in range(5)]
    assert len(load_corpus(str(pq_dir / "part1.parquet"), text_field="body")) == 2

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["x", "y"], "id": [1, 2]}).save_to_disk(str(saved))
    assert _texts(load_corpus(str(saved))) == ["x", "y"]
    saved_dict = tmp_path / "saved_dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["z"]})}).save_to_disk(str(saved_dict))
    assert _texts(load_corpus(str(saved_dict))) == ["z"]


def test_corpus_errors_name_path_and_field(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(str(missing))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_dir"):
        load_corpus(str(empty))
    only_binary = tmp_path / "bin_dir"
    only_binary.mkdir()
    (only_binary / "x.txt").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="bin_dir"):
        load_corpus(str(only_binary))
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match=r"'text'.*c\.jsonl.*body"):
        load_corpus(str(jl))


def test_default_stdlib_corpus():
    ds = load_corpus(None, max_files=20)
    assert len(ds) == 20 and ds.column_names == ["text"]
    assert _texts(ds) == _texts(load_corpus(None, max_files=20))  # deterministic order
    assert any("def " in t or "import " in t for t in ds["text"])


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(DOCS, vocab_size=300, out_dir=str(out))
    return str(out)


def test_tokenizer_roundtrip_reload_fingerprint(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir)
    auto = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    text = "def f(x):\n    return x  # héllo 🙂 unseen ZQX"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and auto.decode(ids) == text
    assert len(tok) <= 300 and tok.eos_token == "<|endoftext|>"
    fp = tokenizer_fingerprint(tok)
    assert len(fp) == 64 and fp == tokenizer_fingerprint(auto) == tokenizer_fingerprint(load_tokenizer(tok_dir))
    other = train_bpe_tokenizer(DOCS, vocab_size=280, out_dir=str(tmp_path / "other"))
    assert tokenizer_fingerprint(other) != fp
    with pytest.raises(FileNotFoundError, match="missing_tok"):
        load_tokenizer(str(tmp_path / "missing_tok"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(ValueError, match="junk"):
        load_tokenizer(str(tmp_path / "junk"))
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(DOCS, vocab_size=100, out_dir=str(tmp_path / "small"))


# ---------------------------------------------------------------- packing

@pytest.fixture(scope="module")
def shard_dir(tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    ds = datasets.Dataset.from_dict({"text": DOCS})
    prepare_shards(ds, load_tokenizer(tok_dir), str(out), seq_len=16, val_fraction=0.05, rows_per_shard=7)
    return str(out)


def test_packing_layout_and_metadata(tok_dir, shard_dir):
    tok = load_tokenizer(tok_dir)
    meta = read_meta(shard_dir)
    expected = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                               for d in DOCS])
    n_rows = len(expected) // 17
    assert meta["num_documents"] == len(DOCS) and meta["num_tokens"] == len(expected)
    assert meta["dropped_tokens"] == len(expected) - n_rows * 17 < 17
    assert meta["dtype"] == "uint16" and meta["seq_len"] == 16
    train, val = TokenShards(shard_dir), TokenShards(shard_dir, "val")
    assert len(val) == max(1, int(n_rows * 0.05)) and len(train) + len(val) == n_rows
    assert meta["splits"]["train"]["tokens"] == len(train) * 17
    assert all(s["rows"] <= 7 for s in meta["splits"]["train"]["shards"])
    assert len(meta["splits"]["train"]["shards"]) == -(-len(train) // 7)  # several shard files
    rows = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    assert all(r.dtype == np.int64 and r.shape == (17,) for r in rows)
    np.testing.assert_array_equal(np.concatenate(rows), expected[: n_rows * 17])  # EOS between docs
    assert tok.decode(train[0]).startswith(DOCS[0][:20])
    np.testing.assert_array_equal(train[-1], train[len(train) - 1])

    inputs, labels = batch_from_rows(train, np.array([3, 0]))
    assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == (2, 16)
    assert torch.equal(inputs[0, 1:], labels[0, :-1]) and torch.equal(inputs[1], torch.from_numpy(train[0][:-1]))


def test_prepare_reuses_cache(tok_dir, shard_dir):
    before = {f: os.stat(os.path.join(shard_dir, f)).st_mtime_ns for f in os.listdir(shard_dir)}
    ds = datasets.Dataset.from_dict({"text": DOCS})
    meta = prepare_shards(ds, load_tokenizer(tok_dir), shard_dir, seq_len=16, val_fraction=0.05, rows_per_shard=7)
    after = {f: os.stat(os.path.join(shard_dir, f)).st_mtime_ns for f in os.listdir(shard_dir)}
    assert before == after and meta == read_meta(shard_dir)


def test_prepare_rebuilds_on_new_params(tok_dir, tmp_path):
    tok, ds = load_tokenizer(tok_dir), datasets.Dataset.from_dict({"text": DOCS})
    prepare_shards(ds, tok, str(tmp_path), seq_len=16, val_fraction=0.05, rows_per_shard=7)
    meta = prepare_shards(ds, tok, str(tmp_path), seq_len=32, val_fraction=0.05)
    assert meta["seq_len"] == 32 and TokenShards(str(tmp_path))[0].shape == (33,)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train_00000.bin", "val_00000.bin"]
    with pytest.raises(ValueError, match="too small"):
        prepare_shards(ds, tok, str(tmp_path / "big"), seq_len=100_000)


def _copy(src: str, dst) -> str:
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes(open(os.path.join(src, f), "rb").read())
    return str(dst)


def test_bad_shards_give_clear_errors(shard_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such"):
        TokenShards(str(tmp_path / "no_such"))
    d = _copy(shard_dir, tmp_path / "trunc")
    with open(os.path.join(d, "train_00001.bin"), "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(ValueError, match=r"train_00001\.bin.*truncated"):
        TokenShards(d)

    d = _copy(shard_dir, tmp_path / "corrupt")
    with open(os.path.join(d, "meta.json"), "w") as fh:
        fh.write('{"format": "moe-token-shards", "vers')
    with pytest.raises(ValueError, match=r"corrupt.*corrupt[/\\]meta\.json"):
        TokenShards(d)
    meta = read_meta(shard_dir)
    for edit, pattern in [({"version": 99}, "version 99"), ({"seq_len": None}, "missing keys.*seq_len")]:
        bad = {k: v for k, v in {**meta, **edit}.items() if v is not None}
        with open(os.path.join(d, "meta.json"), "w") as fh:
            json.dump(bad, fh)
        with pytest.raises(ValueError, match=pattern):
            TokenShards(d)
    os.remove(os.path.join(d, "meta.json"))
    with pytest.raises(FileNotFoundError, match="interrupted"):
        TokenShards(d)

    with pytest.raises(ValueError, match=re.escape(shard_dir) + ".*another tokenizer"):
        TokenShards(shard_dir, expected_fingerprint="0" * 64)
    TokenShards(shard_dir, expected_fingerprint=meta["tokenizer_fingerprint"], expected_vocab_size=300)
    with pytest.raises(ValueError, match=re.escape(shard_dir) + r".*token id \d+ >= vocab size 50"):
        TokenShards(shard_dir, expected_vocab_size=50)
    with pytest.raises(ValueError, match="'test' not in"):
        TokenShards(shard_dir, split="test")


def test_empty_val_split_is_an_error(tok_dir, tmp_path):
    prepare_shards(datasets.Dataset.from_dict({"text": DOCS}), load_tokenizer(tok_dir), str(tmp_path),
                   seq_len=16, val_fraction=0.0)
    assert len(TokenShards(str(tmp_path))) > 0
    with pytest.raises(ValueError, match="'val'.*empty"):
        TokenShards(str(tmp_path), "val")


def test_build_dataset_cache_hits(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    args = (str(corpus), "text", None, 300, 16, str(tmp_path / "cache"), 0.05)
    out = build_dataset_cache(*args)
    tok = load_tokenizer(str(tmp_path / "cache" / "tokenizer"))
    shards = TokenShards(out, expected_vocab_size=300, expected_fingerprint=tokenizer_fingerprint(tok))
    assert len(shards) > 0 and len(TokenShards(out, "val")) > 0
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(tmp_path / "cache") for f in fs if f != ".prepare.lock"]
    before = {f: os.stat(f).st_mtime_ns for f in files}
    assert build_dataset_cache(*args) == out
    assert {f: os.stat(f).st_mtime_ns for f in files} == before  # no retraining, no rewriting
    # A different seq_len reuses the tokenizer but gets its own shard folder.
    out2 = build_dataset_cache(str(corpus), "text", None, 300, 8, str(tmp_path / "cache"), 0.05)
    assert out2 != out and TokenShards(out2).seq_len == 8
    assert os.stat(tmp_path / "cache" / "tokenizer" / "tokenizer.json").st_mtime_ns == \
        before[str(tmp_path / "cache" / "tokenizer" / "tokenizer.json")]
    # A given tokenizer is used as is; one bigger than the model's vocabulary is refused.
    out3 = build_dataset_cache(str(corpus), "text", str(tmp_path / "cache" / "tokenizer"), 512, 16,
                               str(tmp_path / "cache2"), 0.05)
    assert read_meta(out3)["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_dataset_cache(str(corpus), "text", str(tmp_path / "cache" / "tokenizer"), 100, 16,
                            str(tmp_path / "cache3"), 0.05)


# ---------------------------------------------------------------- sampler

def _run(sampler: ShardedSampler, steps: int) -> list[np.ndarray]:
    return [sampler.next_batch() for _ in range(steps)]


def test_sampler_world_size_invariant_and_deterministic():
    num_rows, steps = 103, 60  # 103 // 8 = 12 steps per epoch: several epoch rollovers
    one = _run(ShardedSampler(num_rows, 8, 0, 1, seed=3), steps)
    assert all(b.dtype == np.int64 and b.shape == (8,) for b in one)
    two = [_run(ShardedSampler(num_rows, 4, r, 2, seed=3), steps) for r in range(2)]
    four = [_run(ShardedSampler(num_rows, 2, r, 4, seed=3), steps) for r in range(4)]
    for step in range(steps):
        np.testing.assert_array_equal(np.concatenate([two[0][step], two[1][step]]), one[step])
        np.testing.assert_array_equal(np.concatenate([f[step] for f in four]), one[step])
    again = _run(ShardedSampler(num_rows, 8, 0, 1, seed=3), steps)
    assert all(np.array_equal(a, b) for a, b in zip(one, again))
    other_seed = _run(ShardedSampler(num_rows, 8, 0, 1, seed=4), steps)
    assert not all(np.array_equal(a, b) for a, b in zip(one, other_seed))


def test_sampler_epochs_roll_over():
    s = ShardedSampler(10, 3, 0, 1, seed=0)  # 3 steps per epoch, 1 row dropped each epoch
    epoch0 = np.concatenate(_run(s, 3))
    assert s.epoch == 0 and len(set(epoch0.tolist())) == 9
    epoch1 = np.concatenate(_run(s, 3))
    assert s.epoch == 1 and len(set(epoch1.tolist())) == 9 and not np.array_equal(epoch0, epoch1)
    plain = ShardedSampler(10, 5, 0, 1, seed=0, shuffle=False)
    assert [b.tolist() for b in _run(plain, 3)] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="num_rows"):
        ShardedSampler(5, 4, 0, 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        ShardedSampler(50, 4, 2, 2, seed=0)


def test_sampler_resume_mid_epoch():
    ref = ShardedSampler(50, 4, 1, 2, seed=7)
    _run(ref, 5)  # 6 steps per epoch: stop mid-epoch
    state = json.loads(json.dumps(ref.state_dict()))  # plain JSON types
    expected = _run(ref, 20)
    resumed = ShardedSampler(50, 4, 1, 2, seed=7)
    resumed.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(expected, _run(resumed, 20)))
    # Resuming on a different world size with the same global batch continues the same data.
    solo = ShardedSampler(50, 8, 0, 1, seed=7)
    solo.load_state_dict(state)
    assert np.array_equal(solo.next_batch()[4:], expected[0])
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardedSampler(50, 2, 0, 1, seed=7).load_state_dict(state)


def test_a_pass_order_is_numpys_permutation_in_half_the_memory():
    """data/sampler.py's shuffled_rows: the order rng.permutation(n) gives (the data order of every earlier run,
    so checkpoints resume onto the same rows), held in int32; the batches stay int64."""
    from data.sampler import shuffled_rows

    for n in (1, 97, 100_003):
        order = shuffled_rows([7, 3], n)
        assert order.dtype == np.int32 and np.array_equal(order, np.random.default_rng([7, 3]).permutation(n))
    s = ShardedSampler(1000, 4, rank=1, world_size=2, seed=7)
    assert s._epoch_order().nbytes == 4000
    batch = s.next_batch()
    assert batch.dtype == np.int64 and np.array_equal(batch, np.random.default_rng([7, 0]).permutation(1000)[4:8])


def test_a_small_corpus_prepares_in_one_process_and_workers_never_fork_this_one(tmp_path, caplog, tok_dir):
    """data.num_proc null: a corpus under SMALL_CORPUS_BYTES is tokenized in the preparing process (worker start-up
    would not pay); explicit workers come from a forkserver, never a fork of a process that runs other threads (a
    forked worker once hung on a lock one of them held), and give the same ids."""
    import logging

    from data.cache import SMALL_CORPUS_BYTES
    from data.encode import Encoder, encode_stream, pool_context

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    assert corpus.stat().st_size < SMALL_CORPUS_BYTES
    with caplog.at_level(logging.INFO, logger="data"):
        build_dataset_cache(str(corpus), "text", None, 300, 16, str(tmp_path / "cache"), 0.05)
    assert "with 1 process(es)" in caplog.text, caplog.text
    assert pool_context().get_start_method() == "forkserver"
    pieces = [(d, True) for d in DOCS * 3]
    encoder = Encoder(load_tokenizer(tok_dir))
    here = [e.ids.tolist() for e in encode_stream(pieces, encoder, num_proc=1)]
    assert [e.ids.tolist() for e in encode_stream(pieces, encoder, num_proc=2)] == here
