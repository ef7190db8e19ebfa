// RoPE on the Q and K heads of a fused QKV row, fused with the paged KV write.
// qkv[t] = [q heads | k heads | v heads] (float32, head_dim each). Q is rotated in place;
// K (rotated) and V are written to the caches at slot_mapping[t] (block * block_size + offset;
// a negative slot is a padding token and writes nothing). Caches are
// [num_blocks, block_size, n_kv_heads, head_dim] of float32 or fp16.
// Pair i (i < rot_dim / 2) turns by position * inv_freq[i]: "normal" pairs are (2i, 2i + 1),
// NeoX pairs (i, i + rot_dim / 2); features from rot_dim on pass through (partial rotary).
// Not built with fast math: cosf/sinf of angles up to ~1e5 rad must match torch's.
#include "common.cuh"

template <typename CacheT, bool NEOX>
__device__ __forceinline__ void rope_kv_impl(float* qkv, int qkv_stride, const i64* positions,
                                             const i64* slot_mapping, const float* inv_freq,
                                             CacheT* k_cache, CacheT* v_cache, int n_heads,
                                             int n_kv_heads, int head_dim, int rot_dim) {
    const i64 t = blockIdx.x;
    float* row = qkv + t * qkv_stride;
    const float pos = (float)positions[t];
    const i64 slot = slot_mapping[t];
    const int half = rot_dim / 2;
    const int kv_row = n_kv_heads * head_dim;
    // Rotations: every (head, pair) of the Q and K heads.
    for (int idx = threadIdx.x; idx < (n_heads + n_kv_heads) * half; idx += blockDim.x) {
        const int head = idx / half, i = idx % half;
        const int a = NEOX ? i : 2 * i, b = NEOX ? i + half : 2 * i + 1;
        float* h = row + head * head_dim;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        const float x1 = h[a], x2 = h[b];
        const float r1 = x1 * c - x2 * s, r2 = x2 * c + x1 * s;
        if (head < n_heads) {
            h[a] = r1;
            h[b] = r2;
        } else if (slot >= 0) {
            CacheT* k = k_cache + slot * kv_row + (head - n_heads) * head_dim;
            store_kv(k + a, r1);
            store_kv(k + b, r2);
        }
    }
    if (slot < 0) return;
    // K's pass-through features and all of V.
    const float* k_src = row + n_heads * head_dim;
    const float* v_src = k_src + kv_row;
    const int pass = head_dim - rot_dim;
    for (int idx = threadIdx.x; idx < n_kv_heads * pass; idx += blockDim.x) {
        const int e = (idx / pass) * head_dim + rot_dim + idx % pass;
        store_kv(k_cache + slot * kv_row + e, k_src[e]);
    }
    for (int e = threadIdx.x; e < kv_row; e += blockDim.x) store_kv(v_cache + slot * kv_row + e, v_src[e]);
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
