/* The CUDA backend's calls off the decode path: they wait for the
 * streams (fkv_get_selected_pages, fkv_get_stats, fkv_reset_stats,
 * fkv_sync) or are for the tests (fkvi_debug_audit). */
#include <string.h>

#include "cuda_backend.h"

static fkv_status wait_all(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    CUDA_TRY(c, cudaStreamSynchronize(cb->side), "cudaStreamSynchronize");
    CUDA_TRY(c, cudaStreamSynchronize(cb->stream), "cudaStreamSynchronize");
    return FKV_OK;
}

fkv_status fkvi_cuda_selected_pages(fkv_cache *c, int32_t layer,
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
    fkv_status st = fkvi_cuda_enter(c, &guard);
    if (st != FKV_OK)
        return st;
    if ((st = wait_all(c)) != FKV_OK) {
        fkvi_cuda_leave(&guard);
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
    fkvi_cuda_leave(&guard);
    if (e != cudaSuccess)
        return fkvi_cuda_fail(c, e, "fkv_get_selected_pages");
    *count = n;
    return FKV_OK;
}

fkv_status fkvi_cuda_stats(fkv_cache *c, fkv_stats *s)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
    if (st != FKV_OK)
        return st;
    unsigned long long counters[FKV_DEV_COUNTERS];
    if ((st = wait_all(c)) == FKV_OK) {
        cudaError_t e = cudaMemcpy(counters, cb->st_main.counters,
                                   sizeof counters, cudaMemcpyDeviceToHost);
        if (e != cudaSuccess)
            st = fkvi_cuda_fail(c, e, "fkv_get_stats");
    }
    fkvi_cuda_leave(&guard);
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

void fkvi_cuda_reset_stats(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    if (fkvi_cuda_enter(c, &guard) != FKV_OK)
        return;
    if (wait_all(c) == FKV_OK)
        (void)cudaMemset(cb->st_main.counters, 0,
                         FKV_DEV_COUNTERS * sizeof(unsigned long long));
    (void)cudaGetLastError();
    fkvi_cuda_leave(&guard);
}

fkv_status fkvi_cuda_sync(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
    if (st != FKV_OK)
        return st;
    const int32_t L = c->geo.layers;
    const size_t bytes = (size_t)c->opts.max_sequences * L * sizeof(int32_t);
    int32_t *len = fkvi_alloc(&c->mem, bytes, 1);
    unsigned int error = 0;
    if (!len) {
        fkvi_cuda_leave(&guard);
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
            st = fkvi_cuda_fail(c, e, "fkv_sync");
    }
    fkvi_cuda_forget_ranges(cb);
    fkvi_cuda_leave(&guard);
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

/* ---- debug audit (fkvi_debug_audit; tests only) ------------------------ */

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

fkv_status fkvi_cuda_audit(fkv_cache *c)
{
    cuda_backend *cb = backend_of(c);
    const fkv_dev_geometry *d = &cb->geo;
    const fkvi_geometry *g = &c->geo;
    if (d->store)
        return FKV_OK; /* no host pool to compare with */
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
    if (st != FKV_OK)
        return st;
    unsigned char *buf = fkvi_alloc(&c->mem, d->layer_bytes, 1);
    if (!buf) {
        fkvi_cuda_leave(&guard);
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
                st = fkvi_cuda_fail(c, e, "fkvi_debug_audit");
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
    fkvi_cuda_leave(&guard);
    fkvi_free(&c->mem, buf);
    return st;
}

