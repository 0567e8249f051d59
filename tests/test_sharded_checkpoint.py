"""The sharded checkpoint format on real files: per-rank slices through DCP on a real 2-process
gloo group, reads of any range from them, every damaged-shard case named by path, async saves
(staged state, a kill in flight), and the one-line refusal of the pre-sharded format."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model.hf import manifest, weight_reader
from model.hf.flat_shards import INDEX, read_flat, read_index
from parallel.state import checkpoint
from parallel.state.storage import FlatSlice, ShardReader
from tests.helpers import free_port
from tests.train_helpers import make_corpus, metrics, run_args, train

N = 20          # elements of the test tensor "param/w"; rank 0 owns [0, 7), rank 1 [7, 20)
CUT = 7


def _full() -> torch.Tensor:
    return torch.arange(N, dtype=torch.float32) * 0.5


def _save_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from parallel.state.storage import SavePlanner, ShardWriter

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    lo, hi = (0, CUT) if rank == 0 else (CUT, N)
    sd = {"param/w": FlatSlice(_full()[lo:hi].clone(), lo, N),
          "buffer/b": torch.tensor([1.0, 2.0, 3.0])}           # replicated: written once
    dcp.save(sd, storage_writer=ShardWriter(path, rank), planner=SavePlanner())
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dcp") / "state"
    mp.start_processes(_save_worker, args=(2, free_port(), str(path)), nprocs=2, join=True, start_method="spawn")
    return path


def _copy(saved: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "state"
    shutil.copytree(saved, dest)
    return dest


def test_each_rank_writes_its_slice_and_replicas_once(saved):
    from safetensors import safe_open

    index = read_index(saved)
    chunks = sorted((c["offset"][0], c["size"][0], c["file"]) for c in index["param/w"]["chunks"])
    assert chunks == [(0, CUT, "shard-00000.safetensors"), (CUT, N - CUT, "shard-00001.safetensors")]
    assert index["param/w"]["size"] == [N] and index["param/w"]["dtype"] == "float32"
    assert len(index["buffer/b"]["chunks"]) == 1                      # one copy of the replicated tensor
    held = {}
    for f in sorted(saved.glob("*.safetensors")):                     # plain safetensors, readable alone
        with safe_open(str(f), framework="pt") as st:
            held[f.name] = sorted(st.keys())
    assert sum(k.count("buffer/b") for k in map(str, held.values())) == 1
    ShardReader(str(saved)).read_metadata()                           # the files agree with the index


def test_any_range_reads_back_across_slices(saved):
    index = read_index(saved)
    assert torch.equal(read_flat(saved, index, "param/w"), _full())
    assert torch.equal(read_flat(saved, index, "param/w", 5, 12), _full()[5:12])   # spans both shards
    assert torch.equal(read_flat(saved, index, "buffer/b"), torch.tensor([1.0, 2.0, 3.0]))


def test_dcp_loads_a_new_split_in_one_process(saved):
    """A reshard: one process asks for [3, 17) of w, which no rank saved as such."""
    import torch.distributed.checkpoint as dcp

    from parallel.state.storage import LoadPlanner

    dest = torch.zeros(14)
    b = torch.zeros(3)
    dcp.load({"param/w": FlatSlice(dest, 3, N), "buffer/b": b}, storage_reader=ShardReader(str(saved)),
             planner=LoadPlanner(), no_dist=True)
    assert torch.equal(dest, _full()[3:17]) and torch.equal(b, torch.tensor([1.0, 2.0, 3.0]))


def test_damaged_shards_are_named(saved, tmp_path):
    # a shard missing
    d = _copy(saved, tmp_path / "missing")
    (d / "shard-00001.safetensors").unlink()
    with pytest.raises(ValueError, match=r"shard-00001\.safetensors should hold \S+ and does not"):
        ShardReader(str(d)).read_metadata()
    # a shard truncated
    d = _copy(saved, tmp_path / "truncated")
    f = d / "shard-00000.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ValueError, match=rf"{f} is not a readable safetensors file"):
        ShardReader(str(d)).read_metadata()
    # the index does not match the shards
    d = _copy(saved, tmp_path / "index")
    index = json.loads((d / INDEX).read_text())
    index["tensors"]["param/w"]["chunks"][0]["size"] = [CUT + 1]
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"two chunks claim elements|holds 7|puts param/w"):
        ShardReader(str(d)).read_metadata()
    # two files claim the same slice
    d = _copy(saved, tmp_path / "twice")
    shutil.copy(d / "shard-00000.safetensors", d / "shard-00002.safetensors")
    with pytest.raises(ValueError, match=r"shard-0000[02]\.safetensors and shard-0000[02]\.safetensors both hold "
                                         r"param/w\[0:\]"):
        ShardReader(str(d)).read_metadata()
    # a foreign shard holding a slice the index does not list
    d = _copy(saved, tmp_path / "foreign")
    from safetensors.torch import save_file
    save_file({"param/other": torch.zeros(2)}, str(d / "shard-00009.safetensors"))
    with pytest.raises(ValueError, match=r"shard-00009\.safetensors holds param/other\[0:\] which index\.json "
                                         r"does not list"):
        ShardReader(str(d)).read_metadata()
    # no index at all
    d = _copy(saved, tmp_path / "noindex")
    (d / INDEX).unlink()
    with pytest.raises(FileNotFoundError, match=r"index\.json is missing"):
        ShardReader(str(d)).read_metadata()


# ------------------------------------------------------------------------------ through train.py

def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-step run with async saves at steps 2 and 4, and the same run with synchronous saves."""
    tmp = tmp_path_factory.mktemp("async")
    corpus = make_corpus(tmp)
    common = ["train.max_steps=4", "train.save_every=2", "train.keep_last=5", "train.eval_batches=0"]
    train(run_args(tmp, corpus, "sync", common))
    p = train(run_args(tmp, corpus, "async", common + ["train.async_save=true"]))
    return tmp, corpus, common, p


