#!/usr/bin/env bash
# The GPU session of issues 20 and 29 in one script that fits a 15-minute lease: train.py under the DeepSpeed
# launcher on one GPU, its stages ordered by what they tell, each under its own `timeout`, all inside one
# budget of at most 600 s, and no multi-GB checkpoint (configs/small.yaml's would be ~16.5 GB).
#
#   bash benchmarks/gpu/gpu_train_check.sh --prepare   # HERE, once: .whl/ (wheels the device image lacks,
#                                                     # deepspeed built from its sdist) and .gpucache/ (corpus,
#                                                     # tokenizer, token shards of both configs); both in .git/info/exclude
#   bash benchmarks/gpu/gpu_train_check.sh             # ON THE DEVICE: one call, carry [".whl", ".gpucache"]
#   GTC_CPU=1 OUT=/tmp/gtc_out bash benchmarks/gpu/gpu_train_check.sh   # CPU rehearsal: every stage, tiny.yaml
#
# The stages are the table below (tests/test_gpu_check.py parses it: the limits and the reserve fit the
# budget). GTC_STAGES (comma list) runs a subset, e.g. GTC_STAGES=install,cache,fp8 for a rerun. Writes
# $OUT/gpu_train_check.log, $OUT/gpu_figures.json, $OUT/metrics_{bf16,fp8}.jsonl; a summary table last.
STAGE_TABLE='
install  60  the carried wheels, pip --target, nothing built
cache    20  the carried token shards are found, not rebuilt
bf16     120 configs/small.yaml in bf16, STEPS steps, no checkpoint written
fp8      120 the same with fp8.enabled=true; the kernel of each GEMM kind from its log
gemm     45  one MoE layer of small.yaml: bf16 grouped GEMM against the FP8 swap, forward + backward
sdpa     40  SDPA backends at every shipped config head dims (layout rules, then each backend timed)
save     45  configs/tiny.yaml in bf16 to a small checkpoint at step SPLIT
resume   40  that run resumed from its checkpoint to step MAX (same LR schedule)
export   40  scripts/export_hf.py of the small checkpoint, then transformers loads it and runs the val rows
'
BUDGET_MAX=600     # seconds: the whole script, on the GPU (a 15-minute lease also pays the machine start)
RESERVE=20         # seconds kept for the figures at the end
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${GTC_PY:-python3}
CPU=${GTC_CPU:-0}

WHEEL_PINS="hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
typing-extensions==4.15.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"
DEEPSPEED=deepspeed==0.19.8
# data settings of the GPU runs: the carried cache is built with exactly these (same key on both machines)
GPU_CONFIG=configs/small.yaml     # the bf16 and FP8 steps (1.38 B parameters)
CKPT_CONFIG=configs/tiny.yaml     # the save / resume / export stages: a ~0.1 GB checkpoint
GPU_DATA="data.path=.gpucache/corpus data.cache_dir=.gpucache/data data.val_fraction=0.05"

