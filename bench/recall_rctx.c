/*
 * bench/recall's host pool (pinned, mapped, blocks in a random order) and its
 * recall context: one-layer FREEKV regions laid out as the CUDA backend
 * lays them out, recalled through fkv_launch_recall.
 *
 * SPDX-License-Identifier: MIT
 */
#include "recall.h"

#ifdef FKV_WITH_CUDA

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

/* ------------------------------------------------------------------------ */
/* Host pool: pinned, mapped; one block per (sequence, page) holding every   */
/* KV head's unit ([kv_head][K|V][P][D]), blocks in a random order.          */
/* ------------------------------------------------------------------------ */

void pool_create(pool *p, int seqs, int pages, int kv_heads,
                 uint64_t unit_bytes, bool registered)
{
    memset(p, 0, sizeof *p);
    p->seqs = seqs;
    p->pages = pages;
    p->unit_bytes = unit_bytes;
    p->block_bytes = unit_bytes * (uint64_t)kv_heads;
    const uint64_t blocks = (uint64_t)seqs * pages;
    p->bytes = blocks * p->block_bytes;
    p->registered = registered;
    if (registered) {
        const uint64_t page = 4096, n = (p->bytes + page - 1) / page * page;
        p->host = aligned_alloc(page, n);
        if (!p->host)
            bench_die("aligned_alloc of %llu bytes failed",
                      (unsigned long long)n);
        BENCH_CUDA_CHECK(cudaHostRegister(
            p->host, n, cudaHostRegisterMapped | cudaHostRegisterPortable));
    } else {
        BENCH_CUDA_CHECK(
            cudaHostAlloc((void **)&p->host, p->bytes,
                          cudaHostAllocMapped | cudaHostAllocPortable));
    }
    void *d = NULL;
    BENCH_CUDA_CHECK(cudaHostGetDevicePointer(&d, p->host, 0));
    p->dev = d;
    /* Random content: every unit differs, so a misplaced copy shows. */
    bench_rng s = {0x5EC0A11ull};
    uint64_t *w = (uint64_t *)p->host;
    for (uint64_t i = 0; i < p->bytes / 8; i++)
        w[i] = bench_rng_next(&s);
    p->perm = bench_xmalloc(blocks * sizeof *p->perm);
    for (uint64_t i = 0; i < blocks; i++)
        p->perm[i] = (uint32_t)i;
    for (uint64_t i = blocks - 1; i > 0; i--) {
        uint64_t j = bench_rng_next(&s) % (i + 1);
        uint32_t t = p->perm[i];
        p->perm[i] = p->perm[j];
        p->perm[j] = t;
    }
}

void pool_destroy(pool *p)
{
    if (p->host && p->registered) {
        BENCH_CUDA_CHECK(cudaHostUnregister(p->host));
        free(p->host);
    } else if (p->host) {
        BENCH_CUDA_CHECK(cudaFreeHost(p->host));
    }
    free(p->perm);
    memset(p, 0, sizeof *p);
}

static uint64_t pool_block_offset(const pool *p, int seq, int page)
{
    return (uint64_t)p->perm[(uint64_t)seq * p->pages + page] * p->block_bytes;
}


/* ------------------------------------------------------------------------ */
/* A recall context: n sequences, each one layer region laid out by          */
/* fkvi_cuda_layout as the CUDA backend lays out FREEKV, and the device      */
/* state that fkv_launch_recall reads and writes.                            */
/* ------------------------------------------------------------------------ */


/* The device geometry of a one-layer FREEKV cache with no sink and no
 * window (K selected pages, max_pages pages per sequence), laid out by the
 * CUDA backend's own fkvi_cuda_layout. */
static void rctx_layout(fkv_dev_geometry *d, const config *c, int K,
                        int max_pages)
{
    fkv_options o, opts;
    fkvi_geometry g;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = FKV_BACKEND_CUDA;
    o.num_layers = 1;
    o.num_q_heads = c->kv_heads * c->group;
    o.num_kv_heads = c->kv_heads;
    o.head_dim = c->head_dim;
    o.dtype = FKV_DTYPE_BF16;
    o.page_tokens = c->page;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    o.budget_tokens = K * c->page;
    o.policy = FKV_POLICY_FREEKV;
    o.max_sequences = FKV_DEV_MAX_BATCH;
    o.max_tokens_per_sequence = (int64_t)max_pages * c->page;
    BENCH_FKV_CHECK(NULL, fkvi_options_load(&o, &opts));
    fkvi_geometry_init(&opts, &g);
    fkvi_cuda_layout(&opts, &g, d);
}

