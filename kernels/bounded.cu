// BOUNDED's cumulative rule at fkv_attend (docs/design.md section 4, step
// 4), after select_kernel's FKV_SELECT_BOUNDED pass on the same stream has
// left the page scores of the current query in st.scores and its top-K T
// in pending_pages. One block per (KV head, sequence); heads with at most K
// candidates or no active selection were settled by that pass and exit.
//
// The masses are computed in double from the float page scores (exp in
// double: a float exp underflows to 0 for pages the double reference still
// orders), and the rule is evaluated as the deficit want - have =
// a(T - A) - a(A - T) - m a(T), which the pages common to T and A do not
// enter, so that their rounding cannot decide a fetch. The order of the
// missing pages (most mass first) and of the pages they replace (least
// first), ties to the lower page, is the CPU backend's (lib/correction.c).
// Every step is parallel: ranks by counting, the stopping point by a warp
// scan and ballot. The same block then makes the correction recall's plan
// (plan.cuh, FKV_RECALL_FIX) for its head, settled or not, so that no plan
// launch follows (one launch fewer per layer on the critical path).
#include <math.h>

#include "common.cuh"
#include "plan.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / fkv::kWarp;
constexpr unsigned kFull = 0xffffffffu;

struct reduce_shared {
    double d[kWarps];
    float f[kWarps];
};

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = fkv::kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

// Block-wide sums and maxima, the same result to every thread in a fixed
// order (deterministic). Both end with a barrier so `s` can be reused.
__device__ __forceinline__ double block_sum_d(double v, reduce_shared &s) {
    v = warp_sum_d(v);
    if ((threadIdx.x & (fkv::kWarp - 1)) == 0) s.d[threadIdx.x / fkv::kWarp] = v;
    __syncthreads();
    double t = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; w++) t += s.d[w];
    __syncthreads();
    return t;
}

__device__ __forceinline__ float block_max_f(float v, reduce_shared &s) {
    v = fkv::warp_max(v);
    if ((threadIdx.x & (fkv::kWarp - 1)) == 0) s.f[threadIdx.x / fkv::kWarp] = v;
    __syncthreads();
    float t = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; w++) t = fmaxf(t, s.f[w]);
    __syncthreads();
    return t;
}

// Whether ascending list[0, n) holds page.
__device__ __forceinline__ bool holds(const int32_t *list, int32_t n, int32_t page) {
    int32_t lo = 0, hi = n;
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo) / 2;
        if (list[mid] < page) lo = mid + 1;
        else hi = mid;
    }
    return lo < n && list[lo] == page;
}

// A total order for the ranks: a NaN mass (NaN or Inf in q or k) ranks as
// -inf, then the lower page first, so that every rank is distinct and in
// bounds whatever the data.
__device__ __forceinline__ double rank_key(double m) { return isnan(m) ? -INFINITY : m; }

__device__ __forceinline__ bool heavier(double ma, int32_t pa, double mb, int32_t pb) {
    ma = rank_key(ma);
    mb = rank_key(mb);
    return ma > mb || (ma == mb && pa < pb);
}

__device__ __forceinline__ bool lighter(double ma, int32_t pa, double mb, int32_t pb) {
    ma = rank_key(ma);
    mb = rank_key(mb);
    return ma < mb || (ma == mb && pa < pb);
}

