/* The cache handle: creation, destruction, stream, options and stats. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Chunk size of the host pool: a 32nd of the most the cache can hold,
 * within [32 MiB, 1 GiB]. Large enough that growth is rare (on CUDA each
 * chunk is pinned, and pinning while appends run stalls them), small
 * enough that a cache holds at most a 32nd of its capacity (or 32 MiB)
 * beyond its pages. */
#define FKV_POOL_CHUNK_MIN ((uint64_t)32 << 20)
#define FKV_POOL_CHUNK_MAX ((uint64_t)1 << 30)

static size_t pool_chunk_bytes(const fkv_cache *c)
{
    const uint64_t most = (uint64_t)c->opts.max_sequences *
                          (uint64_t)c->geo.layers *
                          (uint64_t)c->geo.max_pages * c->geo.block_bytes;
    uint64_t chunk = most / 32;
    if (chunk < FKV_POOL_CHUNK_MIN)
        chunk = FKV_POOL_CHUNK_MIN;
    if (chunk > FKV_POOL_CHUNK_MAX)
        chunk = FKV_POOL_CHUNK_MAX;
    return (size_t)chunk;
}

/* Pool chunks: aligned for the vectorised copies. */
#define FKV_POOL_ALIGN 64

static void *chunk_alloc(size_t bytes, void *ctx)
{
    return fkvi_alloc_raw(ctx, bytes, FKV_POOL_ALIGN);
}

static void chunk_release(void *p, size_t bytes, void *ctx)
{
    fkvi_free_raw(ctx, p, bytes);
}

static void *meta_alloc(size_t bytes, void *ctx)
{
    return fkvi_alloc(ctx, bytes, 1);
}

static void meta_release(void *p, size_t bytes, void *ctx)
{
    (void)bytes;
    fkvi_free(ctx, p);
}

static fkv_status pick_backend(fkv_options *o)
{
#ifdef FKV_WITH_CUDA
    if (o->backend == FKV_BACKEND_AUTO)
        o->backend = fkvi_cuda_unavailable(o->device) ? FKV_BACKEND_CPU
                                                      : FKV_BACKEND_CUDA;
    if (o->backend == FKV_BACKEND_CUDA) {
        const char *why = fkvi_cuda_unavailable(o->device);
        if (why)
            return fkvi_fail(NULL, FKV_ERR_UNSUPPORTED,
                             "CUDA backend unavailable: %s", why);
    }
#else
    if (o->backend == FKV_BACKEND_AUTO)
        o->backend = FKV_BACKEND_CPU;
    if (o->backend == FKV_BACKEND_CUDA)
        return fkvi_fail(NULL, FKV_ERR_UNSUPPORTED,
                         "CUDA backend unavailable: libfreekv was built "
                         "without CUDA (make CUDA=0)");
#endif
    return FKV_OK;
}