# ------------------------------------------------------------------------------------------ helpers
install_wheels() {   # $1: target dir. typing_extensions only where the image's is older than pydantic needs
  local target=$1 wheels=() w
  if [[ ${GTC_CPU:-0} == 1 ]] && ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "install: no .whl/ here (the rehearsal uses this machine's packages)"; return 0
  fi
  for w in .whl/*.whl; do
    if [[ $(basename "$w") == typing_extensions-* ]] && "$PY" - <<'EOF'
import importlib.metadata as m, sys
from packaging.version import Version
try:
    sys.exit(0 if Version(m.version("typing_extensions")) >= Version("4.14.1") else 1)
except m.PackageNotFoundError:
    sys.exit(1)
EOF
    then echo "install: keeping the image's typing_extensions"; continue; fi
    wheels+=("$w")
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "${wheels[@]}"
}

if [[ ${1:-} == --prepare ]]; then
  # ---- HERE, on the CPU machine with network: wheels and the data cache ----
  set -e
  BUILD_PY=${GTC_BUILD_PY:-python3}    # needs torch (deepspeed's setup.py imports it: --no-build-isolation)
  exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
  grep -qx '/.gpucache/' "$exclude" 2>/dev/null || echo '/.gpucache/' >> "$exclude"
  rm -rf .whl && mkdir -p .whl
  DS_BUILD_OPS=0 "$BUILD_PY" -m pip wheel -q --no-cache-dir --no-deps --no-build-isolation --no-binary deepspeed \
    "$DEEPSPEED" -w .whl
  # shellcheck disable=SC2086
  "$BUILD_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEEL_PINS
  "$BUILD_PY" benchmarks/gpu/gpu_wheel_check.py .whl
  # the cache, built by GTC_PY with the carried wheels on its path (a Python 3.12 venv with the image's
  # transformers/tokenizers makes the tokenizer files and fingerprint exactly the device's)
  site=$(mktemp -d /tmp/gtc_prep_site.XXXX)
  install_wheels "$site"
  "$PY" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null \
    || echo "prepare: warning: $PY is not Python 3.12; the cache is still valid but built outside the image's versions"
  rm -rf .gpucache && mkdir -p .gpucache
  PYTHONPATH="$site" "$PY" benchmarks/gpu/gpu_build_cache.py corpus --dest .gpucache/corpus --mb "${GTC_CORPUS_MB:-7}"
  # shellcheck disable=SC2086
  PYTHONPATH="$site" nice -n 10 "$PY" benchmarks/gpu/gpu_build_cache.py build --config $GPU_CONFIG $GPU_DATA
  # shellcheck disable=SC2086
  PYTHONPATH="$site" "$PY" benchmarks/gpu/gpu_build_cache.py check --config $GPU_CONFIG $GPU_DATA
  # shellcheck disable=SC2086
  PYTHONPATH="$site" nice -n 10 "$PY" benchmarks/gpu/gpu_build_cache.py build --config $CKPT_CONFIG $GPU_DATA
  rm -rf "$site"
  du -sh .whl .gpucache
  echo "what travels: $(( $(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1) / 1024 )) KiB"\
       "of working tree + $(du -sk .whl | cut -f1) KiB .whl + $(du -sk .gpucache | cut -f1) KiB .gpucache"
  exit 0
fi

# ------------------------------------------------------------------------------------------ the check
OUT=${OUT:-/tmp/gtc_out}
mkdir -p "$OUT"
W=${GTC_WORK:-/tmp/gtc}                 # work folder: stage logs, memory samples, figures' inputs
rm -rf "$W" && mkdir -p "$W/hook" "$W/bin"
exec > >(tee "$OUT/gpu_train_check.log") 2>&1
TEE_PID=$!
T0=$(date +%s)
BUDGET=${GTC_BUDGET:-$([[ $CPU == 1 ]] && echo 2400 || echo $BUDGET_MAX)}
STAGES=${GTC_STAGES:-$(awk 'NF {printf "%s%s", sep, $1; sep=","}' <<< "$STAGE_TABLE")}
stage_limit() { awk -v s="$1" '$1 == s {print $2}' <<< "$STAGE_TABLE"; }

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export HF_DATASETS_CACHE="$W/hf_datasets" TORCH_EXTENSIONS_DIR="$W/torch_extensions" TOKENIZERS_PARALLELISM=false
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

if [[ $CPU == 1 ]]; then
  LIMIT_SCALE=${GTC_LIMIT_SCALE:-4}     # a shared 2-core machine: emulated FP8 alone runs ~10 tokens/s
  SITE=${GTC_SITE:-/tmp/gtc_site}
  CONFIG=configs/tiny.yaml STEPS=4 SPLIT=4 MAX=6
  RUNROOT=/tmp/gtc_runs
  CORPUS=${GTC_CORPUS:-.gpucache/corpus}
  RUN_OVR="train.dtype=${GTC_CPU_DTYPE:-fp32} train.micro_batch_size=2 data.seq_len=128 train.eval_batches=2 train.warmup_steps=2
           data.path=$CORPUS data.max_files=40 data.cache_dir=$W/cpu_cache data.val_fraction=0.05"
  CKPT_OVR="$RUN_OVR"
  HF_ROWS=4 HF_BATCH=2
else
  export DS_ACCELERATOR=cuda            # fail loudly rather than fall back to DeepSpeed's CPU accelerator
  LIMIT_SCALE=${GTC_LIMIT_SCALE:-1}
  SITE=/tmp/site
  CONFIG=$GPU_CONFIG STEPS=25 SPLIT=20 MAX=30
  RUNROOT=/tmp/gtc_runs                 # the largest checkpoint is tiny.yaml's (~0.1 GB)
  # train.warmup_steps=10: small.yaml's 1000-step warmup would keep the LR near zero for all the steps
  RUN_OVR="train.dtype=bf16 train.warmup_steps=10 $GPU_DATA"
  CKPT_OVR="train.dtype=bf16 train.warmup_steps=10 $GPU_DATA"
  HF_ROWS=32 HF_BATCH=8
fi
COMMON="logging.wandb=disabled logging.progress=false train.log_every=1 train.keep_last=1"
rm -rf "$RUNROOT" && mkdir -p "$RUNROOT"
BF16=$RUNROOT/bf16 FP8=$RUNROOT/fp8 CKPT=$RUNROOT/ckpt HF=$RUNROOT/hf

want() { [[ ",$STAGES," == *",$1,"* ]]; }

run_stage() {   # name cmd... ; its limit from the table; output to the main log and $W/name.log; a line in stages.tsv
  local name=$1; shift
  local lim now left t0 rc
  lim=$(( $(stage_limit "$name") * LIMIT_SCALE )); now=$(date +%s); left=$(( BUDGET - RESERVE - (now - T0) ))
  (( left < lim )) && lim=$left
  if (( lim < 10 )); then
    printf '%s\t\t0\tskipped: out of time (budget %ss)\n' "$name" "$BUDGET" >> "$W/stages.tsv"
    echo "==== stage $name skipped: out of time"; return 1
  fi
  echo "==== [$(( now - T0 ))s] stage $name (limit ${lim}s): $*"
  t0=$(date +%s%N)
  if declare -F "$1" > /dev/null; then set -- bash -c '"$@"' _ "$@"; fi   # a function: run it in a child bash
  # timeout leads its own process group; once it returns, whatever is left of the group (a launcher
  # child still saving after SIGTERM, the nvidia-smi sampler) is killed, so the budget holds
  ( timeout -k 15 "$lim" "$@" & p=$!; wait $p; r=$?; kill -KILL -- -$p 2> /dev/null; exit $r ) 2>&1 \
    | tee "$W/$name.log"
  rc=${PIPESTATUS[0]}
  local dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  local note=""; (( rc == 124 || rc == 137 )) && note="timed out after ${lim}s"
  printf '%s\t%s\t%s.%03d\t%s\n' "$name" "$rc" $(( dt / 1000 )) $(( dt % 1000 )) "$note" >> "$W/stages.tsv"
  echo "==== stage $name: rc $rc in $(( dt / 1000 )).$(( dt % 1000 / 100 ))s $note"
  return "$rc"
}

smi_start() {   # $1: tag. nvidia-smi memory.used every 250 ms in the background
  SMI_PID=
  command -v nvidia-smi > /dev/null || return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$W/smi_$1.txt" 2>/dev/null &
  SMI_PID=$!
}
smi_stop() { [[ -n ${SMI_PID:-} ]] && kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=; }

train() {   # tag config out_dir master_port overrides... ; deepspeed launcher, memory hook and nvidia-smi sampling
  local tag=$1 config=$2 dir=$3 port=$4; shift 4
  smi_start "$tag"
  # shellcheck disable=SC2086
  GTC_TAG=$tag GTC_MEMLOG="$W/memlog.jsonl" PYTHONPATH="$W/hook:$PYTHONPATH" \
    deepspeed --num_gpus 1 --master_port "$port" train.py --config "$config" $COMMON train.out_dir="$dir" "$@"
  local rc=$?
  smi_stop
  return $rc
}
export_and_load() {   # the small checkpoint -> a Hugging Face directory -> transformers runs its val rows
  "$PY" scripts/export_hf.py --checkpoint "$CKPT" --out "$HF" || return $?
  local shards
  shards=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['shard_dir'])" "$CKPT/run.json")
  "$PY" benchmarks/gpu/gpu_hf_check.py --hf "$HF" --shards "$shards" --rows "$HF_ROWS" --batch "$HF_BATCH" \
    --json "$W/hf.json"
}
export PY W SITE COMMON CKPT HF HF_ROWS HF_BATCH
export -f install_wheels train smi_start smi_stop export_and_load

echo "gpu_train_check: $(date -u +%FT%TZ) host ${HOSTNAME:-?} mode $([[ $CPU == 1 ]] && echo CPU-rehearsal || echo GPU)" \
     "budget ${BUDGET}s stages $STAGES; repo $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits > "$W/smi_idle.txt"
nproc; free -g | head -2

# `python` (the stages call it) must be the interpreter that holds torch: a wrapper, not a symlink
# (a symlinked venv interpreter loses its venv)
if ! python -c "import torch" > /dev/null 2>&1 || [[ -n ${GTC_PY:-} ]]; then
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v "$PY")" > "$W/bin/python"; chmod +x "$W/bin/python"
  export PATH="$W/bin:$PATH"
fi

# ---- install: the carried wheels ----
if want install; then
  [[ $CPU == 1 ]] && rm -rf "$SITE"
  run_stage install install_wheels "$SITE"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
cp benchmarks/gpu/gpu_sitecustomize.py "$W/hook/sitecustomize.py"
"$PY" benchmarks/gpu/gpu_build_cache.py touch --dest "${CORPUS:-.gpucache/corpus}" || true   # the key holds mtimes
timeout 90 "$PY" - "$W/versions.json" <<'EOF'
import importlib.metadata as m, json, platform, sys
import torch
v = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
     "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
     "capability": ".".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None}
for d in ("deepspeed", "datasets", "transformers", "tokenizers", "safetensors", "huggingface_hub", "pydantic",
          "pydantic_core", "hjson", "dill", "multiprocess", "pyarrow", "pandas", "fsspec", "numpy", "triton",
          "typing_extensions", "xxhash", "accelerate", "flash_attn"):
    try:
        v[d] = m.version(d)
    except m.PackageNotFoundError:
        v[d] = None
try:
    import deepspeed, datasets
    v["deepspeed_from"], v["datasets_from"] = deepspeed.__file__, datasets.__file__
except Exception as e:  # noqa: BLE001
    v["import_error"] = repr(e)
open(sys.argv[1], "w").write(json.dumps(v))   # DeepSpeed logs to stdout: the file holds the JSON alone
EOF
echo "versions: $(cat "$W/versions.json")"
command -v deepspeed || echo "deepspeed launcher: NOT on PATH"

# ---- cache: the carried token shards are found ----
# shellcheck disable=SC2086
want cache && run_stage cache "$PY" benchmarks/gpu/gpu_build_cache.py check --config $CONFIG $COMMON $RUN_OVR

# ---- bf16, then fp8: throughput steps of the large config, nothing saved (GTC_NO_SAVE: the hook) ----
if want bf16; then
  # shellcheck disable=SC2086
  GTC_NO_SAVE=1 run_stage bf16 train bf16 "$CONFIG" "$BF16" 29511 train.max_steps=$STEPS train.save_every=$STEPS \
    train.eval_every=$STEPS $RUN_OVR
  cp "$BF16/metrics.jsonl" "$OUT/metrics_bf16.jsonl" 2>/dev/null
fi
if want fp8; then
  # shellcheck disable=SC2086
  GTC_NO_SAVE=1 run_stage fp8 train fp8 "$CONFIG" "$FP8" 29512 train.max_steps=$STEPS train.save_every=$STEPS \
    train.eval_every=$STEPS fp8.enabled=true $RUN_OVR
  cp "$FP8/metrics.jsonl" "$OUT/metrics_fp8.jsonl" 2>/dev/null
  grep -h "^fp8" "$W/fp8.log" || echo "fp8: no backend line in the log"
fi

# ---- one-layer microbenchmarks: grouped GEMM bf16 vs FP8; SDPA at the shipped head dims ----
want gemm && run_stage gemm "$PY" benchmarks/gpu/gpu_gemm.py --config "$CONFIG"
want sdpa && run_stage sdpa "$PY" benchmarks/gpu/gpu_sdpa.py

# ---- a small checkpoint: saved at SPLIT, resumed to MAX (one schedule: max_steps=MAX both times), exported ----
if want save; then
  # shellcheck disable=SC2086
  run_stage save train save "$CKPT_CONFIG" "$CKPT" 29513 train.max_steps=$MAX train.stop_at=$SPLIT \
    train.save_every=$SPLIT train.eval_every=$SPLIT $CKPT_OVR
  cp "$CKPT/metrics.jsonl" "$W/metrics_ckpt_first.jsonl" 2>/dev/null
  cp "$CKPT/run.json" "$W/run_ckpt_first.json" 2>/dev/null
  du -sh "$CKPT/checkpoints" 2>/dev/null
fi
# shellcheck disable=SC2086
want resume && run_stage resume train resume "$CKPT_CONFIG" "$CKPT" 29514 train.max_steps=$MAX train.save_every=$SPLIT \
  train.eval_every=$SPLIT train.resume=auto $CKPT_OVR
want export && run_stage export export_and_load

# ---- figures ----
ls -R "$TORCH_EXTENSIONS_DIR" 2>/dev/null | head -20
df -h "$RUNROOT" | tail -1
"$PY" benchmarks/gpu/gpu_figures.py --work "$W" --json "$OUT/gpu_figures.json" --bf16 "$BF16" --fp8 "$FP8" \
  --ckpt "$CKPT" --split $SPLIT --warmup $([[ $CPU == 1 ]] && echo 1 || echo 5) --budget "$BUDGET"
echo "total $(( $(date +%s) - T0 ))s"
exec > /dev/null 2>&1
wait "$TEE_PID" 2>/dev/null
exit 0
