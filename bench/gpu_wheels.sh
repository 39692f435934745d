#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach PyPI: the packages bench/gpu_check.sh needs that such a machine's
# image lacks, at the versions requirements.txt pins, downloaded here into .whl/ (git-ignored) for Python 3.12 on
# x86-64 Linux. bench/gpu_check.sh installs whatever .whl/ holds (pip --target, no index) before its stages.
#
#   bash bench/gpu_wheels.sh                     # the default list (below)
#   bash bench/gpu_wheels.sh diffusers mmgp      # only these (names as in requirements.txt)
#
# The default list is what this workplace's H100/H200 image did not have when read (2026-11: it has torch,
# transformers, accelerate, peft, safetensors, tokenizers, huggingface-hub, psutil, pillow, pytest; not diffusers,
# mmgp or optimum-quanto). With the device tool: run this here, then `run` with carry [".whl"] and the command
# `bash bench/gpu_check.sh`. ~7 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(diffusers mmgp optimum-quanto importlib-metadata)
specs=()
for name in "${names[@]}"; do
  pin=$(grep -i -E "^${name//-/[-_]}==" requirements.txt | head -1 || true)
  specs+=("${pin:-$name}") # unpinned (not in requirements.txt): the newest
done
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
ls -1 .whl
