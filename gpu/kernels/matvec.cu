// Quantised matrix x vector(s): y[b, n] = sum_k W[n, k] * x[b, k] (+ bias[n]) (+ residual[b, n])
// for up to MAXB sequences per read of the weights. W stays in the GGUF block layout as stored
// (see quant_blocks.cuh); x, y, bias and residual are float32 and the sums are float32.
//
// One warp per output row (MATVEC_WARPS rows per CTA). Each lane walks the row in "units"
// (8 elements for F16/BF16, one 32-element block for the legacy quants, a quarter super-block of
// 64 elements for the K-quants), keeps one partial sum per sequence, and the warp reduces them
// with a fixed xor butterfly. A sequence's result depends only on its own x and the weights,
// in a fixed order, so it is bit-identical whatever the other sequences in the batch are.
//
// Measured (H100, 2026-11-25, batch 1, 14336x4096): F16 reaches the copy bandwidth, but every
// quantised type stalls at ~3.7 elements/clock/SM (Q4_0 490 GB/s, Q4_K 480, Q8_0 850): the
// x loads are the limit. A lane reads its whole unit's x (128 or 256 contiguous bytes), so one
// warp-wide float4 load touches 32 different cache lines: 32 L1 wavefronts instead of 4. The fix
// is llama.cpp's layout of work: several lanes per block, each lane a 4-8 element slice, so a
// warp's x loads are contiguous (and x as int8 with dp4a, or x staged in padded shared memory,
// for batches, where the x bytes per weight byte grow with the batch).
#include "quant_blocks.cuh"

#define MATVEC_WARPS 4

__device__ __forceinline__ float4 ld_x4(const float* p) { return __ldg((const float4*)p); }

// sum_i q[i] * x[i] over N elements (N a multiple of 4, x 16-byte aligned), in a fixed order.
template <int N>
__device__ __forceinline__ float dot_n(const float* q, const float* x) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < N; i += 4) {
        const float4 v = ld_x4(x + i);
        s += q[i] * v.x;
        s += q[i + 1] * v.y;
        s += q[i + 2] * v.z;
        s += q[i + 3] * v.w;
    }
    return s;
}

template <int N>
__device__ __forceinline__ float sum_n(const float* x) {
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < N; i += 4) {
        const float4 v = ld_x4(x + i);
        s += (v.x + v.y) + (v.z + v.w);
    }
    return s;
}

template <int T> struct Unit;

// F16 / BF16: 8 elements per unit, one 16-byte load.
template <bool BF16> struct HalfUnit {
    static constexpr int ELEMS = 8;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const uint4 raw = *(const uint4*)(row + 16 * u);
        const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
        float w[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u16 lo = (u16)(words[i] & 0xFFFF), hi = (u16)(words[i] >> 16);
            w[2 * i] = BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
            w[2 * i + 1] = BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
#pragma unroll
        for (int b = 0; b < MAXB; ++b)
            if (b < nb) acc[b] += dot_n<8>(w, x + b * xs + 8 * u);
    }
};
template <> struct Unit<GGML_F16> : HalfUnit<false> {};
template <> struct Unit<GGML_BF16> : HalfUnit<true> {};

// The 16 quant bytes of a legacy block as nibble values: q[i] low nibble of byte i, q[i + 16] high.
__device__ __forceinline__ void nibbles16(const u8* qs, bool aligned4, float* q, float offset) {
    u8 bytes[16];
    if (aligned4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u32 v = ld_u32(qs + 4 * i);
            bytes[4 * i] = v & 0xFF; bytes[4 * i + 1] = (v >> 8) & 0xFF;
            bytes[4 * i + 2] = (v >> 16) & 0xFF; bytes[4 * i + 3] = v >> 24;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u16 v = ld_u16(qs + 2 * i);
            bytes[2 * i] = v & 0xFF; bytes[2 * i + 1] = v >> 8;
        }
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) {
        q[i] = (float)(bytes[i] & 0xF) - offset;
        q[i + 16] = (float)(bytes[i] >> 4) - offset;
    }
}

template <> struct Unit<GGML_Q4_0> {
    static constexpr int ELEMS = 32;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const u8* blk = row + 18 * u;
        const float d = f16_to_f32(ld_u16(blk));
        float q[32];
        nibbles16(blk + 2, false, q, 8.0f);
#pragma unroll
        for (int b = 0; b < MAXB; ++b)
            if (b < nb) acc[b] += d * dot_n<32>(q, x + b * xs + 32 * u);
    }
};

template <> struct Unit<GGML_Q4_1> {
    static constexpr int ELEMS = 32;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const u8* blk = row + 20 * u;
        const u32 dm = ld_u32(blk);
        const float d = f16_to_f32(dm & 0xFFFF), m = f16_to_f32(dm >> 16);
        float q[32];
        nibbles16(blk + 4, true, q, 0.0f);
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
            if (b < nb) {
                const float* xb = x + b * xs + 32 * u;
                acc[b] += d * dot_n<32>(q, xb) + m * sum_n<32>(xb);
            }
        }
    }
};

