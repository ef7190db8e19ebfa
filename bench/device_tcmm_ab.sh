#!/usr/bin/env bash
# A change to tcmm.cu against the source it replaces, on one machine (sessions 13+). The old
# source comes from .baseline/tcmm.cu (carry it: `git show BASE:gpu/kernels/tcmm.cu >
# .baseline/tcmm.cu`). Two calls' worth, picked by the first argument:
#   bench/device_tcmm_ab.sh kernels COMMIT   the tcmm GPU tests on the new source, then
#       `kernel_timing --tcmm-only` for each of $VARIANTS (SIDE:DEFINES, SIDE old or new)
#   bench/device_tcmm_ab.sh decode COMMIT    bench/decode.py on $SPEC for each of $VARIANTS
# Each variant is a fresh process with ORCD_KERNEL_DEFINES=DEFINES (kernel_timing's JSON records
# them); the first variant is repeated last, so the table shows the run-to-run noise.
set -u
what=$1 commit=$2
quants=${QUANTS:-Q4_0,F16} batches=${BATCHES:-1,8,64,256}
spec=${SPEC:-llama3-8b:Q4_0@1,32,64,256}
variants=${VARIANTS:-"old: new:"}
export PYTHONUNBUFFERED=1 ORCD_COMMIT=$commit
nvidia-smi --query-gpu=name --format=csv,noheader
cp gpu/kernels/tcmm.cu /tmp/tcmm.new.cu
cp .baseline/tcmm.cu /tmp/tcmm.old.cu || exit 1
if [ "$what" = kernels ]; then
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist \
    tests/gpu/test_cuda_tcmm.py -x 2>&1 | tail -4
else
  # shellcheck disable=SC2086
  python3 bench/decode.py --write-only --models-dir /tmp/orcd-bench $spec || exit 1
  sync
fi
n=0
first=${variants%% *}
for variant in $variants $first; do
  n=$((n + 1)) side=${variant%%:*} defines=${variant#*:}
  cp "/tmp/tcmm.$side.cu" gpu/kernels/tcmm.cu
  echo "== v$n $side ${defines:-(source defaults)}"
  if [ "$what" = kernels ]; then
    ORCD_KERNEL_DEFINES="$defines" timeout 100 python3 -m gpu.cuda.kernel_timing --tcmm-only \
      "$quants" "$batches" "$OUT/tcmm-v$n-$side.json" 2>&1 | grep tcmm | sed 's/  matvec.*//'
  else
    # shellcheck disable=SC2086
    ORCD_KERNEL_DEFINES="$defines" timeout 150 python3 bench/decode.py --commit "$commit" \
      --models-dir /tmp/orcd-bench --out "$OUT/decode-v$n-$side" --pp 512 $spec 2>&1 \
      | grep -v '^{' | tail -6
  fi
done
cp /tmp/tcmm.new.cu gpu/kernels/tcmm.cu
