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
    float *pending_q; /* [q_heads][D]; FREEKV: the attend's query while
                         fkvi_sequence.attended says pending is its
                         selection (select at attend) */
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
    float *query_tok;           /* [q_heads][D] one query token of several */
    float *row;                 /* [D] */
    float *stage;               /* [P][D] a page's K or V as float */
    double *ktile;              /* [round_to_block(P)][D] transposed K */
    double *vtile;              /* [P][D] V as double */
    double *logits;             /* [group][max_tokens] */
    double *acc;                /* [group][D] */
    cpu_segment *segments;      /* [max_pages + 1] */
    int32_t *selected;          /* [max(K, 1)] */
    uint8_t *keep;              /* [max(K, 1)] */
    uint64_t bytes;             /* host memory held by this backend */
    size_t seq_bytes;           /* per sequence, all layers */
} cpu_backend;

/* Tokens per block of the transposed K tile: the loops over a block's
 * tokens have this constant trip count, so that they vectorise at -O2 (GCC's
 * very-cheap cost model) and keep their accumulators in registers. */
#define CPU_TOKEN_BLOCK 16 /* CPU_FOR_BLOCK spells out 16 */

static int32_t round_to_block(int32_t rows)
{
    return (rows + CPU_TOKEN_BLOCK - 1) / CPU_TOKEN_BLOCK * CPU_TOKEN_BLOCK;
}

static cpu_backend *backend_of(fkv_cache *c)
{
    return (cpu_backend *)c->backend;
}

static cpu_layer *layer_of(fkv_cache *c, int32_t slot, int32_t layer)
{
    return &backend_of(c)->layers[(size_t)slot * c->geo.layers + layer];
}

/* The policy helpers take the layer: a dense layer (opts.dense_layers)
 * follows FKV_POLICY_DENSE whatever the cache's policy. */
static bool uses_slots(const fkv_cache *c, int32_t layer)
{
    const fkv_policy p = fkvi_layer_policy(c, layer);
    return p == FKV_POLICY_FREEKV || p == FKV_POLICY_SYNC ||
           p == FKV_POLICY_EXTERNAL;
}

static bool bounded(const fkv_cache *c, int32_t layer)
{
    return fkvi_layer_policy(c, layer) == FKV_POLICY_FREEKV &&
           c->opts.correction_criterion == FKV_CRITERION_BOUNDED;
}

static bool uses_summaries(const fkv_cache *c, int32_t layer)
{
    /* EXTERNAL: the engine scores pages, the library does not. */
    const fkv_policy p = fkvi_layer_policy(c, layer);
    return p != FKV_POLICY_DENSE && p != FKV_POLICY_EXTERNAL;
}

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

/* Folds one row into 16 channels of the running max and min. ?: compiles
 * to maxps/minps (restrict: no alias checks, so it vectorises at -O2); a
 * nan in the row keeps the previous value, as the comparisons always did. */
static void fold_block(float *restrict mx, float *restrict mn,
                       const float *restrict row)
{
    for (int32_t j = 0; j < CPU_TOKEN_BLOCK; j++) {
        mx[j] = row[j] > mx[j] ? row[j] : mx[j];
        mn[j] = row[j] < mn[j] ? row[j] : mn[j];
    }
}

/* The page's min/max summaries, from its K block converted at once. */
static void summarise(fkv_cache *c, cpu_layer *L, const unsigned char *unit,
                      int32_t page, int32_t kv_head)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t D = g->head_dim; /* a multiple of 16 */
    float *mx = L->smax + ((size_t)kv_head * g->max_pages + page) * D;
    float *mn = L->smin + ((size_t)kv_head * g->max_pages + page) * D;
    const float *rows = (const float *)unit;
    if (c->opts.dtype != FKV_DTYPE_F32) {
        fkvi_load_row(c->opts.dtype, unit, 0, (size_t)g->page * D,
                      backend_of(c)->stage);
        rows = backend_of(c)->stage;
    }
    memcpy(mx, rows, (size_t)D * sizeof *mx);
    memcpy(mn, rows, (size_t)D * sizeof *mn);
    for (int32_t t = 1; t < g->page; t++) {
        const float *row = rows + (size_t)t * D;
        for (int32_t d0 = 0; d0 < D; d0 += CPU_TOKEN_BLOCK)
            fold_block(mx + d0, mn + d0, row + d0);
    }
}

