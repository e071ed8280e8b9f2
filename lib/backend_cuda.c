/* The CUDA backend: device memory layout, streams and events, and the
 * launches of the kernels in kernels/ in the order each policy needs.
 *
 * Streams: attention and everything on the critical path run on the
 * engine's stream (fkv_set_stream); FREEKV's speculative selection and
 * recall run on the library's high-priority side stream, ordered by events:
 *   fkv_attend(l): the engine's stream waits for recall_done[l] (the
 *                  previous step's recall), then selects every head with
 *                  q (the next step's speculative set: select at attend),
 *                  corrects and attends;
 *   fkv_select(l): with q NULL only the side stream's wait for the attend;
 *                  with a query, a snapshot of it on the engine's stream
 *                  and, where it is not the attend's, a selection on the
 *                  side stream;
 *   fkv_recall(l): recall on the side stream, recording recall_done[l].
 * No call synchronises with the host on the decode path; see
 * docs/design.md for CUDA graph capture. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cuda.h> /* types of cuPointerGetAttributes (no -lcuda: see
                      range_query below) */
#include <cuda_runtime_api.h>

#include "cuda_launch_cache.h"
#include "internal.h"
#include "kernels.h"

/* The user pointers (k, v, q, out) are checked once per allocation: the
 * last PTR_RANGES allocations accepted are remembered, so that the decode
 * path does not query CUDA per call (design §6). */
#define PTR_RANGES 16
typedef struct ptr_range {
    uintptr_t begin, end; /* [begin, end); empty when begin == end */
} ptr_range;
typedef CUresult (CUDAAPI *range_query_fn)(unsigned int, CUpointer_attribute *,
                                          void **, CUdeviceptr);

typedef struct cuda_backend {
    int device;
    fkv_dev_limits lim; /* read once at fkv_create; passed to the launches */
    cudaStream_t stream; /* the engine's; NULL: legacy default stream */
    cudaStream_t side;   /* ours, highest priority */
    cudaEvent_t *select_ready; /* [layers] */
    cudaEvent_t *recall_done;  /* [layers] */
    cudaEvent_t stream_switch;
    /* Recorded on the side stream at fkv_seq_close: a slot's region is
     * reused at its next open after the side stream's work on it so far. */
    cudaEvent_t seq_closed;

    fkv_dev_geometry geo;   /* the policy's layout (region_off 0) */
    /* [layers]: each layer's layout and region (a dense layer's is the
     * DENSE layout); kernels get their layer's. */
    fkv_dev_geometry *lgeo;
    uint64_t seq_bytes;     /* device memory of one sequence, all layers */
    /* The last layer that is not dense (-1: none): its fkv_recall is the
     * step's last side-stream work, which a captured step joins there. */
    int32_t last_sparse;
    fkv_dev_state st_main; /* kernels on the engine's stream */
    fkv_dev_state st_side; /* the same with the side stream's own scratch */
    int32_t gather_blocks_main, gather_blocks_side;
    int32_t max_bound_pages; /* of the policy's layers */
    /* Set by the first fkv_seq_fork or fkv_seq_truncate: pool blocks were
     * copied on the host, so fkv_seq_close waits for the streams. */
    bool host_block_copies;
    /* FKV_CUDA_EXPERIMENTAL's parts, set at create: the attend's
     * selections take FKV_TAIL_PLAN_LATE; small speculative recalls take
     * FKV_PLAN_FUSED. */
    bool late_check, side_fused;
    /* Eager attends' and recalls' kernels as one graph launch where a
     * call repeats (cuda_launch_cache.h); n_slots 0: off (tests only). */
    fkv_launch_cache launches;
    /* FREEKV with FKV_CRITERION_BOUNDED: select at attend.
     * Per layer, whether work of one stream that the other must follow
     * has not been joined yet: the attend's pending selection (engine),
     * which the side stream's recall reads, and the side stream's
     * selection, which the next attend overwrites. */
    bool bounded;
    bool *attend_unjoined; /* [layers] */
    bool *select_unjoined; /* [layers] */

    /* [max_seqs] each slot's region, allocated at the slot's first open
     * and kept (reused by later sequences in the slot) until destroy, so
     * that no open or close frees device memory (cudaFree synchronises the
     * device). Set once per slot: the copy to seq_base_dev reads it. */
    unsigned char **seq_base_host; /* pinned */
    unsigned char **seq_base_dev;
    uint64_t block_ptr_entries;
    void *small;                   /* len, counters, error, append_done */
    void *scratch[2];              /* scores, agg, work lists: main, side */
    void *partials;
    void *q_last; /* [FKV_DEV_MAX_BATCH] q rows: attend_tokens' selection */
    /* EXTERNAL: one sequence's sorted pages [kv_heads][K] and counts
     * [kv_heads], pageable (an async copy from pageable memory is staged
     * before it returns, so the next sequence may reuse it at once). */
    int32_t *ext_pages;
    int32_t *ext_counts;
    uint64_t device_bytes;
    ptr_range ranges[PTR_RANGES];
    int32_t next_range;
    uint64_t pointer_queries; /* fkvi_debug_pointer_queries */
    range_query_fn range_query; /* NULL: remember exact pointers only */
} cuda_backend;

static cuda_backend *backend_of(fkv_cache *c)
{
    return (cuda_backend *)c->backend;
}

/* Whether the attend's selection launches make the correction recall's
 * plan (attend_choose below): except under BOUNDED, whose rule kernel
 * comes between the selection and the recall and makes the plan itself.
 * Fixed at fkv_create, which sets up the kernels for it. */
static int32_t fuse_plan(const cuda_backend *cb)
{
    return !cb->bounded;
}

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

/* FKV_CUDA_EXPERIMENTAL: the side stream's recall of at most this many
 * (sequence, KV head)s is one FKV_PLAN_FUSED launch, a bulk pipeline per
 * head. More pipelines beside the GEMMs slowed them in every sweep
 * (docs/benchmarks.md, twelfth session), so larger batches keep the plan
 * and the 4-block gather. A guess, to be measured on a GPU. */
#define FUSED_SIDE_HEADS 16

/* FKV_CUDA_EXPERIMENTAL: FREEKV's small speculative recalls in one launch
 * (FKV_PLAN_FUSED, at most FUSED_SIDE_HEADS heads; docs/design.md section
 * 11), where the side stream gathers by bulk copies. */
static bool side_fused(const fkv_cache *c, const cuda_backend *cb)
{
    return experimental(c, EXP_SIDE_FUSED) && side_bulk_gather(c, cb);
}

/* ---- errors and the current device ------------------------------------ */

static fkv_status cuda_fail(fkv_cache *c, cudaError_t e, const char *what)
{
    (void)cudaGetLastError(); /* a failed call must not fail the next one */
    fkv_status st = e == cudaErrorMemoryAllocation ? FKV_ERR_OUT_OF_MEMORY
                                                   : FKV_ERR_DEVICE;
    return fkvi_fail(c, st, "%s: %s (%s)", what, cudaGetErrorString(e),
                     cudaGetErrorName(e));
}

