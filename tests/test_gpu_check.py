"""benchmarks/gpu/gpu_train_check.sh fits a 15-minute GPU lease: its stage table (parsed here, as the script
itself reads it) sums with the reserve to at most the script's budget, at most 600 s; every stage of the table
runs, in the table's order of value; no run of the large config writes a checkpoint (~16.5 GB for small.yaml),
the save / resume / export stages use the small one. The CPU rehearsal (GTC_CPU=1) runs the same stages."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "benchmarks" / "gpu" / "gpu_train_check.sh").read_text()


def _stage_table() -> list[tuple[str, int]]:
    table = re.search(r"^STAGE_TABLE='\n(.*?)^'", SCRIPT, re.S | re.M).group(1)
    return [(line.split()[0], int(line.split()[1])) for line in table.splitlines() if line.strip()]


def _number(name: str) -> int:
    return int(re.search(rf"^{name}=(\d+)", SCRIPT, re.M).group(1))


def test_stage_limits_fit_the_budget():
    stages = _stage_table()
    total = sum(limit for _, limit in stages) + _number("RESERVE")
    assert _number("BUDGET_MAX") <= 600
    assert total <= _number("BUDGET_MAX"), f"{stages} + reserve = {total} s"


def test_stages_run_in_order_of_value():
    names = [n for n, _ in _stage_table()]
    assert names[:6] == ["install", "cache", "bf16", "fp8", "gemm", "sdpa"]
    assert names.index("save") < names.index("resume") < names.index("export")
    order = [SCRIPT.index(f"run_stage {n} ") for n in names]     # each stage is run, in the table's order
    assert order == sorted(order)


def test_no_large_checkpoint():
    assert re.search(r"^CKPT_CONFIG=configs/tiny\.yaml", SCRIPT, re.M)
    for stage in ("bf16", "fp8"):   # the large config's runs go through the hook that skips saving
        assert re.search(rf"GTC_NO_SAVE=1 run_stage {stage} train {stage} \"\$CONFIG\"", SCRIPT), stage
    for stage in ("save", "resume"):
        assert re.search(rf"run_stage {stage} train {stage} \"\$CKPT_CONFIG\"", SCRIPT), stage
    hook = (ROOT / "benchmarks" / "gpu" / "gpu_sitecustomize.py").read_text()
    assert 'os.environ.get("GTC_NO_SAVE") == "1"' in hook and "Checkpointer.save = save" in hook
