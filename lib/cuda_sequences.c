/* The CUDA backend's sequences: regions kept per slot (no cudaFree at
 * close), their set-up on the engine's stream, page tables, fork and
 * truncate. */
#include <string.h>

#include "cuda_backend.h"

/* Metadata of layers [0, L) of `slot` as at open, lengths 0. */
static cudaError_t seq_init(cuda_backend *cb, int32_t slot, int32_t L)
{
    cudaError_t e = cudaSuccess;
    for (int32_t l = 0; e == cudaSuccess && l < L; l++)
        e = fkv_launch_seq_init(&cb->lgeo[l], &cb->st_main, slot, l,
                                cb->stream);
    return e;
}

fkv_status fkvi_cuda_seq_open(fkv_cache *c, int32_t slot)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
    if (st != FKV_OK)
        return st;
    const fkvi_geometry *g = &c->geo;
    uint64_t bytes = cb->seq_bytes;
    unsigned char *region = cb->seq_base_host[slot];
    const bool fresh = region == NULL;
    cudaError_t e = cudaSuccess;
    if (fresh) {
        /* The slot's first open: its region, kept until fkv_destroy. */
        e = fkvi_cuda_dev_malloc((void **)&region, bytes);
        if (e != cudaSuccess) {
            fkvi_cuda_leave(&guard);
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
        fkvi_cuda_leave(&guard);
        return fkvi_cuda_fail(c, e, "fkv_seq_open");
    }
    if (fresh)
        cb->device_bytes += bytes;
    fkvi_cuda_leave(&guard);
    return FKV_OK;
}

void fkvi_cuda_seq_close(fkv_cache *c, int32_t slot)
{
    cuda_backend *cb = backend_of(c);
    device_guard guard;
    if (fkvi_cuda_enter(c, &guard) != FKV_OK)
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
    fkvi_cuda_leave(&guard);
}

fkv_status fkvi_cuda_pages_changed(fkv_cache *c, int32_t slot, int32_t layer,
                                   int32_t first, int32_t last)
{
    cuda_backend *cb = backend_of(c);
    if (cb->lgeo[layer].store || last <= first)
        return FKV_OK;
    device_guard guard;
    fkv_status st = fkvi_cuda_enter(c, &guard);
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
                fkvi_cuda_leave(&guard);
                return fkvi_cuda_fail(c, e, "cudaHostGetDevicePointer");
            }
            pe.addr[j] = (uint64_t)(uintptr_t)d;
        }
        e = fkv_launch_page_table(&cb->st_main, row + (uint64_t)at, &pe,
                                  cb->stream);
    }
    fkvi_cuda_leave(&guard);
    if (e != cudaSuccess)
        return fkvi_cuda_fail(c, e, "fkv_launch_page_table (page table)");
    return FKV_OK;
}

/* child (opened: its region initialised on the stream, its host page table
 * filled by fork.c) becomes a copy of parent's device state: resident pages
 * (sink, ring or store), summaries and lengths; its metadata is then reset
 * as at open (empty recall slots, no selection), as the CPU backend does.
 * Off the decode path; errors stay in the CUDA context, since this op
 * cannot fail (a sticky error is reported by the next call). */
void fkvi_cuda_seq_fork(fkv_cache *c, int32_t parent, int32_t child)
{
    cuda_backend *cb = backend_of(c);
    cb->host_block_copies = true;
    device_guard guard;
    if (fkvi_cuda_enter(c, &guard) != FKV_OK)
        return;
    const int32_t L = c->geo.layers;
    for (int32_t l = 0; l < L; l++)
        (void)fkvi_cuda_pages_changed(c, child, l, 0, c->seqs[child].mapped[l]);
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
    fkvi_cuda_leave(&guard);
}

/* Before (slot, layer) goes down to `length` (truncate.c has already
 * copied a shared partial page; unmapping the pages past it follows). Runs
 * on the engine stream after the side stream's work so far, which may
 * still recall into this layer's slots. Cannot fail: errors stay in the
 * CUDA context for the next call to report. */
void fkvi_cuda_truncate(fkv_cache *c, int32_t slot, int32_t layer,
                        int64_t length)
{
    cuda_backend *cb = backend_of(c);
    cb->host_block_copies = true;
    device_guard guard;
    if (fkvi_cuda_enter(c, &guard) != FKV_OK)
        return;
    const int32_t P = c->geo.page;
    if (length % P) /* the copy on write may have replaced its block */
        (void)fkvi_cuda_pages_changed(c, slot, layer, (int32_t)(length / P),
                                 (int32_t)(length / P) + 1);
    cudaError_t e = cudaEventRecord(cb->stream_switch, cb->side);
    if (e == cudaSuccess)
        e = cudaStreamWaitEvent(cb->stream, cb->stream_switch, 0);
    if (e == cudaSuccess)
        e = fkv_launch_truncate(&cb->lgeo[layer], &cb->st_main, slot, layer,
                                (int32_t)length, cb->stream);
    (void)e;
    fkvi_cuda_leave(&guard);
}

