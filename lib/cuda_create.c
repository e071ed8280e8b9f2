/* The CUDA backend's fkv_create and fkv_destroy: the device layout, the
 * streams, events and device memory, the choice of kernel variants (the
 * FKV_CUDA_EXPERIMENTAL parts), and fkv_set_stream. */
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.h"

/* FKV_CUDA_EXPERIMENTAL's parts. The switch is the one run-time control; a
 * build may define FKV_EXPERIMENTAL_PARTS to a subset of these bits, so
 * that a benchmark measures one part against the default path
 * (docs/design.md section 11). */
enum {
    EXP_FUSED_COMBINE = 1, /* the split kernel's last block combines */
    EXP_ENGINE_BULK = 2,   /* the engine stream's gathers by bulk copies */
    EXP_LATE_CHECK = 4,    /* FKV_TAIL_PLAN_LATE */
    EXP_SIDE_FUSED = 8     /* FKV_PLAN_FUSED */
    /* 16 was the launch cache, 32 BOUNDED's speculative_min_mass: both on
     * since they passed the GPU suite and the sanitizers on the H200
     * (2026-12-05) */
};
#ifndef FKV_EXPERIMENTAL_PARTS
#define FKV_EXPERIMENTAL_PARTS 15
#endif

static bool experimental(const fkv_cache *c, unsigned part)
{
    return c->cuda_experimental && (FKV_EXPERIMENTAL_PARTS & part) != 0;
}

/* Whether this device and build can gather by TMA bulk copies from
 * one-warp blocks (compute capability 9 and the kernel's code from
 * compute_90 or newer: fkv_dev_limits.bulk_copy) and the stages for
 * FKV_DEV_MAX_BATCH sequences fit a block. Both users below add their
 * policies and, for the engine stream, the switch. */
static bool bulk_gather_fits(const cuda_backend *cb)
{
    return cb->lim.bulk_copy &&
           fkv_recall_bulk_smem(&cb->geo) <= (size_t)cb->lim.smem_per_block_optin;
}

/* FKV_CUDA_EXPERIMENTAL: the engine stream's recall gathers
 * (fkv_attend_tokens' correction, in the selection's tail, and
 * fkv_set_pages' recall) by TMA bulk copies (docs/design.md section 11),
 * for the policies that recall. */
static bool bulk_gather(const fkv_cache *c, const cuda_backend *cb)
{
    const fkv_policy p = c->opts.policy;
    return experimental(c, EXP_ENGINE_BULK) && bulk_gather_fits(cb) &&
           (p == FKV_POLICY_FREEKV || p == FKV_POLICY_SYNC ||
            p == FKV_POLICY_EXTERNAL);
}

/* FREEKV's speculative recall on the side stream gathers by TMA bulk copies
 * from a few one-warp blocks wherever bulk_gather_fits (no switch: validated
 * on the H200): in the decode step they slow the engine's GEMMs less than
 * the warp gather's 32 blocks for the same bytes (docs/benchmarks.md,
 * twelfth session). Elsewhere the warp gather. */
static bool side_bulk_gather(const fkv_cache *c, const cuda_backend *cb)
{
    return bulk_gather_fits(cb) && c->opts.policy == FKV_POLICY_FREEKV;
}

/* FKV_CUDA_EXPERIMENTAL: the attend's selection decides the cosine
 * criterion's correction after its top-K instead of before it (select.cu,
 * kLate; docs/design.md section 11). Only where the selection has the
 * plan in its tail. */
static bool late_check(const fkv_cache *c, const cuda_backend *cb)
{
    return experimental(c, EXP_LATE_CHECK) && fuse_plan(cb);
}

/* FKV_CUDA_EXPERIMENTAL: FREEKV's small speculative recalls in one launch
 * (FKV_PLAN_FUSED, at most FUSED_SIDE_HEADS heads; docs/design.md section
 * 11), where the side stream gathers by bulk copies. */
static bool side_fused(const fkv_cache *c, const cuda_backend *cb)
{
    return experimental(c, EXP_SIDE_FUSED) && side_bulk_gather(c, cb);
}

/* ---- creation ---------------------------------------------------------- */

