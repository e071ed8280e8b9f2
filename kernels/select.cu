// Page selection (docs/design.md s.3-4): Quest scores of the candidate pages,
// group aggregation and an exact top-K, for the four fkv_select_mode uses.
// Two launches on the caller's stream, 256 threads a block:
//  - score_kernel, grid (chunks, KV heads, sequences): each block writes the
//    Quest scores of one chunk of a (sequence, KV head)'s candidate pages
//    into st.scores, and nothing else. The scoring is most of the work, and
//    one block per head would leave most SMs idle at small batches.
//  - select_kernel, one block per (sequence, KV head): the correction
//    decision, the group aggregate of those scores and the exact top-K, and
//    every output and counter. Stream order makes the scores visible to it.
//    With a tail (fkv_select_tail: the attend's correction under COSINE and
//    SYNC's fix) the block then makes the correction recall's plan
//    (plan.cuh), which saves the plan launch on the critical path; what the
//    plan reads it prefetches at its start and keeps in shared memory.
// Both kernels take the same decisions (scores needed or not) from the same
// inputs; every decision of a block is uniform across it, so the whole block
// returns together.
#include <stdint.h>

#include <type_traits>

#include "common.cuh"
#include "launch.cuh"
#include "plan.cuh"

namespace fkv {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kBins = 256;  // radix select digit: 8 bits
// Pages per thread per round of the top-K passes (loads in flight per
// thread; fewer barriers in the emission).
constexpr int kItems = 4;
constexpr int kRound = kThreads * kItems;
static_assert(kThreads == kBins, "the digit search maps one thread per bin");

// Block-wide scratch of fixed size (the per-head arrays are dynamic).
struct block_shared {
    uint32_t hist[kBins];
    uint32_t warp_u[kWarps];
    float warp_f[kWarps][4];
    uint32_t digit, rank;
    int32_t need;
};

// ---- small helpers ---------------------------------------------------------

// Order-preserving float -> uint32 key (larger float, larger key). -0 is
// folded into +0 because the CPU reference compares them equal (a tie).
__device__ __forceinline__ uint32_t order_key(float x) {
    uint32_t u = __float_as_uint(x);
    if (u == 0x80000000u) u = 0;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Sums N values over the block in place, the same totals to every thread,
// in a fixed order (so the result is deterministic). Ends with a barrier:
// `s` can be reused.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], block_shared &s) {
    static_assert(N <= kWarp, "one value per lane of the final read");
#pragma unroll
    for (int j = 0; j < N; j++) v[j] = warp_sum(v[j]);
    if ((threadIdx.x & (kWarp - 1)) == 0)
#pragma unroll
        for (int j = 0; j < N; j++) s.warp_f[threadIdx.x / kWarp][j] = v[j];
    __syncthreads();
#pragma unroll
    for (int j = 0; j < N; j++) {
        float t = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; w++) t += s.warp_f[w][j];
        v[j] = t;
    }
    __syncthreads();
}

// Exclusive prefix sum over the block in thread order; `total` gets the sum
// of all. Ends with a barrier: `s` can be reused.
__device__ __forceinline__ uint32_t block_scan(uint32_t v, uint32_t &total,
                                               block_shared &s) {
    const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
    uint32_t x = v;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
        uint32_t y = __shfl_up_sync(kFull, x, o);
        if (lane >= o) x += y;
    }
    if (lane == kWarp - 1) s.warp_u[warp] = x;
    __syncthreads();
    uint32_t before = 0, all = 0;
#pragma unroll
    for (int w = 0; w < kWarps; w++) {
        uint32_t t = s.warp_u[w];
        before += w < warp ? t : 0u;
        all += t;
    }
    __syncthreads();
    total = all;
    return before + x - v;
}

// Sums U values per lane across the warp with U - 1 + log2(32 / U)
// shuffles instead of 5 * U: each step folds half of the values into one
// half of the lanes. Lane l ends with the total of value l / (32 / U).
template <int U>
__device__ __forceinline__ float warp_sum_multi(float (&v)[U], int lane) {
    int n = U;
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
        if (n > 1) {
            const bool upper = (lane & o) != 0;
#pragma unroll
            for (int j = 0; j < U / 2; j++) {
                if (j < n / 2) {
                    float send = upper ? v[j] : v[j + n / 2];
                    float keep = upper ? v[j + n / 2] : v[j];
                    v[j] = keep + __shfl_xor_sync(kFull, send, o);
                }
            }
            n >>= 1;
        } else {
            v[0] += __shfl_xor_sync(kFull, v[0], o);
        }
    }
    return v[0];
}

// E consecutive elements of T (E * sizeof(T) bytes, aligned to that or to
// 16), loaded with the widest vector loads and kept as loaded until
// converted, so that the next pages' loads can be in flight meanwhile.
template <typename T, int E> struct chunk {
    static constexpr int kBytes = E * (int)sizeof(T);
    static constexpr int kVecBytes = kBytes < 16 ? kBytes : 16;
    using V = typename std::conditional<
        kVecBytes == 16, uint4,
        typename std::conditional<kVecBytes == 8, uint2, uint32_t>::type>::type;
    static constexpr int kVecs = kBytes / kVecBytes;
    static_assert(sizeof(V) == kVecBytes && kBytes % kVecBytes == 0,
                  "chunk must be 4, 8 or a multiple of 16 bytes");
    V v[kVecs];

    // Read-only path: the summaries are not written during this kernel.
    __device__ __forceinline__ void load(const T *p) {
        const V *src = reinterpret_cast<const V *>(p);
#pragma unroll
        for (int i = 0; i < kVecs; i++) v[i] = __ldg(src + i);
    }
    __device__ __forceinline__ void to_float(float (&out)[E]) const {
        union {
            V v[kVecs];
            T t[E];
        } u;
#pragma unroll
        for (int i = 0; i < kVecs; i++) u.v[i] = v[i];
#pragma unroll
        for (int e = 0; e < E; e++) out[e] = to_f<T>(u.t[e]);
    }
};

// E consecutive floats of shared memory (8- or 16-byte aligned).
template <int E>
__device__ __forceinline__ void load_shared(const float *p, float (&out)[E]) {
    if constexpr (E % 4 == 0) {
#pragma unroll
        for (int i = 0; i < E / 4; i++) {
            float4 t = reinterpret_cast<const float4 *>(p)[i];
            out[4 * i] = t.x; out[4 * i + 1] = t.y;
            out[4 * i + 2] = t.z; out[4 * i + 3] = t.w;
        }
    } else {
        static_assert(E == 2, "head_dim / 32 is 2, 4 or 8");
        float2 t = *reinterpret_cast<const float2 *>(p);
        out[0] = t.x; out[1] = t.y;
    }
}

