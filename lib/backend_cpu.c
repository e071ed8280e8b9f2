/* The CPU backend: FreeKV's semantics in portable C on host memory, the
 * reference the CUDA backend is held to (cpu_backend.h). This file: create
 * and destroy, sequences (open, close, truncate, fork), stats, the debug
 * audit and the ops table; the per-layer calls are in cpu_decode.c. */
#include <stdlib.h>
#include <string.h>

#include "cpu_backend.h"

static void cpu_destroy(fkv_cache *c)
{
    cpu_backend *cb = backend_of(c);
    if (!cb)
        return;
    const fkvi_mem *m = &c->mem;
    fkvi_select_scratch_free(&cb->select);
    fkvi_correction_scratch_free(&cb->corr);
    fkvi_free(m, cb->layers);
    fkvi_free(m, cb->query);
    fkvi_free(m, cb->query_tok);
    fkvi_free(m, cb->row);
    fkvi_free(m, cb->stage);
    fkvi_free(m, cb->ktile);
    fkvi_free(m, cb->vtile);
    fkvi_free(m, cb->logits);
    fkvi_free(m, cb->acc);
    fkvi_free(m, cb->segments);
    fkvi_free(m, cb->selected);
    fkvi_free(m, cb->keep);
    fkvi_free(m, cb);
    c->backend = NULL;
}

static fkv_status cpu_create(fkv_cache *c)
{
    const fkvi_geometry *g = &c->geo;
    const fkvi_mem *m = &c->mem;
    cpu_backend *cb = fkvi_alloc(m, 1, sizeof *cb);
    if (!cb)
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
    c->backend = cb;
    size_t k = g->select_pages > 0 ? (size_t)g->select_pages : 1;
    cb->layers = fkvi_alloc(m, (size_t)c->opts.max_sequences * g->layers,
                            sizeof *cb->layers);
    cb->query = fkvi_alloc(m, (size_t)g->q_heads * g->head_dim, sizeof(float));
    cb->query_tok =
        fkvi_alloc(m, (size_t)g->q_heads * g->head_dim, sizeof(float));
    cb->row = fkvi_alloc(m, (size_t)g->head_dim, sizeof(float));
    const size_t tile = (size_t)round_to_block(g->page) * g->head_dim;
    cb->stage = fkvi_alloc(m, tile, sizeof(float));
    cb->ktile = fkvi_alloc(m, tile, sizeof(double));
    cb->vtile = fkvi_alloc(m, tile, sizeof(double));
    cb->logits =
        fkvi_alloc(m, (size_t)g->group * g->max_tokens, sizeof(double));
    cb->acc = fkvi_alloc(m, (size_t)g->group * g->head_dim, sizeof(double));
    cb->segments = fkvi_alloc(m, (size_t)g->max_pages + 1, sizeof(cpu_segment));
    cb->selected = fkvi_alloc(m, k, sizeof(int32_t));
    cb->keep = fkvi_alloc(m, k, 1);
    fkv_status st = fkvi_select_scratch_init(&cb->select, g, m);
    /* By the cache's policy (sparing it when every layer is dense is not
     * worth a special case). */
    if (st == FKV_OK && c->opts.policy == FKV_POLICY_FREEKV &&
        c->opts.correction_criterion == FKV_CRITERION_BOUNDED)
        st = fkvi_correction_scratch_init(&cb->corr, g);
    if (st != FKV_OK || !cb->layers || !cb->query || !cb->query_tok ||
        !cb->row ||
        !cb->stage || !cb->ktile || !cb->vtile || !cb->logits || !cb->acc ||
        !cb->segments || !cb->selected || !cb->keep) {
        cpu_destroy(c);
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY,
                         "fkv_create: no memory for the CPU backend's "
                         "scratch (max_tokens_per_sequence %lld)",
                         (long long)g->max_tokens);
    }
    cb->bytes = sizeof *cb +
                (size_t)g->group * g->max_tokens * sizeof(double) +
                tile * (sizeof(float) + 2 * sizeof(double)) +
                ((size_t)g->max_pages + 1) *
                    (sizeof(cpu_segment) + sizeof(double) * (g->group + 1) +
                     sizeof(double) + sizeof(int32_t));
    return FKV_OK;
}