void rctx_create(rctx *x, const config *c, const pool *p, int n,
                 int K, uint64_t seed)
{
    memset(x, 0, sizeof *x);
    if (n > FKV_DEV_MAX_BATCH || n > p->seqs)
        bench_die(
            "batch %d exceeds the pool (%d sequences) or FKV_DEV_MAX_BATCH", n,
            p->seqs);
    if (2 * K > p->pages)
        bench_die("K %d needs at least %d pool pages per sequence", K, 2 * K);
    x->n = n;
    x->K = K;
    x->H = c->kv_heads;
    rctx_layout(&x->g, c, K, p->pages);
    x->unit_bytes = x->g.unit_bytes;
    if (x->unit_bytes != p->unit_bytes)
        bench_die("internal: unit size mismatch");
    const int H = x->H;
    x->units = (size_t)n * H * K;

    /* The pending arrays are contiguous: one 2D copy re-arms all sequences. */
    x->arm_ints = (size_t)H * K + 2 * (size_t)H;
    if (x->g.off_pending_count != x->g.off_pending_pages + (uint64_t)H * K * 4 ||
        x->g.off_pending_valid != x->g.off_pending_count + (uint64_t)H * 4)
        bench_die("internal: pending arrays are not contiguous");

    /* Regions, all metadata zero and the "-1" arrays -1, as seq_init does. */
    const uint64_t region = x->g.layer_bytes;
    BENCH_CUDA_CHECK(cudaMalloc((void **)&x->regions, region * n));
    BENCH_CUDA_CHECK(cudaMemset(x->regions, 0, region * n));
    for (int i = 0; i < n; i++)
        BENCH_CUDA_CHECK(cudaMemset(x->regions + region * i + x->g.neg_begin,
                                    0xFF, x->g.neg_bytes));
    unsigned char **bases = bench_xmalloc((size_t)n * sizeof *bases);
    for (int i = 0; i < n; i++)
        bases[i] = x->regions + region * i;
    BENCH_CUDA_CHECK(
        cudaMalloc((void **)&x->seq_base_dev, (size_t)n * sizeof *bases));
    BENCH_CUDA_CHECK(cudaMemcpy(x->seq_base_dev, bases,
                                (size_t)n * sizeof *bases,
                                cudaMemcpyHostToDevice));
    free(bases);

    /* Page table: the device address of each page's pool block. */
    const uint64_t P = (uint64_t)p->pages;
    uint64_t *bp = bench_xmalloc(n * P * sizeof *bp);
    for (int i = 0; i < n; i++)
        for (uint64_t pg = 0; pg < P; pg++)
            bp[i * P + pg] = (uint64_t)(uintptr_t)(p->dev +
                                                   pool_block_offset(p, i, (int)pg));
    BENCH_CUDA_CHECK(
        cudaMalloc((void **)&x->block_ptr_dev, n * P * sizeof *bp));
    BENCH_CUDA_CHECK(cudaMemcpy(x->block_ptr_dev, bp, n * P * sizeof *bp,
                                cudaMemcpyHostToDevice));
    free(bp);

    /* counters [FKV_DEV_COUNTERS] u64, error u32, len [n] i32 */
    uint64_t off = 0;
    const uint64_t o_counters = fkvi_cuda_place(&off, FKV_DEV_COUNTERS, 8);
    const uint64_t o_error = fkvi_cuda_place(&off, 1, 4);
    const uint64_t o_len = fkvi_cuda_place(&off, (uint64_t)n, 4);
    BENCH_CUDA_CHECK(cudaMalloc((void **)&x->small, off));
    BENCH_CUDA_CHECK(cudaMemset(x->small, 0, off));
    off = 0;
    const uint64_t o_src = fkvi_cuda_place(&off, x->units, 8);
    const uint64_t o_dst = fkvi_cuda_place(&off, x->units, 8);
    const uint64_t o_count = fkvi_cuda_place(&off, (uint64_t)n * H, 4);
    BENCH_CUDA_CHECK(cudaMalloc((void **)&x->work, off));
    BENCH_CUDA_CHECK(cudaMemset(x->work, 0, off));

    memset(&x->st, 0, sizeof x->st);
    x->st.seq_base = x->seq_base_dev;
    x->st.len = (int32_t *)(x->small + o_len);
    x->st.block_ptr = x->block_ptr_dev;
    x->st.counters = (unsigned long long *)(x->small + o_counters);
    x->st.error = (unsigned int *)(x->small + o_error);
    x->st.work_src = (uint64_t *)(x->work + o_src);
    x->st.work_dst = (uint64_t *)(x->work + o_dst);
    x->st.work_count = (int32_t *)(x->work + o_count);
    x->st.max_splits = 0;
    x->st.max_seqs = n;
    x->st.gather_bulk = c->bulk_gather;
    if (c->bulk_gather) {
        int dev = 0, major = 0;
        BENCH_CUDA_CHECK(cudaGetDevice(&dev));
        BENCH_CUDA_CHECK(cudaDeviceGetAttribute(
            &major, cudaDevAttrComputeCapabilityMajor, dev));
        if (major < 9)
            bench_die("--bulk-gather needs an sm_90 device (this one is "
                      "sm_%d0)", major);
        BENCH_CUDA_CHECK(fkv_recall_init(&x->g, 1, 1));
    }
    if (c->fused_plan && !c->bulk_gather)
        bench_die("--fused-plan needs --bulk-gather");
    x->plan = c->fused_plan ? FKV_PLAN_FUSED : FKV_PLAN_PREFIX;

    memset(&x->b, 0, sizeof x->b);
    x->b.n = n;
    for (int i = 0; i < n; i++) {
        x->b.slot[i] = i;
        x->b.tokens[i] = 1;
    }

    /* Two disjoint random page sets per (sequence, KV head). */
    int32_t *pick = bench_xmalloc(P * sizeof *pick);
    for (int s = 0; s < 2; s++)
        x->set[s] = bench_xmalloc(x->units * sizeof(int32_t));
    for (int i = 0; i < n; i++)
        for (int h = 0; h < H; h++) {
            bench_rng r = {seed ^ ((uint64_t)i << 32) ^ ((uint64_t)h << 16)};
            for (uint64_t pg = 0; pg < P; pg++)
                pick[pg] = (int32_t)pg;
            for (int j = 0; j < 2 * K; j++) {
                uint64_t t =
                    (uint64_t)j + bench_rng_next(&r) % (P - (uint64_t)j);
                int32_t tmp = pick[j];
                pick[j] = pick[t];
                pick[t] = tmp;
            }
            for (int s = 0; s < 2; s++) {
                int32_t *dst = x->set[s] + ((size_t)i * H + h) * K;
                memcpy(dst, pick + (size_t)s * K, (size_t)K * sizeof *dst);
                qsort(dst, (size_t)K, sizeof *dst, cmp_i32);
            }
        }
    free(pick);

    /* Arm templates: [pending_pages H*K][pending_count H][pending_valid H]. */
    int32_t *arm = bench_xmalloc((size_t)n * x->arm_ints * sizeof *arm);
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < n; i++) {
            int32_t *a = arm + (size_t)i * x->arm_ints;
            memcpy(a, x->set[s] + (size_t)i * H * K,
                   (size_t)H * K * sizeof *a);
            for (int h = 0; h < H; h++) {
                a[(size_t)H * K + h] = K;
                a[(size_t)H * K + H + h] = 1;
            }
        }
        BENCH_CUDA_CHECK(cudaMalloc((void **)&x->arm_dev[s],
                                    (size_t)n * x->arm_ints * sizeof *arm));
        BENCH_CUDA_CHECK(cudaMemcpy(x->arm_dev[s], arm,
                                    (size_t)n * x->arm_ints * sizeof *arm,
                                    cudaMemcpyHostToDevice));
    }
    free(arm);

    /* Per-unit copy lists (same units, same order as the sets). */
    BENCH_CUDA_CHECK(
        cudaMalloc((void **)&x->unit_dst, x->units * x->unit_bytes));
    BENCH_CUDA_CHECK(cudaMemset(x->unit_dst, 0, x->units * x->unit_bytes));
    x->udst = bench_xmalloc(x->units * sizeof *x->udst);
    x->usize = bench_xmalloc(x->units * sizeof *x->usize);
    for (int s = 0; s < 2; s++)
        x->usrc[s] = bench_xmalloc(x->units * sizeof *x->usrc[s]);
    for (size_t u = 0; u < x->units; u++) {
        const int i = (int)(u / ((size_t)H * K));
        const int h = (int)(u / (size_t)K % (size_t)H);
        x->udst[u] = x->unit_dst + u * x->unit_bytes;
        x->usize[u] = x->unit_bytes;
        for (int s = 0; s < 2; s++)
            x->usrc[s][u] = p->host + pool_block_offset(p, i, x->set[s][u]) +
                            (uint64_t)h * x->unit_bytes;
    }
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
}