// ---- selection -------------------------------------------------------------

// Scores heads [g0, g0 + HC) of the U pages whose summaries the lanes hold
// (lane l: channels [l*E, l*E + E)) and stores them. The HC * U sums are
// reduced across the warp together, which costs about one shuffle each.
template <int D, int U, int HC>
__device__ __forceinline__ void score_heads(const float (&mx)[U][D / kWarp],
                                            const float (&mn)[U][D / kWarp],
                                            const float *q_s, int g0, int lane,
                                            int page0, int valid, float *scores,
                                            int max_pages, uint32_t *head_max) {
    constexpr int E = D / kWarp, V = HC * U, kSpan = kWarp / V;
    static_assert(V <= kWarp && kWarp % V == 0, "values per warp reduction");
    float acc[V];
#pragma unroll
    for (int c = 0; c < HC; c++) {
        float qv[E];
        load_shared<E>(q_s + (g0 + c) * D + lane * E, qv);
#pragma unroll
        for (int u = 0; u < U; u++) acc[c * U + u] = 0.f;
#pragma unroll
        for (int e = 0; e < E; e++) {
            // max(q*mx, q*mn) is q*mx for q >= 0 and q*mn otherwise, since
            // mx >= mn (rounding is monotonic, so also after rounding).
            const bool pos = qv[e] >= 0.f;
#pragma unroll
            for (int u = 0; u < U; u++)
                acc[c * U + u] = fmaf(qv[e], pos ? mx[u][e] : mn[u][e], acc[c * U + u]);
        }
    }
    const float s = warp_sum_multi<V>(acc, lane);
    const int v = lane / kSpan, c = v / U, u = v % U;
    if (lane % kSpan == 0 && u < valid) {
        scores[(size_t)(g0 + c) * max_pages + page0 + u] = s;
        if (head_max) atomicMax(&head_max[g0 + c], order_key(s));
    }
}

// Scores candidate pages [first, first + cand) for the G heads of q_s into
// scores[g][page] (rows of max_pages). One warp per page, U pages per warp
// step, the next step's loads issued before this step's math; heads in
// fours, then one by one. When head_max is given, it also tracks each
// head's maximum (as an order key) for the softmax.
template <typename T, int D>
__device__ __forceinline__ void score_pages(const layer_view &L, int h, int first,
                                            int cand, int G, const float *q_s,
                                            float *scores, int max_pages,
                                            uint32_t *head_max) {
    constexpr int E = D / kWarp;
    constexpr int U = 512 / D;  // 16 channels of each summary per lane a step
    constexpr int kHeads = U <= 4 ? 4 : 16 / U;  // at most 16 sums a reduction
    constexpr int kStride = kWarps * U;
    const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;

    chunk<T, E> rmx[U], rmn[U];
    // Pages past the end re-read the last candidate (valid memory); their
    // sums are never stored.
    auto fetch = [&](int base) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int page = first + (base + u < cand ? base + u : cand - 1);
            rmx[u].load(L.summary_max<T>(h, page) + lane * E);
            rmn[u].load(L.summary_min<T>(h, page) + lane * E);
        }
    };
    int base = warp * U;
    if (base < cand) fetch(base);
    for (; base < cand; base += kStride) {
        float mx[U][E], mn[U][E];
#pragma unroll
        for (int u = 0; u < U; u++) {
            rmx[u].to_float(mx[u]);
            rmn[u].to_float(mn[u]);
        }
        if (base + kStride < cand) fetch(base + kStride);
        const int valid = cand - base;  // pages of this step that exist (>= 1)
        int g0 = 0;
        for (; g0 + kHeads <= G; g0 += kHeads)
            score_heads<D, U, kHeads>(mx, mn, q_s, g0, lane, first + base, valid,
                                      scores, max_pages, head_max);
        for (; g0 < G; g0++)
            score_heads<D, U, 1>(mx, mn, q_s, g0, lane, first + base, valid,
                                 scores, max_pages, head_max);
    }
}

