// Sampling on the device: one CTA of 1024 threads per row of the logits. Semantics and order are
// gpu/sampler.py's (its docstring): a grammar's token bitmask (rows flagged F_MASK: disallowed
// tokens become -inf, and stay -inf through every later step) -> penalties (repetition, HF rule,
// over prompt + output ids; then presence/frequency, OpenAI rule, over output ids) -> logprobs =
// log_softmax of the penalised logits -> greedy rows: argmax, lowest index on ties -> other rows:
// y = x / temperature, top-k, top-p on the top-k-renormalised distribution, min-p, one draw.
// Every reduction is in a fixed order or over integers (exact in any order): a row's result never
// depends on the other rows or on the run.
//
// Ranking: tokens are ranked by (value desc, index asc), encoded in one u64 "composite"
//   order_key(value) << 32 | ~index, so "ranked at or before c" is ">= c" and the kept prefix of
//   a filter is everything >= its cut (the composite of its last kept token; 0 keeps all). Top-k
//   and top-p each give a cut (the row keeps everything >= the larger one); min-p is a per-token
//   test. Ties at a cut go by index, so top-k keeps exactly k tokens.
//
// A cut without sorting the row (select_cut): a histogram pass counts the candidates per bin (and
//   for top-p sums their probability mass); one warp scans the bins in rank order to the bin where
//   the running total reaches the target, which becomes the region of the next pass. Level 0 bins
//   by distance below the row's max (1/32 nat per bin over 64 nats, one catch-all beyond); deeper
//   levels take 11-bit digits of the order key, then of the index. As soon as the region holds at
//   most CAND_CAP tokens they are gathered into shared memory, sorted (bitonic) and scanned
//   exactly: usually right after level 0, so a cut costs two passes over the row.
//
// Probability mass is summed in 2^-56 fixed point (u64): integer sums are exact in any order, so
//   shared-memory atomics keep the histograms deterministic and every level sees the same totals.
//   The reference sums float32 probabilities with cumsum; both keep a token while the mass ranked
//   before it is < top_p - 1e-6 (the host passes that bound already in fixed point).
//
// The draw is the exponential race argmax p / E, E = -log U, taken in log space: argmax of
//   y - log E over kept tokens (log p = y - lse, lse is common to all). U comes from a 64-bit
//   mixing hash (splitmix64's finaliser) of the row's key (the host derives it from the seed and a
//   draw counter) and the token index. A token whose best possible score is below the score of the
//   row's max token cannot win and is not hashed.
#include "common.cuh"

typedef unsigned long long u64;

#define THREADS 1024
#define N_WARPS (THREADS / 32)
#define FULL_MASK 0xFFFFFFFFu

// Row records (int32 words) written by gpu/cuda/sampling.py: ROW_WORDS per row, then the token ids.
#define ROW_WORDS 16
#define W_FLAGS 0
#define W_TEMPERATURE 1  // float bits
#define W_TOP_K 2        // 0: off (the host turns k >= V into 0)
#define W_TOP_P_LO 3     // top_p - 1e-6 in 2^-56 fixed point (u64)
#define W_TOP_P_HI 4
#define W_MIN_P 5        // float bits
#define W_REPETITION 6   // float bits
#define W_PRESENCE 7     // float bits
#define W_FREQUENCY 8    // float bits
#define W_LOGPROBS 9     // top-n logprobs wanted (0..MAX_TOP)
#define W_KEY_LO 10      // draw key (u64)
#define W_KEY_HI 11
#define W_IDS_BEGIN 12   // repetition ids: [begin, end); presence/frequency ids: [output, end)
#define W_IDS_OUTPUT 13
#define W_IDS_END 14
#define W_MASK_ROW 15    // F_MASK: the row of the token bitmask (mask_words int32 words) to apply

#define F_GREEDY 1
#define F_TOP_P 2            // top-p with the mass bound in W_TOP_P_*
#define F_TOP_P_BEST 4       // top_p - 1e-6 <= 0: only the best token stays
#define F_MIN_P 8
#define F_REPETITION 16
#define F_OUTPUT_PENALTIES 32
#define F_LOGPROBS 64
#define F_MASK 128           // bit t % 32 of word t / 32 of its bitmask row set = token t allowed