#define CUDA_TRY(c, call, what)                                              \
    do {                                                                     \
        cudaError_t e_ = (call);                                             \
        if (e_ != cudaSuccess)                                               \
            return cuda_fail((c), e_, (what));                               \
    } while (0)

/* The library works on its device and gives the caller's thread its own
 * current device back. */
typedef struct device_guard {
    int previous;
    int switched;
} device_guard;

static fkv_status enter(fkv_cache *c, device_guard *g)
{
    g->switched = 0;
    CUDA_TRY(c, cudaGetDevice(&g->previous), "cudaGetDevice");
    if (g->previous != backend_of(c)->device) {
        CUDA_TRY(c, cudaSetDevice(backend_of(c)->device), "cudaSetDevice");
        g->switched = 1;
    }
    return FKV_OK;
}

static void leave(const device_guard *g)
{
    if (g->switched)
        (void)cudaSetDevice(g->previous);
}

const char *fkvi_cuda_unavailable(int device)
{
    static _Thread_local char why[160];
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        snprintf(why, sizeof why, "no usable CUDA device (%s)",
                 cudaGetErrorString(e));
        return why;
    }
    if (count == 0)
        return "no CUDA device";
    if (device >= count) {
        snprintf(why, sizeof why, "device %d does not exist (%d devices)",
                 device, count);
        return why;
    }
    int major = 0;
    e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                               device);
    if (e != cudaSuccess || major < 8) {
        (void)cudaGetLastError();
        snprintf(why, sizeof why,
                 "device %d has compute capability %d.x; 8.0 or newer is "
                 "needed", device, major);
        return why;
    }
    return NULL;
}

/* ---- creation ---------------------------------------------------------- */

/* cudaMalloc, cudaHostAlloc and cudaHostRegister, failing where the tests'
 * fault injection says (fkvi_device_fault, memory.c). */
static cudaError_t dev_malloc(void **p, size_t bytes)
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
    cudaError_t e = dev_malloc(p, bytes ? bytes : 16);
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

static void cuda_destroy(fkv_cache *c)
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

static bool capturing(cudaStream_t s);

/* Remembers the allocation holding p (checked and accepted): its whole
 * range where the driver tells it, else p alone. Under capture only p: the
 * driver query was never tried inside a capture, and must not risk
 * invalidating it (the runtime's check there always ran, before). */
static void remember_range(cuda_backend *cb, const void *p)
{
    const uintptr_t at = (uintptr_t)p;
    ptr_range r = {at, at + 1};
    if (cb->range_query && !capturing(cb->stream)) {
        CUpointer_attribute attrs[2] = {CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                        CU_POINTER_ATTRIBUTE_RANGE_SIZE};
        CUdeviceptr start = 0;
        size_t size = 0;
        void *data[2] = {&start, &size};
        if (cb->range_query(2, attrs, data, (CUdeviceptr)at) == CUDA_SUCCESS &&
            size > 0 && at >= (uintptr_t)start && at - (uintptr_t)start < size)
            r = (ptr_range){(uintptr_t)start, (uintptr_t)start + size};
    }
    cb->ranges[cb->next_range] = r;
    cb->next_range = (cb->next_range + 1) % PTR_RANGES;
}

/* Forgets the remembered allocations (fkv_sync, a new stream): memory the
 * engine freed and reallocated is checked again after these. */
static void forget_ranges(cuda_backend *cb)
{
    memset(cb->ranges, 0, sizeof cb->ranges);
    cb->next_range = 0;
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

static fkv_status cuda_create(fkv_cache *c)
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
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;

#define TRY(call, what)                                                      \
    do {                                                                     \
        cudaError_t e_ = (call);                                             \
        if (e_ != cudaSuccess) {                                             \
            st = cuda_fail(c, e_, (what));                                   \
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
    leave(&guard);
    if (st != FKV_OK) {
        c->pool_unused = false;
        cuda_destroy(c);
    }
    return st;
}

static fkv_status cuda_set_stream(fkv_cache *c, void *stream)
{
    cuda_backend *cb = backend_of(c);
    if ((cudaStream_t)stream == cb->stream)
        return FKV_OK;
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    /* Work already enqueued on the old stream (sequence set-up, page
     * tables, appends) comes before anything on the new one. */
    cudaError_t e = cudaEventRecord(cb->stream_switch, cb->stream);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent((cudaStream_t)stream, cb->stream_switch, 0);
    leave(&guard);
    if (e != cudaSuccess)
        return cuda_fail(c, e, "fkv_set_stream");
    cb->stream = (cudaStream_t)stream;
    forget_ranges(cb);
    return FKV_OK;
}

/* ---- sequences and pages ----------------------------------------------- */

/* Metadata of layers [0, L) of `slot` as at open, lengths 0. */
static cudaError_t seq_init(cuda_backend *cb, int32_t slot, int32_t L)
{
    cudaError_t e = cudaSuccess;
    for (int32_t l = 0; e == cudaSuccess && l < L; l++)
        e = fkv_launch_seq_init(&cb->lgeo[l], &cb->st_main, slot, l,
                                cb->stream);
    return e;
}

static fkv_status cuda_seq_open(fkv_cache *c, int32_t slot)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    const fkvi_geometry *g = &c->geo;
    uint64_t bytes = cb->seq_bytes;
    unsigned char *region = cb->seq_base_host[slot];
    const bool fresh = region == NULL;
    cudaError_t e = cudaSuccess;
    if (fresh) {
        /* The slot's first open: its region, kept until fkv_destroy. */
        e = dev_malloc((void **)&region, bytes);
        if (e != cudaSuccess) {
            leave(&guard);
            (void)cudaGetLastError();
            return fkvi_fail(c, e == cudaErrorMemoryAllocation
                                    ? FKV_ERR_OUT_OF_MEMORY
                                    : FKV_ERR_DEVICE,
                             "fkv_seq_open: cudaMalloc of %llu bytes for the "
                             "sequence's device state: %s",
                             (unsigned long long)bytes, cudaGetErrorString(e));
        }
        cb->seq_base_host[slot] = region;
        e = cudaMemcpyAsync(cb->seq_base_dev + slot, cb->seq_base_host + slot,
                            sizeof(void *), cudaMemcpyHostToDevice,
                            cb->stream);
    } else {
        /* A reused region: the previous sequence's speculative work on it
         * (side stream) comes before the new one's set-up; its work on the
         * engine's stream already does, in stream order (fkv_set_stream
         * keeps that order across streams). */
        e = cudaStreamWaitEvent(cb->stream, cb->seq_closed, 0);
    }
    if (e == cudaSuccess && !cb->geo.store) {
        uint64_t per = (uint64_t)g->layers * g->max_pages;
        e = cudaMemsetAsync((void *)(cb->st_main.block_ptr + slot * per), 0,
                            per * sizeof(uint64_t), cb->stream);
    }
    if (e == cudaSuccess)
        e = seq_init(cb, slot, g->layers);
    if (e != cudaSuccess) {
        if (fresh) { /* an error path: cudaFree's synchronisation is fine */
            (void)cudaFree(region);
            cb->seq_base_host[slot] = NULL;
        }
        leave(&guard);
        return cuda_fail(c, e, "fkv_seq_open");
    }
    if (fresh)
        cb->device_bytes += bytes;
    leave(&guard);
    return FKV_OK;
}

static void cuda_seq_close(fkv_cache *c, int32_t slot)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    if (enter(c, &guard) != FKV_OK)
        return;
    (void)slot; /* the region stays with the slot for its next sequence */
    /* Nothing is freed or waited for: the next open of a slot waits (on
     * the device) for this point of the side stream. */
    (void)cudaEventRecord(cb->seq_closed, cb->side);
    /* Fork (its partial page) and truncate (copy on write) copy pool blocks
     * on the host; a block this sequence gives back may still be written by
     * its work in flight, which cudaFree used to wait for here. Until those
     * copies are made in stream order, a cache that made one waits. */
    if (cb->host_block_copies) {
        (void)cudaStreamSynchronize(cb->side);
        (void)cudaStreamSynchronize(cb->stream);
    }
    (void)cudaGetLastError();
    leave(&guard);
}

