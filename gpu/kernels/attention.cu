// Decode attention over the paged KV cache: one new query token per sequence.
//
// One CTA per (kv head, sequence, split): it serves all G = n_heads / n_kv_heads query heads that
// share the kv head (GQA), so each K/V element is read once per CTA. Warps take the split's
// tokens round-robin and keep, per query head, an online softmax (running max m, denominator l,
// unnormalised output acc) in base 2 (q is pre-scaled by scale * log2(e)); lanes split head_dim.
// The warps' states are combined in shared memory in warp order.
//
// Split-K: a sequence's context is cut into fixed partitions of `partition_tokens` tokens, one per
// blockIdx.z. With one split the CTA writes the normalised output; with several it writes its
// (m, l, acc) and attention_reduce combines the splits in order. The partition size never depends
// on the other sequences, and a lone split goes through the reduce with factors exp2(0) = 1 and
// + 0 terms, so a sequence's output is bit-identical whatever else is in the batch.
#include "common.cuh"

#define ATTN_WARPS 4
#define MAX_G 8      // query heads per kv head
#define MAX_D 256    // head_dim
#define D_PER_LANE (MAX_D / 32)
#define LOG2E 1.4426950408889634f
#define NEG_INF (-__int_as_float(0x7f800000))  // no <cmath> under NVRTC: no INFINITY macro

template <typename CacheT>
__device__ __forceinline__ void attention_decode_impl(
    float* out, int out_stride, const float* q, int q_stride, const CacheT* k_cache,
    const CacheT* v_cache, const int* block_tables, int block_table_stride, const i64* context_lens,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float scale, int partition_tokens,
    float* partial_out, float* partial_ml) {
    __shared__ float q_s[MAX_G * MAX_D];
    __shared__ float warp_acc[ATTN_WARPS][MAX_G * MAX_D];
    __shared__ float warp_ml[ATTN_WARPS][MAX_G][2];
    const int kv_head = blockIdx.x, seq = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int G = n_heads / n_kv_heads;
    const int context = (int)context_lens[seq];
    const int start = split * partition_tokens;
    const int end = min(context, start + partition_tokens);
    const float* q_seq = q + (i64)seq * q_stride + kv_head * G * head_dim;
    for (int i = threadIdx.x; i < G * head_dim; i += blockDim.x) q_s[i] = q_seq[i] * (scale * LOG2E);
    __syncthreads();

    float m[MAX_G], l[MAX_G], acc[MAX_G][D_PER_LANE];
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) acc[g][i] = 0.0f;
    }
    const int* table = block_tables + (i64)seq * block_table_stride;
    const i64 token_stride = (i64)n_kv_heads * head_dim;
    // K/V of the warp's next token are loaded before this token's math: one load latency per
    // token otherwise (measured: ~1 us per token, which made decode attention latency-bound).
    float k_next[D_PER_LANE], v_next[D_PER_LANE];
    auto load_token = [&](int t, float* k, float* v) {
        const i64 slot = (i64)table[t / block_size] * block_size + t % block_size;
        const CacheT* k_tok = k_cache + slot * token_stride + kv_head * head_dim;
        const CacheT* v_tok = v_cache + slot * token_stride + kv_head * head_dim;
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            k[i] = d < head_dim ? load_kv(k_tok + d) : 0.0f;
            v[i] = d < head_dim ? load_kv(v_tok + d) : 0.0f;
        }
    };
    if (start + warp < end) load_token(start + warp, k_next, v_next);
    for (int t = start + warp; t < end; t += ATTN_WARPS) {
        float k[D_PER_LANE], v[D_PER_LANE];
#pragma unroll
        for (int i = 0; i < D_PER_LANE; ++i) {
            k[i] = k_next[i];
            v[i] = v_next[i];
        }
        if (t + ATTN_WARPS < end) load_token(t + ATTN_WARPS, k_next, v_next);
#pragma unroll
        for (int g = 0; g < MAX_G; ++g) {
            if (g < G) {
                float s = 0.0f;
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) {
                    const int d = lane + 32 * i;
                    if (d < head_dim) s += q_s[g * head_dim + d] * k[i];
                }
                s = warp_sum(s);
                const float m_new = fmaxf(m[g], s);
                const float correction = exp2f(m[g] - m_new);  // exp2(-inf) = 0 on the first token
                const float p = exp2f(s - m_new);
                l[g] = l[g] * correction + p;
#pragma unroll
                for (int i = 0; i < D_PER_LANE; ++i) acc[g][i] = acc[g][i] * correction + p * v[i];
                m[g] = m_new;
            }
        }
    }
