// Tensor-core matmul over quantised weights: y[b, n] = sum_k W[n, k] * x[b, k] (+ bias[n])
// (+ residual[b, n]), or silu(gate) * up of interleaved gate/up rows (float32, or fp16 for the
// next matmul's input: y_half, SwiGLU only), for many sequences per read
// of the weights. The decode step's matrix products above the matvec's batch sizes
// (gpu/cuda/tcmm.py says when), every GGUF type the CUDA backend keeps quantised.
//
// Work: a CTA of TC_WARPS warps owns TC_BM = 128 weight rows (a warp 32 of them: two m16 tiles)
// and up to 64 sequences (NT n8 tiles), over a range of K in chunks of TC_KC = 256 elements (one
// K-quant super-block, 8 legacy blocks). Per chunk the CTA copies the rows' raw bytes (GGUF
// blocks or the matvec's repacked Q4_0/Q8_0 layout, quant_blocks.cuh) and the sequences' fp16 x
// into shared memory with cp.async, two stages deep, so the next chunk's bytes are in flight
// while this one computes. Each warp then builds its mma A fragments straight from the raw bytes,
// a 32-block at a time (dequantised in registers, never written back anywhere; `octet` below),
// its B fragments from the staged x, and issues mma.sync m16n8k16 (fp16 in, fp32 accumulate). The weights are read from memory once
// per 64 sequences: more sequences cost tensor-core time, not bandwidth.
//
// x arrives as fp16 (tc_to_half, or a producer kernel that writes fp16): the only rounding this
// path adds to the matvec's float32 arithmetic is x and the dequantised weights to fp16.
//
// Split K: small matrices leave too few CTAs to fill the GPU, so K is split over gridDim.z;
// each split writes float32 partial sums to a workspace and the last CTA of a tile to arrive
// (an atomic ticket) adds them in split order and runs the epilogue. The split count depends on
// the matrix shape and the device only, never on the batch.
//
// Batch invariance: an output element is the same sequence of mmas over the same K chunks (the
// mma's own summation of one element depends only on that element's row and column), then the
// splits added in index order, then bias and residual: nothing depends on how many sequences
// share the launch or which tile they land in. Sequences past n_seqs re-read the last one's x
// (no branch in the loop) and are never stored.
#include "quant_blocks.cuh"
#include "grid_dependency.cuh"
#include "mma.cuh"

#define TC_KC 256   // K elements per chunk
#define TC_WARPS 4
#define TC_MT 2     // m16 tiles per warp
#define TC_BM (16 * TC_MT * TC_WARPS)  // weight rows per CTA
#define TC_THREADS (32 * TC_WARPS)     // threads per CTA of one warp per row group (WN = 1)
#define TC_XS (TC_KC + 16)  // halves per staged x row: a row is 8 banks on, so the 64-bit B
                            // fragment loads of 4 rows x 4 lanes (a half-warp) hit 32 banks
#ifndef TC_UNROLL  // tunable: gpu/cuda/kernels.py TUNABLES
// 32-blocks decoded together (each is two k16 mma steps): their fragment decodes (shared
// loads, ALU) are independent, so unrolled the compiler overlaps them instead of waiting out
// each block's load latency. The H100 sweep of 2026-12-07 (old per-k16 decode): 4 k16 steps
// together took 116 us where 1 took 121 us (Q4_0 28672x4096, 64 sequences): 2 blocks here.
#define TC_UNROLL 2
#endif

