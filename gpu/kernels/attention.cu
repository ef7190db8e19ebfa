// Decode attention over the paged KV cache: one new query token per sequence.
//
// A sequence's context is cut into splits of ATTN_PARTITION = 64 tokens. One CTA per (kv head,
// sequence, run of splits_per_cta consecutive splits: blockIdx.z); it walks its run's live
// splits in order. It serves all G = n_heads / n_kv_heads query heads that share the kv head
// (GQA), so each K/V element is read once. q (pre-scaled by scale * log2(e)) goes to shared
// memory once per CTA; then, per split, threads work on tokens in parallel, in three phases:
//   1. LANES consecutive threads ("a row group") hold one token's K and V row, 8 elements (16
//      bytes of fp16) per lane; the CTA's RG row groups take tokens gi, gi + RG, ... of the split
//      (64 / RG tokens each). Each lane dots its K slice with the 8 matching elements of every
//      query head (q in shared memory), the row group sums over its lanes with xor shuffles, the
//      scores go to shared memory.
//   2. Per query head, one warp takes the max over the split's 64 scores, p = exp2(s - max) and
//      their sum (warp shuffles in a fixed pattern).
//   3. P·V: each lane accumulates p * V over its tokens for its 8 dims (registers from phase 1);
//      the row groups of a warp are added with xor shuffles, then the warps in shared memory in
//      warp order.
// Software pipeline, in the registers of phase 1: the first split's K and V loads are issued
// before q is staged; the next split's K loads are issued as soon as phase 1 has read this
// split's K (they fly during phases 2 and 3), its V loads as soon as phase 3 has read this
// split's V (they fly during the sums and the next split's phases 1 and 2).
// LANES = head_dim / 8 rounded up to 8, 16 or 32 (a template); RG = 512 / LANES up to 32 row
// groups, so a CTA has 256 or 512 threads and each thread 2 (head_dim <= 128) or 4 tokens: each
// warp issues few dependent instructions per split (bench/NOTES.md, "Kernel notes").
//
// Split-K: with one split in the whole launch (n_splits == 1) the CTA writes the normalised
// output; with several, every live split's (m, l, acc) goes to the workspace slot of that split,
// each CTA takes one ticket from its (sequence, kv head) counter, and the last of the pair's
// CTAs to arrive combines the live splits in split order (attention_combine_last), so no
// separate reduce kernel (and no graph node per layer for one) is needed. A split's (m, l, acc)
// is the same arithmetic whichever CTA computes it and whatever it computed before, the
// partition size never depends on the other sequences, and a lone split goes through the reduce
// with factors exp2(0) = 1 and + 0 terms: a sequence's output is bit-identical whatever else is
// in the batch and however many splits a CTA walks (the combine reads only the sequence's live
// splits, in order, whichever CTA does it). Every sum above has a fixed order that depends only
// on the token's position in its split.
#include "common.cuh"

#define ATTN_PARTITION 64  // PARTITION_TOKENS in gpu/cuda/attention.py
#define MAX_G 8            // query heads per kv head
#define RED_FLOATS 4096    // shared floats for the phase-3 sums (16 KiB)
#ifndef ATTN_MIN_BLOCKS  // tunable: gpu/cuda/kernels.py TUNABLES
// CTAs an SM must hold at once (the register cap that follows: 65536 / (that x threads)). At 64+
// sequences the kernel is bandwidth-bound and the resident warps keep the loads coming: 3 fit
// head_dim 128 in 40 registers with a few spilled words (the pipelined K/V rows of the next
// split are live through phase 3); 2 give 64 registers and no spill. Measurements: bench/NOTES.md,
// "Decode attention".
#define ATTN_MIN_BLOCKS 3
#endif
// Only the fp16 cache at head_dim <= 128: the others spill at 40 registers (f32 rows are twice
// the registers, 32 lanes hold 4 tokens a thread), and keep 2 (<= 64 registers), or 1 for f32
// rows at 32 lanes.
template <typename CacheT, int LANES> struct MinBlocks {
    static constexpr int value = sizeof(CacheT) == 2 && LANES <= 16 ? ATTN_MIN_BLOCKS
                                 : sizeof(CacheT) == 4 && LANES == 32 ? 1 : 2;
};

