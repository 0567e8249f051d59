"""The CUDA settings train.py starts with (parallel/device.py): expandable segments for the caching allocator
unless the user configured it, train.tf32 on CUDA only, batches copied from pinned memory. On a CPU the
allocator variable is still set and recorded (run.json), so a run here shows what a GPU run would use."""
from __future__ import annotations

import json

import pytest
import torch

from parallel.device import ALLOC_VARS, EXPANDABLE, allocator_env, apply_tf32, batch_to_device
from tests.train_helpers import make_corpus, run_args, train


def test_allocator_env_sets_expandable_segments_unless_configured():
    env: dict[str, str] = {}
    assert allocator_env(env) == f"PYTORCH_CUDA_ALLOC_CONF={EXPANDABLE}" and env == {ALLOC_VARS[0]: EXPANDABLE}
    for name in ALLOC_VARS:                      # either spelling torch reads is the user's choice
        env = {name: "max_split_size_mb:64"}
        assert allocator_env(env) == f"{name}=max_split_size_mb:64" and env == {name: "max_split_size_mb:64"}


@pytest.mark.parametrize("user", [None, "expandable_segments:False,max_split_size_mb:128"])
def test_a_run_records_the_allocator_setting_it_started_with(tmp_path, monkeypatch, user):
    """~4 s per run."""
    for name in ALLOC_VARS:
        monkeypatch.delenv(name, raising=False)
    env = {} if user is None else {"PYTORCH_CUDA_ALLOC_CONF": user}
    train(run_args(tmp_path, make_corpus(tmp_path), "run", ["train.max_steps=1"]), env=env)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["cuda_alloc_conf"] == f"PYTORCH_CUDA_ALLOC_CONF={user or EXPANDABLE}"
    assert run["config"]["train"]["tf32"] is True


def test_tf32_only_on_cuda():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision, torch.get_float32_matmul_precision()
    try:
        assert apply_tf32(True, torch.device("cpu")) is False
        assert (matmul.fp32_precision, torch.get_float32_matmul_precision()) == before   # a CPU run: untouched
        assert apply_tf32(True, torch.device("cuda")) is True and matmul.fp32_precision == "tf32"
        assert apply_tf32(False, torch.device("cuda")) is False and matmul.fp32_precision == "ieee"
    finally:
        matmul.fp32_precision = before[0]


def test_batch_to_device_on_cpu_is_the_batch():
    x = torch.arange(12).view(3, 4)
    assert torch.equal(batch_to_device(x, torch.device("cpu")), x)
