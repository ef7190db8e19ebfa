// Causal prefill attention over the paged KV cache, flash-attention style: no N x N matrix.
//
// One CTA per (query tile, kv head): blockIdx.x indexes the host-built tile table, int32 pairs
// (sequence, first query of the tile), blockIdx.y is the kv head. The CTA's rows are the
// (token, query head) pairs of the tile, token-major: row r is token r / G, head kv_head * G +
// r % G (G = n_heads / n_kv_heads), so one K/V tile in shared memory serves the whole group.
// tile_tokens = rows / G; a row past the tile's last token (the last tile of a sequence, or the
// remainder when G does not divide rows) repeats that token and is never stored.
//
// Query j of sequence s sits at position context_lens[s] - query_len + j and sees keys 0 .. that
// position (cached prefix included). KV tiles run from key 0 up to the tile's last position;
// later keys are not even loaded. Per row an online softmax in base 2 (q pre-scaled by
// scale * log2(e)): running max m, running sum l, accumulator rescaled by exp2(m_old - m_new).
// Key 0 is in the first KV tile and every row sees it, so m is finite from the first tile on and
// exp2(m_old - m_new) never meets inf - inf. Keys past the last position are zero-filled (their
// p is 0, and 0 * stale cache contents could be NaN). Every sum has a fixed order: no atomics,
// and a sequence's result does not depend on the other sequences of the batch.
//
// The block table is read once per key of a tile (key_offsets, into shared memory), not once
// per 16-byte chunk: its lookup and division would be half the instructions of the mma kernel's
// loop.
//
// Two kernels share the layout:
//   prefill_attention_mma_d*: fp16 cache, tensor cores (mma.sync m16n8k16, fp32 accumulate),
//     4 warps x 16 rows, Q fragments in registers; q and p are rounded to fp16 as the mma
//     inputs. K and V tiles come in with cp.async, taking turns (V of a tile lands while its S
//     is computed, K of the next while P V is). K rows in shared memory are the "col" B operand
//     of S = Q K^T as they are (ldmatrix); the S accumulator's register layout is the A fragment
//     of P V (FlashAttention-2), and V's B fragments come from ldmatrix.trans. Warps whose rows
//     all precede a KV tile skip it; the causal mask is only applied on diagonal tiles.
//   prefill_attention_f32_*: fp32 math on CUDA cores (fp32 or fp16 cache), Q, one K-or-V tile
//     and P in shared memory, register-tiled S and P V.
#include "common.cuh"
#include "mma.cuh"

#define LOG2E 1.4426950408889634f
#define NEG_INF (-__int_as_float(0x7f800000))  // no <cmath> under NVRTC: no INFINITY macro
#define THREADS 128                            // PREFILL_THREADS in gpu/cuda/prefill_attention.py

// Where a CTA's query tile sits; shared by both kernels.
struct QueryTile {
    i64 first_row;  // packed row (of q and out) of the tile's first token
    int n_tok;      // tokens in the tile
    int pos0;       // position of the first token
    int n_keys;     // keys seen by the tile: 0 .. pos0 + n_tok - 1
    const int* table;
};

__device__ __forceinline__ QueryTile query_tile(const int* tiles, const i64* query_start,
                                                const i64* context_lens, const int* block_tables,
                                                int block_table_stride, int tile_tokens) {
    const int seq = tiles[2 * blockIdx.x], j0 = tiles[2 * blockIdx.x + 1];
    const i64 start = query_start[seq];
    const int query_len = (int)(query_start[seq + 1] - start);
    QueryTile t;
    t.first_row = start + j0;
    t.n_tok = min(tile_tokens, query_len - j0);
    t.pos0 = (int)context_lens[seq] - query_len + j0;
    t.n_keys = t.pos0 + t.n_tok;
    t.table = block_tables + (i64)seq * block_table_stride;
    return t;
}