// Row groups per CTA for LANES lanes per row (ATTENTION_THREADS / LANES in gpu/cuda/attention.py).
template <int LANES> struct RowGroups { static constexpr int value = 512 / LANES < 32 ? 512 / LANES : 32; };
#define LOG2E 1.4426950408889634f
#define NEG_INF (-__int_as_float(0x7f800000))  // no <cmath> under NVRTC: no INFINITY macro

// 8 consecutive cache elements of one row, kept in their storage format until used.
template <typename T> struct Row8;

template <> struct Row8<u16> {
    uint4 r;
    __device__ __forceinline__ void zero() { r = make_uint4(0u, 0u, 0u, 0u); }
    __device__ __forceinline__ void load(const u16* p, int valid, bool vec) {
        if (vec && valid >= 8) {
            r = *reinterpret_cast<const uint4*>(p);
        } else {
            u32 w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const u32 lo = 2 * i < valid ? p[2 * i] : 0u;
                const u32 hi = 2 * i + 1 < valid ? p[2 * i + 1] : 0u;
                w[i] = lo | (hi << 16);
            }
            r = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
    __device__ __forceinline__ void to_float(float* f) const {
        const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            f[2 * i] = f16_to_f32((u16)(w[i] & 0xFFFFu));
            f[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
        }
    }
};

template <> struct Row8<float> {
    float4 a, b;
    __device__ __forceinline__ void zero() {
        a = make_float4(0.f, 0.f, 0.f, 0.f);
        b = a;
    }
    __device__ __forceinline__ void load(const float* p, int valid, bool vec) {
        if (vec && valid >= 8) {
            a = reinterpret_cast<const float4*>(p)[0];
            b = reinterpret_cast<const float4*>(p)[1];
        } else {
            float f[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) f[i] = i < valid ? p[i] : 0.0f;
            a = make_float4(f[0], f[1], f[2], f[3]);
            b = make_float4(f[4], f[5], f[6], f[7]);
        }
    }
    __device__ __forceinline__ void to_float(float* f) const {
        f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
        f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    }
};

// Arrive at the (sequence, kv head) counter; the last of the pair's gridDim.z CTAs to arrive
// combines the n_splits splits for the group's query heads in split order and resets the
// counter for the next launch (graph replays and the next layer reuse it). Partials of other
// CTAs are read through L2 (__ldcg): L1 is not coherent across SMs. Splits past the context
// (l = 0) add nothing, so only live ones are read.
template <int THREADS>
__device__ __forceinline__ void attention_combine_last(
    float* out, int out_stride, const float* partial_out, const float* partial_ml, int* counters,
    int n_heads, int n_kv_heads, int head_dim, int G, int kv_head, int seq, int n_splits,
    int context) {
    __shared__ int is_last;
    __threadfence();  // this CTA's partials are visible device-wide before its ticket
    __syncthreads();
    int* counter = counters + (i64)seq * n_kv_heads + kv_head;
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1) == (int)gridDim.z - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const int n_live = (context + ATTN_PARTITION - 1) / ATTN_PARTITION;
    for (int idx = threadIdx.x; idx < G * head_dim; idx += THREADS) {
        const int head = kv_head * G + idx / head_dim, d = idx % head_dim;
        const i64 first = ((i64)seq * n_heads + head) * n_splits;
        float m_all = NEG_INF;
        for (int s = 0; s < n_live; ++s)
            if (__ldcg(partial_ml + 2 * (first + s) + 1) > 0.0f)
                m_all = fmaxf(m_all, __ldcg(partial_ml + 2 * (first + s)));
        float l_all = 0.0f, o = 0.0f;
        for (int s = 0; s < n_live; ++s) {
            const float l = __ldcg(partial_ml + 2 * (first + s) + 1);
            const float f = l > 0.0f ? exp2f(__ldcg(partial_ml + 2 * (first + s)) - m_all) : 0.0f;
            l_all += l * f;
            o += __ldcg(partial_out + (first + s) * head_dim + d) * f;
        }
        out[(i64)seq * out_stride + head * head_dim + d] = o / l_all;
    }
    if (threadIdx.x == 0) *counter = 0;
}

