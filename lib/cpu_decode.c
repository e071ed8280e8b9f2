/* The CPU backend's per-layer calls: append (with the page summaries),
 * selection and recall, attention (arithmetic in double, docs/design.md
 * "The CPU backend's attention loops"), select, recall and fkv_set_pages.
 * State and helpers: cpu_backend.h. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_backend.h"

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

fkv_status fkvi_cpu_append_strided(fkv_cache *c, int32_t layer,
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

fkv_status fkvi_cpu_append(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                           const void *k, const void *v)
{
    const int64_t D = c->geo.head_dim, row = c->geo.kv_heads * D;
    return fkvi_cpu_append_strided(c, layer, b, k, row, D, v, row, D);
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

fkv_status fkvi_cpu_attend(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                           const void *q, void *out)
{
    for (int32_t i = 0; i < b->n; i++)
        attend_sequence(c, layer, b->slot[i], q, i, 1, out);
    return FKV_OK;
}

fkv_status fkvi_cpu_attend_tokens(fkv_cache *c, int32_t layer,
                                  const fkvi_batch *b, const void *q,
                                  void *out)
{
    for (int32_t i = 0; i < b->n; i++)
        attend_sequence(c, layer, b->slot[i], q, b->offset[i], b->tokens[i],
                        out);
    return FKV_OK;
}

fkv_status fkvi_cpu_select(fkv_cache *c, int32_t layer, const fkvi_batch *b,
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

fkv_status fkvi_cpu_recall(fkv_cache *c, int32_t layer, const fkvi_batch *b)
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

fkv_status fkvi_cpu_selected_pages(fkv_cache *c, int32_t layer, int32_t slot,
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

/* ---- external pages ------------------------------------------------------ */

void fkvi_cpu_set_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b,
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
