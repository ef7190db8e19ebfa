// GGUF tensor block layouts (ggml-common.h), read in place: orcd keeps weights on the GPU in the
// exact byte layout of the file (rows of blocks laid end to end, little-endian), so loading is a
// plain copy and the torch dequantiser (loader/quants.py) is a bit-exact reference for every
// value decoded here. The price: Q4_0/Q5_0/Q8_0/Q6_K blocks are 18/22/34/210 bytes, so only
// 2-byte alignment is guaranteed and those types are read with 2-byte loads; Q4_1/Q5_1 allow
// 4-byte loads; Q4_K/Q5_K (144/176 bytes) and F16/BF16 rows allow 16-byte loads.
//
// One exception, made at load (gpu/cuda/matvec.py pack_rows): matvec weights of Q4_0 and Q8_0 are
// repacked per row into a separated layout, so that their quants can be read with aligned loads:
//
//   row = [quants of block 0 | quants of block 1 | ... ] [d of block 0 | d of block 1 | ...] [pad]
//          16 (Q4_0) or 32 (Q8_0) bytes per block           2 bytes (fp16) per block    to 16 bytes
//
// Q4_0 rows of a multiple of 128 columns go one step further: within each group of 4 blocks (64
// quant bytes) the bytes are lane-major, lane j's 4-byte slices of blocks 0..3 together at
// 16j, so a lane reads its share of 4 blocks with one 16-byte load (matvec.cu q4_0x4).
// Each block's bytes are unchanged, only moved; rows are padded to a multiple of 16 bytes (no pad
// when the row has a multiple of 8 blocks, i.e. 256 columns) so every row's quants start 16-byte
// aligned and a packed row is still a valid row to concatenate (fused QKV / gate-up). In the GGUF
// layout an 18- or 34-byte block leaves its quants only 2-byte aligned (2-byte loads, well short
// of the copy bandwidth; bench/NOTES.md, "Kernel notes"). The embedding table (only gathered, by embedding.cu) keeps the GGUF
// layout, as does dequant_group below.
//
// NVRTC quirk: the NVRTC wheel ships no headers (not even <cstdint> or <cuda_fp16.h>), so this
// file is self-contained: fixed-width integer names and the fp16/bf16 conversions are our own.
#pragma once

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// GGML type ids (gguf.GGMLQuantizationType); kernels are templated on these.
#define GGML_F32 0
#define GGML_F16 1
#define GGML_Q4_0 2
#define GGML_Q4_1 3
#define GGML_Q5_0 6
#define GGML_Q5_1 7
#define GGML_Q8_0 8
#define GGML_Q4_K 12
#define GGML_Q5_K 13
#define GGML_Q6_K 14
#define GGML_BF16 30

#define QK_K 256

__device__ __forceinline__ float f16_to_f32(u16 bits) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(f));
    return bits;
}

__device__ __forceinline__ float bf16_to_f32(u16 bits) { return __uint_as_float((u32)bits << 16); }

__device__ __forceinline__ u16 ld_u16(const u8* p) { return *(const u16*)p; }
// Two 2-byte loads: for fields that are only 2-aligned (most legacy blocks).
__device__ __forceinline__ u32 ld_u32_a2(const u8* p) {
    return (u32)ld_u16(p) | ((u32)ld_u16(p + 2) << 16);
}
__device__ __forceinline__ u32 ld_u32(const u8* p) { return *(const u32*)p; }

// Block structs: documentation and size checks; kernels index raw bytes at these offsets.
struct block_q4_0 { u16 d; u8 qs[16]; };                      // w = d * (q - 8)
struct block_q4_1 { u16 d; u16 m; u8 qs[16]; };               // w = d * q + m
struct block_q5_0 { u16 d; u8 qh[4]; u8 qs[16]; };            // w = d * (q - 16)
struct block_q5_1 { u16 d; u16 m; u8 qh[4]; u8 qs[16]; };     // w = d * q + m
struct block_q8_0 { u16 d; i8 qs[32]; };                      // w = d * q
struct block_q4_K { u16 d; u16 dmin; u8 scales[12]; u8 qs[128]; };
struct block_q5_K { u16 d; u16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; };
struct block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; u16 d; };
static_assert(sizeof(block_q4_0) == 18, "q4_0");
static_assert(sizeof(block_q4_1) == 20, "q4_1");
static_assert(sizeof(block_q5_0) == 22, "q5_0");
static_assert(sizeof(block_q5_1) == 24, "q5_1");
static_assert(sizeof(block_q8_0) == 34, "q8_0");
static_assert(sizeof(block_q4_K) == 144, "q4_K");
static_assert(sizeof(block_q5_K) == 176, "q5_K");
static_assert(sizeof(block_q6_K) == 210, "q6_K");