// Element offsets of the rows of keys kv0 .. kv0 + BN - 1 for `kv_head` in a cache
// [blocks, block_size, n_kv, d]; -1 past the tile's keys. One thread per key: the block-table
// lookup and its division are done once per key, not once per 16-byte chunk.
template <int BN>
__device__ __forceinline__ void key_offsets(i64* off, const QueryTile& t, int kv0, int kv_head,
                                            int n_kv_heads, int head_dim, int block_size) {
    static_assert(BN <= THREADS, "one thread per key");
    if (threadIdx.x < BN) {
        const int k = kv0 + threadIdx.x;
        i64 o = -1;
        if (k < t.n_keys) {
            const i64 slot = (i64)t.table[k / block_size] * block_size + k % block_size;
            o = (slot * n_kv_heads + kv_head) * head_dim;
        }
        off[threadIdx.x] = o;
    }
}

// ---- tensor cores: mma.cuh -------------------------------------------------------------

// Start copying one K or V tile (BN keys x DP dims, fp16) into shared memory, rows of LD
// halves; zeros past the tile's keys and past head_dim. 16-byte copies: head_dim % 8 == 0 and
// the cache is 16-byte aligned. The caller waits (cp_async_wait_all + __syncthreads).
template <int DP, int BN, int LD>
__device__ __forceinline__ void start_tile_f16(u16* dst, const u16* cache, const i64* off,
                                               int head_dim) {
    constexpr int CHUNKS = DP / 8, PER_THREAD = BN * CHUNKS / THREADS;
    static_assert(BN * CHUNKS % THREADS == 0, "tile chunks per thread");
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
        const int idx = threadIdx.x + THREADS * i, key = idx / CHUNKS, c = idx % CHUNKS;
        const i64 row = off[key];
        const bool live = row >= 0 && 8 * c < head_dim;
        cp_async_16(dst + key * LD + 8 * c, live ? cache + row + 8 * c : cache, live ? 16 : 0);
    }
}

