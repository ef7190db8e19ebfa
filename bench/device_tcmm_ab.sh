#!/usr/bin/env bash
# A kernel change to tcmm.cu against the source it replaces, on one machine in one call: the
# tcmm GPU tests on the new source, then `kernel_timing --tcmm-only` and bench/decode.py on 8B
# Q4_0 for each source in turn (new, old, new again: the repeat shows the noise), and the new
# source's table with one warp along the sequences (ORCD_TC_WARPS_N=1). The old source
# comes from .baseline/tcmm.cu (carry it: `git show BASE:gpu/kernels/tcmm.cu > .baseline/tcmm.cu`).
#   bench/device_tcmm_ab.sh COMMIT [QUANTS] [BATCHES] [DECODE_SPEC]
set -u
commit=$1; quants=${2:-Q4_0,Q4_K,F16}; batches=${3:-64,256}
spec=${4:-llama3-8b:Q4_0@32,64}
export PYTHONUNBUFFERED=1 ORCD_COMMIT=$commit
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:xdist tests/gpu/test_cuda_tcmm.py \
  -x 2>&1 | tail -4
cp gpu/kernels/tcmm.cu /tmp/tcmm.new.cu
python3 - /tmp/orcd-bench "$spec" <<'PY' || exit 1
import sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.decode import synthetic_model
shape, quant = sys.argv[2].partition("@")[0].split(":")
synthetic_model(Path(sys.argv[1]), shape, quant)
PY
for side in new old new; do
  cp "/tmp/tcmm.$side.cu" gpu/kernels/tcmm.cu 2>/dev/null || cp .baseline/tcmm.cu gpu/kernels/tcmm.cu
  echo "== $side"
  timeout 90 python3 -m gpu.cuda.kernel_timing --tcmm-only "$quants" "$batches" \
    "$OUT/tcmm-$side.json" 2>&1 | tail -16
  [ "$side" = new ] && ORCD_TC_WARPS_N=1 timeout 90 python3 -m gpu.cuda.kernel_timing --tcmm-only \
    "$quants" "$batches" "$OUT/tcmm-$side-wn1.json" 2>&1 | sed 's/^/wn1 /' | tail -16
  timeout 120 python3 bench/decode.py --commit "$commit" --models-dir /tmp/orcd-bench \
    --out "$OUT/decode-$side" --pp 512 "$spec" 2>&1 | grep -v '^{' | tail -4
done
cp /tmp/tcmm.new.cu gpu/kernels/tcmm.cu
