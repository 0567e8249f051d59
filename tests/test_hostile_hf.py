"""Hostile and careless weight files (issue 31, items 4, 5, 6, 9 and 10's safetensors headers): a
Hugging Face directory or a checkpoint is checked before anything is built or read, and every refusal
is one line naming the file and the field.

4. config.json is checked against the safetensors headers before any tensor or meta model exists.
5. Every file an index names stays inside its directory (one check, model/hf/safe_paths.py).
6. Export checks trainer_state.json's shapes against the index and the shard headers, and refuses gaps.
9. Float fields the math needs finite and positive, also from config.json.
10. Hostile safetensors headers are one line naming the file, in import and export.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
from pathlib import Path

import pytest
import torch

from model.hf import load_hf, save_hf, weight_reader
from model.hf.manifest import write_manifest
from model.transformer import DeepseekV3
from scripts import export_hf, import_hf
from tests.helpers import tiny_cfg


@pytest.fixture
def no_hang():
    """The old code ran on for minutes (10^6 layers) or allocated gigabytes: fail after 60 s instead."""
    def _raise(signum, frame):
        raise TimeoutError("still running after 60 s")
    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny DeepSeek-V3 HF directory in shards with an index (model.safetensors.index.json)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf") / "model"
    save_hf(DeepseekV3(tiny_cfg()).eval(), str(path), max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _first_shard(src: Path) -> Path:
    return src / sorted(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _errors(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def _import(src: Path, out: Path, capsys, *extra: str) -> list[str]:
    rc = import_hf.main(["--hf", str(src), "--out", str(out), *extra])
    errors = _errors(capsys)
    assert rc == 2 and len(errors) == 1, errors
    return errors


# ---------------------------------------------------------------- 10. hostile safetensors headers

def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def _forge(path: Path, how: str) -> str:
    """Damage ``path``'s header as ``how`` says; -> the text the refusal must contain."""
    header, data = _header(path)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    first, second = names[0], names[1]
    if how == "size 2^62":
        _write(path, header, data, length=2**62)
        return f"header length {2**62} exceeds the safetensors limit"
    if how == "negative offset":
        header[first]["data_offsets"][0] = -8
        _write(path, header, data)
        return f"tensor {first!r}: data_offsets [-8, "
    if how == "overlapping":
        a, b = header[second]["data_offsets"]
        header[second]["data_offsets"] = [a - 4, b - 4]
        _write(path, header, data)
        return f"tensor {second!r} at bytes {a - 4}..{b - 4} overlaps {first!r}"
    if how == "out of range":
        last = names[-1]
        a, b = header[last]["data_offsets"]
        header[last]["shape"] = [2**40]
        header[last]["data_offsets"] = [a, a + 2**40 * 4]
        _write(path, header, data)
        return "truncated"
    if how == "U32":
        header[first]["dtype"] = "U32"
        _write(path, header, data)
        return f"tensor {first!r}: dtype 'U32' is not one this reader handles"
    raise AssertionError(how)


HOSTILE = ["size 2^62", "negative offset", "overlapping", "out of range", "U32"]


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_headers_are_one_line_in_import(hf_dir, tmp_path, capsys, how):
    src = _copy(hf_dir, tmp_path / "hf")
    shard = _first_shard(src)
    want = _forge(shard, how)
    (error,) = _import(src, tmp_path / "out", capsys)
    assert error.startswith(f"error: {shard}: ") and want in error, error
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_headers_are_one_line_in_export(hf_dir, tmp_path, capsys, how):
    assert import_hf.main(["--hf", str(hf_dir), "--out", str(tmp_path / "init")]) == 0
    f = tmp_path / "init" / weight_reader.MODEL
    want = _forge(f, how)
    write_manifest(tmp_path / "init")       # a forged file with a matching manifest: the header is what is checked
    rc = export_hf.main(["--checkpoint", str(tmp_path / "init"), "--out", str(tmp_path / "hf_out")])
    (error,) = _errors(capsys)[-1:]
    assert rc == 2 and error.startswith(f"error: {f}: ") and want in error, error


# ---------------------------------------------------------------- 4. config.json against the headers

def _edit_config(src: Path, **changes: object) -> None:
    f = src / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, want", [
    (dict(num_hidden_layers=10**6), "num_hidden_layers=1000000, but the weights' safetensors headers hold layers 0..2"),
    (dict(n_routed_experts=10**7, n_group=1, topk_group=1),
     "n_routed_experts=10000000, but the weights' safetensors headers hold 8 experts in layer 1"),
    (dict(hidden_size=8192), "hidden_size=8192, but the weights' safetensors headers hold model.embed_tokens.weight"),
    (dict(vocab_size=10**9), "vocab_size=1000000000, but the weights' safetensors headers hold"),
    (dict(moe_intermediate_size=10**6), "moe_intermediate_size=1000000, but the weights' safetensors headers hold "
                                        "experts of width 16 in layer 1"),
    (dict(num_attention_heads=4096, num_key_value_heads=4096), "weights do not match its config.json: missing [], "
                                                               "unexpected [], wrong shape"),
])
def test_config_json_is_checked_against_the_headers_before_anything_is_built(hf_dir, tmp_path, capsys, no_hang,
                                                                                change, want):
    src = _copy(hf_dir, tmp_path / "hf")
    _edit_config(src, **change)
    (error,) = _import(src, tmp_path / "out", capsys, "--mtp", "init")   # --mtp init: MTP layers of that size
    assert want in error and (str(src / "config.json") in error or str(src) in error), error
    with pytest.raises(ValueError, match=re.escape(want)):
        load_hf(str(src))