def test_async_saves_hold_the_state_of_their_step(run):
    tmp, _, _, p = run
    assert "saving" in p.stdout and "training held up" in p.stdout
    for step in (2, 4):
        a = weight_reader.read_weights(tmp / "sync" / "checkpoints" / checkpoint.checkpoint_name(step))
        b = weight_reader.read_weights(tmp / "async" / "checkpoints" / checkpoint.checkpoint_name(step))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step   # staged, not live


def test_kill_during_async_save_leaves_the_previous_checkpoint(run):
    """SIGKILL while the step-4 shards are written in the background: step 2 stays complete, and a
    resume from it gives the losses of the uninterrupted run."""
    tmp, corpus, common, _ = run
    args = run_args(tmp, corpus, "killed", common + ["train.async_save=true"])
    p = train(args, check=False, env={"MOE_FAULTS": "kill_in_save@4"})
    assert p.returncode != 0 and "killed while saving step 4" in p.stdout + p.stderr
    ck = checkpoint.complete_checkpoints(str(tmp / "killed"))
    assert [c.name for c in ck] == [checkpoint.checkpoint_name(2)]
    assert not checkpoint.is_complete(tmp / "killed" / "checkpoints" / checkpoint.checkpoint_name(4))
    train(args + ["train.resume=auto"])
    ref = {r["step"]: r["loss"] for r in metrics(tmp / "sync")}
    got = {r["step"]: r["loss"] for r in metrics(tmp / "killed")}
    assert got[3] == ref[3] and got[4] == ref[4]


def test_damaged_or_old_checkpoints_fail_naming_them_and_change_nothing(run, tmp_path):
    tmp, corpus, common, _ = run
    src = checkpoint.complete_checkpoints(str(tmp / "sync"))[0]
    # a duplicated shard, re-hashed into the manifest (the manifest is not a signature)
    out = tmp_path / "dup"
    ck = out / "checkpoints" / src.name
    shutil.copytree(src, ck)
    shutil.copy(ck / checkpoint.SHARDS / "shard-00000.safetensors", ck / checkpoint.SHARDS / "shard-00001.safetensors")
    manifest.write_manifest(ck)
    before = _digest(out)
    p = train(run_args(tmp, corpus, "x", common + [f"train.out_dir={out}", "train.resume=auto"]), check=False)
    assert p.returncode != 0 and f"sharded checkpoint {ck / checkpoint.SHARDS}" in p.stderr, p.stderr[-2000:]
    assert _digest(out) == before                                      # nothing written or overwritten

    # the pre-sharded format (gathered model.safetensors + optimizer.safetensors): one clear line
    old = tmp_path / "old" / "checkpoints" / src.name
    shutil.copytree(src, old)
    shutil.rmtree(old / checkpoint.SHARDS)
    from safetensors.torch import save_file
    save_file(weight_reader.read_weights(src), str(old / weight_reader.MODEL))
    save_file({"embed_tokens.weight.exp_avg": torch.zeros(1)}, str(old / "optimizer.safetensors"))
    state = json.loads((old / checkpoint.STATE).read_text())
    del state["format"]
    (old / checkpoint.STATE).write_text(json.dumps(state))
    manifest.write_manifest(old)
    p = train(run_args(tmp, corpus, "y", common + [f"train.out_dir={tmp_path / 'old'}", "train.resume=auto"]),
              check=False)
    assert p.returncode == 2 and f"checkpoint {old} is in the pre-sharded format" in p.stderr, p.stderr[-2000:]