// Output records: token id, chosen logprob (float bits), top count, then (id, logprob) pairs.
#define OUT_WORDS 44
#define MAX_TOP 20

#define NBINS 2048
#define CATCH_BIN NBINS
#define BINS_PER_NAT 32.0f  // level-0 bins: NBINS / BINS_PER_NAT = 64 nats below the max
#define CAND_CAP 4096       // tokens gathered and sorted in shared memory (4 per thread)
#define MASS_ONE 72057594037927936.0f  // 2^56: top-p mass, each probability <= 1
#define SUM_ONE 17592186044416.0f      // 2^44: normalisers, up to 2^22 terms <= 1
#define GUMBEL_MAX 17.0f  // > -log(-log(1 - 2^-24)), the largest -log E a draw can give

struct Hist {
    u32 count[NBINS];
    u64 mass[NBINS];
};

struct Shared {
    union {
        Hist hist;
        u64 cand[CAND_CAP];
    } u;
    u64 scratch[N_WARPS];
    u64 scratch2[N_WARPS];
    u64 sel_before;
    u64 result;
    u32 sel_bin;
    u32 sel_count;
    u32 n_cand;
    int sel_found;
};

// The candidates' region of a select pass: the bins chosen at the levels above.
struct Region {
    int level;
    u32 dbin;       // level >= 1: distance bin
    u32 key_prefix;  // key >> key_shift must equal it (key_shift 32: no test)
    int key_shift;
    u32 idx_prefix;  // idx >> idx_shift must equal it (idx_shift 32: no test)
    int idx_shift;
};

// One row as a select pass reads it: y = x / temperature, its max, and the top-p normaliser.
struct RowView {
    const float* x;
    int n;
    float temperature;
    float y_max;
    float lse;
};

// ----- ranking --------------------------------------------------------------------------------

__device__ __forceinline__ u32 order_key(float v) {
    const u32 b = __float_as_uint(v + 0.0f);  // -0 becomes +0: equal values rank as ties
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

__device__ __forceinline__ u64 composite(u32 key, int i) { return ((u64)key << 32) | (u32)~(u32)i; }
__device__ __forceinline__ int comp_index(u64 c) { return (int)~(u32)c; }
__device__ __forceinline__ float comp_value(u64 c) { return key_value((u32)(c >> 32)); }

__device__ __forceinline__ float scaled(const RowView& r, float x) {
    return r.temperature != 1.0f ? __fdiv_rn(x, r.temperature) : x;  // IEEE, as torch divides
}

// Calls f(x[i], i) once for every i < n, spread over the CTA: 16-byte loads, LOADS of them
// issued before any is used (one CTA streams a whole row, so it needs many bytes in flight), the
// unaligned head and the tail element by element. Which thread sees which element never matters:
// every reduction over f's results is a max or an integer sum.
template <int LOADS = 4, typename F>
__device__ __forceinline__ void for_each_element(const float* x, int n, F&& f) {
    const int misaligned = (int)((reinterpret_cast<unsigned long long>(x) >> 2) & 3);
    const int head = min(n, (4 - misaligned) & 3);
    if ((int)threadIdx.x < head) f(x[threadIdx.x], (int)threadIdx.x);
    const float4* body = reinterpret_cast<const float4*>(x + head);
    const int n4 = (n - head) >> 2;
    for (int base = threadIdx.x; base < n4; base += THREADS * LOADS) {
        float4 v[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int j = base + u * THREADS;
            v[u] = j < n4 ? body[j] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int j = base + u * THREADS;
            if (j < n4) {
                const int i = head + 4 * j;
                f(v[u].x, i);
                f(v[u].y, i + 1);
                f(v[u].z, i + 2);
                f(v[u].w, i + 3);
            }
        }
    }
    const int tail = head + 4 * n4 + (int)threadIdx.x;
    if (tail < n) f(x[tail], tail);
}

// Level-0 bin: distance below the max in 1/32 nats, CATCH_BIN past 64 nats (or -inf). Monotone.
__device__ __forceinline__ u32 distance_bin(float y, float y_max) {
    const float d = __fmul_rn(__fsub_rn(y_max, y), BINS_PER_NAT);
    return d < (float)NBINS ? (u32)d : CATCH_BIN;
}

// Probability in fixed point, with the reference's float32 rounding: exp(y - lse).
__device__ __forceinline__ u64 mass_of(float y, float lse) {
    return __float2ull_rn(__fmul_rn(expf(__fsub_rn(y, lse)), MASS_ONE));
}

__device__ __forceinline__ u64 exp_weight(float y, float y_max) {
    return __float2ull_rn(__fmul_rn(expf(__fsub_rn(y, y_max)), SUM_ONE));
}

// ----- reductions -----------------------------------------------------------------------------

__device__ __forceinline__ u64 warp_max_u64(u64 v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const u64 o = __shfl_xor_sync(FULL_MASK, v, offset);
        v = o > v ? o : v;
    }
    return v;
}