static fkv_status cuda_pages_changed(fkv_cache *c, int32_t slot, int32_t layer,
                                     int32_t first, int32_t last)
{
    cuda_backend *cb = backend_of(c);
    if (cb->lgeo[layer].store || last <= first)
        return FKV_OK;
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    const uint64_t row = ((uint64_t)slot * c->geo.layers + layer) *
                         (uint64_t)c->geo.max_pages;
    const uint32_t *blocks = c->seqs[slot].blocks + (size_t)layer * c->geo.max_pages;
    /* The entries go by value in the launches (kernels/page_table.cu): no
     * host buffer that a queued copy could read after a later change. */
    cudaError_t e = cudaSuccess;
    for (int32_t at = first; e == cudaSuccess && at < last;
         at += FKV_DEV_PAGE_ENTRIES) {
        fkv_dev_page_entries pe;
        memset(&pe, 0, sizeof pe);
        pe.n = last - at < FKV_DEV_PAGE_ENTRIES ? last - at
                                                 : FKV_DEV_PAGE_ENTRIES;
        for (int32_t j = 0; j < pe.n; j++) {
            const uint32_t block = blocks[at + j];
            if (block == FKV_POOL_NO_BLOCK)
                continue;
            void *d = NULL;
            e = cudaHostGetDevicePointer(&d, fkv_pool_block(&c->pool, block),
                                         0);
            if (e != cudaSuccess) {
                leave(&guard);
                return cuda_fail(c, e, "cudaHostGetDevicePointer");
            }
            pe.addr[j] = (uint64_t)(uintptr_t)d;
        }
        e = fkv_launch_page_table(&cb->st_main, row + (uint64_t)at, &pe,
                                  cb->stream);
    }
    leave(&guard);
    if (e != cudaSuccess)
        return cuda_fail(c, e, "fkv_launch_page_table (page table)");
    return FKV_OK;
}

/* child (opened: its region initialised on the stream, its host page table
 * filled by fork.c) becomes a copy of parent's device state: resident pages
 * (sink, ring or store), summaries and lengths; its metadata is then reset
 * as at open (empty recall slots, no selection), as the CPU backend does.
 * Off the decode path; errors stay in the CUDA context, since this op
 * cannot fail (a sticky error is reported by the next call). */
static void cuda_seq_fork(fkv_cache *c, int32_t parent, int32_t child)
{
    cuda_backend *cb = backend_of(c);
    cb->host_block_copies = true;
    device_guard guard;
    if (enter(c, &guard) != FKV_OK)
        return;
    const int32_t L = c->geo.layers;
    for (int32_t l = 0; l < L; l++)
        (void)cuda_pages_changed(c, child, l, 0, c->seqs[child].mapped[l]);
    /* The parent's recall slots are written on the side stream: copy after
     * its work so far. */
    cudaError_t e = cudaEventRecord(cb->stream_switch, cb->side);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent(cb->stream, cb->stream_switch, 0);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(cb->seq_base_host[child],
                            cb->seq_base_host[parent],
                            cb->seq_bytes, cudaMemcpyDeviceToDevice,
                            cb->stream);
    if (e == cudaSuccess) /* metadata as at open; zeroes the lengths */
        e = seq_init(cb, child, L);
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(cb->st_main.len + (size_t)child * L,
                            cb->st_main.len + (size_t)parent * L,
                            (size_t)L * sizeof(int32_t),
                            cudaMemcpyDeviceToDevice, cb->stream);
    /* fork.c copied the partial pages on the host, but appends still in
     * flight may write the parent's: copy them again in stream order. */
    const fkvi_geometry *g = &c->geo;
    for (int32_t l = 0; e == cudaSuccess && l < L; l++) {
        const int64_t n = c->seqs[parent].length[l];
        if (fkvi_pool_unused(c, l) || n % g->page == 0)
            continue;
        const size_t at = (size_t)l * g->max_pages + (size_t)(n / g->page);
        e = cudaMemcpyAsync(
            fkv_pool_block(&c->pool, c->seqs[child].blocks[at]),
            fkv_pool_block(&c->pool, c->seqs[parent].blocks[at]),
            g->block_bytes, cudaMemcpyDefault, cb->stream);
    }
    (void)e;
    leave(&guard);
}

/* Before (slot, layer) goes down to `length` (truncate.c has already
 * copied a shared partial page; unmapping the pages past it follows). Runs
 * on the engine stream after the side stream's work so far, which may
 * still recall into this layer's slots. Cannot fail: errors stay in the
 * CUDA context for the next call to report. */
static void cuda_truncate(fkv_cache *c, int32_t slot, int32_t layer,
                          int64_t length)
{
    cuda_backend *cb = backend_of(c);
    cb->host_block_copies = true;
    device_guard guard;
    if (enter(c, &guard) != FKV_OK)
        return;
    const int32_t P = c->geo.page;
    if (length % P) /* the copy on write may have replaced its block */
        (void)cuda_pages_changed(c, slot, layer, (int32_t)(length / P),
                                 (int32_t)(length / P) + 1);
    cudaError_t e = cudaEventRecord(cb->stream_switch, cb->side);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent(cb->stream, cb->stream_switch, 0);
    if (e == cudaSuccess)
        e = fkv_launch_truncate(&cb->lgeo[layer], &cb->st_main, slot, layer,
                                (int32_t)length, cb->stream);
    (void)e;
    leave(&guard);
}