// Selects the K pages of [first, first + cand) with the largest aggregated
// score (ties to the lower page) into out[0..K) in ascending page order and
// returns the count, from the scores score_kernel wrote. Uniform across the
// block; all threads must call it. blocks (the sequence layer's page table)
// and blocks_out (shared): when given, each selected page's entry is copied
// to blocks_out at its position with cp.async (committed, not waited for).
__device__ __forceinline__ int select_pages(const fkv_dev_geometry &g,
                                            const fkv_dev_state &st, int slot,
                                            int h, int first, int cand,
                                            uint32_t *head_max, float *head_sum,
                                            uint32_t *keys_s, int key_cap,
                                            block_shared &sh, int32_t *out,
                                            const uint64_t *blocks, uint64_t *blocks_out) {
    const int K = g.select_pages, G = g.group, tid = threadIdx.x;
    auto emit = [&](int at, int page) {
        out[at] = page;
        if (blocks_out) cp_async8(blocks_out + at, blocks + page);
    };
    if (cand <= K) {  // everything fits: all candidates, in order
        for (int j = tid; j < cand; j += kThreads) emit(j, first + j);
        if (blocks_out) cp_async_commit();
        return cand;
    }
    if (K <= 0) return 0;  // (nothing to commit: the wait covers none)

    const size_t row = (size_t)slot * g.kv_heads + h;
    float *scores = st.scores + row * G * g.max_pages;  // [G][max_pages]
    float *agg = st.agg + row * g.max_pages;            // [max_pages]
    const bool softmax = g.group_score == FKV_GROUP_MEAN_SOFTMAX;
    // The top-K passes read the keys of agg from shared memory when they
    // fit (the launcher sized it for max_pages when it could), else from agg.
    if (cand > key_cap) keys_s = nullptr;
    auto key_at = [&](int p) {
        return keys_s ? keys_s[p] : order_key(agg[first + p]);
    };

    // 1. score_kernel wrote scores[g][first .. first + cand) (the previous
    // launch on this stream). For the softmax, each head's maximum as an
    // order key (max is order-independent: the same as when the scores were
    // tracked as they were computed), four heads a pass, kItems pages per
    // thread at a time. head_max starts at 0, below any key.
    if (softmax) {
        const int lane = tid & (kWarp - 1);
        for (int g0 = 0; g0 < G; g0 += 4) {
            uint32_t m[4] = {0u, 0u, 0u, 0u};
            for (int base = 0; base < cand; base += kRound) {
                float s[kItems][4];
#pragma unroll
                for (int j = 0; j < kItems; j++) {
                    const int p = base + j * kThreads + tid;
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        s[j][c] = p < cand && g0 + c < G
                            ? scores[(size_t)(g0 + c) * g.max_pages + first + p] : 0.f;
                }
#pragma unroll
                for (int j = 0; j < kItems; j++)
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        if (base + j * kThreads + tid < cand) {
                            const uint32_t k = order_key(s[j][c]);
                            m[c] = k > m[c] ? k : m[c];
                        }
            }
#pragma unroll
            for (int c = 0; c < 4; c++) {
#pragma unroll
                for (int o = kWarp / 2; o > 0; o >>= 1) {
                    const uint32_t k = __shfl_xor_sync(kFull, m[c], o);
                    m[c] = k > m[c] ? k : m[c];
                }
                if (lane == 0 && g0 + c < G) atomicMax(&head_max[g0 + c], m[c]);
            }
        }
        __syncthreads();  // every head's maximum before step 2 reads it
    }

    // 2. Softmax denominators, four heads a pass over the whole block. The
    // scores are read with plain loads, kItems pages per thread at a time so
    // that 4 * kItems loads are in flight.
    if (softmax) {
        for (int g0 = 0; g0 < G; g0 += 4) {
            float m[4], part[4];
#pragma unroll
            for (int c = 0; c < 4; c++) {
                m[c] = g0 + c < G ? key_float(head_max[g0 + c]) : 0.f;
                part[c] = 0.f;
            }
            for (int base = 0; base < cand; base += kRound) {
                float s[kItems][4];
#pragma unroll
                for (int j = 0; j < kItems; j++) {
                    const int p = base + j * kThreads + tid;
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        s[j][c] = p < cand && g0 + c < G
                            ? scores[(size_t)(g0 + c) * g.max_pages + first + p] : m[c];
                }
#pragma unroll
                for (int j = 0; j < kItems; j++)
#pragma unroll
                    for (int c = 0; c < 4; c++)
                        if (base + j * kThreads + tid < cand)
                            part[c] += expf(g.scale * (s[j][c] - m[c]));
            }
            block_sum<4>(part, sh);
            if (tid == 0)  // each >= 1: the maximum adds exp(0)
#pragma unroll
                for (int c = 0; c < 4; c++)
                    if (g0 + c < G) head_sum[g0 + c] = part[c];
        }
        __syncthreads();
    }

    // 3. Group aggregate, in the CPU's order of operations, kItems pages per
    // thread at a time (their loads in flight together).
    for (int base = 0; base < cand; base += kRound) {
        float a[kItems];
#pragma unroll
        for (int j = 0; j < kItems; j++) a[j] = 0.f;
        for (int gh = 0; gh < G; gh++) {
            const float *row = scores + (size_t)gh * g.max_pages + first;
            const float m = softmax ? key_float(head_max[gh]) : 0.f;
            const float sum = softmax ? head_sum[gh] : 1.f;
            float s[kItems];
#pragma unroll
            for (int j = 0; j < kItems; j++) {
                const int p = base + j * kThreads + tid;
                s[j] = p < cand ? row[p] : 0.f;
            }
#pragma unroll
            for (int j = 0; j < kItems; j++)
                a[j] += softmax ? expf(g.scale * (s[j] - m)) / sum : s[j];
        }
#pragma unroll
        for (int j = 0; j < kItems; j++) {
            const int p = base + j * kThreads + tid;
            if (p < cand) {
                agg[first + p] = a[j] / (float)G;
                if (keys_s) keys_s[p] = order_key(a[j] / (float)G);
            }
        }
    }
    __syncthreads();

    // 4. Radix select of the K-th largest key, 8 bits a pass from the top:
    // `rank` is the wanted key's rank (1 = largest) among the keys that share
    // the digits fixed so far. After the last pass the key is exact and rank
    // is how many keys equal to it the top K takes (K - #keys above it).
    uint32_t prefix = 0, mask = 0, rank = (uint32_t)K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        sh.hist[tid] = 0;
        __syncthreads();
        for (int base = 0; base < cand; base += kRound) {
            uint32_t digit[kItems];
#pragma unroll
            for (int j = 0; j < kItems; j++) {  // all loads first
                const int p = base + j * kThreads + tid;
                digit[j] = kBins;  // not counted
                if (p < cand) {
                    const uint32_t key = key_at(p);
                    if ((key & mask) == prefix) digit[j] = (key >> shift) & 0xffu;
                }
            }
            // Plain shared atomics: measured faster on H200 than aggregating
            // equal digits with __match_any_sync, even with most keys in one bin.
#pragma unroll
            for (int j = 0; j < kItems; j++)
                if (digit[j] < kBins) atomicAdd(&sh.hist[digit[j]], 1u);
        }
        __syncthreads();
        // Thread t holds digit 255 - t, so the scan counts keys above it.
        const uint32_t c = sh.hist[kBins - 1 - tid];
        uint32_t total;
        const uint32_t above = block_scan(c, total, sh);
        if (above < rank && rank <= above + c) {  // exactly one thread
            sh.digit = (uint32_t)(kBins - 1 - tid);
            sh.rank = rank - above;
        }
        __syncthreads();
        prefix |= sh.digit << shift;
        mask |= 0xffu << shift;
        rank = sh.rank;
    }
    const uint32_t kth = prefix;
    const uint32_t need_eq = rank;

    // 5. Emit in ascending page order, kRound pages a round (kItems
    // consecutive ones per thread): every key above kth and the first need_eq
    // keys equal to it. One scan counts both, as (equal << 16 | above): a
    // round holds at most kRound < 2^16 of each.
    uint32_t emitted = 0, eq_seen = 0;
    for (int base = 0; base < cand && emitted < (uint32_t)K; base += kRound) {
        const int p0 = base + tid * kItems;
        uint32_t key[kItems], n_gt = 0, n_eq = 0;
#pragma unroll
        for (int j = 0; j < kItems; j++) {
            key[j] = p0 + j < cand ? key_at(p0 + j) : 0u;  // 0: below kth
            n_gt += key[j] > kth;
            n_eq += key[j] == kth;
        }
        uint32_t total;
        const uint32_t before = block_scan(n_eq << 16 | n_gt, total, sh);
        const uint32_t left = need_eq - eq_seen;  // equal keys still wanted
        uint32_t gt_before = before & 0xffffu, eq_before = before >> 16;
#pragma unroll
        for (int j = 0; j < kItems; j++) {
            const bool gt = key[j] > kth, eq = key[j] == kth;
            if (gt || (eq && eq_before < left))
                emit((int)(emitted + gt_before + (eq_before < left ? eq_before : left)),
                     first + p0 + j);
            gt_before += gt;
            eq_before += eq;
        }
        const uint32_t eq_round = total >> 16;
        const uint32_t eq_taken = eq_round < left ? eq_round : left;
        emitted += (total & 0xffffu) + eq_taken;
        eq_seen += eq_taken;
    }
    if (blocks_out) cp_async_commit();
    return K;
}

