#!/usr/bin/env bash
# Where a 64-sequence decode step goes, for the next kernel change: Nsight Compute's full set on
# tcmm's gate/up product (Q4_0 28672x4096, 64 sequences, one launch after a warm-up), the
# torch-profiler kernel table of one 8B Q4_0 and one SmolLM2 Q4_1 step at 64 sequences, and
# SmolLM2 at 64 and 256 (matvec and tensor cores), and its decode at 8-128 sequences in both
# modes (auto's switch for small hidden sizes).
#   bench/device_profile.sh COMMIT
set -u
commit=$1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
cat > /tmp/one_tcmm.py <<'PY'
import torch
from gpu.cuda.tcmm import TcWorkspace, TensorCoreMatmul
from gpu.cuda.matvec import packed_row_bytes
from gguf import GGMLQuantizationType as T
sms = torch.cuda.get_device_properties(0).multi_processor_count
for rows, cols in ((28672, 4096), (4096, 14336)):
    op = TensorCoreMatmul(T.Q4_0, rows, cols, sms)
    w = torch.randint(0, 255, (op.row_bytes * rows,), dtype=torch.uint8, device="cuda")
    ws = TcWorkspace.sized(*op.workspace_needs(64), torch.device("cuda"))
    x = torch.randn(64, cols, device="cuda").half()
    y = torch.empty(64, rows, device="cuda")
    for _ in range(3):
        op(y, x, w, ws)
    torch.cuda.synchronize()
PY
if command -v ncu >/dev/null; then
  timeout 150 ncu --target-processes all -k regex:tcmm_q4_0 -s 2 -c 1 --set full \
    --import-source no python3 /tmp/one_tcmm.py > "$OUT/ncu-tcmm-gateup.txt" 2>&1
  grep -E "tcmm_|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Issued Ipc|Eligible|Active Warps|Registers|Achieved Occ|Theoretical Occ|Block Limit|Stall|L2 Hit|Shared Memory|Bank" \
    "$OUT/ncu-tcmm-gateup.txt" | head -50
fi
timeout 150 python3 bench/profile_step.py --batch 64 llama3-8b:Q4_0 smollm2-135m:Q4_1 2>&1 \
  | tee "$OUT/profile-64.txt" | head -40
timeout 60 python3 bench/profile_step.py --batch 64 --matmul tensor-cores smollm2-135m:Q4_1 2>&1 \
  | tee "$OUT/profile-64-smol-tc.txt" | head -25
timeout 60 python3 bench/profile_step.py --batch 256 smollm2-135m:Q4_1 2>&1 \
  | tee "$OUT/profile-256-smol.txt" | head -25
for mode in auto tensor-cores; do
  timeout 120 python3 bench/decode.py --commit "$commit" --out "$OUT" --matmul $mode \
    smollm2-135m:Q4_1@8,16,32,64,128 2>&1 | grep -v '^{' | tail -8
done
