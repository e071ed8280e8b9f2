/* The CPU backend: FreeKV's semantics in portable C on host memory. It keeps
 * the structure of the CUDA backend (sink, window ring and recall slots as
 * "device" copies, incremental recall from the pool) so that it can serve as
 * the reference the CUDA backend is held to. Arithmetic is in double. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* One (sequence, layer). Units are one (page, KV head) of K then V:
 * [2][P][D] in the cache dtype. */
typedef struct cpu_layer {
    unsigned char *sink;  /* [kv_heads][S] units */
    unsigned char *ring;  /* [kv_heads][W + 1] units: window + partial */
    unsigned char *slots; /* [kv_heads][K] units: recalled pages */
    float *smax, *smin;   /* [kv_heads][max_pages][D] page summaries */
    int32_t *slot_page;   /* [kv_heads][K] page in each slot, -1: empty */
    int32_t *active_pages;   /* [kv_heads][K] ascending */
    int32_t *active_slot;    /* [kv_heads][K] slot of each active page */
    int32_t *active_count;   /* [kv_heads]; -1: no selection yet */
    int32_t *used_pages;     /* [kv_heads][K] what the last attend used */
    int32_t *used_count;     /* [kv_heads] */
    int32_t *pending_pages;  /* [kv_heads][K] */
    int32_t *pending_count;  /* [kv_heads] */
    bool pending_valid;
    float *active_q;  /* [q_heads][D] query that made each active set */
    float *pending_q; /* [q_heads][D] */
    /* BOUNDED: pending was made by fkv_attend with pending_q at length
     * pending_len, so fkv_select with the same query only keeps it. */
    bool pending_at_attend;
    int64_t pending_len;
} cpu_layer;

typedef struct cpu_segment {
    const unsigned char *unit; /* K rows, then V rows at + P*D elements */
    int32_t rows;
} cpu_segment;

typedef struct cpu_backend {
    cpu_layer *layers;          /* [max_sequences][layers] */
    fkvi_select_scratch select;
    fkvi_correction_scratch corr; /* BOUNDED only */
    float *query;               /* [q_heads][D] one sequence's query */
    float *row;                 /* [D] */
    double *logits;             /* [max_tokens] */
    double *acc;                /* [D] */
    cpu_segment *segments;      /* [max_pages + 1] */
    int32_t *selected;          /* [max(K, 1)] */
    uint8_t *keep;              /* [max(K, 1)] */
    uint64_t bytes;             /* host memory held by this backend */
    size_t layer_bytes;         /* per (sequence, layer) */
} cpu_backend;

static cpu_backend *backend_of(fkv_cache *c)
{
    return (cpu_backend *)c->backend;
}

static cpu_layer *layer_of(fkv_cache *c, int32_t slot, int32_t layer)
{
    return &backend_of(c)->layers[(size_t)slot * c->geo.layers + layer];
}

static bool uses_slots(const fkv_cache *c)
{
    return c->opts.policy == FKV_POLICY_FREEKV ||
           c->opts.policy == FKV_POLICY_SYNC;
}

static bool bounded(const fkv_cache *c)
{
    return c->opts.policy == FKV_POLICY_FREEKV &&
           c->opts.correction_criterion == FKV_CRITERION_BOUNDED;
}

static bool uses_summaries(const fkv_cache *c)
{
    return c->opts.policy != FKV_POLICY_DENSE;
}

static void cpu_destroy(fkv_cache *c)
{
    cpu_backend *cb = backend_of(c);
    if (!cb)
        return;
    fkvi_select_scratch_free(&cb->select);
    fkvi_correction_scratch_free(&cb->corr);
    free(cb->layers);
    free(cb->query);
    free(cb->row);
    free(cb->logits);
    free(cb->acc);
    free(cb->segments);
    free(cb->selected);
    free(cb->keep);
    free(cb);
    c->backend = NULL;
}

