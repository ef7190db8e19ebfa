// Quantised matrix x vector(s): y[b, n] = sum_k W[n, k] * x[b, k] (+ bias[n]) (+ residual[b, n])
// for up to MAXB sequences per read of the weights. W stays in the GGUF block layout as stored,
// except Q4_0 and Q8_0, repacked at load into per-row quants-then-scales (see quant_blocks.cuh);
// x, y, bias and residual are float32 and the sums are float32.
//
// One CTA of MATVEC_WARPS warps per ROWS (2 or 4) output rows: a warp per row would leave the
// 4096-row projections of an 8B model too few warps to fill an H100, and one row per CTA would
// make CTAs too short (Q4_0 at 4096 columns: one load round each) and re-read x per row. A block
// is split over LANES threads (4 for the 32-element legacy blocks, 16 for the 256-element K-quant
// super-blocks, 1 for an 8-element F16/BF16 unit), each owning a fixed slice, so the CTA's
// threads step over consecutive blocks together: their weight loads are one contiguous run and
// their x loads (float4s) cover contiguous 128-byte lines (llama.cpp's mmvq layout of work).
// Each lane loads UNROLL steps of weights before it computes, to keep enough bytes in flight.
// Q5_0 blocks (22 bytes) are read with 2-byte loads. Q4_0/Q8_0 read the repacked layout: each
// lane's quant slice is one aligned 4-byte (Q4_0) or 8-byte (Q8_0) load and a warp's loads are
// one contiguous run, with the lanes owning the same elements as in the GGUF layout, so results
// are bit-identical to in-place reads (16-byte loads per lane would need a lane to own a whole
// block: another reduction order). Measured bandwidths per type: bench/NOTES.md, "Kernel notes".
//
// Quant values become floats without I2F (quarter rate on sm_90, a cap below the bandwidth): a
// byte q is placed under the exponent of 2^23 with one byte_perm, and (2^23 + q) - (2^23 +
// offset) is exact.
//
// SwiGLU epilogue (swiglu != 0): the gate.up matrix is loaded with its gate and up rows
// interleaved (gpu/cuda/qweights.py fuse_swiglu), so a CTA's even ROWS hold whole (gate, up) pairs
// and it writes silu(gate) * up for each: no separate SiLU kernel, no launch (a graph node) for
// it and no [n, 2 * ffn] round trip through memory.
//
// Determinism: each thread adds its slices in block order, each warp reduces with a fixed xor
// butterfly, the warps are added in index order, and nothing depends on how many sequences share
// the launch, so a sequence's result is bit-identical whatever the other sequences in the batch
// are.
#include "quant_blocks.cuh"
#include "grid_dependency.cuh"

#define MATVEC_WARPS 4
#define MAGIC 8388608.0f  // 2^23

__device__ __forceinline__ float4 ld_x4(const float* p) { return __ldg((const float4*)p); }

// The four bytes of v as floats minus `offset` (exact for bytes and small offsets).
__device__ __forceinline__ void bytes4(u32 v, float offset, float* out) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7540 + i)) - (MAGIC + offset);
}

__device__ __forceinline__ float dot4(const float* q, float4 x) {
    return ((q[0] * x.x + q[1] * x.y) + (q[2] * x.z + q[3] * x.w));
}
__device__ __forceinline__ float sum4(float4 x) { return (x.x + x.y) + (x.z + x.w); }

// Bits 4j..4j+3 of h, each moved to bit 4 of its own byte (the Q5 legacy high bits).
__device__ __forceinline__ u32 spread4(u32 h, int j) {
    const u32 t = (h >> (4 * j)) & 0xF;
    return ((t & 1) << 4) | ((t & 2) << 11) | ((t & 4) << 18) | ((t & 8) << 25);
}

template <int T> struct Unit;

