"""apply_fp8: turn a built model's GEMMs into FP8 by swapping module classes in place.

Eligible: every nn.Linear (-> FP8Linear) and every RoutedExperts (-> FP8RoutedExperts). The swap
changes ``__class__`` only, so the very same Parameter objects stay in place: state-dict names,
weight tying, optimizer state, DeepSpeed/EP parameter tags and model/hf/convert.py are all unaffected.

What stays high precision, whatever the filters say:
  embedding, norms, the router (its ``gate`` is not a Linear), the attention core (softmax) --
  they are not GEMM modules.
What stays high precision unless a pattern *names it*:
  ``lm_head``, ``embed_tokens``, any module whose leaf name is ``gate`` and the MTP ``eh_proj``.
  "Names it" means an include pattern matches the module and contains that leaf name literally
  (``lm_head``, ``mtp.*.eh_proj``); a bare ``*`` does not count.
Filters are fnmatch patterns over dotted module names (``layers.3.mlp.experts``): an empty
``include`` means every eligible module; ``exclude`` always wins.
"""
from __future__ import annotations

import logging
from fnmatch import fnmatch
from typing import TYPE_CHECKING

from torch import nn

from model.fp8_linear import FP8Linear, FP8RoutedExperts, resolve_backend
from model.moe import RoutedExperts

if TYPE_CHECKING:
    from configs.schema import FP8Config

log = logging.getLogger(__name__)
PROTECTED = ("embed_tokens", "lm_head", "gate", "eh_proj")


def _first_param_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    return None


def apply_fp8(model: nn.Module, fp8_cfg: FP8Config) -> dict:
    """Swap eligible modules of ``model`` to FP8 in place; returns a report:

    {"enabled": bool, "backend": requested, "kernel": emulated|rowwise|blockwise, "reason": str,
     "converted": [names], "skipped": {name: why}}

    ``fp8_cfg`` is configs.schema.FP8Config or anything with enabled/backend/include/exclude
    (and optionally pow2_scales).
    With enabled=False nothing changes (the report says so).
    """
    include = list(getattr(fp8_cfg, "include", []) or [])
    exclude = list(getattr(fp8_cfg, "exclude", []) or [])
    backend = getattr(fp8_cfg, "backend", "auto")
    pow2 = bool(getattr(fp8_cfg, "pow2_scales", False))
    report = {"enabled": bool(getattr(fp8_cfg, "enabled", True)), "backend": backend, "kernel": None,
              "reason": "", "converted": [], "skipped": {}}
    if not report["enabled"]:
        report["reason"] = "fp8.enabled is false"
        return report
    kernel, reason = resolve_backend(backend, _first_param_device(model))
    report["kernel"], report["reason"] = kernel, reason

    for name, mod in model.named_modules():
        if not name or not isinstance(mod, (nn.Linear, RoutedExperts)):
            continue
        if isinstance(mod, (FP8Linear, FP8RoutedExperts)):
            report["skipped"][name] = "already FP8"
            continue
        leaf = name.rsplit(".", 1)[-1]
        if any(fnmatch(name, p) for p in exclude):
            report["skipped"][name] = "excluded by fp8.exclude"
            continue
        if include and not any(fnmatch(name, p) for p in include):
            report["skipped"][name] = "not matched by fp8.include"
            continue
        if leaf in PROTECTED and not any(fnmatch(name, p) and leaf in p for p in include):
            report["skipped"][name] = "kept high precision (name it in fp8.include to convert)"
            continue
        if isinstance(mod, RoutedExperts):
            mod.__class__ = FP8RoutedExperts
        else:
            mod.__class__ = FP8Linear
        mod.fp8_kernel, mod.fp8_pow2, mod.cache_fp8 = kernel, pow2, True
        report["converted"].append(name)

    for p in include:  # a pattern that matches nothing is almost always a typo
        if not any(fnmatch(n, p) for n, _ in model.named_modules()):
            log.warning("fp8.include pattern %r matches no module", p)
    log.info("fp8: kernel=%s (%s); converted %d modules, kept %d high precision",
             kernel, reason, len(report["converted"]), len(report["skipped"]))
    return report


def set_fp8_option(model: nn.Module, **opts: str | bool) -> None:
    """Set fp8_kernel / fp8_pow2 / cache_fp8 on every FP8 module (benchmarks and tests)."""
    for m in model.modules():
        if isinstance(m, (FP8Linear, FP8RoutedExperts)):
            for k, v in opts.items():
                if k not in ("fp8_kernel", "fp8_pow2", "cache_fp8"):
                    raise ValueError(f"unknown fp8 option {k}={v!r}")
                setattr(m, k, v)
