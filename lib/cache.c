/* The cache handle: creation, destruction, stream, options and stats. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Chunk size of the host pool: large enough that growth is rare, small
 * enough that an idle cache holds little. */
#define FKV_POOL_CHUNK_BYTES ((size_t)32 << 20)

static void *host_alloc(size_t bytes, void *ctx)
{
    (void)ctx;
    return malloc(bytes);
}

static void host_release(void *p, void *ctx)
{
    (void)ctx;
    free(p);
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
    fkv_options o;
    fkv_status st = fkvi_options_load(opts, &o);
    if (st != FKV_OK)
        return st;
    st = pick_backend(&o);
    if (st != FKV_OK)
        return st;
    st = fkvi_correction_backend_check(&o);
    if (st != FKV_OK)
        return st;

    fkv_cache *c = calloc(1, sizeof *c);
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
    c->opts = o;
    fkvi_geometry_init(&o, &c->geo);
    int32_t n = o.max_sequences;
    c->seqs = calloc((size_t)n, sizeof *c->seqs);
    c->batch_slot = malloc((size_t)n * sizeof *c->batch_slot);
    c->batch_tokens = malloc((size_t)n * sizeof *c->batch_tokens);
    c->batch_offset = malloc((size_t)n * sizeof *c->batch_offset);
    c->batch_mapped = malloc((size_t)n * sizeof *c->batch_mapped);
    c->batch_seen = calloc((size_t)n, 1);
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

#ifdef FKV_WITH_CUDA
    c->ops = o.backend == FKV_BACKEND_CUDA ? &fkvi_cuda_backend
                                           : &fkvi_cpu_backend;
#else
    c->ops = &fkvi_cpu_backend;
#endif
    /* The CPU pool; a backend may replace the allocator in create. */
    fkv_pool_init(&c->pool, c->geo.block_bytes, o.host_pool_bytes,
                  FKV_POOL_CHUNK_BYTES,
                  (fkv_pool_allocator){host_alloc, host_release, NULL});
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
    free(c->seqs);
    free(c->batch_slot);
    free(c->batch_tokens);
    free(c->batch_offset);
    free(c->batch_mapped);
    free(c->batch_seen);
    free(c);
}

fkv_status fkv_get_options(fkv_cache *c, fkv_options *out)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_get_options: cache is NULL");
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
    return c->ops->set_stream ? c->ops->set_stream(c, stream) : FKV_OK;
}

fkv_status fkv_get_stats(fkv_cache *c, fkv_stats *s)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_get_stats: cache is NULL");
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
    r.pages_recalled_attend = c->counters.pages_recalled_attend;
    r.host_bytes = c->pool.bytes_held + c->host_bytes_other;
    if (c->ops->stats) {
        fkv_status st = c->ops->stats(c, &r);
        if (st != FKV_OK)
            return st;
    }
    /* A newer caller's fields beyond ours are left as they were. */
    r.struct_size = size;
    memcpy(s, &r, size < sizeof r ? size : sizeof r);
    return FKV_OK;
}

fkv_status fkv_reset_stats(fkv_cache *c)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_reset_stats: cache is NULL");
    memset(&c->counters, 0, sizeof c->counters);
    if (c->ops->reset_stats)
        c->ops->reset_stats(c);
    return FKV_OK;
}
