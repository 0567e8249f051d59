"""Config files read strictly: anchors and aliases (``&a`` / ``*a``: a 1 kB alias bomb expands to
gigabytes once the config is copied), merge keys, duplicate keys at any depth and nesting deeper
than MAX_YAML_DEPTH are refused with one line naming the file (or override) and the line."""
from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_DEPTH = 32   # nesting of mappings/lists; the deepest real key (deepspeed.zero_optimization.x.y) is 4


class _Refused(Exception):
    def __init__(self, mark: Any, why: str):
        super().__init__(f"line {mark.line + 1}: {why}" if mark is not None else why)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader (no tags, no objects) that refuses anchors, aliases and nesting beyond
    MAX_YAML_DEPTH while composing, before anything is built."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(event.start_mark, f"YAML anchors and aliases (&{event.anchor} / *{event.anchor}) are "
                           "not allowed in config files; write the value out")
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(event.start_mark, f"nested deeper than {MAX_YAML_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_keys(loader: _StrictLoader, node: yaml.Node, path: list[str]) -> None:
    """Duplicate keys at any depth (PyYAML keeps the last silently) and merge keys (<<) are refused."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(loader, item, [*path, f"[{i}]"])
    elif isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(key_node.start_mark, "YAML merge keys (<<) are not allowed in config files")
            key = loader.construct_object(key_node, deep=True)
            name = ".".join([*path, str(key)]).replace(".[", "[")
            try:
                first = seen.get(key)
            except TypeError:   # a list or mapping as a key
                raise _Refused(key_node.start_mark, f"key {name!r} is not a scalar") from None
            if first is not None:
                raise _Refused(key_node.start_mark, f"duplicate key {name!r} (first on line {first})")
            seen[key] = key_node.start_mark.line + 1
            _check_keys(loader, value_node, [*path, str(key)])


def read_yaml(text: str, where: str) -> Any:
    """``text`` parsed as one YAML document of plain data; ValueError naming ``where`` and the line for
    invalid YAML, anchors/aliases, merge keys, duplicate keys and nesting beyond MAX_YAML_DEPTH."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(loader, node, [])
        return loader.construct_document(node)
    except _Refused as e:
        raise ValueError(f"{where}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ValueError(f"{where}: {at}invalid YAML: {' '.join(filter(None, (e.context, e.problem)))}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------- keys checked against their readers

# model.rope_scaling: what model/rope.py's YaRN and model/config.py read, which are the keys transformers'
# yarn validation (modeling_rope_utils._validate_yarn_rope_parameters) allows; model.rope_theta is separate