// Every unit: load(blk, sub) -> Raw (the lane's bytes of one block), decode(Raw, sub) -> Dq (its
// weights as floats plus scales), and dot<ROWS>(dq[ROWS], sub, xb, out[ROWS]): the block's
// contribution to ROWS rows for one sequence, x read once for all of them (re-reading x from L1
// per row bounds batch 8). Each row's arithmetic is the same whatever ROWS is.

// F16 / BF16: one 16-byte load of 8 elements per lane.
template <bool BF16> struct HalfUnit {
    static constexpr int LANES = 1, ELEMS = 8, BYTES = 16;
    typedef uint4 Raw;
    struct Dq { float w[8]; };
    static __device__ __forceinline__ Raw load(const u8* blk, int) { return *(const uint4*)blk; }
    static __device__ __forceinline__ void decode(const Raw& raw, int, Dq& q) {
        const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const u16 lo = (u16)(words[i] & 0xFFFF), hi = (u16)(words[i] >> 16);
            q.w[2 * i] = BF16 ? bf16_to_f32(lo) : f16_to_f32(lo);
            q.w[2 * i + 1] = BF16 ? bf16_to_f32(hi) : f16_to_f32(hi);
        }
    }
    template <int ROWS>
    static __device__ __forceinline__ void dot(const Dq* q, int, const float* xb, float* out) {
        const float4 x0 = ld_x4(xb), x1 = ld_x4(xb + 4);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) out[r] = dot4(q[r].w, x0) + dot4(q[r].w + 4, x1);
    }
};
template <> struct Unit<GGML_F16> : HalfUnit<false> {};
template <> struct Unit<GGML_BF16> : HalfUnit<true> {};

// Legacy 32-element blocks, 4 lanes each. Lane j owns quant bytes 4j..4j+3: elements 4j..4j+3
// (low nibbles) and 16 + 4j..16 + 4j + 3 (high nibbles); Q8_0's lane j owns elements 8j..8j+7.
struct LegacyRaw { u32 d; u32 qs; u32 extra; };  // extra: m (type 1 blocks) or qh (Q5)

template <int T, int BYTES_, int QS, bool HAS_MIN, bool Q5>
struct Legacy4 {
    static constexpr int LANES = 4, ELEMS = 32, BYTES = BYTES_;
    typedef LegacyRaw Raw;
    struct Dq { float lo[4], hi[4], d, m; };
    static __device__ __forceinline__ Raw load(const u8* blk, int j) {
        Raw r;
        if (HAS_MIN) {  // 4-byte aligned blocks: d, m as one word
            r.d = ld_u32(blk);
            r.qs = ld_u32(blk + QS + 4 * j);
            r.extra = Q5 ? ld_u32(blk + 4) : 0u;
        } else {
            r.d = ld_u16(blk);
            r.qs = ld_u32_a2(blk + QS + 4 * j);
            r.extra = Q5 ? ld_u32_a2(blk + 2) : 0u;
        }
        return r;
    }
    // Repacked Q4_0 (Packed<T>): qs = the block's 16 quant bytes (16-aligned), d = its scale.
    static __device__ __forceinline__ Raw load_packed(const u8* qs, const u8* d, int j) {
        Raw r;
        r.d = ld_u16(d);
        r.qs = ld_u32(qs + 4 * j);
        r.extra = 0u;
        return r;
    }
    static __device__ __forceinline__ void decode(const Raw& r, int j, Dq& q) {
        u32 lo_bits = r.qs & 0x0F0F0F0Fu, hi_bits = (r.qs >> 4) & 0x0F0F0F0Fu;
        if (Q5) {
            lo_bits |= spread4(r.extra, j);
            hi_bits |= spread4(r.extra, j + 4);
        }
        const float offset = HAS_MIN ? 0.0f : (Q5 ? 16.0f : 8.0f);
        bytes4(lo_bits, offset, q.lo);
        bytes4(hi_bits, offset, q.hi);
        q.d = f16_to_f32(r.d & 0xFFFF);
        q.m = HAS_MIN ? f16_to_f32(r.d >> 16) : 0.0f;
    }
    template <int ROWS>
    static __device__ __forceinline__ void dot(const Dq* q, int j, const float* xb, float* out) {
        const float4 xl = ld_x4(xb + 4 * j), xh = ld_x4(xb + 16 + 4 * j);
        const float xsum = HAS_MIN ? sum4(xl) + sum4(xh) : 0.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = q[r].d * (dot4(q[r].lo, xl) + dot4(q[r].hi, xh));
            if (HAS_MIN) v += q[r].m * xsum;
            out[r] = v;
        }
    }
};
template <> struct Unit<GGML_Q4_0> : Legacy4<GGML_Q4_0, 18, 2, false, false> {};
template <> struct Unit<GGML_Q4_1> : Legacy4<GGML_Q4_1, 20, 4, true, false> {};
template <> struct Unit<GGML_Q5_0> : Legacy4<GGML_Q5_0, 22, 6, false, true> {};
template <> struct Unit<GGML_Q5_1> : Legacy4<GGML_Q5_1, 24, 8, true, true> {};

