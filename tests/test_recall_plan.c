/*
 * cuda_recall_plan (gpu:cuda): the recall plan's slot assignment (block
 * prefix sums) and the gather, launched directly (fkv_launch_recall, as
 * bench/recall does) on random slot states (distinct pages, some slots
 * empty), random selections (any count in [0, K], overlapping the slots at
 * random), FIX and PENDING, with and without a correction or a pending
 * selection, pages without a pool block, FREEKV and EXTERNAL (the critical
 * counter), K below, at and above the plan's 128 threads. Checked from the
 * inputs: every selected page in the slot active_slot names, resident
 * pages keep their slot, the r-th missing page (in set order) takes the
 * r-th free slot (in slot order), one work entry per missing page with a
 * block, in set order, each recalled unit holding its pool bytes and every
 * other slot unit untouched, the counters and the error bit; where the
 * build has the TMA bulk gather for the device (sm_90), the same again with
 * it (st.gather_bulk, 2 one-warp blocks: FREEKV's speculative recall uses
 * it by default there) and with FKV_PLAN_FUSED (one launch, each plan block
 * copying its own head's units; FKV_CUDA_EXPERIMENTAL's small speculative
 * recalls). (Until 0.3
 * the reference was the one-thread walk the prefix sums replaced; the two
 * agreed byte for byte on the H200 before the walk was deleted.)
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#ifdef FKV_WITH_CUDA

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "internal.h"
#include "kernels.h"

#define RP_SEQS 3
#define RP_HEADS 4
#define RP_TRIALS 24

#define RP_CUDA(call)                                                        \
    do {                                                                     \
        cudaError_t rp_e_ = (call);                                          \
        ck_assert_msg(rp_e_ == cudaSuccess, "%s:%d: %s: %s (%s)", __FILE__,  \
                      __LINE__, #call, cudaGetErrorString(rp_e_),            \
                      cudaGetErrorName(rp_e_));                              \
    } while (0)

static void *rp_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    ck_assert_msg(p != NULL, "out of host memory");
    return p;
}

/* One-layer FREEKV geometry with K selected pages and max_pages pages per
 * sequence: pages of 16 tokens, D 64, bf16 (4 KiB units), or with `big`
 * pages of 32 tokens, D 128, f32 (32 KiB units: two pieces of the bulk
 * gather). */
static void rp_layout(fkv_dev_geometry *d, int K, int max_pages, int big)
{
    const int page = big ? 32 : 16;
    fkv_options o, opts;
    fkvi_geometry g;
    ck_assert_int_eq(fkv_options_init(&o, sizeof o), FKV_OK);
    o.backend = FKV_BACKEND_CUDA;
    o.num_layers = 1;
    o.num_q_heads = 2 * RP_HEADS;
    o.num_kv_heads = RP_HEADS;
    o.head_dim = big ? 128 : 64;
    o.dtype = big ? FKV_DTYPE_F32 : FKV_DTYPE_BF16;
    o.page_tokens = page;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    o.budget_tokens = K * page;
    o.policy = FKV_POLICY_FREEKV;
    o.max_sequences = RP_SEQS;
    o.max_tokens_per_sequence = (int64_t)max_pages * page;
    ck_assert_int_eq(fkvi_options_load(&o, &opts), FKV_OK);
    fkvi_geometry_init(&opts, &g);
    fkvi_cuda_layout(&opts, &g, d);
    ck_assert_int_eq(d->select_pages, K);
    ck_assert_int_eq(d->max_pages, max_pages);
}

/* n distinct pages of [0, P) into out, ascending when `sorted`. */
static void rp_draw(ref_rng *r, int32_t *pick, int P, int32_t *out, int n,
                    int sorted)
{
    for (int i = 0; i < P; i++)
        pick[i] = i;
    for (int i = 0; i < n; i++) {
        int j = i + ref_rng_below(r, P - i);
        int32_t t = pick[i];
        pick[i] = pick[j];
        pick[j] = t;
        out[i] = pick[i];
    }
    if (sorted)
        for (int i = 1; i < n; i++)
            for (int j = i; j > 0 && out[j - 1] > out[j]; j--) {
                int32_t t = out[j];
                out[j] = out[j - 1];
                out[j - 1] = t;
            }
}

