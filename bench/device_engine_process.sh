#!/usr/bin/env bash
# The serving rows with the engine in a process of its own (issue 15) that session 12 had no
# device time left for: bench/serve.py on 8B Q4_0 and SmolLM2 Q4_1 at 64 and 128 clients with
# `--engine-process`, each beside the default (in-process) worker in the same call, after the
# engine process's GPU test. About 8 minutes; needs .whl (redis-server in .whl/bin) carried.
#   bench/device_engine_process.sh COMMIT
set -u
export PYTHONUNBUFFERED=1 PATH="$PWD/.whl/bin:$PATH" ORCD_COMMIT=$1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist \
  tests/gpu/test_engine_process_cuda.py 2>&1 | tail -3
for shape in "llama3-8b Q4_0 6" "smollm2-135m Q4_1 8"; do
  set -- $shape
  for mode in --engine-process ""; do
    echo "== $1 $2 ${mode:-in-process}"
    timeout 250 python3 bench/serve.py --backend cuda --shape "$1" --quant "$2" \
      --clients 64,128 --jobs-per-client "$3" --redis-server .whl/bin/redis-server \
      ${mode:+--worker-arg=$mode} --json "$OUT/serve-$1${mode:+-engine-process}.json" 2>&1 \
      | grep -v '^{\|^engine C=\|^wrote' | tail -5
  done
done
