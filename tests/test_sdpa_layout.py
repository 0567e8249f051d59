"""The q/k/v MLA gives SDPA meet the rules of SDPA's memory-efficient and cuDNN backends (head dims multiples
of 8, last stride 1, storage offsets 16-byte aligned) at every shipped config's head dims, checked on CPU
with a small MLA of those dims in bf16 (benchmarks/gpu/gpu_sdpa.py holds the rules and times the backends
on a GPU). A layout that breaks them would send a GPU run to the slow math backend without a word."""
from __future__ import annotations

import pytest
import torch

from benchmarks.gpu.gpu_sdpa import capture_qkv, layout_problems, shipped_head_dims

SHIPPED = shipped_head_dims()


def test_every_shipped_config_is_covered():
    assert {"tiny", "small", "deepseek_v3_671b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_head_dims_meet_the_fused_backends_rules(name):
    heads, dn, dr, dv = SHIPPED[name]
    q, k, v = capture_qkv(dn, dr, dv, heads=2)
    assert q.shape[-1] == k.shape[-1] == dn + dr and v.shape[-1] == dv     # what MLA attends with
    assert v.storage_offset() == dn                                        # v is the kv projection's view
    assert layout_problems(q, k, v) == []


def test_the_rules_catch_a_misaligned_value_view():
    """dn = 12 in bf16 puts v 24 bytes into the kv projection; dv = 12 is no multiple of 8."""
    q, k, v = capture_qkv(12, 8, 12)
    problems = layout_problems(q, k, v)
    assert any("v starts 24 bytes" in p for p in problems), problems
    assert any("v head dim 12" in p for p in problems), problems
    q, k, v = capture_qkv(32, 16, 32)                                      # tiny.yaml's: all rules met
    assert layout_problems(q, k, v) == []
    column_major = v.transpose(-1, -2).contiguous().transpose(-1, -2)      # last stride S = 16
    assert layout_problems(q, k, column_major) == ["v last stride 16 != 1"]
    assert layout_problems(q, k[..., :-8], v) == ["q head dim 48 != k head dim 40"]


def test_capture_sees_the_tensors_sdpa_gets():
    q, k, v = capture_qkv(32, 16, 32, heads=2, seq=8, batch=2)
    assert q.dtype == torch.bfloat16 and q.shape == (2, 2, 8, 48) and v.shape == (2, 2, 8, 32)
