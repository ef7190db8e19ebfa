// Stage one decode step's inputs into the CUDA graphs' static buffers, in one launch.
//
// The captured decode graphs read fixed addresses: rows = int64 [4, cap] (token ids, positions,
// KV slots, context lengths) and tables = int32 [cap, table_width]. This copies a packed batch's
// n rows in and fills the padding rows of the bucket (slot -1: no KV write; one token of context
// in block 0). One cuLaunchKernel of host time, where five torch copies and fills would each cost
// far more on the lent machine's host (bench/host_step.py; bench/NOTES.md, "Kernel notes").
// One CTA per bucket row; table columns past the batch's width keep their old values (attention
// reads a sequence's table only up to its context).
#include "common.cuh"

extern "C" __global__ void stage_decode_inputs(i64* rows, int cap, int* tables, int table_width,
                                               const i64* token_ids, const i64* positions,
                                               const i64* slots, const i64* context_lens,
                                               const int* src_tables, int src_width, int n) {
    const int r = blockIdx.x;
    const bool live = r < n;
    if (threadIdx.x == 0) {
        rows[r] = live ? token_ids[r] : 0;
        rows[cap + r] = live ? positions[r] : 0;
        rows[2 * cap + r] = live ? slots[r] : -1;
        rows[3 * cap + r] = live ? context_lens[r] : 1;
    }
    int* dst = tables + (i64)r * table_width;
    if (!live) {
        if (threadIdx.x == 0) dst[0] = 0;
        return;
    }
    const int* src = src_tables + (i64)r * src_width;
    for (int c = threadIdx.x; c < src_width; c += blockDim.x) dst[c] = src[c];
}