static fkv_status cpu_append_strided(fkv_cache *c, int32_t layer,
                                     const fkvi_batch *b, const void *k,
                                     int64_t k_token, int64_t k_head,
                                     const void *v, int64_t v_token,
                                     int64_t v_head)
{
    const fkvi_geometry *g = &c->geo;
    const size_t es = g->elem_bytes;
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
            int64_t row = b->offset[i] + t;
            for (int32_t h = 0; h < g->kv_heads; h++) {
                const unsigned char *ks = (const unsigned char *)k +
                    (size_t)(row * k_token + h * k_head) * es;
                const unsigned char *vs = (const unsigned char *)v +
                    (size_t)(row * v_token + h * v_head) * es;
                unsigned char *pu = pool_unit(c, slot, layer, page, h);
                memcpy(pu + off * row_bytes, ks, row_bytes);
                memcpy(pu + page_rows_bytes + off * row_bytes, vs, row_bytes);
                if (uses_slots(c, layer)) {
                    unsigned char *du = resident_unit(c, L, page, h);
                    memcpy(du + off * row_bytes, ks, row_bytes);
                    memcpy(du + page_rows_bytes + off * row_bytes, vs,
                           row_bytes);
                }
                if (off == g->page - 1 && uses_summaries(c, layer))
                    summarise(c, L, pu, page, h);
            }
        }
    }
    return FKV_OK;
}

static fkv_status cpu_append(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                             const void *k, const void *v)
{
    const int64_t D = c->geo.head_dim, row = c->geo.kv_heads * D;
    return cpu_append_strided(c, layer, b, k, row, D, v, row, D);
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
                        int32_t count, bool critical)
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
        if (critical)
            c->counters.pages_recalled_critical++;
    }
    memcpy(L->active_pages + (size_t)h * K, pages, (size_t)count * sizeof *pages);
    L->active_count[h] = count;
}

/* BOUNDED at attend for KV head h with the sequence's query in cb->query
 * (docs/design.md section 4; the caller counts its recalls as critical):
 * the top-K with it, or the speculative set of speculative_min_mass,
 * becomes the pending selection; `full` (no selection yet, or candidates that fit but are not
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
            recall_head(c, slot, layer, L, h, top, m, false);
        return full;
    }
    size_t off = (size_t)h * g->max_pages * g->head_dim;
    int32_t fetched = 0;
    int32_t n = fkvi_correction_bounded(
        g, &c->opts, L->smax + off, L->smin + off,
        cb->query + (size_t)h * g->group * g->head_dim, r->cand_first,
        r->cand_count, L->active_pages + (size_t)h * K, L->active_count[h],
        &cb->corr, top, &L->pending_count[h], cb->selected, &fetched);
    if (fetched > 0)
        recall_head(c, slot, layer, L, h, cb->selected, n, false);
    return fetched > 0;
}

static void load_query(fkv_cache *c, const void *q, int32_t i, float *out)
{
    size_t n = (size_t)c->geo.q_heads * c->geo.head_dim;
    fkvi_load_row(c->opts.dtype, q, (size_t)i * n, n, out);
}

/* ---- attention -------------------------------------------------------- */

/* Spells out X(0)..X(15), one statement per token of a block: named
 * locals rather than an array keep GCC's sums in registers. */
#define CPU_FOR_BLOCK(X)                                                      \
    X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12)      \
        X(13) X(14) X(15)