// ---- correction decision ---------------------------------------------------

// The cosine of each head gh of the group between q_s and active_q (both
// [G][D]), a warp per head: lane 0 of warp gh % kWarps stores it in
// cos_s[gh]. No barrier: the caller's next one publishes them.
template <int D>
__device__ __forceinline__ void group_cosines(int G, const float *q_s, const float *active_q,
                                              float *cos_s) {
    const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp;
    for (int gh = warp; gh < G; gh += kWarps) {
        const float *x = q_s + gh * D, *y = active_q + gh * D;
        float xy = 0.f, xx = 0.f, yy = 0.f;
#pragma unroll
        for (int d = lane; d < D; d += kWarp) {
            xy += x[d] * y[d];
            xx += x[d] * x[d];
            yy += y[d] * y[d];
        }
        xy = warp_sum(xy);
        xx = warp_sum(xx);
        yy = warp_sum(yy);
        // The ratio in double: xx * yy may underflow or overflow in float,
        // and equal vectors must give exactly 1.
        if (lane == 0)
            cos_s[gh] = xx > 0.f && yy > 0.f
                ? (float)((double)xy / sqrt((double)xx * (double)yy)) : 0.f;
    }
}

// Whether the mean of the G cosines in cos_s is below the threshold: the
// CPU's order, in double.
__device__ __forceinline__ bool mean_below(const float *cos_s, int G, float threshold) {
    double total = 0.0;
    for (int gh = 0; gh < G; gh++) total += cos_s[gh];
    return total / G < (double)threshold;
}

// Whether a head's current selection cannot serve at all: none yet (ac <
// 0), or the candidates fit in K but are not all active. Uniform: one ac.
__device__ __forceinline__ bool must_correct(int32_t ac, int cand, int K) {
    return ac < 0 || (cand <= K && ac < cand);
}

// FKV_SELECT_CORRECT: does head h need a new selection? Yes when it has none
// (ac < 0), when the candidates fit in K but are not all active, or when the
// mean cosine between the group's query q_s and active_q (both [G][D]) is
// below the threshold. Uniform across the block; all threads must call it,
// after q_s is complete. cos_s [G] and *need_s are shared scratch; ends with
// a barrier after the last read of active_q.
template <int D>
__device__ __forceinline__ bool need_correction(int32_t ac, int cand, int K, int G,
                                             float threshold, const float *q_s,
                                             const float *active_q, float *cos_s,
                                             int32_t *need_s) {
    if (must_correct(ac, cand, K)) return true;
    // Cosine per head, a warp each; the mean in the CPU's order.
    group_cosines<D>(G, q_s, active_q, cos_s);
    __syncthreads();
    if (threadIdx.x == 0) *need_s = mean_below(cos_s, G, threshold);
    __syncthreads();
    return *need_s != 0;
}

// ---- kernels ---------------------------------------------------------------

// FKV_SELECT_PENDING of a sequence whose pending selection fkv_attend made
// with the query and length fkv_select was given (the snapshot kernel
// cleared pending_attend otherwise): nothing to do.
__device__ __forceinline__ bool kept_from_attend(const fkv_dev_geometry &g,
                                                 const layer_view &L, int32_t mode) {
    return mode == FKV_SELECT_PENDING && *L.at<int32_t>(g.off_pending_attend) != 0;
}

// Length of sequence slot's layer for the mode and its candidate range,
// clamped to the capacity (select_kernel flags a length past it).
__device__ __forceinline__ int candidates(const fkv_dev_geometry &g,
                                          const fkv_dev_state &st,
                                          const layer_view &L, int slot,
                                          int32_t layer, int32_t mode,
                                          int &first, bool &clamped) {
    const int32_t n = mode == FKV_SELECT_PENDING ? *L.at<int32_t>(g.off_snap_len)
                                                 : seq_len(g, st, slot, layer);
    const page_ranges r(g, n);
    first = r.cand_first;
    int cand = r.cand_count;
    clamped = r.cand_first + cand > g.max_pages;
    if (clamped) cand = g.max_pages > r.cand_first ? g.max_pages - r.cand_first : 0;
    return cand;
}

// The group's query (heads h*G .. h*G+G-1 are contiguous) as float: the
// mode's (pending_q for FKV_SELECT_PENDING, else q of batch row i).
template <typename T, int D>
__device__ __forceinline__ void load_query(const fkv_dev_geometry &g,
                                           const layer_view &L, const T *q,
                                           int32_t mode, int i, int h, float *q_s) {
    const int G = g.group;
    const size_t q_first = (size_t)h * G * D;
    if (mode == FKV_SELECT_PENDING) {
        const float *pq = L.at<float>(g.off_pending_q) + q_first;
        for (int j = threadIdx.x; j < G * D; j += kThreads) q_s[j] = pq[j];
    } else {
        const T *qi = q + (size_t)i * g.q_heads * D + q_first;
        for (int j = threadIdx.x; j < G * D; j += kThreads) q_s[j] = to_f<T>(qi[j]);
    }
}

// Both kernels take the structs by value (__grid_constant__: read in place
// in parameter space, no per-thread copies, and addressable for layer_view),
// so that a captured graph holds everything it needs.

