#!/usr/bin/env bash
# Decode attention after a kernel change: its GPU tests, a bit-for-bit check against a previous
# kernel when the caller carries one (.baseline/check_bits.py), the launcher's split runs
# against pinned ones at ATTN_MIN_BLOCKS 3 and 2, then the default table.
#   bench/device_attention.sh
set -u
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu/test_cuda_kernels.py \
  -k attention 2>&1 | tail -4
[ -f .baseline/check_bits.py ] && timeout 60 python3 .baseline/check_bits.py 2>&1 | tail -6
timeout 90 python3 -m gpu.cuda.kernel_timing --attention-runs 1,4,16 "$OUT/attn-runs-b3.json" 2>&1 | tail -40
ORCD_KERNEL_DEFINES="attention.cu:ATTN_MIN_BLOCKS=2" timeout 90 python3 -m gpu.cuda.kernel_timing \
  --attention-runs 1,4,16 "$OUT/attn-runs-b2.json" 2>&1 | tail -14
