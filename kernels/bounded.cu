// BOUNDED's cumulative rule at fkv_attend (docs/design.md section 4, step
// 4), after select_kernel's FKV_SELECT_BOUNDED pass on the same stream has
// left the page scores of the current query in st.scores and its top-K T
// in pending_pages. One block per (KV head, sequence); heads with at most K
// candidates or no active selection were settled by that pass, and their
// block only plans.
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
// launch follows (one launch fewer per layer on the critical path). The
// block's one round of global loads (T, A and the slots by cp.async beside
// the scores) puts every later step in shared memory: the rule's set
// searches and the plan's inputs were dependent global loads before, and
// the per-head reductions took 4 G + 1 barriers (G the GQA group), now 4.
#include <math.h>

#include "common.cuh"
#include "launch.cuh"
#include "plan.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / fkv::kWarp;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ double warp_sum_d(double v) {
#pragma unroll
    for (int o = fkv::kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
}

// Whether ascending list[0, n) (shared memory) holds page.
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

// The block's dynamic shared memory, carved from one buffer: doubles
// first, then floats, then int32 arrays (K = select_pages, G = group).
struct rule_arrays {
    double *gsum;       // [G] softmax denominators
    double *wsum;       // [kWarps][G] per-warp partial denominators
    double *t_mass;     // [K] (t_mass.. out_mass: 4 K doubles, the plan's
    double *a_mass;     // [K]  scratch afterwards)
    double *miss_mass;  // [K]
    double *out_mass;   // [K]
    float *gmax;        // [G] largest score per query head
    float *wmax;        // [kWarps][G]
    int32_t *t_page;    // [K] T, staged from pending_pages
    int32_t *a_page;    // [K] A, staged from active_pages
    int32_t *slot_page; // [K] each slot's page, staged for the plan
    int32_t *fix;       // [K] the attended set the plan makes active
    int32_t *t_miss, *a_out, *a_rank, *miss_page, *out_page;  // [K] each

    __device__ __forceinline__ rule_arrays(double *buf, int G, int K) {
        gsum = buf;
        wsum = gsum + G;
        t_mass = wsum + kWarps * G;
        a_mass = t_mass + K;
        miss_mass = a_mass + K;
        out_mass = miss_mass + K;
        gmax = reinterpret_cast<float *>(out_mass + K);
        wmax = gmax + G;
        t_page = reinterpret_cast<int32_t *>(wmax + kWarps * G);
        a_page = t_page + K;
        slot_page = a_page + K;
        fix = slot_page + K;
        t_miss = fix + K;
        a_out = t_miss + K;
        a_rank = a_out + K;
        miss_page = a_rank + K;
        out_page = miss_page + K;
    }
    static size_t bytes(size_t G, size_t K) {
        return (G + kWarps * G + 4 * K) * sizeof(double) + (G + kWarps * G) * sizeof(float) +
               9 * K * sizeof(int32_t);
    }
};

// What the rule leaves for the plan.
struct rule_result {
    int32_t fix_count;  // the attended set's size in ra.fix; < 0: none (A stands)
    int32_t active;     // |A| staged in ra.a_page
    bool settled;       // FKV_SELECT_BOUNDED decided: the plan reads its fix
};

// The first j in [from, lim) at which the running deficit is no longer
// positive (lim if none), where taking missing page j adds its mass and,
// past the free positions, takes away the replaced page's; `deficit` is the
// deficit before page 0. One warp: a scan of those changes and a ballot per
// 32 pages. Every lane returns the same value.
__device__ __forceinline__ int32_t first_met(const rule_arrays &ra, double deficit,
                                             int32_t from, int32_t lim, int32_t free_pos,
                                             int32_t nout, int lane) {
    for (int base = 0; base < lim; base += fkv::kWarp) {
        const int j = base + lane;
        double delta = 0.0;
        if (j < lim) {
            delta = ra.miss_mass[j];
            const int x = j - free_pos;
            if (x >= 0 && x < nout) delta -= ra.out_mass[x];
        }
        double incl = delta;
#pragma unroll
        for (int o = 1; o < fkv::kWarp; o <<= 1) {
            const double y = __shfl_up_sync(kFull, incl, o);
            if (lane >= o) incl += y;
        }
        // The deficit before page j is taken; !(> 0) also stops at NaN, as
        // the CPU's have < want does.
        const bool stop = j >= from && j < lim && !(deficit - (incl - delta) > 0.0);
        const unsigned stops = __ballot_sync(kFull, stop);
        if (stops) return base + __ffs(stops) - 1;
        deficit -= __shfl_sync(kFull, incl, fkv::kWarp - 1);
    }
    return lim;
}