// ---- raw bytes of one row's chunk, and the fp16 pairs of its elements ------------------------
// Tc<T, GROUPED>: CHUNK = bytes of a full chunk as staged (GGUF blocks, or quants then scales
// for the repacked types), PACKED_QB = quant bytes per 32-block in the repacked layout (0: GGUF
// blocks), ALIGNED = rows and chunks start 16-byte aligned (no misalignment slack needed).
//
// octet(s, blk, t, a): lane t's eight elements of 32-block blk of the chunk staged at s, as fp16
// pairs (low half = lower element): a[0] = elements 4t, 4t+1, a[1] = 4t+2, 4t+3, a[2] = 16+4t,
// 17+4t, a[3] = 18+4t, 19+4t. The mma's K order is permuted to fit the blocks: in the block's
// first k16 step lane t's A slots 2t, 2t+1, 2t+8, 2t+9 hold elements 4t .. 4t+3 (a[0], a[1]),
// in the second elements 16+4t .. 19+4t (a[2], a[3]), and its B fragment is x[4t .. 4t+3] of the
// same block half: one 64-bit shared load. The permutation is the same for every row, sequence
// and batch (batch invariance), and a lane's four bytes of quants are one 32-bit load: with
// Q4_0's nibble order (byte i holds elements i and i+16) they are all eight elements.
// Each value is exactly what loader/quants.py computes in float32, then rounded to fp16: Q4_0 and
// Q8_0 decode in fp16 pairs, (q - 8) * d and q * d, whose products are exact before their one
// rounding (a 4- or 8-bit integer times an 11-bit significand), so they equal the float32 path.

__device__ __forceinline__ float nib(u32 v, int shift) { return (float)((v >> shift) & 0xF); }
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 select) {
    u32 r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(select));
    return r;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 r;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 r;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
    return r;
}
// Bytes 0, 1 (select 0x4140) or 2, 3 (0x4342) of v (each < 1024) as the fp16 pair 1024 + byte:
// 0x64XX is 1024 + XX exactly.
__device__ __forceinline__ u32 magic_pair(u32 v, u32 select) { return prmt(v, 0x64646464u, select); }
// Four small integers (bytes of v, minus `bias` - 1024 by hsub2 with bias2) times d, as two
// fp16 pairs: lo = bytes 0, 1, hi = bytes 2, 3.
__device__ __forceinline__ void scaled_pairs(u32 v, u32 bias2, u32 d2, u32& lo, u32& hi) {
    lo = hmul2(hsub2(magic_pair(v, 0x4140), bias2), d2);
    hi = hmul2(hsub2(magic_pair(v, 0x4342), bias2), d2);
}

template <int T, bool GROUPED = false> struct Tc;

template <> struct Tc<GGML_F16> {
    static constexpr int CHUNK = 2 * TC_KC, PACKED_QB = 0;
    static constexpr bool ALIGNED = true;
    static __device__ __forceinline__ void octet(const u8* s, int blk, int t, u32* a) {
        const uint2 v0 = *(const uint2*)(s + 64 * blk + 8 * t);
        const uint2 v1 = *(const uint2*)(s + 64 * blk + 32 + 8 * t);
        a[0] = v0.x; a[1] = v0.y; a[2] = v1.x; a[3] = v1.y;
    }
};
template <> struct Tc<GGML_BF16> {
    static constexpr int CHUNK = 2 * TC_KC, PACKED_QB = 0;
    static constexpr bool ALIGNED = true;
    static __device__ __forceinline__ u32 half2_of(u32 v) {
        return pack_f16x2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
    }
    static __device__ __forceinline__ void octet(const u8* s, int blk, int t, u32* a) {
        const uint2 v0 = *(const uint2*)(s + 64 * blk + 8 * t);
        const uint2 v1 = *(const uint2*)(s + 64 * blk + 32 + 8 * t);
        a[0] = half2_of(v0.x); a[1] = half2_of(v0.y); a[2] = half2_of(v1.x); a[3] = half2_of(v1.y);
    }
};