/* A segment's K rows as double, transposed into blocks of CPU_TOKEN_BLOCK
 * tokens: kt[(t / B) * D * B + d * B + t % B]; the padding tokens are 0.
 * Converted once per segment for the whole query group, so that the
 * group's dot products only load, multiply and add. */
static void load_k_tile(fkv_cache *c, const unsigned char *unit, int32_t rows,
                        double *kt)
{
    const int32_t D = c->geo.head_dim, B = CPU_TOKEN_BLOCK;
    const float *src = (const float *)unit;
    if (c->opts.dtype != FKV_DTYPE_F32) {
        fkvi_load_row(c->opts.dtype, unit, 0, (size_t)rows * D,
                      backend_of(c)->stage);
        src = backend_of(c)->stage;
    }
    int32_t t0 = 0;
    for (; t0 + B <= rows; t0 += B) {
        double *blk = kt + (size_t)t0 * D;
        const float *r = src + (size_t)t0 * D;
        for (int32_t d = 0; d < D; d++, blk += B)
            for (int32_t j = 0; j < CPU_TOKEN_BLOCK; j++)
                blk[j] = r[(size_t)j * D + d];
    }
    if (t0 < rows) {
        double *blk = kt + (size_t)t0 * D;
        const float *r = src + (size_t)t0 * D;
        for (int32_t d = 0; d < D; d++, blk += B)
            for (int32_t j = 0; j < B; j++)
                blk[j] = t0 + j < rows ? r[(size_t)j * D + d] : 0.0;
    }
}

/* A segment's V rows as double, [rows][D]. */
static void load_v_tile(fkv_cache *c, const unsigned char *vrows,
                        int32_t rows, double *vt)
{
    const size_t n = (size_t)rows * c->geo.head_dim; /* a multiple of 16 */
    const float *src = (const float *)vrows;
    if (c->opts.dtype != FKV_DTYPE_F32) {
        fkvi_load_row(c->opts.dtype, vrows, 0, n, backend_of(c)->stage);
        src = backend_of(c)->stage;
    }
    for (size_t i = 0; i < n; i += CPU_TOKEN_BLOCK)
        for (size_t j = 0; j < CPU_TOKEN_BLOCK; j++)
            vt[i + j] = src[i + j];
}

/* logits[t] = scale * q.k_t for a segment's rows, from its K tile. Each
 * dot product adds q[d] k[d] in double in the order d = 0..D-1, as a plain
 * loop would; the vectorised work runs across the block's tokens. */
static void tile_logits(const double *kt, int32_t rows, int32_t D,
                        const float *q, double scale, double *logits)
{
    const int32_t B = CPU_TOKEN_BLOCK;
    for (int32_t t0 = 0; t0 < rows; t0 += B) {
        const double *k = kt + (size_t)t0 * D;
#define CPU_ZERO(j) double a##j = 0.0;
        CPU_FOR_BLOCK(CPU_ZERO)
#undef CPU_ZERO
        for (int32_t d = 0; d < D; d++, k += CPU_TOKEN_BLOCK) {
            const double qd = q[d];
#define CPU_DOT(j) a##j += qd * k[j];
            CPU_FOR_BLOCK(CPU_DOT)
#undef CPU_DOT
        }
#define CPU_LIST(j) a##j,
        const double acc[CPU_TOKEN_BLOCK] = {CPU_FOR_BLOCK(CPU_LIST)};
#undef CPU_LIST
        int32_t n = rows - t0 < B ? rows - t0 : B;
        for (int32_t j = 0; j < n; j++)
            logits[t0 + j] = scale * acc[j];
    }
}

/* acc[d] += w[t] v[t][d] for t < rows in token order, d < D (a multiple of
 * CPU_TOKEN_BLOCK: 64, 128 or 256). A block of acc stays in registers over
 * the segment's tokens; each acc[d] still sums in token order. */
