"""Checkpoint manifests, the pickle-refusing DeepSpeed loader, and the fault-injection spec."""
from __future__ import annotations

import json
import os

import pytest
import torch

from model.hf import manifest
from parallel import faults
from parallel.state import integrity
from tests.helpers import PicklePayload


def _ckpt(tmp_path):
    d = tmp_path / "step_0000002"
    (d / "tokenizer").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    (d / "trainer_state.json").write_text("{}")
    manifest.write_manifest(d)
    (d / "COMPLETE").write_text("{}")
    return d


def test_manifest_lists_every_file_and_verifies(tmp_path):
    d = _ckpt(tmp_path)
    files = json.loads((d / manifest.MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", "tokenizer/vocab.json", "trainer_state.json"}
    manifest.verify(d)


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"model\.safetensors is 4000 bytes, the manifest says 4096"),
    ("bitflip", r"model\.safetensors fails its SHA-256 check"),
    ("delete", r"model\.safetensors listed in MANIFEST\.json is missing"),
    ("add", r"extra\.pt is not in MANIFEST\.json"),
    ("no_manifest", r"MANIFEST\.json is missing"),
])
def test_damaged_checkpoint_is_named(tmp_path, damage, message):
    d = _ckpt(tmp_path)
    f = d / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:4000])
    elif damage == "bitflip":
        b = bytearray(f.read_bytes())
        b[1234] ^= 0x10
        f.write_bytes(bytes(b))
    elif damage == "delete":
        f.unlink()
    elif damage == "add":
        (d / "extra.pt").write_bytes(b"x")
    else:
        (d / manifest.MANIFEST).unlink()
    with pytest.raises(ValueError, match=message):
        manifest.verify(d)


def test_pickle_payload_in_a_deepspeed_file_never_runs(tmp_path):
    sentinel = tmp_path / "PWNED"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": PicklePayload(sentinel)}, evil)
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt refused"):
        integrity._safe_load(str(evil))
    assert not sentinel.exists()   # that the payload is live: tests/test_security.py::test_the_payload_is_live


def test_plain_weights_and_deepspeed_classes_still_load(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    f = tmp_path / "ok.pt"
    torch.save({"w": torch.arange(3.0), "stage": ZeroStageEnum.optimizer_states, "n": 3}, f)
    got = integrity._safe_load(str(f))
    assert torch.equal(got["w"], torch.arange(3.0)) and got["stage"] == ZeroStageEnum.optimizer_states


def test_fault_spec_parses_and_targets_steps_and_ranks():
    fs = faults.parse("nan_loss@3/1; sleep=0.5@1-3 ;exit=7@2,5/0")
    assert [f.kind for f in fs] == ["nan_loss", "sleep", "exit"]
    assert fs[0].hits(3, 1) and not fs[0].hits(3, 0) and not fs[0].hits(2, 1)
    assert fs[1].value == 0.5 and all(fs[1].hits(s, r) for s in (1, 2, 3) for r in (0, 5)) and not fs[1].hits(4, 0)
    assert fs[2].steps == {2, 5} and fs[2].value == 7
    f = faults.Faults(rank=1, value="nan_loss@3/1;inf_loss@4")
    assert f.loss_scale(2) == 1.0 and f.loss_scale(3) != f.loss_scale(3) and f.loss_scale(4) == float("inf")
    assert faults.parse("") == [] and faults.parse(None) == []


@pytest.mark.parametrize("spec,message", [
    ("nan_loss", r"has no '@STEP'"), ("boom@3", r"unknown fault 'boom'"),
    ("exit@x", r"bad step list 'x'"), ("exit=seven@3", r"bad value or rank"), ("exit@3/one", r"bad value or rank"),
])
def test_bad_fault_spec_is_named(spec, message):
    with pytest.raises(ValueError, match=message):
        faults.parse(spec)
