#!/usr/bin/env bash
# The worker's publisher thread against the loop's own (issue 15), SmolLM2 Q4_1 on the CUDA
# backend: bench/worker_loop.py at 64 and 128 clients in both modes (median of 2), then
# bench/serve.py's closed loops (JOBS jobs per client, default 12) with the thread, then at 64
# and 128 without it. Needs .whl (redis-server in .whl/bin) carried.
#   bench/device_publish.sh COMMIT
set -u
export PYTHONUNBUFFERED=1 PATH="$PWD/.whl/bin:$PATH"
nvidia-smi --query-gpu=name --format=csv,noheader
for mode in "" --no-publish-thread; do
  echo "== worker_loop ${mode:-(publisher thread)}"
  timeout 150 python3 -m bench.worker_loop --backend cuda --shape smollm2-135m --quant Q4_1 \
    --clients 64,128 --repeats 2 $mode 2>&1 \
    | python3 -m bench.json_rows clients engine_tok_s worker_tok_s overhead_pct engine_us_per_step \
      worker_us_per_step overhead_us_per_step_runs
done
timeout 200 python3 bench/serve.py --backend cuda --shape smollm2-135m --quant Q4_1 \
  --clients 1,16,64,128 --jobs-per-client "${JOBS:-12}" --redis-server .whl/bin/redis-server \
  --json "$OUT/serve-smollm2.json" 2>&1 | grep -v '^{' | tail -12
timeout 150 python3 bench/serve.py --backend cuda --shape smollm2-135m --quant Q4_1 \
  --clients 64,128 --jobs-per-client "${JOBS:-12}" --redis-server .whl/bin/redis-server \
  --worker-arg=--no-publish-thread --json "$OUT/serve-smollm2-nothread.json" 2>&1 \
  | grep -v '^{' | tail -8
