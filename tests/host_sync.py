"""Host-device synchronisations, counted on a CPU.

On a GPU the host queues kernels ahead of the device; an op whose result the host must read (a
scalar, a data-dependent shape, a list of split sizes) makes it wait until the device has caught
up. On a CPU nothing waits, but the same calls are there to be seen. ``HostSyncs`` records, while
it is active, every call made from the project's code (model/, parallel/, train.py) that would
sync on a GPU:

- aten ops that read device data back: ``_local_scalar_dense`` (``.item()``, ``bool(t)``,
  ``float(t)``), ``nonzero``, ``masked_select``, ``unique``, and ``repeat_interleave`` without
  ``output_size`` (its output length is read from the device);
- ``Tensor.tolist()`` and ``Tensor.cpu()``, which on a GPU copy device memory to the host;
- ``torch.cuda.synchronize()`` (the rank clock's own calls, with a CUDA-typed device).

``events`` lists them as (kind, "file:line" of the project frame that made the call).
"""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
_PROJECT = tuple(str(ROOT / d) for d in ("model", "parallel", "train.py"))
aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
          aten._unique2.default, aten.unique_consecutive.default, aten.unique_dim.default}


def _caller() -> str | None:
    """'file:line' of the innermost project frame on the stack, or None (a call from elsewhere)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(_PROJECT):
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
    return None


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def _record(self, kind: str) -> None:
        where = _caller()
        if where is not None:
            self.events.append((kind, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func in _READS:
            self._record(str(func.overloadpacket.__name__))
        elif func.overloadpacket is aten.repeat_interleave and kwargs.get("output_size") is None:
            self._record("repeat_interleave without output_size")
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncs:
        self._saved = (torch.Tensor.tolist, torch.Tensor.cpu, torch.cuda.synchronize)
        tolist, cpu, _ = self._saved

        def counted_tolist(t: torch.Tensor) -> list:
            self._record("tolist")
            return tolist(t)

        def counted_cpu(t: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
            self._record("cpu")
            return cpu(t, *a, **k)

        torch.Tensor.tolist, torch.Tensor.cpu = counted_tolist, counted_cpu
        torch.cuda.synchronize = lambda *a, **k: self._record("cuda.synchronize")
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        torch.Tensor.tolist, torch.Tensor.cpu, torch.cuda.synchronize = self._saved
        super().__exit__(*exc)

    def count(self, prefix: str = "") -> int:
        """Events made from files whose path starts with ``prefix`` (all by default)."""
        return sum(1 for _, where in self.events if where.startswith(prefix))


def start_ep_rank(rank: int, world: int, port: int):
    """One rank of a spawned gloo world for the EP sync counts: DeepSpeed's process group on 127.0.0.1:port,
    one thread, and the expert-parallel group over all ``world`` ranks (returned)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import deepspeed

    from parallel.engine import skip_shm_allreduce_buffers
    from parallel.expert.sharding import create_groups

    torch.set_num_threads(1)
    skip_shm_allreduce_buffers()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    return create_groups(world)[0]