// Elements and bytes per block of each type.
template <int T> struct QTraits;
template <> struct QTraits<GGML_F32> { static constexpr int ELEMS = 1, BYTES = 4; };
template <> struct QTraits<GGML_F16> { static constexpr int ELEMS = 1, BYTES = 2; };
template <> struct QTraits<GGML_BF16> { static constexpr int ELEMS = 1, BYTES = 2; };
template <> struct QTraits<GGML_Q4_0> { static constexpr int ELEMS = 32, BYTES = 18; };
template <> struct QTraits<GGML_Q4_1> { static constexpr int ELEMS = 32, BYTES = 20; };
template <> struct QTraits<GGML_Q5_0> { static constexpr int ELEMS = 32, BYTES = 22; };
template <> struct QTraits<GGML_Q5_1> { static constexpr int ELEMS = 32, BYTES = 24; };
template <> struct QTraits<GGML_Q8_0> { static constexpr int ELEMS = 32, BYTES = 34; };
template <> struct QTraits<GGML_Q4_K> { static constexpr int ELEMS = QK_K, BYTES = 144; };
template <> struct QTraits<GGML_Q5_K> { static constexpr int ELEMS = QK_K, BYTES = 176; };
template <> struct QTraits<GGML_Q6_K> { static constexpr int ELEMS = QK_K, BYTES = 210; };

// Matvec layout of a type: QBYTES = quant bytes per block in the separated layout above, 0 for
// types read in place.
template <int T> struct Packed { static constexpr int QBYTES = 0; };
template <> struct Packed<GGML_Q4_0> { static constexpr int QBYTES = 16; };
template <> struct Packed<GGML_Q8_0> { static constexpr int QBYTES = 32; };

// Q4_K/Q5_K: 6-bit scale and min of 32-element sub-block j from the 12 packed bytes
// (ggml's get_scale_min_k4). j < 4: low 6 bits of bytes j and j + 4; j >= 4: low/high nibble
// of byte j + 4 plus the spare top 2 bits of bytes j - 4 (scale) and j (min).
__device__ __forceinline__ void k4_scale_min(const u8* scales, int j, int* sc, int* mn) {
    if (j < 4) {
        *sc = scales[j] & 63;
        *mn = scales[j + 4] & 63;
    } else {
        *sc = (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4);
        *mn = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
    }
}

// The 32 values of group g (elements 32g .. 32g + 31) of a row, exactly as loader/quants.py
// computes them: __fmul_rn/__fadd_rn keep the compiler from contracting d * q + m into an fma,
// which would round differently from the reference.
template <int T> __device__ __forceinline__ void dequant_group(const u8* row, int g, float* out);

