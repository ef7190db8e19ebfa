#!/usr/bin/env bash
# The serving rows with the engine in a process of its own (issue 15): bench/serve.py with
# `--engine-process` (the default on CUDA since session 13), beside the in-process worker
# (`--no-engine-process`) in the same call, after the engine process's GPU test. A model takes
# 4-6 minutes on a fresh machine (the 8B call ran 367 s in session 13, 116 of them the GPU test
# compiling the kernels): one call per model keeps a call under the 10-minute limit. Needs .whl
# (redis-server in .whl/bin) carried.
#   bench/device_engine_process.sh COMMIT 8b|smol
set -u
case "${2:-}" in
  8b) shape=llama3-8b quant=Q4_0 jobs=6 ;;
  smol) shape=smollm2-135m quant=Q4_1 jobs=8 ;;
  *) echo "usage: bench/device_engine_process.sh COMMIT 8b|smol" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1 PATH="$PWD/.whl/bin:$PATH" ORCD_COMMIT=$1
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist \
  tests/gpu/test_engine_process_cuda.py 2>&1 | tail -3
# The default (the engine process) at every client count of the README's table; the in-process
# engine beside it at the two that decide the overhead line.
for mode in --engine-process --no-engine-process; do
  clients=64,128; [ "$mode" = --engine-process ] && clients=1,16,64,128
  echo "== $shape $quant $mode"
  timeout 280 python3 bench/serve.py --backend cuda --shape "$shape" --quant "$quant" \
    --clients "$clients" --jobs-per-client "$jobs" --redis-server .whl/bin/redis-server \
    --worker-arg=$mode --json "$OUT/serve-$shape$mode.json" 2>&1 \
    | grep -v '^{\|^engine C=\|^wrote' | tail -5
done