#pragma unroll
    for (int g = 0; g < MAX_G; ++g) {
        if (g < G) {
            if (lane == 0) {
                warp_ml[warp][g][0] = m[g];
                warp_ml[warp][g][1] = l[g];
            }
#pragma unroll
            for (int i = 0; i < D_PER_LANE; ++i) {
                const int d = lane + 32 * i;
                if (d < head_dim) warp_acc[warp][g * head_dim + d] = acc[g][i];
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < G * head_dim; idx += blockDim.x) {
        const int g = idx / head_dim, d = idx % head_dim;
        float m_all = NEG_INF;
        for (int w = 0; w < ATTN_WARPS; ++w) m_all = fmaxf(m_all, warp_ml[w][g][0]);
        float l_all = 0.0f, o = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) {
            // A warp that saw no token has l = 0 and m = -inf: it adds nothing (no inf - inf).
            const float f = warp_ml[w][g][1] > 0.0f ? exp2f(warp_ml[w][g][0] - m_all) : 0.0f;
            l_all += warp_ml[w][g][1] * f;
            o += warp_acc[w][idx] * f;
        }
        const int head = kv_head * G + g;
        if (n_splits == 1) {
            out[(i64)seq * out_stride + head * head_dim + d] = o / l_all;
        } else {
            const i64 part = ((i64)seq * n_heads + head) * n_splits + split;
            partial_out[part * head_dim + d] = o;
            if (d == 0) {
                partial_ml[2 * part] = m_all;
                partial_ml[2 * part + 1] = l_all;
            }
        }
    }
}

// Combine the splits of each (sequence, query head), in split order. grid (n_heads, B).
extern "C" __global__ void attention_reduce(float* out, int out_stride, const float* partial_out,
                                            const float* partial_ml, int n_heads, int head_dim,
                                            int n_splits) {
    const int head = blockIdx.x, seq = blockIdx.y;
    const i64 first = ((i64)seq * n_heads + head) * n_splits;
    float m_all = NEG_INF;
    for (int s = 0; s < n_splits; ++s)
        if (partial_ml[2 * (first + s) + 1] > 0.0f) m_all = fmaxf(m_all, partial_ml[2 * (first + s)]);
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float l_all = 0.0f, o = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            const float l = partial_ml[2 * (first + s) + 1];
            const float f = l > 0.0f ? exp2f(partial_ml[2 * (first + s)] - m_all) : 0.0f;
            l_all += l * f;
            o += partial_out[(first + s) * head_dim + d] * f;
        }
        out[(i64)seq * out_stride + head * head_dim + d] = o / l_all;
    }
}

#define ATTENTION_DECODE(NAME, CACHE_T)                                                            \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) attention_decode_##NAME(        \
        float* out, int out_stride, const float* q, int q_stride, const CACHE_T* k_cache,         \
        const CACHE_T* v_cache, const int* block_tables, int block_table_stride,                  \
        const i64* context_lens, int n_heads, int n_kv_heads, int head_dim, int block_size,       \
        float scale, int partition_tokens, float* partial_out, float* partial_ml) {               \
        attention_decode_impl<CACHE_T>(out, out_stride, q, q_stride, k_cache, v_cache,            \
                                       block_tables, block_table_stride, context_lens, n_heads,   \
                                       n_kv_heads, head_dim, block_size, scale, partition_tokens, \
                                       partial_out, partial_ml);                                  \
    }

ATTENTION_DECODE(f32, float)
ATTENTION_DECODE(f16, u16)
