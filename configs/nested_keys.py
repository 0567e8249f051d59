"""Keys inside the nested sections a dataclass cannot type: ``model.rope_scaling`` (the keys the YaRN
code reads, each value type-checked) and the top level of ``deepspeed:`` (the keys DeepSpeed's own
config parser looks up, and those ``deepspeed.initialize`` reads itself, collected from DeepSpeed)."""
from __future__ import annotations

import difflib
import functools
import inspect
import logging
import math
import re
from typing import Any

ROPE_SCALING_KEYS = {"type": str, "rope_type": str, "factor": float, "original_max_position_embeddings": int,
                     "attention_factor": float, "beta_fast": float, "beta_slow": float, "mscale": float,
                     "mscale_all_dim": float, "truncate": bool}


def _rope_value_ok(kind: type, v: Any) -> bool:
    if kind is bool or kind is str:
        return isinstance(v, kind)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    return isinstance(v, int) and v > 0 if kind is int else math.isfinite(v)


_ROPE_WANT = {str: "a string", bool: "true or false", int: "a positive integer", float: "a finite number"}


def check_rope_scaling(rs: Any) -> None:
    """Unknown keys and values of the wrong type in model.rope_scaling are named."""
    if not isinstance(rs, dict):
        return   # ModelConfig.validate names it
    for key in list(rs):
        kind, where = ROPE_SCALING_KEYS.get(key), f"model.rope_scaling.{key}"
        if kind is None:
            hint = " (it is model.rope_theta)" if key == "rope_theta" else ""
            raise ValueError(f"{where}: unknown key{hint}; known keys: {sorted(ROPE_SCALING_KEYS)}")
        v = rs[key]
        if kind is float and isinstance(v, str):
            try:   # YAML 1.1 reads "4e1" as a string
                v = rs[key] = float(v)
            except ValueError:
                pass
        if v is None and key not in ("factor", "original_max_position_embeddings"):
            continue   # the YaRN code's default
        if not _rope_value_ok(kind, v):
            raise ValueError(f"{where}={v!r}: expected {_ROPE_WANT[kind]}")


class _KeySpy(dict):
    """An empty DeepSpeed config that records every top-level key DeepSpeed's parser looks up."""

    def __init__(self):
        super().__init__()
        self.seen: set[Any] = set()

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self) -> Any:   # "KEY in param_dict.keys()"
        return self


def _quiet(record: logging.LogRecord) -> bool:
    return False


@functools.lru_cache(maxsize=1)
def deepspeed_keys() -> tuple[str, frozenset[str], dict[str, str]]:
    """-> (DeepSpeed's version, the top-level keys its config parser reads, {removed key: its message}).

    The keys are taken from DeepSpeed itself: ``DeepSpeedConfig._initialize_params`` (which hands the dict
    to every sub-config's parser: zero, monitor, profiler, ...) run on an empty dict that records lookups.
    DeepSpeed's logger is muted while this first imports it: it would print its accelerator guess ("Setting
    accelerator to CPU") on stdout, which ``model_summary.py --json`` keeps for JSON; the run's log names
    the device."""
    ds_log = logging.getLogger("DeepSpeed")
    ds_log.addFilter(_quiet)
    try:
        import deepspeed
        from deepspeed.runtime import config as ds_config
    finally:
        ds_log.removeFilter(_quiet)
    spy, parsed = _KeySpy(), ds_config.DeepSpeedConfig.__new__(ds_config.DeepSpeedConfig)
    parsed._param_dict, parsed.global_rank = spy, 0
    parsed._initialize_params(spy)
    parsed._do_warning_check()   # reads one more key (vocabulary_size)
    removed = dict(getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {}))
    known = frozenset({k for k in spy.seen if isinstance(k, str)} | _initialize_keys(deepspeed)) - set(removed)
    return deepspeed.__version__, known, removed


_READS = re.compile(r"""config\[["'](\w+)["']\]|["'](\w+)["'] in config\b|config\.get\(["'](\w+)["']""")


def _initialize_keys(deepspeed: Any) -> set[str]:
    """Top-level keys ``deepspeed.initialize`` itself reads from the config dict before DeepSpeedConfig parses it
    (the mesh keys ``data_parallel_size`` / ``sequence_parallel_size``), from its source text: the parser spy
    never sees them."""
    try:
        source = inspect.getsource(deepspeed.initialize)
    except (OSError, TypeError):
        return set()
    return {next(g for g in m.groups() if g) for m in _READS.finditer(source)}


def check_deepspeed_keys(ds: dict[str, Any]) -> None:
    if not ds:
        return
    version, known, removed = deepspeed_keys()
    for key in ds:
        if key in removed:
            why = " ".join(str(removed[key]).split())
            raise ValueError(f"deepspeed.{key}: removed from DeepSpeed {version}: {why}")
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"deepspeed.{key}: not a key of DeepSpeed {version}'s config{hint}; known keys: "
                             f"{sorted(known)}")
