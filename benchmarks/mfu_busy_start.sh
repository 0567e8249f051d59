#!/usr/bin/env bash
# MFU when the run starts on a busy machine: two Python busy loops load both cores for the first
# 20 s while `python train.py` (configs/tiny.yaml, 40 steps) starts beside them, so the peak
# benchmark at start runs under the load and the training mostly after it. Results:
# benchmarks/results/training_speed.md. Usage (from any directory):
#   bash benchmarks/mfu_busy_start.sh CHECKOUT OUT_DIR [train.py overrides...]
set -euo pipefail
checkout=$(cd "$1" && pwd); out=$2; shift 2
cd "$checkout"
for _ in 1 2; do python -c "
import time
t = time.time()
while time.time() - t < 20:
    pass" & done
python train.py train.stop_at=40 train.out_dir="$out" logging.progress=false "$@" > "$out.log" 2>&1
wait
grep -E "peak|^step " "$out.log"
