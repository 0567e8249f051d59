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

import torch
from torch import nn

from model.fp8_linear import GROUPED_KERNELS, KERNELS, FP8Linear, FP8RoutedExperts
from model.fp8_probe import check_alignment, describe, resolve_kernels
from model.moe import RoutedExperts

if TYPE_CHECKING:
    from configs.schema import FP8Config

log = logging.getLogger(__name__)
PROTECTED = ("embed_tokens", "lm_head", "gate", "eh_proj")


def _first_param_device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    return None


def _eligible(model: nn.Module, include: list[str], exclude: list[str]) -> tuple[dict[str, nn.Module], dict]:
    """-> ({name: module to convert}, {name: why it stays})."""
    convert, skipped = {}, {}
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, (nn.Linear, RoutedExperts)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(mod, (FP8Linear, FP8RoutedExperts)):
            skipped[name] = "already FP8"
        elif any(fnmatch(name, p) for p in exclude):
            skipped[name] = "excluded by fp8.exclude"
        elif include and not any(fnmatch(name, p) for p in include):
            skipped[name] = "not matched by fp8.include"
        elif leaf in PROTECTED and not any(fnmatch(name, p) and leaf in p for p in include):
            skipped[name] = "kept high precision (name it in fp8.include to convert)"
        else:
            convert[name] = mod
    return convert, skipped


def expert_dims(modules: dict[str, nn.Module]) -> dict[str, dict[str, int]]:
    """{layer: {"hidden_size": D, "moe_intermediate_size": F}} of the routed experts among ``modules``:
    the K and N of their grouped GEMMs (gate_up: K=D, N=2F; down: K=F, N=D)."""
    return {name: {"hidden_size": m.dim, "moe_intermediate_size": m.hidden}
            for name, m in modules.items() if isinstance(m, RoutedExperts)}


def _gemm_shapes(modules: dict[str, nn.Module]) -> tuple[set, set]:
    """-> ({(out, in) of each linear}, {(K, M) of each expert GEMM}): what the probe must cover."""
    linear = {(m.out_features, m.in_features) for m in modules.values() if isinstance(m, nn.Linear)}
    experts = set()
    for m in modules.values():
        if isinstance(m, RoutedExperts):
            experts |= {(m.dim, 2 * m.hidden), (m.hidden, m.dim)}
    return linear, experts


def apply_fp8(model: nn.Module, fp8_cfg: FP8Config) -> dict:
    """Swap eligible modules of ``model`` to FP8 in place; returns a report:

    {"enabled": bool, "backend": requested, "kernel": the linear kernel (emulated|rowwise|blockwise|triton),
     "kernels": {"linear": kernel, "experts": emulated|triton}, "reason": str naming each GEMM kind's
     kernel, "converted": [names], "skipped": {name: why}}

    ``fp8_cfg`` is configs.schema.FP8Config or anything with enabled/backend/include/exclude
    (and optionally pow2_scales).
    With enabled=False nothing changes (the report says so). Raises ValueError (one line) when the
    GEMM dims break the CUDA kernels' alignment or no verified kernel exists on the GPU.
    """
    include = list(getattr(fp8_cfg, "include", []) or [])
    exclude = list(getattr(fp8_cfg, "exclude", []) or [])
    backend = getattr(fp8_cfg, "backend", "auto")
    pow2 = bool(getattr(fp8_cfg, "pow2_scales", False))
    report = {"enabled": bool(getattr(fp8_cfg, "enabled", True)), "backend": backend, "kernel": None,
              "kernels": {}, "reason": "", "converted": [], "skipped": {}}
    if not report["enabled"]:
        report["reason"] = "fp8.enabled is false"
        return report
    convert, report["skipped"] = _eligible(model, include, exclude)
    if backend != "emulated" and torch.cuda.is_available():
        check_alignment(expert_dims(convert))          # before the probe: a clear line, not a kernel error
    linear, experts = _gemm_shapes(convert)
    kernels = resolve_kernels(backend, _first_param_device(model), linear, experts)
    report["kernels"] = {kind: k for kind, (k, _) in kernels.items()}
    report["kernel"] = kernels["linear"][0]
    report["reason"] = describe(kernels) + " (" + "; ".join(sorted({r for _, r in kernels.values()})) + ")"
    for name, mod in convert.items():
        if isinstance(mod, RoutedExperts):
            mod.__class__, mod.fp8_kernel = FP8RoutedExperts, kernels["experts"][0]
        else:
            mod.__class__, mod.fp8_kernel = FP8Linear, kernels["linear"][0]
        mod.fp8_pow2, mod.cache_fp8 = pow2, True
        report["converted"].append(name)

    for p in include:  # a pattern that matches nothing is almost always a typo
        if not any(fnmatch(n, p) for n, _ in model.named_modules()):
            log.warning("fp8.include pattern %r matches no module", p)
    log.info("fp8: %s; converted %d modules, kept %d high precision",
             report["reason"], len(report["converted"]), len(report["skipped"]))
    return report


def set_fp8_option(model: nn.Module, **opts: str | bool) -> None:
    """Set fp8_kernel / fp8_pow2 / cache_fp8 on every FP8 module (benchmarks and tests). A kernel goes
    only to the modules that have it: rowwise/blockwise to FP8Linear, triton to both."""
    for k, v in opts.items():
        if k not in ("fp8_kernel", "fp8_pow2", "cache_fp8"):
            raise ValueError(f"unknown fp8 option {k}={v!r}")
        if k == "fp8_kernel" and v not in KERNELS + GROUPED_KERNELS:
            raise ValueError(f"fp8_kernel={v!r}: must be one of {sorted(set(KERNELS + GROUPED_KERNELS))}")
    for m in model.modules():
        for k, v in opts.items():
            if k == "fp8_kernel" and v not in (GROUPED_KERNELS if isinstance(m, FP8RoutedExperts) else KERNELS):
                continue
            if isinstance(m, (FP8Linear, FP8RoutedExperts)):
                setattr(m, k, v)
