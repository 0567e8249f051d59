"""torch.distributed.checkpoint (DCP) glue for flat parameter slices, in safetensors files.

Why DCP and not DeepSpeed's own files: DeepSpeed's ZeRO checkpoints are per-layout (one file per
data-parallel partition, experts per EP rank) and its universal-checkpoint converter is an offline
pass that materialises every parameter. DCP is the engine torchtitan uses: each rank writes the
slices it owns, the coordinator builds one global index of (name, offset, size) chunks and
dedups replicas, and a load on any layout asks for the ranges it needs and DCP reads exactly
those (resharding for free). What DCP cannot take as it is:

- ZeRO partitions are ranges of the *flattened* parameter, not rectangular tiles, so every
  parameter is addressed as a 1-D tensor of numel elements (``FlatSlice``, DCP's
  ``_Checkpointable`` protocol that DTensor also implements; the planners below look it up).
- DCP's default ``.metadata`` file is a pickle, which this project never reads. Storage is
  DCP's safetensors format instead (``HuggingFaceStorageWriter/Reader``: each chunk's offset sits
  in its file's header), with two changes: ``ShardWriter`` streams each tensor's bytes to disk as
  it is resolved (the stock writer clones every view and serialises the whole file in memory,
  2x the rank's share of state), and writes the coordinator's global index as JSON
  (``index.json``); ``ShardReader`` checks the files' headers against it before any read, so a
  missing shard, a stale index or two files claiming one slice is an error naming the path.
- A rank may own several separate slices of one tensor (experts placed by load: ids that are not
  consecutive; ``FlatSlices``). A safetensors file holds one tensor per name, so such slices are
  stored under ``<fqn>@<offset>`` in the file (the index records that name as the chunk's ``key``);
  a tensor's only slice in a file keeps the plain name, so single-slice files are unchanged.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner, _hf_utils
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from model.hf.flat_shards import CUSTOM_METADATA_KEY, INDEX, SAVED_OFFSETS_KEY, check_shards
from model.hf.safetensors_stream import SafetensorsWriter

_DCP_KEYS = (_hf_utils.CUSTOM_METADATA_KEY, _hf_utils.SAVED_OFFSETS_KEY)
if _DCP_KEYS != (CUSTOM_METADATA_KEY, SAVED_OFFSETS_KEY):
    raise ImportError("torch.distributed.checkpoint renamed its safetensors header keys; "
                      "update model/hf/flat_shards.py")

if TYPE_CHECKING:
    import torch.distributed.checkpoint.planner as dcp_planner


@dataclass
class FlatSlice:
    """``tensor`` (1-D, contiguous) holds elements [offset, offset + len) of the flattened tensor
    of ``numel`` elements that DCP knows by this entry's key."""
    tensor: torch.Tensor
    offset: int
    numel: int

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size([self.offset]), sizes=torch.Size([self.tensor.numel()]))

    # DCP's _Checkpointable protocol (as DTensor implements it)
    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size([self.offset])), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=self._chunk(),
                                                      properties=TensorProperties(dtype=self.tensor.dtype),
                                                      size=torch.Size([self.numel])))]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.tensor


@dataclass
class FlatSlices:
    """Several separate slices of one flattened tensor of ``numel`` elements held by this rank."""
    parts: list[FlatSlice]
    numel: int

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [w for p in self.parts for w in p.__create_write_items__(fqn, p)]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [p._chunk() for p in self.parts]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.part(index).tensor

    def part(self, index: MetadataIndex) -> FlatSlice:
        off = index.offset[0] if index.offset is not None else None
        for p in self.parts:
            if off is None or p.offset == off:
                return p
        raise ValueError(f"{index.fqn}: this rank holds no slice at offset {off}")


def flat_entry(slices: list[FlatSlice]) -> FlatSlice | FlatSlices:
    """One state-dict entry for this rank's slices of one tensor (sorted by offset)."""
    slices = sorted(slices, key=lambda p: p.offset)
    return slices[0] if len(slices) == 1 else FlatSlices(slices, slices[0].numel)


def _tensor_of(obj: Any, index: MetadataIndex) -> torch.Tensor | None:
    if isinstance(obj, FlatSlice):
        return obj.tensor
    if isinstance(obj, FlatSlices):
        return obj.part(index).tensor
    return None


def file_key(fqn: str, offset: int, several: bool) -> str:
    """The tensor name of a chunk inside a shard file (see the module docstring)."""
    return f"{fqn}@{offset}" if several else fqn


