/* The per-layer calls: validation common to every backend, then dispatch.
 * Everything is checked before the backend runs, so that a failed call
 * leaves the cache as it was. */
#include "internal.h"

#define NEED_CACHE(c, fn)                                                    \
    do {                                                                     \
        if (!(c))                                                            \
            return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,                 \
                             fn ": cache is NULL");                          \
    } while (0)

#define NEED_PTR(c, fn, p)                                                   \
    do {                                                                     \
        if (!(p))                                                            \
            return fkvi_fail((c), FKV_ERR_INVALID_ARGUMENT,                  \
                             fn ": " #p " is NULL");                         \
    } while (0)

fkv_status fkv_append(fkv_cache *c, int32_t layer, const fkv_batch *batch,
                      const void *k, const void *v)
{
    NEED_CACHE(c, "fkv_append");
    fkvi_batch b;
    fkv_status st = fkvi_resolve_batch(c, "fkv_append", layer, batch, true, &b);
    if (st != FKV_OK)
        return st;
    NEED_PTR(c, "fkv_append", k);
    NEED_PTR(c, "fkv_append", v);
    st = fkvi_reserve_pages(c, "fkv_append", layer, &b);
    if (st != FKV_OK)
        return st;
    st = c->ops->append(c, layer, &b, k, v);
    if (st != FKV_OK) {
        fkvi_release_pages(c, layer, &b);
        return st;
    }
    for (int32_t i = 0; i < b.n; i++)
        c->seqs[b.slot[i]].length[layer] += b.tokens[i];
    return FKV_OK;
}

/* Every sequence must hold tokens at this layer before it can attend. */
static fkv_status need_tokens(fkv_cache *c, const char *fn, int32_t layer,
                              const fkv_batch *batch, const fkvi_batch *b)
{
    for (int32_t i = 0; i < b->n; i++)
        if (c->seqs[b->slot[i]].length[layer] < 1)
            return fkvi_fail(c, FKV_ERR_INVALID_STATE,
                             "%s: sequence %lld has no tokens at layer %d "
                             "(fkv_append comes first)", fn,
                             (long long)batch->seq_ids[i], layer);
    return FKV_OK;
}

fkv_status fkv_attend(fkv_cache *c, int32_t layer, const fkv_batch *batch,
                      const void *q, void *out)
{
    NEED_CACHE(c, "fkv_attend");
    fkvi_batch b;
    fkv_status st =
        fkvi_resolve_batch(c, "fkv_attend", layer, batch, false, &b);
    if (st != FKV_OK)
        return st;
    NEED_PTR(c, "fkv_attend", q);
    NEED_PTR(c, "fkv_attend", out);
    st = need_tokens(c, "fkv_attend", layer, batch, &b);
    if (st != FKV_OK)
        return st;
    st = c->ops->attend(c, layer, &b, q, out);
    if (st == FKV_OK && layer == 0)
        c->counters.steps++;
    return st;
}

fkv_status fkv_select(fkv_cache *c, int32_t layer, const fkv_batch *batch,
                      const void *q)
{
    NEED_CACHE(c, "fkv_select");
    fkvi_batch b;
    fkv_status st =
        fkvi_resolve_batch(c, "fkv_select", layer, batch, false, &b);
    if (st != FKV_OK)
        return st;
    NEED_PTR(c, "fkv_select", q);
    st = need_tokens(c, "fkv_select", layer, batch, &b);
    if (st != FKV_OK)
        return st;
    if (c->opts.policy != FKV_POLICY_FREEKV)
        return FKV_OK;
    return c->ops->select(c, layer, &b, q);
}

fkv_status fkv_recall(fkv_cache *c, int32_t layer, const fkv_batch *batch)
{
    NEED_CACHE(c, "fkv_recall");
    fkvi_batch b;
    fkv_status st =
        fkvi_resolve_batch(c, "fkv_recall", layer, batch, false, &b);
    if (st != FKV_OK)
        return st;
    if (c->opts.policy != FKV_POLICY_FREEKV)
        return FKV_OK;
    return c->ops->recall(c, layer, &b);
}

fkv_status fkv_get_selected_pages(fkv_cache *c, int32_t layer, fkv_seq_id seq,
                                  int32_t kv_head, int32_t *pages,
                                  int32_t capacity, int32_t *count)
{
    NEED_CACHE(c, "fkv_get_selected_pages");
    NEED_PTR(c, "fkv_get_selected_pages", count);
    if (capacity < 0 || (capacity > 0 && !pages))
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_get_selected_pages: pages is NULL or capacity "
                         "(%d) is negative", capacity);
    if (layer < 0 || layer >= c->geo.layers)
        return fkvi_fail(c, FKV_ERR_OUT_OF_RANGE,
                         "fkv_get_selected_pages: layer %d is out of range "
                         "[0, %d)", layer, c->geo.layers);
    if (kv_head < 0 || kv_head >= c->geo.kv_heads)
        return fkvi_fail(c, FKV_ERR_OUT_OF_RANGE,
                         "fkv_get_selected_pages: kv_head %d is out of range "
                         "[0, %d)", kv_head, c->geo.kv_heads);
    int32_t slot;
    fkv_status st =
        fkvi_resolve_sequence(c, "fkv_get_selected_pages", seq, &slot);
    if (st != FKV_OK)
        return st;
    return c->ops->selected_pages(c, layer, slot, kv_head, pages, capacity,
                                  count);
}