void rctx_destroy(rctx *x)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUDA_CHECK(cudaFree(x->regions));
    BENCH_CUDA_CHECK(cudaFree(x->seq_base_dev));
    BENCH_CUDA_CHECK(cudaFree(x->block_ptr_dev));
    BENCH_CUDA_CHECK(cudaFree(x->small));
    BENCH_CUDA_CHECK(cudaFree(x->work));
    BENCH_CUDA_CHECK(cudaFree(x->unit_dst));
    for (int s = 0; s < 2; s++) {
        BENCH_CUDA_CHECK(cudaFree(x->arm_dev[s]));
        free(x->set[s]);
        free((void *)x->usrc[s]);
    }
    free(x->udst);
    free(x->usize);
    memset(x, 0, sizeof *x);
}

void rctx_reset_counters(rctx *x)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUDA_CHECK(cudaMemset(
        x->st.counters, 0, FKV_DEV_COUNTERS * sizeof(unsigned long long)));
    BENCH_CUDA_CHECK(cudaMemset(x->st.error, 0, sizeof(unsigned int)));
    x->runs = 0;
}

cudaError_t rctx_enqueue(rctx *x, int blocks, cudaStream_t s,
                         cudaEvent_t before, cudaEvent_t after)
{
    const size_t w = x->arm_ints * sizeof(int32_t);
    cudaError_t e = cudaMemcpy2DAsync(
        x->regions + x->g.off_pending_pages, (size_t)x->g.layer_bytes,
        x->arm_dev[x->parity], w, w, (size_t)x->n, cudaMemcpyDeviceToDevice, s);
    if (e == cudaSuccess && before)
        e = cudaEventRecord(before, s);
    if (e == cudaSuccess)
        e = fkv_launch_recall(&x->g, &x->st, &x->b, 0, FKV_RECALL_PENDING,
                              blocks, x->plan, s);
    if (e == cudaSuccess && after)
        e = cudaEventRecord(after, s);
    if (e == cudaSuccess) {
        x->parity ^= 1;
        x->runs++;
    }
    return e;
}

