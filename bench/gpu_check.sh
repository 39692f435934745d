#!/usr/bin/env bash
# The prepared GPU check (one call of the device tool, about 10 minutes): the CUDA tests, then the full 6B
# model with random weights, int8, under an 8 GiB VRAM cap, with mmgp profiles 4, 5 and 1, 1024x1024,
# one step plus the VAE decode. Results (JSON lines) and logs go to $OUT (default /tmp/gpu_check_out).
#
#   bash bench/gpu_check.sh                 # on a CUDA machine
#   PY=.venv/bin/python bash bench/gpu_check.sh
#
# Every stage has its own time limit, so one that hangs cannot take the others' time. Put the figures
# in the README's "Low VRAM on a GPU" table.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${WORK:-/tmp/wgp_gpu_check}
CAP_GB=${CAP_GB:-8}
mkdir -p "$OUT" "$WORK"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } >"$OUT/machine.txt" 2>&1
missing=$($PY - <<'EOF'
import importlib
names = ["torch", "safetensors", "transformers", "tokenizers", "diffusers", "accelerate", "mmgp", "optimum.quanto", "PIL", "psutil", "pytest"]
print(" ".join(n for n in names if importlib.util.find_spec(n.split(".")[0]) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "missing Python packages on this machine: $missing (carry them as wheels: pip download -r requirements.txt)" | tee "$OUT/missing.txt"
  exit 2
fi

# 1. The CUDA tests (tiny model, bf16, profiles 1/4/5, LoRA hooks on CUDA).
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/ >"$OUT/pytest_gpu.txt" 2>&1
echo "pytest -m gpu: exit $?" | tee -a "$OUT/summary.txt"

# 2. Random full-size weights in the shipped int8 files (RAM only; CPU work).
timeout 420 $PY bench/gpu_check.py build --workdir "$WORK" >"$OUT/build.txt" 2>&1
echo "build: exit $?" | tee -a "$OUT/summary.txt"

# 3. One generation per profile under the cap, each in a fresh process.
for profile in 4 5 1; do
  timeout 240 $PY bench/gpu_check.py run --workdir "$WORK" --profile "$profile" --cap-gb "$CAP_GB" \
    --size 1024 --steps 1 >>"$OUT/runs.jsonl" 2>>"$OUT/runs.log"
  echo "profile $profile: exit $?" | tee -a "$OUT/summary.txt"
done
cat "$OUT/runs.jsonl"