// With speculative_min_mass (kSpec): the pending set of head h becomes the
// walk's set after nspec missing pages, (A - R') + F', R' the first
// nspec - (K - na) pages outside T, in ascending order (each page's
// position is how many pages of the set are below it), replacing the top-K
// that select_kernel left there. The block staged that top-K at its start.
__device__ __forceinline__ void write_speculative_set(const fkv_dev_geometry &g,
                                                      const fkv::layer_view &L, int h,
                                                      const rule_arrays &ra, int32_t na,
                                                      int32_t nspec) {
    const int K = g.select_pages;
    int32_t replace = nspec - (K - na);
    if (replace < 0) replace = 0;
    int32_t *pending = L.k_array(g.off_pending_pages, h);
    auto kept = [&](int x) { return !ra.a_out[x] || ra.a_rank[x] >= replace; };
    for (int j = threadIdx.x; j < na + nspec; j += kThreads) {
        int32_t p;
        if (j < na) {
            if (!kept(j)) continue;
            p = ra.a_page[j];
        } else {
            p = ra.miss_page[j - na];
        }
        int32_t pos = 0;
        for (int x = 0; x < na; x++) pos += kept(x) && ra.a_page[x] < p;
        for (int x = 0; x < nspec; x++) pos += ra.miss_page[x] < p;
        if (pos < K) pending[pos] = p;  // always (|set| <= K); bounds kept anyway
    }
    if (threadIdx.x == 0) {
        const int32_t n = na - replace + nspec;
        L.h_array(g.off_pending_count)[h] = n < K ? n : K;
    }
}