static void add_weighted(double *acc, const double *w, const double *v,
                         int32_t rows, int32_t D)
{
    for (int32_t d0 = 0; d0 < D; d0 += CPU_TOKEN_BLOCK) {
        double *dst = acc + d0;
        const double *vr = v + d0;
#define CPU_LOAD(j) double a##j = dst[j];
        CPU_FOR_BLOCK(CPU_LOAD)
#undef CPU_LOAD
        for (int32_t t = 0; t < rows; t++, vr += D) {
            const double wt = w[t];
#define CPU_AXPY(j) a##j += wt * vr[j];
            CPU_FOR_BLOCK(CPU_AXPY)
#undef CPU_AXPY
        }
#define CPU_STORE(j) dst[j] = a##j;
        CPU_FOR_BLOCK(CPU_STORE)
#undef CPU_STORE
    }
}

/* The rows of segment *sg that lie before `limit` when n rows precede it. */
static int32_t segment_rows(const cpu_segment *sg, int64_t n, int64_t limit)
{
    return limit - n < sg->rows ? (int32_t)(limit - n) : sg->rows;
}

/* For each of the group's query heads j (q + j*D), out at element
 * first + j*D (in the cache dtype) = softmax(scale * q.k) v over the first
 * `limit` rows of the segments (in token order; less than all of them for
 * the causal limit of fkv_attend_tokens). Every K and V page is read and
 * converted once for the whole group; each head's arithmetic is that of the
 * plain per-head loops, in double, in the same order. */
static void attend_group(fkv_cache *c, const cpu_segment *segs,
                         int32_t nsegs, int64_t limit, const float *q,
                         void *out, size_t first)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t D = g->head_dim, G = g->group;
    const size_t row_bytes = (size_t)D * g->elem_bytes;
    const size_t stride = (size_t)g->max_tokens; /* logits per head */
    cpu_backend *cb = backend_of(c);
    int64_t n = 0;
    for (int32_t s = 0; s < nsegs && n < limit; s++) {
        const int32_t rows = segment_rows(&segs[s], n, limit);
        load_k_tile(c, segs[s].unit, rows, cb->ktile);
        for (int32_t j = 0; j < G; j++)
            tile_logits(cb->ktile, rows, D, q + (size_t)j * D,
                        g->scale, cb->logits + j * stride + n);
        n += rows;
    }
    for (int32_t j = 0; j < G; j++) {
        double *logits = cb->logits + j * stride, top = -INFINITY, sum = 0.0;
        for (int64_t i = 0; i < n; i++)
            if (logits[i] > top)
                top = logits[i];
        for (int64_t i = 0; i < n; i++) {
            logits[i] = exp(logits[i] - top);
            sum += logits[i];
        }
        for (int64_t i = 0; i < n; i++)
            logits[i] /= sum; /* now the weights */
    }
    memset(cb->acc, 0, (size_t)G * D * sizeof *cb->acc);
    n = 0;
    for (int32_t s = 0; s < nsegs && n < limit; s++) {
        const unsigned char *vrows = segs[s].unit + g->page * row_bytes;
        const int32_t rows = segment_rows(&segs[s], n, limit);
        load_v_tile(c, vrows, rows, cb->vtile);
        for (int32_t j = 0; j < G; j++)
            add_weighted(cb->acc + (size_t)j * D, cb->logits + j * stride + n,
                         cb->vtile, rows, D);
        n += rows;
    }
    for (int32_t j = 0; j < G; j++) {
        for (int32_t d = 0; d < D; d++)
            cb->row[d] = (float)cb->acc[(size_t)j * D + d];
        fkvi_store_row(c->opts.dtype, cb->row, (size_t)D, out,
                       first + (size_t)j * D);
    }
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
    const bool slots = uses_slots(c, layer);
    int32_t n = 0;