// Repacked Q4_0: 8 blocks' quants (16 bytes each; in 4-block groups lane-major when GROUPED:
// byte i of block b at 64 (b / 4) + 16 (i / 4) + 4 (b % 4) + i % 4), then their 8 fp16 scales.
// Lane t's bytes 4t .. 4t+3 are one word in both layouts (grouped: 4 lanes x 8 rows of a warp
// share 8 banks, a 4-way conflict the plain layout does not have).
template <bool GROUPED> struct Tc<GGML_Q4_0, GROUPED> {
    static constexpr int CHUNK = 8 * 16 + 16, PACKED_QB = 16;
    static constexpr bool ALIGNED = true;
    static __device__ __forceinline__ void octet(const u8* s, int blk, int t, u32* a) {
        const int at = GROUPED ? 64 * (blk >> 2) + 16 * t + 4 * (blk & 3) : 16 * blk + 4 * t;
        const u32 v = ld_u32(s + at), d = ld_u16(s + 128 + 2 * blk);
        const u32 d2 = d | (d << 16), bias2 = 0x64086408u;  // 1032 = 1024 + 8
        scaled_pairs(v & 0x0F0F0F0Fu, bias2, d2, a[0], a[1]);         // low nibbles: 4t ..
        scaled_pairs((v >> 4) & 0x0F0F0F0Fu, bias2, d2, a[2], a[3]);  // high: 16 + 4t ..
    }
};
// Repacked Q8_0: 8 blocks' quants (32 bytes each), then their 8 fp16 scales. A signed byte q
// is 1024 + (q ^ 0x80) - 1152 exactly.
template <> struct Tc<GGML_Q8_0> {
    static constexpr int CHUNK = 8 * 32 + 16, PACKED_QB = 32;
    static constexpr bool ALIGNED = true;
    static __device__ __forceinline__ void octet(const u8* s, int blk, int t, u32* a) {
        const u32 v0 = ld_u32(s + 32 * blk + 4 * t) ^ 0x80808080u;
        const u32 v1 = ld_u32(s + 32 * blk + 16 + 4 * t) ^ 0x80808080u;
        const u32 d = ld_u16(s + 256 + 2 * blk), d2 = d | (d << 16), bias2 = 0x64806480u;
        scaled_pairs(v0, bias2, d2, a[0], a[1]);
        scaled_pairs(v1, bias2, d2, a[2], a[3]);
    }
};
// The legacy GGUF blocks start only 2-byte aligned (20-, 22- and 24-byte blocks): their words
// are two 16-bit loads. Byte j of v: element 4t + j in its low nibble, 16 + 4t + j in its high.
template <> struct Tc<GGML_Q4_1> {
    static constexpr int CHUNK = 8 * 20, PACKED_QB = 0;
    static constexpr bool ALIGNED = false;
    static __device__ __forceinline__ u32 two(u32 v, int shift, float d, float m) {
        return pack_f16x2(__fadd_rn(__fmul_rn(d, nib(v, shift)), m), __fadd_rn(__fmul_rn(d, nib(v, shift + 8)), m));
    }
    static __device__ __forceinline__ void octet(const u8* s, int blk, int t, u32* a) {
        const u8* b = s + 20 * blk;
        const float d = f16_to_f32(ld_u16(b)), m = f16_to_f32(ld_u16(b + 2));
        const u32 v = ld_u32_a2(b + 4 + 4 * t);
        a[0] = two(v, 0, d, m); a[1] = two(v, 16, d, m); a[2] = two(v, 4, d, m); a[3] = two(v, 20, d, m);
    }
};
// Q5_0 / Q5_1: element e's fifth bit is bit e of the block's 32-bit qh.
template <bool HAS_MIN> struct Q5Legacy {
    static constexpr int BYTES = HAS_MIN ? 24 : 22, QH = HAS_MIN ? 4 : 2, QS = QH + 4;
    static constexpr int CHUNK = 8 * BYTES, PACKED_QB = 0;
    static constexpr bool ALIGNED = false;
    static __device__ __forceinline__ float value(u32 v, int shift, u32 qh, int e, float d, float m) {
        const float q = nib(v, shift) + (float)(((qh >> e) & 1) << 4);
        return HAS_MIN ? __fadd_rn(__fmul_rn(d, q), m) : __fmul_rn(d, q - 16.0f);
    }
    // Bytes j, j + 1 of v: elements e, e + 1 (low nibbles, high = 0) or e + 16, e + 17.
    static __device__ __forceinline__ u32 two(u32 v, int j, int high, u32 qh, int e, float d, float m) {
        return pack_f16x2(value(v, 8 * j + 4 * high, qh, e, d, m), value(v, 8 * j + 8 + 4 * high, qh, e + 1, d, m));
    }
    static __device__ __forceinline__ void octet(const u8* s, int blk, int t, u32* a) {
        const u8* b = s + BYTES * blk;
        const u32 qh = ld_u32_a2(b + QH), v = ld_u32_a2(b + QS + 4 * t);
        const float d = f16_to_f32(ld_u16(b)), m = HAS_MIN ? f16_to_f32(ld_u16(b + 2)) : 0.0f;
        const int e = 4 * t;
        a[0] = two(v, 0, 0, qh, e, d, m); a[1] = two(v, 2, 0, qh, e + 2, d, m);
        a[2] = two(v, 0, 1, qh, e + 16, d, m); a[3] = two(v, 2, 1, qh, e + 18, d, m);
    }
};
template <> struct Tc<GGML_Q5_0> : Q5Legacy<false> {};
template <> struct Tc<GGML_Q5_1> : Q5Legacy<true> {};
// Q4_K / Q5_K: the chunk is one super-block; 32-block j is sub-block j: element l of it is byte
// l of quant group j / 2, in its low (even j) or high nibbles, and its fifth bit (Q5_K) bit j of
// qh byte l. Lane t's elements 4t .. and 16 + 4t .. are two words of the group.
template <bool Q5> struct K4Tc {
    static constexpr int CHUNK = Q5 ? 176 : 144, PACKED_QB = 0;
    static constexpr bool ALIGNED = true;
    static __device__ __forceinline__ float value(u32 v, u32 bits, int i, int j, int shift, float scale,
                                                  float min) {
        float q = nib(v, 8 * i + shift);
        if (Q5) q += (float)(((bits >> (8 * i + j)) & 1) << 4);
        return __fsub_rn(__fmul_rn(scale, q), min);
    }
    static __device__ __forceinline__ void octet(const u8* s, int j, int t, u32* a) {
        int sc, mn;
        k4_scale_min(s + 4, j, &sc, &mn);
        const float scale = __fmul_rn(f16_to_f32(ld_u16(s)), (float)sc);
        const float min = __fmul_rn(f16_to_f32(ld_u16(s + 2)), (float)mn);
        const u8* qs = s + (Q5 ? 48 : 16) + 32 * (j >> 1) + 4 * t;
        const int shift = 4 * (j & 1);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 v = ld_u32(qs + 16 * h), bits = Q5 ? ld_u32(s + 16 + 4 * t + 16 * h) : 0u;
            a[2 * h] = pack_f16x2(value(v, bits, 0, j, shift, scale, min), value(v, bits, 1, j, shift, scale, min));
            a[2 * h + 1] = pack_f16x2(value(v, bits, 2, j, shift, scale, min), value(v, bits, 3, j, shift, scale, min));
        }
    }
};
template <> struct Tc<GGML_Q4_K> : K4Tc<false> {};
template <> struct Tc<GGML_Q5_K> : K4Tc<true> {};
// Q6_K: 32-block j = 4 h + q; its 16-element halves have their own int8 scales. The 210-byte
// super-blocks start only 2-byte aligned.
template <> struct Tc<GGML_Q6_K> {
    static constexpr int CHUNK = 210, PACKED_QB = 0;
    static constexpr bool ALIGNED = false;
    static __device__ __forceinline__ float value(u32 lo, u32 hi, int i, int shift, int q, float scale) {
        const int v = (int)(((lo >> (8 * i + shift)) & 0xF) | (((hi >> (8 * i + 2 * q)) & 3) << 4)) - 32;
        return __fmul_rn(scale, (float)v);
    }
    static __device__ __forceinline__ void octet(const u8* s, int j, int t, u32* a) {
        const int h = j >> 2, q = j & 3, shift = 4 * (q >> 1);
        const float d = f16_to_f32(ld_u16(s + 208));
#pragma unroll
        for (int p = 0; p < 2; ++p) {  // elements 16 p + 4t ..
            const u32 lo = ld_u32_a2(s + 64 * h + 32 * (q & 1) + 16 * p + 4 * t);
            const u32 hi = ld_u32_a2(s + 128 + 32 * h + 16 * p + 4 * t);
            const float scale = __fmul_rn(d, (float)(i8)s[192 + 2 * j + p]);
            a[2 * p] = pack_f16x2(value(lo, hi, 0, shift, q, scale), value(lo, hi, 1, shift, q, scale));
            a[2 * p + 1] = pack_f16x2(value(lo, hi, 2, shift, q, scale), value(lo, hi, 3, shift, q, scale));
        }
    }
};