/* cudaMalloc, cudaHostAlloc and cudaHostRegister, failing where the tests'
 * fault injection says (fkvi_device_fault, memory.c). */
cudaError_t fkvi_cuda_dev_malloc(void **p, size_t bytes)
{
    if (fkvi_device_fault())
        return cudaErrorMemoryAllocation;
    return cudaMalloc(p, bytes);
}

static cudaError_t host_pinned(void **p, size_t bytes, unsigned int flags)
{
    if (fkvi_device_fault())
        return cudaErrorMemoryAllocation;
    return cudaHostAlloc(p, bytes, flags);
}

static cudaError_t host_register(void *p, size_t bytes, unsigned int flags)
{
    if (fkvi_device_fault())
        return cudaErrorMemoryAllocation;
    return cudaHostRegister(p, bytes, flags);
}

/* The host pool's chunks: page-aligned host memory registered with CUDA
 * (mapped, portable), not cudaHostAlloc: on the H200 machine registering
 * pinned 3.9 GB/s where cudaHostAlloc pinned 3.0 in the same run, whatever
 * the chunk size (bench/host_pool, docs/benchmarks.md). Pinning, not the
 * appends' writes, is what an offloaded prefill waits for. */
#define PINNED_PAGE ((size_t)4096)

static void *pinned_alloc(size_t bytes, void *ctx)
{
    (void)ctx;
    size_t rounded = (bytes + PINNED_PAGE - 1) / PINNED_PAGE * PINNED_PAGE;
    if (rounded == 0)
        rounded = PINNED_PAGE;
    void *p = aligned_alloc(PINNED_PAGE, rounded);
    if (!p)
        return NULL;
    if (host_register(p, rounded, cudaHostRegisterMapped |
                                      cudaHostRegisterPortable) !=
        cudaSuccess) {
        (void)cudaGetLastError();
        free(p);
        return NULL;
    }
    return p;
}

static void pinned_release(void *p, size_t bytes, void *ctx)
{
    (void)ctx;
    (void)bytes;
    (void)cudaHostUnregister(p);
    free(p);
}

static fkv_status dev_alloc(fkv_cache *c, void **p, uint64_t bytes,
                            const char *what)
{
    cudaError_t e = fkvi_cuda_dev_malloc(p, bytes ? bytes : 16);
    if (e != cudaSuccess) {
        *p = NULL;
        (void)cudaGetLastError();
        return fkvi_fail(c, e == cudaErrorMemoryAllocation
                                ? FKV_ERR_OUT_OF_MEMORY
                                : FKV_ERR_DEVICE,
                         "fkv_create: cudaMalloc of %llu bytes for %s: %s",
                         (unsigned long long)bytes, what,
                         cudaGetErrorString(e));
    }
    backend_of(c)->device_bytes += bytes;
    return FKV_OK;
}

void fkvi_cuda_destroy(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    if (!cb)
        return;
    int previous = -1;
    if (cudaGetDevice(&previous) == cudaSuccess && previous != cb->device)
        (void)cudaSetDevice(cb->device);
    if (cb->side)
        (void)cudaStreamSynchronize(cb->side);
    (void)cudaStreamSynchronize(cb->stream);
    /* The host pool's chunks are pinned: free them while the context and
     * this backend (its allocator context) still exist. */
    fkv_pool_destroy(&c->pool);
    fkvi_launch_cache_free(&cb->launches, &c->mem);
    for (int32_t l = 0; cb->select_ready && l < c->geo.layers; l++)
        if (cb->select_ready[l])
            (void)cudaEventDestroy(cb->select_ready[l]);
    for (int32_t l = 0; cb->recall_done && l < c->geo.layers; l++)
        if (cb->recall_done[l])
            (void)cudaEventDestroy(cb->recall_done[l]);
    fkvi_free(&c->mem, cb->select_ready);
    fkvi_free(&c->mem, cb->recall_done);
    fkvi_free(&c->mem, cb->attend_unjoined);
    fkvi_free(&c->mem, cb->select_unjoined);
    if (cb->stream_switch)
        (void)cudaEventDestroy(cb->stream_switch);
    if (cb->seq_closed)
        (void)cudaEventDestroy(cb->seq_closed);
    if (cb->side)
        (void)cudaStreamDestroy(cb->side);
    for (int32_t s = 0; cb->seq_base_host && s < c->opts.max_sequences; s++)
        (void)cudaFree(cb->seq_base_host[s]); /* NULL: a no-op */
    (void)cudaFree(cb->seq_base_dev);
    (void)cudaFree((void *)cb->st_main.block_ptr);
    (void)cudaFree(cb->small);
    (void)cudaFree(cb->scratch[0]);
    (void)cudaFree(cb->scratch[1]);
    (void)cudaFree(cb->partials);
    (void)cudaFree(cb->q_last);
    fkvi_free(&c->mem, cb->ext_pages);
    fkvi_free(&c->mem, cb->ext_counts);
    fkvi_free(&c->mem, cb->lgeo);
    (void)cudaFreeHost(cb->seq_base_host);
    (void)cudaGetLastError();
    if (previous >= 0 && previous != cb->device)
        (void)cudaSetDevice(previous);
    fkvi_free(&c->mem, cb);
    c->backend = NULL;
}