// Q5: qh bit i is bit 4 of weight i.
__device__ __forceinline__ void add_high_bits(u32 qh, float* q) {
#pragma unroll
    for (int i = 0; i < 32; ++i) q[i] += (float)(((qh >> i) & 1) << 4);
}

template <> struct Unit<GGML_Q5_0> {
    static constexpr int ELEMS = 32;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const u8* blk = row + 22 * u;
        const float d = f16_to_f32(ld_u16(blk));
        float q[32];
        nibbles16(blk + 6, false, q, 16.0f);
        add_high_bits(ld_u32_a2(blk + 2), q);
#pragma unroll
        for (int b = 0; b < MAXB; ++b)
            if (b < nb) acc[b] += d * dot_n<32>(q, x + b * xs + 32 * u);
    }
};

template <> struct Unit<GGML_Q5_1> {
    static constexpr int ELEMS = 32;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const u8* blk = row + 24 * u;
        const u32 dm = ld_u32(blk);
        const float d = f16_to_f32(dm & 0xFFFF), m = f16_to_f32(dm >> 16);
        float q[32];
        nibbles16(blk + 8, true, q, 0.0f);
        add_high_bits(ld_u32(blk + 4), q);
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
            if (b < nb) {
                const float* xb = x + b * xs + 32 * u;
                acc[b] += d * dot_n<32>(q, xb) + m * sum_n<32>(xb);
            }
        }
    }
};

template <> struct Unit<GGML_Q8_0> {
    static constexpr int ELEMS = 32;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const u8* blk = row + 34 * u;
        const float d = f16_to_f32(ld_u16(blk));
        float q[32];
#pragma unroll
        for (int i = 0; i < 16; ++i) {
            const u16 v = ld_u16(blk + 2 + 2 * i);
            q[2 * i] = (float)(i8)(v & 0xFF);
            q[2 * i + 1] = (float)(i8)(v >> 8);
        }
#pragma unroll
        for (int b = 0; b < MAXB; ++b)
            if (b < nb) acc[b] += d * dot_n<32>(q, x + b * xs + 32 * u);
    }
};

// K-quants: unit u is quarter c = u % 4 of super-block u / 4 (64 elements).
__device__ __forceinline__ void load32(const u8* p, u8* out) {  // 32 bytes, p 16-byte aligned
    const uint4 a = *(const uint4*)p, b = *(const uint4*)(p + 16);
    const u32 w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        out[4 * i] = w[i] & 0xFF; out[4 * i + 1] = (w[i] >> 8) & 0xFF;
        out[4 * i + 2] = (w[i] >> 16) & 0xFF; out[4 * i + 3] = w[i] >> 24;
    }
}

// Q4_K and Q5_K: quarter c holds sub-blocks 2c (low nibbles of qs chunk c) and 2c + 1 (high).
template <bool Q5> struct K4Unit {
    static constexpr int ELEMS = 64;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const int c = u & 3;
        const u8* blk = row + (Q5 ? 176 : 144) * (u >> 2);
        const u32 dm = ld_u32(blk);
        const float d = f16_to_f32(dm & 0xFFFF), dmin = f16_to_f32(dm >> 16);
        u8 scales[12];
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            const u32 v = ld_u32(blk + 4 + 4 * i);
            scales[4 * i] = v & 0xFF; scales[4 * i + 1] = (v >> 8) & 0xFF;
            scales[4 * i + 2] = (v >> 16) & 0xFF; scales[4 * i + 3] = v >> 24;
        }
        int sc0, mn0, sc1, mn1;
        k4_scale_min(scales, 2 * c, &sc0, &mn0);
        k4_scale_min(scales, 2 * c + 1, &sc1, &mn1);
        u8 qs[32];
        load32(blk + (Q5 ? 48 : 16) + 32 * c, qs);
        float lo[32], hi[32];
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            lo[l] = (float)(qs[l] & 0xF);
            hi[l] = (float)(qs[l] >> 4);
        }
        if (Q5) {
            u8 qh[32];
            load32(blk + 16, qh);
#pragma unroll
            for (int l = 0; l < 32; ++l) {
                lo[l] += (float)(((qh[l] >> (2 * c)) & 1) << 4);
                hi[l] += (float)(((qh[l] >> (2 * c + 1)) & 1) << 4);
            }
        }
        const float s0 = d * (float)sc0, m0 = dmin * (float)mn0;
        const float s1 = d * (float)sc1, m1 = dmin * (float)mn1;
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
            if (b < nb) {
                const float* xb = x + b * xs + 64 * u;
                acc[b] += (s0 * dot_n<32>(lo, xb) - m0 * sum_n<32>(xb)) +
                          (s1 * dot_n<32>(hi, xb + 32) - m1 * sum_n<32>(xb + 32));
            }
        }
    }
};
template <> struct Unit<GGML_Q4_K> : K4Unit<false> {};
template <> struct Unit<GGML_Q5_K> : K4Unit<true> {};

