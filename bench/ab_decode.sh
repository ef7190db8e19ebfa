#!/usr/bin/env bash
# A/B of kernel tunables end to end, in one device call (bench/NOTES.md "How to measure").
#
#   bench/ab_decode.sh OUT COMMIT SPEC [VARIANT ...]
#   bench/ab_decode.sh $OUT abc1234 llama3-8b:F16@1 "" \
#       "matvec.cu:MATVEC_PREFETCH_BYTES=8192" "matvec.cu:MATVEC_PREFETCH_BYTES=32768" ""
#
# Writes SPEC's synthetic models once (an 8B F16 file takes ~3 minutes; a call pays it once,
# not per variant), flushes them to disk (the write-back of a 16 GB file slowed the host loop
# it overlapped), then runs bench/decode.py once per VARIANT, each a fresh process (the kernel
# module is compiled once per process) with ORCD_KERNEL_DEFINES=VARIANT ("" = the source's
# values; repeat one to see the run-to-run noise). Each variant's JSON goes to OUT/vN/ and
# records its defines; a failing variant is reported and the others still run.
set -uo pipefail
if [ $# -lt 3 ]; then
  sed -n '4,6p' "$0" >&2
  exit 2
fi
out=$1 commit=$2 spec=$3
shift 3
[ $# -gt 0 ] || set -- ""
models_dir=${ORCD_BENCH_MODELS:-/tmp/orcd-bench}
# shellcheck disable=SC2086
python bench/decode.py --write-only --models-dir "$models_dir" $spec || exit 1
sync
status=0 n=0
for defines in "$@"; do
  n=$((n + 1))
  echo "== v$n ORCD_KERNEL_DEFINES=\"$defines\""
  if ! ORCD_KERNEL_DEFINES="$defines" python bench/decode.py --commit "$commit" \
      --models-dir "$models_dir" --out "$out/v$n" $spec; then
    echo "== v$n failed" >&2
    status=1
  fi
done
exit $status
