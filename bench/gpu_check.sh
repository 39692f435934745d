#!/usr/bin/env bash
# The GPU check in one command: one markdown table (printed, and saved as $OUT/table.md) of the full-size
# Z-Image on one CUDA GPU, in under 8 minutes on an H100/H200. Random weights: only time and memory mean anything.
#
#   bash bench/gpu_check.sh              # on a CUDA machine (without CUDA: "no CUDA: skipped", exit 0)
#   bash bench/gpu_check.sh --dry-run    # every stage's code on the CPU: tiny model, fp32, 64x64 (the test suite's)
#   PY=.venv/bin/python OUT=/tmp/out bash bench/gpu_check.sh
#   bash bench/gpu_wheels.sh             # here, first, for a GPU machine without PyPI: the wheels it lacks, in .whl/
#
# Rows (README "The GPU check" says what each measures):
#   a. the 6B transformer in bf16, one step at 1024x1024 with a 512-token caption and the CFG batch of 2: ours
#      (models/z_image) and diffusers' ZImageTransformer2DModel on the very same tensors, s/step, ours/diffusers,
#      and each as a fraction of the floor: 2 x 62.5 TFLOP at the card's measured bf16 matmul rate
#      (bench/gpu_check_speed.py transformer);
#   b. random full-size int8 files, then one 1024x1024 generation (3 steps) through wgp.load_model per mmgp
#      profile: 4 and 5 under an 8 GiB VRAM cap (peak VRAM of profile 4: the 8 GB promise), 1 without a cap
#      (bench/gpu_check.py build / run);
#   c. a random rank-32 LoRA on every attention/FFN Linear through host/lora: s/step with and without;
#   d. torch.compile of the transformer blocks (bf16, the compile setting's transform): compile seconds apart
#      from the steady s/step; then, if time is left, --compile through the product (profile 4, int8, 8 GiB
#      cap, where mmgp compiles): two generations, the first compiling;
#   e. one row per attention backend of the host setting (sdpa, flash, sage, sage2): s/step, or "not installed";
#   f. the Flux VAE decoding 1024x1024 in bf16, diffusers' Decoder.forward vs the host's lean walk: peak VRAM
#      over the weights, s/decode, how far the pixels move;
#   then `pytest -m gpu` if time is left (the optional stages: no time for them is not a failure).
# Each stage is a process with its own time limit (LIMIT_<stage>=seconds overrides one), and no stage starts
# or runs past the overall budget (BUDGET_S, default 450 s), so one hang costs its own limit, never the rest.
# ONLY="transformer lora" runs just those stages (packages transformer build profile4 profile5 profile1 lora
# attention vae compile profile4_compile pytest); the others are listed as not selected.
# $OUT (default /tmp/gpu_check_out) gets table.md, results.jsonl (every figure), stages.jsonl (exit status and
# seconds of each stage), machine.txt and logs/<stage>.log; the random weights go to $WORK (/tmp/wgp_gpu_check).
# Exit status: 0 when every selected stage ran and succeeded, 1 otherwise (failed, timed out, no time left),
# 2 for bad usage or no torch at all.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown option '$arg' (known: --dry-run, --help)" >&2; exit 2 ;;
  esac
done
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${WORK:-/tmp/wgp_gpu_check}
CAP_GB=${CAP_GB:-8}
BUDGET_S=${BUDGET_S:-450}
ONLY=${ONLY:-}
OPTIONAL=" profile4_compile pytest " # run when time is left: no time for them is not a failure
RESERVE_S=10 # kept for the table at the end
MIN_S=20     # a stage with less time than this left is skipped, not started

