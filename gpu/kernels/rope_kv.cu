// RoPE on the Q and K heads of a fused QKV row, fused with the paged KV write.
// qkv[t] = [q heads | k heads | v heads] (float32, head_dim each). Q is rotated in place;
// K (rotated) and V are written to the caches at slot_mapping[t] (block * block_size + offset;
// a negative slot is a padding token and writes nothing). Caches are
// [num_blocks, block_size, n_kv_heads, head_dim] of float32 or fp16.
// Pair i (i < rot_dim / 2) turns by position * inv_freq[i]: "normal" pairs are (2i, 2i + 1),
// NeoX pairs (i, i + rot_dim / 2); features from rot_dim on pass through (partial rotary).
//
// One CTA per (token, head of q | k | v), a thread per pair: a decode step's work is spread over
// the SMs, one round of loads per thread (a CTA per token would loop over all 40 heads of an 8B
// model on one SM; bench/NOTES.md, "Kernel notes").
// Not built with fast math: cosf/sinf of angles up to ~1e5 rad must match torch's.
#include "common.cuh"

template <typename CacheT, bool NEOX>
__device__ __forceinline__ void rope_kv_impl(float* qkv, int qkv_stride, const i64* positions,
                                             const i64* slot_mapping, const float* inv_freq,
                                             CacheT* k_cache, CacheT* v_cache, int n_heads,
                                             int n_kv_heads, int head_dim, int rot_dim) {
    grid_dependency_sync();
    const i64 t = blockIdx.x;
    const int head = blockIdx.y;  // 0..n_heads + 2 * n_kv_heads - 1
    float* h = qkv + t * qkv_stride + (i64)head * head_dim;
    const i64 slot = slot_mapping[t];
    const bool is_q = head < n_heads, is_v = head >= n_heads + n_kv_heads;
    if (!is_q && slot < 0) return;  // padding token: nothing to write
    const i64 kv_row = (i64)n_kv_heads * head_dim;
    CacheT* dst = is_q ? nullptr
                       : (is_v ? v_cache + slot * kv_row + (i64)(head - n_heads - n_kv_heads) * head_dim
                               : k_cache + slot * kv_row + (i64)(head - n_heads) * head_dim);
    if (is_v) {
        for (int e = threadIdx.x; e < head_dim; e += blockDim.x) store_kv(dst + e, h[e]);
        return;
    }
    const float pos = (float)positions[t];
    const int half = rot_dim / 2;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const int a = NEOX ? i : 2 * i, b = NEOX ? i + half : 2 * i + 1;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        const float x1 = h[a], x2 = h[b];
        const float r1 = x1 * c - x2 * s, r2 = x2 * c + x1 * s;
        if (is_q) {
            h[a] = r1;
            h[b] = r2;
        } else {
            store_kv(dst + a, r1);
            store_kv(dst + b, r2);
        }
    }
    if (!is_q)  // K's pass-through features
        for (int e = rot_dim + threadIdx.x; e < head_dim; e += blockDim.x) store_kv(dst + e, h[e]);
}

#define ROPE_KV(NAME, CACHE_T, NEOX)                                                              \
    extern "C" __global__ void rope_kv_##NAME(float* qkv, int qkv_stride, const i64* positions,  \
                                              const i64* slot_mapping, const float* inv_freq,     \
                                              CACHE_T* k_cache, CACHE_T* v_cache, int n_heads,    \
                                              int n_kv_heads, int head_dim, int rot_dim) {        \
        rope_kv_impl<CACHE_T, NEOX>(qkv, qkv_stride, positions, slot_mapping, inv_freq, k_cache, \
                                    v_cache, n_heads, n_kv_heads, head_dim, rot_dim);             \
    }

ROPE_KV(normal_f32, float, false)
ROPE_KV(neox_f32, float, true)
ROPE_KV(normal_f16, u16, false)
ROPE_KV(neox_f16, u16, true)