void rctx_verify(const rctx *x, const pool *p, const char *what)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    if (x->runs == 0)
        return;
    const int last = x->parity ^ 1, H = x->H, K = x->K;
    const fkv_dev_geometry *g = &x->g;
    unsigned char *meta = bench_xmalloc(g->meta_bytes);
    const size_t slot_bytes = (size_t)H * K * x->unit_bytes;
    unsigned char *slots = bench_xmalloc(slot_bytes);
    unsigned char *seen = bench_xmalloc((size_t)K);
    for (int i = 0; i < x->n; i++) {
        const unsigned char *base = x->regions + g->layer_bytes * i;
        BENCH_CUDA_CHECK(
            cudaMemcpy(meta, base, g->meta_bytes, cudaMemcpyDeviceToHost));
        BENCH_CUDA_CHECK(cudaMemcpy(slots, base + g->off_slots, slot_bytes,
                                    cudaMemcpyDeviceToHost));
        const int32_t *count = (const int32_t *)(meta + g->off_active_count);
        const int32_t *valid = (const int32_t *)(meta + g->off_pending_valid);
        for (int h = 0; h < H; h++) {
            const int32_t *pages =
                (const int32_t *)(meta + g->off_active_pages) + (size_t)h * K;
            const int32_t *slot =
                (const int32_t *)(meta + g->off_active_slot) + (size_t)h * K;
            const int32_t *slot_page =
                (const int32_t *)(meta + g->off_slot_page) + (size_t)h * K;
            const int32_t *want = x->set[last] + ((size_t)i * H + h) * K;
            if (count[h] != K || valid[h] != 0)
                bench_die("%s: seq %d KV head %d: active_count %d (want %d), "
                          "pending_valid %d (want 0)",
                          what, i, h, count[h], K, valid[h]);
            memset(seen, 0, (size_t)K);
            for (int j = 0; j < K; j++) {
                const int32_t s = slot[j];
                if (pages[j] != want[j] || s < 0 || s >= K || seen[s] ||
                    slot_page[s] != want[j])
                    bench_die(
                        "%s: seq %d KV head %d entry %d: page %d in slot %d "
                        "(want page %d in a distinct slot)",
                        what, i, h, j, pages[j], s, want[j]);
                seen[s] = 1;
                const unsigned char *src = p->host +
                                           pool_block_offset(p, i, want[j]) +
                                           (uint64_t)h * x->unit_bytes;
                if (memcmp(slots + ((size_t)h * K + s) * x->unit_bytes, src,
                           x->unit_bytes) != 0)
                    bench_die("%s: seq %d KV head %d page %d: slot %d's "
                              "bytes differ from the host pool's unit",
                              what, i, h, want[j], s);
            }
        }
    }
    unsigned long long counters[FKV_DEV_COUNTERS];
    unsigned int error = 0;
    BENCH_CUDA_CHECK(cudaMemcpy(counters, x->st.counters, sizeof counters,
                                cudaMemcpyDeviceToHost));
    BENCH_CUDA_CHECK(
        cudaMemcpy(&error, x->st.error, sizeof error, cudaMemcpyDeviceToHost));
    const unsigned long long want = (unsigned long long)x->runs * x->units;
    if (error || counters[FKV_DEV_PAGES_RECALLED] != want ||
        counters[FKV_DEV_BYTES_RECALLED] != want * x->unit_bytes)
        bench_die(
            "%s: device error bits 0x%x, %llu units / %llu bytes recalled "
            "(want 0, %llu units / %llu bytes: every recall must copy all K "
            "pages of every (sequence, KV head))",
            what, error, counters[FKV_DEV_PAGES_RECALLED],
            counters[FKV_DEV_BYTES_RECALLED], want,
            want * (unsigned long long)x->unit_bytes);
    free(meta);
    free(slots);
    free(seen);
}

