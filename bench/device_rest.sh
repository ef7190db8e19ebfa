#!/usr/bin/env bash
# The second device call of a session (after bench/device_tc.sh, whose call left the first
# half of the SmolLM2 file in /tmp/p1): the whole GPU test suite on the real model, then the
# structured-output (SKIP_STRUCTURED=1: not) and serving-under-load benchmarks (JOBS jobs per client, default 12: the
# 4 of serve.py's default made 0.2-14 s runs whose overhead moved by 5-10 points from run to
# run, H100 2026-12-07). Each part has its own time limit.
#   bench/device_rest.sh COMMIT [SECOND_HALF]
set -u
commit=$1; second=${2:-.model/p2}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -f /tmp/p1 ] && [ -f "$second" ]; then
  mkdir -p /tmp/m && cat /tmp/p1 "$second" > /tmp/m/smollm2-135m.gguf
  export ORCD_MODELS_DIR=/tmp/m
  sha256sum /tmp/m/smollm2-135m.gguf
else
  echo "no first half in /tmp/p1: the real-model tests skip"
fi
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu \
  -k "not tcmm" 2>&1 | tail -25
[ -z "${SKIP_STRUCTURED:-}" ] && timeout 100 python3 bench/structured.py --commit "$commit" --out "$OUT" \
  smollm2-135m:Q4_1@1,64 llama3-8b:Q4_0@1,64 2>&1 | grep -v '^{' | tail -12
timeout 220 python3 bench/serve.py --backend cuda --shape llama3-8b --quant Q4_0 \
  --clients 1,16,64,128 --jobs-per-client "${JOBS:-12}" --redis-server .whl/bin/redis-server \
  --json "$OUT/serve-llama3-8b.json" \
  2>&1 | grep -v '^{' | tail -15
timeout 150 python3 bench/serve.py --backend cuda --shape smollm2-135m --quant Q4_1 \
  --clients 1,16,64,128 --jobs-per-client "${JOBS:-12}" --redis-server .whl/bin/redis-server \
  --json "$OUT/serve-smollm2.json" \
  2>&1 | grep -v '^{' | tail -15