# Wheels carried to a machine that cannot reach PyPI (bench/gpu_wheels.sh fills .whl/): installed apart, first on
# the path, before anything imports.
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${WHEEL_SITE:-/tmp/gpu_check_site}
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl; then
    echo "gpu_check.sh: installing the carried wheels (.whl/*.whl) failed; rebuild them with bench/gpu_wheels.sh" >&2
    exit 2
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
cuda=$("$PY" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")' 2>/dev/null) || cuda=missing
if [ "$cuda" = missing ]; then
  echo "torch cannot be imported with '$PY': pip install -r requirements.txt, or set PY=/path/to/python" >&2
  exit 2
fi
if [ "$cuda" != yes ] && [ "$DRY" = 0 ]; then
  echo "no CUDA: skipped (bash bench/gpu_check.sh --dry-run runs every stage on the CPU)"
  exit 0
fi

mkdir -p "$OUT/logs" "$WORK"
rm -f "$OUT/results.jsonl" "$OUT/stages.jsonl" "$OUT/table.md" "$OUT"/logs/*.log
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="$OUT/results.jsonl"
START=$SECONDS
FAILED=0

record() { printf '%s\n' "$1" >>"$OUT/stages.jsonl"; }

# stage NAME LIMIT_S COMMAND...: run COMMAND (output to logs/NAME.log) within its limit and the budget left.
stage() {
  local name=$1 limit=$2 var="LIMIT_$1"
  shift 2
  limit=${!var:-$limit}
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then
    skip "$name" "not selected (ONLY=$ONLY)"
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
  if [ "$left" -lt "$MIN_S" ]; then
    skip "$name" "no time left in the ${BUDGET_S} s budget"
    echo "[gpu_check] $name: skipped, no time left" >&2
    [[ "$OPTIONAL" == *" $name "* ]] || FAILED=1
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS rc
  timeout -k 10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
  rc=$?
  record "{\"stage\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit}"
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" >&2
  [ "$rc" = 0 ] || FAILED=1
}

skip() { record "{\"stage\": \"$1\", \"skipped\": \"$2\"}"; }

"$PY" - >"$OUT/machine.txt" 2>&1 <<'EOF'
import subprocess, time, torch
gpu = "CPU only"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm{p.major}{p.minor})"
try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
except OSError:
    commit = ""
print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {gpu}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, commit {commit or 'unknown'}")
EOF

stage packages 30 "$PY" bench/gpu_check_report.py packages
if [ "$DRY" = 1 ]; then
  # Tiny tensors: one thread each (a thread pool waiting on a busy machine made each tiny matmul take ~20 ms).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  SPEED=(--dry-run --workdir "$WORK/dry")
  stage transformer 120 "$PY" bench/gpu_check_speed.py transformer --results "$RESULTS" "${SPEED[@]}"
  stage build 120 "$PY" bench/gpu_check.py build --workdir "$WORK/dry" --tiny --build-device cpu --results "$RESULTS"
  stage profile4 120 "$PY" bench/gpu_check.py run --workdir "$WORK/dry" --tiny --device cpu --profile 4 --cap-gb 0 \
    --size 64 --steps 2 --results "$RESULTS"
  skip profile5 "dry run: the same code as profile 4"
  skip profile1 "dry run: the same code as profile 4"
else
  SPEED=(--workdir "$WORK")
  stage transformer 150 "$PY" bench/gpu_check_speed.py transformer --results "$RESULTS" "${SPEED[@]}"
  stage build 240 "$PY" bench/gpu_check.py build --workdir "$WORK" --build-device cuda --results "$RESULTS"
  for profile in 4 5 1; do
    cap=$CAP_GB
    [ "$profile" = 1 ] && cap=0 # profile 1 keeps every model in VRAM: its s/step, not the 8 GB promise
    stage "profile$profile" 150 "$PY" bench/gpu_check.py run --workdir "$WORK" --profile "$profile" --cap-gb "$cap" \
      --size 1024 --steps 3 --results "$RESULTS"
  done
fi
stage lora 150 "$PY" bench/gpu_check_speed.py lora --results "$RESULTS" "${SPEED[@]}"
stage attention 120 "$PY" bench/gpu_check_speed.py attention --results "$RESULTS" "${SPEED[@]}"
stage vae 60 "$PY" bench/gpu_check_speed.py vae --results "$RESULTS" "${SPEED[@]}"
stage compile 240 "$PY" bench/gpu_check_speed.py compile --results "$RESULTS" "${SPEED[@]}"
if [ "$DRY" = 1 ]; then
  stage profile4_compile 120 "$PY" bench/gpu_check.py run --workdir "$WORK/dry" --tiny --device cpu --profile 4 \
    --cap-gb 0 --size 64 --steps 2 --compile --compile-backend aot_eager --results "$RESULTS"
else
  stage profile4_compile 240 "$PY" bench/gpu_check.py run --workdir "$WORK" --profile 4 --cap-gb "$CAP_GB" \
    --size 1024 --steps 3 --compile --results "$RESULTS"
fi
if [ "$DRY" = 1 ]; then
  skip pytest "dry run"
else
  stage pytest 180 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/
fi

"$PY" bench/gpu_check_report.py table --out "$OUT" || FAILED=1
echo "[gpu_check] total $((SECONDS - START)) s; table in $OUT/table.md" >&2
exit "$FAILED"