// Bytes of one row's slot in a stage: the chunk, plus 16 of slack where a row's chunk may start
// misaligned (it is copied from the 16-byte boundary below it).
template <int T, bool G> struct TcSlot {
    static constexpr int BYTES = (Tc<T, G>::CHUNK + (Tc<T, G>::ALIGNED ? 15 : 31)) / 16 * 16;
};

// One stage's copies: the CTA's rows' chunk c (row bytes of the matvec layout) and its x chunk.
// Returns nothing; records each row's offset of its first byte within the slot in `skew`.
// The loops are shaped for the instruction count: the repacked types copy quants and scales in
// two loops (one loop over both made every warp run both branches), in whole rounds of the
// CTA's threads, and a whole chunk of x has constant divisors. SASS of the Q4_0 n8 8-warp
// kernel: ~400 -> ~140 instructions a warp per chunk here, of ~1,300. H100, 2026-12-07, same
// call (bench/results/tcmm-20261207-1950-h100-ab-v*.json): Q4_0 gate.up (28672x4096) 97.2 /
// 98.4 -> 89.8 us at 64 sequences and 67.5 -> 57.9 at one; F16 gate.up 180 -> 171 at 64;
// the 8B Q4_0 decode at 64 sequences 4,529 -> 4,642 tok/s. Tried beside it and dropped: an
// L2 bulk prefetch of each row's next 4 or 8 chunks as one run (so DRAM would see long runs
// instead of 144-byte pieces at the row stride): slower everywhere (gate.up at 64 99-105 us,
// F16 gate.up 206-222), so the pieces' DRAM pattern is not what holds the kernel back.
template <int T, bool G, int NT, int THREADS>
__device__ __forceinline__ void tc_stage(u8* ws, u16* xs, u8* skew, const u8* __restrict__ weight,
                                         i64 row_bytes, int row0, int n_rows, int n_cols, int c,
                                         const u16* __restrict__ x, int x_stride, int seq0,
                                         int n_seqs, bool weights, bool acts) {
    typedef Tc<T, G> P;
    constexpr int SLOT = TcSlot<T, G>::BYTES, WORDS = SLOT / 16;
    const int elems = min(TC_KC, n_cols - c * TC_KC);
    if (weights) {
        if constexpr (P::PACKED_QB > 0) {
            constexpr int QWORDS = 8 * P::PACKED_QB / 16;  // quant words of a full chunk
            const int n_blocks = n_cols / 32;  // 32-blocks per row
            const int q_bytes = elems / 32 * P::PACKED_QB;
            static_assert(TC_BM * QWORDS % THREADS == 0 && THREADS % QWORDS == 0, "whole rounds");
            const int w = threadIdx.x % QWORDS;  // the same word of each of this thread's rows
#pragma unroll
            for (int k = 0; k < TC_BM * QWORDS / THREADS; ++k) {
                const int r = threadIdx.x / QWORDS + k * (THREADS / QWORDS);
                const u8* row = weight + (i64)min(row0 + r, n_rows - 1) * row_bytes;
                if (16 * w < q_bytes) cp_async_16(ws + r * SLOT + 16 * w, row + (i64)c * 8 * P::PACKED_QB + 16 * w, 16);
            }
            // The chunk's scales: 16 bytes (rows are padded to 16).
            static_assert(THREADS >= TC_BM, "one scale word a thread");
            if (threadIdx.x < TC_BM) {
                const int r = threadIdx.x;
                const u8* row = weight + (i64)min(row0 + r, n_rows - 1) * row_bytes;
                cp_async_16(ws + r * SLOT + 16 * QWORDS, row + (i64)n_blocks * P::PACKED_QB + 16 * c, 16);
            }
        } else {
            for (int i = threadIdx.x; i < TC_BM * WORDS; i += THREADS) {
                const int r = i / WORDS, w = i % WORDS;
                const u8* row = weight + (i64)min(row0 + r, n_rows - 1) * row_bytes;
                u8* dst = ws + r * SLOT + 16 * w;
                const i64 first = (i64)c * P::CHUNK;  // chunk c's first byte in the row
                const int bytes = elems == TC_KC ? P::CHUNK : elems / 32 * (P::CHUNK / 8);
                const unsigned long long start = (unsigned long long)(row + first);
                const unsigned long long base = start & ~15ull;
                const int n_words = (int)((start + bytes + 15 - base) >> 4);
                // The last word reads only up to the chunk's end (src-size): never past the tensor.
                const int left = (int)(start + bytes - (base + 16 * w));
                if (w < n_words) cp_async_16(dst, (const void*)(base + 16 * w), min(16, left));
                if (w == 0) skew[r] = (u8)(start - base);
            }
        }
    }
    if (acts) {
        const u16* x0 = x + c * TC_KC;
        if (elems == TC_KC) {
            constexpr int XW = TC_KC / 8;  // 16-byte words of fp16 x per sequence
            static_assert(NT * 8 * XW % THREADS == 0 && THREADS % XW == 0, "whole rounds");
            const int w = threadIdx.x % XW;
#pragma unroll
            for (int k = 0; k < NT * 8 * XW / THREADS; ++k) {
                const int b = threadIdx.x / XW + k * (THREADS / XW);
                cp_async_16(xs + b * TC_XS + 8 * w, x0 + (i64)min(seq0 + b, n_seqs - 1) * x_stride + 8 * w, 16);
            }
        } else {
            const int words = elems / 8;
            for (int i = threadIdx.x; i < NT * 8 * words; i += THREADS) {
                const int b = i / words, w = i % words;
                cp_async_16(xs + b * TC_XS + 8 * w, x0 + (i64)min(seq0 + b, n_seqs - 1) * x_stride + 8 * w, 16);
            }
        }
    }
}