// The rule for head blockIdx.x of sequence blockIdx.y: writes fix_pages /
// fix_count unless FKV_SELECT_BOUNDED settled the head. Every thread calls
// it; its returns are the same for the whole block.
__device__ __forceinline__ void bounded_rule(const fkv_dev_geometry &g, const fkv_dev_state &st,
                                             const fkv_dev_batch &b, int32_t layer,
                                             double *dyn_d) {
    // dyn_d, doubles first: gsum [G], t_mass, a_mass, miss_mass, out_mass
    // [K]; then gmax [G] floats; then t_page, t_miss, a_page, a_out,
    // a_rank, miss_page, out_page [K] ints.
    __shared__ reduce_shared red;
    __shared__ int32_t nmiss_s, nout_s, nfetch_s;
    const int K = g.select_pages, G = g.group, tid = threadIdx.x;
    double *gsum = dyn_d;
    double *t_mass = gsum + G;
    double *a_mass = t_mass + K;
    double *miss_mass = a_mass + K;
    double *out_mass = miss_mass + K;
    float *gmax = reinterpret_cast<float *>(out_mass + K);
    int32_t *t_page = reinterpret_cast<int32_t *>(gmax + G);
    int32_t *t_miss = t_page + K;
    int32_t *a_page = t_miss + K;
    int32_t *a_out = a_page + K;   // 1: outside T
    int32_t *a_rank = a_out + K;   // its rank among A - T (where a_out)
    int32_t *miss_page = a_rank + K;
    int32_t *out_page = miss_page + K;

    const int h = blockIdx.x, i = blockIdx.y, slot = b.slot[i];
    const fkv::layer_view L(g, st, slot, layer);
    const fkv::page_ranges r(g, fkv::seq_len(g, st, slot, layer));
    const int first = r.cand_first;
    int cand = r.cand_count;
    if (first + cand > g.max_pages)  // select_kernel flags it
        cand = g.max_pages > first ? g.max_pages - first : 0;
    const int32_t ac = L.h_array(g.off_active_count)[h];
    // Settled by FKV_SELECT_BOUNDED (the same decision from the same data).
    if (K <= 0 || cand <= K || ac < 0) return;
    const int32_t na = ac < K ? ac : K;

    const size_t row = (size_t)slot * g.kv_heads + h;
    const float *scores = st.scores + row * G * g.max_pages;  // [G][max_pages]
    const double scale = (double)g.scale;

    // 1. Per query head, the largest score and the softmax denominator
    // over the candidates: each term's exp in float, summed in double. The
    // double exp of every candidate was this kernel's largest cost at
    // batch 1 (one block per KV head); a float term is within 2 ulp, so
    // the sum differs from the CPU's double one by about 1e-7 relative.
    const float scale_f = g.scale;
    for (int gh = 0; gh < G; gh++) {
        const float *s = scores + (size_t)gh * g.max_pages + first;
        float m = -INFINITY;
        for (int p = tid; p < cand; p += kThreads) m = fmaxf(m, s[p]);
        m = block_max_f(m, red);
        double sum = 0.0;
        for (int p = tid; p < cand; p += kThreads)
            sum += (double)expf(scale_f * (s[p] - m));
        sum = block_sum_d(sum, red);
        if (tid == 0) {
            gmax[gh] = m;
            gsum[gh] = sum;
        }
    }
    if (tid == 0) {
        nmiss_s = 0;
        nout_s = 0;
    }
    __syncthreads();

    // 2. Masses of T's and A's pages (the mean over the group of each
    // head's softmax probability, summed in head order as on the CPU), and
    // which are missing from A or outside T.
    const int32_t *top = L.k_array(g.off_pending_pages, h);
    const int32_t *active = L.k_array(g.off_active_pages, h);
    auto mass_of = [&](int32_t p) {
        if (p < first || p >= first + cand) return 0.0;  // never: A, T are candidates
        double a = 0.0;
        for (int gh = 0; gh < G; gh++)
            a += exp(scale * ((double)scores[(size_t)gh * g.max_pages + p] -
                              (double)gmax[gh])) / gsum[gh];
        return a / G;
    };
    for (int j = tid; j < K; j += kThreads) {
        const int32_t p = top[j];
        t_page[j] = p;
        t_mass[j] = mass_of(p);
        t_miss[j] = !holds(active, na, p);
        if (t_miss[j]) atomicAdd(&nmiss_s, 1);
    }
    for (int j = tid; j < na; j += kThreads) {
        const int32_t p = active[j];
        a_page[j] = p;
        a_mass[j] = mass_of(p);
        a_out[j] = !holds(top, K, p);
        if (a_out[j]) atomicAdd(&nout_s, 1);
    }
    __syncthreads();
    const int32_t nmiss = nmiss_s, nout = nout_s;

    // 3. The missing pages most mass first, the pages outside T least mass
    // first (ties: lower page), by counting.
    for (int j = tid; j < K; j += kThreads) {
        if (!t_miss[j]) continue;
        int32_t rank = 0;
        for (int x = 0; x < K; x++)
            rank += t_miss[x] && heavier(t_mass[x], t_page[x], t_mass[j], t_page[j]);
        miss_page[rank] = t_page[j];
        miss_mass[rank] = t_mass[j];
    }
    for (int j = tid; j < na; j += kThreads) {
        if (!a_out[j]) continue;
        int32_t rank = 0;
        for (int x = 0; x < na; x++)
            rank += a_out[x] && lighter(a_mass[x], a_page[x], a_mass[j], a_page[j]);
        out_page[rank] = a_page[j];
        out_mass[rank] = a_mass[j];
        a_rank[j] = rank;
    }
    __syncthreads();

    // 4. How many to fetch: the first j < min(nmiss, M) at which the
    // deficit is no longer positive, where fetching page j adds its mass
    // and, past the free positions, takes away the replaced page's. One
    // warp: a scan of those changes and a ballot per 32 pages.
    if (tid < fkv::kWarp) {
        const int lane = tid;
        const int32_t lim = nmiss < g.max_fetch ? nmiss : g.max_fetch;
        const int32_t free_pos = K - na;
        double sm = 0.0, so = 0.0, st_ = 0.0;
        for (int j = lane; j < nmiss; j += fkv::kWarp) sm += miss_mass[j];
        for (int j = lane; j < nout; j += fkv::kWarp) so += out_mass[j];
        for (int j = lane; j < K; j += fkv::kWarp) st_ += t_mass[j];
        sm = warp_sum_d(sm);
        so = warp_sum_d(so);
        st_ = warp_sum_d(st_);
        double deficit = sm - so - (double)g.min_mass * st_;
        int32_t nfetch = lim;
        for (int base = 0; base < lim; base += fkv::kWarp) {
            const int j = base + lane;
            double delta = 0.0;
            if (j < lim) {
                delta = miss_mass[j];
                const int x = j - free_pos;
                if (x >= 0 && x < nout) delta -= out_mass[x];
            }
            double incl = delta;
#pragma unroll
            for (int o = 1; o < fkv::kWarp; o <<= 1) {
                const double y = __shfl_up_sync(kFull, incl, o);
                if (lane >= o) incl += y;
            }
            // The deficit before page j is fetched; !(> 0) also stops at NaN,
            // as the CPU's have < want does.
            const bool stop = j < lim && !(deficit - (incl - delta) > 0.0);
            const unsigned stops = __ballot_sync(kFull, stop);
            if (stops) {
                nfetch = base + __ffs(stops) - 1;
                break;
            }
            deficit -= __shfl_sync(kFull, incl, fkv::kWarp - 1);
        }
        if (lane == 0) nfetch_s = nfetch;
    }
    __syncthreads();
    const int32_t nfetch = nfetch_s;
    int32_t *fix_count = L.h_array(g.off_fix_count) + h;
    if (nfetch <= 0) {  // the active set stands
        if (tid == 0) *fix_count = -1;
        return;
    }

    // 5. The attended set (A - R) + F in ascending order, R the first
    // `replace` pages outside T: each page's position is how many pages of
    // the set are below it (they are distinct).
    int32_t replace = nfetch - (K - na);
    if (replace < 0) replace = 0;
    int32_t *fix = L.k_array(g.off_fix_pages, h);
    auto kept = [&](int x) { return !a_out[x] || a_rank[x] >= replace; };
    for (int j = tid; j < na + nfetch; j += kThreads) {
        int32_t p;
        if (j < na) {
            if (!kept(j)) continue;
            p = a_page[j];
        } else {
            p = miss_page[j - na];
        }
        int32_t pos = 0;
        for (int x = 0; x < na; x++) pos += kept(x) && a_page[x] < p;
        for (int x = 0; x < nfetch; x++) pos += miss_page[x] < p;
        if (pos < K) fix[pos] = p;  // always (|set| <= K); bounds kept anyway
    }
    if (tid == 0) {
        const int32_t n = na - replace + nfetch;
        *fix_count = n < K ? n : K;
        atomicAdd(st.counters + FKV_DEV_CORRECTIONS, 1ull);
    }
}