template <int DP, int BN>
__device__ __forceinline__ void prefill_mma_impl(
    float* out, int out_stride, const float* q, int q_stride, const u16* k_cache,
    const u16* v_cache, const int* block_tables, int block_table_stride, const i64* query_start,
    const i64* context_lens, const int* tiles, int tile_tokens, int n_heads, int n_kv_heads,
    int head_dim, int block_size, float scale) {
    constexpr int KS = DP / 16;   // k-steps of Q K^T
    constexpr int NS = BN / 8;    // n-tiles of S (8 keys each)
    constexpr int NO = DP / 8;    // n-tiles of O (8 dims each)
    constexpr int LD = DP + 8;    // smem row stride in halves: 16-byte rows, no bank conflicts
    static_assert(DP % 16 == 0 && BN % 16 == 0, "tile shapes");
    __shared__ __align__(16) u16 k_s[BN * LD];
    __shared__ __align__(16) u16 v_s[BN * LD];
    __shared__ i64 off_s[2][BN];  // key row offsets of the current tile and the next

    const QueryTile t = query_tile(tiles, query_start, context_lens, block_tables,
                                   block_table_stride, tile_tokens);
    const int kv_head = blockIdx.y, G = n_heads / n_kv_heads;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, grp = lane >> 2, qd = lane & 3;
    const int live_rows = t.n_tok * G;

    // This lane's two rows: warp * 16 + grp and + 8.
    int pos[2];
    i64 q_off[2], out_off[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = warp * 16 + grp + 8 * h;
        const int tok = min(r / G, t.n_tok - 1), head = kv_head * G + r % G;
        pos[h] = t.pos0 + tok;
        q_off[h] = (t.first_row + tok) * q_stride + head * head_dim;
        out_off[h] = r < live_rows ? (t.first_row + tok) * out_stride + head * head_dim : -1;
    }
    const bool warp_live = warp * 16 < live_rows;
    const int warp_first_pos = t.pos0 + min(warp * 16 / G, t.n_tok - 1);
    const int warp_last_pos = t.pos0 + min((warp * 16 + 15) / G, t.n_tok - 1);

    // Q fragments, scaled into base 2, zero past head_dim.
    const float qscale = scale * LOG2E;
    u32 qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int h = i & 1, d = ks * 16 + (i >> 1) * 8 + 2 * qd;
            float2 v = make_float2(0.0f, 0.0f);
            if (d < head_dim) v = *reinterpret_cast<const float2*>(q + q_off[h] + d);
            qf[ks][i] = pack_f16x2(v.x * qscale, v.y * qscale);
        }

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    // K and V take turns (FlashAttention-2): V of this tile lands while S is computed, K of the
    // next one while P V is. off_s[buf] holds this tile's key offsets, off_s[buf ^ 1] the next's
    // (written before the barrier that precedes their first use).
    key_offsets<BN>(off_s[0], t, 0, kv_head, n_kv_heads, head_dim, block_size);
    __syncthreads();
    start_tile_f16<DP, BN, LD>(k_s, k_cache, off_s[0], head_dim);
    for (int kv0 = 0, buf = 0; kv0 < t.n_keys; kv0 += BN, buf ^= 1) {
        cp_async_wait_all();
        __syncthreads();  // K is in k_s; every warp is done reading v_s
        start_tile_f16<DP, BN, LD>(v_s, v_cache, off_s[buf], head_dim);
        const bool more = kv0 + BN < t.n_keys;
        if (more) key_offsets<BN>(off_s[buf ^ 1], t, kv0 + BN, kv_head, n_kv_heads, head_dim,
                                  block_size);
        const bool live = warp_live && kv0 <= warp_last_pos;  // else every key is masked

        float s[NS][4];
#pragma unroll
        for (int n = 0; n < NS; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
        if (live) {
            // S = Q K^T. Matrices: keys n * 8 .. +7 x dims +0 / +8 / +16 / +24 (lane bits 3-4).
            const u16* k_row = k_s + (lane & 7) * LD + (lane >> 3) * 8;
#pragma unroll
            for (int ks = 0; ks < KS; ks += 2)
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    u32 b[4];
                    ldmatrix_x4(b, k_row + n * 8 * LD + ks * 16);
                    mma_16816(s[n], qf[ks], b[0], b[1]);
                    mma_16816(s[n], qf[ks + 1], b[2], b[3]);
                }
            // Causal mask, on tiles that reach past the warp's first position (keys past the
            // tile's last position are past every row's position too).
            if (kv0 + BN - 1 > warp_first_pos) {
#pragma unroll
                for (int n = 0; n < NS; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (kv0 + n * 8 + 2 * qd + (e & 1) > pos[e >> 1]) s[n][e] = NEG_INF;
            }

            // Online softmax: each row's 4 lanes (same grp) reduce with xor 1, 2.
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float mx = NEG_INF;
#pragma unroll
                for (int n = 0; n < NS; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * h], s[n][2 * h + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, 2));
                const float m_new = fmaxf(m[h], mx);
                const float alpha = exp2f(m[h] - m_new);
                m[h] = m_new;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < NS; ++n) {
                    s[n][2 * h] = exp2f(s[n][2 * h] - m_new);
                    s[n][2 * h + 1] = exp2f(s[n][2 * h + 1] - m_new);
                    sum += s[n][2 * h] + s[n][2 * h + 1];
                }
                l[h] = l[h] * alpha + sum;  // this lane's share; the 4 lanes are added at the end
#pragma unroll
                for (int n = 0; n < NO; ++n) {
                    o[n][2 * h] *= alpha;
                    o[n][2 * h + 1] *= alpha;
                }
            }
        }

        cp_async_wait_all();
        __syncthreads();  // V is in v_s; every warp is done reading k_s
        if (more) start_tile_f16<DP, BN, LD>(k_s, k_cache, off_s[buf ^ 1], head_dim);
        if (!live) continue;

        // O += P V, 16 keys per k-step; P's A fragment is S's accumulator layout.
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            const u32 a[4] = {pack_f16x2(s[2 * kk][0], s[2 * kk][1]),
                              pack_f16x2(s[2 * kk][2], s[2 * kk][3]),
                              pack_f16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_f16x2(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            // Matrices: keys +0 / +8 (lane bit 3) x dims +0 / +8 (lane bit 4).
            const u16* v_row =
                v_s + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8;
#pragma unroll
            for (int n = 0; n < NO; n += 2) {
                u32 b[4];
                ldmatrix_x4_trans(b, v_row + n * 8);
                mma_16816(o[n], a, b[0], b[1]);
                mma_16816(o[n + 1], a, b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float total = l[h] + __shfl_xor_sync(0xFFFFFFFFu, l[h], 1);
        total += __shfl_xor_sync(0xFFFFFFFFu, total, 2);
        if (out_off[h] < 0) continue;
        const float inv = 1.0f / total;
#pragma unroll
        for (int n = 0; n < NO; ++n) {
            const int d = n * 8 + 2 * qd;
            if (d < head_dim)
                *reinterpret_cast<float2*>(out + out_off[h] + d) =
                    make_float2(o[n][2 * h] * inv, o[n][2 * h + 1] * inv);
        }
    }
}

// ---- fp32 on CUDA cores -------------------------------------------------------------------

// 8 cache elements as floats.
__device__ __forceinline__ void load8(float* f, const float* p) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

__device__ __forceinline__ void load8(float* f, const u16* p) {
    const uint4 r = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = f16_to_f32((u16)(w[i] & 0xFFFFu));
        f[2 * i + 1] = f16_to_f32((u16)(w[i] >> 16));
    }
}

// One K or V tile (BN keys x DP dims) into shared memory as float, rows of LD floats.
template <typename CacheT, int DP, int BN, int LD>
__device__ __forceinline__ void load_tile_f32(float* dst, const CacheT* cache, const i64* off,
                                              int head_dim) {
    constexpr int CHUNKS = DP / 8;
    for (int idx = threadIdx.x; idx < BN * CHUNKS; idx += THREADS) {
        const int key = idx / CHUNKS, c = idx % CHUNKS;
        const i64 base = off[key];
        float f[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if (base >= 0 && 8 * c < head_dim) load8(f, cache + base + 8 * c);
        float4* row = reinterpret_cast<float4*>(dst + key * LD + 8 * c);
        row[0] = make_float4(f[0], f[1], f[2], f[3]);
        row[1] = make_float4(f[4], f[5], f[6], f[7]);
    }
}

template <typename CacheT, int DP, int BM, int BN>
__device__ __forceinline__ void prefill_f32_impl(
    float* out, int out_stride, const float* q, int q_stride, const CacheT* k_cache,
    const CacheT* v_cache, const int* block_tables, int block_table_stride, const i64* query_start,
    const i64* context_lens, const int* tiles, int tile_tokens, int n_heads, int n_kv_heads,
    int head_dim, int block_size, float scale) {
    // S = Q K^T: KL lanes per row group, each SR rows x SK keys (keys kl, kl + KL, ...).
    constexpr int KL = 8, SR = BM * KL / THREADS, SK = BN / KL;
    // O += P V: DL lanes per row group, each OR rows x OC float4 columns (dl, dl + DL, ...).
    constexpr int DL = 16, OR = BM * DL / THREADS, OC = DP / (4 * DL);
    constexpr int LD = DP + 4, LDP = BN + 1;  // padded rows: float4 loads without bank conflicts
    static_assert(SR >= 1 && SK >= 1 && OR >= 1 && OC >= 1 && DP % 64 == 0, "tile shapes");
    __shared__ __align__(16) float q_s[BM * LD];
    __shared__ __align__(16) float kv_s[BN * LD];  // K, then V, of the current tile
    __shared__ float p_s[BM * LDP];
    __shared__ float row_s[BM];  // per row: the rescale factor, then 1 / l
    __shared__ i64 off_s[BN];    // key row offsets of the current tile

    const QueryTile t = query_tile(tiles, query_start, context_lens, block_tables,
                                   block_table_stride, tile_tokens);
    const int kv_head = blockIdx.y, G = n_heads / n_kv_heads;
    const int live_rows = t.n_tok * G;

    const float qscale = scale * LOG2E;
    for (int idx = threadIdx.x; idx < BM * DP; idx += THREADS) {
        const int r = idx / DP, d = idx % DP;
        const int tok = min(r / G, t.n_tok - 1), head = kv_head * G + r % G;
        q_s[r * LD + d] =
            d < head_dim ? q[(t.first_row + tok) * q_stride + head * head_dim + d] * qscale : 0.0f;
    }

    const int kl = threadIdx.x % KL, s_row0 = threadIdx.x / KL * SR;
    const int dl = threadIdx.x % DL, o_row0 = threadIdx.x / DL * OR;
    int pos[SR];
#pragma unroll
    for (int i = 0; i < SR; ++i) pos[i] = t.pos0 + min((s_row0 + i) / G, t.n_tok - 1);
    float m[SR], l[SR];
#pragma unroll
    for (int i = 0; i < SR; ++i) {
        m[i] = NEG_INF;
        l[i] = 0.0f;
    }
    float4 acc[OR][OC];
#pragma unroll
    for (int i = 0; i < OR; ++i)
#pragma unroll
        for (int c = 0; c < OC; ++c) acc[i][c] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);

    for (int kv0 = 0; kv0 < t.n_keys; kv0 += BN) {
        // off_s was last read by the previous tile's V load, behind the barrier before its P V.
        key_offsets<BN>(off_s, t, kv0, kv_head, n_kv_heads, head_dim, block_size);
        __syncthreads();  // q_s and off_s written; the previous tile's P V reads of kv_s done
        load_tile_f32<CacheT, DP, BN, LD>(kv_s, k_cache, off_s, head_dim);
        __syncthreads();
        float s[SR][SK];
#pragma unroll
        for (int i = 0; i < SR; ++i)
#pragma unroll
            for (int j = 0; j < SK; ++j) s[i][j] = 0.0f;
        for (int d = 0; d < head_dim; d += 4) {
            float4 qv[SR], kv[SK];
#pragma unroll
            for (int i = 0; i < SR; ++i)
                qv[i] = *reinterpret_cast<const float4*>(&q_s[(s_row0 + i) * LD + d]);
#pragma unroll
            for (int j = 0; j < SK; ++j)
                kv[j] = *reinterpret_cast<const float4*>(&kv_s[(kl + KL * j) * LD + d]);
#pragma unroll
            for (int i = 0; i < SR; ++i)
#pragma unroll
                for (int j = 0; j < SK; ++j) {
                    s[i][j] = fmaf(qv[i].x, kv[j].x, s[i][j]);
                    s[i][j] = fmaf(qv[i].y, kv[j].y, s[i][j]);
                    s[i][j] = fmaf(qv[i].z, kv[j].z, s[i][j]);
                    s[i][j] = fmaf(qv[i].w, kv[j].w, s[i][j]);
                }
        }
#pragma unroll
        for (int i = 0; i < SR; ++i) {
            float mx = NEG_INF;
#pragma unroll
            for (int j = 0; j < SK; ++j) {
                if (kv0 + kl + KL * j > pos[i]) s[i][j] = NEG_INF;
                mx = fmaxf(mx, s[i][j]);
            }
#pragma unroll
            for (int lanes = 1; lanes < KL; lanes <<= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xFFFFFFFFu, mx, lanes));
            const float m_new = fmaxf(m[i], mx);
            const float alpha = exp2f(m[i] - m_new);
            m[i] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < SK; ++j) {
                const float p = exp2f(s[i][j] - m_new);
                p_s[(s_row0 + i) * LDP + kl + KL * j] = p;
                sum += p;
            }
            l[i] = l[i] * alpha + sum;  // this lane's share; the KL lanes are added at the end
            if (kl == 0) row_s[s_row0 + i] = alpha;
        }
        __syncthreads();  // K reads done; p_s and row_s written
        load_tile_f32<CacheT, DP, BN, LD>(kv_s, v_cache, off_s, head_dim);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < OR; ++i) {
            const float alpha = row_s[o_row0 + i];
#pragma unroll
            for (int c = 0; c < OC; ++c) {
                acc[i][c].x *= alpha;
                acc[i][c].y *= alpha;
                acc[i][c].z *= alpha;
                acc[i][c].w *= alpha;
            }
        }
        const int keys = min(BN, t.n_keys - kv0);
        for (int k = 0; k < keys; ++k) {
            float4 v[OC];
#pragma unroll
            for (int c = 0; c < OC; ++c)
                v[c] = *reinterpret_cast<const float4*>(&kv_s[k * LD + 4 * (dl + DL * c)]);
#pragma unroll
            for (int i = 0; i < OR; ++i) {
                const float p = p_s[(o_row0 + i) * LDP + k];
#pragma unroll
                for (int c = 0; c < OC; ++c) {
                    acc[i][c].x = fmaf(p, v[c].x, acc[i][c].x);
                    acc[i][c].y = fmaf(p, v[c].y, acc[i][c].y);
                    acc[i][c].z = fmaf(p, v[c].z, acc[i][c].z);
                    acc[i][c].w = fmaf(p, v[c].w, acc[i][c].w);
                }
            }
        }
    }

    __syncthreads();  // the last tile's reads of row_s are done
