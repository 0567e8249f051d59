"""Checkpoints: the training state sharded by owner, complete-or-ignored, optionally async.

Layout, one directory per save:
    OUT_DIR/checkpoints/step_0000100/
        state/                       torch.distributed.checkpoint, safetensors storage
                                     (parallel/state/storage.py): shard-RRRRR.safetensors per writing
                                     rank + index.json, the global (name, offset, size) index
        trainer_state.json           step, sampler position, config, tokenizer fingerprint, format,
                                     full tensor shapes, AdamW step, DeepSpeed's counters, the
                                     expert placement saved under (parallel/expert/placement.py; null
                                     without EP)
        tokenizer/                   a copy of the tokenizer the data was prepared with
        rng_rank{r}.safetensors      torch RNG state (tensor) + python/numpy RNG (JSON metadata)
        MANIFEST.json                size + SHA-256 of every file above (parallel/state/integrity.py)
        COMPLETE                     written last, after every rank has finished

What ``state/`` holds, by key, each tensor once: ``param/<name>`` the fp32 master of every trainable
parameter, ``exp_avg/<name>`` and ``exp_avg_sq/<name>`` its AdamW moments, all flattened to 1-D
and written as the slices their owners hold (parallel/state/ownership.py: a ZeRO partition, an EP rank's
experts; replicas are written once), and ``buffer/<name>`` the router biases. Nothing is gathered
on any rank. A bf16 run's module weights are bf16(master), so they are not stored again. A resume
on any world size, ``parallel.ep``, ZeRO stage or expert placement asks DCP for the slices it owns
now: experts are addressed by global id, so re-placing them is a reshard.

A directory without COMPLETE (a save that crashed halfway) is never resumed from, and
keep_last pruning only counts complete ones. Every file is checked against the manifest
before a resume, an init_from or an export reads it. Everything is JSON or safetensors.
This module owns checkpoint I/O; parallel/state/storage.py and parallel/state/ownership.py are its parts
and import nothing back.

A run owns its ``train.out_dir``: each run has an id (uuid4 hex, ``run_id`` in trainer_state.json; a
resume adopts the id of the checkpoint it continues). A fresh run into a directory holding complete
checkpoints stops before any process group (``claim_out_dir``) unless ``train.overwrite=true``, which
removes them first; pruning deletes only the current run's checkpoints; a save never replaces a
complete checkpoint of another run. Checkpoints written before run ids count as another run's.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from model.hf.flat_shards import check_shards
from model.hf.manifest import write_manifest
from model.hf.safetensors_stream import save_streaming
from model.hf.weight_reader import (
    BIAS_SUFFIX,
    FORMAT,
    MARKER,
    NAME,
    SHARDS,
    STATE,
    TOKENIZER,
    check_format,
    checkpoint_name,
    checkpoint_root,
    complete_checkpoints,
    is_complete,
    state_key,
)
from model.hf.weight_reader import read_state as read_state  # the resume reads a checkpoint's state through here
from parallel.collectives import mean_over_ranks
from parallel.state import ownership
from parallel.state.registry import RunState
from parallel.state.rng_state import rng_state as _rng_state
from parallel.state.rng_state import set_rng_state as _set_rng_state
from parallel.state.run_owner import (
    NO_STATE,
    RUN_ID,
    agree_on_run_id,
    check_out_dir_path,
    refuse_foreign,
    run_id_of,
    saved_run_id,
    step_of,
)
from parallel.state.save_errors import SaveFailed, agree_on_failure, from_dcp
from parallel.state.storage import FlatSlice, FlatSlices, LoadPlanner, SavePlanner, ShardReader, ShardWriter, flat_entry
from parallel.state.tokenizer_copy import copy_tokenizer

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine
    from torch import nn

    from parallel.faults import Faults

# Model fields that only affect training, not the weights' meaning: may change on resume.
TRAINING_ONLY = {"aux_loss_alpha", "mtp_loss_weight", "moe_impl", "attn_impl", "loss_impl", "loss_chunk",
                 "initializer_range", "attention_dropout"}


def resolve_resume(resume: str | None, out_dir: str) -> Path | None:
    """train.resume -> the checkpoint directory to load, or None to start fresh.

    "auto": the newest complete checkpoint under out_dir (None if there is none). A path: a
    complete checkpoint directory, or a run directory whose newest complete one is used.
    """
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    p = Path(resume).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"train.resume={resume!r}: checkpoint path does not exist")
    if is_complete(p):
        return p
    found = complete_checkpoints(str(p))
    if found:
        return found[-1]
    raise ValueError(f"train.resume={resume!r}: not a complete checkpoint (no {MARKER} marker in {p}: "
                     "the save was interrupted, or this is not a checkpoint directory)")


def claim_out_dir(out_dir: str, resume: str | None, overwrite: bool, rank: int) -> None:
    """Before any process group, on every rank: may this run write into ``out_dir``? A fresh run
    (``resume`` None) needs a directory without complete checkpoints, or ``overwrite`` (rank 0 then
    removes every checkpoint and metrics.jsonl there, with a log line). A resume needs no complete
    checkpoint of another run newer than the one it continues (a later ``resume=auto`` would pick
    that one, and this run's saves would replace it). ValueError naming the directory otherwise."""
    check_out_dir_path(out_dir)
    complete = complete_checkpoints(out_dir)
    if resume is None:
        if complete and not overwrite:
            raise ValueError(f"train.out_dir={out_dir} already holds checkpoints of another run (newest "
                             f"{complete[-1].name}): resume it with train.resume=auto, choose another "
                             "train.out_dir, or set train.overwrite=true to replace them")
        root = checkpoint_root(out_dir)
        old = sorted(p for p in root.iterdir() if NAME.match(p.name) and p.is_dir()) if root.is_dir() else []
        log = Path(out_dir) / "metrics.jsonl"
        if overwrite and rank == 0 and (old or log.is_file()):   # a fresh log too, when only the log was there
            for p in old:
                _remove(p)
            log.unlink(missing_ok=True)
            print(f"train.overwrite=true: removed {len(old)} checkpoint(s) of another run from {root}"
                  + (f" ({old[0].name} .. {old[-1].name})" if old else "") + " and its metrics.jsonl", flush=True)
        return
    ckpt = resolve_resume(resume, out_dir)
    if ckpt is None:
        return
    state = read_state(ckpt)
    own, step = saved_run_id(state, ckpt), step_of(ckpt, state)
    newer = [p for p in complete if step_of(p) > step and (own is None or run_id_of(p) != own)]
    if newer:
        raise ValueError(f"train.out_dir={out_dir} holds checkpoints of another run newer than {ckpt} (newest "
                         f"{newer[-1].name}): this run would replace them and a later train.resume=auto would mix "
                         "the runs; choose another train.out_dir or move them away")
    if own is None and rank == 0:
        print(f"{ckpt} has no run id (written before run ids): this run takes a new one; the checkpoints "
              "without one stay (pruning never deletes them)", flush=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- the sharded training state

def _bias_names(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(n, b) for n, b in model.named_buffers() if n.endswith(BIAS_SUFFIX)]


def full_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Full parameter name -> full shape (experts: all E), the shapes the flat entries fold back to."""
    layouts = ownership.expert_layouts(model)
    out = {}
    for name, p in ownership.trainable(model):
        lay = layouts.get(name)
        out[name] = [lay.num_experts, *p.shape[1:]] if lay else list(p.shape)
    for name, b in _bias_names(model):
        out[name] = list(b.shape)
    return out


def state_entries(engine: DeepSpeedEngine, prefix: str = "",
                  stage: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """The DCP state dict of this rank: every owned slice's fp32 master and AdamW moments as a
    slice of its flat full tensor, and the router biases (replicated: DCP keeps one copy).
    ``stage(key, tensor)`` returns a copy to write instead (an async save writes copies while
    training goes on); None: the live tensors."""
    own = (lambda key, t: t.detach()) if stage is None else stage
    slices: dict[str, list[FlatSlice]] = {}
    for fr in ownership.owned_slices(engine):
        n = fr.full_numel
        for kind, value in (("param", fr.master), *fr.states.items()):
            key = state_key(kind, fr.name, prefix)
            # a rank may own several separate slices of one tensor (experts placed by load)
            staged = own(key if fr.offset == 0 else f"{key}@{fr.offset}", value)
            slices.setdefault(key, []).append(FlatSlice(staged, fr.offset, n))
    sd: dict[str, Any] = {key: flat_entry(parts) for key, parts in slices.items()}
    for name, b in _bias_names(engine.module):
        key = state_key("buffer", name, prefix)
        sd[key] = own(key, b.float().cpu() if b.device.type != "cpu" else b)
    return sd


def _group():
    """The process group checkpoints talk over: gloo (plans and barriers are small; DCP's object
    collectives need no GPU), and its own, so an async save's collectives never interleave with
    training's. Created once, on every rank (new_group is collective)."""
    global _CKPT_GROUP
    if _CKPT_GROUP is None:
        _CKPT_GROUP = dist.new_group(backend="gloo")
    return _CKPT_GROUP


_CKPT_GROUP = None


class Checkpointer:
    """Saves checkpoints, synchronously or (``async_save``) in a background thread: the training
    state is copied (staged) on the spot, then written while training goes on. At most one save is
    in flight; the next one, and the end of the run, wait for it. Every rank calls every method."""

    def __init__(self, async_save: bool = False, state_prefix: str = "", run_id: str | None = None):
        self.async_save = async_save
        self.state_prefix = state_prefix  # keys of the model/optimizer state (multi-site: one set per site)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.group = _group()
        # the run's id (train.py: run_id_for(resumed state)), rank 0's on every rank; saved in trainer_state.json,
        # pruning deletes only this run's checkpoints. None: no id written, prunes only checkpoints without one
        self.run_id = agree_on_run_id(run_id, self.group)
        self.last_stall_s = 0.0          # how long the last save() held up training
        self._staged: dict[str, torch.Tensor] = {}   # async: host copies, reused save after save

    def _stage(self, key: str, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` for the background writer. The buffers are kept between saves (only
        one save is in flight, and it has finished before the next stages), so a save after the
        first costs one memcpy of the rank's state, not fresh pages. With CUDA the buffers are pinned:
        GPU tensors arrive by DMA without blocking the host (``save`` waits for them once, at the end)."""
        buf = self._staged.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._staged[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                                  pin_memory=torch.cuda.is_available())
        return buf.copy_(t.detach(), non_blocking=t.is_cuda and buf.is_pinned())

    def wait(self) -> None:
        """Finish the save in flight (if any); re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e if isinstance(e, SaveFailed) else SaveFailed(f"the background checkpoint save failed: {e}")

    def check_background(self, device: torch.device) -> None:
        """After every step while an async save is in flight (every rank, collective): has it failed on
        any rank? Then raise SaveFailed now, not at the next save. Once every rank's write is done the
        thread is joined and the checks stop (the ranks agree on both, so they stay in step)."""
        if self._thread is None:
            return
        done = not self._thread.is_alive()
        failed, all_done = mean_over_ranks([float(done and self._error is not None), float(done)], device)
        if failed > 0 or all_done == 1.0:
            self.wait()                                  # raises this rank's error, if it has one
            if failed > 0:
                raise SaveFailed("the background checkpoint save failed on another rank (its error is in its "
                                 "log); the run stops; resume with train.resume=auto once it is fixed")

    def save(self, engine: DeepSpeedEngine, out_dir: str, step: int, run_state: RunState | dict[str, Any],
             keep_last: int, faults: Faults | None = None) -> Path:
        """Save ``engine``'s sharded state and everything registered in ``run_state`` (a plain dict:
        constant values only). Collective: every rank calls it. Returns the checkpoint directory."""
        t0 = time.perf_counter()
        run_state = as_run_state(run_state)
        self.wait()
        rank = dist.get_rank()
        path = checkpoint_root(out_dir) / checkpoint_name(step)
        refuse_foreign(path, self.run_id)                 # every rank: each raises the same error
        error = None
        try:
            if rank == 0:
                if path.exists():  # a leftover (e.g. a crashed save of this step): never half-reuse it
                    shutil.rmtree(path)
                (path / SHARDS).mkdir(parents=True)
        except OSError as e:
            error = e
        agree_on_failure(error, path, self.group)          # the barrier, and a full disk stops every rank
        ownership.ensure_optimizer_state(engine)           # before the first step: zero moments
        stage = self._stage if self.async_save else None
        sd = state_entries(engine, self.state_prefix, stage=stage)
        for key, (shape, offset, tensor) in run_state.tensor_state().items():
            sd[key] = FlatSlice(stage(key, tensor) if stage else tensor.detach(), offset, math.prod(shape))
        shapes = full_shapes(engine.module)
        if getattr(engine, "mp_world_size", 1) > 1:    # parallel.pp: each stage names its own parameters
            from parallel.pipeline.stages import merge_stage_shapes
            shapes = merge_stage_shapes(shapes, self.group)
        tensors, meta = _rng_state()
        error = None
        try:
            # through the streaming writer: its metadata keys are sorted, so the file is the same every run
            save_streaming(tensors, path / f"rng_rank{rank}.safetensors", metadata=meta)
            if rank == 0:
                trainer_state = run_state.state_dict(dict(
                    step=step, format=FORMAT, tensors=shapes,
                    optimizer_step=ownership.optimizer_step(engine), engine_counters=_engine_counters(engine),
                    expert_placement=ownership.model_placement(engine.module),
                    **({RUN_ID: self.run_id} if self.run_id is not None else {})))
                copy_tokenizer(trainer_state.get("config", {}), path / TOKENIZER)
                _atomic_write(path / STATE, json.dumps(trainer_state, indent=1))
        except OSError as e:
            error = e
        agree_on_failure(error, path, self.group)
        if self.async_save:
            if torch.cuda.is_available():
                torch.cuda.synchronize()   # the staged (non-blocking) copies have landed before the writer reads
            self._thread = threading.Thread(target=self._write_guarded, args=(sd, path, out_dir, step, keep_last,
                                                                               faults), daemon=False)
            self._thread.start()
        else:
            self._write(sd, path, out_dir, step, keep_last, faults)
        self.last_stall_s = time.perf_counter() - t0
        return path

    def _write_guarded(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as e:   # surfaced by the next wait(), on the training thread
            self._error = e

    def _write(self, sd: dict[str, Any], path: Path, out_dir: str, step: int, keep_last: int,
               faults: Faults | None) -> None:
        rank = dist.get_rank()
        try:
            dcp.save(sd, storage_writer=ShardWriter(path / SHARDS, rank), planner=SavePlanner(),
                     process_group=self.group)
        except CheckpointException as e:                  # raised on every rank: one rank's write failed
            raise from_dcp(path, e) from None
        if faults is not None:
            faults.in_save(step)   # tests: a rank dies with its shard written, the checkpoint incomplete
        dist.barrier(group=self.group)  # every rank's files are on disk
        error = None
        try:
            if rank == 0:
                write_manifest(path)   # before the marker: a complete checkpoint always has its checksums
                _atomic_write(path / MARKER, json.dumps({"step": step}) + "\n")
                prune(out_dir, keep_last, self.run_id)
        except OSError as e:
            error = e
        agree_on_failure(error, path, self.group)


def save(engine: DeepSpeedEngine, out_dir: str, step: int, run_state: RunState | dict[str, Any], keep_last: int,
         faults: Faults | None = None) -> Path:
    """A synchronous save (collective: every rank calls it). Returns the checkpoint directory."""
    return Checkpointer(async_save=False).save(engine, out_dir, step, run_state, keep_last, faults)


def as_run_state(run_state: RunState | dict[str, Any]) -> RunState:
    """A RunState as it is, or one holding a plain dict's entries as constant values."""
    if isinstance(run_state, RunState):
        return run_state
    out = RunState()
    for key, value in run_state.items():
        out.register_value(key, value)
    return out


_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def _engine_counters(engine: DeepSpeedEngine) -> dict[str, int]:
    return {k: int(getattr(engine, k)) for k in _COUNTERS if hasattr(engine, k)}


def prune(out_dir: str, keep_last: int, run_id: str | None = None) -> None:
    """Delete all but the newest keep_last complete checkpoints of run ``run_id`` (None: those written
    without a run id), and its incomplete leftovers (or ones with no trainer_state.json, which no run
    can resume) older than its newest complete one. Other runs' checkpoints are never touched."""
    mine = [p for p in complete_checkpoints(out_dir) if run_id_of(p) == run_id]
    for p in mine[:-keep_last]:
        _remove(p)
    if mine:
        newest = int(NAME.match(mine[-1].name).group(1))
        for p in checkpoint_root(out_dir).iterdir():
            m = NAME.match(p.name)
            if (m and p.is_dir() and not is_complete(p) and int(m.group(1)) < newest
                    and run_id_of(p) in (run_id, NO_STATE)):
                shutil.rmtree(p, ignore_errors=True)


def _remove(p: Path) -> None:
    (p / MARKER).unlink(missing_ok=True)  # first: a partly deleted directory is never "complete"
    shutil.rmtree(p, ignore_errors=True)


def first_difference(saved: dict[str, Any], model_cfg: dict[str, Any], free: set[str]) -> str | None:
    """'model.K=<saved>, the config has model.K=<value>' for the first field (not in ``free``) that differs."""
    for key, value in model_cfg.items():
        if key not in free and (key not in saved or saved[key] != value):
            return f"model.{key}={saved.get(key, '<missing>')!r}, the config has model.{key}={value!r}"
    return None


def check_compatible(state: dict[str, Any], path: Path, model_cfg: dict[str, Any], fingerprint: str) -> None:
    """Raise a ValueError naming the first field that makes the checkpoint unusable."""
    diff = first_difference(state.get("config", {}).get("model", {}), model_cfg, TRAINING_ONLY)
    if diff:
        raise ValueError(f"checkpoint {path} is incompatible: it has {diff}")
    if state.get("tokenizer_fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {path} was trained on data from another tokenizer (fingerprint "
                         f"{str(state.get('tokenizer_fingerprint'))[:12]}..., the prepared data has "
                         f"{fingerprint[:12]}...): check data.tokenizer / data.path")


def check_global_batch(engine: DeepSpeedEngine, state: dict, path: Path) -> None:
    """ValueError naming the fields when this run's global batch differs from the checkpoint's:
    the sampler's data order (and the step's gradient) depend on it, not on the layout."""
    saved = state.get("sampler", {}).get("global_batch_size")
    # rows drawn per step by all ranks (with parallel.sites, DeepSpeed's own batch is one site's; under parallel.pp
    # the ranks of one pipeline, DeepSpeed's model-parallel group, read the same rows)
    now = (engine.train_micro_batch_size_per_gpu() * engine.gradient_accumulation_steps() * dist.get_world_size()
           // getattr(engine, "mp_world_size", 1))
    if saved is None or int(saved) == now:
        return
    t = state.get("config", {}).get("train", {})
    raise ValueError(
        f"checkpoint {path} was trained with a global batch of {saved} rows (train.micro_batch_size="
        f"{t.get('micro_batch_size')} x train.grad_accum={t.get('grad_accum')} x {state.get('world_size', 1)} "
        f"processes); this run has {now} (train.micro_batch_size={engine.train_micro_batch_size_per_gpu()} x "
        f"train.grad_accum={engine.gradient_accumulation_steps()} x {dist.get_world_size()} processes): choose "
        f"train.micro_batch_size and train.grad_accum so that their product times the number of processes "
        f"is {saved}")


def load(engine: DeepSpeedEngine, path: Path, state: dict[str, Any], run_state: RunState | None = None,
         state_prefix: str = "") -> None:
    """Collective: load checkpoint ``path`` (saved on any world size, ``parallel.ep`` or ZeRO stage)
    into this engine, and hand every component registered in ``run_state`` its saved state. Each rank
    reads only the slices it owns; DCP reshards. ``state`` is the checkpoint's trainer_state.json
    (``read_state(path)``); ``state_prefix`` as the Checkpointer's."""
    check_global_batch(engine, state, path)
    check_format(path, state)
    check_shards(path / SHARDS)            # a clear error naming the file, before DCP reads
    step = int(state.get("optimizer_step", 0))
    ownership.ensure_optimizer_state(engine, step)
    prefix = state_prefix
    sd = state_entries(engine, prefix)                 # views into the optimizer's and module's own buffers
    biases = {k: v for k, v in sd.items() if not isinstance(v, (FlatSlice, FlatSlices))}
    for k, v in biases.items():                        # fill copies; a bf16 module's bias buffers stay as they are
        sd[k] = v.clone()
    run_state = run_state or RunState()
    for key, (shape, offset, tensor) in run_state.tensor_state().items():   # filled in place
        sd[key] = FlatSlice(tensor, offset, math.prod(shape))
    with torch.no_grad():
        dcp.load(sd, storage_reader=ShardReader(str(path / SHARDS)), planner=LoadPlanner(), process_group=_group())
        ownership.set_optimizer_step(engine, step)
        ownership.link_optimizer_state(engine)
        ownership.update_module_weights(engine)       # the module's weights from the loaded masters
        for name, b in _bias_names(engine.module):
            b.copy_(sd[state_key("buffer", name, prefix)].to(device=b.device, dtype=b.dtype))
    for key, value in state.get("engine_counters", {}).items():
        setattr(engine, key, int(value))               # DeepSpeed's own counters, as its loader sets them
    run_state.load_state_dict(state)                   # after the tensors: their JSON parts describe them
    rank = dist.get_rank()
    rng = path / f"rng_rank{rank}.safetensors"
    if not rng.is_file():  # resumed on more ranks than saved: reuse rank 0's generators
        rng = path / "rng_rank0.safetensors"
    _set_rng_state(rng)