static fkv_status cpu_create(fkv_cache *c)
{
    const fkvi_geometry *g = &c->geo;
    cpu_backend *cb = calloc(1, sizeof *cb);
    if (!cb)
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_create: no memory");
    c->backend = cb;
    size_t k = g->select_pages > 0 ? (size_t)g->select_pages : 1;
    cb->layers = calloc((size_t)c->opts.max_sequences * g->layers,
                        sizeof *cb->layers);
    cb->query = malloc((size_t)g->q_heads * g->head_dim * sizeof(float));
    cb->row = malloc((size_t)g->head_dim * sizeof(float));
    cb->logits = malloc((size_t)g->max_tokens * sizeof(double));
    cb->acc = malloc((size_t)g->head_dim * sizeof(double));
    cb->segments = malloc(((size_t)g->max_pages + 1) * sizeof(cpu_segment));
    cb->selected = malloc(k * sizeof(int32_t));
    cb->keep = malloc(k);
    fkv_status st = fkvi_select_scratch_init(&cb->select, g);
    if (st == FKV_OK && bounded(c))
        st = fkvi_correction_scratch_init(&cb->corr, g);
    if (st != FKV_OK || !cb->layers || !cb->query || !cb->row ||
        !cb->logits || !cb->acc || !cb->segments || !cb->selected ||
        !cb->keep) {
        cpu_destroy(c);
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY,
                         "fkv_create: no memory for the CPU backend's "
                         "scratch (max_tokens_per_sequence %lld)",
                         (long long)g->max_tokens);
    }
    cb->bytes = sizeof *cb + (size_t)g->max_tokens * sizeof(double) +
                ((size_t)g->max_pages + 1) *
                    (sizeof(cpu_segment) + sizeof(double) * (g->group + 1) +
                     sizeof(double) + sizeof(int32_t));
    return FKV_OK;
}

static void free_layer(cpu_layer *L)
{
    free(L->sink);
    free(L->ring);
    free(L->slots);
    free(L->smax);
    free(L->smin);
    free(L->slot_page);
    free(L->active_pages);
    free(L->active_slot);
    free(L->active_count);
    free(L->used_pages);
    free(L->used_count);
    free(L->pending_pages);
    free(L->pending_count);
    free(L->active_q);
    free(L->pending_q);
    memset(L, 0, sizeof *L);
}

/* calloc that tolerates zero-sized parts (K, S or W may be 0). */
static void *zalloc(size_t n, size_t size, size_t *total)
{
    *total += n * size;
    return calloc(n ? n : 1, size);
}