template <> struct Unit<GGML_Q8_0> {
    static constexpr int LANES = 4, ELEMS = 32, BYTES = 34;
    struct Raw { u32 d; u32 q0; u32 q1; };
    struct Dq { float q[8], d; };
    static __device__ __forceinline__ Raw load(const u8* blk, int j) {
        Raw r;
        r.d = ld_u16(blk);
        r.q0 = ld_u32_a2(blk + 2 + 8 * j);
        r.q1 = ld_u32_a2(blk + 6 + 8 * j);
        return r;
    }
    // Repacked (Packed<T>): qs = the block's 32 quant bytes (16-aligned), d = its scale.
    static __device__ __forceinline__ Raw load_packed(const u8* qs, const u8* d, int j) {
        const uint2 v = *(const uint2*)(qs + 8 * j);
        Raw r;
        r.d = ld_u16(d);
        r.q0 = v.x;
        r.q1 = v.y;
        return r;
    }
    static __device__ __forceinline__ void decode(const Raw& r, int, Dq& q) {
        bytes4(r.q0 ^ 0x80808080u, 128.0f, q.q);  // int8 as (byte ^ 0x80) - 128
        bytes4(r.q1 ^ 0x80808080u, 128.0f, q.q + 4);
        q.d = f16_to_f32(r.d);
    }
    template <int ROWS>
    static __device__ __forceinline__ void dot(const Dq* q, int j, const float* xb, float* out) {
        const float4 x0 = ld_x4(xb + 8 * j), x1 = ld_x4(xb + 8 * j + 4);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) out[r] = q[r].d * (dot4(q[r].q, x0) + dot4(q[r].q + 4, x1));
    }
};

