"""Two ``python train.py`` runs with the same seed are the same run, bit for bit: every
metrics.jsonl field except the timing ones, and the final checkpoint's weights and balancing
biases. A different ``train.seed`` gives a different run.

Each same-seed run prepares its own data cache, so the BPE training and the packing are
covered too, not only the training loop.
"""
from __future__ import annotations

import pytest

from parallel.state import checkpoint
from tests.train_helpers import make_corpus, metrics, run_args, train

STEPS = 4


def _timing(key: str) -> bool:
    """Fields measured with a clock (throughput, MFU against a timed peak, durations)."""
    return key == "mfu" or key.endswith("_s") or "time" in key or "elapsed" in key


def _run(tmp_path, corpus, name: str, seed: int, cache: str):
    train(run_args(tmp_path, corpus, name, [f"train.max_steps={STEPS}", f"train.save_every={STEPS}",
                                            f"train.seed={seed}", f"data.cache_dir={tmp_path / cache}"]))
    final = checkpoint.complete_checkpoints(str(tmp_path / name))[-1]
    files = {f.relative_to(final).as_posix(): f.read_bytes() for f in sorted((final / checkpoint.SHARDS).iterdir())}
    files["rng_rank0.safetensors"] = (final / "rng_rank0.safetensors").read_bytes()   # sorted metadata keys
    return metrics(tmp_path / name), files


@pytest.mark.slow
def test_same_seed_same_run_bit_for_bit_other_seed_differs(tmp_path):
    corpus = make_corpus(tmp_path)
    a, files_a = _run(tmp_path, corpus, "a", seed=7, cache="cache_a")
    b, files_b = _run(tmp_path, corpus, "b", seed=7, cache="cache_b")

    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    assert any("val_loss" in r for r in a)                      # the evaluation is compared too
    compared = set()
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if not _timing(key):
                assert ra[key] == rb[key], f"step {ra['step']}: {key} {ra[key]!r} != {rb[key]!r}"
                compared.add(key)
    assert {"loss", "lm_loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "expert_load_imbalance"} <= compared
    assert {"tokens_per_s", "mfu"}.isdisjoint(compared)
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two runs with the same seed"

    c, files_c = _run(tmp_path, corpus, "c", seed=8, cache="cache_a")
    assert c[0]["loss"] != a[0]["loss"]
    shard = f"{checkpoint.SHARDS}/shard-00000.safetensors"
    assert files_c[shard] != files_a[shard]