// WN: warps along the sequences. With WN = 2 the CTA has 8 warps, warp w taking row group
// w % 4 and n tiles (w / 4) NT/2 .. : each warp's rows are decoded by two warps (twice the
// dequantisation ALU work) and the SM holds twice the warps to hide the latencies with. An
// output element is the same mmas over the same K in the same order either way: the bits do
// not depend on WN.
template <int T, bool G, int NT, int WN>
__device__ __forceinline__ void tcmm_impl(
    float* y, int y_stride, const u8* __restrict__ weight, i64 row_bytes, const u16* __restrict__ x,
    int x_stride, int n_seqs, int n_rows, int n_cols, const float* __restrict__ bias,
    const float* residual, int residual_stride, int swiglu, int y_half, float* partials,
    int* tickets) {
    typedef Tc<T, G> P;
    constexpr int SLOT = TcSlot<T, G>::BYTES;
    constexpr int W_STAGE = TC_BM * SLOT, X_STAGE = NT * 8 * TC_XS * 2;
    extern __shared__ __align__(16) u8 smem[];
    // Stage s: weights at s * W_STAGE, x at 2 * W_STAGE + s * X_STAGE (pointer arithmetic, not
    // arrays indexed at run time: those would live on the stack).
#define TC_W(s) (smem + (s) * W_STAGE)
#define TC_X(s) ((u16*)(smem + 2 * W_STAGE + (s) * X_STAGE))
    __shared__ u8 skew[2][TC_BM];
    __shared__ int last_flag;

    const int row0 = blockIdx.x * TC_BM, seq0 = blockIdx.y * NT * 8;
    const int n_chunks = (n_cols + TC_KC - 1) / TC_KC, n_splits = gridDim.z;
    const int per_split = (n_chunks + n_splits - 1) / n_splits;
    const int c0 = blockIdx.z * per_split, c1 = min(n_chunks, c0 + per_split);
    constexpr int THREADS = TC_THREADS * WN, NTW = NT / WN;  // n tiles per warp
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int warp = (threadIdx.x >> 5) % TC_WARPS, n_base = (threadIdx.x >> 5) / TC_WARPS * NTW;

    // The weights are constants: their first chunk is requested before the grid wait.
    if (c0 < c1)
        tc_stage<T, G, NT, THREADS>(TC_W(0), TC_X(0), skew[0], weight, row_bytes, row0, n_rows, n_cols, c0, x,
                           x_stride, seq0, n_seqs, true, false);
    grid_dependency_sync();
    if (c0 < c1)
        tc_stage<T, G, NT, THREADS>(TC_W(0), TC_X(0), skew[0], weight, row_bytes, row0, n_rows, n_cols, c0, x,
                           x_stride, seq0, n_seqs, false, true);
    cp_async_commit();

    float acc[TC_MT][NTW][4];
#pragma unroll
    for (int m = 0; m < TC_MT; ++m)
#pragma unroll
        for (int n = 0; n < NTW; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][n][e] = 0.0f;

    for (int c = c0; c < c1; ++c) {
        const int cur = (c - c0) & 1;
        if (c + 1 < c1)
            tc_stage<T, G, NT, THREADS>(TC_W(cur ^ 1), TC_X(cur ^ 1), skew[cur ^ 1], weight, row_bytes, row0,
                               n_rows, n_cols, c + 1, x, x_stride, seq0, n_seqs, true, true);
        cp_async_commit();
        cp_async_wait<1>();  // this chunk's copies (the next chunk's stay in flight)
        __syncthreads();
        const u8* rows[TC_MT][2];
#pragma unroll
        for (int m = 0; m < TC_MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = warp * 16 * TC_MT + 16 * m + g + 8 * h;
                rows[m][h] = TC_W(cur) + r * SLOT + (P::ALIGNED || P::PACKED_QB ? 0 : skew[cur][r]);
            }
        const u16* xs = TC_X(cur);
        const int n32 = min(TC_KC, n_cols - c * TC_KC) / 32;  // K is whole 32-blocks
        for (int blk0 = 0; blk0 < n32; blk0 += TC_UNROLL)
#pragma unroll
        for (int u = 0; u < TC_UNROLL; ++u) {
            const int blk = blk0 + u;
            if (TC_UNROLL > 1 && blk >= n32) break;
            u32 a[TC_MT][2][4];  // [m tile][row g, g + 8][octet]
#pragma unroll
            for (int m = 0; m < TC_MT; ++m) {
                P::octet(rows[m][0], blk, t, a[m][0]);
                P::octet(rows[m][1], blk, t, a[m][1]);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // the block's two k16 steps: elements 16 h + 4t ..
#pragma unroll
                for (int n = 0; n < NTW; ++n) {
                    const uint2 b = *(const uint2*)(xs + (8 * (n_base + n) + g) * TC_XS + 32 * blk + 16 * h + 4 * t);
#pragma unroll
                    for (int m = 0; m < TC_MT; ++m) {
                        const u32 frag[4] = {a[m][0][2 * h], a[m][1][2 * h], a[m][0][2 * h + 1],
                                             a[m][1][2 * h + 1]};
                        mma_16816(acc[m][n], frag, b.x, b.y);
                    }
                }
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    cp_async_wait<0>();
#undef TC_W
#undef TC_X

    // The CTA's sums through shared memory, [sequence][row], so the stores below run along rows.
    constexpr int CS = TC_BM + 4;
    float* ct = (float*)smem;
#pragma unroll
    for (int m = 0; m < TC_MT; ++m)
#pragma unroll
        for (int n = 0; n < NTW; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = warp * 16 * TC_MT + 16 * m + g + 8 * (e >> 1);
                const int b = 8 * (n_base + n) + 2 * t + (e & 1);
                ct[b * CS + r] = acc[m][n][e];
            }
    __syncthreads();
    const int n_tile_seqs = min(NT * 8, n_seqs - seq0), n_tile_rows = min(TC_BM, n_rows - row0);
    if (n_splits > 1) {  // this split's partials; the last CTA of the tile adds them in order
        for (int i = threadIdx.x; i < n_tile_seqs * TC_BM; i += THREADS) {
            const int b = i / TC_BM, r = i % TC_BM;
            if (r < n_tile_rows)
                partials[((i64)blockIdx.z * n_seqs + seq0 + b) * n_rows + row0 + r] = ct[b * CS + r];
        }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) {
            int* ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
            last_flag = atomicAdd(ticket, 1) == n_splits - 1;
            if (last_flag) *ticket = 0;  // ready for the next launch
        }
        __syncthreads();
        if (!last_flag) return;
        __threadfence();
        for (int i = threadIdx.x; i < n_tile_seqs * TC_BM; i += THREADS) {
            const int b = i / TC_BM, r = i % TC_BM;
            if (r < n_tile_rows) {
                float v = 0.0f;
                for (int s = 0; s < n_splits; ++s)
                    v += __ldcg(partials + ((i64)s * n_seqs + seq0 + b) * n_rows + row0 + r);
                ct[b * CS + r] = v;
            }
        }
        __syncthreads();
    }
    if (swiglu) {  // rows interleaved gate, up: y[b, row / 2] = silu(gate) * up
        for (int i = threadIdx.x; i < n_tile_seqs * (TC_BM / 2); i += THREADS) {
            const int b = i / (TC_BM / 2), p = i % (TC_BM / 2);
            if (2 * p + 1 < n_tile_rows) {
                const float gate = ct[b * CS + 2 * p], up = ct[b * CS + 2 * p + 1];
                const float v = gate / (1.0f + expf(-gate)) * up;
                const i64 at = (i64)(seq0 + b) * y_stride + (row0 >> 1) + p;
                if (y_half)  // the down projection's fp16 input, rounded once here
                    ((u16*)y)[at] = f32_to_f16(v);
                else
                    y[at] = v;
            }
        }
        return;
    }
    for (int i = threadIdx.x; i < n_tile_seqs * TC_BM; i += THREADS) {
        const int b = i / TC_BM, r = i % TC_BM, row = row0 + r;
        if (r < n_tile_rows) {
            float v = ct[b * CS + r];
            if (bias) v += bias[row];
            if (residual) v += residual[(i64)(seq0 + b) * residual_stride + row];
            y[(i64)(seq0 + b) * y_stride + row] = v;
        }
    }
}

#define TCMM_KERNEL(NAME, T, G, NT, WN, SUFFIX)                                                   \
    extern "C" __global__ void __launch_bounds__(TC_THREADS * WN) tcmm_##NAME##_n##NT##SUFFIX(    \
        float* y, int y_stride, const u8* weight, i64 row_bytes, const u16* x, int x_stride,      \
        int n_seqs, int n_rows, int n_cols, const float* bias, const float* residual,             \
        int residual_stride, int swiglu, int y_half, float* partials, int* tickets) {             \
        tcmm_impl<T, G, NT, WN>(y, y_stride, weight, row_bytes, x, x_stride, n_seqs, n_rows,      \
                                n_cols, bias, residual, residual_stride, swiglu, y_half, partials, \
                                tickets);                                                         \
    }
// 8-warp variants (_w2) for the larger n-tile counts only (gpu/cuda/tcmm.py WARPS_N).
#define TCMM_TYPE(NAME, T, G)                                                                    \
    TCMM_KERNEL(NAME, T, G, 1, 1, ) TCMM_KERNEL(NAME, T, G, 2, 1, ) TCMM_KERNEL(NAME, T, G, 4, 1, ) \
    TCMM_KERNEL(NAME, T, G, 8, 1, ) TCMM_KERNEL(NAME, T, G, 4, 2, _w2) TCMM_KERNEL(NAME, T, G, 8, 2, _w2)

TCMM_TYPE(f16, GGML_F16, false)
TCMM_TYPE(bf16, GGML_BF16, false)
TCMM_TYPE(q4_0, GGML_Q4_0, false)
TCMM_TYPE(q4_0x4, GGML_Q4_0, true)
TCMM_TYPE(q4_1, GGML_Q4_1, false)
TCMM_TYPE(q5_0, GGML_Q5_0, false)
TCMM_TYPE(q5_1, GGML_Q5_1, false)
TCMM_TYPE(q8_0, GGML_Q8_0, false)
TCMM_TYPE(q4_k, GGML_Q4_K, false)
TCMM_TYPE(q5_k, GGML_Q5_K, false)
TCMM_TYPE(q6_k, GGML_Q6_K, false)

// fp32 rows -> fp16 rows (round to nearest), the tensor-core matmul's input; 4 elements a thread.
extern "C" __global__ void tc_to_half(u16* out, int out_stride, const float* x, int x_stride,
                                      int n_seqs, int n_cols) {
    grid_dependency_sync();
    const int quads = n_cols / 4;
    const int i = blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.y;
    if (i >= quads || b >= n_seqs) return;
    const float4 v = *(const float4*)(x + (i64)b * x_stride + 4 * i);
    uint2 h;
    h.x = pack_f16x2(v.x, v.y);
    h.y = pack_f16x2(v.z, v.w);
    *(uint2*)(out + (i64)b * out_stride + 4 * i) = h;
}