__global__ void __launch_bounds__(kThreads)
bounded_kernel(const __grid_constant__ fkv_dev_geometry g,
               const __grid_constant__ fkv_dev_state st,
               const __grid_constant__ fkv_dev_batch b, int32_t layer) {
    extern __shared__ double dyn_d[];
    __shared__ uint32_t warp_total[kWarps];
    bounded_rule(g, st, b, layer, dyn_d);
    // The rule's fix_pages / fix_count (global, this block's writes) are
    // visible after the barrier, and its shared arrays become the plan's.
    __syncthreads();
    fkv::recall_plan<kThreads>(g, st, b.slot[blockIdx.y], blockIdx.x, layer, FKV_RECALL_FIX,
                               reinterpret_cast<int32_t *>(dyn_d), warp_total);
}

// Dynamic shared memory of one block: the group's and the K pages' masses
// and ranks (more than the plan's 5 K int32, which reuse it).
size_t bounded_smem(const fkv_dev_geometry &g) {
    const size_t K = (size_t)(g.select_pages > 0 ? g.select_pages : 0), G = (size_t)g.group;
    return (G + 4 * K) * sizeof(double) + G * sizeof(float) + 7 * K * sizeof(int32_t);
}

} // namespace

extern "C" cudaError_t fkv_bounded_init(const fkv_dev_geometry *g) {
    if (!g) return cudaErrorInvalidValue;
    const size_t smem = bounded_smem(*g);
    if (smem <= 48 * 1024) return cudaSuccess;  // large K needs the opt-in limit
    return cudaFuncSetAttribute(bounded_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)smem);
}

extern "C" cudaError_t fkv_launch_bounded(const fkv_dev_geometry *g,
                                          const fkv_dev_state *st,
                                          const fkv_dev_batch *b, int32_t layer,
                                          cudaStream_t stream) {
    if (!g || !st || !b || b->n < 0 || b->n > FKV_DEV_MAX_BATCH)
        return cudaErrorInvalidValue;
    if (b->n == 0) return cudaSuccess;
    // Launched even where no head has more than K candidates: it plans.
    if (g->kv_heads <= 0 || g->group <= 0 || layer < 0 || layer >= g->layers)
        return cudaErrorInvalidValue;
    // fkv_bounded_init allowed the shared memory at fkv_create.
    bounded_kernel<<<dim3((unsigned)g->kv_heads, (unsigned)b->n), kThreads, bounded_smem(*g),
                     stream>>>(*g, *st, *b, layer);
    return cudaGetLastError();
}