static void free_layer(const fkvi_mem *m, cpu_layer *L)
{
    fkvi_free(m, L->sink);
    fkvi_free(m, L->ring);
    fkvi_free(m, L->slots);
    fkvi_free(m, L->smax);
    fkvi_free(m, L->smin);
    fkvi_free(m, L->slot_page);
    fkvi_free(m, L->active_pages);
    fkvi_free(m, L->active_slot);
    fkvi_free(m, L->active_count);
    fkvi_free(m, L->used_pages);
    fkvi_free(m, L->used_count);
    fkvi_free(m, L->pending_pages);
    fkvi_free(m, L->pending_count);
    fkvi_free(m, L->active_q);
    fkvi_free(m, L->pending_q);
    memset(L, 0, sizeof *L);
}

/* Zeroed memory that tolerates zero-sized parts (K, S or W may be 0). */
static void *zalloc(const fkvi_mem *m, size_t n, size_t size, size_t *total)
{
    *total += n * size;
    return fkvi_alloc(m, n ? n : 1, size);
}

static fkv_status alloc_layer(fkv_cache *c, cpu_layer *L, int32_t layer,
                              size_t *total)
{
    const fkvi_geometry *g = &c->geo;
    size_t kvh = (size_t)g->kv_heads, K = (size_t)g->select_pages;
    size_t bytes = 0;
    bool ok = true;
    if (uses_slots(c, layer)) {
        ok &= (L->sink = zalloc(&c->mem, kvh * g->sink_pages, g->unit_bytes, &bytes)) != NULL;
        ok &= (L->ring = zalloc(&c->mem, kvh * g->ring_pages, g->unit_bytes, &bytes)) != NULL;
        ok &= (L->slots = zalloc(&c->mem, kvh * K, g->unit_bytes, &bytes)) != NULL;
        ok &= (L->slot_page = zalloc(&c->mem, kvh * K, sizeof(int32_t), &bytes)) != NULL;
        ok &= (L->active_slot = zalloc(&c->mem, kvh * K, sizeof(int32_t), &bytes)) != NULL;
    }
    if (uses_summaries(c, layer)) {
        size_t n = kvh * g->max_pages * g->head_dim;
        ok &= (L->smax = zalloc(&c->mem, n, sizeof(float), &bytes)) != NULL;
        ok &= (L->smin = zalloc(&c->mem, n, sizeof(float), &bytes)) != NULL;
    }
    ok &= (L->active_pages = zalloc(&c->mem, kvh * K, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->active_count = zalloc(&c->mem, kvh, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->used_pages = zalloc(&c->mem, kvh * K, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->used_count = zalloc(&c->mem, kvh, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->pending_pages = zalloc(&c->mem, kvh * K, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->pending_count = zalloc(&c->mem, kvh, sizeof(int32_t), &bytes)) != NULL;
    size_t qn = (size_t)g->q_heads * g->head_dim;
    ok &= (L->active_q = zalloc(&c->mem, qn, sizeof(float), &bytes)) != NULL;
    ok &= (L->pending_q = zalloc(&c->mem, qn, sizeof(float), &bytes)) != NULL;
    if (!ok) {
        free_layer(&c->mem, L);
        return FKV_ERR_OUT_OF_MEMORY;
    }
    if (L->slot_page)
        for (size_t i = 0; i < kvh * K; i++)
            L->slot_page[i] = -1;
    for (size_t h = 0; h < kvh; h++)
        L->active_count[h] = -1;
    *total += bytes;
    return FKV_OK;
}

static fkv_status cpu_seq_open(fkv_cache *c, int32_t slot)
{
    size_t bytes = 0;
    for (int32_t l = 0; l < c->geo.layers; l++) {
        if (alloc_layer(c, layer_of(c, slot, l), l, &bytes) != FKV_OK) {
            for (int32_t j = 0; j < l; j++)
                free_layer(&c->mem, layer_of(c, slot, j));
            return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY,
                             "fkv_seq_open: no memory for the sequence's "
                             "slots and summaries");
        }
    }
    backend_of(c)->seq_bytes = bytes; /* the same for every sequence */
    backend_of(c)->bytes += bytes;
    return FKV_OK;
}

static void cpu_seq_close(fkv_cache *c, int32_t slot)
{
    for (int32_t l = 0; l < c->geo.layers; l++)
        free_layer(&c->mem, layer_of(c, slot, l));
    backend_of(c)->bytes -= backend_of(c)->seq_bytes;
}

/* ---- truncate ---------------------------------------------------------- */

static void cpu_truncate(fkv_cache *c, int32_t slot, int32_t layer,
                         int64_t length)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t K = g->select_pages;
    cpu_layer *L = layer_of(c, slot, layer);
    fkvi_pages r;
    fkvi_page_ranges(g, length, &r);
    /* Pages from r.sealed on lose tokens (or are gone): a slot holding one
     * would be reused by recall_head by page index, with stale rows. */
    if (L->slot_page)
        for (size_t i = 0; i < (size_t)g->kv_heads * K; i++)
            if (L->slot_page[i] >= r.sealed)
                L->slot_page[i] = -1;
    /* Selections were made over the longer context; the next attend
     * re-selects (FREEKV) and the next select starts afresh. */
    for (int32_t h = 0; h < g->kv_heads; h++) {
        L->active_count[h] = -1;
        L->used_count[h] = 0;
    }
    L->pending_valid = false;
    /* The window moves back over pages the ring has overwritten since:
     * reload window and partial page from the pool, which holds every
     * page. Sink pages are never overwritten. Summaries of pages below
     * r.sealed are unchanged; the new partial page is summarised again
     * when it seals. */
    if (uses_slots(c, layer)) {
        int32_t last = r.partial ? r.sealed + 1 : r.sealed;
        int32_t first = r.window_first > g->sink_pages ? r.window_first
                                                       : g->sink_pages;
        for (int32_t p = first; p < last; p++)
            for (int32_t h = 0; h < g->kv_heads; h++)
                memcpy(resident_unit(c, L, p, h),
                       pool_unit(c, slot, layer, p, h), g->unit_bytes);
    }
}

/* ---- fork -------------------------------------------------------------- */

/* The child starts with the parent's resident pages and summaries, and
 * empty slots and no selection: it recalls what its own queries choose. */
static void cpu_seq_fork(fkv_cache *c, int32_t parent, int32_t child)
{
    const fkvi_geometry *g = &c->geo;
    const size_t kvh = (size_t)g->kv_heads, K = (size_t)g->select_pages;
    for (int32_t l = 0; l < g->layers; l++) {
        cpu_layer *P = layer_of(c, parent, l), *C = layer_of(c, child, l);
        if (uses_slots(c, l)) {
            memcpy(C->sink, P->sink, kvh * g->sink_pages * g->unit_bytes);
            memcpy(C->ring, P->ring, kvh * g->ring_pages * g->unit_bytes);
            for (size_t i = 0; i < kvh * K; i++)
                C->slot_page[i] = -1;
        }
        if (uses_summaries(c, l)) {
            size_t n = kvh * g->max_pages * g->head_dim * sizeof(float);
            memcpy(C->smax, P->smax, n);
            memcpy(C->smin, P->smin, n);
        }
        for (size_t h = 0; h < kvh; h++) {
            C->active_count[h] = -1;
            C->used_count[h] = 0;
        }
        C->pending_valid = false;
    }
}

static fkv_status cpu_stats(fkv_cache *c, fkv_stats *s)
{
    s->host_bytes += backend_of(c)->bytes;
    return FKV_OK;
}

/* ---- debug audit (fkvi_debug_audit; off every call path) --------------- */

/* Compares the first `rows` rows of K and of V of two units. */
static bool same_rows(const fkvi_geometry *g, const unsigned char *a,
                      const unsigned char *b, int32_t rows)
{
    size_t row = (size_t)g->head_dim * g->elem_bytes;
    size_t half = (size_t)g->page * row;
    return memcmp(a, b, (size_t)rows * row) == 0 &&
           memcmp(a + half, b + half, (size_t)rows * row) == 0;
}

static fkv_status cpu_audit(fkv_cache *c)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t K = g->select_pages;
    for (int32_t slot = 0; slot < c->opts.max_sequences; slot++) {
        if (!c->seqs[slot].open)
            continue;
        for (int32_t layer = 0; layer < g->layers; layer++) {
            if (!uses_slots(c, layer))
                continue; /* attention reads the pool itself */
            cpu_layer *L = layer_of(c, slot, layer);
            fkvi_pages r;
            fkvi_page_ranges(g, c->seqs[slot].length[layer], &r);
            for (int32_t h = 0; h < g->kv_heads; h++) {
#define AUDIT_FAIL(...) \
    return fkvi_fail(c, FKV_ERR_INTERNAL, "fkvi_debug_audit: sequence slot " \
                     "%d, layer %d, KV head %d: " __VA_ARGS__)
                for (int32_t p = 0; p < r.sink_end; p++)
                    if (!same_rows(g, resident_unit(c, L, p, h),
                                   pool_unit(c, slot, layer, p, h), g->page))
                        AUDIT_FAIL("sink page %d differs from the pool", slot,
                                   layer, h, p);
                for (int32_t p = r.window_first; p <= r.sealed; p++) {
                    int32_t rows = p < r.sealed ? g->page : r.partial;
                    if (rows && !same_rows(g, resident_unit(c, L, p, h),
                                           pool_unit(c, slot, layer, p, h),
                                           rows))
                        AUDIT_FAIL("window page %d differs from the pool",
                                   slot, layer, h, p);
                }
                for (int32_t s = 0; s < K; s++) {
                    int32_t p = L->slot_page[(size_t)h * K + s];
                    if (p < 0)
                        continue;
                    if (p >= r.sealed)
                        AUDIT_FAIL("slot %d claims page %d of %d sealed", slot,
                                   layer, h, s, p, r.sealed);
                    if (!same_rows(g, unit_at(g, L->slots, h, K, s),
                                   pool_unit(c, slot, layer, p, h), g->page))
                        AUDIT_FAIL("slot %d differs from page %d in the pool",
                                   slot, layer, h, s, p);
                }
                for (int32_t j = 0; j < L->active_count[h]; j++) {
                    int32_t s = L->active_slot[(size_t)h * K + j];
                    int32_t p = L->active_pages[(size_t)h * K + j];
                    if (s < 0 || s >= K || L->slot_page[(size_t)h * K + s] != p)
                        AUDIT_FAIL("active page %d is not in its slot %d",
                                   slot, layer, h, p, s);
                }
#undef AUDIT_FAIL
            }
        }
    }
    return FKV_OK;
}

const fkvi_backend_ops fkvi_cpu_backend = {
    .name = "cpu",
    .create = cpu_create,
    .destroy = cpu_destroy,
    .set_stream = NULL,
    .seq_open = cpu_seq_open,
    .seq_close = cpu_seq_close,
    .append = fkvi_cpu_append,
    .attend = fkvi_cpu_attend,
    .select = fkvi_cpu_select,
    .recall = fkvi_cpu_recall,
    .selected_pages = fkvi_cpu_selected_pages,
    .stats = cpu_stats,
    .reset_stats = NULL,
    .audit = cpu_audit,
    .truncate = cpu_truncate,
    .attend_tokens = fkvi_cpu_attend_tokens,
    .seq_fork = cpu_seq_fork,
    .set_pages = fkvi_cpu_set_pages,
    .append_strided = fkvi_cpu_append_strided,
};