/* ---- the per-layer calls ----------------------------------------------- */

static fkv_status need_device_pointer(fkv_cache *c, const char *fn,
                                      const char *name, const void *p)
{
    cuda_backend *cb = backend_of(c);
    const uintptr_t at = (uintptr_t)p;
    for (int i = 0; i < PTR_RANGES; i++)
        if (at >= cb->ranges[i].begin && at < cb->ranges[i].end)
            return FKV_OK; /* in an allocation accepted before */
    cb->pointer_queries++;
    struct cudaPointerAttributes a;
    cudaError_t e = cudaPointerGetAttributes(&a, p);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "%s: %s is not a pointer CUDA knows (%s)", fn, name,
                         cudaGetErrorString(e));
    }
    if (a.type == cudaMemoryTypeUnregistered)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "%s: %s is host memory; the CUDA backend takes "
                         "device (or mapped) pointers", fn, name);
    if (a.type == cudaMemoryTypeDevice && a.device != backend_of(c)->device)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "%s: %s is on device %d; the cache is on device %d",
                         fn, name, a.device, backend_of(c)->device);
    remember_range(cb, p);
    return FKV_OK;
}

/* The part [first, first + count) of a validated batch, for one launch. */
static void dev_batch(const fkvi_batch *b, int32_t first, int32_t count,
                      fkv_dev_batch *d)
{
    memset(d, 0, sizeof *d);
    d->n = count;
    for (int32_t j = 0; j < count; j++) {
        d->slot[j] = b->slot[first + j];
        d->tokens[j] = b->tokens[first + j];
        d->offset[j] = b->offset[first + j] - b->offset[first];
        d->row[j] = j;
        if (d->tokens[j] > d->max_tokens)
            d->max_tokens = d->tokens[j];
    }
}

#define FOR_EACH_CHUNK(b, first, count)                                      \
    for (int32_t first = 0, count = 0;                                       \
         count = (b)->n - first < FKV_DEV_MAX_BATCH ? (b)->n - first         \
                                                    : FKV_DEV_MAX_BATCH,     \
                 first < (b)->n;                                             \
         first += count)

static bool capturing(cudaStream_t s)
{
    enum cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s, &status) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return status == cudaStreamCaptureStatusActive;
}

/* Whether this call's launches on `s` go through the launch cache, which then records them until cache_end. Eager calls only:
 * under a stream capture the launches are captured as they come. */
static bool cache_begin(cuda_backend *cb, cudaStream_t s)
{
    if (cb->launches.n_slots == 0 || capturing(s))
        return false;
    fkvi_launch_cache_begin(&cb->launches, s);
    return true;
}

static fkv_status cuda_append(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                              const void *k, const void *v)
{
    cuda_backend *cb = backend_of(c);
    fkv_status st = need_device_pointer(c, "fkv_append", "k", k);
    if (st == FKV_OK)
        st = need_device_pointer(c, "fkv_append", "v", v);
    if (st != FKV_OK)
        return st;
    device_guard guard;
    if ((st = enter(c, &guard)) != FKV_OK)
        return st;
    const size_t row = (size_t)c->geo.kv_heads * c->geo.head_dim *
                       c->geo.elem_bytes;
    FOR_EACH_CHUNK(b, first, count) {
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        size_t at = (size_t)b->offset[first] * row;
        cudaError_t e = fkv_launch_append(&cb->lgeo[layer], &cb->st_main, &d, layer,
                                          (const char *)k + at,
                                          (const char *)v + at, cb->stream);
        if (e != cudaSuccess) {
            leave(&guard);
            return cuda_fail(c, e, "fkv_append: append kernel");
        }
    }
    leave(&guard);
    return FKV_OK;
}

/* FKV_POLICY_EXTERNAL (validated by external.c): each head's pages,
 * sorted, become its pending correction (fix arrays), which the FIX recall
 * makes the active set, copying only the pages not in a slot yet. Cannot
 * fail: errors stay in the CUDA context for the next call to report. */
static void cuda_set_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                           const int32_t *pages, const int32_t *counts)
{
    cuda_backend *cb = backend_of(c);
    const fkv_dev_geometry *dg = &cb->lgeo[layer];
    const int32_t H = c->geo.kv_heads, K = c->geo.select_pages;
    device_guard guard;
    if (enter(c, &guard) != FKV_OK)
        return;
    cudaError_t e = cudaSuccess;
    FOR_EACH_CHUNK(b, first, count) {
        for (int32_t j = 0; e == cudaSuccess && j < count; j++) {
            const int32_t i = first + j;
            for (int32_t h = 0; h < H; h++) {
                const int32_t n = counts[(size_t)i * H + h];
                int32_t *to = cb->ext_pages + (size_t)h * K;
                const int32_t *from = pages ? pages + ((size_t)i * H + h) * K : NULL;
                cb->ext_counts[h] = n;
                for (int32_t x = 0; x < n; x++) { /* insertion sort: n <= K */
                    int32_t p = from[x], y = x;
                    for (; y > 0 && to[y - 1] > p; y--)
                        to[y] = to[y - 1];
                    to[y] = p;
                }
                for (int32_t x = n; x < K; x++)
                    to[x] = -1;
            }
            unsigned char *base = cb->seq_base_host[b->slot[i]] +
                                  dg->region_off;
            if (K > 0)
                e = cudaMemcpyAsync(base + dg->off_fix_pages, cb->ext_pages,
                                    (size_t)H * K * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, cb->stream);
            if (e == cudaSuccess)
                e = cudaMemcpyAsync(base + dg->off_fix_count, cb->ext_counts,
                                    (size_t)H * sizeof(int32_t),
                                    cudaMemcpyHostToDevice, cb->stream);
        }
        if (e != cudaSuccess)
            break;
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        e = fkv_launch_recall(&cb->lgeo[layer], &cb->st_main, &d, layer,
                              FKV_RECALL_FIX, cb->gather_blocks_main,
                              FKV_PLAN_PREFIX, cb->stream);
    }
    (void)e;
    leave(&guard);
}

static fkv_status cuda_append_strided(fkv_cache *c, int32_t layer,
                                      const fkvi_batch *b, const void *k,
                                      int64_t k_token, int64_t k_head,
                                      const void *v, int64_t v_token,
                                      int64_t v_head)
{
    cuda_backend *cb = backend_of(c);
    fkv_status st = need_device_pointer(c, "fkv_append_strided", "k->data", k);
    if (st == FKV_OK)
        st = need_device_pointer(c, "fkv_append_strided", "v->data", v);
    if (st != FKV_OK)
        return st;
    device_guard guard;
    if ((st = enter(c, &guard)) != FKV_OK)
        return st;
    const size_t eb = c->geo.elem_bytes;
    FOR_EACH_CHUNK(b, first, count) {
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        /* The kernel counts rows from the chunk's first one. */
        const char *kc = (const char *)k + (size_t)b->offset[first] * (size_t)k_token * eb;
        const char *vc = (const char *)v + (size_t)b->offset[first] * (size_t)v_token * eb;
        cudaError_t e = fkv_launch_append_strided(&cb->lgeo[layer], &cb->st_main, &d,
                                                  layer, kc, k_token, k_head,
                                                  vc, v_token, v_head,
                                                  cb->stream);
        if (e != cudaSuccess) {
            leave(&guard);
            return cuda_fail(c, e, "fkv_append_strided: append kernel");
        }
    }
    leave(&guard);
    return FKV_OK;
}

