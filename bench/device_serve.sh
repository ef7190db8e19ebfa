#!/usr/bin/env bash
# The second call after bench/device_session10.sh (whose call left the SmolLM2 file's first half
# in /tmp/p1): the engine and overlap GPU tests on the real model, then bench/serve.py for both
# models (JOBS jobs per client, default 8).
#   bench/device_serve.sh COMMIT [SECOND_HALF]
set -u
commit=$1; second=${2:-.model/p2}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -f /tmp/p1 ] && [ -f "$second" ]; then
  mkdir -p /tmp/m && cat /tmp/p1 "$second" > /tmp/m/smollm2-135m.gguf
  export ORCD_MODELS_DIR=/tmp/m
else
  echo "no first half in /tmp/p1: the real-model tests skip"
fi
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu/test_engine_overlap.py \
  tests/gpu/test_engine.py tests/gpu/test_structured_engine.py -k cuda 2>&1 | tail -6
for model in "llama3-8b Q4_0" "smollm2-135m Q4_1"; do
  set -- $model
  timeout 190 python3 bench/serve.py --backend cuda --shape "$1" --quant "$2" \
    --clients 1,16,64,128 --jobs-per-client "${JOBS:-8}" --redis-server .whl/bin/redis-server \
    --json "$OUT/serve-$1.json" 2>&1 | grep -v '^{' | tail -8
done