/* Carves one side's scratch (scores, agg, work lists, fetch sources) out
 * of `base`. */
static uint64_t scratch_layout(const fkv_cache *c, fkv_dev_state *st,
                               unsigned char *base)
{
    const fkvi_geometry *g = &c->geo;
    const uint64_t S = (uint64_t)c->opts.max_sequences, H = g->kv_heads;
    const uint64_t pages = (uint64_t)g->max_pages, K = g->select_pages;
    uint64_t off = 0;
    uint64_t scores = fkvi_cuda_place(&off, S * H * g->group * pages, 4);
    uint64_t agg = fkvi_cuda_place(&off, S * H * pages, 4);
    uint64_t src = fkvi_cuda_place(&off, S * H * K, 8);
    uint64_t dst = fkvi_cuda_place(&off, S * H * K, 8);
    uint64_t count = fkvi_cuda_place(&off, S * H, 4);
    uint64_t fetch = fkvi_cuda_place(&off, S * H * K, 8);
    if (base) {
        st->scores = (float *)(base + scores);
        st->agg = (float *)(base + agg);
        st->work_src = (uint64_t *)(base + src);
        st->work_dst = (uint64_t *)(base + dst);
        st->work_count = (int32_t *)(base + count);
        st->fetch_src = (uint64_t *)(base + fetch);
    }
    return off;
}

/* The driver's cuPointerGetAttributes through the runtime (libfreekv links
 * no libcuda): it gives an allocation's range, which the runtime's
 * cudaPointerGetAttributes does not. NULL where the driver lacks it. */
static range_query_fn range_query_entry(void)
{
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    cudaError_t e = cudaGetDriverEntryPointByVersion(
        "cuPointerGetAttributes", &fn, 12000, cudaEnableDefault, &found);
#elif CUDART_VERSION >= 12000
    cudaError_t e = cudaGetDriverEntryPoint("cuPointerGetAttributes", &fn,
                                            cudaEnableDefault, &found);
#else
    cudaError_t e = cudaGetDriverEntryPoint("cuPointerGetAttributes", &fn,
                                            cudaEnableDefault);
    found = cudaDriverEntryPointSuccess;
#endif
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || !fn) {
        (void)cudaGetLastError();
        return NULL;
    }
    range_query_fn q;
    memcpy(&q, &fn, sizeof q);
    return q;
}

/* Each layer's geometry and region: the policy's layout, or DENSE's on a
 * dense layer, one region after the other. Without dense layers layer l's
 * region is at l * layer_bytes, as it always was. A dense layer of a cache
 * that recalls from the host keeps everything on the device, so it gets
 * no host pool blocks. */