__device__ __forceinline__ u64 warp_sum_u64(u64 v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(FULL_MASK, v, offset);
    return v;
}

__device__ u64 block_max_u64(u64 v, u64* scratch) {
    v = warp_max_u64(v);
    __syncthreads();  // scratch may still be read by a previous call
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    u64 best = 0;
    for (int w = 0; w < N_WARPS; ++w) best = scratch[w] > best ? scratch[w] : best;
    return best;
}

__device__ u64 block_sum_u64(u64 v, u64* scratch) {
    v = warp_sum_u64(v);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    u64 total = 0;
    for (int w = 0; w < N_WARPS; ++w) total += scratch[w];
    return total;
}

// Sum of v over the threads before this one (thread order).
__device__ u64 block_exclusive_scan_u64(u64 v, u64* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inclusive = v;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const u64 t = __shfl_up_sync(FULL_MASK, inclusive, offset);
        if (lane >= offset) inclusive += t;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    u64 base = 0;
    for (int w = 0; w < warp; ++w) base += scratch[w];
    return base + inclusive - v;
}

// Sort a[0, n) descending; n a power of two. Every thread calls it.
__device__ void bitonic_sort_desc(u64* a, int n) {
    for (int k = 2; k <= n; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int t = threadIdx.x; t < n / 2; t += THREADS) {
                const int i = 2 * t - (t & (j - 1));
                const bool descending = (i & k) == 0;
                const u64 lo = a[i], hi = a[i + j];
                if ((lo < hi) == descending) {
                    a[i] = hi;
                    a[i + j] = lo;
                }
            }
            __syncthreads();
        }
    }
}

// ----- select: the cut where a running count or mass over the ranked candidates hits a target ---

__device__ __forceinline__ bool in_region(const Region& g, float y, float y_max, u32 key, u32 idx) {
    if (g.level >= 1 && distance_bin(y, y_max) != g.dbin) return false;
    if (g.key_shift < 32 && (key >> g.key_shift) != g.key_prefix) return false;
    if (g.idx_shift < 32 && (idx >> g.idx_shift) != g.idx_prefix) return false;
    return true;
}

__device__ __forceinline__ u32 level_bin(const Region& g, float y, float y_max, u32 key, u32 idx) {
    switch (g.level) {
        case 0: return distance_bin(y, y_max);
        case 1: return key >> 21;
        case 2: return (key >> 10) & 2047u;
        case 3: return key & 1023u;
        case 4: return idx >> 11;
        default: return idx & 2047u;
    }
}

__device__ __forceinline__ int level_bins(int level) { return level == 3 ? 1024 : NBINS; }

// Key digits rank high to low; distances and indices low to high.
__device__ __forceinline__ bool level_descending(int level) { return level >= 1 && level <= 3; }