template <> __device__ __forceinline__ void dequant_group<GGML_F32>(const u8* row, int g, float* out) {
    const float* p = (const float*)row + 32 * g;
    for (int i = 0; i < 32; ++i) out[i] = p[i];
}
template <> __device__ __forceinline__ void dequant_group<GGML_F16>(const u8* row, int g, float* out) {
    const u16* p = (const u16*)row + 32 * g;
    for (int i = 0; i < 32; ++i) out[i] = f16_to_f32(p[i]);
}
template <> __device__ __forceinline__ void dequant_group<GGML_BF16>(const u8* row, int g, float* out) {
    const u16* p = (const u16*)row + 32 * g;
    for (int i = 0; i < 32; ++i) out[i] = bf16_to_f32(p[i]);
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q4_0>(const u8* row, int g, float* out) {
    const u8* b = row + 18 * g;
    const float d = f16_to_f32(ld_u16(b));
    for (int i = 0; i < 16; ++i) {
        const u8 q = b[2 + i];
        out[i] = __fmul_rn(d, (float)(q & 0xF) - 8.0f);
        out[i + 16] = __fmul_rn(d, (float)(q >> 4) - 8.0f);
    }
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q4_1>(const u8* row, int g, float* out) {
    const u8* b = row + 20 * g;
    const float d = f16_to_f32(ld_u16(b)), m = f16_to_f32(ld_u16(b + 2));
    for (int i = 0; i < 16; ++i) {
        const u8 q = b[4 + i];
        out[i] = __fadd_rn(__fmul_rn(d, (float)(q & 0xF)), m);
        out[i + 16] = __fadd_rn(__fmul_rn(d, (float)(q >> 4)), m);
    }
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q5_0>(const u8* row, int g, float* out) {
    const u8* b = row + 22 * g;
    const float d = f16_to_f32(ld_u16(b));
    const u32 qh = ld_u32_a2(b + 2);  // bit i is bit 4 of weight i
    for (int i = 0; i < 16; ++i) {
        const u8 q = b[6 + i];
        out[i] = __fmul_rn(d, (float)((q & 0xF) | (((qh >> i) & 1) << 4)) - 16.0f);
        out[i + 16] = __fmul_rn(d, (float)((q >> 4) | (((qh >> (i + 16)) & 1) << 4)) - 16.0f);
    }
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q5_1>(const u8* row, int g, float* out) {
    const u8* b = row + 24 * g;
    const float d = f16_to_f32(ld_u16(b)), m = f16_to_f32(ld_u16(b + 2));
    const u32 qh = ld_u32(b + 4);
    for (int i = 0; i < 16; ++i) {
        const u8 q = b[8 + i];
        out[i] = __fadd_rn(__fmul_rn(d, (float)((q & 0xF) | (((qh >> i) & 1) << 4))), m);
        out[i + 16] = __fadd_rn(__fmul_rn(d, (float)((q >> 4) | (((qh >> (i + 16)) & 1) << 4))), m);
    }
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q8_0>(const u8* row, int g, float* out) {
    const u8* b = row + 34 * g;
    const float d = f16_to_f32(ld_u16(b));
    for (int i = 0; i < 32; ++i) out[i] = __fmul_rn((float)(i8)b[2 + i], d);
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q4_K>(const u8* row, int g, float* out) {
    const u8* b = row + 144 * (g >> 3);
    const int j = g & 7;
    int sc, mn;
    k4_scale_min(b + 4, j, &sc, &mn);
    const float scale = __fmul_rn(f16_to_f32(ld_u16(b)), (float)sc);
    const float min = __fmul_rn(f16_to_f32(ld_u16(b + 2)), (float)mn);
    const u8* qs = b + 16 + 32 * (j >> 1);  // chunk j/2 holds sub-block j in its low (even j) or high nibbles
    const int shift = 4 * (j & 1);
    for (int l = 0; l < 32; ++l) out[l] = __fsub_rn(__fmul_rn(scale, (float)((qs[l] >> shift) & 0xF)), min);
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q5_K>(const u8* row, int g, float* out) {
    const u8* b = row + 176 * (g >> 3);
    const int j = g & 7;
    int sc, mn;
    k4_scale_min(b + 4, j, &sc, &mn);
    const float scale = __fmul_rn(f16_to_f32(ld_u16(b)), (float)sc);
    const float min = __fmul_rn(f16_to_f32(ld_u16(b + 2)), (float)mn);
    const u8* qh = b + 16;  // bit j of qh[l] is bit 4 of element l of sub-block j
    const u8* qs = b + 48 + 32 * (j >> 1);
    const int shift = 4 * (j & 1);
    for (int l = 0; l < 32; ++l) {
        const int q = ((qs[l] >> shift) & 0xF) | (((qh[l] >> j) & 1) << 4);
        out[l] = __fsub_rn(__fmul_rn(scale, (float)q), min);
    }
}
template <> __device__ __forceinline__ void dequant_group<GGML_Q6_K>(const u8* row, int g, float* out) {
    // Group j = 4h + s of a super-block: half h, quarter s. Element l takes its low 4 bits from
    // nibble s/2 of ql[64h + 32(s%2) + l] and bits 4-5 from bits 2s..2s+1 of qh[32h + l];
    // stored + 32; the int8 scale is per 16 elements.
    const u8* b = row + 210 * (g >> 3);
    const int j = g & 7, h = j >> 2, s = j & 3;
    const float d = f16_to_f32(ld_u16(b + 208));
    const u8* ql = b + 64 * h + 32 * (s & 1);
    const u8* qh = b + 128 + 32 * h;
    const int shift = 4 * (s >> 1);
    for (int l = 0; l < 32; ++l) {
        const int q = (((ql[l] >> shift) & 0xF) | (((qh[l] >> (2 * s)) & 3) << 4)) - 32;
        const float scale = __fmul_rn(d, (float)(i8)b[192 + 2 * j + (l >> 4)]);
        out[l] = __fmul_rn(scale, (float)q);
    }
}
