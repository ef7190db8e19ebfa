#!/usr/bin/env bash
# One device call's worth of tensor-core checks and timings (session 7): the tcmm kernel tests,
# the per-kernel table (tcmm against the matvec, attention against its floor), then decode
# through the engine. Every part has its own time limit and writes under $OUT.
#   bench/device_tc.sh COMMIT "llama3-8b:Q4_0@1,8,64,256 ..." [QUANTS] [BATCHES]
set -u
commit=$1; models=$2; quants=${3:-Q4_0,F16}; batches=${4:-1,8,64,256}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu/test_cuda_tcmm.py \
  -x 2>&1 | tail -15
timeout 90 python3 -m gpu.cuda.kernel_timing --tcmm "$quants" "$batches" "$OUT/tcmm.json" 2>&1 | tail -40
# shellcheck disable=SC2086
timeout 260 python3 bench/decode.py --commit "$commit" --out "$OUT" --pp 512,4096 $models 2>&1 \
  | grep -v '^{' | tail -20