// Q4_K / Q5_K, 16 lanes per super-block. Lane t owns quant bytes 8(t % 4)..+7 of chunk c = t / 4:
// low nibbles are elements 64c + l of sub-block 2c, high nibbles 64c + 32 + l of sub-block 2c + 1.
template <bool Q5> struct K4Unit {
    static constexpr int LANES = 16, ELEMS = QK_K, BYTES = Q5 ? 176 : 144;
    struct Raw { u32 dm; u32 sc[3]; uint2 qs; uint2 qh; };
    struct Dq { float lo[8], hi[8], s0, m0, s1, m1; };
    static __device__ __forceinline__ Raw load(const u8* blk, int t) {
        const int c = t >> 2, l0 = 8 * (t & 3);
        Raw r;
        r.dm = ld_u32(blk);
#pragma unroll
        for (int i = 0; i < 3; ++i) r.sc[i] = ld_u32(blk + 4 + 4 * i);
        r.qs = *(const uint2*)(blk + (Q5 ? 48 : 16) + 32 * c + l0);
        r.qh = Q5 ? *(const uint2*)(blk + 16 + l0) : make_uint2(0, 0);
        return r;
    }
    static __device__ __forceinline__ void decode(const Raw& r, int t, Dq& q) {
        const int c = t >> 2;
        u8 scales[12];
#pragma unroll
        for (int i = 0; i < 3; ++i) {
            scales[4 * i] = r.sc[i] & 0xFF; scales[4 * i + 1] = (r.sc[i] >> 8) & 0xFF;
            scales[4 * i + 2] = (r.sc[i] >> 16) & 0xFF; scales[4 * i + 3] = r.sc[i] >> 24;
        }
        int sc0, mn0, sc1, mn1;
        k4_scale_min(scales, 2 * c, &sc0, &mn0);
        k4_scale_min(scales, 2 * c + 1, &sc1, &mn1);
        const float d = f16_to_f32(r.dm & 0xFFFF), dmin = f16_to_f32(r.dm >> 16);
        const u32 qs[2] = {r.qs.x, r.qs.y}, qh[2] = {r.qh.x, r.qh.y};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            u32 l = qs[h] & 0x0F0F0F0Fu, u = (qs[h] >> 4) & 0x0F0F0F0Fu;
            if (Q5) {
                l |= ((qh[h] >> (2 * c)) & 0x01010101u) << 4;
                u |= ((qh[h] >> (2 * c + 1)) & 0x01010101u) << 4;
            }
            bytes4(l, 0.0f, q.lo + 4 * h);
            bytes4(u, 0.0f, q.hi + 4 * h);
        }
        q.s0 = d * (float)sc0; q.m0 = dmin * (float)mn0;
        q.s1 = d * (float)sc1; q.m1 = dmin * (float)mn1;
    }
    template <int ROWS>
    static __device__ __forceinline__ void dot(const Dq* q, int t, const float* xb, float* out) {
        const float* xc = xb + 64 * (t >> 2) + 8 * (t & 3);
        const float4 a0 = ld_x4(xc), a1 = ld_x4(xc + 4), b0 = ld_x4(xc + 32), b1 = ld_x4(xc + 36);
        const float asum = sum4(a0) + sum4(a1), bsum = sum4(b0) + sum4(b1);
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            out[r] = (q[r].s0 * (dot4(q[r].lo, a0) + dot4(q[r].lo + 4, a1)) - q[r].m0 * asum) +
                     (q[r].s1 * (dot4(q[r].hi, b0) + dot4(q[r].hi + 4, b1)) - q[r].m1 * bsum);
    }
};
template <> struct Unit<GGML_Q4_K> : K4Unit<false> {};
template <> struct Unit<GGML_Q5_K> : K4Unit<true> {};