// Count (and sum the mass of) the candidates of region g per bin of its level; fills s.u.hist.
// Returns the catch-all totals (level 0) through the two references.
__device__ void histogram(Shared& s, const RowView& r, const Region& g, u64 set_cut, bool mass,
                          u64& catch_count, u64& catch_mass) {
    __syncthreads();  // s.u may still be read by the previous step
    for (int b = threadIdx.x; b < NBINS; b += THREADS) {
        s.u.hist.count[b] = 0;
        s.u.hist.mass[b] = 0;
    }
    __syncthreads();
    u64 local_count = 0, local_mass = 0;
    // Two loads in flight, not four: the mass atomics need the registers (no spills at 64).
    for_each_element<2>(r.x, r.n, [&](float x, int i) {
        const float y = scaled(r, x);
        const u32 key = order_key(y);
        if (composite(key, i) < set_cut || !in_region(g, y, r.y_max, key, (u32)i)) return;
        const u32 b = level_bin(g, y, r.y_max, key, (u32)i);
        const u64 q = mass ? mass_of(y, r.lse) : 0;
        if (b == CATCH_BIN) {  // most of a peaked row: kept out of the shared atomics
            ++local_count;
            local_mass += q;
        } else {
            atomicAdd(&s.u.hist.count[b], 1u);
            if (mass) atomicAdd(&s.u.hist.mass[b], q);
        }
    });
    catch_count = block_sum_u64(local_count, s.scratch);
    catch_mass = block_sum_u64(local_mass, s.scratch2);  // also orders the atomics before the scan
}

// Warp 0 walks the bins in rank order from `before` to the bin where the running total reaches
// `target`: s.sel_* = that bin, the total before it and its count (sel_found 0: never reached).
__device__ void scan_bins(Shared& s, int level, bool mass, u64 before, u64 target, u64 catch_count,
                          u64 catch_mass) {
    if (threadIdx.x < 32) {
        const int lane = threadIdx.x;
        const int nb = level_bins(level), per_lane = nb / 32;
        const bool descending = level_descending(level);
        u64 total = 0;
        for (int j = 0; j < per_lane; ++j) {
            const int o = lane * per_lane + j;
            const int b = descending ? nb - 1 - o : o;
            total += mass ? s.u.hist.mass[b] : (u64)s.u.hist.count[b];
        }
        u64 inclusive = total;
#pragma unroll
        for (int offset = 1; offset < 32; offset <<= 1) {
            const u64 t = __shfl_up_sync(FULL_MASK, inclusive, offset);
            if (lane >= offset) inclusive += t;
        }
        const u64 all = __shfl_sync(FULL_MASK, inclusive, 31);
        u64 run = before + inclusive - total;
        if (run < target && target <= run + total) {  // one lane at most
            for (int j = 0; j < per_lane; ++j) {
                const int o = lane * per_lane + j;
                const int b = descending ? nb - 1 - o : o;
                const u64 v = mass ? s.u.hist.mass[b] : (u64)s.u.hist.count[b];
                if (target <= run + v) {
                    s.sel_bin = (u32)b;
                    s.sel_before = run;
                    s.sel_count = s.u.hist.count[b];
                    s.sel_found = 1;
                    break;
                }
                run += v;
            }
        }
        if (lane == 0 && before + all < target) {
            const u64 v = mass ? catch_mass : catch_count;
            s.sel_found = level == 0 && target <= before + all + v;
            s.sel_bin = CATCH_BIN;
            s.sel_before = before + all;
            s.sel_count = (u32)catch_count;
        }
    }
    __syncthreads();
}

// Gather the candidates of region g into s.u.cand, sorted by rank; returns how many.
__device__ int gather(Shared& s, const RowView& r, const Region& g, u64 set_cut) {
    if (threadIdx.x == 0) s.n_cand = 0;
    __syncthreads();
    for_each_element(r.x, r.n, [&](float x, int i) {
        const float y = scaled(r, x);
        const u32 key = order_key(y);
        const u64 c = composite(key, i);
        if (c < set_cut || !in_region(g, y, r.y_max, key, (u32)i)) return;
        s.u.cand[atomicAdd(&s.n_cand, 1u)] = c;  // slot order varies; the sort below does not
    });
    __syncthreads();
    const int n = (int)s.n_cand;
    int padded = 1;
    while (padded < n) padded <<= 1;
    for (int j = n + threadIdx.x; j < padded; j += THREADS) s.u.cand[j] = 0;
    __syncthreads();
    bitonic_sort_desc(s.u.cand, padded);
    return n;
}