static fkv_status alloc_layer(fkv_cache *c, cpu_layer *L)
{
    const fkvi_geometry *g = &c->geo;
    size_t kvh = (size_t)g->kv_heads, K = (size_t)g->select_pages;
    size_t bytes = 0;
    bool ok = true;
    if (uses_slots(c)) {
        ok &= (L->sink = zalloc(kvh * g->sink_pages, g->unit_bytes, &bytes)) != NULL;
        ok &= (L->ring = zalloc(kvh * g->ring_pages, g->unit_bytes, &bytes)) != NULL;
        ok &= (L->slots = zalloc(kvh * K, g->unit_bytes, &bytes)) != NULL;
        ok &= (L->slot_page = zalloc(kvh * K, sizeof(int32_t), &bytes)) != NULL;
        ok &= (L->active_slot = zalloc(kvh * K, sizeof(int32_t), &bytes)) != NULL;
    }
    if (uses_summaries(c)) {
        size_t n = kvh * g->max_pages * g->head_dim;
        ok &= (L->smax = zalloc(n, sizeof(float), &bytes)) != NULL;
        ok &= (L->smin = zalloc(n, sizeof(float), &bytes)) != NULL;
    }
    ok &= (L->active_pages = zalloc(kvh * K, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->active_count = zalloc(kvh, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->used_pages = zalloc(kvh * K, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->used_count = zalloc(kvh, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->pending_pages = zalloc(kvh * K, sizeof(int32_t), &bytes)) != NULL;
    ok &= (L->pending_count = zalloc(kvh, sizeof(int32_t), &bytes)) != NULL;
    size_t qn = (size_t)g->q_heads * g->head_dim;
    ok &= (L->active_q = zalloc(qn, sizeof(float), &bytes)) != NULL;
    ok &= (L->pending_q = zalloc(qn, sizeof(float), &bytes)) != NULL;
    if (!ok) {
        free_layer(L);
        return FKV_ERR_OUT_OF_MEMORY;
    }
    if (L->slot_page)
        for (size_t i = 0; i < kvh * K; i++)
            L->slot_page[i] = -1;
    for (size_t h = 0; h < kvh; h++)
        L->active_count[h] = -1;
    backend_of(c)->layer_bytes = bytes;
    return FKV_OK;
}

static fkv_status cpu_seq_open(fkv_cache *c, int32_t slot)
{
    for (int32_t l = 0; l < c->geo.layers; l++) {
        if (alloc_layer(c, layer_of(c, slot, l)) != FKV_OK) {
            for (int32_t j = 0; j < l; j++)
                free_layer(layer_of(c, slot, j));
            return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY,
                             "fkv_seq_open: no memory for the sequence's "
                             "slots and summaries");
        }
    }
    backend_of(c)->bytes += backend_of(c)->layer_bytes * c->geo.layers;
    return FKV_OK;
}

static void cpu_seq_close(fkv_cache *c, int32_t slot)
{
    for (int32_t l = 0; l < c->geo.layers; l++)
        free_layer(layer_of(c, slot, l));
    backend_of(c)->bytes -= backend_of(c)->layer_bytes * c->geo.layers;
}

/* ---- addressing ------------------------------------------------------- */

static unsigned char *pool_unit(fkv_cache *c, int32_t slot, int32_t layer,
                                int32_t page, int32_t kv_head)
{
    uint32_t id =
        c->seqs[slot].blocks[(size_t)layer * c->geo.max_pages + page];
    return (unsigned char *)fkv_pool_block(&c->pool, id) +
           (size_t)kv_head * c->geo.unit_bytes;
}

static unsigned char *unit_at(const fkvi_geometry *g, unsigned char *base,
                              int32_t kv_head, int32_t per_head, int32_t i)
{
    return base + ((size_t)kv_head * per_head + i) * g->unit_bytes;
}

/* Where a sealed or partial page lives on the "device" (slots policies). */
static unsigned char *resident_unit(fkv_cache *c, cpu_layer *L, int32_t page,
                                    int32_t kv_head)
{
    const fkvi_geometry *g = &c->geo;
    if (page < g->sink_pages)
        return unit_at(g, L->sink, kv_head, g->sink_pages, page);
    return unit_at(g, L->ring, kv_head, g->ring_pages,
                   (page - g->sink_pages) % g->ring_pages);
}

/* ---- append ----------------------------------------------------------- */

static void summarise(fkv_cache *c, cpu_layer *L, const unsigned char *unit,
                      int32_t page, int32_t kv_head)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t D = g->head_dim;
    float *mx = L->smax + ((size_t)kv_head * g->max_pages + page) * D;
    float *mn = L->smin + ((size_t)kv_head * g->max_pages + page) * D;
    float *row = backend_of(c)->row;
    for (int32_t t = 0; t < g->page; t++) {
        fkvi_load_row(c->opts.dtype, unit, (size_t)t * D, (size_t)D, row);
        for (int32_t d = 0; d < D; d++) {
            if (t == 0 || row[d] > mx[d])
                mx[d] = row[d];
            if (t == 0 || row[d] < mn[d])
                mn[d] = row[d];
        }
    }
}

static fkv_status cpu_append(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                             const void *k, const void *v)
{
    const fkvi_geometry *g = &c->geo;
    const size_t row_bytes = (size_t)g->head_dim * g->elem_bytes;
    const size_t page_rows_bytes = (size_t)g->page * row_bytes;
    for (int32_t i = 0; i < b->n; i++) {
        int32_t slot = b->slot[i];
        cpu_layer *L = layer_of(c, slot, layer);
        int64_t held = c->seqs[slot].length[layer];
        for (int32_t t = 0; t < b->tokens[i]; t++) {
            int64_t pos = held + t;
            int32_t page = (int32_t)(pos / g->page);
            int32_t off = (int32_t)(pos % g->page);
            size_t src_row = (size_t)(b->offset[i] + t) * g->kv_heads;
            for (int32_t h = 0; h < g->kv_heads; h++) {
                const unsigned char *ks =
                    (const unsigned char *)k + (src_row + h) * row_bytes;
                const unsigned char *vs =
                    (const unsigned char *)v + (src_row + h) * row_bytes;
                unsigned char *pu = pool_unit(c, slot, layer, page, h);
                memcpy(pu + off * row_bytes, ks, row_bytes);
                memcpy(pu + page_rows_bytes + off * row_bytes, vs, row_bytes);
                if (uses_slots(c)) {
                    unsigned char *du = resident_unit(c, L, page, h);
                    memcpy(du + off * row_bytes, ks, row_bytes);
                    memcpy(du + page_rows_bytes + off * row_bytes, vs,
                           row_bytes);
                }
                if (off == g->page - 1 && uses_summaries(c))
                    summarise(c, L, pu, page, h);
            }
        }
    }
    return FKV_OK;
}

/* ---- selection and recall -------------------------------------------- */

/* Selects KV head h's pages with query q ([q_heads][D] of one sequence). */
static int32_t select_head(fkv_cache *c, cpu_layer *L, const fkvi_pages *r,
                           const float *q, int32_t h, int32_t *out)
{
    const fkvi_geometry *g = &c->geo;
    size_t off = (size_t)h * g->max_pages * g->head_dim;
    return fkvi_select_pages(g, c->opts.group_score, L->smax + off,
                             L->smin + off, q + (size_t)h * g->group * g->head_dim,
                             r->cand_first, r->cand_count,
                             &backend_of(c)->select, out);
}

/* Makes `pages` KV head h's active set, moving into slots only the pages
 * that are not there yet (into slots whose pages left the set). */
static void recall_head(fkv_cache *c, int32_t slot, int32_t layer,
                        cpu_layer *L, int32_t h, const int32_t *pages,
                        int32_t count)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t K = g->select_pages;
    int32_t *slot_page = L->slot_page + (size_t)h * K;
    int32_t *active_slot = L->active_slot + (size_t)h * K;
    uint8_t *keep = backend_of(c)->keep;
    memset(keep, 0, (size_t)K);
    for (int32_t j = 0; j < count; j++) {
        active_slot[j] = -1;
        for (int32_t s = 0; s < K; s++)
            if (slot_page[s] == pages[j]) {
                active_slot[j] = s;
                keep[s] = 1;
                break;
            }
    }
    int32_t next_free = 0;
    for (int32_t j = 0; j < count; j++) {
        if (active_slot[j] >= 0)
            continue;
        while (keep[next_free])
            next_free++;
        memcpy(unit_at(g, L->slots, h, K, next_free),
               pool_unit(c, slot, layer, pages[j], h), g->unit_bytes);
        slot_page[next_free] = pages[j];
        keep[next_free] = 1;
        active_slot[j] = next_free;
        c->counters.pages_recalled++;
        c->counters.bytes_recalled += g->unit_bytes;
    }
    memcpy(L->active_pages + (size_t)h * K, pages, (size_t)count * sizeof *pages);
    L->active_count[h] = count;
}

/* BOUNDED at attend for KV head h with the sequence's query in cb->query
 * (docs/design.md section 4): the top-K with it becomes the pending
 * selection; `full` (no selection yet, or candidates that fit but are not
 * all resident) recalls all of it now, otherwise only the missing pages
 * with mass are fetched. Returns whether the head counts as corrected. */
static bool bounded_head(fkv_cache *c, int32_t slot, int32_t layer,
                         cpu_layer *L, const fkvi_pages *r, int32_t h,
                         bool full)
{
    const fkvi_geometry *g = &c->geo;
    cpu_backend *cb = backend_of(c);
    const int32_t K = g->select_pages;
    int32_t *top = L->pending_pages + (size_t)h * K;
    if (full || r->cand_count <= K) {
        int32_t m = select_head(c, L, r, cb->query, h, top);
        L->pending_count[h] = m;
        if (full)
            recall_head(c, slot, layer, L, h, top, m);
        return full;
    }
    size_t off = (size_t)h * g->max_pages * g->head_dim;
    int32_t fetched = 0;
    int32_t n = fkvi_correction_bounded(
        g, &c->opts, L->smax + off, L->smin + off,
        cb->query + (size_t)h * g->group * g->head_dim, r->cand_first,
        r->cand_count, L->active_pages + (size_t)h * K, L->active_count[h],
        &cb->corr, top, cb->selected, &fetched);
    L->pending_count[h] = K;
    if (fetched > 0)
        recall_head(c, slot, layer, L, h, cb->selected, n);
    return fetched > 0;
}

static void load_query(fkv_cache *c, const void *q, int32_t i, float *out)
{
    size_t n = (size_t)c->geo.q_heads * c->geo.head_dim;
    fkvi_load_row(c->opts.dtype, q, (size_t)i * n, n, out);
}

/* ---- attention -------------------------------------------------------- */

static double dot_row(fkv_dtype dt, const unsigned char *row, const float *q,
                      int32_t dim)
{
    double acc = 0.0;
    switch (dt) {
    case FKV_DTYPE_F32: {
        const float *r = (const float *)row;
        for (int32_t d = 0; d < dim; d++)
            acc += (double)q[d] * r[d];
        break;
    }
    case FKV_DTYPE_F16: {
        const uint16_t *r = (const uint16_t *)row;
        for (int32_t d = 0; d < dim; d++)
            acc += (double)q[d] * fkvi_f16_to_float(r[d]);
        break;
    }
    case FKV_DTYPE_BF16: {
        const uint16_t *r = (const uint16_t *)row;
        for (int32_t d = 0; d < dim; d++)
            acc += (double)q[d] * fkvi_bf16_to_float(r[d]);
        break;
    }
    }
    return acc;
}

/* out[D] (one query head, in the cache dtype at element `first`) =
 * softmax(scale * q.k) v over the segments. */
static void attend_segments(fkv_cache *c, const cpu_segment *segs,
                            int32_t nsegs, const float *q, void *out,
                            size_t first)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t D = g->head_dim;
    const size_t row_bytes = (size_t)D * g->elem_bytes;
    cpu_backend *cb = backend_of(c);
    double *logits = cb->logits, top = -INFINITY;
    int64_t n = 0;
    for (int32_t s = 0; s < nsegs; s++)
        for (int32_t t = 0; t < segs[s].rows; t++) {
            double l = g->scale * dot_row(c->opts.dtype,
                                          segs[s].unit + t * row_bytes, q, D);
            logits[n++] = l;
            if (l > top)
                top = l;
        }
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) {
        logits[i] = exp(logits[i] - top);
        sum += logits[i];
    }
    double *acc = cb->acc;
    memset(acc, 0, (size_t)D * sizeof *acc);
    n = 0;
    for (int32_t s = 0; s < nsegs; s++) {
        const unsigned char *vrows = segs[s].unit + g->page * row_bytes;
        for (int32_t t = 0; t < segs[s].rows; t++) {
            double w = logits[n++] / sum;
            fkvi_load_row(c->opts.dtype, vrows + t * row_bytes, 0, (size_t)D,
                          cb->row);
            for (int32_t d = 0; d < D; d++)
                acc[d] += w * cb->row[d];
        }
    }
    for (int32_t d = 0; d < D; d++)
        cb->row[d] = (float)acc[d];
    fkvi_store_row(c->opts.dtype, cb->row, (size_t)D, out, first);
}

