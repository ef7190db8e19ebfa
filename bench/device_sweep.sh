#!/usr/bin/env bash
# One device call: the tcmm tests at the source's defaults, then a sweep of the tensor-core
# matmul's tunables (TC_UNROLL, 32-blocks decoded together since b8e250d, x
# ORCD_TC_CTAS_PER_SM) on the 8B shapes, then decode with
# the defaults against the matvec, and one Nsight Compute look at the slowest kernel.
#   bench/device_sweep.sh COMMIT
set -u
commit=$1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 70 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu/test_cuda_tcmm.py \
  tests/gpu/test_token_mask.py tests/gpu/test_cuda_sampler.py 2>&1 | tail -6
for unroll in ${UNROLLS:-1 2 4}; do
  for ctas in ${CTAS:-2 4 8}; do
    echo "== TC_UNROLL=$unroll CTAS_PER_SM=$ctas"
    ORCD_KERNEL_DEFINES="tcmm.cu:TC_UNROLL=$unroll" ORCD_TC_CTAS_PER_SM=$ctas timeout 40 \
      python3 -m gpu.cuda.kernel_timing --tcmm-only Q4_0 1,64 "$OUT/sweep-u$unroll-c$ctas.json" 2>&1 \
      | grep tcmm | sed 's/  matvec.*//'
  done
done
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then  # why tcmm stalls: gate.up at 64 sequences
  timeout 90 ncu --target-processes all -k regex:tcmm_q4_0 -c 2 --section WarpStateStats \
    --section SchedulerStats --section Occupancy --section SpeedOfLight \
    python3 -m gpu.cuda.kernel_timing --tcmm-only Q4_0 64 /tmp/ncu.json > "$OUT/ncu.txt" 2>&1
  grep -E "tcmm_|Duration|Throughput|Issued|Eligible|Active Warps|Stall|Achieved|Theoretical Occ|Registers|Block Limit" "$OUT/ncu.txt" | head -60
fi
(cd "$OUT" && python3 -c "import json,glob; print(json.dumps([r for f in sorted(glob.glob('sweep-*.json')) for r in json.load(open(f))['rows']]))" > sweep.json && rm sweep-*.json)
timeout 100 python3 bench/decode.py --commit "$commit" --out "$OUT" --pp 512 \
  llama3-8b:Q4_0@1,8,64,256 2>&1 | grep -v '^{' | tail -6
timeout 45 python3 bench/decode.py --commit "$commit" --out "$OUT" --pp 512 --matmul matvec \
  llama3-8b:Q4_0@1 2>&1 | grep -v '^{' | tail -4