def test_an_mtp_depth_beyond_the_model_is_refused(hf_dir, tmp_path, capsys, no_hang):
    src = _copy(hf_dir, tmp_path / "hf")
    _edit_config(src, num_nextn_predict_layers=10**6)
    (error,) = _import(src, tmp_path / "out", capsys, "--mtp", "init")
    assert error == (f"error: {src / 'config.json'}: num_nextn_predict_layers=1000000 exceeds num_hidden_layers=3 "
                     "(DeepSeek-V3 uses 1)")


# ---------------------------------------------------------------- 9. floats from config.json

@pytest.mark.parametrize("change, field", [
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps=nan"), (dict(rms_norm_eps=-1e-6), "rms_norm_eps=-1e-06"),
    (dict(rms_norm_eps="abc"), "rms_norm_eps='abc'"), (dict(rope_theta=0), "rope_theta=0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": "abc", "original_max_position_embeddings": 64}),
     "factor='abc' is not a finite number"),
])
def test_config_json_floats_must_be_finite_and_positive(hf_dir, tmp_path, capsys, change, field):
    src = _copy(hf_dir, tmp_path / "hf")
    f = src / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(change)
    cfg.pop("rope_parameters", None) if "rope_theta" in change or "rope_scaling" in change else None
    f.write_text(json.dumps(cfg))           # json writes NaN as the literal NaN, which Python reads back
    (error,) = _import(src, tmp_path / "out", capsys)
    assert error.startswith(f"error: {f}: ") and field in error, error


@pytest.mark.parametrize("override, want", [
    ("model.rms_norm_eps=-1e-6", "model.rms_norm_eps=-1e-06: must be a finite positive number"),
    ("model.rms_norm_eps=0", "model.rms_norm_eps=0.0: must be a finite positive number"),
    ("model.rope_theta=0", "model.rope_theta=0.0: must be a finite positive number"),
    ("model.initializer_range=-0.02", "model.initializer_range=-0.02: must be a finite non-negative number"),
])
def test_config_floats_must_be_positive(override, want):
    from configs.schema import load_config

    with pytest.raises(ValueError) as e:
        load_config(None, [override])
    assert str(e.value) == want


# ---------------------------------------------------------------- 5. never leave the directory

def _index_points_to(src: Path, target: str) -> Path:
    """Rewrite the index so the first shard is read from ``target``; -> the index file."""
    index = src / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    first = _first_shard(src).name
    d["weight_map"] = {k: (target if v == first else v) for k, v in d["weight_map"].items()}
    index.write_text(json.dumps(d))
    return index


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_an_hf_index_naming_a_file_outside_is_refused(hf_dir, tmp_path, capsys, how):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(_first_shard(hf_dir), outside / "x.safetensors")
    src = _copy(hf_dir, tmp_path / "a" / "hf")
    if how == "dotdot":
        index = _index_points_to(src, "../../elsewhere/x.safetensors")
        want = f"error: {index}: file name '../../elsewhere/x.safetensors' is not a plain file name"
    elif how == "absolute":
        index = _index_points_to(src, str(outside / "x.safetensors"))
        want = f"error: {index}: file name '{outside / 'x.safetensors'}' is not a plain file name"
    else:
        shard = _first_shard(src)
        shard.unlink()
        shard.symlink_to(outside / "x.safetensors")
        want = f"error: {src / 'model.safetensors.index.json'}: {shard} is a symlink to {outside / 'x.safetensors'}, " \
               f"outside {src.resolve()}: refused"
    (error,) = _import(src, tmp_path / "out", capsys)
    assert error.startswith(want), error
    with pytest.raises(ValueError, match="refused"):
        load_hf(str(src))


def test_the_hf_cache_layout_with_symlinks_into_blobs_is_accepted(hf_dir, tmp_path, capsys):
    """huggingface_hub's cache: snapshots/REV/NAME -> ../../blobs/SHA. The repository folder is the fence."""
    from model.hf.safe_paths import inside

    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in hf_dir.iterdir():
        shutil.copy(f, repo / "blobs" / f"sha-{f.name}")
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"sha-{f.name}")
    assert import_hf.main(["--hf", str(snap), "--out", str(tmp_path / "out")]) == 0
    # ... but not a link out of the repository folder
    with pytest.raises(ValueError, match="is not a relative path inside the directory"):
        inside(snap, "../../../../etc", "test")
    (snap / "evil.safetensors").symlink_to(tmp_path)
    with pytest.raises(ValueError, match=r"is a symlink to .*, outside .*models--org--tiny: refused"):
        inside(snap, "evil.safetensors", "index")


