// Rows of a quantised matrix, dequantised to float32: the token-embedding lookup
// (out[t] = table[token_ids[t]]) and, with row_ids null, a plain dequantise of rows
// first_row .. first_row + gridDim.x - 1. The `dequant_rows_half_*` kernels write fp16 (rounded
// to nearest even, as torch's .half() rounds the float32 rows): the prefill GEMM's scratch, in
// one pass that writes 2 bytes per element (a float32 scratch and a conversion would move 6).
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

// Layouts the fp16 dequantise reads: the GGUF blocks, or the matvec layout of Q4_0 / Q8_0 rows
// (gpu/cuda/matvec.py pack_rows: every block's quants, then every block's fp16 scale; Q4_0 rows
// of a multiple of 128 columns with lane j's 4-byte slices of 4 blocks together). Reading the
// matvec layout spares the prefill a per-call copy of the matrix back into GGUF blocks.
#define LAYOUT_GGUF 0
#define LAYOUT_PACKED 1
#define LAYOUT_PACKED_X4 2

template <int T, int LAYOUT> struct GroupReader {
    static __device__ __forceinline__ void read(const u8* row, int, int g, float* v) {
        dequant_group<T>(row, g, v);
    }
};
// Values exactly as dequant_group<GGML_Q4_0> computes them from the same bytes.
template <int LAYOUT> struct GroupReader<GGML_Q4_0, LAYOUT> {
    static __device__ __forceinline__ void read(const u8* row, int n_blocks, int g, float* v) {
        if (LAYOUT == LAYOUT_GGUF) {
            dequant_group<GGML_Q4_0>(row, g, v);
            return;
        }
        u32 w[4];
        if (LAYOUT == LAYOUT_PACKED_X4) {
#pragma unroll
            for (int j = 0; j < 4; ++j) w[j] = ld_u32(row + 64 * (g >> 2) + 16 * j + 4 * (g & 3));
        } else {
            const uint4 q = *(const uint4*)(row + 16 * g);
            w[0] = q.x; w[1] = q.y; w[2] = q.z; w[3] = q.w;
        }
        const float d = f16_to_f32(ld_u16(row + 16 * (i64)n_blocks + 2 * g));
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            const u32 q = (w[k >> 2] >> (8 * (k & 3))) & 0xFF;
            v[k] = __fmul_rn(d, (float)(q & 0xF) - 8.0f);
            v[k + 16] = __fmul_rn(d, (float)(q >> 4) - 8.0f);
        }
    }
};
template <int LAYOUT> struct GroupReader<GGML_Q8_0, LAYOUT> {
    static __device__ __forceinline__ void read(const u8* row, int n_blocks, int g, float* v) {
        if (LAYOUT == LAYOUT_GGUF) {
            dequant_group<GGML_Q8_0>(row, g, v);
            return;
        }
        const float d = f16_to_f32(ld_u16(row + 32 * (i64)n_blocks + 2 * g));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const uint4 q = *(const uint4*)(row + 32 * g + 16 * h);
            const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
            for (int k = 0; k < 16; ++k)
                v[16 * h + k] = __fmul_rn((float)(i8)((w[k >> 2] >> (8 * (k & 3))) & 0xFF), d);
        }
    }
};

template <int T, int LAYOUT>
__device__ __forceinline__ void dequant_rows_half_impl(u16* out, int out_stride, const u8* table,
                                                       i64 row_bytes, i64 first_row, int n_cols) {
    grid_dependency_sync();
    const u8* src = table + (first_row + blockIdx.x) * row_bytes;
    u16* dst = out + (i64)blockIdx.x * out_stride;
    for (int g = threadIdx.x; g < n_cols / 32; g += blockDim.x) {
        float v[32];
        GroupReader<T, LAYOUT>::read(src, n_cols / 32, g, v);
#pragma unroll
        for (int i = 0; i < 32; i += 8) {
            uint4 h;
            h.x = (u32)f32_to_f16(v[i]) | ((u32)f32_to_f16(v[i + 1]) << 16);
            h.y = (u32)f32_to_f16(v[i + 2]) | ((u32)f32_to_f16(v[i + 3]) << 16);
            h.z = (u32)f32_to_f16(v[i + 4]) | ((u32)f32_to_f16(v[i + 5]) << 16);
            h.w = (u32)f32_to_f16(v[i + 6]) | ((u32)f32_to_f16(v[i + 7]) << 16);
            *(uint4*)(dst + 32 * g + i) = h;
        }
    }
}

#define DEQUANT_ROWS(NAME, T)                                                                     \
    extern "C" __global__ void dequant_rows_##NAME(float* out, int out_stride, const u8* table,  \
                                                   i64 row_bytes, const i64* row_ids,             \
                                                   i64 first_row, int n_cols) {                   \
        dequant_rows_impl<T>(out, out_stride, table, row_bytes, row_ids, first_row, n_cols);      \
    }                                                                                             \
    extern "C" __global__ void dequant_rows_half_##NAME(u16* out, int out_stride,                \
                                                        const u8* table, i64 row_bytes,           \
                                                        i64 first_row, int n_cols) {              \
        dequant_rows_half_impl<T, LAYOUT_GGUF>(out, out_stride, table, row_bytes, first_row,     \
                                               n_cols);                                           \
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

#define DEQUANT_ROWS_HALF_PACKED(NAME, T, LAYOUT)                                                 \
    extern "C" __global__ void dequant_rows_half_packed_##NAME(u16* out, int out_stride,         \
                                                               const u8* table, i64 row_bytes,    \
                                                               i64 first_row, int n_cols) {       \
        dequant_rows_half_impl<T, LAYOUT>(out, out_stride, table, row_bytes, first_row, n_cols);  \
    }

DEQUANT_ROWS_HALF_PACKED(q4_0, GGML_Q4_0, LAYOUT_PACKED)
DEQUANT_ROWS_HALF_PACKED(q4_0x4, GGML_Q4_0, LAYOUT_PACKED_X4)
DEQUANT_ROWS_HALF_PACKED(q8_0, GGML_Q8_0, LAYOUT_PACKED)