class SavePlanner(DefaultSavePlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        t = _tensor_of(self.state_dict[index.fqn], index)
        return t if t is not None else super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        # the default one first maps every value it does not know (FlatSlice) to None; the state
        # dict here is already flat and every destination exists
        self.original_state_dict = self.state_dict = state_dict
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        t = _tensor_of(self.state_dict[index.fqn], index)
        return t if t is not None else super().lookup_tensor(index)


# ---------------------------------------------------------------- writing

class ShardWriter(HuggingFaceStorageWriter):
    """One safetensors file per writing rank (``shard-RRRRR.safetensors``), tensors streamed one at a
    time (model.hf.safetensors_stream: written under a temporary name, fsynced, then renamed); the
    coordinator writes the global index ``index.json`` when every rank is done."""

    def __init__(self, path: str | os.PathLike, rank: int):
        super().__init__(str(path), save_distributed=True)
        self.rank = rank

    def write_data(self, plan: SavePlan, planner: dcp_planner.SavePlanner) -> Future:
        fut: Future = Future()
        items = [w for w in plan.items if w.type != WriteItemType.BYTE_IO]
        if len(items) != len(plan.items):
            raise ValueError("sharded checkpoint: only tensors can be stored (got a non-tensor object)")
        if not items:
            fut.set_result([])
            return fut
        name = f"shard-{self.rank:05d}.safetensors"
        per_fqn: dict[str, int] = {}
        for w in items:
            per_fqn[w.index.fqn] = per_fqn.get(w.index.fqn, 0) + 1
        keys = [file_key(w.index.fqn, w.tensor_data.chunk.offsets[0], per_fqn[w.index.fqn] > 1) for w in items]
        entries = [(k, w.tensor_data.properties.dtype, list(w.tensor_data.chunk.sizes)) for k, w in zip(keys, items)]
        sharding = {k: {SAVED_OFFSETS_KEY: list(w.tensor_data.chunk.offsets), "fqn": w.index.fqn}
                    for k, w in zip(keys, items)}
        results = []
        with SafetensorsWriter(Path(self.path) / name, entries,
                               {CUSTOM_METADATA_KEY: json.dumps(sharding), "format": "pt"}) as out:
            for k, w in zip(keys, items):
                t = planner.resolve_data(w).detach()     # a 1-D narrow of a flat (staged) buffer
                out.write(k, t)
                nbytes = t.numel() * t.element_size()
                results.append(WriteResult(index=w.index, size_in_bytes=nbytes,
                                           storage_data=_StorageInfo(name, out.file_offset(k), nbytes)))
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator only: the global index of every chunk, JSON, written atomically."""
        files = {(r.index.fqn, tuple(r.index.offset)): r.storage_data.relative_path for rs in results for r in rs}
        in_file: dict[tuple[str, str], int] = {}
        for (fqn, _), file in files.items():
            in_file[(fqn, file)] = in_file.get((fqn, file), 0) + 1
        index = {}
        for fqn, md in metadata.state_dict_metadata.items():
            chunks = []
            for c in md.chunks:
                file = files[(fqn, tuple(c.offsets))]
                entry = {"offset": list(c.offsets), "size": list(c.sizes), "file": file}
                if in_file[(fqn, file)] > 1:
                    entry["key"] = file_key(fqn, c.offsets[0], True)
                chunks.append(entry)
            index[fqn] = {"dtype": str(md.properties.dtype).replace("torch.", ""), "size": list(md.size),
                          "chunks": chunks}
        tmp = Path(self.path) / f".{INDEX}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "tensors": index}, f, indent=0, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, Path(self.path) / INDEX)


class ShardReader(HuggingFaceStorageReader):
    """DCP's safetensors reader, after checking the shards against the global index; the metadata
    comes from that index (chunks, full sizes, and the in-file name of each chunk)."""

    def read_metadata(self) -> Metadata:
        from torch.distributed.checkpoint._hf_utils import _HFStorageInfo
        from torch.distributed.checkpoint.metadata import StorageMeta

        index = check_shards(self.path)
        sd_md, storage, self._keys = {}, {}, {}
        for fqn, md in index.items():
            dtype = getattr(torch, md["dtype"])
            chunks = []
            for c in md["chunks"]:
                off, size = torch.Size(c["offset"]), torch.Size(c["size"])
                chunks.append(ChunkStorageMetadata(offsets=off, sizes=size))
                storage[MetadataIndex(fqn=fqn, offset=off)] = _HFStorageInfo(
                    relative_path=str(Path(self.path) / c["file"]), shape=size, dtype=dtype)
                self._keys[(fqn, tuple(off))] = c.get("key", fqn)
            sd_md[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=dtype),
                                               size=torch.Size(md["size"]), chunks=chunks)
        metadata = Metadata(state_dict_metadata=sd_md, storage_data=storage)
        metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _process_read_request(self, f: Any, req: ReadItem, planner: dcp_planner.LoadPlanner) -> None:
        key = self._keys[(req.storage_index.fqn, tuple(req.storage_index.offset))]
        slices = tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))
        tensor = f.get_slice(key)[slices]
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise ValueError(f"sharded checkpoint {self.path}: {req.storage_index.fqn} read {tuple(tensor.size())} "
                             f"elements for a slice of {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)


