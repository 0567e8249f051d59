"""Run state registered by its owners: what a checkpoint saves besides the model and optimizer.

Each component that holds state a resume needs (the sampler's position, the token shares, the
expert loads, the multi-site outer state, ...) registers itself once under a key:

    run_state.register("sampler", sampler)

and provides ``state_dict()`` (JSON-able: it goes into ``trainer_state.json`` under that key) and,
when a resume must restore it, ``load_state_dict(value)``. A component restored when it is built
(the token shares, which the expert placement needs before the model exists) leaves
``load_state_dict`` out. A component whose state includes sharded tensors also provides
``tensor_state() -> {key: (full shape, offset into the flattened full tensor, this rank's 1-D
tensor)}``: those go into the sharded ``state/`` directory with the model's, are read back in place
by a load, and its JSON part is loaded after them. Values that never change during a run (the
config, the tokenizer fingerprint) are registered with ``register_value``: saved, never loaded.

Checkpoint I/O (parallel/state/checkpoint.py) knows no component by name: it saves and loads
whatever is registered. Adding a piece of checkpointed state is one change in its owner plus its
registration.
"""
from __future__ import annotations

from typing import Any, Protocol


class Stateful(Protocol):
    def state_dict(self) -> Any: ...


class _Value:
    def __init__(self, value: Any):
        self.value = value

    def state_dict(self) -> Any:
        return self.value


class RunState:
    def __init__(self):
        self._owners: dict[str, Any] = {}

    def register(self, key: str, owner: Stateful) -> None:
        if key in self._owners:
            raise ValueError(f"run state key {key!r} is registered twice")
        if not callable(getattr(owner, "state_dict", None)):
            raise TypeError(f"run state {key!r}: {type(owner).__name__} has no state_dict()")
        self._owners[key] = owner

    def register_value(self, key: str, value: Any) -> None:
        self.register(key, _Value(value))

    def _with_tensors(self) -> dict[str, Any]:
        return {k: o for k, o in self._owners.items() if callable(getattr(o, "tensor_state", None))}

    def tensor_state(self) -> dict[str, tuple[tuple[int, ...], int, Any]]:
        """Every registered component's sharded tensors (collective for some owners: every rank calls it)."""
        out: dict[str, tuple[tuple[int, ...], int, Any]] = {}
        for key, owner in self._with_tensors().items():
            for name, entry in owner.tensor_state().items():
                if name in out:
                    raise ValueError(f"run state {key!r}: tensor key {name!r} is already taken")
                out[name] = entry
        return out

    def state_dict(self, engine_entries: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON of ``trainer_state.json``: components in registration order, then the engine's own
        entries (step, tensor shapes, optimizer step, ...), then the components that also save tensors
        (their JSON part describes those tensors; call ``tensor_state`` first)."""
        tensors = self._with_tensors()
        out = {k: o.state_dict() for k, o in self._owners.items() if k not in tensors}
        for k, v in (engine_entries or {}).items():
            if k in self._owners:
                raise ValueError(f"run state key {k!r} collides with the checkpoint's own entry")
            out[k] = v
        out.update({k: o.state_dict() for k, o in tensors.items()})
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Hand every registered component its saved value (keys a checkpoint lacks are left as built:
        checkpoints from before a component existed still resume)."""
        for key, owner in self._owners.items():
            load = getattr(owner, "load_state_dict", None)
            if callable(load) and key in saved:
                load(saved[key])
