"""Checkpoints: DeepSpeed's engine state plus the trainer state, complete-or-ignored.

Layout, one directory per save:
    OUT_DIR/checkpoints/step_0000100/
        <DeepSpeed files>            model, optimizer partitions (engine.save_checkpoint)
        trainer_state.json           step, sampler position, config, tokenizer fingerprint
        router_bias.safetensors      the aux-loss-free balancing biases, one tensor per MoE layer
        model.safetensors            the full model state dict (experts gathered over EP), our naming:
                                     what scripts/export_hf.py and train.init_from read
        optimizer.safetensors        AdamW moments by full parameter name (experts gathered): lets a
                                     resume change world size or ep (parallel/reshard.py)
        tokenizer/                   a copy of the tokenizer the data was prepared with
        rng_rank{r}.safetensors      torch RNG state (tensor) + python/numpy RNG (JSON metadata)
        MANIFEST.json                size + SHA-256 of every file above (parallel/integrity.py)
        COMPLETE                     written last, after every rank has finished

A directory without COMPLETE (a save that crashed halfway) is never resumed from, and
keep_last pruning only counts complete ones. Every file is checked against the manifest
before a resume, an init_from or an export reads it. Everything the trainer writes itself is
JSON or safetensors; DeepSpeed's own .pt files are read back with weights_only=True.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, safe_open, save_file

from parallel.integrity import MANIFEST, verify, write_manifest

MARKER = "COMPLETE"
STATE = "trainer_state.json"
BIAS = "router_bias.safetensors"
MODEL = "model.safetensors"
TOKENIZER = "tokenizer"
INIT_CONFIG = "model_config.json"   # written by scripts/import_hf.py: {"model": {...}}
_NAME = re.compile(r"^step_(\d+)$")
# Model fields that only affect training, not the weights' meaning: may change on resume.
TRAINING_ONLY = {"aux_loss_alpha", "mtp_loss_weight", "moe_impl", "attn_impl", "loss_impl", "loss_chunk",
                 "initializer_range", "attention_dropout"}


def checkpoint_root(out_dir: str) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(out_dir: str) -> list[Path]:
    """Complete checkpoints under out_dir, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    meta = {"python": json.dumps([py[0], list(py[1]), py[2]]), "numpy": json.dumps(np_state)}
    return tensors, meta