// The rule for head blockIdx.x of sequence blockIdx.y. Every thread calls
// it; its result is the same for the whole block. The inputs (T, A, the
// slots) are copied into shared memory first, with the scores' first pass
// in flight, so that the rule's searches and the plan touch no global
// memory; per query head the reductions write per-warp results and one
// barrier serves every head.
template <bool kSpec>
__device__ __forceinline__ rule_result bounded_rule(const fkv_dev_geometry &g,
                                                    const fkv_dev_state &st,
                                                    const fkv::layer_view &L, int32_t slot,
                                                    int32_t layer, const rule_arrays &ra) {
    __shared__ int32_t nmiss_s, nout_s, nfetch_s, nspec_s;
    const int K = g.select_pages, G = g.group, tid = threadIdx.x;
    const int lane = tid & (fkv::kWarp - 1), warp = tid / fkv::kWarp;
    const int h = blockIdx.x;
    const fkv::page_ranges r(g, fkv::seq_len(g, st, slot, layer));
    const int first = r.cand_first;
    int cand = r.cand_count;
    if (first + cand > g.max_pages)  // select_kernel flags it
        cand = g.max_pages > first ? g.max_pages - first : 0;
    const int32_t ac = L.h_array(g.off_active_count)[h];
    // Settled by FKV_SELECT_BOUNDED (the same decision from the same data).
    if (K <= 0 || cand <= K || ac < 0) return {-1, 0, true};
    const int32_t na = ac < K ? ac : K;

    // 0. Stage T, A and the slots' pages (they land during step 1).
    {
        const int32_t *top = L.k_array(g.off_pending_pages, h);
        const int32_t *active = L.k_array(g.off_active_pages, h);
        const int32_t *slots_of = L.k_array(g.off_slot_page, h);
        for (int j = tid; j < K; j += kThreads) {
            fkv::cp_async4(ra.t_page + j, top + j);
            fkv::cp_async4(ra.slot_page + j, slots_of + j);
            if (j < na) fkv::cp_async4(ra.a_page + j, active + j);
        }
        fkv::cp_async_commit();
    }

    const size_t row = (size_t)slot * g.kv_heads + h;
    const float *scores = st.scores + row * G * g.max_pages;  // [G][max_pages]
    const double scale = (double)g.scale;

    // 1. Per query head, the largest score and the softmax denominator
    // over the candidates: each term's exp in float, summed in double. The
    // double exp of every candidate was this kernel's largest cost at
    // batch 1 (one block per KV head); a float term is within 2 ulp, so
    // the sum differs from the CPU's double one by about 1e-7 relative.
    // The warps' results are combined in warp order, the same every run.
    const float scale_f = g.scale;
    for (int gh = 0; gh < G; gh++) {
        const float *s = scores + (size_t)gh * g.max_pages + first;
        float m = -INFINITY;
        for (int p = tid; p < cand; p += kThreads) m = fmaxf(m, __ldg(s + p));
        m = fkv::warp_max(m);
        if (lane == 0) ra.wmax[warp * G + gh] = m;
    }
    __syncthreads();
    for (int gh = warp; gh < G; gh += kWarps) {
        if (lane == 0) {
            float m = -INFINITY;
            for (int w = 0; w < kWarps; w++) m = fmaxf(m, ra.wmax[w * G + gh]);
            ra.gmax[gh] = m;
        }
    }
    if (tid == 0) {
        nmiss_s = 0;
        nout_s = 0;
    }
    __syncthreads();
    for (int gh = 0; gh < G; gh++) {
        const float *s = scores + (size_t)gh * g.max_pages + first;
        const float m = ra.gmax[gh];
        double sum = 0.0;
        for (int p = tid; p < cand; p += kThreads)
            sum += (double)expf(scale_f * (__ldg(s + p) - m));
        sum = warp_sum_d(sum);
        if (lane == 0) ra.wsum[warp * G + gh] = sum;
    }
    fkv::cp_async_wait<0>();
    __syncthreads();  // wsum and the staged arrays visible
    for (int gh = tid; gh < G; gh += kThreads) {
        double t = 0.0;
        for (int w = 0; w < kWarps; w++) t += ra.wsum[w * G + gh];
        ra.gsum[gh] = t;
    }
    __syncthreads();

    // 2. Masses of T's and A's pages (the mean over the group of each
    // head's softmax probability, summed in head order as on the CPU), and
    // which are missing from A or outside T.
    auto mass_of = [&](int32_t p) {
        if (p < first || p >= first + cand) return 0.0;  // never: A, T are candidates
        double a = 0.0;
        for (int gh = 0; gh < G; gh++)
            a += exp(scale * ((double)__ldg(scores + (size_t)gh * g.max_pages + p) -
                              (double)ra.gmax[gh])) / ra.gsum[gh];
        return a / G;
    };
    for (int j = tid; j < K; j += kThreads) {
        const int32_t p = ra.t_page[j];
        ra.t_mass[j] = mass_of(p);
        ra.t_miss[j] = !holds(ra.a_page, na, p);
        if (ra.t_miss[j]) atomicAdd(&nmiss_s, 1);
    }
    for (int j = tid; j < na; j += kThreads) {
        const int32_t p = ra.a_page[j];
        ra.a_mass[j] = mass_of(p);
        ra.a_out[j] = !holds(ra.t_page, K, p);
        if (ra.a_out[j]) atomicAdd(&nout_s, 1);
    }
    __syncthreads();
    const int32_t nmiss = nmiss_s, nout = nout_s;

    // 3. The missing pages most mass first, the pages outside T least mass
    // first (ties: lower page), by counting.
    for (int j = tid; j < K; j += kThreads) {
        if (!ra.t_miss[j]) continue;
        int32_t rank = 0;
        for (int x = 0; x < K; x++)
            rank += ra.t_miss[x] &&
                    heavier(ra.t_mass[x], ra.t_page[x], ra.t_mass[j], ra.t_page[j]);
        ra.miss_page[rank] = ra.t_page[j];
        ra.miss_mass[rank] = ra.t_mass[j];
    }
    for (int j = tid; j < na; j += kThreads) {
        if (!ra.a_out[j]) continue;
        int32_t rank = 0;
        for (int x = 0; x < na; x++)
            rank += ra.a_out[x] &&
                    lighter(ra.a_mass[x], ra.a_page[x], ra.a_mass[j], ra.a_page[j]);
        ra.out_page[rank] = ra.a_page[j];
        ra.out_mass[rank] = ra.a_mass[j];
        ra.a_rank[j] = rank;
    }
    __syncthreads();

    // 4. How many to fetch: the first j < min(nmiss, M) at which the
    // deficit is no longer positive, where fetching page j adds its mass
    // and, past the free positions, takes away the replaced page's. One
    // warp: a scan of those changes and a ballot per 32 pages.
    if (warp == 0) {
        const int32_t lim = nmiss < g.max_fetch ? nmiss : g.max_fetch;
        const int32_t free_pos = K - na;
        double sm = 0.0, so = 0.0, st_ = 0.0;
        for (int j = lane; j < nmiss; j += fkv::kWarp) sm += ra.miss_mass[j];
        for (int j = lane; j < nout; j += fkv::kWarp) so += ra.out_mass[j];
        for (int j = lane; j < K; j += fkv::kWarp) st_ += ra.t_mass[j];
        sm = warp_sum_d(sm);
        so = warp_sum_d(so);
        st_ = warp_sum_d(st_);
        const double deficit = sm - so - (double)g.min_mass * st_;
        const int32_t nfetch = first_met(ra, deficit, 0, lim, free_pos, nout, lane);
        if (lane == 0) nfetch_s = nfetch;
        if constexpr (kSpec) {
            // The same walk on from the attended set, without the cap, to
            // (1 - s) of T's mass.
            const double spec_deficit = sm - so - (double)g.spec_min_mass * st_;
            const int32_t nspec =
                first_met(ra, spec_deficit, nfetch, nmiss, free_pos, nout, lane);
            if (lane == 0) nspec_s = nspec;
        }
    }
    __syncthreads();
    const int32_t nfetch = nfetch_s;
    if constexpr (kSpec) write_speculative_set(g, L, h, ra, na, nspec_s);
    if (nfetch <= 0) return {-1, na, false};  // the active set stands

    // 5. The attended set (A - R) + F in ascending order, R the first
    // `replace` pages outside T: each page's position is how many pages of
    // the set are below it (they are distinct).
    int32_t replace = nfetch - (K - na);
    if (replace < 0) replace = 0;
    auto kept = [&](int x) { return !ra.a_out[x] || ra.a_rank[x] >= replace; };
    for (int j = tid; j < na + nfetch; j += kThreads) {
        int32_t p;
        if (j < na) {
            if (!kept(j)) continue;
            p = ra.a_page[j];
        } else {
            p = ra.miss_page[j - na];
        }
        int32_t pos = 0;
        for (int x = 0; x < na; x++) pos += kept(x) && ra.a_page[x] < p;
        for (int x = 0; x < nfetch; x++) pos += ra.miss_page[x] < p;
        if (pos < K) ra.fix[pos] = p;  // always (|set| <= K); bounds kept anyway
    }
    if (tid == 0) atomicAdd(st.counters + FKV_DEV_CORRECTIONS, 1ull);
    const int32_t n = na - replace + nfetch;
    return {n < K ? n : K, na, false};
}