static int32_t bound_pages(fkv_cache *c, const fkvi_batch *b, int32_t layer)
{
    cuda_backend *cb = backend_of(c);
    if (fkvi_layer_policy(c, layer) != FKV_POLICY_DENSE)
        return cb->max_bound_pages;
    if (capturing(cb->stream)) /* replays will see longer sequences */
        return c->geo.max_pages;
    int64_t most = 1;
    for (int32_t i = 0; i < b->n; i++)
        if (c->seqs[b->slot[i]].length[layer] > most)
            most = c->seqs[b->slot[i]].length[layer];
    return (int32_t)((most + c->geo.page - 1) / c->geo.page);
}

/* The selection launch of FREEKV's and SYNC's attend. */
static fkv_select_mode attend_select_mode(const cuda_backend *cb,
                                          fkv_policy policy)
{
    if (policy == FKV_POLICY_SYNC)
        return FKV_SELECT_FIX_ALL;
    return cb->bounded ? FKV_SELECT_BOUNDED : FKV_SELECT_CORRECT;
}

/* FREEKV's attend writes the pending selection (select at attend), which a
 * side-stream fkv_select not yet followed by its fkv_recall (whose
 * recall_done the attend waits for) may still be writing: the engine waits
 * for it. */
static cudaError_t join_side_select(cuda_backend *cb, int32_t layer)
{
    if (!cb->select_unjoined[layer])
        return cudaSuccess;
    cudaError_t e = cudaEventRecord(cb->stream_switch, cb->side);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent(cb->stream, cb->stream_switch, 0);
    if (e == cudaSuccess)
        cb->select_unjoined[layer] = false;
    return e;
}

/* What every attend waits for before its launches: the previous step's
 * speculative recall of this layer (FREEKV; under capture the previous
 * replay has finished before this one starts), and the side stream's
 * selection. */
static cudaError_t attend_join(cuda_backend *cb, int32_t layer,
                               fkv_policy policy)
{
    cudaError_t e = cudaSuccess;
    if (policy == FKV_POLICY_FREEKV && !capturing(cb->stream))
        e = cudaStreamWaitEvent(cb->stream, cb->recall_done[layer], 0);
    if (e == cudaSuccess && policy == FKV_POLICY_FREEKV)
        e = join_side_select(cb, layer);
    return e;
}

/* The page set of one chunk's attention, chosen with the queries q (row j
 * for entry j): FREEKV's and SYNC's selection, correction and correction
 * recall, or RESIDENT's selection; DENSE and EXTERNAL choose nothing here.
 * fetch: the attention launch that follows reads the correction's units
 * (one launch: fkv_attend's; fkv_attend_tokens' several launches would
 * each read them over PCIe, so it gathers). */
static cudaError_t attend_choose(cuda_backend *cb, int32_t layer,
                                 fkv_policy policy, const fkv_dev_batch *d,
                                 const void *q, bool fetch)
{
    const fkv_dev_geometry *g = &cb->lgeo[layer];
    const fkv_dev_state *st = &cb->st_main;
    cudaError_t e = cudaSuccess;
    if (policy == FKV_POLICY_FREEKV || policy == FKV_POLICY_SYNC) {
        /* The correction recall's plan is made by the selection kernel's
         * tail (COSINE and SYNC: their selection is the last launch before
         * the recall; with the bulk gather, FKV_CUDA_EXPERIMENTAL, the tail
         * gathers too unless the attention fetches) or, under BOUNDED, by
         * the rule kernel that comes between, after its rule. What is left
         * is the gather, unless the attention fetches or the tail did it. */
        fkv_select_tail tail = FKV_TAIL_NONE;
        if (fuse_plan(cb))
            tail = st->gather_bulk && !fetch ? FKV_TAIL_GATHER
                   : cb->late_check          ? FKV_TAIL_PLAN_LATE
                                             : FKV_TAIL_PLAN;
        e = fkv_launch_select(g, &cb->lim, st, d, layer, q,
                              attend_select_mode(cb, policy), tail,
                              cb->seq_base_host, cb->stream);
        if (e == cudaSuccess && cb->bounded)
            e = fkv_launch_bounded(g, st, d, layer, cb->seq_base_host, cb->stream);
        if (e == cudaSuccess && tail != FKV_TAIL_GATHER && !fetch)
            e = fkv_launch_recall(g, st, d, layer, FKV_RECALL_FIX,
                                  cb->gather_blocks_main, FKV_PLAN_DONE, cb->stream);
    } else if (policy == FKV_POLICY_RESIDENT) {
        e = fkv_launch_select(g, &cb->lim, st, d, layer, q, FKV_SELECT_ACTIVE,
                              FKV_TAIL_NONE, cb->seq_base_host, cb->stream);
    }
    return e;
}

static fkv_status cuda_attend(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                              const void *q, void *out)
{
    cuda_backend *cb = backend_of(c);
    fkv_status st = need_device_pointer(c, "fkv_attend", "q", q);
    if (st == FKV_OK)
        st = need_device_pointer(c, "fkv_attend", "out", out);
    if (st != FKV_OK)
        return st;
    device_guard guard;
    if ((st = enter(c, &guard)) != FKV_OK)
        return st;
    const fkv_policy policy = fkvi_layer_policy(c, layer);
    const size_t qrow = (size_t)c->geo.q_heads * c->geo.head_dim *
                        c->geo.elem_bytes;
    cudaError_t e = attend_join(cb, layer, policy);
    const int32_t bound = bound_pages(c, b, layer);
    /* The split kernel reads the correction's units from the pool and
     * writes them back to their slots: no gather launch (section 6). */
    const bool fetch = policy == FKV_POLICY_FREEKV || policy == FKV_POLICY_SYNC;
    const bool cached = e == cudaSuccess && cache_begin(cb, cb->stream);
    FOR_EACH_CHUNK(b, first, count) {
        if (e != cudaSuccess)
            break;
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        const void *qc = (const char *)q + first * qrow;
        void *oc = (char *)out + first * qrow;
        e = attend_choose(cb, layer, policy, &d, qc, fetch);
        if (e == cudaSuccess)
            e = fkv_launch_attend(&cb->lgeo[layer], &cb->lim, &cb->st_main, &d, layer, qc, oc,
                                  bound, cb->seq_base_host, fetch, cb->stream);
    }
    if (cached)
        e = fkvi_launch_cache_end(&cb->launches, FKV_LAUNCH_SLOT_ATTEND(layer), e);
    /* Select at attend wrote the pending selection: the side stream waits
     * before it reads it (even after an error: some of it may have run). */
    if (policy == FKV_POLICY_FREEKV)
        cb->attend_unjoined[layer] = true;
    leave(&guard);
    if (e != cudaSuccess)
        return cuda_fail(c, e, "fkv_attend");
    return FKV_OK;
}