// The composite of the last candidate (ranked among those >= set_cut) that a filter keeps:
// count mode keeps the first `target`; mass mode keeps each token whose ranked mass before it is
// < target. 0 when everything is kept. Every thread calls it and gets the same value.
__device__ u64 select_cut(Shared& s, const RowView& r, u64 set_cut, bool mass, u64 target) {
    Region g = {0, 0u, 0u, 32, 0u, 32};
    u64 before = 0;
    for (;;) {
        u64 catch_count, catch_mass;
        histogram(s, r, g, set_cut, mass, catch_count, catch_mass);
        scan_bins(s, g.level, mass, before, target, catch_count, catch_mass);
        if (!s.sel_found) return 0;
        const u32 b = s.sel_bin, count = s.sel_count;
        before = s.sel_before;
        switch (g.level) {
            case 0: g.dbin = b; break;
            case 1: g.key_shift = 21; g.key_prefix = b; break;
            case 2: g.key_shift = 10; g.key_prefix = (g.key_prefix << 11) | b; break;
            case 3: g.key_shift = 0; g.key_prefix = (g.key_prefix << 10) | b; break;
            case 4: g.idx_shift = 11; g.idx_prefix = b; break;
            default: g.idx_shift = 0; g.idx_prefix = (g.idx_prefix << 11) | b; break;
        }
        ++g.level;
        if (count <= CAND_CAP) break;  // at level 6 the region is one token
    }
    const int n = gather(s, r, g, set_cut);
    if (!mass) {
        const u64 cut = s.u.cand[target - before - 1];
        __syncthreads();  // the next pass reuses s.u
        return cut;
    }
    // Mass mode: running mass over the sorted candidates, 4 consecutive ones per thread.
    u64 q[4], local = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int pos = 4 * threadIdx.x + j;
        q[j] = pos < n ? mass_of(comp_value(s.u.cand[pos]), r.lse) : 0;
        local += q[j];
    }
    u64 run = before + block_exclusive_scan_u64(local, s.scratch);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int pos = 4 * threadIdx.x + j;
        if (pos < n && run < target && target <= run + q[j]) s.result = s.u.cand[pos];
        run += q[j];
    }
    __syncthreads();
    return s.result;
}

// ----- the row's steps ------------------------------------------------------------------------

__device__ __forceinline__ bool allowed(const unsigned* mask, int i) {
    return mask == nullptr || ((mask[i >> 5] >> (i & 31)) & 1u);
}

