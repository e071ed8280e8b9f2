/* The CUDA backend's ops table and its errors (the device guard is inline
 * in cuda_backend.h); the rest is split by concern (lib/cuda_backend.h
 * lists the files). It lays out
 * device memory, streams and events, and launches the kernels in kernels/
 * in the order each policy needs.
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
#include <stdio.h>
#include <string.h>

#include "cuda_backend.h"

/* ---- errors and the device check -------------------------------------- */

fkv_status fkvi_cuda_fail(fkv_cache *c, cudaError_t e, const char *what)
{
    (void)cudaGetLastError(); /* a failed call must not fail the next one */
    fkv_status st = e == cudaErrorMemoryAllocation ? FKV_ERR_OUT_OF_MEMORY
                                                   : FKV_ERR_DEVICE;
    return fkvi_fail(c, st, "%s: %s (%s)", what, cudaGetErrorString(e),
                     cudaGetErrorName(e));
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

const fkvi_backend_ops fkvi_cuda_backend = {
    .name = "cuda", .create = fkvi_cuda_create, .destroy = fkvi_cuda_destroy,
    .set_stream = fkvi_cuda_set_stream, .seq_open = fkvi_cuda_seq_open,
    .seq_close = fkvi_cuda_seq_close, .pages_changed = fkvi_cuda_pages_changed,
    .sync = fkvi_cuda_sync, .append = fkvi_cuda_append, .attend = fkvi_cuda_attend,
    .select = fkvi_cuda_select, .recall = fkvi_cuda_recall,
    .selected_pages = fkvi_cuda_selected_pages, .stats = fkvi_cuda_stats,
    .reset_stats = fkvi_cuda_reset_stats, .append_strided = fkvi_cuda_append_strided,
    .attend_tokens = fkvi_cuda_attend_tokens, .audit = fkvi_cuda_audit,
    .seq_fork = fkvi_cuda_seq_fork, .truncate = fkvi_cuda_truncate,
    .set_pages = fkvi_cuda_set_pages,
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