// Q6_K (2-byte aligned blocks): quarter c = 2h + p covers elements 128h + 32s + 16p + l for
// s = 0..3, l = 0..15; their sub-block scales are scales[8h + 2s + p].
template <> struct Unit<GGML_Q6_K> {
    static constexpr int ELEMS = 64;
    template <int MAXB>
    static __device__ __forceinline__ void dot(const u8* row, int u, const float* x, int xs, int nb, float* acc) {
        const int c = u & 3, h = c >> 1, p = c & 1;
        const u8* blk = row + 210 * (u >> 2);
        u8 ql_a[16], ql_b[16], qh[16];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const u16 a = ld_u16(blk + 64 * h + 16 * p + 2 * i);
            const u16 bb = ld_u16(blk + 64 * h + 32 + 16 * p + 2 * i);
            const u16 hh = ld_u16(blk + 128 + 32 * h + 16 * p + 2 * i);
            ql_a[2 * i] = a & 0xFF; ql_a[2 * i + 1] = a >> 8;
            ql_b[2 * i] = bb & 0xFF; ql_b[2 * i + 1] = bb >> 8;
            qh[2 * i] = hh & 0xFF; qh[2 * i + 1] = hh >> 8;
        }
        const float d = f16_to_f32(ld_u16(blk + 208));
        float q[4][16];
#pragma unroll
        for (int l = 0; l < 16; ++l) {
            q[0][l] = (float)((int)((ql_a[l] & 0xF) | ((qh[l] & 3) << 4)) - 32);
            q[1][l] = (float)((int)((ql_b[l] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[2][l] = (float)((int)((ql_a[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[3][l] = (float)((int)((ql_b[l] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
        float scale[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) scale[s] = d * (float)(i8)blk[192 + 8 * h + 2 * s + p];
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
            if (b < nb) {
                const float* xb = x + b * xs + 256 * (u >> 2) + 128 * h + 16 * p;
                float s = 0.0f;
#pragma unroll
                for (int k = 0; k < 4; ++k) s += scale[k] * dot_n<16>(q[k], xb + 32 * k);
                acc[b] += s;
            }
        }
    }
};

template <int T, int MAXB>
__device__ __forceinline__ void matvec_impl(
    float* y, int y_stride, const u8* __restrict__ weight, i64 row_bytes, const float* __restrict__ x,
    int x_stride, int n_seqs, int n_rows, int n_cols, const float* __restrict__ bias,
    const float* residual, int residual_stride) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * MATVEC_WARPS + warp;
    if (row >= n_rows) return;
    const u8* w = weight + (i64)row * row_bytes;
    const int n_units = n_cols / Unit<T>::ELEMS;
    float acc[MAXB];
#pragma unroll
    for (int b = 0; b < MAXB; ++b) acc[b] = 0.0f;
#pragma unroll 2
    for (int u = lane; u < n_units; u += 32) Unit<T>::template dot<MAXB>(w, u, x, x_stride, n_seqs, acc);
#pragma unroll
    for (int b = 0; b < MAXB; ++b) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) acc[b] += __shfl_xor_sync(0xFFFFFFFFu, acc[b], offset);
    }
    if (lane == 0) {
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
            if (b < n_seqs) {
                float v = acc[b];
                if (bias) v += bias[row];
                if (residual) v += residual[(i64)b * residual_stride + row];
                y[(i64)b * y_stride + row] = v;
            }
        }
    }
}

#define MATVEC_KERNEL(NAME, T, B)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * MATVEC_WARPS) matvec_##NAME##_b##B(          \
        float* y, int y_stride, const u8* weight, i64 row_bytes, const float* x, int x_stride,     \
        int n_seqs, int n_rows, int n_cols, const float* bias, const float* residual,              \
        int residual_stride) {                                                                      \
        matvec_impl<T, B>(y, y_stride, weight, row_bytes, x, x_stride, n_seqs, n_rows, n_cols,     \
                          bias, residual, residual_stride);                                         \
    }

#define MATVEC_TYPE(NAME, T) \
    MATVEC_KERNEL(NAME, T, 1) MATVEC_KERNEL(NAME, T, 2) MATVEC_KERNEL(NAME, T, 4) MATVEC_KERNEL(NAME, T, 8)

MATVEC_TYPE(f16, GGML_F16)
MATVEC_TYPE(bf16, GGML_BF16)
MATVEC_TYPE(q4_0, GGML_Q4_0)
MATVEC_TYPE(q4_1, GGML_Q4_1)
MATVEC_TYPE(q5_0, GGML_Q5_0)
MATVEC_TYPE(q5_1, GGML_Q5_1)
MATVEC_TYPE(q8_0, GGML_Q8_0)
MATVEC_TYPE(q4_k, GGML_Q4_K)
MATVEC_TYPE(q5_k, GGML_Q5_K)
MATVEC_TYPE(q6_k, GGML_Q6_K)