#pragma unroll
    for (int i = 0; i < SR; ++i) {
        float total = l[i];
#pragma unroll
        for (int lanes = 1; lanes < KL; lanes <<= 1)
            total += __shfl_xor_sync(0xFFFFFFFFu, total, lanes);
        if (kl == 0) row_s[s_row0 + i] = 1.0f / total;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < OR; ++i) {
        const int r = o_row0 + i;
        if (r >= live_rows) continue;
        const float inv = row_s[r];
        float* dst = out + (t.first_row + r / G) * out_stride + (kv_head * G + r % G) * head_dim;
#pragma unroll
        for (int c = 0; c < OC; ++c) {
            const int d = 4 * (dl + DL * c);
            if (d < head_dim)
                *reinterpret_cast<float4*>(dst + d) = make_float4(
                    acc[i][c].x * inv, acc[i][c].y * inv, acc[i][c].z * inv, acc[i][c].w * inv);
        }
    }
}

#define PREFILL_ARGS(CACHE_T)                                                                     \
    float *out, int out_stride, const float *q, int q_stride, const CACHE_T *k_cache,              \
        const CACHE_T *v_cache, const int *block_tables, int block_table_stride,                   \
        const i64 *query_start, const i64 *context_lens, const int *tiles, int tile_tokens,        \
        int n_heads, int n_kv_heads, int head_dim, int block_size, float scale
