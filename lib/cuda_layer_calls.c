/* The CUDA backend's per-layer calls, the decode path: append, attend,
 * select and recall (and fkv_set_pages, fkv_attend_tokens,
 * fkv_append_strided). No host synchronisation, and no allocation but
 * the launch cache's graph at a call's first repeat; the user's pointers
 * are checked once per allocation (docs/design.md section 6). */
#include <string.h>

#include "cuda_backend.h"

/* FKV_CUDA_EXPERIMENTAL: the side stream's recall of at most this many
 * (sequence, KV head)s is one FKV_PLAN_FUSED launch, a bulk pipeline per
 * head. More pipelines beside the GEMMs slowed them in every sweep
 * (docs/benchmarks.md, twelfth session), so larger batches keep the plan
 * and the 4-block gather. Neutral at batch 1 on the H200 (2026-12-05;
 * docs/benchmarks.md, seventeenth session). */
#define FUSED_SIDE_HEADS 16

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
void fkvi_cuda_forget_ranges(cuda_backend *cb)
{
    memset(cb->ranges, 0, sizeof cb->ranges);
    cb->next_range = 0;
}

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

/* Whether this call's launches on `s` go through the launch cache, which
 * then records them until fkvi_launch_cache_end. Eager calls only: under a
 * stream capture the launches are captured as they come. */
static bool cache_begin(cuda_backend *cb, cudaStream_t s)
{
    if (cb->launches.n_slots == 0 || capturing(s))
        return false;
    fkvi_launch_cache_begin(&cb->launches, s);
    return true;
}

fkv_status fkvi_cuda_append(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                            const void *k, const void *v)
{
    cuda_backend *cb = backend_of(c);
    fkv_status st = need_device_pointer(c, "fkv_append", "k", k);
    if (st == FKV_OK)
        st = need_device_pointer(c, "fkv_append", "v", v);
    if (st != FKV_OK)
        return st;
    device_guard guard;
    if ((st = fkvi_cuda_enter(c, &guard)) != FKV_OK)
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
            fkvi_cuda_leave(&guard);
            return fkvi_cuda_fail(c, e, "fkv_append: append kernel");
        }
    }
    fkvi_cuda_leave(&guard);
    return FKV_OK;
}

/* FKV_POLICY_EXTERNAL (validated by external.c): each head's pages,
 * sorted, become its pending correction (fix arrays), which the FIX recall
 * makes the active set, copying only the pages not in a slot yet. Cannot
 * fail: errors stay in the CUDA context for the next call to report. */
void fkvi_cuda_set_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                         const int32_t *pages, const int32_t *counts)
{
    cuda_backend *cb = backend_of(c);
    const fkv_dev_geometry *dg = &cb->lgeo[layer];
    const int32_t H = c->geo.kv_heads, K = c->geo.select_pages;
    device_guard guard;
    if (fkvi_cuda_enter(c, &guard) != FKV_OK)
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
    fkvi_cuda_leave(&guard);
}

fkv_status fkvi_cuda_append_strided(fkv_cache *c, int32_t layer,
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
    if ((st = fkvi_cuda_enter(c, &guard)) != FKV_OK)
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
            fkvi_cuda_leave(&guard);
            return fkvi_cuda_fail(c, e, "fkv_append_strided: append kernel");
        }
    }
    fkvi_cuda_leave(&guard);
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

/* What fkv_attend and fkv_attend_tokens share: their pointer checks, the
 * device guard and attend_join before the launches; after them the side
 * stream's duty to wait and the error's report. */
typedef struct attend_call {
    device_guard guard;
    fkv_policy policy;
    size_t qrow;   /* bytes of one token's q (and out) row */
    int32_t bound; /* the attention's page bound */
} attend_call;

/* FKV_OK with the guard entered (*e: attend_join's result), or the
 * status of a bad pointer or of the guard, with nothing entered. */
static fkv_status attend_begin(fkv_cache *c, int32_t layer,
                               const fkvi_batch *b, const char *call,
                               const void *q, const void *out,
                               attend_call *a, cudaError_t *e)
{
    fkv_status st = need_device_pointer(c, call, "q", q);
    if (st == FKV_OK)
        st = need_device_pointer(c, call, "out", out);
    if (st == FKV_OK)
        st = fkvi_cuda_enter(c, &a->guard);
    if (st != FKV_OK)
        return st;
    a->policy = fkvi_layer_policy(c, layer);
    a->qrow = (size_t)c->geo.q_heads * c->geo.head_dim * c->geo.elem_bytes;
    *e = attend_join(backend_of(c), layer, a->policy);
    a->bound = bound_pages(c, b, layer);
    return FKV_OK;
}

static fkv_status attend_end(fkv_cache *c, int32_t layer, const char *call,
                             const attend_call *a, cudaError_t e)
{
    /* Select at attend wrote the pending selection: the side stream waits
     * before it reads it (even after an error: some of it may have run). */
    if (a->policy == FKV_POLICY_FREEKV)
        backend_of(c)->attend_unjoined[layer] = true;
    fkvi_cuda_leave(&a->guard);
    if (e != cudaSuccess)
        return fkvi_cuda_fail(c, e, call);
    return FKV_OK;
}

