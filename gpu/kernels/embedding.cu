// Rows of a quantised matrix, dequantised to float32: the token-embedding lookup
// (out[t] = table[token_ids[t]]) and, with row_ids null, a plain dequantise of rows
// first_row .. first_row + gridDim.x - 1 (scratch for the prefill GEMM path).
// One CTA per output row; each thread decodes 32-element groups exactly as loader/quants.py.
#include "quant_blocks.cuh"
#include "grid_dependency.cuh"

template <int T>
__device__ __forceinline__ void dequant_rows_impl(float* out, int out_stride, const u8* table,
                                                  i64 row_bytes, const i64* row_ids,
                                                  i64 first_row, int n_cols) {
    grid_dependency_sync();
    const i64 row = row_ids ? row_ids[blockIdx.x] : first_row + blockIdx.x;
    const u8* src = table + row * row_bytes;
    float* dst = out + (i64)blockIdx.x * out_stride;
    for (int g = threadIdx.x; g < n_cols / 32; g += blockDim.x) {
        float v[32];
        dequant_group<T>(src, g, v);
#pragma unroll
        for (int i = 0; i < 32; i += 4) *(float4*)(dst + 32 * g + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    }
}

#define DEQUANT_ROWS(NAME, T)                                                                     \
    extern "C" __global__ void dequant_rows_##NAME(float* out, int out_stride, const u8* table,  \
                                                   i64 row_bytes, const i64* row_ids,             \
                                                   i64 first_row, int n_cols) {                   \
        dequant_rows_impl<T>(out, out_stride, table, row_bytes, row_ids, first_row, n_cols);      \
    }

DEQUANT_ROWS(f32, GGML_F32)
DEQUANT_ROWS(f16, GGML_F16)
DEQUANT_ROWS(bf16, GGML_BF16)
DEQUANT_ROWS(q4_0, GGML_Q4_0)
DEQUANT_ROWS(q4_1, GGML_Q4_1)
DEQUANT_ROWS(q5_0, GGML_Q5_0)
DEQUANT_ROWS(q5_1, GGML_Q5_1)
DEQUANT_ROWS(q8_0, GGML_Q8_0)
DEQUANT_ROWS(q4_k, GGML_Q4_K)
DEQUANT_ROWS(q5_k, GGML_Q5_K)
DEQUANT_ROWS(q6_k, GGML_Q6_K)