fkv_status fkv_create(const fkv_options *opts, fkv_cache **out)
{
    if (!out)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_create: cache is NULL");
    *out = NULL;
    fkvi_clear_error(NULL);
    fkv_options o;
    fkv_status st = fkvi_options_load(opts, &o);
    if (st != FKV_OK)
        return st;
    st = pick_backend(&o);
    if (st != FKV_OK)
        return st;
    /* Read once, here: it decides what the cache may run. */
    const char *x = getenv("FKV_CUDA_EXPERIMENTAL");
    const bool experimental = x && strcmp(x, "1") == 0;

    fkvi_mem mem;
    fkvi_mem_init(&mem, &o);
    fkv_cache *c = fkvi_alloc(&mem, 1, sizeof *c);
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
    c->opts = o;
    c->mem = mem;
    c->cuda_experimental = experimental;
    fkvi_geometry_init(&o, &c->geo);
    int32_t n = o.max_sequences;
    c->seqs = fkvi_alloc(&c->mem, (size_t)n, sizeof *c->seqs);
    c->batch_slot = fkvi_alloc(&c->mem, (size_t)n, sizeof *c->batch_slot);
    c->batch_tokens = fkvi_alloc(&c->mem, (size_t)n, sizeof *c->batch_tokens);
    c->batch_offset = fkvi_alloc(&c->mem, (size_t)n, sizeof *c->batch_offset);
    c->batch_mapped = fkvi_alloc(&c->mem, (size_t)n, sizeof *c->batch_mapped);
    c->batch_seen = fkvi_alloc(&c->mem, (size_t)n, 1);
    if (!c->seqs || !c->batch_slot || !c->batch_tokens || !c->batch_offset ||
        !c->batch_mapped || !c->batch_seen) {
        fkv_destroy(c);
        return fkvi_fail(NULL, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
    }
    c->host_bytes_other =
        sizeof *c + (size_t)n * (sizeof *c->seqs + sizeof *c->batch_slot +
                                 sizeof *c->batch_tokens +
                                 sizeof *c->batch_offset +
                                 sizeof *c->batch_mapped + 1);
    if (o.dense_layers) {
        /* The caller may free its array once fkv_create returns. */
        c->dense = fkvi_alloc(&c->mem, (size_t)o.num_layers, 1);
        if (!c->dense) {
            fkv_destroy(c);
            return fkvi_fail(NULL, FKV_ERR_OUT_OF_MEMORY,
                             "fkv_create: no memory");
        }
        for (int32_t l = 0; l < o.num_layers; l++) {
            c->dense[l] = o.dense_layers[l] != 0;
            c->any_dense |= c->dense[l] != 0;
        }
        c->opts.dense_layers = c->dense;
        c->host_bytes_other += (size_t)o.num_layers;
    }

#ifdef FKV_WITH_CUDA
    c->ops = o.backend == FKV_BACKEND_CUDA ? &fkvi_cuda_backend
                                           : &fkvi_cpu_backend;
#else
    c->ops = &fkvi_cpu_backend;
#endif
    /* The CPU pool; a backend may replace the allocator in create. */
    fkv_pool_init(&c->pool, c->geo.block_bytes, o.host_pool_bytes,
                  pool_chunk_bytes(c),
                  (fkv_pool_allocator){chunk_alloc, chunk_release, &c->mem},
                  (fkv_pool_allocator){meta_alloc, meta_release, &c->mem});
    st = c->ops->create(c);
    if (st != FKV_OK) {
        /* The backend wrote its message into the handle; keep it. */
        char msg[FKV_ERROR_LEN];
        memcpy(msg, c->error, sizeof msg);
        fkv_destroy(c);
        return fkvi_fail(NULL, st, "%s", msg);
    }
    *out = c;
    return FKV_OK;
}

void fkv_destroy(fkv_cache *c)
{
    if (!c)
        return;
    if (c->seqs) {
        for (int32_t s = 0; s < c->opts.max_sequences; s++)
            if (c->seqs[s].open)
                fkv_seq_close(c, s + c->seqs[s].generation *
                                         (int64_t)c->opts.max_sequences);
    }
    if (c->ops && c->ops->destroy)
        c->ops->destroy(c);
    fkv_pool_destroy(&c->pool);
    fkvi_mem mem = c->mem; /* outlives the handle */
    fkvi_free(&mem, c->seqs);
    fkvi_free(&mem, c->batch_slot);
    fkvi_free(&mem, c->block_shares);
    fkvi_free(&mem, c->batch_tokens);
    fkvi_free(&mem, c->batch_offset);
    fkvi_free(&mem, c->batch_mapped);
    fkvi_free(&mem, c->batch_seen);
    fkvi_free(&mem, c->dense);
    fkvi_free(&mem, c->layer_pool_unused);
    fkvi_free(&mem, c);
}

fkv_status fkv_get_options(fkv_cache *c, fkv_options *out)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_get_options: cache is NULL");
    fkvi_clear_error(c);
    if (!out)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_get_options: out is NULL");
    if (out->struct_size < FKVI_OPTIONS_SIZE_V0)
        return fkvi_fail(c, FKV_ERR_VERSION_MISMATCH,
                         "fkv_get_options: out->struct_size %zu is smaller "
                         "than the first fkv_options (%zu)",
                         out->struct_size, (size_t)FKVI_OPTIONS_SIZE_V0);
    size_t size = out->struct_size;
    /* An older caller's struct gets the fields it knows. */
    memcpy(out, &c->opts, size < sizeof c->opts ? size : sizeof c->opts);
    out->struct_size = size;
    return FKV_OK;
}

fkv_status fkv_set_stream(fkv_cache *c, void *stream)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_set_stream: cache is NULL");
    fkvi_clear_error(c);
    return c->ops->set_stream ? c->ops->set_stream(c, stream) : FKV_OK;
}

fkv_status fkv_get_stats(fkv_cache *c, fkv_stats *s)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_get_stats: cache is NULL");
    fkvi_clear_error(c);
    if (!s)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_get_stats: stats is NULL");
    if (s->struct_size < FKVI_STATS_SIZE_V0)
        return fkvi_fail(c, FKV_ERR_VERSION_MISMATCH,
                         "fkv_get_stats: stats->struct_size is %zu, smaller "
                         "than the first fkv_stats (%zu bytes)",
                         s->struct_size, (size_t)FKVI_STATS_SIZE_V0);
    size_t size = s->struct_size;
    fkv_stats r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    r.steps = c->counters.steps;
    r.pages_recalled = c->counters.pages_recalled;
    r.bytes_recalled = c->counters.bytes_recalled;
    r.corrections = c->counters.corrections;
    r.heads_checked = c->counters.heads_checked;
    r.pages_recalled_critical = c->counters.pages_recalled_critical;
    r.host_bytes = c->pool.bytes_held + c->host_bytes_other;
    if (c->ops->stats) {
        fkv_status st = c->ops->stats(c, &r);
        if (st != FKV_OK)
            return st;
    }
    /* An older caller's struct gets its own fields only; a newer caller's
     * fields beyond ours are left as they were. */
    r.struct_size = size;
    memcpy(s, &r, size < sizeof r ? size : sizeof r);
    return FKV_OK;
}

fkv_status fkv_reset_stats(fkv_cache *c)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_reset_stats: cache is NULL");
    fkvi_clear_error(c);
    memset(&c->counters, 0, sizeof c->counters);
    if (c->ops->reset_stats)
        c->ops->reset_stats(c);
    return FKV_OK;
}

fkv_status fkvi_debug_audit(fkv_cache *c)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkvi_debug_audit: cache is NULL");
    fkvi_clear_error(c);
    return c->ops->audit ? c->ops->audit(c) : FKV_OK;
}