fkv_status fkvi_cuda_attend(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                            const void *q, void *out)
{
    cuda_backend *cb = backend_of(c);
    attend_call a;
    cudaError_t e;
    fkv_status st = attend_begin(c, layer, b, "fkv_attend", q, out, &a, &e);
    if (st != FKV_OK)
        return st;
    /* The split kernel reads the correction's units from the pool and
     * writes them back to their slots: no gather launch (section 6). */
    const bool fetch = a.policy == FKV_POLICY_FREEKV ||
                       a.policy == FKV_POLICY_SYNC;
    const bool cached = e == cudaSuccess && cache_begin(cb, cb->stream);
    FOR_EACH_CHUNK(b, first, count) {
        if (e != cudaSuccess)
            break;
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        const void *qc = (const char *)q + first * a.qrow;
        void *oc = (char *)out + first * a.qrow;
        e = attend_choose(cb, layer, a.policy, &d, qc, fetch);
        if (e == cudaSuccess)
            e = fkv_launch_attend(&cb->lgeo[layer], &cb->lim, &cb->st_main, &d, layer, qc, oc,
                                  a.bound, cb->seq_base_host, fetch, cb->stream);
    }
    if (cached)
        e = fkvi_launch_cache_end(&cb->launches, FKV_LAUNCH_SLOT_ATTEND(layer), e);
    return attend_end(c, layer, "fkv_attend", &a, e);
}

/* T query tokens per sequence (b->tokens, rows from b->offset): the page
 * set is selected (or corrected) with each sequence's last query, as on the
 * CPU, then one attend launch per token index t over the sequences with
 * more than t tokens, each cut to its causal limit. */
fkv_status fkvi_cuda_attend_tokens(fkv_cache *c, int32_t layer,
                                   const fkvi_batch *b, const void *q,
                                   void *out)
{
    cuda_backend *cb = backend_of(c);
    attend_call a;
    cudaError_t e;
    fkv_status st = attend_begin(c, layer, b, "fkv_attend_tokens", q, out,
                                 &a, &e);
    if (st != FKV_OK)
        return st;
    FOR_EACH_CHUNK(b, first, count) {
        if (e != cudaSuccess)
            break;
        fkv_dev_batch d;
        dev_batch(b, first, count, &d);
        if (a.policy != FKV_POLICY_DENSE) {
            /* The select kernel reads entry j's query at row j. */
            for (int32_t j = 0; e == cudaSuccess && j < count; j++) {
                const int64_t last = b->offset[first + j] +
                                     b->tokens[first + j] - 1;
                e = cudaMemcpyAsync((char *)cb->q_last + (size_t)j * a.qrow,
                                    (const char *)q + (size_t)last * a.qrow,
                                    a.qrow, cudaMemcpyDefault, cb->stream);
            }
        }
        if (e == cudaSuccess)
            e = attend_choose(cb, layer, a.policy, &d, cb->q_last, false);
        for (int32_t t = 0; e == cudaSuccess && t < d.max_tokens; t++) {
            fkv_dev_batch one;
            memset(&one, 0, sizeof one);
            for (int32_t j = 0; j < count; j++) {
                const int32_t T = b->tokens[first + j];
                if (T <= t)
                    continue;
                one.slot[one.n] = b->slot[first + j];
                one.tokens[one.n] = 1;
                one.row[one.n] = (int32_t)(b->offset[first + j] + t);
                one.cut[one.n] = T - 1 - t;
                one.n++;
            }
            one.max_tokens = 1;
            /* Rows are absolute: q and out are not moved per chunk. */
            e = fkv_launch_attend(&cb->lgeo[layer], &cb->lim, &cb->st_main, &one, layer, q, out,
                                  a.bound, cb->seq_base_host, 0, cb->stream);
        }
    }
    return attend_end(c, layer, "fkv_attend_tokens", &a, e);
}

/* FREEKV's fkv_select. The attend selected at attend (section 4 of
 * docs/design.md): with q NULL (the attend's query; lib/layer_calls.c
 * checked that nothing came between) that selection is kept and nothing is
 * launched, only the side stream ordered after the attend that wrote it.
 * With a query, the snapshot kernel keeps the attend's selection where the
 * query and length are the attend's (bitwise) and the side stream selects
 * the other sequences. */
fkv_status fkvi_cuda_select(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                            const void *q)
{
    cuda_backend *cb = backend_of(c);
    if (c->opts.policy == FKV_POLICY_EXTERNAL) /* the engine selects */
        return FKV_OK;
    fkv_status st = q ? need_device_pointer(c, "fkv_select", "q", q) : FKV_OK;
    if (st != FKV_OK)
        return st;
    device_guard guard;
    if ((st = fkvi_cuda_enter(c, &guard)) != FKV_OK)
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
    fkvi_cuda_leave(&guard);
    if (e != cudaSuccess)
        return fkvi_cuda_fail(c, e, "fkv_select");
    return FKV_OK;
}

fkv_status fkvi_cuda_recall(fkv_cache *c, int32_t layer, const fkvi_batch *b)
{
    cuda_backend *cb = backend_of(c);
    if (c->opts.policy == FKV_POLICY_EXTERNAL) /* fkv_set_pages recalls */
        return FKV_OK;
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
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
    fkvi_cuda_leave(&guard);
    if (e != cudaSuccess)
        return fkvi_cuda_fail(c, e, "fkv_recall");
    return FKV_OK;
}

