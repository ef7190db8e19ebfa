#!/usr/bin/env bash
# The smallest device call that still says whether the tensor-core path is right and fast, for a
# session whose device time is short: the tcmm tests, the per-kernel table, one decode sweep,
# then the rest of the GPU tests (synthetic models: the real file needs two calls).
#   bench/device_one.sh COMMIT [MODELS]
set -u
commit=$1; models=${2:-"llama3-8b:Q4_0@1,64,256"}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 80 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu/test_cuda_tcmm.py \
  2>&1 | tee "$OUT/tcmm-tests.log" | tail -12
timeout 80 python3 -m gpu.cuda.kernel_timing --tcmm "${QUANTS:-Q4_0,F16}" 1,8,64,256 "$OUT/tcmm.json" 2>&1 | tail -30
# shellcheck disable=SC2086
timeout 120 python3 bench/decode.py --commit "$commit" --out "$OUT" --pp 512 $models 2>&1 \
  | grep -v '^{' | tail -12
timeout 110 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu -k "not tcmm" \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -12