template <bool kSpec>
__global__ void __launch_bounds__(kThreads)
bounded_kernel(const __grid_constant__ fkv_dev_geometry g,
               const __grid_constant__ fkv_dev_state st,
               const __grid_constant__ fkv_dev_batch b, int32_t layer,
               const __grid_constant__ fkv::region_table regions) {
    extern __shared__ double dyn_d[];
    __shared__ uint32_t warp_total[kWarps];
    const int32_t slot = b.slot[blockIdx.y], h = blockIdx.x;
    const fkv::layer_view L(g, regions.base[blockIdx.y]);
    const rule_arrays ra(dyn_d, g.group, g.select_pages > 0 ? g.select_pages : 0);
    const rule_result rr = bounded_rule<kSpec>(g, st, L, slot, layer, ra);
    if (rr.settled) {
        // FKV_SELECT_BOUNDED's decision is in the metadata: the plan that
        // fkv_launch_recall would make, reading it there (5 K int32 of the
        // arrays; the rule used none of them) through this kernel's view.
        fkv::recall_plan<kThreads>(g, st, L, slot, h, layer, FKV_RECALL_FIX,
                                   reinterpret_cast<int32_t *>(dyn_d), warp_total);
        return;
    }
    // The rule's arrays in shared memory are the plan's inputs (the last
    // barrier of the rule published them); its mass arrays are the plan's
    // scratch (4 K doubles >= 3 K int32).
    fkv::plan_input in;
    in.pages = ra.fix;
    in.count = rr.fix_count;
    in.slot_page = ra.slot_page;
    in.blocks = nullptr;
    in.blocks_async = false;
    in.active_pages = ra.a_page;
    in.active_count = rr.active;
    if (rr.fix_count < 0 && threadIdx.x == 0) L.h_array(g.off_fix_count)[h] = -1;
    __syncthreads();  // every thread is past the rule's reads of the masses
    fkv::plan_apply<kThreads>(g, st, L, slot, h, layer, FKV_RECALL_FIX, in,
                              reinterpret_cast<int32_t *>(ra.t_mass), warp_total);
}