/* T query tokens per sequence (b->tokens, rows from b->offset): the page
 * set is selected (or corrected) with each sequence's last query, as on the
 * CPU, then one attend launch per token index t over the sequences with
 * more than t tokens, each cut to its causal limit. */
static fkv_status cuda_attend_tokens(fkv_cache *c, int32_t layer,
                                     const fkvi_batch *b, const void *q,
                                     void *out)
{
    cuda_backend *cb = backend_of(c);
    fkv_status st = need_device_pointer(c, "fkv_attend_tokens", "q", q);
    if (st == FKV_OK)
        st = need_device_pointer(c, "fkv_attend_tokens", "out", out);
    if (st != FKV_OK)
        return st;
    device_guard guard;
    if ((st = enter(c, &guard)) != FKV_OK)
        return st;
    const fkv_policy policy = fkvi_layer_policy(c, layer);
    const size_t qrow = (size_t)c->geo.q_heads * c->geo.head_dim *
                        c->geo.elem_bytes;
    cudaError_t e = attend_join(cb, layer, policy);
    const int32_t bound = bound_pages(c, b, layer);
    FOR_EACH_CHUNK(b, first, count) {
        if (e != cudaSuccess)
            break;
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        if (policy != FKV_POLICY_DENSE) {
            /* The select kernel reads entry j's query at row j. */
            for (int32_t j = 0; e == cudaSuccess && j < count; j++) {
                const int64_t last = b->offset[first + j] +
                                     b->tokens[first + j] - 1;
                e = cudaMemcpyAsync((char *)cb->q_last + (size_t)j * qrow,
                                    (const char *)q + (size_t)last * qrow,
                                    qrow, cudaMemcpyDefault, cb->stream);
            }
        }
        if (e == cudaSuccess)
            e = attend_choose(cb, layer, policy, &d, cb->q_last, false);
        for (int32_t t = 0; e == cudaSuccess && t < d.max_tokens; t++) {
            fkv_dev_batch a;
            memset(&a, 0, sizeof a);
            for (int32_t j = 0; j < count; j++) {
                const int32_t T = b->tokens[first + j];
                if (T <= t)
                    continue;
                a.slot[a.n] = b->slot[first + j];
                a.tokens[a.n] = 1;
                a.row[a.n] = (int32_t)(b->offset[first + j] + t);
                a.cut[a.n] = T - 1 - t;
                a.n++;
            }
            a.max_tokens = 1;
            /* Rows are absolute: q and out are not moved per chunk. */
            e = fkv_launch_attend(&cb->lgeo[layer], &cb->lim, &cb->st_main, &a, layer, q, out,
                                  bound, cb->seq_base_host, 0, cb->stream);
        }
    }
    /* Select at attend wrote the pending selection: the side stream waits
     * before it reads it (even after an error: some of it may have run). */
    if (policy == FKV_POLICY_FREEKV)
        cb->attend_unjoined[layer] = true;
    leave(&guard);
    if (e != cudaSuccess)
        return cuda_fail(c, e, "fkv_attend_tokens");
    return FKV_OK;
}

/* FREEKV's fkv_select. The attend selected at attend (section 4 of
 * docs/design.md): with q NULL (the attend's query; lib/layer_calls.c
 * checked that nothing came between) that selection is kept and nothing is
 * launched, only the side stream ordered after the attend that wrote it.
 * With a query, the snapshot kernel keeps the attend's selection where the
 * query and length are the attend's (bitwise) and the side stream selects
 * the other sequences. */
static fkv_status cuda_select(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                              const void *q)
{
    cuda_backend *cb = backend_of(c);
    if (c->opts.policy == FKV_POLICY_EXTERNAL) /* the engine selects */
        return FKV_OK;
    fkv_status st = q ? need_device_pointer(c, "fkv_select", "q", q) : FKV_OK;
    if (st != FKV_OK)
        return st;
    device_guard guard;
    if ((st = enter(c, &guard)) != FKV_OK)
        return st;
    const size_t qrow = (size_t)c->geo.q_heads * c->geo.head_dim *
                        c->geo.elem_bytes;
    cudaError_t e = cudaSuccess;
    if (q) {
        FOR_EACH_CHUNK(b, first, count) {
            fkv_dev_batch d;
            dev_batch(b, first, count, &d);
            e = fkv_launch_snapshot(&cb->lgeo[layer], &cb->st_main, &d, layer,
                                    (const char *)q + first * qrow, cb->stream);
            if (e != cudaSuccess)
                break;
        }
    }
    if (e == cudaSuccess)
        e = cudaEventRecord(cb->select_ready[layer], cb->stream);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent(cb->side, cb->select_ready[layer], 0);
    if (e == cudaSuccess)
        cb->attend_unjoined[layer] = false;
    if (q) {
        FOR_EACH_CHUNK(b, first, count) {
            if (e != cudaSuccess)
                break;
            fkv_dev_batch d;
            dev_batch(b, first, count, &d);
            e = fkv_launch_select(&cb->lgeo[layer], &cb->lim, &cb->st_side, &d, layer,
                                  NULL, FKV_SELECT_PENDING, FKV_TAIL_NONE,
                                  cb->seq_base_host, cb->side);
        }
    }
    /* The next attend must wait for this selection (even after an error:
     * some of it may have run). */
    if (q)
        cb->select_unjoined[layer] = true;
    leave(&guard);
    if (e != cudaSuccess)
        return cuda_fail(c, e, "fkv_select");
    return FKV_OK;
}