#define PAGE_UNIT(p) (slots ? resident_unit(c, L, (p), h) \
                            : pool_unit(c, slot, layer, (p), h))
    if (fkvi_layer_policy(c, layer) == FKV_POLICY_DENSE) {
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

/* Attention of one sequence's T query tokens (q rows q_row .. + T, the
 * sequence's last T tokens) over (slot, layer). The selection is made or
 * corrected with the last token's query: it is the one fkv_select will be
 * given for the next step, and the step's tokens share one page set. */
static void attend_sequence(fkv_cache *c, int32_t layer, int32_t slot,
                            const void *q, int64_t q_row, int32_t T,
                            void *out)
{
    const fkvi_geometry *g = &c->geo;
    cpu_backend *cb = backend_of(c);
    const fkv_policy policy = fkvi_layer_policy(c, layer);
    const int32_t K = g->select_pages, D = g->head_dim;
    cpu_layer *L = layer_of(c, slot, layer);
    fkvi_pages r;
    fkvi_page_ranges(g, c->seqs[slot].length[layer], &r);
    load_query(c, q, (int32_t)(q_row + T - 1), cb->query);
    for (int32_t h = 0; h < g->kv_heads; h++) {
        int32_t *active = L->active_pages + (size_t)h * K;
        if (policy == FKV_POLICY_RESIDENT) {
            L->active_count[h] = select_head(c, L, &r, cb->query, h, active);
        } else if (policy == FKV_POLICY_SYNC) {
            int32_t m = select_head(c, L, &r, cb->query, h, cb->selected);
            recall_head(c, slot, layer, L, h, cb->selected, m, true);
        } else if (policy == FKV_POLICY_FREEKV) {
            c->counters.heads_checked++;
            size_t qoff = (size_t)h * g->group * D;
            bool full = L->active_count[h] < 0 ||
                (r.cand_count <= K && L->active_count[h] < r.cand_count);
            if (bounded(c, layer)) {
                /* Its fetches are on the critical path: counted as such. */
                const uint64_t before = c->counters.pages_recalled;
                if (bounded_head(c, slot, layer, L, &r, h, full))
                    c->counters.corrections++;
                c->counters.pages_recalled_critical +=
                    c->counters.pages_recalled - before;
            } else {
                /* Select at attend: the top-K with q is the next step's
                 * speculative set, and a corrected head's set now. */
                int32_t *top = L->pending_pages + (size_t)h * K;
                int32_t m = select_head(c, L, &r, cb->query, h, top);
                L->pending_count[h] = m;
                if (full || fkvi_group_cosine(cb->query + qoff,
                                              L->active_q + qoff, g->group,
                                              D) <
                                c->opts.correction_threshold) {
                    c->counters.corrections++;
                    recall_head(c, slot, layer, L, h, top, m, true);
                    memcpy(L->active_q + qoff, cb->query + qoff,
                           (size_t)g->group * D * sizeof(float));
                }
            }
        }
        int32_t nsel = policy == FKV_POLICY_DENSE ? 0 : L->active_count[h];
        /* EXTERNAL before any fkv_set_pages (or after a truncate): sink,
         * window and partial page only. Pages set stay candidates while the
         * sequence grows (the window moves away from them). */
        if (policy == FKV_POLICY_EXTERNAL && nsel < 0)
            nsel = 0;
        /* fkv_recall changes the active set before the next attend;
         * keep what this one used for fkv_get_selected_pages. */
        memcpy(L->used_pages + (size_t)h * K, active,
               (size_t)nsel * sizeof *active);
        L->used_count[h] = nsel;
        int32_t nsegs = gather_segments(c, slot, layer, L, &r, h, active,
                                        nsel);
        int64_t rows = 0;
        for (int32_t s = 0; s < nsegs; s++)
            rows += cb->segments[s].rows;
        for (int32_t t = 0; t < T; t++) {
            /* The query tokens are the last rows (fkv_attend_tokens checks
             * they lie in the window or partial page); token t sees all
             * rows but the T - 1 - t after it. */
            const float *qt = cb->query;
            if (t < T - 1) {
                load_query(c, q, (int32_t)(q_row + t), cb->query_tok);
                qt = cb->query_tok;
            }
            int32_t qh = h * g->group;
            attend_group(c, cb->segments, nsegs, rows - (T - 1 - t),
                         qt + (size_t)qh * D, out,
                         ((size_t)(q_row + t) * g->q_heads + qh) * D);
        }
    }
    if (policy == FKV_POLICY_FREEKV) { /* select at attend: the next step's */
        memcpy(L->pending_q, cb->query,
               (size_t)g->q_heads * D * sizeof(float));
        L->pending_valid = true;
    }
}

static fkv_status cpu_attend(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                             const void *q, void *out)
{
    for (int32_t i = 0; i < b->n; i++)
        attend_sequence(c, layer, b->slot[i], q, i, 1, out);
    return FKV_OK;
}

static fkv_status cpu_attend_tokens(fkv_cache *c, int32_t layer,
                                    const fkvi_batch *b, const void *q,
                                    void *out)
{
    for (int32_t i = 0; i < b->n; i++)
        attend_sequence(c, layer, b->slot[i], q, b->offset[i], b->tokens[i],
                        out);
    return FKV_OK;
}

static fkv_status cpu_select(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                             const void *q)
{
    const fkvi_geometry *g = &c->geo;
    if (!q) /* the attend's query: its selection is the pending one */
        return FKV_OK;
    for (int32_t i = 0; i < b->n; i++) {
        int32_t slot = b->slot[i];
        cpu_layer *L = layer_of(c, slot, layer);
        fkvi_pages r;
        fkvi_page_ranges(g, c->seqs[slot].length[layer], &r);
        const fkvi_sequence *s = &c->seqs[slot];
        if (s->attended[layer] == s->length[layer]) {
            /* Select at attend: the same query (bitwise) at the same length
             * already made this selection. */
            float *query = backend_of(c)->query;
            load_query(c, q, i, query);
            if (memcmp(query, L->pending_q, (size_t)g->q_heads *
                                                g->head_dim * sizeof(float)) == 0)
                continue;
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
                        L->pending_count[h], false);
        memcpy(L->active_q, L->pending_q,
               (size_t)g->q_heads * g->head_dim * sizeof(float));
        L->pending_valid = false;
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

/* ---- external pages ------------------------------------------------------ */

static void cpu_set_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                          const int32_t *pages, const int32_t *counts)
{
    const fkvi_geometry *g = &c->geo;
    const int32_t K = g->select_pages;
    for (int32_t i = 0; i < b->n; i++) {
        cpu_layer *L = layer_of(c, b->slot[i], layer);
        for (int32_t h = 0; h < g->kv_heads; h++) {
            size_t row = (size_t)i * g->kv_heads + h;
            int32_t n = counts[row];
            int32_t *sorted = L->pending_pages + (size_t)h * K;
            /* Ascending, like a selection (insertion sort: K is small). */
            for (int32_t j = 0; j < n; j++) {
                int32_t p = pages[row * (size_t)K + j], e = j;
                for (; e > 0 && sorted[e - 1] > p; e--)
                    sorted[e] = sorted[e - 1];
                sorted[e] = p;
            }
            recall_head(c, b->slot[i], layer, L, h, sorted, n, false);
        }
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
    .append = cpu_append,
    .attend = cpu_attend,
    .select = cpu_select,
    .recall = cpu_recall,
    .selected_pages = cpu_selected_pages,
    .stats = cpu_stats,
    .reset_stats = NULL,
    .audit = cpu_audit,
    .truncate = cpu_truncate,
    .attend_tokens = cpu_attend_tokens,
    .seq_fork = cpu_seq_fork,
    .set_pages = cpu_set_pages,
    .append_strided = cpu_append_strided,
};