void units_verify(const rctx *x, int par, size_t upto, bool rest,
                  const char *what)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    const size_t n = rest ? x->units : upto;
    if (n == 0)
        return;
    unsigned char *buf = bench_xmalloc(n * x->unit_bytes);
    BENCH_CUDA_CHECK(cudaMemcpy(buf, x->unit_dst, n * x->unit_bytes,
                                cudaMemcpyDeviceToHost));
    for (size_t u = 0; u < n; u++) {
        const int s = u < upto ? par : par ^ 1;
        if (memcmp(buf + u * x->unit_bytes, x->usrc[s][u], x->unit_bytes) != 0)
            bench_die(
                "%s: unit %zu (seq %zu, KV head %zu) differs from the host "
                "pool's unit",
                what, u, u / ((size_t)x->H * x->K),
                u / (size_t)x->K % (size_t)x->H);
    }
    free(buf);
}

cudaError_t batch_copy(void **dst, const void **src, size_t *sizes,
                       size_t count, cudaStream_t s)
{
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
    struct cudaMemcpyAttributes attr;
    memset(&attr, 0, sizeof attr);
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t idx = 0;
#if CUDART_VERSION >= 13000
    return cudaMemcpyBatchAsync((void *const *)dst, (const void *const *)src,
                                sizes, count, &attr, &idx, 1, s);
#else
    size_t fail = 0;
    return cudaMemcpyBatchAsync((void **)dst, (void **)src, sizes, count,
                                &attr, &idx, 1, &fail, s);
#endif
#else
    (void)dst;
    (void)src;
    (void)sizes;
    (void)count;
    (void)s;
    return cudaErrorNotSupported;
#endif
}


#endif /* FKV_WITH_CUDA */
