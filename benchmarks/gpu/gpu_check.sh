#!/usr/bin/env bash
# GPU-only checks for a machine with a Hopper GPU (no network needed: torch, triton and
# transformers as installed). Runs the CUDA tests (FP8 CUDA backend vs the emulated oracle,
# flash-attn or SDPA attention, the chunked loss in bf16, the MoE layer compiled whole in bf16; EP overlap tests run on gloo/CPU
# everywhere) and the bf16 / FP8 throughput of configs/small.yaml with MFU against the measured bf16 matmul peak.
#
# Needs only torch, triton and transformers (no deepspeed, datasets or wandb: the lent H200 image has none
# of them). Checked on CPU on 2026-12-02 under that image's versions (torch 2.11.0, transformers 5.17.0)
# with those three imports blocked: the selected tests skip cleanly and bench_gpu.py runs.
# On the device tool, one call:  PYTHONUNBUFFERED=1 bash benchmarks/gpu/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
# Each stage has its own time limit (TEST_TIMEOUT, BENCH_TIMEOUT seconds), so a hang in one still
# leaves time for the other inside one lease.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
python -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>/dev/null || echo "flash-attn: not installed (SDPA is used)"
status=0
timeout "${TEST_TIMEOUT:-300}" python -m pytest -q -rs -s tests/test_fp8_linear.py tests/test_attention.py tests/test_loss.py tests/test_moe.py -k "cuda or flash" || status=1
timeout "${BENCH_TIMEOUT:-300}" python benchmarks/bench_gpu.py --config configs/small.yaml --batch "${BATCH:-4}" --steps "${STEPS:-10}" || status=1
exit $status