// Scores candidate pages [cand_first + c * chunk, min(+ chunk, cand_first +
// cand)) of (sequence b.slot[z], KV head y), c = blockIdx.x, into st.scores,
// when select_kernel will need them (it does not score). Writes nothing
// else: no counter, output or error bit (select_kernel owns those).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)
score_kernel(const __grid_constant__ fkv_dev_geometry g,
             const __grid_constant__ fkv_dev_state st,
             const __grid_constant__ fkv_dev_batch b, int32_t layer,
             const T *__restrict__ q, int32_t mode, int32_t chunk) {
    // Dynamic: q_s [G][D] floats. Every mode scores every head: the
    // attend's modes select at attend (the next step's speculative set).
    extern __shared__ float4 dyn_smem[];
    const int G = g.group, K = g.select_pages;
    float *q_s = reinterpret_cast<float *>(dyn_smem);

    const int c = blockIdx.x, h = blockIdx.y, i = blockIdx.z;
    const int slot = b.slot[i];
    const layer_view L(g, st, slot, layer);
    if (kept_from_attend(g, L, mode)) return;
    int first;
    bool clamped;
    const int cand = candidates(g, st, L, slot, layer, mode, first, clamped);
    // select_pages scores nothing in these cases.
    if (cand <= K || K <= 0) return;
    const int lo = c * chunk;  // < max_pages + chunk: no overflow
    if (lo >= cand) return;    // past this sequence's candidates
    const int count = cand - lo < chunk ? cand - lo : chunk;

    load_query<T, D>(g, L, q, mode, i, h, q_s);
    __syncthreads();

    const size_t row = (size_t)slot * g.kv_heads + h;
    float *scores = st.scores + row * G * g.max_pages;  // [G][max_pages]
    score_pages<T, D>(L, h, first + lo, count, G, q_s, scores, g.max_pages, nullptr);
}

// The selection kernel's shared arrays for its tail's plan (kPlan), past
// the selection's own: what the plan reads, prefetched with cp.async at the
// block's start (where they would otherwise be dependent loads on the
// critical path after the top-K), and the top-K the block selected.
struct tail_arrays {
    uint64_t *blocks;    // [K] pool blocks of the selected pages (cp.async)
    float *active_q;     // [G][D] the active set's query (FKV_SELECT_CORRECT)
    int32_t *slot_page;  // [K] page in each slot
    int32_t *active;     // [K] active pages (FKV_SELECT_CORRECT)
    int32_t *selected;   // [K] this block's top-K
    float *cos;          // [G] kLate: the correction check's cosines
};

// What select_head leaves the kPlan tail: the size of the set the plan
// makes active (FKV_RECALL_FIX's fix_count: -1 for none) and the active
// count the block read at its start (the set kept when there is none).
struct tail_counts {
    int32_t fix_count, active_count;
};

// One (KV head, sequence) of select_kernel: the correction decision, the
// selection from the scores and every output and counter. Returns together
// across the block. kPlan: also fills t (the selected set and its pool
// blocks, the prefetched arrays) for the plan that follows. kLate (kPlan
// only; FKV_CUDA_EXPERIMENTAL): FKV_SELECT_CORRECT's warps compute the
// cosines before the top-K without waiting for each other, and the block
// decides after it (the top-K's barriers publish them), instead of two
// barriers before the top-K; the same arithmetic, so the same decision.