static fkv_status layer_layouts(fkv_cache *c, cuda_backend *cb)
{
    const int32_t L = c->geo.layers;
    cb->lgeo = fkvi_alloc(&c->mem, (size_t)L, sizeof *cb->lgeo);
    if (!cb->lgeo)
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
    fkv_dev_geometry dense = cb->geo;
    if (c->any_dense) {
        fkv_options o = c->opts;
        o.policy = FKV_POLICY_DENSE;
        fkvi_cuda_layout(&o, &c->geo, &dense);
        if (!cb->geo.store) {
            c->layer_pool_unused = fkvi_alloc(&c->mem, (size_t)L, 1);
            if (!c->layer_pool_unused)
                return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY,
                                 "fkv_create: no memory");
            memcpy(c->layer_pool_unused, c->dense, (size_t)L);
        }
    }
    uint64_t off = 0;
    cb->last_sparse = -1;
    for (int32_t l = 0; l < L; l++) {
        cb->lgeo[l] = fkvi_layer_dense(c, l) ? dense : cb->geo;
        cb->lgeo[l].region_off = off;
        off += cb->lgeo[l].layer_bytes;
        if (!fkvi_layer_dense(c, l))
            cb->last_sparse = l;
    }
    cb->seq_bytes = off;
    return FKV_OK;
}