/* Whether pages[0, n) holds page. */
static int rp_holds(const int32_t *pages, int n, int32_t page)
{
    for (int j = 0; j < n; j++)
        if (pages[j] == page)
            return 1;
    return 0;
}

static int32_t *rp_i32(unsigned char *region, uint64_t off)
{
    return (int32_t *)(void *)(region + off);
}

/* The outputs of one launch. */
typedef struct rp_out {
    unsigned char *regions;   /* RP_SEQS regions */
    unsigned char *work;      /* work_src, work_dst, work_count, fetch_src */
    unsigned long long counters[FKV_DEV_COUNTERS];
    unsigned int error;
} rp_out;

START_TEST(cuda_recall_plan)
{
    static const int Ks[] = {1, 7, 56, 128, 129, 300};
    const int K = Ks[_i];
    const int P = 2 * K + 37; /* pages per sequence */
    const int H = RP_HEADS, n = RP_SEQS;
    fkv_dev_geometry g;
    ref_rng r;
    int trial, i, h, j, s, v;
    /* The gathers: the warp gather (8 blocks), the bulk gather (2 one-warp
     * blocks: pieces of one block then span several heads and sequences),
     * the plan blocks' own bulk copies (FKV_PLAN_FUSED). */
    static const char *const gather_name[3] = {"warp", "bulk", "fused"};
    /* The bulk gather (TMA) runs where the build has it for the device. */
    int cc_major = 0, dev = 0;
    int32_t built = 0;
    RP_CUDA(cudaGetDevice(&dev));
    RP_CUDA(cudaDeviceGetAttribute(&cc_major,
                                   cudaDevAttrComputeCapabilityMajor, dev));
    if (cc_major >= 9)
        RP_CUDA(fkv_recall_bulk_built(&built));
    const int gathers = built ? 3 : 1;
    if (gathers == 1)
        printf("cuda_recall_plan (K %d): the bulk gather skipped (%s)\n", K,
               cc_major < 9 ? "the device is older than sm_90"
                            : "this build has no sm_90 code");

    rp_layout(&g, K, P, _i == 1 || _i == 4);
    if (gathers > 1)
        RP_CUDA(fkv_recall_init(&g, 1, 1));
    ref_rng_seed(&r, 0x9A11E1ull + (uint64_t)K);

    const uint64_t region = g.layer_bytes;
    const size_t all = (size_t)region * n;
    const size_t units = (size_t)n * H * K;
    unsigned char *dregions, *dwork, *dsmall, *dpool;
    unsigned char **dbases;
    uint64_t *dblocks;
    RP_CUDA(cudaMalloc((void **)&dregions, all));
    RP_CUDA(cudaMalloc((void **)&dbases, n * sizeof *dbases));
    RP_CUDA(cudaMalloc((void **)&dblocks, (size_t)n * P * sizeof *dblocks));
    /* A pool block holds every KV head's unit of one page. */
    const size_t block_bytes = (size_t)H * g.unit_bytes;
    RP_CUDA(cudaMalloc((void **)&dpool, (size_t)n * P * block_bytes));
    {
        unsigned char *pat = rp_xmalloc((size_t)n * P * block_bytes);
        for (size_t x = 0; x < (size_t)n * P * block_bytes; x++)
            pat[x] = (unsigned char)(x * 131u + (x >> 12) * 7u);
        RP_CUDA(cudaMemcpy(dpool, pat, (size_t)n * P * block_bytes,
                           cudaMemcpyHostToDevice));
        free(pat);
    }
    unsigned char *bases[RP_SEQS];
    for (i = 0; i < n; i++)
        bases[i] = dregions + region * i;
    RP_CUDA(cudaMemcpy(dbases, bases, sizeof bases, cudaMemcpyHostToDevice));

    uint64_t off = 0;
    const uint64_t o_counters = fkvi_cuda_place(&off, FKV_DEV_COUNTERS, 8);
    const uint64_t o_error = fkvi_cuda_place(&off, 1, 4);
    const uint64_t o_len = fkvi_cuda_place(&off, (uint64_t)n, 4);
    const size_t small_bytes = (size_t)off;
    RP_CUDA(cudaMalloc((void **)&dsmall, small_bytes));
    off = 0;
    const uint64_t o_src = fkvi_cuda_place(&off, units, 8);
    const uint64_t o_dst = fkvi_cuda_place(&off, units, 8);
    const uint64_t o_count = fkvi_cuda_place(&off, (uint64_t)n * H, 4);
    const uint64_t o_fetch = fkvi_cuda_place(&off, units, 8);
    const size_t work_bytes = (size_t)off;
    RP_CUDA(cudaMalloc((void **)&dwork, work_bytes));

    fkv_dev_state st;
    memset(&st, 0, sizeof st);
    st.seq_base = dbases;
    st.len = (int32_t *)(void *)(dsmall + o_len);
    st.block_ptr = dblocks;
    st.counters = (unsigned long long *)(void *)(dsmall + o_counters);
    st.error = (unsigned int *)(void *)(dsmall + o_error);
    st.work_src = (uint64_t *)(void *)(dwork + o_src);
    st.work_dst = (uint64_t *)(void *)(dwork + o_dst);
    st.work_count = (int32_t *)(void *)(dwork + o_count);
    st.fetch_src = (uint64_t *)(void *)(dwork + o_fetch);
    st.max_seqs = n;

    unsigned char *image = rp_xmalloc(all);
    unsigned char *work_image = rp_xmalloc(work_bytes);
    uint64_t *blocks = rp_xmalloc((size_t)n * P * sizeof *blocks);
    int32_t *pick = rp_xmalloc((size_t)P * sizeof *pick);
    int32_t *tmp = rp_xmalloc((size_t)K * sizeof *tmp);
    rp_out out;
    out.regions = rp_xmalloc(all);
    out.work = rp_xmalloc(work_bytes);
    int32_t *free_slots = rp_xmalloc((size_t)K * sizeof *free_slots);
    unsigned char *copied = rp_xmalloc((size_t)K);
    for (size_t x = 0; x < work_bytes; x++)
        work_image[x] = 0xCD; /* stale entries must stay as they were */

    for (trial = 0; trial < RP_TRIALS; trial++) {
        const fkv_recall_mode mode = trial % 2 ? FKV_RECALL_FIX
                                               : FKV_RECALL_PENDING;
        fkv_dev_geometry gt = g;
        gt.policy = trial % 4 == 3 ? FKV_POLICY_EXTERNAL : FKV_POLICY_FREEKV;
        /* Page table: a few pages without a block in some trials. */
        for (i = 0; i < n; i++)
            for (j = 0; j < P; j++)
                blocks[(size_t)i * P + j] =
                    trial % 3 == 2 && ref_rng_below(&r, 16) == 0
                        ? 0
                        : (uint64_t)(uintptr_t)(dpool +
                                                ((size_t)i * P + j) * block_bytes);
        /* Region images: metadata at random except the arrays the plan
         * reads, which hold a valid state; units a pattern. */
        for (i = 0; i < n; i++) {
            unsigned char *R = image + region * i;
            for (uint64_t x = 0; x < g.meta_bytes; x++)
                R[x] = (unsigned char)ref_rng_u64(&r);
            memset(R + g.meta_bytes, 0x30 + trial, region - g.meta_bytes);
        }
        for (i = 0; i < n; i++) {
            unsigned char *R = image + region * i;
            for (h = 0; h < H; h++) {
                int32_t *slot_page = rp_i32(R, g.off_slot_page) + (size_t)h * K;
                int32_t *sel = rp_i32(R, mode == FKV_RECALL_FIX
                                             ? g.off_fix_pages
                                             : g.off_pending_pages) +
                               (size_t)h * K;
                int32_t *sel_count = rp_i32(R, mode == FKV_RECALL_FIX
                                                   ? g.off_fix_count
                                                   : g.off_pending_count) + h;
                int32_t *active = rp_i32(R, g.off_active_pages) + (size_t)h * K;
                int32_t *active_count = rp_i32(R, g.off_active_count) + h;
                /* Slots: `filled` distinct pages, the rest empty, shuffled. */
                const int filled = ref_rng_below(&r, 4) == 0
                                       ? K : ref_rng_below(&r, K + 1);
                rp_draw(&r, pick, P, tmp, filled, 0);
                for (s = 0; s < K; s++)
                    slot_page[s] = s < filled ? tmp[s] : -1;
                for (s = K - 1; s > 0; s--) {
                    int t = ref_rng_below(&r, s + 1);
                    int32_t x = slot_page[s];
                    slot_page[s] = slot_page[t];
                    slot_page[t] = x;
                }
                /* Selection: `count` pages, each resident with chance
                 * `keep`/4 (when there is one left), else a fresh page. */
                const int count = ref_rng_below(&r, 3) == 0
                                      ? K : ref_rng_below(&r, K + 1);
                const int keep = ref_rng_below(&r, 5);
                int32_t *mark = pick; /* 1: page used */
                for (j = 0; j < P; j++)
                    mark[j] = 0;
                int nsel = 0, next_res = 0;
                while (nsel < count) {
                    int32_t p = -1;
                    if (next_res < filled && ref_rng_below(&r, 4) < keep)
                        p = tmp[next_res++];
                    else
                        do
                            p = ref_rng_below(&r, P);
                        while (mark[p]);
                    if (mark[p])
                        continue;
                    mark[p] = 1;
                    sel[nsel++] = p;
                }
                for (int a = 1; a < nsel; a++)
                    for (int b = a; b > 0 && sel[b - 1] > sel[b]; b--) {
                        int32_t x = sel[b];
                        sel[b] = sel[b - 1];
                        sel[b - 1] = x;
                    }
                *sel_count = count;
                /* The active set (read when FIX has nothing to correct). */
                const int na = ref_rng_below(&r, 5) == 0
                                   ? -1 : ref_rng_below(&r, K + 1);
                rp_draw(&r, pick, P, active, na < 0 ? 0 : na, 1);
                *active_count = na;
                if (mode == FKV_RECALL_FIX) {
                    if (ref_rng_below(&r, 4) == 0)
                        *sel_count = -1; /* no correction */
                } else {
                    rp_i32(R, g.off_pending_valid)[h] =
                        ref_rng_below(&r, 5) != 0;
                }
            }
            *rp_i32(R, g.off_pending_attend) = 0;
        }
        fkv_dev_batch b;
        memset(&b, 0, sizeof b);
        b.n = n;
        for (i = 0; i < n; i++) {
            b.slot[i] = (i + 1 + trial) % n; /* entry order != slot order */
            b.tokens[i] = 1;
        }

        for (v = 0; v < gathers; v++) {
            RP_CUDA(cudaMemcpy(dregions, image, all, cudaMemcpyHostToDevice));
            RP_CUDA(cudaMemcpy(dblocks, blocks, (size_t)n * P * sizeof *blocks,
                               cudaMemcpyHostToDevice));
            RP_CUDA(cudaMemcpy(dwork, work_image, work_bytes,
                               cudaMemcpyHostToDevice));
            RP_CUDA(cudaMemset(dsmall, 0, small_bytes));
            st.gather_bulk = v > 0;
            RP_CUDA(fkv_launch_recall(&gt, &st, &b, 0, mode, v == 1 ? 2 : 8,
                                      v == 2 ? FKV_PLAN_FUSED : FKV_PLAN_PREFIX, 0));
            RP_CUDA(cudaDeviceSynchronize());
            RP_CUDA(cudaMemcpy(out.regions, dregions, all, cudaMemcpyDeviceToHost));
            RP_CUDA(cudaMemcpy(out.work, dwork, work_bytes, cudaMemcpyDeviceToHost));
            RP_CUDA(cudaMemcpy(out.counters, dsmall + o_counters,
                               sizeof out.counters, cudaMemcpyDeviceToHost));
            RP_CUDA(cudaMemcpy(&out.error, dsmall + o_error, sizeof out.error,
                               cudaMemcpyDeviceToHost));

            /* A valid plan, from the inputs: each selected page sits in the
             * slot active_slot names, a resident page keeps its slot, missing
             * pages take the free slots in order, the list holds one entry per
             * missing page with a block, in set order, the gather copied each
             * listed unit and nothing else, and the counters match. */
            unsigned long long listed = 0, missing_no_block = 0;
            for (i = 0; i < n; i++) {
                const int slot = b.slot[i]; /* region and work-list row */
                const unsigned char *R0 = image + region * slot;
                const unsigned char *R1 = out.regions + region * slot;
                for (h = 0; h < H; h++) {
                    const int32_t *in_slots = (const int32_t *)(const void *)(R0 + g.off_slot_page) + (size_t)h * K;
                    const int32_t *slots = (const int32_t *)(const void *)(R1 + g.off_slot_page) + (size_t)h * K;
                    const int32_t *apages = (const int32_t *)(const void *)(R1 + g.off_active_pages) + (size_t)h * K;
                    const int32_t *aslot = (const int32_t *)(const void *)(R1 + g.off_active_slot) + (size_t)h * K;
                    const int32_t wc = ((const int32_t *)(const void *)(out.work + o_count))[(size_t)slot * H + h];
                    const uint64_t *wsrc = (const uint64_t *)(const void *)(out.work + o_src) + ((size_t)slot * H + h) * K;
                    const uint64_t *wdst = (const uint64_t *)(const void *)(out.work + o_dst) + ((size_t)slot * H + h) * K;
                    /* The sources the attention reads by set position
                     * (FIX only; PENDING leaves them as they were). */
                    const uint64_t *fsrc = (const uint64_t *)(const void *)(out.work + o_fetch) + ((size_t)slot * H + h) * K;
                    const uint64_t *fsrc0 = (const uint64_t *)(const void *)(work_image + o_fetch) + ((size_t)slot * H + h) * K;
                    int32_t count;
                    const int32_t *sel;
                    if (mode == FKV_RECALL_FIX) {
                        count = ((const int32_t *)(const void *)(R0 + g.off_fix_count))[h];
                        sel = (const int32_t *)(const void *)(R0 + g.off_fix_pages) + (size_t)h * K;
                    } else {
                        count = ((const int32_t *)(const void *)(R0 + g.off_pending_valid))[h]
                                    ? ((const int32_t *)(const void *)(R0 + g.off_pending_count))[h]
                                    : -1;
                        sel = (const int32_t *)(const void *)(R0 + g.off_pending_pages) + (size_t)h * K;
                    }
                    if (count < 0 || mode != FKV_RECALL_FIX)
                        ck_assert_msg(memcmp(fsrc, fsrc0, (size_t)K * sizeof *fsrc) == 0,
                                      "K %d trial %d: fetch sources written "
                                      "without a correction", K, trial);
                    if (count < 0) {
                        ck_assert_msg(wc == 0, "K %d trial %d: work listed "
                                      "without a set to recall", K, trial);
                        continue;
                    }
                    ck_assert_int_eq(((const int32_t *)(const void *)(R1 + g.off_active_count))[h], count);
                    /* Free: empty, or holding a page that left the set. */
                    int nfree = 0, nmiss = 0;
                    for (s = 0; s < K; s++)
                        if (in_slots[s] < 0 || !rp_holds(sel, count, in_slots[s]))
                            free_slots[nfree++] = s;
                    memset(copied, 0, (size_t)K);
                    int w = 0;
                    for (j = 0; j < count; j++) {
                        const int32_t p = sel[j];
                        int32_t was = -1;
                        for (s = 0; s < K; s++)
                            if (in_slots[s] == p)
                                was = s;
                        ck_assert_int_eq(apages[j], p);
                        ck_assert_msg(aslot[j] >= 0 && aslot[j] < K &&
                                          slots[aslot[j]] == p,
                                      "K %d trial %d: page %d is not in its slot",
                                      K, trial, p);
                        if (was >= 0) {
                            ck_assert_int_eq(aslot[j], was);
                            if (mode == FKV_RECALL_FIX)
                                ck_assert_msg(fsrc[j] == 0, "K %d trial %d: resident "
                                              "page %d has a fetch source", K, trial, p);
                            continue;
                        }
                        ck_assert_msg(nmiss < nfree &&
                                          aslot[j] == free_slots[nmiss],
                                      "K %d trial %d: missing page #%d (page %d) "
                                      "took slot %d, not the free slot #%d", K,
                                      trial, nmiss, p, aslot[j], nmiss);
                        nmiss++;
                        const uint64_t blk = blocks[(size_t)slot * P + p];
                        if (mode == FKV_RECALL_FIX)
                            ck_assert_msg(fsrc[j] == (blk ? blk + (uint64_t)h * g.unit_bytes : 0),
                                          "K %d trial %d: fetch source of position %d "
                                          "(page %d) is wrong", K, trial, j, p);
                        if (!blk) {
                            missing_no_block++;
                            continue;
                        }
                        ck_assert_msg(w < wc, "K %d trial %d: short work list",
                                      K, trial);
                        ck_assert_msg(wsrc[w] == blk + (uint64_t)h * g.unit_bytes &&
                                          wdst[w] == (uint64_t)(uintptr_t)(
                                              dregions + region * slot + g.off_slots +
                                              ((uint64_t)h * K + aslot[j]) * g.unit_bytes),
                                      "K %d trial %d: work entry %d is wrong", K,
                                      trial, w);
                        copied[aslot[j]] = 1;
                        w++;
                    }
                    ck_assert_int_eq(w, wc);
                    /* Slot units: a recalled one holds its pool unit's bytes
                     * (the pattern written into the pool), the others are as
                     * they were. */
                    for (s = 0; s < K; s++) {
                        const uint64_t at = g.off_slots +
                                            ((uint64_t)h * K + s) * g.unit_bytes;
                        if (!copied[s]) {
                            ck_assert_msg(memcmp(R1 + at, R0 + at, g.unit_bytes) == 0,
                                          "K %d trial %d: slot %d changed without "
                                          "a recall (%s gather)", K, trial, s,
                                          gather_name[v]);
                            continue;
                        }
                        const int32_t p = slots[s];
                        const size_t x0 =
                            (size_t)(blocks[(size_t)slot * P + p] -
                                     (uint64_t)(uintptr_t)dpool) +
                            (size_t)h * g.unit_bytes;
                        for (uint64_t t = 0; t < g.unit_bytes; t++) {
                            const size_t x = x0 + (size_t)t;
                            if (R1[at + t] != (unsigned char)(x * 131u + (x >> 12) * 7u))
                                ck_abort_msg("K %d trial %d: slot %d byte %llu is "
                                             "not page %d's (%s gather)", K, trial,
                                             s, (unsigned long long)t, p,
                                             gather_name[v]);
                        }
                    }
                    listed += (unsigned long long)w;
                }
            }
            ck_assert_msg(out.counters[FKV_DEV_PAGES_RECALLED] == listed,
                          "K %d trial %d: pages_recalled %llu, listed %llu", K,
                          trial, out.counters[FKV_DEV_PAGES_RECALLED], listed);
            ck_assert(out.counters[FKV_DEV_PAGES_RECALLED_CRITICAL] ==
                      (mode == FKV_RECALL_FIX && gt.policy != FKV_POLICY_EXTERNAL
                           ? listed : 0ull));
            ck_assert_msg((out.error != 0) == (missing_no_block != 0),
                          "K %d trial %d: error bits %u with %llu missing pages "
                          "without a block", K, trial, out.error,
                          missing_no_block);
        }
    }

    free(out.regions);
    free(out.work);
    free(free_slots);
    free(copied);
    free(tmp);
    free(pick);
    free(blocks);
    free(work_image);
    free(image);
    RP_CUDA(cudaFree(dwork));
    RP_CUDA(cudaFree(dsmall));
    RP_CUDA(cudaFree(dpool));
    RP_CUDA(cudaFree(dblocks));
    RP_CUDA(cudaFree(dbases));
    RP_CUDA(cudaFree(dregions));
}
END_TEST

void tst_add_recall_plan(Suite *s)
{
    tcase_add_loop_test(tst_tcase(s, "cuda_recall_plan"), cuda_recall_plan,
                        0, 6);
}

#endif /* FKV_WITH_CUDA */