template <typename T, int D, bool kPlan, bool kLate>
__device__ __forceinline__ tail_counts select_head(const fkv_dev_geometry &g,
                                               const fkv_dev_state &st,
                                               const fkv_dev_batch &b, const layer_view &L,
                                               int32_t layer, const T *__restrict__ q,
                                               int32_t mode, int32_t key_cap,
                                               float4 *dyn_smem, block_shared &sh,
                                               const tail_arrays &t) {
    // Dynamic: q_s [G][D] floats, head_max [G] keys, head_sum [G] floats
    // (the cosines in FKV_SELECT_CORRECT), keys_s [key_cap]. float4: 16-byte
    // aligned rows.
    const int G = g.group, K = g.select_pages, tid = threadIdx.x;
    float *q_s = reinterpret_cast<float *>(dyn_smem);
    uint32_t *head_max = reinterpret_cast<uint32_t *>(q_s + (size_t)G * D);
    float *head_sum = reinterpret_cast<float *>(head_max + G);
    uint32_t *keys_s = reinterpret_cast<uint32_t *>(head_sum + G);

    const int h = blockIdx.x, i = blockIdx.y;
    const int slot = b.slot[i];
    if (kept_from_attend(g, L, mode)) return {-1, 0};  // fkv_select: bookkeeping

    const size_t q_first = (size_t)h * G * D;
    int32_t ac_start = 0;  // kPlan: active_count, read once
    if constexpr (kPlan) {
        // Prefetch what the correction check and the plan read; they land
        // while the length and the query load.
        const int32_t *slots_of = L.k_array(g.off_slot_page, h);
        for (int j = tid; j < K; j += kThreads) cp_async4(t.slot_page + j, slots_of + j);
        if (mode == FKV_SELECT_CORRECT) {
            const int32_t *active = L.k_array(g.off_active_pages, h);
            for (int j = tid; j < K; j += kThreads) cp_async4(t.active + j, active + j);
            // 4-byte copies: the metadata's float arrays are 4-byte aligned.
            const float *aq = L.at<float>(g.off_active_q) + q_first;
            for (int j = tid; j < G * D; j += kThreads) cp_async4(t.active_q + j, aq + j);
        }
        cp_async_commit();
        ac_start = L.h_array(g.off_active_count)[h];
    }

    // 1. Length and candidate range.
    int first;
    bool clamped;
    const int cand = candidates(g, st, L, slot, layer, mode, first, clamped);
    if (clamped && tid == 0)  // a length past the capacity
        atomicOr(st.error, (unsigned)FKV_DEV_ERR_INTERNAL);

    // 2. The group's query as float.
    load_query<T, D>(g, L, q, mode, i, h, q_s);
    for (int j = tid; j < G; j += kThreads) head_max[j] = 0u;  // below any key
    if constexpr (kPlan) cp_async_wait<0>();  // the barrier publishes them
    __syncthreads();

    int32_t *out_pages, *out_count;
    const bool at_attend = mode == FKV_SELECT_CORRECT || mode == FKV_SELECT_BOUNDED;
    bool need = false;  // FKV_SELECT_CORRECT: correct this head now
    [[maybe_unused]] bool must = false;  // kLate: corrected whatever the cosines
    // A corrected head's query becomes the active set's (what the next
    // check compares with), written to active_q after every read of it.
    auto adopt_query = [&](float *active_q) {
        for (int j = tid; j < G * D; j += kThreads) active_q[j] = q_s[j];
    };
    if (at_attend) {
        // Select at attend: every head's top-K with q is the next step's
        // speculative set (pending), whether or not it is corrected now.
        if (tid == 0) atomicAdd(st.counters + FKV_DEV_HEADS_CHECKED, 1ull);
        if (mode == FKV_SELECT_CORRECT) {
            if constexpr (kLate) {
                must = must_correct(ac_start, cand, K);
                if (!must) group_cosines<D>(G, q_s, t.active_q, t.cos);
            } else {
                float *active_q = L.at<float>(g.off_active_q) + q_first;
                need = need_correction<D>(kPlan ? ac_start : L.h_array(g.off_active_count)[h],
                                          cand, g.select_pages, G, g.threshold, q_s,
                                          kPlan ? t.active_q : active_q, head_sum, &sh.need);
                // Every thread has read active_q (the barrier at its end).
                if (need) adopt_query(active_q);
            }
        }
        out_pages = L.k_array(g.off_pending_pages, h);
        out_count = L.h_array(g.off_pending_count) + h;
    } else if (mode == FKV_SELECT_ACTIVE) {
        out_pages = L.k_array(g.off_active_pages, h);
        out_count = L.h_array(g.off_active_count) + h;
    } else if (mode == FKV_SELECT_PENDING) {
        out_pages = L.k_array(g.off_pending_pages, h);
        out_count = L.h_array(g.off_pending_count) + h;
    } else {  // FKV_SELECT_FIX_ALL
        out_pages = L.k_array(g.off_fix_pages, h);
        out_count = L.h_array(g.off_fix_count) + h;
    }

    // 4. Select (kPlan: into shared memory, then copied out, so that the
    // plan reads the set without a round trip to global memory).
    const uint64_t *blocks =
        kPlan ? st.block_ptr + ((uint64_t)slot * g.layers + layer) * g.max_pages : nullptr;
    const int count = select_pages(g, st, slot, h, first, cand, head_max, head_sum, keys_s,
                                   key_cap, sh, kPlan ? t.selected : out_pages, blocks,
                                   kPlan ? t.blocks : nullptr);
    if (tid == 0) *out_count = count;
    const int32_t *selected = out_pages;
    if constexpr (kPlan) {
        __syncthreads();  // every page of t.selected written (kLate: and t.cos)
        for (int j = tid; j < count; j += kThreads) out_pages[j] = t.selected[j];
        selected = t.selected;
        if constexpr (kLate) {
            if (mode == FKV_SELECT_CORRECT) {
                // Every thread decides from the same published cosines; the
                // active query in global memory was read by no one (the
                // cosines read its prefetched copy).
                need = must || mean_below(t.cos, G, g.threshold);
                if (need) adopt_query(L.at<float>(g.off_active_q) + q_first);
            }
        }
    }
    if (at_attend) {
        // The query and length fkv_select compares with (snapshot.cu).
        float *pending_q = L.at<float>(g.off_pending_q) + q_first;
        for (int j = tid; j < G * D; j += kThreads) pending_q[j] = q_s[j];
        const int32_t ac = kPlan ? ac_start : L.h_array(g.off_active_count)[h];
        const bool full = must_correct(ac, cand, K);
        if (!kPlan) __syncthreads();  // every page of out_pages written
        int32_t *fix_count = L.h_array(g.off_fix_count) + h;
        if (mode == FKV_SELECT_CORRECT ? need : full) {  // the whole top-K now
            int32_t *fix = L.k_array(g.off_fix_pages, h);
            for (int j = tid; j < count; j += kThreads) fix[j] = selected[j];
            if (tid == 0) {
                *fix_count = count;
                atomicAdd(st.counters + FKV_DEV_CORRECTIONS, 1ull);
            }
        } else if (mode == FKV_SELECT_CORRECT || cand <= K || K <= 0) {
            if (tid == 0) *fix_count = -1;  // the speculative set serves
        }  // else (BOUNDED) fkv_launch_bounded decides
        if (tid == 0) {
            L.h_array(g.off_pending_valid)[h] = 1;
            if (h == 0) {
                *L.at<int32_t>(g.off_snap_len) = seq_len(g, st, slot, layer);
                *L.at<int32_t>(g.off_pending_attend) = 1;
            }
        }
    }
    if (mode == FKV_SELECT_PENDING) {
        __syncthreads();  // every page written before the flag
        if (tid == 0) L.h_array(g.off_pending_valid)[h] = 1;
    }
    // The set FKV_RECALL_FIX makes active (kPlan modes: CORRECT, FIX_ALL).
    return {mode == FKV_SELECT_FIX_ALL || need ? count : -1, ac_start};
}

// Bytes of the selection's own dynamic shared memory in the kPlan kernel,
// where the tail arrays start (16-byte aligned): the plan's scratch (3 K
// int32) and the bulk gather's stages reuse it.
inline size_t tail_arrays_at(size_t select_smem, int32_t K, bool gather) {
    size_t at = select_smem;
    const size_t scratch = 3 * (size_t)(K > 0 ? K : 0) * sizeof(int32_t);
    if (at < scratch) at = scratch;
    if (gather && at < bulk::kGatherStageBytes) at = bulk::kGatherStageBytes;
    return (at + 15) / 16 * 16;
}
inline size_t tail_arrays_bytes(int32_t G, int32_t D, int32_t K, bool late) {
    const size_t k = K > 0 ? (size_t)K : 0;
    return k * sizeof(uint64_t) + (size_t)G * D * sizeof(float) + 3 * k * sizeof(int32_t) +
           (late ? (size_t)G * sizeof(float) : 0);
}

