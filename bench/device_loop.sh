#!/usr/bin/env bash
# Where a GPU worker's loop goes under load (issue 15): bench/worker_loop.py over the real CUDA
# engine on a synthetic model, worker against engine alone, unprofiled (median of REPEATS) and
# then cProfiled, for SmolLM2 Q4_1 at 64 and 128 clients, with the tensor-core prefill limit at
# each of LIMITS (default "64 512": ORCD_TC_PREFILL_MAX_TOKENS); then SmolLM2's pp512 and decode
# at 64 under each. Needs .whl/bin/redis-server carried.
#   bench/device_loop.sh COMMIT
set -u
export PYTHONUNBUFFERED=1 PATH="$PWD/.whl/bin:$PATH"
nvidia-smi --query-gpu=name --format=csv,noheader
for limit in ${LIMITS:-64 512}; do
export ORCD_TC_PREFILL_MAX_TOKENS=$limit
echo "== tensor-core prefill up to $limit tokens"
timeout 60 python3 bench/decode.py --commit "$1" --out "$OUT" smollm2-135m:Q4_1@64 2>&1 \
  | grep -v '^{' | tail -3
for profile in "" ${PROFILE---profile}; do
  timeout "${LOOP_S:-150}" python3 -m bench.worker_loop --backend cuda --shape smollm2-135m \
    --quant Q4_1 --clients "${CLIENTS:-64,128}" --repeats "${REPEATS:-2}" $profile 2>&1 \
    | python3 -m bench.json_rows clients engine_tok_s worker_tok_s overhead_pct engine_us_per_step \
      worker_us_per_step overhead_us_per_step_runs profile_us_per_step
done
done
find bench/results -name "worker_loop-*" -newer bench/device_loop.sh -exec cp {} "$OUT/" \;