/* fkv_attend_tokens: batch->num_tokens are query tokens, the sequences'
 * last ones; their rows in q/out are packed like an append's k/v rows. */
fkv_status fkv_attend_tokens(fkv_cache *c, int32_t layer,
                             const fkv_batch *batch, const void *q, void *out)
{
    NEED_CACHE(c, "fkv_attend_tokens");
    fkvi_batch b;
    /* Without with_tokens: query tokens add nothing to the capacity. */
    fkv_status st =
        fkvi_resolve_batch(c, "fkv_attend_tokens", layer, batch, false, &b);
    if (st != FKV_OK)
        return st;
    NEED_PTR(c, "fkv_attend_tokens", q);
    NEED_PTR(c, "fkv_attend_tokens", out);
    st = need_tokens(c, "fkv_attend_tokens", layer, batch, &b);
    if (st != FKV_OK)
        return st;
    const fkvi_geometry *g = &c->geo;
    int64_t offset = 0;
    for (int32_t i = 0; i < b.n; i++) {
        int32_t T = batch->num_tokens ? batch->num_tokens[i] : 1;
        int64_t n = c->seqs[b.slot[i]].length[layer];
        if (T < 1 || T > FKV_MAX_QUERY_TOKENS)
            return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                             "fkv_attend_tokens: batch->num_tokens[%d] is "
                             "%d; it must be in [1, FKV_MAX_QUERY_TOKENS = "
                             "%d]", i, T, FKV_MAX_QUERY_TOKENS);
        if (T > n)
            return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                             "fkv_attend_tokens: batch->num_tokens[%d] is "
                             "%d but sequence %lld holds %lld tokens at "
                             "layer %d", i, T, (long long)batch->seq_ids[i],
                             (long long)n, layer);
        /* Each query token must be attended by the later ones whatever
         * the selection: it must lie in the window or the partial page. */
        fkvi_pages r;
        fkvi_page_ranges(g, n, &r);
        int32_t first_page = (int32_t)((n - T) / g->page);
        if (T > 1 && c->opts.policy != FKV_POLICY_DENSE &&
            r.cand_count > 0 && first_page < r.window_first)
            return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                             "fkv_attend_tokens: the %d query tokens of "
                             "sequence %lld reach back before its window "
                             "(window_tokens %d, page_tokens %d)", T,
                             (long long)batch->seq_ids[i],
                             c->opts.window_tokens, g->page);
        c->batch_tokens[i] = T;
        c->batch_offset[i] = offset;
        offset += T;
    }
    b.total_tokens = offset;
    if (!c->ops->attend_tokens)
        return fkvi_fail(c, FKV_ERR_UNSUPPORTED,
                         "fkv_attend_tokens: not implemented on the %s "
                         "backend yet", c->ops->name);
    st = c->ops->attend_tokens(c, layer, &b, q, out);
    if (st == FKV_OK && layer == 0)
        c->counters.steps++;
    return st;
}