// Q6_K (2-byte aligned blocks), 16 lanes per super-block. Lane t: half h = t / 8, l0 = 4(t % 8);
// it owns elements 128h + 32s + l0..l0+3 for s = 0..3: low 4 bits from ql[64h + l] (s = 0, 2: low
// and high nibble) and ql[64h + 32 + l] (s = 1, 3), bits 4-5 from bits 2s of qh[32h + l], stored
// + 32, int8 scale scales[8h + 2s + l / 16].
template <> struct Unit<GGML_Q6_K> {
    static constexpr int LANES = 16, ELEMS = QK_K, BYTES = 210;
    struct Raw { u32 qa, qb, qh; u32 sc; u32 d; };
    struct Dq { float q[4][4], scale[4]; };
    static __device__ __forceinline__ Raw load(const u8* blk, int t) {
        const int h = t >> 3, l0 = 4 * (t & 7);
        Raw r;
        r.qa = ld_u32_a2(blk + 64 * h + l0);
        r.qb = ld_u32_a2(blk + 64 * h + 32 + l0);
        r.qh = ld_u32_a2(blk + 128 + 32 * h + l0);
        // scales[8h + 2s + l0 / 16] for s = 0..3: bytes 8h + (l0 >> 4) + {0, 2, 4, 6}
        const u8* sc = blk + 192 + 8 * h + (l0 >> 4);
        r.sc = (u32)sc[0] | ((u32)sc[2] << 8) | ((u32)sc[4] << 16) | ((u32)sc[6] << 24);
        r.d = ld_u16(blk + 208);
        return r;
    }
    static __device__ __forceinline__ void decode(const Raw& r, int, Dq& q) {
        bytes4((r.qa & 0x0F0F0F0Fu) | ((r.qh << 4) & 0x30303030u), 32.0f, q.q[0]);
        bytes4((r.qb & 0x0F0F0F0Fu) | ((r.qh << 2) & 0x30303030u), 32.0f, q.q[1]);
        bytes4(((r.qa >> 4) & 0x0F0F0F0Fu) | (r.qh & 0x30303030u), 32.0f, q.q[2]);
        bytes4(((r.qb >> 4) & 0x0F0F0F0Fu) | ((r.qh >> 2) & 0x30303030u), 32.0f, q.q[3]);
        const float d = f16_to_f32(r.d);
#pragma unroll
        for (int s = 0; s < 4; ++s) q.scale[s] = d * (float)(i8)((r.sc >> (8 * s)) & 0xFF);
    }
    template <int ROWS>
    static __device__ __forceinline__ void dot(const Dq* q, int t, const float* xb, float* out) {
        const float* xc = xb + 128 * (t >> 3) + 4 * (t & 7);
        float4 xs[4];
#pragma unroll
        for (int s = 0; s < 4; ++s) xs[s] = ld_x4(xc + 32 * s);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = 0.0f;
#pragma unroll
            for (int s = 0; s < 4; ++s) v += q[r].scale[s] * dot4(q[r].q[s], xs[s]);
            out[r] = v;
        }
    }
};

// ROWS consecutive rows per CTA: each thread owns the same block slices of every row, so x is read
// once per ROWS rows, and the CTA keeps UNROLL * ROWS loads in flight per thread.
template <int ROWS> struct RowsUnroll { static constexpr int value = ROWS >= 4 ? 2 : 4; };

// The CTA's sums: each warp reduced with a fixed xor butterfly, the warps added in index order,
// then the epilogue (bias, residual, or SwiGLU of interleaved gate/up rows) and the store.
template <int MAXB, int ROWS>
__device__ __forceinline__ void matvec_finish(float (&acc)[ROWS][MAXB], float* y, int y_stride,
                                              int row0, int n_seqs, int n_rows,
                                              const float* __restrict__ bias,
                                              const float* residual, int residual_stride,
                                              int swiglu) {
    __shared__ float partial[MATVEC_WARPS][ROWS][MAXB];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int b = 0; b < MAXB; ++b) {
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                acc[r][b] += __shfl_xor_sync(0xFFFFFFFFu, acc[r][b], offset);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int b = 0; b < MAXB; ++b) partial[warp][r][b] = acc[r][b];
    }
    __syncthreads();
    if (swiglu) {  // rows interleaved gate, up: y[b, row / 2] = silu(gate) * up
        if (threadIdx.x < ROWS / 2 * MAXB) {
            const int pair = threadIdx.x / MAXB, b = threadIdx.x % MAXB, row = row0 + 2 * pair;
            if (b < n_seqs && row + 1 < n_rows) {
                float gate = 0.0f, up = 0.0f;
#pragma unroll
                for (int k = 0; k < MATVEC_WARPS; ++k) {
                    gate += partial[k][2 * pair][b];
                    up += partial[k][2 * pair + 1][b];
                }
                y[(i64)b * y_stride + row / 2] = gate / (1.0f + expf(-gate)) * up;
            }
        }
        return;
    }
    if (threadIdx.x < ROWS * MAXB) {  // warps added in index order
        const int r = threadIdx.x / MAXB, b = threadIdx.x % MAXB, row = row0 + r;
        if (b < n_seqs && row < n_rows) {
            float v = 0.0f;
#pragma unroll
            for (int k = 0; k < MATVEC_WARPS; ++k) v += partial[k][r][b];
            if (bias) v += bias[row];
            if (residual) v += residual[(i64)b * residual_stride + row];
            y[(i64)b * y_stride + row] = v;
        }
    }
}