static fkv_status cuda_recall(fkv_cache *c, int32_t layer, const fkvi_batch *b)
{
    cuda_backend *cb = backend_of(c);
    if (c->opts.policy == FKV_POLICY_EXTERNAL) /* fkv_set_pages recalls */
        return FKV_OK;
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    cudaError_t e = cudaSuccess;
    /* No fkv_select since the attend: the side stream recalls the attend's
     * selection, so it waits for that attend. */
    if (cb->attend_unjoined[layer]) {
        e = cudaEventRecord(cb->select_ready[layer], cb->stream);
        if (e == cudaSuccess)
            e = cudaStreamWaitEvent(cb->side, cb->select_ready[layer], 0);
        if (e == cudaSuccess)
            cb->attend_unjoined[layer] = false;
    }
    const bool cached = e == cudaSuccess && cache_begin(cb, cb->side);
    FOR_EACH_CHUNK(b, first, count) {
        if (e != cudaSuccess)
            break;
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        /* FKV_CUDA_EXPERIMENTAL: at most FUSED_SIDE_HEADS heads, one
         * launch whose plan blocks copy their own units. */
        const bool fused =
            cb->side_fused && (int64_t)d.n * cb->geo.kv_heads <= FUSED_SIDE_HEADS;
        e = fkv_launch_recall(&cb->lgeo[layer], &cb->st_side, &d, layer,
                              FKV_RECALL_PENDING, cb->gather_blocks_side,
                              fused ? FKV_PLAN_FUSED : FKV_PLAN_PREFIX, cb->side);
        if (e != cudaSuccess)
            break;
    }
    if (cached)
        e = fkvi_launch_cache_end(&cb->launches, FKV_LAUNCH_SLOT_RECALL(layer), e);
    if (e == cudaSuccess)
        e = cudaEventRecord(cb->recall_done[layer], cb->side);
    if (e == cudaSuccess) /* the next attend waits for it */
        cb->select_unjoined[layer] = false;
    /* A captured step must join the side stream back before capture ends:
     * the last layer's recall is the step's last side-stream work. */
    if (e == cudaSuccess && layer == cb->last_sparse && capturing(cb->stream))
        e = cudaStreamWaitEvent(cb->stream, cb->recall_done[layer], 0);
    leave(&guard);
    if (e != cudaSuccess)
        return cuda_fail(c, e, "fkv_recall");
    return FKV_OK;
}

/* ---- off the decode path ----------------------------------------------- */

static fkv_status wait_all(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    CUDA_TRY(c, cudaStreamSynchronize(cb->side), "cudaStreamSynchronize");
    CUDA_TRY(c, cudaStreamSynchronize(cb->stream), "cudaStreamSynchronize");
    return FKV_OK;
}

static fkv_status cuda_selected_pages(fkv_cache *c, int32_t layer,
                                      int32_t slot, int32_t kv_head,
                                      int32_t *pages, int32_t capacity,
                                      int32_t *count)
{
    cuda_backend *cb = backend_of(c);
    const fkv_dev_geometry *g = &cb->lgeo[layer];
    if (fkvi_layer_policy(c, layer) == FKV_POLICY_DENSE) {
        *count = 0;
        return FKV_OK;
    }
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    if ((st = wait_all(c)) != FKV_OK) {
        leave(&guard);
        return st;
    }
    const bool resident = c->opts.policy == FKV_POLICY_RESIDENT;
    const unsigned char *base = cb->seq_base_host[slot] + g->region_off;
    const unsigned char *counts =
        base + (resident ? g->off_active_count : g->off_used_count);
    const unsigned char *list =
        base + (resident ? g->off_active_pages : g->off_used_pages) +
        (uint64_t)kv_head * g->select_pages * sizeof(int32_t);
    int32_t n = 0;
    cudaError_t e = cudaMemcpy(&n, counts + kv_head * sizeof(int32_t),
                               sizeof n, cudaMemcpyDeviceToHost);
    if (n < 0)
        n = 0;
    int32_t copy = n < capacity ? n : capacity;
    if (e == cudaSuccess && copy > 0)
        e = cudaMemcpy(pages, list, (size_t)copy * sizeof(int32_t),
                       cudaMemcpyDeviceToHost);
    leave(&guard);
    if (e != cudaSuccess)
        return cuda_fail(c, e, "fkv_get_selected_pages");
    *count = n;
    return FKV_OK;
}

static fkv_status cuda_stats(fkv_cache *c, fkv_stats *s)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    unsigned long long counters[FKV_DEV_COUNTERS];
    if ((st = wait_all(c)) == FKV_OK) {
        cudaError_t e = cudaMemcpy(counters, cb->st_main.counters,
                                   sizeof counters, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess)
            st = cuda_fail(c, e, "fkv_get_stats");
    }
    leave(&guard);
    if (st != FKV_OK)
        return st;
    s->pages_recalled += counters[FKV_DEV_PAGES_RECALLED];
    s->bytes_recalled += counters[FKV_DEV_BYTES_RECALLED];
    s->corrections += counters[FKV_DEV_CORRECTIONS];
    s->heads_checked += counters[FKV_DEV_HEADS_CHECKED];
    s->pages_recalled_critical += counters[FKV_DEV_PAGES_RECALLED_CRITICAL];
    s->host_bytes += sizeof *cb + fkvi_launch_cache_bytes(&cb->launches);
    s->device_bytes = cb->device_bytes;
    return FKV_OK;
}

static void cuda_reset_stats(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    if (enter(c, &guard) != FKV_OK)
        return;
    if (wait_all(c) == FKV_OK)
        (void)cudaMemset(cb->st_main.counters, 0,
                         FKV_DEV_COUNTERS * sizeof(unsigned long long));
    (void)cudaGetLastError();
    leave(&guard);
}

static fkv_status cuda_sync(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    const int32_t L = c->geo.layers;
    const size_t bytes = (size_t)c->opts.max_sequences * L * sizeof(int32_t);
    int32_t *len = fkvi_alloc(&c->mem, bytes, 1);
    unsigned int error = 0;
    if (!len) {
        leave(&guard);
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_sync: no memory");
    }
    if ((st = wait_all(c)) == FKV_OK) {
        cudaError_t e = cudaMemcpy(len, cb->st_main.len, bytes,
                                   cudaMemcpyDeviceToHost);
        if (e == cudaSuccess)
            e = cudaMemcpy(&error, cb->st_main.error, sizeof error,
                           cudaMemcpyDeviceToHost);
        if (e == cudaSuccess && error)
            e = cudaMemset(cb->st_main.error, 0, sizeof error);
        /* Events last recorded inside a captured graph cannot be waited on
         * by eager work; the side stream is idle now, so record them anew. */
        for (int32_t l = 0; e == cudaSuccess && l < L; l++)
            e = cudaEventRecord(cb->recall_done[l], cb->side);
        if (e != cudaSuccess)
            st = cuda_fail(c, e, "fkv_sync");
    }
    forget_ranges(cb);
    leave(&guard);
    if (st == FKV_OK) {
        for (int32_t s = 0; s < c->opts.max_sequences; s++)
            if (c->seqs[s].open)
                for (int32_t l = 0; l < L; l++)
                    c->seqs[s].length[l] = len[(size_t)s * L + l];
        if (error & FKV_DEV_ERR_CAPACITY)
            st = fkvi_fail(c, FKV_ERR_CAPACITY,
                           "fkv_sync: a replayed append went past the "
                           "reserved pages (fkv_seq_reserve) or "
                           "max_tokens_per_sequence; its tokens were "
                           "dropped and the length kept");
        else if (error)
            st = fkvi_fail(c, FKV_ERR_INTERNAL,
                           "fkv_sync: the device found an inconsistent page "
                           "table (error bits 0x%x)", error);
    }
    fkvi_free(&c->mem, len);
    return st;
}