/* Builds the token segments KV head h attends to, in token order. */
static void add_segment(cpu_segment *segs, int32_t *n,
                        const unsigned char *unit, int32_t rows)
{
    segs[*n].unit = unit;
    segs[*n].rows = rows;
    (*n)++;
}

/* Builds the token segments KV head h attends to, in token order: the
 * sink, the selected pages, the window and the partial page (every page
 * under DENSE). */
static int32_t gather_segments(fkv_cache *c, int32_t slot, int32_t layer,
                               cpu_layer *L, const fkvi_pages *r, int32_t h,
                               const int32_t *selected, int32_t nsel)
{
    const fkvi_geometry *g = &c->geo;
    cpu_segment *segs = backend_of(c)->segments;
    const bool slots = uses_slots(c);
    int32_t n = 0;
#define PAGE_UNIT(p) (slots ? resident_unit(c, L, (p), h) \
                            : pool_unit(c, slot, layer, (p), h))
    if (c->opts.policy == FKV_POLICY_DENSE) {
        for (int32_t p = 0; p < r->sealed; p++)
            add_segment(segs, &n, PAGE_UNIT(p), g->page);
    } else {
        for (int32_t p = 0; p < r->sink_end; p++)
            add_segment(segs, &n, PAGE_UNIT(p), g->page);
        for (int32_t j = 0; j < nsel; j++)
            add_segment(segs, &n,
                        slots ? unit_at(g, L->slots, h, g->select_pages,
                                        L->active_slot[(size_t)h *
                                                       g->select_pages + j])
                              : pool_unit(c, slot, layer, selected[j], h),
                        g->page);
        for (int32_t p = r->window_first; p < r->sealed; p++)
            add_segment(segs, &n, PAGE_UNIT(p), g->page);
    }
    if (r->partial)
        add_segment(segs, &n, PAGE_UNIT(r->sealed), r->partial);