// L2 prefetch before the grid wait (programmatic launch): a CTA asks for the first
// MATVEC_PREFETCH_BYTES of its rows, split evenly over them. Not whole rows: on the 8B F16 down
// projection (1024-2048 resident CTAs x 57-114 KB) that is more than the 50 MB L2, and lines
// prefetched that early are evicted before their loads come, so the weights are read twice.
// The sizes tried and their step times: bench/NOTES.md, "Kernel notes".
#ifndef MATVEC_PREFETCH_BYTES  // tunable: gpu/cuda/kernels.py TUNABLES
#define MATVEC_PREFETCH_BYTES 16384
#endif

// Row pointers (tail rows re-read the last row), the L2 prefetch, then the grid wait.
template <int ROWS>
__device__ __forceinline__ void matvec_prologue(const u8* (&w)[ROWS], const u8* weight, i64 row_bytes,
                                                int row0, int n_rows) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) w[r] = weight + (i64)min(row0 + r, n_rows - 1) * row_bytes;
    if (threadIdx.x < ROWS && row0 + (int)threadIdx.x < n_rows) {
        const i64 bytes = min(row_bytes, (i64)(MATVEC_PREFETCH_BYTES / ROWS));
        prefetch_l2(weight + (i64)(row0 + threadIdx.x) * row_bytes, bytes);
    }
    grid_dependency_sync();
}

template <int T, int MAXB, int ROWS>
__device__ __forceinline__ void matvec_impl(
    float* y, int y_stride, const u8* __restrict__ weight, i64 row_bytes, const float* __restrict__ x,
    int x_stride, int n_seqs, int n_rows, int n_cols, const float* __restrict__ bias,
    const float* residual, int residual_stride, int swiglu) {
    typedef Unit<T> U;
    constexpr int UNROLL = RowsUnroll<ROWS>::value;
    constexpr int PER_STEP = 32 * MATVEC_WARPS / U::LANES;  // blocks the CTA covers per step
    const int row0 = blockIdx.x * ROWS;
    const u8* w[ROWS];
    matvec_prologue<ROWS>(w, weight, row_bytes, row0, n_rows);
    const int n_blocks = n_cols / U::ELEMS;
    const int sub = threadIdx.x % U::LANES;
    float acc[ROWS][MAXB];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int b = 0; b < MAXB; ++b) acc[r][b] = 0.0f;
    for (int first = threadIdx.x / U::LANES; first < n_blocks; first += UNROLL * PER_STEP) {
        typename U::Raw raw[UNROLL][ROWS];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const int blk = first + k * PER_STEP;
            if (blk < n_blocks) {
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    if constexpr (Packed<T>::QBYTES > 0) {
                        constexpr int QB = Packed<T>::QBYTES;
                        raw[k][r] = U::load_packed(w[r] + (i64)blk * QB, w[r] + (i64)n_blocks * QB + 2 * blk, sub);
                    } else {
                        raw[k][r] = U::load(w[r] + (i64)blk * U::BYTES, sub);
                    }
                }
            }
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const int blk = first + k * PER_STEP;
            if (blk < n_blocks) {
                typename U::Dq dq[ROWS];
#pragma unroll
                for (int r = 0; r < ROWS; ++r) U::decode(raw[k][r], sub, dq[r]);
#pragma unroll
                for (int b = 0; b < MAXB; ++b) {
                    if (b < n_seqs) {
                        float out[ROWS];
                        U::template dot<ROWS>(dq, sub, x + (i64)b * x_stride + (i64)blk * U::ELEMS, out);
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) acc[r][b] += out[r];
                    }
                }
            }
        }
    }
    matvec_finish<MAXB, ROWS>(acc, y, y_stride, row0, n_seqs, n_rows, bias, residual,
                              residual_stride, swiglu);
}