/* ---- debug audit (fkvi_debug_audit; tests only, needs GPU validation) --- */

/* Compares the first `rows` rows of K and of V of a device unit copied to
 * the host with the pool's unit. */
static bool audit_rows(const fkvi_geometry *g, const unsigned char *dev,
                       const unsigned char *pool, int32_t rows)
{
    size_t row = (size_t)g->head_dim * g->elem_bytes;
    size_t half = (size_t)g->page * row;
    return memcmp(dev, pool, (size_t)rows * row) == 0 &&
           memcmp(dev + half, pool + half, (size_t)rows * row) == 0;
}

static fkv_status cuda_audit(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    const fkv_dev_geometry *d = &cb->geo;
    const fkvi_geometry *g = &c->geo;
    if (d->store)
        return FKV_OK; /* no host pool to compare with */
    device_guard guard;
    fkv_status st = enter(c, &guard);
    if (st != FKV_OK)
        return st;
    unsigned char *buf = fkvi_alloc(&c->mem, d->layer_bytes, 1);
    if (!buf) {
        leave(&guard);
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkvi_debug_audit: no memory");
    }
    const int32_t K = g->select_pages;
    const uint64_t unit = g->unit_bytes;
    st = wait_all(c);
    for (int32_t slot = 0; st == FKV_OK && slot < c->opts.max_sequences;
         slot++) {
        if (!c->seqs[slot].open)
            continue;
        for (int32_t layer = 0; st == FKV_OK && layer < g->layers; layer++) {
            if (cb->lgeo[layer].store)
                continue; /* a dense layer: no host pool to compare with */
            cudaError_t e = cudaMemcpy(
                buf, cb->seq_base_host[slot] + cb->lgeo[layer].region_off,
                d->layer_bytes, cudaMemcpyDeviceToHost);
            if (e != cudaSuccess) {
                st = cuda_fail(c, e, "fkvi_debug_audit");
                break;
            }
            fkvi_pages r;
            fkvi_page_ranges(g, c->seqs[slot].length[layer], &r);
            const uint32_t *blocks =
                c->seqs[slot].blocks + (size_t)layer * g->max_pages;
            const int32_t *slot_page = (const int32_t *)(buf + d->off_slot_page);
            const int32_t *active_count =
                (const int32_t *)(buf + d->off_active_count);
            const int32_t *active_pages =
                (const int32_t *)(buf + d->off_active_pages);
            const int32_t *active_slot =
                (const int32_t *)(buf + d->off_active_slot);
            for (int32_t h = 0; st == FKV_OK && h < g->kv_heads; h++) {
#define POOL(p) ((const unsigned char *)fkv_pool_block(&c->pool, blocks[p]) + \
                 (size_t)h * unit)
#define AUDIT_FAIL(...)                                                      \
    do {                                                                     \
        st = fkvi_fail(c, FKV_ERR_INTERNAL, "fkvi_debug_audit: sequence "    \
                       "slot %d, layer %d, KV head %d: " __VA_ARGS__);       \
        goto next;                                                           \
    } while (0)
                for (int32_t p = 0; p < r.sink_end; p++)
                    if (!audit_rows(g, buf + d->off_sink +
                                           ((uint64_t)h * g->sink_pages + p) * unit,
                                    POOL(p), g->page))
                        AUDIT_FAIL("sink page %d differs from the pool", slot,
                                   layer, h, p);
                for (int32_t p = r.window_first; p <= r.sealed; p++) {
                    int32_t rows = p < r.sealed ? g->page : r.partial;
                    uint64_t at = (uint64_t)h * g->ring_pages +
                                  (uint64_t)(p - g->sink_pages) % g->ring_pages;
                    if (rows && p >= g->sink_pages &&
                        !audit_rows(g, buf + d->off_ring + at * unit, POOL(p),
                                    rows))
                        AUDIT_FAIL("window page %d differs from the pool",
                                   slot, layer, h, p);
                }
                for (int32_t s2 = 0; s2 < K; s2++) {
                    int32_t p = slot_page[(size_t)h * K + s2];
                    if (p < 0)
                        continue;
                    if (p >= r.sealed)
                        AUDIT_FAIL("slot %d claims page %d of %d sealed", slot,
                                   layer, h, s2, p, r.sealed);
                    if (!audit_rows(g, buf + d->off_slots +
                                           ((uint64_t)h * K + s2) * unit,
                                    POOL(p), g->page))
                        AUDIT_FAIL("slot %d differs from page %d in the pool",
                                   slot, layer, h, s2, p);
                }
                for (int32_t j = 0; j < active_count[h]; j++) {
                    int32_t s2 = active_slot[(size_t)h * K + j];
                    int32_t p = active_pages[(size_t)h * K + j];
                    if (s2 < 0 || s2 >= K || slot_page[(size_t)h * K + s2] != p)
                        AUDIT_FAIL("active page %d is not in its slot %d",
                                   slot, layer, h, p, s2);
                }
            next:;
#undef AUDIT_FAIL
#undef POOL
            }
        }
    }
    leave(&guard);
    fkvi_free(&c->mem, buf);
    return st;
}

const fkvi_backend_ops fkvi_cuda_backend = {
    .name = "cuda", .create = cuda_create, .destroy = cuda_destroy,
    .set_stream = cuda_set_stream, .seq_open = cuda_seq_open,
    .seq_close = cuda_seq_close, .pages_changed = cuda_pages_changed,
    .sync = cuda_sync, .append = cuda_append, .attend = cuda_attend,
    .select = cuda_select, .recall = cuda_recall,
    .selected_pages = cuda_selected_pages, .stats = cuda_stats,
    .reset_stats = cuda_reset_stats, .append_strided = cuda_append_strided,
    .attend_tokens = cuda_attend_tokens, .audit = cuda_audit,
    .seq_fork = cuda_seq_fork, .truncate = cuda_truncate,
    .set_pages = cuda_set_pages,
};

bool fkvi_debug_launch_cache(const fkv_cache *c,
                             fkvi_launch_cache_counts *counts)
{
    memset(counts, 0, sizeof *counts);
    if (!c || !c->backend || c->ops != &fkvi_cuda_backend)
        return false;
    const cuda_backend *cb = (const cuda_backend *)c->backend;
    *counts = cb->launches.counts;
    return cb->launches.n_slots > 0;
}

void fkvi_debug_launch_cache_off(fkv_cache *c)
{
    if (!c || !c->backend || c->ops != &fkvi_cuda_backend)
        return;
    fkvi_launch_cache_free(&backend_of(c)->launches, &c->mem);
}

uint64_t fkvi_debug_pointer_queries(const fkv_cache *c)
{
    if (!c || !c->backend ||
        c->ops != &fkvi_cuda_backend)
        return 0;
    return ((const cuda_backend *)c->backend)->pointer_queries;
}