// Masked and penalised copy of row x in w (the caller's logits stay untouched); cnt is scratch
// of V ints; mask is the row's bitmask (null: no mask). A masked token is -inf before the
// penalties, and they keep it there (the repetition penalty skips it; -inf - c = -inf).
__device__ void prepare_row(const float* x, float* w, int* cnt, int V, const int* rec,
                            const int* ids, int flags, const unsigned* mask) {
    const int begin = rec[W_IDS_BEGIN], output = rec[W_IDS_OUTPUT], end = rec[W_IDS_END];
    const bool counted = flags & F_OUTPUT_PENALTIES;
    const float minus_inf = __int_as_float((int)0xff800000u);
    for_each_element(x, V, [&](float v, int i) { w[i] = allowed(mask, i) ? v : minus_inf; });
    for (int j = output + threadIdx.x; counted && j < end; j += THREADS) {
        const int id = ids[j];
        if (id >= 0 && id < V) cnt[id] = 0;
    }
    __syncthreads();
    if (flags & F_REPETITION) {  // duplicates write the same value
        const float penalty = __int_as_float(rec[W_REPETITION]);
        for (int j = begin + threadIdx.x; j < end; j += THREADS) {
            const int id = ids[j];
            if (id < 0 || id >= V || !allowed(mask, id)) continue;
            const float v = x[id];
            w[id] = v > 0.0f ? __fdiv_rn(v, penalty) : __fmul_rn(v, penalty);
        }
    }
    for (int j = output + threadIdx.x; counted && j < end; j += THREADS) {
        const int id = ids[j];
        if (id >= 0 && id < V) atomicAdd(&cnt[id], 1);
    }
    __syncthreads();
    if (counted) {  // the thread that takes a token's count applies its penalty, once
        const float presence = __int_as_float(rec[W_PRESENCE]);
        const float frequency = __int_as_float(rec[W_FREQUENCY]);
        for (int j = output + threadIdx.x; j < end; j += THREADS) {
            const int id = ids[j];
            if (id < 0 || id >= V) continue;
            const int c = atomicExch(&cnt[id], 0);
            if (c > 0) w[id] = __fsub_rn(w[id], __fadd_rn(presence, __fmul_rn(frequency, (float)c)));
        }
    }
    __syncthreads();
}

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// E = -log(U) for token i, U in [2^-24, 1 - 2^-24] on a 2^-23 grid. __logf (the MUFU unit, abs
// error ~3e-7) rather than logf: the draw's two logs per kept token were most of its cost, and
// the error only blurs E where it is below ~1e-6 (probability ~1e-6); the clamp keeps E >= 2^-24
// so a score never exceeds y + GUMBEL_MAX.
__device__ __forceinline__ float exponential(u64 key, int i) {
    const u64 h = mix64(key + (u64)(i + 1) * 0x9E3779B97F4A7C15ull);
    const float u = __fmul_rn((float)(u32)(h >> 41) + 0.5f, 1.1920928955078125e-07f);
    return fmaxf(-__logf(u), 5.9604645e-08f);
}

// The race score of a kept token: log p - log E up to the row's constant log-sum-exp.
__device__ __forceinline__ float race_score(float y, u64 key, int i) {
    return __fsub_rn(y, __logf(exponential(key, i)));
}

// Race over the kept tokens (composite >= cut, and min-p); writes the kept mask when asked.
__device__ int draw(Shared& s, const RowView& r, u64 cut, bool use_min_p, float min_p, u64 key,
                    int top_index, unsigned char* kept_row) {
    // The max token is kept unless a tie at y_max ranks before it: then it only gives no floor.
    float floor_score = -__int_as_float(0x7f800000);
    const float y_top = scaled(r, r.x[top_index]);
    if (composite(order_key(y_top), top_index) >= cut)
        floor_score = race_score(y_top, key, top_index);
    u64 best = 0;
    for_each_element(r.x, r.n, [&](float x, int i) {
        const float y = scaled(r, x);
        const bool kept = composite(order_key(y), i) >= cut &&
                          (!use_min_p || expf(__fsub_rn(y, r.y_max)) >= min_p);
        if (kept_row) kept_row[i] = kept;
        if (!kept || __fadd_rn(y, GUMBEL_MAX) < floor_score) return;
        const float score = race_score(y, key, i);
        floor_score = fmaxf(floor_score, score);
        const u64 c = composite(order_key(score), i);
        best = c > best ? c : best;
    });
    best = block_max_u64(best, s.scratch);
    return best ? comp_index(best) : top_index;
}

// log of the sum of exp(y - y_max) over the tokens >= cut: logsumexp = y_max + this, as the
// reference computes it (max + log(sum(exp(y - max)))).
__device__ float log_sum_exp_below_max(Shared& s, const RowView& r, u64 cut) {
    u64 local = 0;
    for_each_element(r.x, r.n, [&](float x, int i) {
        const float y = scaled(r, x);
        if (composite(order_key(y), i) >= cut) local += exp_weight(y, r.y_max);
    });
    const u64 total = block_sum_u64(local, s.scratch);
    return (float)log((double)total / (double)SUM_ONE);
}