#undef PAGE_UNIT
    return n;
}

static fkv_status cpu_attend(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                             const void *q, void *out)
{
    const fkvi_geometry *g = &c->geo;
    cpu_backend *cb = backend_of(c);
    const fkv_policy policy = c->opts.policy;
    const int32_t K = g->select_pages, D = g->head_dim;
    const uint64_t recalled_before = c->counters.pages_recalled;
    for (int32_t i = 0; i < b->n; i++) {
        int32_t slot = b->slot[i];
        cpu_layer *L = layer_of(c, slot, layer);
        fkvi_pages r;
        fkvi_page_ranges(g, c->seqs[slot].length[layer], &r);
        load_query(c, q, i, cb->query);
        for (int32_t h = 0; h < g->kv_heads; h++) {
            int32_t *active = L->active_pages + (size_t)h * K;
            if (policy == FKV_POLICY_RESIDENT) {
                L->active_count[h] = select_head(c, L, &r, cb->query, h, active);
            } else if (policy == FKV_POLICY_SYNC) {
                int32_t m = select_head(c, L, &r, cb->query, h, cb->selected);
                recall_head(c, slot, layer, L, h, cb->selected, m);
            } else if (policy == FKV_POLICY_FREEKV) {
                c->counters.heads_checked++;
                size_t qoff = (size_t)h * g->group * D;
                bool full = L->active_count[h] < 0 ||
                    (r.cand_count <= K && L->active_count[h] < r.cand_count);
                if (bounded(c)) {
                    if (bounded_head(c, slot, layer, L, &r, h, full))
                        c->counters.corrections++;
                    goto attend;
                }
                bool correct = full ||
                    fkvi_group_cosine(cb->query + qoff, L->active_q + qoff,
                                      g->group, D) <
                        c->opts.correction_threshold;
                if (correct) {
                    c->counters.corrections++;
                    int32_t m = select_head(c, L, &r, cb->query, h,
                                            cb->selected);
                    recall_head(c, slot, layer, L, h, cb->selected, m);
                    memcpy(L->active_q + qoff, cb->query + qoff,
                           (size_t)g->group * D * sizeof(float));
                }
            }
        attend:;
            int32_t nsel = policy == FKV_POLICY_DENSE ? 0 : L->active_count[h];
            /* fkv_recall changes the active set before the next attend;
             * keep what this one used for fkv_get_selected_pages. */
            memcpy(L->used_pages + (size_t)h * K, active,
                   (size_t)nsel * sizeof *active);
            L->used_count[h] = nsel;
            int32_t nsegs = gather_segments(c, slot, layer, L, &r, h, active,
                                            nsel);
            for (int32_t j = 0; j < g->group; j++) {
                int32_t qh = h * g->group + j;
                attend_segments(c, cb->segments, nsegs,
                                cb->query + (size_t)qh * D, out,
                                ((size_t)i * g->q_heads + qh) * D);
            }
        }
        if (bounded(c)) {
            memcpy(L->pending_q, cb->query,
                   (size_t)g->q_heads * D * sizeof(float));
            L->pending_valid = true;
            L->pending_at_attend = true;
            L->pending_len = c->seqs[slot].length[layer];
        }
    }
    c->counters.pages_recalled_attend +=
        c->counters.pages_recalled - recalled_before;
    return FKV_OK;
}