#define PREFILL_PASS                                                                              \
    out, out_stride, q, q_stride, k_cache, v_cache, block_tables, block_table_stride,              \
        query_start, context_lens, tiles, tile_tokens, n_heads, n_kv_heads, head_dim, block_size,  \
        scale

// Rows per CTA: 64 (MMA_ROWS) for the mma kernels; the f32 kernels' BM is F32_ROWS in
// gpu/cuda/prefill_attention.py. Two CTAs per SM for the mma kernels: up to 255 registers, no
// spills for d <= 128 (three, at 168 registers, spill; bench/NOTES.md, "Kernel notes").
#define PREFILL_MMA(DP, BN)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS, 2)                                       \
        prefill_attention_mma_d##DP(PREFILL_ARGS(u16)) {                                           \
        prefill_mma_impl<DP, BN>(PREFILL_PASS);                                                    \
    }

#define PREFILL_F32(NAME, CACHE_T, DP, BM, BN)                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                          \
        prefill_attention_f32_##NAME##_d##DP(PREFILL_ARGS(CACHE_T)) {                              \
        prefill_f32_impl<CACHE_T, DP, BM, BN>(PREFILL_PASS);                                       \
    }

PREFILL_MMA(64, 64)
PREFILL_MMA(96, 64)
PREFILL_MMA(128, 64)
PREFILL_MMA(256, 32)
PREFILL_F32(f16, u16, 64, 32, 32)
PREFILL_F32(f16, u16, 128, 32, 32)
PREFILL_F32(f16, u16, 256, 16, 16)
PREFILL_F32(f32, float, 64, 32, 32)
PREFILL_F32(f32, float, 128, 32, 32)
PREFILL_F32(f32, float, 256, 16, 16)