// One row per CTA: see the top of the file. logits [B, V] (row stride), records from the host,
// work/counts [B, V] scratch when a row has penalties or a mask (else null), out [B, OUT_WORDS],
// kept_out [B, V] (debug, or null): the kept mask of each sampled row; token_mask [C,
// mask_words] the bitmask rows of the F_MASK rows (null when none has one).
extern "C" __global__ void __launch_bounds__(THREADS) sample_rows(
    const float* __restrict__ logits, int logits_stride, int V, const int* __restrict__ records,
    float* __restrict__ work, int* __restrict__ counts, int* __restrict__ out,
    unsigned char* __restrict__ kept_out, const unsigned* __restrict__ token_mask,
    int mask_words) {
    __shared__ Shared s;
    const int row = blockIdx.x;
    const int* rec = records + (i64)row * ROW_WORDS;
    const int flags = rec[W_FLAGS];
    const float* x = logits + (i64)row * logits_stride;
    if (flags & (F_REPETITION | F_OUTPUT_PENALTIES | F_MASK)) {
        float* w = work + (i64)row * V;
        const unsigned* mask =
            flags & F_MASK ? token_mask + (i64)rec[W_MASK_ROW] * mask_words : nullptr;
        prepare_row(x, w, counts + (i64)row * V, V, rec, records + (i64)gridDim.x * ROW_WORDS,
                    flags, mask);
        x = w;
    }

    u64 best = 0;
    for_each_element(x, V, [&](float v, int i) {
        const u64 c = composite(order_key(v), i);
        best = c > best ? c : best;
    });
    best = block_max_u64(best, s.scratch);
    const float x_max = comp_value(best);
    const int argmax = comp_index(best);

    int token = argmax;
    if (!(flags & F_GREEDY)) {
        const float temperature = __int_as_float(rec[W_TEMPERATURE]);
        RowView r = {x, V, temperature, 0.0f, 0.0f};
        r.y_max = scaled(r, x_max);  // x / T is monotone: the max of y
        u64 cut = 0;
        const int top_k = rec[W_TOP_K];
        if (top_k > 0) cut = select_cut(s, r, 0, false, (u64)top_k);
        if (flags & F_TOP_P_BEST) {
            const u64 cut_p = select_cut(s, r, cut, false, 1);
            cut = cut_p > cut ? cut_p : cut;
        } else if (flags & F_TOP_P) {
            r.lse = __fadd_rn(r.y_max, log_sum_exp_below_max(s, r, cut));
            const u64 target = ((u64)(u32)rec[W_TOP_P_HI] << 32) | (u32)rec[W_TOP_P_LO];
            const u64 cut_p = select_cut(s, r, cut, true, target);
            cut = cut_p > cut ? cut_p : cut;
        }
        const u64 key = ((u64)(u32)rec[W_KEY_HI] << 32) | (u32)rec[W_KEY_LO];
        token = draw(s, r, cut, flags & F_MIN_P, __int_as_float(rec[W_MIN_P]), key, argmax,
                     kept_out ? kept_out + (i64)row * V : nullptr);
    }

    int* o = out + (i64)row * OUT_WORDS;
    if (flags & F_LOGPROBS) {
        const RowView r = {x, V, 1.0f, x_max, 0.0f};
        const float log_norm = log_sum_exp_below_max(s, r, 0);
        const int n_top = min(rec[W_LOGPROBS], min(V, MAX_TOP));
        if (n_top > 0) {
            const Region all = {0, 0u, 0u, 32, 0u, 32};
            const u64 cut = select_cut(s, r, 0, false, (u64)n_top);
            gather(s, r, all, cut);
            if ((int)threadIdx.x < n_top) {
                const u64 c = s.u.cand[threadIdx.x];
                o[3 + 2 * threadIdx.x] = comp_index(c);
                o[4 + 2 * threadIdx.x] = __float_as_int(__fsub_rn(__fsub_rn(comp_value(c), x_max), log_norm));
            }
        }
        if (threadIdx.x == 0) {
            o[1] = __float_as_int(__fsub_rn(__fsub_rn(x[token], x_max), log_norm));
            o[2] = n_top;
        }
    }
    if (threadIdx.x == 0) o[0] = token;
}
