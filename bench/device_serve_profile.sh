#!/usr/bin/env bash
# Where the worker's time goes at 16-128 clients (issue 15): bench/serve.py with the engine
# process, once plain (the numbers, with each process's CPU use), then once per extra worker
# argument in $AB (space-separated, e.g. AB="--no-split-cpus"; no engine phase: compare
# with the first run's), then under py-spy if SPY=1 (the profiles land in
# $OUT/spy-<shape>/worker-C<clients>.txt; read them with bench/spy_summary.py). Needs .whl
# (redis-server in .whl/bin, the py-spy wheel) installed with --target /tmp/site first, as
# bench/NOTES.md's device prefix does.
#   [AB=...] [SPY=1] bench/device_serve_profile.sh COMMIT 8b|smol [CLIENTS] [JOBS_PER_CLIENT]
set -u
case "${2:-}" in
  8b) shape=llama3-8b quant=Q4_0 jobs=6 ;;
  smol) shape=smollm2-135m quant=Q4_1 jobs=8 ;;
  *) echo "usage: bench/device_serve_profile.sh COMMIT 8b|smol [CLIENTS] [JOBS]" >&2; exit 2 ;;
esac
clients=${3:-16,64,128}
jobs=${4:-$jobs}
export PYTHONUNBUFFERED=1 PATH="$PWD/.whl/bin:/tmp/site/bin:$PATH" ORCD_COMMIT=$1
nvidia-smi --query-gpu=name --format=csv,noheader
serve() {  # serve NAME [serve.py arguments...]
  local name=$1; shift
  echo "== $shape $quant $name"
  timeout "${SERVE_TIMEOUT:-250}" python3 bench/serve.py --backend cuda --shape "$shape" --quant "$quant" \
    --clients "$clients" --jobs-per-client "$jobs" --redis-server .whl/bin/redis-server \
    --json "$OUT/serve-$shape-$name.json" "$@" 2>&1 | grep -v '^{\|^engine C=\|^wrote' | tail -5
}
serve default
for arg in ${AB:-}; do
  serve "${arg#--}" --no-engine "--worker-arg=$arg"
done
if [ "${SPY:-0}" = 1 ]; then
  serve py-spy --no-engine --py-spy "$OUT/spy-$shape"
fi
