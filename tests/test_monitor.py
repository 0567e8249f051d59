"""Rank 0's progress bar (parallel/metrics/monitor.py): the loss it shows is the last record's, from the
first record on (it read "nan" until then), and a step after a record keeps it."""
from __future__ import annotations

from configs.schema import load_config
from parallel.metrics.monitor import Monitor


def test_the_bar_shows_the_last_records_loss_and_never_nan(tmp_path):
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "logging.progress=true", "train.max_steps=3"])
    m = Monitor(cfg, rank=0, start_step=0, run_info={})
    try:
        m.step(1234.0, 0.05)
        assert "loss" not in m.pbar.postfix and "tok_s=1,234" in m.pbar.postfix   # nothing recorded yet
        m.log({"step": 1, "loss": 2.5})
        assert m.pbar.postfix.startswith("loss=2.500"), m.pbar.postfix
        m.step(2000.0, 0.06)
        assert m.pbar.postfix.startswith("loss=2.500") and "tok_s=2,000" in m.pbar.postfix, m.pbar.postfix
        assert "nan" not in m.pbar.postfix
        assert m.pbar.n == 2
    finally:
        m.close()