// Q4_0 repacked in groups of 4 blocks (gpu/cuda/matvec.py pack_rows, rows of a multiple of 128
// columns): within a group's 64 quant bytes, lane j's 4-byte slices of the 4 blocks lie together,
// so a lane fetches its share of 4 blocks with one 16-byte load (and their 4 scales, 8 contiguous
// bytes, with one 8-byte load); a warp's load is one contiguous 512-byte run, a quarter of the
// load instructions of 4-byte slices. Lane j owns the same elements of each block as the Legacy4
// unit (4j..4j+3 and 16 + 4j..); a thread adds its blocks in order, so results are
// batch-invariant.
// Block blk (0..3) of a lane's group share: its 8 quants as floats minus 8, and its scale.
__device__ __forceinline__ void q4_0_group_block(uint4 qs, uint2 dd, int blk, float* lo, float* hi,
                                                 float* d) {
    const u32 word = blk == 0 ? qs.x : blk == 1 ? qs.y : blk == 2 ? qs.z : qs.w;
    bytes4(word & 0x0F0F0F0Fu, 8.0f, lo);
    bytes4((word >> 4) & 0x0F0F0F0Fu, 8.0f, hi);
    *d = f16_to_f32(((blk < 2 ? dd.x : dd.y) >> (16 * (blk & 1))) & 0xFFFF);
}

template <int MAXB, int ROWS>
__device__ __forceinline__ void matvec_q4_0x4_impl(
    float* y, int y_stride, const u8* __restrict__ weight, i64 row_bytes, const float* __restrict__ x,
    int x_stride, int n_seqs, int n_rows, int n_cols, const float* __restrict__ bias,
    const float* residual, int residual_stride, int swiglu) {
    constexpr int UNROLL = RowsUnroll<ROWS>::value;
    constexpr int PER_STEP = 32 * MATVEC_WARPS / 4;  // groups the CTA covers per step
    const int row0 = blockIdx.x * ROWS;
    const u8* w[ROWS];
    matvec_prologue<ROWS>(w, weight, row_bytes, row0, n_rows);
    const int n_groups = n_cols / 128, j = threadIdx.x & 3;
    float acc[ROWS][MAXB];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int b = 0; b < MAXB; ++b) acc[r][b] = 0.0f;
    for (int first = threadIdx.x / 4; first < n_groups; first += UNROLL * PER_STEP) {
        uint4 qs[UNROLL][ROWS];
        uint2 dd[UNROLL][ROWS];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const int g = first + k * PER_STEP;
            if (g < n_groups) {
#pragma unroll
                for (int r = 0; r < ROWS; ++r) {
                    qs[k][r] = *reinterpret_cast<const uint4*>(w[r] + (i64)g * 64 + 16 * j);
                    dd[k][r] = *reinterpret_cast<const uint2*>(w[r] + (i64)n_groups * 64 + 8 * g);
                }
            }
        }
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) {
            const int g = first + k * PER_STEP;
            if (g < n_groups) {
                // Each (row, sequence) adds its group as one sum over the 4 blocks in order, then
                // into acc: the same arithmetic in both loop orders below (batch invariance).
                const float* xg = x + (i64)g * 128 + 4 * j;
                if constexpr (MAXB == 1) {  // x once per group; a row's 4 blocks decoded in turn
                    float4 xl[4], xh[4];
#pragma unroll
                    for (int blk = 0; blk < 4; ++blk) {
                        xl[blk] = ld_x4(xg + 32 * blk);
                        xh[blk] = ld_x4(xg + 32 * blk + 16);
                    }
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) {
                        float v = 0.0f;
#pragma unroll
                        for (int blk = 0; blk < 4; ++blk) {
                            float lo[4], hi[4], d;
                            q4_0_group_block(qs[k][r], dd[k][r], blk, lo, hi, &d);
                            v += d * (dot4(lo, xl[blk]) + dot4(hi, xh[blk]));
                        }
                        acc[r][0] += v;
                    }
                } else {  // a block at a time: its ROWS decoded slices serve every sequence
                    float v[ROWS][MAXB];
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
#pragma unroll
                        for (int b = 0; b < MAXB; ++b) v[r][b] = 0.0f;
#pragma unroll
                    for (int blk = 0; blk < 4; ++blk) {
                        float lo[ROWS][4], hi[ROWS][4], d[ROWS];
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) q4_0_group_block(qs[k][r], dd[k][r], blk, lo[r], hi[r], &d[r]);
#pragma unroll
                        for (int b = 0; b < MAXB; ++b) {
                            if (b < n_seqs) {
                                const float* xb = xg + (i64)b * x_stride + 32 * blk;
                                const float4 xl = ld_x4(xb), xh = ld_x4(xb + 16);
#pragma unroll
                                for (int r = 0; r < ROWS; ++r) v[r][b] += d[r] * (dot4(lo[r], xl) + dot4(hi[r], xh));
                            }
                        }
                    }
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
#pragma unroll
                        for (int b = 0; b < MAXB; ++b) acc[r][b] += v[r][b];
                }
            }
        }
    }
    matvec_finish<MAXB, ROWS>(acc, y, y_stride, row0, n_seqs, n_rows, bias, residual,
                              residual_stride, swiglu);
}

