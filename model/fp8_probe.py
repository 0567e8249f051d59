"""Which FP8 kernel runs each GEMM kind, verified on the device at every GEMM shape the model runs.

GEMM kinds and their kernels (model/fp8_linear.py):
  linear              forward, dgrad, wgrad of FP8Linear: blockwise scaled_mm (Hopper), else the Triton FP8
                      GEMMs with one group and fused quantizers (sm89: one launch per GEMM where rowwise
                      scaled_mm needs K/128), else rowwise scaled_mm
  experts fwd/dgrad   Triton m-grouped FP8 GEMM (model/kernels/fp8_grouped.py)
  experts wgrad       Triton k-grouped FP8 GEMM
Each candidate is run at every distinct (K, N) the converted modules have, with ragged rows (an
empty expert, counts that are not multiples of 128), and compared with the emulated oracle; the
first that passes everywhere is used. On CUDA, landing on the emulated path is an error unless
``fp8.backend: emulated`` asked for it: FP8 there would be several times slower than bf16.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from model import fp8_linear
from model.fp8 import quantize_act, quantize_weight, quantize_wgrad, rel_err
from model.fp8_linear import _mm_emulated, fp8_grouped_mm, fp8_mm

ALIGN = 16              # bytes: every fp8 row the Triton kernels read starts 16-byte aligned
TOL = 1e-2              # against the emulated oracle (bf16-output scaled_mm included)
PROBE_ROWS = (0, 77, 150)   # per expert in a probe: an empty one, two that are not multiples of 128


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _probe_linear(kernel: str, device: torch.device, shapes: Iterable[tuple[int, int]]) -> str | None:
    """All three GEMMs of a linear at every (N, K); None when they match the emulated oracle."""
    g = torch.Generator(device="cpu").manual_seed(0)
    try:
        for n, k in sorted(shapes):
            x, w, dy = (torch.randn(m, c, generator=g).to(device) for m, c in ((200, k), (n, k), (200, n)))
            pairs = {"fwd": (quantize_act(x), quantize_weight(w)), "dgrad": (quantize_act(dy), quantize_weight(w).t()),
                     "wgrad": (quantize_wgrad(dy).t(), quantize_wgrad(x).t())}
            for name, (a, b) in pairs.items():
                err = rel_err(fp8_mm(a, b, kernel), _mm_emulated(a, b))
                if not err < TOL:
                    return f"{name} at N={n} K={k}: rel err {err:.2e} vs emulated"
    except Exception as e:  # noqa: BLE001 -- any failure means "not supported here"
        return _why(e)
    return None


def _probe_grouped(kernel: str, device: torch.device, shapes: Iterable[tuple[int, int]]) -> str | None:
    """Forward, dgrad and wgrad of the grouped GEMM at every expert (K, M), ragged rows."""
    g = torch.Generator(device="cpu").manual_seed(0)
    counts = torch.tensor(PROBE_ROWS, device=device)
    try:
        for k, m in sorted(shapes):
            x = torch.randn(sum(PROBE_ROWS), k, generator=g).to(device)
            w = (torch.randn(len(PROBE_ROWS), k, m, generator=g) * 0.05).to(device)
            dy = torch.randn(sum(PROBE_ROWS), m, generator=g).to(device)
            outs = {}
            for kern in (kernel, "emulated"):
                xk, wk = x.clone().requires_grad_(), w.clone().requires_grad_()
                fp8_grouped_mm(xk, wk, counts, kernel=kern).backward(dy)
                outs[kern] = (fp8_grouped_mm(x, w, counts, kernel=kern), xk.grad, wk.grad)
            for name, got, ref in zip(("fwd", "dgrad", "wgrad"), outs[kernel], outs["emulated"]):
                err = rel_err(got, ref)
                if not err < TOL:
                    return f"{name} at K={k} M={m}: rel err {err:.2e} vs emulated"
    except Exception as e:  # noqa: BLE001
        return _why(e)
    return None


def _grouped_unavailable(device: torch.device) -> str | None:
    """Why the Triton FP8 grouped kernels cannot run on ``device`` (None: they may)."""
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"fp8 tensor cores need sm_89 or newer, this is sm_{cap[0]}{cap[1]}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


_PROBED: dict[tuple, dict[str, tuple[str, str]]] = {}


def _resolve_cuda(dev: torch.device, linear: frozenset, experts: frozenset) -> dict[str, tuple[str, str]]:
    name = f"{torch.cuda.get_device_name(dev)} (sm_{''.join(map(str, torch.cuda.get_device_capability(dev)))})"
    out, why = {}, {}
    if linear:
        for kernel in ("blockwise", "triton", "rowwise"):
            if kernel == "blockwise" and not hasattr(F, "scaled_mm"):
                why[kernel] = "torch has no F.scaled_mm"
                continue
            if kernel == "triton":
                why[kernel] = _grouped_unavailable(dev) or _probe_linear(kernel, dev, linear)
                if why[kernel] is None:
                    out["linear"] = (kernel, "Triton FP8 GEMM, one group (fused Triton quantizers)")
                    break
                continue
            for out_dtype in (torch.float32, torch.bfloat16):
                fp8_linear._OUT_DTYPE[kernel] = out_dtype
                why[kernel] = _probe_linear(kernel, dev, linear)
                if why[kernel] is None:
                    out["linear"] = (kernel, f"{kernel} scaled_mm ({str(out_dtype)[6:]} out)")
                    break
            if "linear" in out:
                break
        else:
            raise ValueError(f"fp8: no usable FP8 kernel for the linear layers on {name}: blockwise scaled_mm "
                             f"({why.get('blockwise')}), Triton FP8 GEMM ({why.get('triton')}), rowwise scaled_mm "
                             f"({why.get('rowwise')}); "
                             "set fp8.backend: emulated to run the slow emulated path")
    if experts:
        missing = _grouped_unavailable(dev) or _probe_grouped("triton", dev, experts)
        if missing:
            raise ValueError(f"fp8: no usable FP8 kernel for the routed experts on {name}: the Triton FP8 "
                             f"grouped GEMM ({missing}); set fp8.backend: emulated to run the slow emulated path")
        out["experts"] = ("triton", "Triton m-grouped FP8 GEMM (fwd, dgrad), k-grouped (wgrad)")
    shapes = len(linear) + len(experts)
    for kind, (kernel, reason) in out.items():
        out[kind] = (kernel, f"{reason}, verified on {name} at {shapes} GEMM shapes")
    return out


def resolve_kernels(backend: str = "auto", device: torch.device | str | None = None,
                    linear_shapes: Iterable[tuple[int, int]] = (), expert_shapes: Iterable[tuple[int, int]] = ()
                    ) -> dict[str, tuple[str, str]]:
    """fp8.backend (auto | emulated | cuda) -> {"linear": (kernel, reason), "experts": (kernel, reason)}.

    linear_shapes: (out, in) of every FP8 linear; expert_shapes: (K, M) of every grouped expert GEMM.
    Raises ValueError (one line) where no verified kernel exists and emulated was not asked for."""
    if backend not in ("auto", "emulated", "cuda"):
        raise ValueError(f"fp8.backend={backend!r}: must be auto, emulated or cuda")
    if backend == "emulated":
        return {"linear": ("emulated", "requested"), "experts": ("emulated", "requested")}
    if not torch.cuda.is_available():
        if backend == "cuda":
            raise ValueError("fp8.backend='cuda' but this machine has no CUDA device "
                             "(torch.cuda.is_available() is False): no FP8 kernel to run")
        return {"linear": ("emulated", "no CUDA device"), "experts": ("emulated", "no CUDA device")}
    # a model is usually built on CPU and moved to the GPU later: probe where it will train
    dev = torch.device(device) if device is not None and torch.device(device).type == "cuda" else torch.device("cuda")
    linear, experts = frozenset(linear_shapes), frozenset(expert_shapes)
    key = (str(dev), linear, experts)
    if key not in _PROBED:
        _PROBED[key] = _resolve_cuda(dev, linear, experts)
    found = dict(_PROBED[key])
    for kind in ("linear", "experts"):
        found.setdefault(kind, ("emulated", "no such GEMMs in FP8"))
    return found


def resolve_backend(backend: str = "auto", device: torch.device | str | None = None) -> tuple[str, str]:
    """The linear kernel alone at one shape (M 200, N 384, K 512): kept for callers without a model."""
    return resolve_kernels(backend, device, linear_shapes=[(384, 512)])["linear"]


def describe(kernels: dict[str, tuple[str, str]]) -> str:
    """One line naming the kernel of each GEMM kind, for the log."""
    lin, exp = kernels["linear"][0], kernels["experts"][0]
    grouped = {"triton": "experts fwd/dgrad=triton m-grouped, wgrad=triton k-grouped",
               "emulated": "experts fwd/dgrad/wgrad=emulated (dequantized grouped_mm)"}[exp]
    return f"linear fwd/dgrad/wgrad={lin}; {grouped}"


def check_alignment(expert_dims: dict[str, dict[str, int]], kernel: str = "triton") -> None:
    """expert_dims {layer: {dim name: size}} -> None, or ValueError naming the first layer and dim that
    breaks the Triton kernels' rule: every fp8 row starts 16-byte aligned (dims multiple of 16)."""
    if kernel != "triton":
        return
    for layer, dims in expert_dims.items():
        for dim, size in dims.items():
            if size % ALIGN:
                raise ValueError(f"fp8: {layer}: {dim}={size} is not a multiple of {ALIGN} (the Triton FP8 grouped "
                                 f"GEMM reads 16-byte aligned fp8 rows); change it or add '{layer}' to fp8.exclude")
