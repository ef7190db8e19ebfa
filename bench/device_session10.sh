#!/usr/bin/env bash
# One device call for the 2026-12-07 changes, most needed first: the new GPU tests (graphs
# captured ahead, steps launched ahead with prefill, decode attention's split runs and its bits
# against a carried baseline, tcmm's 8-warp variant), SmolLM2's serving benchmark (JOBS per
# client, default 6), then A/B timings within the call: attention split runs, tcmm WN=1 vs
# WN=2 per matrix, and 8B Q4_0 decode at 64 and 256 sequences with each.
#   bench/device_session10.sh COMMIT
set -u
commit=$1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 130 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist \
  tests/gpu/test_cuda_backend.py tests/gpu/test_cuda_kernels.py \
  -k "captured_ahead or launched_ahead or attention or batch_invariant" 2>&1 | tail -4
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu/test_cuda_tcmm.py \
  2>&1 | tail -4
[ -f .baseline/check_bits.py ] && timeout 60 python3 .baseline/check_bits.py 2>&1 | tail -6
timeout 120 python3 bench/serve.py --backend cuda --shape smollm2-135m --quant Q4_1 \
  --clients 1,16,64,128 --jobs-per-client "${JOBS:-5}" --redis-server .whl/bin/redis-server \
  --json "$OUT/serve-smollm2-135m.json" 2>&1 | grep -v '^{' | tail -7
timeout 50 python3 -m gpu.cuda.kernel_timing --attention-runs 1,4 "$OUT/attn-runs.json" 2>&1 | tail -33
for wn in 1 2; do
  echo "== ORCD_TC_WARPS_N=$wn"
  ORCD_TC_WARPS_N=$wn timeout 40 python3 -m gpu.cuda.kernel_timing --tcmm-only Q4_0,F16 64,256 \
    "$OUT/tcmm-wn$wn.json" 2>&1 | grep tcmm | sed 's/  matvec.*//'
done
# 8B decode only with the faster of the two (its kernel table above says which), at 64 and 256.
wn=$(python3 -c "
import json
t = {w: sum(r['us'] for r in json.load(open('$OUT/tcmm-wn%d.json' % w))['rows']) for w in (1, 2)}
print(min(t, key=t.get))" 2>/dev/null || echo 1)
echo "== decode ORCD_TC_WARPS_N=$wn"
ORCD_TC_WARPS_N=$wn timeout 100 python3 bench/decode.py --commit "$commit" --out "$OUT" --pp 512 \
  llama3-8b:Q4_0@64,256 2>&1 | grep -v '^{' | tail -4