// Dynamic shared memory of one block: the rule's arrays (more than the
// plan's 5 K int32 of a settled head, which reuse them).
size_t bounded_smem(const fkv_dev_geometry &g) {
    const size_t K = (size_t)(g.select_pages > 0 ? g.select_pages : 0), G = (size_t)g.group;
    return rule_arrays::bytes(G, K);
}

} // namespace

extern "C" cudaError_t fkv_bounded_init(const fkv_dev_geometry *g) {
    if (!g) return cudaErrorInvalidValue;
    const size_t smem = bounded_smem(*g);
    if (smem <= 48 * 1024) return cudaSuccess;  // large K needs the opt-in limit
    auto kernel = g->spec_min_mass > 0.0f ? bounded_kernel<true> : bounded_kernel<false>;
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
}

extern "C" cudaError_t fkv_launch_bounded(const fkv_dev_geometry *g,
                                          const fkv_dev_state *st,
                                          const fkv_dev_batch *b, int32_t layer,
                                          unsigned char *const *seq_base_host,
                                          cudaStream_t stream) {
    if (!g || !st || !b || b->n < 0 || b->n > FKV_DEV_MAX_BATCH)
        return cudaErrorInvalidValue;
    if (b->n == 0) return cudaSuccess;
    // Launched even where no head has more than K candidates: it plans.
    if (g->kv_heads <= 0 || g->group <= 0 || layer < 0 || layer >= g->layers)
        return cudaErrorInvalidValue;
    fkv::region_table regions = {};
    if (!fkv::fill_regions(*g, *st, *b, seq_base_host, regions)) return cudaErrorInvalidValue;
    // fkv_bounded_init allowed the shared memory at fkv_create.
    auto kernel = g->spec_min_mass > 0.0f ? bounded_kernel<true> : bounded_kernel<false>;
    return fkv::enqueue(kernel, dim3((unsigned)g->kv_heads, (unsigned)b->n), kThreads,
                        bounded_smem(*g), stream, *g, *st, *b, layer, regions);
}