// One block per (KV head, sequence). kPlan (the attend's FKV_SELECT_CORRECT
// and FKV_SELECT_FIX_ALL with FKV_TAIL_PLAN or FKV_TAIL_GATHER): the block
// goes on to the correction recall's plan (plan.cuh), from the set it
// selected and the slots it prefetched, which the separate plan launch
// would make from the same arrays, so that only the gather follows, or
// nothing when the attention fetches; with FKV_TAIL_GATHER (st.gather_bulk:
// FKV_CUDA_EXPERIMENTAL, sm_90) its thread 0 then gathers the head's units
// itself with TMA bulk copies. kPlan's region comes by value (regions),
// saving the dependent load of st.seq_base; its dynamic shared memory is
// the selection's (reused by the plan's scratch and the bulk stages) and
// then the tail arrays at tail_at. kLate: select_head's (kPlan only).
template <typename T, int D, bool kPlan, bool kLate = false>
__global__ void __launch_bounds__(kThreads, 2)
select_kernel(const __grid_constant__ fkv_dev_geometry g,
              const __grid_constant__ fkv_dev_state st,
              const __grid_constant__ fkv_dev_batch b, int32_t layer,
              const T *__restrict__ q, int32_t mode, int32_t key_cap, int32_t tail,
              int32_t tail_at, const __grid_constant__ region_table regions) {
    extern __shared__ float4 dyn_smem[];
    __shared__ block_shared sh;
    const int32_t slot = b.slot[blockIdx.y];
    const layer_view L = kPlan ? layer_view(g, regions.base[blockIdx.y])
                               : layer_view(g, st, slot, layer);
    tail_arrays t = {};
    if constexpr (kPlan) {
        unsigned char *at = reinterpret_cast<unsigned char *>(dyn_smem) + tail_at;
        const int32_t K = g.select_pages > 0 ? g.select_pages : 0;
        t.blocks = reinterpret_cast<uint64_t *>(at);
        t.active_q = reinterpret_cast<float *>(t.blocks + K);
        t.slot_page = reinterpret_cast<int32_t *>(t.active_q + (size_t)g.group * D);
        t.active = t.slot_page + K;
        t.selected = t.active + K;
        if constexpr (kLate) t.cos = reinterpret_cast<float *>(t.selected + K);
    }
    static_assert(kPlan || !kLate, "the late check is the tail's");
    const tail_counts c =
        select_head<T, D, kPlan, kLate>(g, st, b, L, layer, q, mode, key_cap, dyn_smem, sh, t);
    if constexpr (kPlan) {
        // t.selected and the fix arrays written by the block are visible to
        // it past the barrier, and the selection's shared memory is free
        // for the plan's scratch. t.blocks may still be landing: the plan
        // waits for them where it reads them.
        __syncthreads();
        plan_input in;
        in.pages = t.selected;
        in.count = c.fix_count;
        in.slot_page = t.slot_page;
        in.blocks = t.blocks;
        in.blocks_async = true;
        in.active_pages = t.active;
        in.active_count = c.active_count;
        plan_apply<kThreads>(g, st, L, slot, blockIdx.x, layer, FKV_RECALL_FIX, in,
                             reinterpret_cast<int32_t *>(dyn_smem), sh.warp_u);
#if FKV_HAS_BULK_COPY
        if (tail == FKV_TAIL_GATHER)
            recall_gather_own(g, st, slot, blockIdx.x, bulk::shared_addr(dyn_smem));
#endif
    }
    (void)tail;
}

// Pages per score_kernel block. The grid may depend only on the geometry,
// the device and the batch size, never on lengths: launches are captured in
// CUDA graphs and replayed at longer lengths, so the chunks cover max_pages
// and blocks past a sequence's candidates exit at once. The chunk aims at
// about kScoreBlocksPerSm blocks per SM in all (enough to cover the GPU and
// balance chunks of unequal lengths, a block per chunk being a few us of
// loads at most), but is at least kMinChunk pages so that each block's
// fixed cost (the query, the correction check) stays small beside its
// scoring. A multiple of the pages a score_pages step covers (kWarps * U:
// 64, 32, 16 for D = 64, 128, 256), so that no warp idles inside a chunk.
constexpr int kScoreBlocksPerSm = 4;
constexpr int kMinChunk = 64;

template <int D> int score_chunk(const fkv_dev_geometry &g, const fkv_dev_limits &lim, int n) {
    constexpr int kStep = kWarps * (512 / D);
    static_assert(kMinChunk % kStep == 0, "kMinChunk: whole steps");
    const long long blocks = (long long)kScoreBlocksPerSm * (lim.sm_count > 1 ? lim.sm_count : 1);
    const long long heads = (long long)g.kv_heads * n;    // >= 1
    const long long want = (blocks + heads - 1) / heads;  // chunks per head
    long long chunk = (g.max_pages + want - 1) / want;
    chunk = (chunk + kStep - 1) / kStep * kStep;
    return chunk < kMinChunk ? kMinChunk : (int)chunk;
}

// Dynamic shared memory of the two kernels for a geometry (the launches and
// fkv_select_init agree through these).
template <int D> size_t score_smem(const fkv_dev_geometry &g) {
    return (size_t)g.group * D * sizeof(float);
}
template <int D> size_t select_base_smem(const fkv_dev_geometry &g) {
    return ((size_t)g.group * D + 2 * (size_t)g.group) * sizeof(float);
}
// Room for every page's key when that keeps the block within the default
// 48 KiB (up to ~10K pages); longer sequences read the keys from agg.
template <int D> int32_t select_key_cap(const fkv_dev_geometry &g) {
    const size_t keys = (size_t)(g.max_pages > 0 ? g.max_pages : 0) * sizeof(uint32_t);
    return select_base_smem<D>(g) + keys <= 48 * 1024 ? g.max_pages : 0;
}
template <int D> size_t select_smem(const fkv_dev_geometry &g) {
    const int32_t key_cap = select_key_cap<D>(g);
    return select_base_smem<D>(g) + (key_cap > 0 ? (size_t)key_cap * sizeof(uint32_t) : 0);
}
// select_kernel<.., true>: the selection's bytes (reused by the plan's
// scratch and, with the gather, the bulk stages), then the tail arrays.
template <int D> size_t select_tail_at(const fkv_dev_geometry &g, bool gather) {
    return tail_arrays_at(select_smem<D>(g), g.select_pages, gather);
}
template <int D> size_t select_plan_smem(const fkv_dev_geometry &g, bool gather, bool late) {
    return select_tail_at<D>(g, gather) + tail_arrays_bytes(g.group, D, g.select_pages, late);
}
inline bool needs_scores(const fkv_dev_geometry &g) {
    return g.select_pages > 0 && g.max_pages > g.select_pages;
}

// Beyond the default (48 KiB less the kernel's static shared memory) a
// kernel needs the opt-in, set once here: to the most the device allows,
// not to this geometry's need, so that caches of other group sizes sharing
// the kernel only ever raise it, never lower it under each other.
template <typename K> cudaError_t allow_smem(K kernel, size_t need, const fkv_dev_limits &lim) {
    cudaFuncAttributes a;
    cudaError_t e = cudaFuncGetAttributes(&a, kernel);
    if (e != cudaSuccess) return e;
    if (need <= (size_t)a.maxDynamicSharedSizeBytes) return cudaSuccess;
    const long long most = (long long)lim.smem_per_block_optin - (long long)a.sharedSizeBytes;
    if (most < (long long)need) return cudaErrorInvalidValue;  // the group is too large
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)most);
}

