"""Issue 35, items 1-3: the tokenizer check compares against the run's own tokenizer, a special token's
string inside a document stays text, and start-up checks the vocabulary from ids recorded at preparation
(the full scan is scripts/verify_data.py). Real small files on disk, no mocks of the code under test."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from configs.schema import load_config
from data import (
    TokenShards,
    batch_from_rows,
    build_dataset_cache,
    load_tokenizer,
    prepare_shards,
    read_meta,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from tests.train_helpers import ROOT, TINY_MODEL, make_corpus, run_args, train

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * 7}  # the quick brown fox\n" * (2 + i % 4) for i in range(40)]
EOS = "<|endoftext|>"
# A page about GPT-2 and a chat transcript: special-token strings that are text, not separators.
SPECIAL_DOC = f"print('{EOS}')  # GPT-2's document separator\n<|im_start|>user hi{EOS}\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(DOCS, vocab_size=300, out_dir=str(out))
    return str(out)


def _prepare(tok, out, docs=DOCS, **kw) -> dict:
    return prepare_shards(datasets.Dataset.from_dict({"text": docs}), tok, str(out), seq_len=16,
                          val_fraction=0.05, **{"rows_per_shard": 7, **kw})


def verify_data(argv: list[str]) -> int:
    from scripts.verify_data import main  # imported here: the tests of items 1-2 run without it

    return main(argv)


def _stream(d) -> np.ndarray:
    """Every kept token of a shard directory, train then val, in packing order."""
    rows = [TokenShards(str(d), s) for s in ("train", "val")]
    return np.concatenate([r[i] for r in rows for i in range(len(r))])


# ---------------------------------------------------------------- 1. the tokenizer check compares two things

def test_run_refuses_shards_prepared_with_another_tokenizer(tok_dir, tmp_path, monkeypatch):
    """train.load_data checks the shards against the fingerprint of the tokenizer the run loads
    (data.tokenizer, else data.cache_dir/tokenizer), not against their own meta.json. The shard
    directory comes from a preparer that used tokenizer A (another node's cache, a directory prepared
    elsewhere); the run's tokenizer is B: refused, in one line naming both fingerprints and the directory."""
    import train

    shards = tmp_path / "shards_a"
    _prepare(load_tokenizer(tok_dir), shards)
    other = tmp_path / "tok_b"
    train_bpe_tokenizer(DOCS, vocab_size=280, out_dir=str(other))
    fp_a, fp_b = tokenizer_fingerprint(load_tokenizer(tok_dir)), tokenizer_fingerprint(load_tokenizer(str(other)))
    assert fp_a != fp_b
    monkeypatch.setattr(train, "prepare_data", lambda cfg, rank, device: str(shards))   # the directory handed over
    base = [*TINY_MODEL, f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16", "train.eval_batches=1"]

    with pytest.raises(ValueError) as err:
        train.load_data(load_config(None, [*base, f"data.tokenizer={other}"]), 0, torch.device("cpu"))
    msg = str(err.value)
    assert "\n" not in msg and str(shards) in msg and "another tokenizer" in msg, msg
    assert fp_a[:16] in msg and fp_b[:16] in msg, msg

    # the BPE trained into data.cache_dir/tokenizer is the run's tokenizer when data.tokenizer is unset
    shutil.copytree(other, tmp_path / "cache" / "tokenizer")
    with pytest.raises(ValueError, match=re.escape(fp_b[:16])):
        train.load_data(load_config(None, base), 0, torch.device("cpu"))

    # the same shards with the tokenizer that made them load, and the run records that tokenizer
    shard_dir, fingerprint, rows, val = train.load_data(load_config(None, [*base, f"data.tokenizer={tok_dir}"]), 0,
                                                        torch.device("cpu"))
    assert (shard_dir, fingerprint) == (str(shards), fp_a) and len(rows) > 0 and len(val) > 0


# ---------------------------------------------------------------- 2. special-token strings stay text

def test_special_token_strings_in_a_document_stay_text(tok_dir, tmp_path):
    """`<|endoftext|>` (and the tokenizer's other special tokens) inside a document are encoded as
    text: the only EOS ids in the packed stream are the separators, every document round-trips
    through decode, and meta.json counts the strings."""
    tok = load_tokenizer(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    docs = [SPECIAL_DOC, *DOCS[:10], SPECIAL_DOC.upper(), *DOCS[10:]]   # upper(): no special strings left
    meta = _prepare(tok, tmp_path / "a", docs)
    stream = _stream(tmp_path / "a")
    pieces = np.split(stream, np.flatnonzero(stream == tok.eos_token_id) + 1)[:-1]   # each ends with its EOS
    assert [tok.decode(p[:-1]) for p in pieces] == docs[:len(pieces)] and len(pieces) >= len(docs) - 1
    assert im_start not in stream
    assert meta["special_tokens_in_text"] == {"documents": 1, "occurrences": {EOS: 2, "<|im_start|>": 1}}
    # without them the document encodes as before (the ordinary tokenizer call gives the same ids)
    assert pieces[1][:-1].tolist() == tok(docs[1], add_special_tokens=False)["input_ids"]

    # the same with the tokenizer pickled into worker processes (which drops the encoder's settings)
    _prepare(tok, tmp_path / "b", docs, num_proc=2)
    np.testing.assert_array_equal(_stream(tmp_path / "b"), stream)


def test_bpe_training_reads_special_token_strings_as_text(tmp_path):
    """The BPE trainer sees a document's `<|endoftext|>` as characters (it learns merges from them);
    the special token itself stays one id that the text never produces. (This held before too: the
    `tokenizers` trainer does not split on added tokens; the test keeps it so.)"""
    tok = train_bpe_tokenizer([SPECIAL_DOC * 20] + DOCS, vocab_size=400, out_dir=str(tmp_path / "tok"))
    assert "endoftext" in tok.get_vocab()
    meta = _prepare(tok, tmp_path / "shards", [SPECIAL_DOC * 20] + DOCS)
    first = _stream(tmp_path / "shards")
    first = first[: int(np.argmax(first == tok.eos_token_id))]
    assert tok.decode(first) == SPECIAL_DOC * 20
    assert meta["special_tokens_in_text"] == {"documents": 1, "occurrences": {EOS: 40}}


def test_preparation_log_line_counts_special_token_strings(tmp_path):
    """train.py prints preparation's closing line, with the count, on rank 0."""
    corpus = make_corpus(tmp_path)
    (corpus / "gpt2.py").write_text(SPECIAL_DOC * 3, encoding="utf-8")
    p = train(run_args(tmp_path, corpus, extra=["train.max_steps=1", "train.eval_every=1"]))
    line = next(x for x in p.stdout.splitlines() if x.startswith("data: prepared "))
    assert f"special-token strings kept as text: '{EOS}' x6 in 1 document(s)" in line, line
    meta = read_meta(json.loads((tmp_path / "run" / "run.json").read_text())["shard_dir"])
    assert meta["special_tokens_in_text"] == {"documents": 1, "occurrences": {EOS: 6}}


def test_a_cache_from_before_is_prepared_again(tmp_path):
    """A shard cache written by the previous format (version 1: special-token strings parsed as
    special ids, no recorded largest ids) is prepared again, not reused."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in [SPECIAL_DOC, *DOCS]))
    args = (str(corpus), "text", None, 300, 16, str(tmp_path / "cache"), 0.05)
    out = build_dataset_cache(*args)
    meta = read_meta(out)
    old = {k: v for k, v in json.loads(json.dumps(meta)).items() if k != "special_tokens_in_text"}
    old["version"] = 1
    for info in old["splits"].values():
        for s in info["shards"]:
            s.pop("max_id")
    (Path(out) / "meta.json").write_text(json.dumps(old))
    assert read_meta(out)["version"] == 1          # still readable ...
    assert build_dataset_cache(*args) == out
    assert read_meta(out) == meta                    # ... but prepared again, in the current format


# ---------------------------------------------------------------- 3. start-up reads recorded ids, not tokens

@pytest.fixture
def shards(tok_dir, tmp_path):
    d = tmp_path / "shards"
    _prepare(load_tokenizer(tok_dir), d)
    return d


def _poke(path, row: int, col: int, value: int, dtype=np.uint16) -> None:
    """Overwrite one token of a shard file in place (the damage a bad copy or disk does)."""
    m = np.memmap(path, dtype=dtype, mode="r+").reshape(-1, 17)
    m[row, col] = value
    m.flush()


def test_max_id_is_recorded_per_shard(shards):
    meta = read_meta(shards)
    for info in meta["splits"].values():
        for s in info["shards"]:
            assert s["max_id"] == int(np.fromfile(shards / s["file"], dtype=np.uint16).max())
    assert len({s["max_id"] for s in meta["splits"]["train"]["shards"]}) > 1   # per shard, not one number


def test_start_up_reads_recorded_ids_and_verify_data_reads_every_token(shards, capsys):
    """TokenShards checks the vocabulary from meta.json: a token damaged in the middle of a shard is
    not read at start-up (every token was, on every rank, before); the row holding it fails when it
    is read for a batch, naming the shard, and scripts/verify_data.py reads every token and names it."""
    _poke(shards / "train_00002.bin", 3, 5, 4000)
    rows = TokenShards(str(shards), expected_vocab_size=300)
    index = 2 * 7 + 3                                       # shards of 7 rows: row 3 of train_00002.bin
    with pytest.raises(ValueError, match=re.escape(str(shards / "train_00002.bin")) + r" contains token id 4000 "
                       r">= vocab size 300 \(in row 3; .*verify_data\.py"):
        batch_from_rows(rows, [0, index])
    assert rows[index - 1].max() < 300 and len(TokenShards(str(shards))[index]) == 17   # no vocabulary: no check

    assert verify_data([str(shards), "--vocab-size", "300"]) == 1
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == sum(len(i["shards"]) for i in read_meta(shards)["splits"].values())   # one per shard
    assert lines[2].startswith("BAD train train_00002.bin") and all(x.startswith("ok ") for x in lines[:2])
    assert err.strip() == (f"error: {shards / 'train_00002.bin'}: contains token id 4000 >= vocab size 300")


def test_recorded_id_beyond_the_vocab_is_one_line(shards, tok_dir):
    top = [s["max_id"] for s in read_meta(shards)["splits"]["train"]["shards"]]
    vocab = sorted(top)[len(top) // 2]                      # some shards fit, some do not
    first = next(i for i, m in enumerate(top) if m >= vocab)
    with pytest.raises(ValueError) as err:
        TokenShards(str(shards), expected_vocab_size=vocab)
    assert "\n" not in str(err.value)
    assert re.match(re.escape(str(shards / f"train_{first:05d}.bin")) + f" contains token id {top[first]} "
                    f">= vocab size {vocab} ", str(err.value)), err.value
    # a recorded id the scan would not find (the file still fits): only the record is read
    meta = json.loads((shards / "meta.json").read_text())
    meta["splits"]["train"]["shards"][1]["max_id"] = 70000
    (shards / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"train_00001\.bin contains token id 70000 >= vocab size 300 "):
        TokenShards(str(shards), expected_vocab_size=300)


def test_rows_read_are_checked_against_the_record(shards):
    """A row read with an id above its shard's recorded largest (but inside the vocabulary) fails too;
    a file replaced from its start (a pickle, another dtype) fails at start-up, where its first row is read."""
    shard = read_meta(shards)["splits"]["train"]["shards"][1]
    _poke(shards / "train_00001.bin", 6, 16, 1000)
    rows = TokenShards(str(shards), expected_vocab_size=2000)
    with pytest.raises(ValueError, match=rf"train_00001\.bin contains token id 1000 in row 6, above the largest id "
                                         rf"{shard['max_id']} recorded in meta\.json .*verify_data\.py"):
        rows.get_rows([13])
    _poke(shards / "train_00000.bin", 0, 0, 5000)
    with pytest.raises(ValueError, match=r"train_00000\.bin contains token id 5000 >= vocab size 300 \(in row 0"):
        TokenShards(str(shards), expected_vocab_size=300)


def test_shards_from_before_still_load_with_a_full_scan(shards, caplog, capsys):
    """Version-1 directories have no recorded ids: they load, and their vocabulary check reads every
    token as before (with a warning saying so); verify_data.py scans them too."""
    meta = json.loads((shards / "meta.json").read_text())
    meta["version"] = 1
    for info in meta["splits"].values():
        for s in info["shards"]:
            s.pop("max_id")
    (shards / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="data"):
        assert len(TokenShards(str(shards), expected_vocab_size=300)) > 0
    assert "before shards recorded their largest token id" in caplog.text
    assert verify_data([str(shards)]) == 0
    assert "not recorded (format version 1)" in capsys.readouterr().out
    _poke(shards / "train_00002.bin", 3, 5, 4000)
    with pytest.raises(ValueError, match=r"train_00002\.bin contains token id 4000 >= vocab size 300 \(found by a "
                                         r"full scan\)"):
        TokenShards(str(shards), expected_vocab_size=300)

    meta["version"] = 2                                    # the current format must record them
    (shards / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"corrupt shard metadata .*train_00000\.bin' has max_id=None"):
        TokenShards(str(shards))


def test_verify_data_command(shards):
    """The command as a user runs it: one line per shard and exit 0; a shard whose tokens disagree with
    its recorded largest id, or a truncated one, exits 1 naming the first bad shard."""
    cmd = [sys.executable, "scripts/verify_data.py", str(shards), "--vocab-size", "5000"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert p.stdout.splitlines()[-1].startswith(f"{shards}: ") and "below vocab size 5000" in p.stdout
    _poke(shards / "train_00001.bin", 2, 2, 1000)
    with open(shards / "val_00000.bin", "r+b") as f:
        f.truncate(4)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert re.fullmatch(re.escape(f"error: {shards / 'train_00001.bin'}: its largest token id is ") + r"\d+, but "
                        r"meta\.json recorded \d+ when it was prepared: the file was changed since\n", p.stderr)
    assert re.search(r"^BAD val   val_00000\.bin: .*4 bytes, expected \d+: truncated or corrupt$", p.stdout, re.M)
    assert verify_data([str(shards.parent / "nothing_here")]) == 2
