#!/usr/bin/env bash
# The shortest call that validates the 2026-12-07 changes when device time is nearly gone:
# their GPU tests, decode attention's bits against a carried baseline, SmolLM2's serving
# benchmark (4 jobs per client), then tcmm WN=1 vs WN=2 and attention split runs.
#   bench/device_min.sh COMMIT
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist \
  tests/gpu/test_cuda_backend.py tests/gpu/test_cuda_kernels.py tests/gpu/test_cuda_tcmm.py \
  -k "captured_ahead or launched_ahead or attention or eight_warp or batch_invariant" 2>&1 | tail -4
[ -f .baseline/check_bits.py ] && timeout 40 python3 .baseline/check_bits.py 2>&1 | tail -5
timeout 100 python3 bench/serve.py --backend cuda --shape smollm2-135m --quant Q4_1 \
  --clients 1,16,64,128 --jobs-per-client 4 --redis-server .whl/bin/redis-server \
  --json "$OUT/serve-smollm2-135m.json" 2>&1 | grep -v '^{' | tail -7
for wn in 1 2; do
  ORCD_TC_WARPS_N=$wn timeout 30 python3 -m gpu.cuda.kernel_timing --tcmm-only Q4_0 64,256 \
    "$OUT/tcmm-wn$wn.json" 2>&1 | grep tcmm | sed "s/  matvec.*//; s/^/wn=$wn /"
done
timeout 40 python3 -m gpu.cuda.kernel_timing --attention-runs 1 "$OUT/attn-runs.json" 2>&1 | tail -22