template <typename T, int D>
cudaError_t init(const fkv_dev_geometry &g, const fkv_dev_limits &lim, bool fuse_plan,
                 bool gather_bulk, bool late_check) {
    if (needs_scores(g)) {
        cudaError_t e = allow_smem(score_kernel<T, D>, score_smem<D>(g), lim);
        if (e != cudaSuccess) return e;
    }
    if (fuse_plan) {
        cudaError_t e = allow_smem(select_kernel<T, D, true>,
                                   select_plan_smem<D>(g, gather_bulk, false), lim);
        if (e != cudaSuccess) return e;
    }
    if (fuse_plan && late_check) {
        cudaError_t e = allow_smem(select_kernel<T, D, true, true>,
                                   select_plan_smem<D>(g, gather_bulk, true), lim);
        if (e != cudaSuccess) return e;
    }
    return allow_smem(select_kernel<T, D, false>, select_smem<D>(g), lim);
}

template <typename T, int D>
cudaError_t launch(const fkv_dev_geometry &g, const fkv_dev_limits &lim,
                   const fkv_dev_state &st, const fkv_dev_batch &b, int32_t layer,
                   const void *q, fkv_select_mode mode, fkv_select_tail tail,
                   const region_table &regions, cudaStream_t stream) {
    const T *qt = static_cast<const T *>(q);
    // 1. Scores. None when every sequence's candidates fit in K (a sequence
    // has at most max_pages) or K <= 0; then select_kernel scores nothing.
    // Shared memory above 48 KiB was opted in at fkv_create (init above).
    if (needs_scores(g)) {
        const int32_t chunk = score_chunk<D>(g, lim, b.n);
        const unsigned chunks = (unsigned)((g.max_pages + chunk - 1) / chunk);
        const cudaError_t e =
            enqueue(score_kernel<T, D>, dim3(chunks, (unsigned)g.kv_heads, (unsigned)b.n),
                    kThreads, score_smem<D>(g), stream, g, st, b, layer, qt, (int32_t)mode, chunk);
        if (e != cudaSuccess) return e;
    }

    // 2. Selection (and with a tail the correction recall's plan).
    const dim3 grid((unsigned)g.kv_heads, (unsigned)b.n);
    if (tail != FKV_TAIL_NONE) {
        const bool gather = tail == FKV_TAIL_GATHER;
        const int32_t at = (int32_t)select_tail_at<D>(g, gather);
        if (tail == FKV_TAIL_PLAN_LATE && mode == FKV_SELECT_CORRECT)
            return enqueue(select_kernel<T, D, true, true>, grid, kThreads,
                           select_plan_smem<D>(g, gather, true), stream, g, st, b, layer, qt,
                           (int32_t)mode, select_key_cap<D>(g), (int32_t)tail, at, regions);
        return enqueue(select_kernel<T, D, true>, grid, kThreads,
                       select_plan_smem<D>(g, gather, false), stream, g, st, b, layer, qt,
                       (int32_t)mode, select_key_cap<D>(g), (int32_t)tail, at, regions);
    }
    return enqueue(select_kernel<T, D, false>, grid, kThreads, select_smem<D>(g), stream, g, st,
                   b, layer, qt, (int32_t)mode, select_key_cap<D>(g), (int32_t)tail, 0, regions);
}

} // namespace
} // namespace fkv

extern "C" cudaError_t fkv_select_init(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                                       int32_t fuse_plan, int32_t gather_bulk,
                                       int32_t late_check) {
    if (!g || !lim) return cudaErrorInvalidValue;
    return fkv::dispatch_dtype(g->dtype, [&](auto dtag) {
        using T = decltype(dtag);
        return fkv::dispatch_head_dim(g->head_dim, [&](auto htag) {
            return fkv::init<T, decltype(htag)::value>(*g, *lim, fuse_plan != 0,
                                                       gather_bulk != 0, late_check != 0);
        });
    });
}

extern "C" cudaError_t fkv_launch_select(const fkv_dev_geometry *g,
                                         const fkv_dev_limits *lim,
                                         const fkv_dev_state *st,
                                         const fkv_dev_batch *b, int32_t layer,
                                         const void *q, fkv_select_mode mode,
                                         fkv_select_tail tail,
                                         unsigned char *const *seq_base_host,
                                         cudaStream_t stream) {
    if (!g || !lim || !st || !b || b->n < 0 || b->n > FKV_DEV_MAX_BATCH)
        return cudaErrorInvalidValue;
    if (b->n == 0) return cudaSuccess;
    if (g->kv_heads <= 0 || g->group <= 0 || layer < 0 || layer >= g->layers)
        return cudaErrorInvalidValue;
    if (mode != FKV_SELECT_PENDING && mode != FKV_SELECT_CORRECT &&
        mode != FKV_SELECT_FIX_ALL && mode != FKV_SELECT_ACTIVE &&
        mode != FKV_SELECT_BOUNDED)
        return cudaErrorInvalidValue;
    if (mode != FKV_SELECT_PENDING && !q) return cudaErrorInvalidValue;
    if (tail != FKV_TAIL_NONE && tail != FKV_TAIL_PLAN && tail != FKV_TAIL_GATHER &&
        tail != FKV_TAIL_PLAN_LATE)
        return cudaErrorInvalidValue;
    // Only the attend's correction recall (FKV_RECALL_FIX) follows these;
    // the tail's launch takes the regions by value.
    fkv::region_table regions = {};
    if (tail != FKV_TAIL_NONE) {
        if (mode != FKV_SELECT_CORRECT && mode != FKV_SELECT_FIX_ALL) return cudaErrorInvalidValue;
        if (tail == FKV_TAIL_GATHER && !st->gather_bulk) return cudaErrorInvalidValue;
        if (!fkv::fill_regions(*g, *st, *b, seq_base_host, regions))
            return cudaErrorInvalidValue;
    }
    return fkv::dispatch_dtype(g->dtype, [&](auto dtag) {
        using T = decltype(dtag);
        return fkv::dispatch_head_dim(g->head_dim, [&](auto htag) {
            constexpr int D = decltype(htag)::value;
            return fkv::launch<T, D>(*g, *lim, *st, *b, layer, q, mode, tail, regions, stream);
        });
    });
}