def _set_rng_state(path: Path) -> None:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    v, state, gauss = json.loads(meta["python"])
    random.setstate((v, tuple(state), gauss))
    np_state = json.loads(meta["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)


def save(engine, out_dir: str, step: int, trainer_state: dict[str, Any], keep_last: int, faults=None) -> Path:
    """Collective: every rank calls it. Returns the checkpoint directory."""
    rank = dist.get_rank()
    root = checkpoint_root(out_dir)
    path = root / checkpoint_name(step)
    if rank == 0:
        if path.exists():  # a leftover (e.g. a crashed save of this step): never half-reuse it
            shutil.rmtree(path)
        path.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=path.name, save_latest=False)
    if faults is not None:
        faults.in_save(step)   # tests: a rank dies with the engine files half-written
    tensors, meta = _rng_state()
    save_file(tensors, str(path / f"rng_rank{rank}.safetensors"), metadata=meta)
    from parallel.expert_parallel import full_state_dict
    full = full_state_dict(engine.module)  # collective over the EP groups: every rank calls it
    if rank == 0:
        save_model(full, path / MODEL)
        copy_tokenizer(trainer_state.get("config", {}), path / TOKENIZER)
        biases = {f"layer{i}": m.gate.e_score_correction_bias.detach().float().cpu().contiguous()
                  for i, m in enumerate(engine.module.moe_layers())}
        save_file(biases, str(path / BIAS))
        _atomic_write(path / STATE, json.dumps(dict(trainer_state, step=step), indent=1))
    from parallel.reshard import save_optimizer_state
    save_optimizer_state(engine, path)  # collective: layout-free AdamW state (resume on another layout)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        write_manifest(path)   # before the marker: a complete checkpoint always has its checksums
        _atomic_write(path / MARKER, json.dumps({"step": step}) + "\n")
        prune(out_dir, keep_last)
    dist.barrier()
    return path


def prune(out_dir: str, keep_last: int) -> None:
    """Delete all but the newest keep_last complete checkpoints, and incomplete leftovers
    older than the newest complete one."""
    complete = complete_checkpoints(out_dir)
    for p in complete[:-keep_last]:
        _remove(p)
    if complete:
        newest = int(_NAME.match(complete[-1].name).group(1))
        for p in checkpoint_root(out_dir).iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and not is_complete(p) and int(m.group(1)) < newest:
                shutil.rmtree(p, ignore_errors=True)


def _remove(p: Path) -> None:
    (p / MARKER).unlink(missing_ok=True)  # first: a partly deleted directory is never "complete"
    shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    f = path / STATE
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: cannot read {STATE}: {e}") from e


def _first_difference(saved: dict[str, Any], model_cfg: dict[str, Any], free: set[str]) -> str | None:
    """'model.K=<saved>, the config has model.K=<value>' for the first field (not in ``free``) that differs."""
    for key, value in model_cfg.items():
        if key not in free and (key not in saved or saved[key] != value):
            return f"model.{key}={saved.get(key, '<missing>')!r}, the config has model.{key}={value!r}"
    return None


def check_compatible(state: dict[str, Any], path: Path, model_cfg: dict[str, Any], fingerprint: str) -> None:
    """Raise a ValueError naming the first field that makes the checkpoint unusable."""
    diff = _first_difference(state.get("config", {}).get("model", {}), model_cfg, TRAINING_ONLY)
    if diff:
        raise ValueError(f"checkpoint {path} is incompatible: it has {diff}")
    if state.get("tokenizer_fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {path} was trained on data from another tokenizer (fingerprint "
                         f"{str(state.get('tokenizer_fingerprint'))[:12]}..., the prepared data has "
                         f"{fingerprint[:12]}...): check data.tokenizer / data.path")


def load(engine, path: Path, state: dict[str, Any]) -> None:
    """Collective: load the engine state, the balancing biases and this rank's RNG states.
    ``state`` is the checkpoint's trainer_state.json (``read_state(path)``).

    Saved on another layout (world size or parallel.ep): DeepSpeed's files are partitioned for
    that layout, so the weights and AdamW states come from the layout-free model.safetensors and
    optimizer.safetensors instead (parallel/reshard.py)."""
    from parallel import reshard

    reshard.check_global_batch(engine, state, path)
    if reshard.layout_changed(engine, state):
        reshard.load_resharded(engine, path)
    else:
        load_dir, tag = engine.load_checkpoint(str(path.parent), tag=path.name, load_lr_scheduler_states=False)
        if load_dir is None:
            raise ValueError(f"checkpoint {path}: DeepSpeed found no engine state to load")
        from parallel.expert_parallel import is_expert_param, load_full_state_dict

        model_file = path / MODEL
        if model_file.is_file() and any(is_expert_param(p) for p in engine.module.parameters()):
            # DeepSpeed's module file is written by one rank; under expert parallelism every rank holds
            # other experts, so each takes its own slice of the full (gathered) weights we saved
            with torch.no_grad():
                load_full_state_dict(engine.module, load_file(str(model_file)))
    biases = load_file(str(path / BIAS))
    with torch.no_grad():
        for i, m in enumerate(engine.module.moe_layers()):
            b = m.gate.e_score_correction_bias
            b.copy_(biases[f"layer{i}"].to(device=b.device, dtype=b.dtype))
    rank = dist.get_rank()
    rng = path / f"rng_rank{rank}.safetensors"
    if not rng.is_file():  # resumed on more ranks than saved: reuse rank 0's generators
        rng = path / "rng_rank0.safetensors"
    _set_rng_state(rng)


# ---------------------------------------------------------------- model weights for export / init_from

# Model fields a weight file may differ in from the run it initialises: they change neither the
# parameters' shapes nor what they compute (token ids, the context length the RoPE tables cover).
INIT_FREE = TRAINING_ONLY | {"bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings"}
_TOKENIZER_SKIP = {"train_key.json"}


def save_model(state_dict: dict[str, torch.Tensor], file: Path) -> None:
    """The full state dict as one safetensors file (tied/shared tensors stored once each key)."""
    from model.hf import _own_storage

    tmp = file.with_name(f".{file.name}.tmp")
    save_file(_own_storage(state_dict), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)


def tokenizer_source(config: dict[str, Any]) -> Path | None:
    """Where the run's tokenizer lives: data.tokenizer, else the BPE trained into data.cache_dir."""
    data = config.get("data", {})
    if data.get("tokenizer"):
        return Path(data["tokenizer"]).expanduser()
    if data.get("cache_dir"):
        return Path(data["cache_dir"]).expanduser() / "tokenizer"
    return None


def copy_tokenizer(config: dict[str, Any], dest: Path) -> bool:
    """Copy the run's tokenizer files into dest (the export ships them); False if none is found."""
    src = tokenizer_source(config)
    if src is None or not src.is_dir():
        return False
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in _TOKENIZER_SKIP and not f.name.startswith("."):
            shutil.copy2(f, dest / f.name)
    return True


def read_model_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``model`` config section stored with a weight directory: model_config.json (from
    scripts/import_hf.py) or trainer_state.json (a training checkpoint)."""
    p = Path(path)
    for name, get in ((INIT_CONFIG, lambda d: d.get("model")),
                      (STATE, lambda d: d.get("config", {}).get("model"))):
        f = p / name
        if f.is_file():
            try:
                model = get(json.loads(f.read_text(encoding="utf-8")))
            except (OSError, ValueError) as e:
                raise ValueError(f"{f}: cannot read: {e}") from e
            if not isinstance(model, dict):
                raise ValueError(f"{f} has no model config section")
            return model
    raise FileNotFoundError(f"{p}: neither {INIT_CONFIG} nor {STATE} found (not a directory written by "
                            "scripts/import_hf.py or a training checkpoint)")


def check_init_compatible(saved: dict[str, Any], model_cfg: dict[str, Any], path: str | os.PathLike) -> None:
    """Raise a ValueError naming the first model field in which the weights and the run differ."""
    diff = _first_difference(saved, model_cfg, INIT_FREE)
    if diff:
        raise ValueError(f"train.init_from={str(path)!r} does not fit the model: its weights have {diff}")


def load_init_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load the weights of ``path`` (a directory from scripts/import_hf.py, or a training checkpoint)
    into a freshly built model, which may hold only its EP rank's experts (any ep works).

    Checks the stored model config against ``model.config`` first (ValueError naming the field).
    Call it on every rank after the model is built and sharded, before deepspeed.initialize.
    Only weights are loaded: optimizer, step, sampler and RNG start fresh."""
    from parallel.expert_parallel import load_full_state_dict

    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"train.init_from={str(path)!r}: directory does not exist")
    if (p / STATE).is_file() and not is_complete(p):
        raise ValueError(f"train.init_from={str(path)!r}: incomplete checkpoint (no {MARKER} marker)")
    if (p / STATE).is_file() or (p / MANIFEST).is_file():   # import_hf directories carry one too
        verify(p)
    file = p / MODEL
    if not file.is_file():
        raise FileNotFoundError(f"train.init_from={str(path)!r}: {file} not found (make one with "
                                "scripts/import_hf.py, or use a checkpoint saved by this version)")
    check_init_compatible(read_model_config(p), model.config.to_dict(), p)
    sd = load_file(str(file))
    own = model.state_dict()
    sd = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in sd.items()}
    with torch.no_grad():
        load_full_state_dict(model, sd)
