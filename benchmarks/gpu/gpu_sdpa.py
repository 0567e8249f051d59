"""SDPA at the shipped configs' head dims: the q/k/v layout MLA hands to SDPA, checked against the rules of
its memory-efficient and cuDNN backends, and each backend timed (forward + backward) where it runs.

    python benchmarks/gpu/gpu_sdpa.py [--seq 1024] [--batch 1] [--repeats 10]   # GPU stage of gpu_train_check.sh

MLA's q and k are concatenations (contiguous), v is a view into the kv projection: (B, H, S, dv) with
strides (S*H*(dn+dv), dn+dv, H*(dn+dv), 1) and storage offset dn. The rules it must meet (torch's
aten/src/ATen/native/transformers/cuda/sdp_utils.cpp, sm80 and newer, bf16):
- memory-efficient: q and k of one head dim; every head dim a multiple of 8; last stride 1; each
  tensor's storage offset x element size a multiple of 16 bytes;
- cuDNN: head dims multiples of 8, last stride 1, head dims within the card's limit (128; on sm90
  (192, 128) and, with recent cuDNN, up to 256), key length > 1;
- flash (and flash-attn): equal q/k and v head dims, which MLA's (dn + dr, dv) never has.
tests/test_sdpa_layout.py asserts the first two on CPU for every configs/*.yaml; here the GPU says
which backends run and how fast. On a CPU (the rehearsal) it runs the math backend only.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ALIGN_BYTES = 16


def shipped_head_dims() -> dict[str, tuple[int, int, int, int]]:
    """{config name: (heads, dn, dr, dv)} of every configs/*.yaml."""
    from configs.schema import load_config

    out = {}
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        m = load_config(str(path), []).model
        out[path.stem] = (m.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim)
    return out


def capture_qkv(dn: int, dr: int, dv: int, heads: int = 2, seq: int = 16, batch: int = 1,
                dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """(q, k, v) exactly as a small MLA with these head dims passes them to sdpa_attention."""
    import model.attention as attention
    from model.config import ModelConfig
    from model.rope import RotaryEmbedding

    cfg = ModelConfig(hidden_size=64, num_attention_heads=heads, q_lora_rank=32, kv_lora_rank=32,
                      qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, attn_impl="sdpa")
    mla = attention.MLA(cfg).to(device=device, dtype=dtype)
    x = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=dtype)
    rope = RotaryEmbedding(cfg).to(device)(seq, x.device, dtype)
    seen, sdpa = [], attention.sdpa_attention

    def capture(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append((q, k, v))
        return sdpa(q, k, v, *args, **kwargs)

    attention.sdpa_attention = capture
    try:
        mla(x, rope)
    finally:
        attention.sdpa_attention = sdpa
    return seen[0]


def layout_problems(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """What keeps SDPA's memory-efficient or cuDNN backend from these tensors (head-dim limits of a
    particular card aside); [] when both may run."""
    problems = []
    if q.shape[-1] != k.shape[-1]:
        problems.append(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[-1] % 8:
            problems.append(f"{name} head dim {t.shape[-1]} is not a multiple of 8")
        if t.stride(-1) != 1:
            problems.append(f"{name} last stride {t.stride(-1)} != 1")
        if t.storage_offset() * t.element_size() % ALIGN_BYTES:
            problems.append(f"{name} starts {t.storage_offset() * t.element_size()} bytes into its storage, "
                            f"not a multiple of {ALIGN_BYTES}")
    return problems


def time_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, repeats: int
                  ) -> dict[str, str]:
    """Forward + backward of causal SDPA under each backend alone -> {backend: 'x.xx ms' or why not}."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.timing import cuda_sync, time_call

    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.MATH] if q.is_cuda else [SDPBackend.MATH]
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = {}
    for backend in backends:
        def step(backend: SDPBackend = backend) -> None:
            with sdpa_kernel([backend]):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            o.sum().backward()
        try:
            t = time_call(step, repeats=repeats, warmup=2 if q.is_cuda else 1, sync=cuda_sync(q.device))
            out[backend.name] = f"{t.median * 1e3:.2f} ms"
        except RuntimeError as e:
            out[backend.name] = "not eligible: " + str(e).strip().splitlines()[0][:80]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--max-heads", type=int, default=32, help="heads timed per config (the largest have 128)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        a.seq, a.repeats = min(a.seq, 32), min(a.repeats, 2)   # bf16 on a CPU: the rehearsal proves the plumbing
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"cuDNN {torch.backends.cudnn.version() if device == 'cuda' else None}, batch {a.batch}, seq {a.seq}")
    bad, seen = 0, set()
    for name, (heads, dn, dr, dv) in shipped_head_dims().items():
        h = min(heads, a.max_heads)
        if (h, dn, dr, dv) in seen:
            continue
        seen.add((h, dn, dr, dv))
        q, k, v = capture_qkv(dn, dr, dv, heads=h, seq=a.seq, batch=a.batch, device=device)
        problems = layout_problems(q, k, v)
        bad += bool(problems)
        times = time_backends(q, k, v, (dn + dr) ** -0.5, a.repeats)
        print(f"{name}: heads {h}, qk {dn + dr}, v {dv}, v offset {v.storage_offset() * v.element_size()} B: "
              f"layout {'ok' if not problems else '; '.join(problems)}; "
              + ", ".join(f"{b} {t}" for b, t in times.items()), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