static fkv_status cpu_select(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                             const void *q)
{
    const fkvi_geometry *g = &c->geo;
    for (int32_t i = 0; i < b->n; i++) {
        int32_t slot = b->slot[i];
        cpu_layer *L = layer_of(c, slot, layer);
        fkvi_pages r;
        fkvi_page_ranges(g, c->seqs[slot].length[layer], &r);
        if (L->pending_at_attend) {
            /* Select at attend: the same query (bitwise) at the same length
             * already made this selection. */
            float *query = backend_of(c)->query;
            load_query(c, q, i, query);
            if (L->pending_len == c->seqs[slot].length[layer] &&
                memcmp(query, L->pending_q, (size_t)g->q_heads *
                                                g->head_dim * sizeof(float)) == 0)
                continue;
            L->pending_at_attend = false;
        }
        load_query(c, q, i, L->pending_q);
        for (int32_t h = 0; h < g->kv_heads; h++)
            L->pending_count[h] =
                select_head(c, L, &r, L->pending_q, h,
                            L->pending_pages + (size_t)h * g->select_pages);
        L->pending_valid = true;
    }
    return FKV_OK;
}

static fkv_status cpu_recall(fkv_cache *c, int32_t layer, const fkvi_batch *b)
{
    const fkvi_geometry *g = &c->geo;
    for (int32_t i = 0; i < b->n; i++) {
        int32_t slot = b->slot[i];
        cpu_layer *L = layer_of(c, slot, layer);
        if (!L->pending_valid)
            continue;
        for (int32_t h = 0; h < g->kv_heads; h++)
            recall_head(c, slot, layer, L, h,
                        L->pending_pages + (size_t)h * g->select_pages,
                        L->pending_count[h]);
        memcpy(L->active_q, L->pending_q,
               (size_t)g->q_heads * g->head_dim * sizeof(float));
        L->pending_valid = false;
        L->pending_at_attend = false;
    }
    return FKV_OK;
}

static fkv_status cpu_selected_pages(fkv_cache *c, int32_t layer, int32_t slot,
                                     int32_t kv_head, int32_t *pages,
                                     int32_t capacity, int32_t *count)
{
    cpu_layer *L = layer_of(c, slot, layer);
    int32_t n = L->used_count[kv_head];
    const int32_t *src = L->used_pages + (size_t)kv_head * c->geo.select_pages;
    for (int32_t j = 0; j < n && j < capacity; j++)
        pages[j] = src[j];
    *count = n;
    return FKV_OK;
}

static fkv_status cpu_stats(fkv_cache *c, fkv_stats *s)
{
    s->host_bytes += backend_of(c)->bytes;
    return FKV_OK;
}

const fkvi_backend_ops fkvi_cpu_backend = {
    .name = "cpu",
    .create = cpu_create,
    .destroy = cpu_destroy,
    .set_stream = NULL,
    .seq_open = cpu_seq_open,
    .seq_close = cpu_seq_close,
    .append = cpu_append,
    .attend = cpu_attend,
    .select = cpu_select,
    .recall = cpu_recall,
    .selected_pages = cpu_selected_pages,
    .stats = cpu_stats,
    .reset_stats = NULL,
};