// Where this thread's slice of a token's K or V row lies: the block table lookup of one
// sequence and kv head, and which 8 elements of the row the lane holds.
template <typename CacheT> struct RowSlices {
    const int* table;
    int token_stride, column, block_size, valid;  // column: kv head's row start + 8 x lane
    bool vec;

    // Issue the loads of tokens first, first + STRIDE, ... (N of them) of rows, zeros at and past
    // `end` and for a lane past head_dim. Nothing waits for them here: the registers are read
    // when the caller first uses `rows`.
    template <int N, int STRIDE>
    __device__ __forceinline__ void load(Row8<CacheT> (&rows)[N], const CacheT* cache, int first,
                                         int end) const {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int t = first + STRIDE * i;
            if (t < end && valid > 0) {
                const i64 slot = (i64)table[t / block_size] * block_size + t % block_size;
                rows[i].load(cache + slot * token_stride + column, valid, vec);
            } else {
                rows[i].zero();
            }
        }
    }
};

template <typename CacheT, int LANES>
__device__ __forceinline__ void attention_decode_impl(
    float* out, int out_stride, const float* q, int q_stride, const CacheT* k_cache,
    const CacheT* v_cache, const int* block_tables, int block_table_stride, const i64* context_lens,
    int n_heads, int n_kv_heads, int head_dim, int block_size, float scale, int n_splits,
    int splits_per_cta, float* partial_out, float* partial_ml, int* counters) {
    constexpr int DP = 8 * LANES;          // head_dim padded to the lanes' 8-element slices
    constexpr int ROW_GROUPS = RowGroups<LANES>::value;
    constexpr int TOK_PER_GROUP = ATTN_PARTITION / ROW_GROUPS;
    constexpr int THREADS = ROW_GROUPS * LANES;
    constexpr int N_WARPS = THREADS / 32;
    constexpr int GC = RED_FLOATS / (N_WARPS * DP);  // query heads per phase-3 pass
    __shared__ __align__(16) float q_s[MAX_G * DP];
    __shared__ float p_s[MAX_G][ATTN_PARTITION];
    __shared__ float ml_s[MAX_G][2];
    __shared__ __align__(16) float red_s[N_WARPS][GC * DP];

    const int kv_head = blockIdx.x, seq = blockIdx.y;
    const int gi = threadIdx.x / LANES, c = threadIdx.x % LANES;
    const int G = n_heads / n_kv_heads;
    grid_dependency_sync();
    const int context = (int)context_lens[seq];
    // This CTA's splits: [first_split, live_end), the run cut at the end of the context.
    const int first_split = blockIdx.z * splits_per_cta;
    const int live_end = min(min(n_splits, first_split + splits_per_cta),
                             (context + ATTN_PARTITION - 1) / ATTN_PARTITION);

    if (first_split >= live_end) {  // past this sequence's context (graphs round the grid up)
        if (n_splits > 1)  // nothing to add; it only arrives, so that the last CTA is known
            attention_combine_last<THREADS>(out, out_stride, partial_out, partial_ml, counters,
                                            n_heads, n_kv_heads, head_dim, G, kv_head, seq,
                                            n_splits, context);
        return;
    }

    // Phase 1a: issue the first split's K/V loads (TOK_PER_GROUP tokens x 2 rows x 16 bytes).
    const RowSlices<CacheT> slices{
        block_tables + (i64)seq * block_table_stride, n_kv_heads * head_dim,
        kv_head * head_dim + 8 * c, block_size, head_dim - 8 * c,
        (head_dim % 8 == 0) && ((reinterpret_cast<unsigned long long>(k_cache) |
                                 reinterpret_cast<unsigned long long>(v_cache)) % 16 == 0)};
    Row8<CacheT> kr[TOK_PER_GROUP], vr[TOK_PER_GROUP];
    {
        const int start = first_split * ATTN_PARTITION;
        const int end = min(context, start + ATTN_PARTITION);
        slices.template load<TOK_PER_GROUP, ROW_GROUPS>(kr, k_cache, start + gi, end);
        slices.template load<TOK_PER_GROUP, ROW_GROUPS>(vr, v_cache, start + gi, end);
    }
    // q of the group, scaled, zero-padded to DP per head: once for all the CTA's splits.
    const float* q_seq = q + (i64)seq * q_stride + kv_head * G * head_dim;
    for (int i = threadIdx.x; i < MAX_G * DP; i += THREADS) {
        const int g = i / DP, d = i % DP;
        q_s[i] = (g < G && d < head_dim) ? q_seq[g * head_dim + d] * (scale * LOG2E) : 0.0f;
    }
    __syncthreads();

    for (int split = first_split; split < live_end; ++split) {
        const int start = split * ATTN_PARTITION;
        const int end = min(context, start + ATTN_PARTITION);
        const bool has_next = split + 1 < live_end;
        const int next_end = min(context, start + 2 * ATTN_PARTITION);

        // Phase 1b: scores (base 2) of the row group's tokens for every query head.
#pragma unroll
        for (int i = 0; i < TOK_PER_GROUP; ++i) {
            float k[8];
            kr[i].to_float(k);
            const int t_local = gi + ROW_GROUPS * i;
            const bool live = start + t_local < end;
#pragma unroll
            for (int g = 0; g < MAX_G; ++g) {
                if (g < G) {
                    const float4 qa = *reinterpret_cast<const float4*>(&q_s[g * DP + 8 * c]);
                    const float4 qb = *reinterpret_cast<const float4*>(&q_s[g * DP + 8 * c + 4]);
                    float s = qa.x * k[0];
                    s = fmaf(qa.y, k[1], s);
                    s = fmaf(qa.z, k[2], s);
                    s = fmaf(qa.w, k[3], s);
                    s = fmaf(qb.x, k[4], s);
                    s = fmaf(qb.y, k[5], s);
                    s = fmaf(qb.z, k[6], s);
                    s = fmaf(qb.w, k[7], s);
#pragma unroll
                    for (int off = LANES / 2; off > 0; off >>= 1)
                        s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
                    if (c == 0) p_s[g][t_local] = live ? s : NEG_INF;
                }
            }
        }
        // The next split's K rows load while this split's softmax and P·V run.
        if (has_next)
            slices.template load<TOK_PER_GROUP, ROW_GROUPS>(kr, k_cache,
                                                            start + ATTN_PARTITION + gi, next_end);
        __syncthreads();

        // Phase 2: softmax numerators over the split, one warp per query head.
        {
            const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
            for (int g = warp; g < G; g += N_WARPS) {
                const float s0 = p_s[g][lane], s1 = p_s[g][lane + 32];
                const float m = warp_max(fmaxf(s0, s1));
                // No finite score (none can be: live_end stops at the context) gives m = -inf,
                // p = 0, l = 0 rather than NaN.
                const float p0 = m == NEG_INF ? 0.0f : exp2f(s0 - m);
                const float p1 = m == NEG_INF ? 0.0f : exp2f(s1 - m);
                const float l = warp_sum(p0 + p1);
                p_s[g][lane] = p0;
                p_s[g][lane + 32] = p1;
                if (lane == 0) {
                    ml_s[g][0] = m;
                    ml_s[g][1] = l;
                }
            }
        }
        __syncthreads();

        // Phase 3: P·V, a query head at a time (8 accumulators live, not 8 per head: the
        // register count sets how many CTAs an SM holds, and at 64+ sequences that sets the
        // bandwidth). acc[j] over this thread's tokens in order, then over the row groups of a
        // warp (same c, lanes LANES apart) in a fixed xor pattern, then over the warps in order
        // (below).
        const int warp = threadIdx.x >> 5;
        for (int g0 = 0; g0 < G; g0 += GC) {
            for (int g = g0; g < G && g < g0 + GC; ++g) {
                float acc[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[j] = 0.0f;
#pragma unroll
                for (int i = 0; i < TOK_PER_GROUP; ++i) {
                    float v[8];
                    vr[i].to_float(v);
                    const float p = p_s[g][gi + ROW_GROUPS * i];
#pragma unroll
                    for (int j = 0; j < 8; ++j) acc[j] = fmaf(p, v[j], acc[j]);
                }
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int off = 16; off >= LANES; off >>= 1)
                        acc[j] += __shfl_xor_sync(0xFFFFFFFFu, acc[j], off);
                if ((threadIdx.x & 31) < LANES) {
                    float* dst = &red_s[warp][(g - g0) * DP + 8 * c];
                    reinterpret_cast<float4*>(dst)[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
                    reinterpret_cast<float4*>(dst)[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
                }
            }
            // After the last head's sums the V rows are free: the next split's load into them
            // overlaps the sums below and the next split's phases 1 and 2.
            if (has_next && g0 + GC >= G)
                slices.template load<TOK_PER_GROUP, ROW_GROUPS>(
                    vr, v_cache, start + ATTN_PARTITION + gi, next_end);
            __syncthreads();
            for (int idx = threadIdx.x; idx < GC * DP; idx += THREADS) {
                const int g = g0 + idx / DP, d = idx % DP;
                if (g < G && d < head_dim) {
                    float o = 0.0f;
#pragma unroll
                    for (int w = 0; w < N_WARPS; ++w) o += red_s[w][idx];
                    const int head = kv_head * G + g;
                    if (n_splits == 1) {
                        out[(i64)seq * out_stride + head * head_dim + d] = o / ml_s[g][1];
                    } else {
                        const i64 part = ((i64)seq * n_heads + head) * n_splits + split;
                        partial_out[part * head_dim + d] = o;
                        if (d == 0) {
                            partial_ml[2 * part] = ml_s[g][0];
                            partial_ml[2 * part + 1] = ml_s[g][1];
                        }
                    }
                }
            }
            // red_s is rewritten by the next pass; p_s, ml_s (read above) by the next split.
            __syncthreads();
        }
    }
    if (n_splits > 1)
        attention_combine_last<THREADS>(out, out_stride, partial_out, partial_ml, counters, n_heads,
                                        n_kv_heads, head_dim, G, kv_head, seq, n_splits, context);
}

#define ATTENTION_DECODE(NAME, CACHE_T, LANES)                                                      \
    extern "C" __global__ void __launch_bounds__(RowGroups<LANES>::value * LANES, MinBlocks<CACHE_T, LANES>::value)                  \
        attention_decode_##NAME##_l##LANES(                                                         \
            float* out, int out_stride, const float* q, int q_stride, const CACHE_T* k_cache,       \
            const CACHE_T* v_cache, const int* block_tables, int block_table_stride,                \
            const i64* context_lens, int n_heads, int n_kv_heads, int head_dim, int block_size,     \
            float scale, int n_splits, int splits_per_cta, float* partial_out, float* partial_ml,   \
            int* counters) {                                                                        \
        attention_decode_impl<CACHE_T, LANES>(out, out_stride, q, q_stride, k_cache, v_cache,       \
                                              block_tables, block_table_stride, context_lens,       \
                                              n_heads, n_kv_heads, head_dim, block_size, scale,     \
                                              n_splits, splits_per_cta, partial_out, partial_ml,    \
                                              counters);                                            \
    }

ATTENTION_DECODE(f32, float, 8)
ATTENTION_DECODE(f32, float, 16)
ATTENTION_DECODE(f32, float, 32)
ATTENTION_DECODE(f16, u16, 8)
ATTENTION_DECODE(f16, u16, 16)
ATTENTION_DECODE(f16, u16, 32)