fkv_status fkvi_cuda_create(fkv_cache *c)
{
    const fkvi_geometry *g = &c->geo;
    cuda_backend *cb = fkvi_alloc(&c->mem, 1, sizeof *cb);
    if (!cb)
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
    c->backend = cb;
    cb->device = c->opts.device;
    cb->bounded = c->opts.policy == FKV_POLICY_FREEKV &&
                  c->opts.correction_criterion == FKV_CRITERION_BOUNDED;
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
    if (st != FKV_OK)
        return st;

#define TRY(call, what)                                                      \
    do {                                                                     \
        cudaError_t e_ = (call);                                             \
        if (e_ != cudaSuccess) {                                             \
            st = fkvi_cuda_fail(c, e_, (what));                              \
            goto out;                                                        \
        }                                                                    \
    } while (0)
#define TRY_ST(expr)                                                         \
    do {                                                                     \
        if ((st = (expr)) != FKV_OK)                                         \
            goto out;                                                        \
    } while (0)

    fkvi_cuda_layout(&c->opts, &c->geo, &cb->geo);
    c->pool_unused = cb->geo.store != 0;
    st = layer_layouts(c, cb);
    if (st != FKV_OK)
        goto out;
    c->pool.allocator = (fkv_pool_allocator){pinned_alloc, pinned_release, c};
    /* Every device figure a launch needs, and every kernel attribute, once
     * here: the decode path queries and sets nothing. */
    TRY(fkv_dev_limits_query(cb->device, &cb->lim),
        "fkv_create: reading the device's limits");
    cb->late_check = late_check(c, cb);
    cb->side_fused = side_fused(c, cb);
    const fkv_kernel_use use = {fuse_plan(cb), bulk_gather(c, cb),
                                side_bulk_gather(c, cb), cb->late_check,
                                cb->side_fused};
    TRY(fkv_kernels_init(&cb->geo, &cb->lim, &use),
        "fkv_create: setting the kernels' shared memory (this head_dim and "
        "GQA group may need more than a block may have)");
    if (!fkvi_launch_cache_init(&cb->launches, &c->mem,
                                2 * g->layers)) {
        st = fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
        goto out;
    }
    cb->range_query = range_query_entry();
    int least = 0, greatest = 0;
    TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest),
        "cudaDeviceGetStreamPriorityRange");
    /* The side stream's work is small in SMs but must keep up with the
     * engine: at the lowest priority its kernels waited behind the engine's
     * GEMMs and the next step stalled on them (docs/benchmarks.md, "side
     * stream": the highest priority took FREEKV at 32K, batch 8 from 15.1 to
     * 9.5 ms). */
    TRY(cudaStreamCreateWithPriority(&cb->side, cudaStreamNonBlocking, greatest),
        "cudaStreamCreateWithPriority");
    cb->select_ready = fkvi_alloc(&c->mem, (size_t)g->layers,
                                  sizeof(cudaEvent_t));
    cb->recall_done = fkvi_alloc(&c->mem, (size_t)g->layers,
                                 sizeof(cudaEvent_t));
    cb->attend_unjoined = fkvi_alloc(&c->mem, (size_t)g->layers, sizeof(bool));
    cb->select_unjoined = fkvi_alloc(&c->mem, (size_t)g->layers, sizeof(bool));
    if (!cb->select_ready || !cb->recall_done || !cb->attend_unjoined ||
        !cb->select_unjoined) {
        st = fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
        goto out;
    }
    TRY(cudaEventCreateWithFlags(&cb->stream_switch, cudaEventDisableTiming),
        "cudaEventCreateWithFlags");
    TRY(cudaEventCreateWithFlags(&cb->seq_closed, cudaEventDisableTiming),
        "cudaEventCreateWithFlags");
    for (int32_t l = 0; l < g->layers; l++) {
        TRY(cudaEventCreateWithFlags(&cb->select_ready[l],
                                     cudaEventDisableTiming),
            "cudaEventCreateWithFlags");
        TRY(cudaEventCreateWithFlags(&cb->recall_done[l],
                                     cudaEventDisableTiming),
            "cudaEventCreateWithFlags");
    }

    const uint64_t S = (uint64_t)c->opts.max_sequences;
    fkv_dev_state *m = &cb->st_main;
    m->max_seqs = c->opts.max_sequences;

    TRY(host_pinned((void **)&cb->seq_base_host, S * sizeof(void *),
                    cudaHostAllocPortable), "cudaHostAlloc");
    memset(cb->seq_base_host, 0, S * sizeof(void *));
    TRY_ST(dev_alloc(c, (void **)&cb->seq_base_dev, S * sizeof(void *),
                     "sequence table"));
    TRY(cudaMemset(cb->seq_base_dev, 0, S * sizeof(void *)), "cudaMemset");
    m->seq_base = cb->seq_base_dev;

    cb->block_ptr_entries =
        cb->geo.store ? 1 : S * g->layers * (uint64_t)g->max_pages;
    void *block_ptr = NULL;
    TRY_ST(dev_alloc(c, &block_ptr, cb->block_ptr_entries * sizeof(uint64_t),
                     "page table"));
    m->block_ptr = block_ptr;
    TRY(cudaMemset(block_ptr, 0, cb->block_ptr_entries * sizeof(uint64_t)),
        "cudaMemset");

    {
        uint64_t off = 0;
        uint64_t len = fkvi_cuda_place(&off, S * g->layers, 4);
        uint64_t counters = fkvi_cuda_place(&off, FKV_DEV_COUNTERS, 8);
        uint64_t error = fkvi_cuda_place(&off, 1, 4);
        uint64_t done = fkvi_cuda_place(&off, (uint64_t)g->layers, 4);
        TRY_ST(dev_alloc(c, &cb->small, off, "lengths and counters"));
        TRY(cudaMemset(cb->small, 0, off), "cudaMemset");
        unsigned char *b = cb->small;
        m->len = (int32_t *)(b + len);
        m->counters = (unsigned long long *)(b + counters);
        m->error = (unsigned int *)(b + error);
        m->append_done = (unsigned int *)(b + done);
    }

    cb->max_bound_pages = c->opts.policy == FKV_POLICY_DENSE
                              ? g->max_pages
                              : g->sink_pages + g->select_pages +
                                    g->window_pages + 1;
    /* Dense layers' attention may split as finely as DENSE's. */
    m->max_splits = fkv_attend_splits(
        &cb->geo, &cb->lim, 1,
        c->any_dense ? g->max_pages : cb->max_bound_pages);
    /* FKV_CUDA_EXPERIMENTAL (c->cuda_experimental, read at fkv_create):
     * the fused combine, whose path splits inside pages too. */
    if (experimental(c, EXP_FUSED_COMBINE)) {
        int32_t f = fkv_attend_splits_fused(
            &cb->geo, &cb->lim, 1,
            c->any_dense ? g->max_pages : cb->max_bound_pages);
        if (f > m->max_splits)
            m->max_splits = f;
    }
    {
        uint64_t off = 0;
        uint64_t n = S * g->q_heads * (uint64_t)m->max_splits;
        uint64_t ml = fkvi_cuda_place(&off, n * 2, 4);
        /* Without the switch: the partials of the two-launch path, as run
         * on the H200. With it, 16-byte aligned rows (the fused combine
         * reads them as float4) and the fused combine's counters. */
        const bool fused = experimental(c, EXP_FUSED_COMBINE);
        uint64_t acc = fused ? fkvi_cuda_place(&off, n * g->head_dim / 4, 16)
                             : fkvi_cuda_place(&off, n * g->head_dim, 4);
        uint64_t ticket = fused ? fkvi_cuda_place(&off, S * g->q_heads, 4) : 0;
        TRY_ST(dev_alloc(c, &cb->partials, off, "attention partials"));
        m->part_ml = (float *)((unsigned char *)cb->partials + ml);
        m->part_acc = (float *)((unsigned char *)cb->partials + acc);
        m->part_ticket = NULL;
        if (fused) {
            /* 0 between launches (each launch's combining blocks put them
             * back): zeroed once, here. */
            m->part_ticket = (unsigned int *)((unsigned char *)cb->partials +
                                              ticket);
            TRY(cudaMemset(m->part_ticket, 0,
                           S * g->q_heads * sizeof(unsigned)),
                "cudaMemset");
        }
        m->fused_combine = fused;
    }
    m->gather_bulk = bulk_gather(c, cb);

    cb->st_side = *m;
    cb->st_side.gather_bulk = side_bulk_gather(c, cb);
    uint64_t scratch = scratch_layout(c, m, NULL);
    for (int s = 0; s < 2; s++)
        TRY_ST(dev_alloc(c, &cb->scratch[s], scratch, "selection scratch"));
    scratch_layout(c, m, cb->scratch[0]);
    scratch_layout(c, &cb->st_side, cb->scratch[1]);

    /* Correction recalls are on the critical path: use the whole GPU.
     * Speculative recalls overlap the engine's GEMMs. Fewer blocks slow the
     * GEMMs less while they run (bench/recall), but then the side stream
     * falls behind and the next step waits for it: in the decode step 32
     * warp-gather blocks beat 16 and 8, and 4 bulk blocks beat 2, 8 and
     * the 32 warp-gather blocks (docs/benchmarks.md, "side stream" and
     * the twelfth session). */
    cb->gather_blocks_main = cb->lim.sm_count;
    cb->gather_blocks_side = cb->st_side.gather_bulk ? 4 : 32;
    if (m->gather_bulk) {
        /* bench/mapped_probe: two one-warp blocks of bulk copies reach the
         * PCIe limit; the correction's gather gets a few more for its
         * start-up latency. */
        cb->gather_blocks_main = 8;
    }
    /* attend_tokens gathers each sequence's last query here (sized now:
     * no allocation on the decode path). */
    TRY_ST(dev_alloc(c, &cb->q_last,
                     (uint64_t)FKV_DEV_MAX_BATCH * g->q_heads * g->head_dim *
                         g->elem_bytes,
                     "last query tokens"));
    if (c->opts.policy == FKV_POLICY_EXTERNAL) {
        cb->ext_pages = fkvi_alloc(
            &c->mem,
            (size_t)g->kv_heads * (g->select_pages > 0 ? g->select_pages : 1),
            sizeof(int32_t));
        cb->ext_counts =
            fkvi_alloc(&c->mem, (size_t)g->kv_heads, sizeof(int32_t));
        if (!cb->ext_pages || !cb->ext_counts) {
            st = fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
            goto out;
        }
    }
    st = FKV_OK;
out:
#undef TRY
#undef TRY_ST
    fkvi_cuda_leave(&guard);
    if (st != FKV_OK) {
        c->pool_unused = false;
        fkvi_cuda_destroy(c);
    }
    return st;
}

fkv_status fkvi_cuda_set_stream(fkv_cache *c, void *stream)
{
    cuda_backend *cb = backend_of(c);
    if ((cudaStream_t)stream == cb->stream)
        return FKV_OK;
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
    if (st != FKV_OK)
        return st;
    /* Work already enqueued on the old stream (sequence set-up, page
     * tables, appends) comes before anything on the new one. */
    cudaError_t e = cudaEventRecord(cb->stream_switch, cb->stream);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent((cudaStream_t)stream, cb->stream_switch, 0);
    fkvi_cuda_leave(&guard);
    if (e != cudaSuccess)
        return fkvi_cuda_fail(c, e, "fkv_set_stream");
    cb->stream = (cudaStream_t)stream;
    fkvi_cuda_forget_ranges(cb);
    return FKV_OK;
}