# ---------------------------------------------------------------- 5 + 6. checkpoints

@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """One real training checkpoint (2 steps of the tiny test model, one process): about 5 s."""
    from tests.train_helpers import make_corpus, run_args, train

    tmp = tmp_path_factory.mktemp("ckpt")
    train(run_args(tmp, make_corpus(tmp), extra=["train.max_steps=1", "train.eval_batches=0"]))
    (ckpt,) = weight_reader.complete_checkpoints(str(tmp / "run"))
    return ckpt


def _rewrite(ckpt: Path, dst: Path, name: str, edit) -> Path:  # noqa: ANN001
    """A copy of the checkpoint with JSON file ``name`` edited and the manifest made to match (what a forger does)."""
    d = _copy(ckpt, dst)
    f = d / name
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))
    write_manifest(d)
    return d


def _export_error(src: Path, tmp_path: Path, capsys) -> str:
    rc = export_hf.main(["--checkpoint", str(src), "--out", str(tmp_path / "hf_out")])
    errors = _errors(capsys)
    assert rc == 2 and len(errors) == 1, errors
    return errors[0]


def test_a_forged_shape_in_trainer_state_is_refused_by_export(checkpoint_dir, tmp_path, capsys):
    def grow(state: dict) -> None:
        state["tensors"]["embed_tokens.weight"][0] *= 2       # twice the rows the shards hold
    d = _rewrite(checkpoint_dir, tmp_path / "c", weight_reader.STATE, grow)
    shape = json.loads((d / weight_reader.STATE).read_text())["tensors"]["embed_tokens.weight"]
    error = _export_error(d, tmp_path, capsys)
    assert error.startswith(f"error: checkpoint {d}: trainer_state.json: tensors.embed_tokens.weight has shape "
                            f"{shape} ({math.prod(shape)} elements), state/index.json and the shard headers hold "
                            f"{math.prod(shape) // 2}"), error
    assert not (tmp_path / "hf_out" / "model.safetensors").exists()


def test_a_gap_in_the_state_index_is_refused_by_export(checkpoint_dir, tmp_path, capsys):
    def drop_chunk(index: dict) -> None:
        md = index["tensors"]["param/embed_tokens.weight"]
        md["size"] = [md["size"][0] * 2]                        # the second half is in no shard
    d = _rewrite(checkpoint_dir, tmp_path / "c", "state/index.json", drop_chunk)
    error = _export_error(d, tmp_path, capsys)
    assert f"error: sharded checkpoint {d / 'state'}: param/embed_tokens.weight has " in error, error


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_a_state_index_naming_a_file_outside_is_refused_by_export_and_init_from(checkpoint_dir, tmp_path, capsys,
                                                                                how):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(checkpoint_dir / "state" / "shard-00000.safetensors", outside)
    if how == "dotdot":
        def point_out(index: dict) -> None:
            for md in index["tensors"].values():
                for c in md["chunks"]:
                    c["file"] = "../../../elsewhere.safetensors"
        d = _rewrite(checkpoint_dir, tmp_path / "c", "state/index.json", point_out)
        want = f"{d / 'state' / 'index.json'}: file name '../../../elsewhere.safetensors' is not a plain file name"
    else:
        d = _copy(checkpoint_dir, tmp_path / "c")
        shard = d / "state" / "shard-00000.safetensors"
        shard.unlink()
        shard.symlink_to(outside)
        write_manifest(d)
        want = f"{shard} is a symlink to {outside}, outside "
    error = _export_error(d, tmp_path, capsys)
    assert want in error, error
    from model.config import ModelConfig
    from parallel.state.init_from import load_init_weights
    model = DeepseekV3(ModelConfig.from_dict(weight_reader.read_model_config(d)))
    with pytest.raises(ValueError, match=re.escape(want)):
        load_init_weights(model, d)


def test_a_manifest_naming_a_file_outside_is_refused(checkpoint_dir, tmp_path):
    from model.hf.manifest import verify

    d = _copy(checkpoint_dir, tmp_path / "c")
    mf = json.loads((d / "MANIFEST.json").read_text())
    mf["files"]["../../secret"] = {"size": 1, "sha256": "0" * 64}
    (d / "MANIFEST.json").write_text(json.dumps(mf))
    with pytest.raises(ValueError, match=r"file name '\.\./\.\./secret' is not a relative path inside"):
        verify(d)


def test_symlinks_are_checked_without_following_them_first(tmp_path):
    from model.hf.safe_paths import inside

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok").write_text("x")
    assert inside(tmp_path / "d", "ok", "t", plain=True) == tmp_path / "d" / "ok"
    for bad in ("", ".", "..", "a/../b", "/etc/passwd", "a\x00b", None, 3):
        with pytest.raises(ValueError):
            inside(tmp_path / "d", bad, "t")
    with pytest.raises(ValueError, match="not a plain file name"):
        inside(tmp_path / "d", "sub/ok", "t", plain=True)
    os.symlink(tmp_path, tmp_path / "d" / "up")
    with pytest.raises(ValueError, match="outside"):
        inside(tmp_path / "d", "up", "t")