#define MATVEC_Q4_0X4_KERNEL(B, R)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * MATVEC_WARPS) matvec_q4_0x4_b##B##_r##R(     \
        float* y, int y_stride, const u8* weight, i64 row_bytes, const float* x, int x_stride,     \
        int n_seqs, int n_rows, int n_cols, const float* bias, const float* residual,              \
        int residual_stride, int swiglu) {                                                          \
        matvec_q4_0x4_impl<B, R>(y, y_stride, weight, row_bytes, x, x_stride, n_seqs, n_rows,      \
                                 n_cols, bias, residual, residual_stride, swiglu);                  \
    }
#define MATVEC_Q4_0X4_BATCH(B) MATVEC_Q4_0X4_KERNEL(B, 2) MATVEC_Q4_0X4_KERNEL(B, 4)
MATVEC_Q4_0X4_BATCH(1)
MATVEC_Q4_0X4_BATCH(2)
MATVEC_Q4_0X4_BATCH(4)
MATVEC_Q4_0X4_BATCH(8)

#define MATVEC_KERNEL(NAME, T, B, R)                                                                \
    extern "C" __global__ void __launch_bounds__(32 * MATVEC_WARPS) matvec_##NAME##_b##B##_r##R(   \
        float* y, int y_stride, const u8* weight, i64 row_bytes, const float* x, int x_stride,     \
        int n_seqs, int n_rows, int n_cols, const float* bias, const float* residual,              \
        int residual_stride, int swiglu) {                                                          \
        matvec_impl<T, B, R>(y, y_stride, weight, row_bytes, x, x_stride, n_seqs, n_rows, n_cols,  \
                             bias, residual, residual_stride, swiglu);                              \
    }

#define MATVEC_BATCH(NAME, T, B) MATVEC_KERNEL(NAME, T, B, 2) MATVEC_KERNEL(NAME, T, B, 4)
#define MATVEC_TYPE(NAME, T) \
    MATVEC_BATCH(NAME, T, 1) MATVEC_BATCH(NAME, T, 2) MATVEC_BATCH(NAME, T, 4) MATVEC_BATCH(NAME, T, 8)

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
