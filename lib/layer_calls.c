/* The per-layer calls: validation common to every backend, then dispatch.
 * Everything is checked before the backend runs, so that a failed call
 * leaves the cache as it was. */
#include <stddef.h>

#include "internal.h"

#define NEED_CACHE(c, fn)                                                    \
    do {                                                                     \
        if (!(c))                                                            \
            return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,                 \
                             fn ": cache is NULL");                          \
        fkvi_clear_error(c);                                                 \
    } while (0)

#define NEED_PTR(c, fn, p)                                                   \
    do {                                                                     \
        if (!(p))                                                            \
            return fkvi_fail((c), FKV_ERR_INVALID_ARGUMENT,                  \
                             fn ": " #p " is NULL");                         \
    } while (0)

/* The append itself: pages reserved, the backend writes, lengths grow;
 * all or nothing. tensors NULL: contiguous k and v. */
static fkv_status append_rows(fkv_cache *c, const char *fn, int32_t layer,
                              const fkvi_batch *b_in, const void *k,
                              const void *v, const fkv_tensor *kt,
                              const fkv_tensor *vt)
{
    fkvi_batch b = *b_in;
    fkv_status st = fkvi_reserve_pages(c, fn, layer, &b);
    if (st != FKV_OK)
        return st;
    if (kt)
        st = c->ops->append_strided(c, layer, &b, kt->data, kt->token_stride,
                                    kt->head_stride, vt->data,
                                    vt->token_stride, vt->head_stride);
    else
        st = c->ops->append(c, layer, &b, k, v);
    if (st != FKV_OK) {
        fkvi_release_pages(c, layer, &b);
        return st;
    }
    for (int32_t i = 0; i < b.n; i++)
        c->seqs[b.slot[i]].length[layer] += b.tokens[i];
    return FKV_OK;
}

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
    return append_rows(c, "fkv_append", layer, &b, k, v, NULL, NULL);
}

/* 0.2's fkv_tensor: the first published size. */
#define FKV_TENSOR_SIZE_0_2 (offsetof(fkv_tensor, head_stride) + \
                             sizeof(int64_t))

static fkv_status check_tensor(fkv_cache *c, const char *name,
                               const fkv_tensor *t)
{
    if (!t)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_append_strided: %s is NULL", name);
    if (t->struct_size < FKV_TENSOR_SIZE_0_2)
        return fkvi_fail(c, FKV_ERR_VERSION_MISMATCH,
                         "fkv_append_strided: %s->struct_size is %zu, "
                         "smaller than the first fkv_tensor (%zu bytes)",
                         name, t->struct_size, (size_t)FKV_TENSOR_SIZE_0_2);
    if (!t->data)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_append_strided: %s->data is NULL", name);
    if (t->token_stride < 0 || t->head_stride < 0)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_append_strided: %s's strides (%lld, %lld) "
                         "must not be negative", name,
                         (long long)t->token_stride,
                         (long long)t->head_stride);
    return FKV_OK;
}

fkv_status fkv_append_strided(fkv_cache *c, int32_t layer,
                              const fkv_batch *batch, const fkv_tensor *k,
                              const fkv_tensor *v)
{
    NEED_CACHE(c, "fkv_append_strided");
    fkvi_batch b;
    fkv_status st = fkvi_resolve_batch(c, "fkv_append_strided", layer, batch,
                                       true, &b);
    if (st != FKV_OK)
        return st;
    if ((st = check_tensor(c, "k", k)) != FKV_OK ||
        (st = check_tensor(c, "v", v)) != FKV_OK)
        return st;
    const int64_t D = c->geo.head_dim, row = c->geo.kv_heads * D;
    bool packed = k->token_stride == row && k->head_stride == D &&
                  v->token_stride == row && v->head_stride == D;
    if (packed) /* every backend takes the contiguous layout */
        return append_rows(c, "fkv_append_strided", layer, &b, k->data,
                           v->data, NULL, NULL);
    if (!c->ops->append_strided)
        return fkvi_fail(c, FKV_ERR_UNSUPPORTED,
                         "fkv_append_strided: strided tensors are not "
                         "implemented on the %s backend yet (contiguous "
                         "strides are)", c->ops->name);
    return append_rows(c, "fkv_append_strided", layer, &b, NULL, NULL, k, v);
}

/* FREEKV selects at attend: the batch's selections are the pending ones,
 * which fkv_select with q NULL keeps (marks: fkvi_sequence.attended). */
static void mark_attended(fkv_cache *c, int32_t layer, const fkvi_batch *b)
{
    if (fkvi_layer_policy(c, layer) != FKV_POLICY_FREEKV)
        return;
    for (int32_t i = 0; i < b->n; i++) {
        fkvi_sequence *s = &c->seqs[b->slot[i]];
        s->attended[layer] = s->length[layer];
    }
}

static void clear_attended(fkv_cache *c, int32_t layer, const fkvi_batch *b)
{
    for (int32_t i = 0; i < b->n; i++)
        c->seqs[b->slot[i]].attended[layer] = -1;
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
    if (st == FKV_OK)
        mark_attended(c, layer, &b);
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
    st = need_tokens(c, "fkv_select", layer, batch, &b);
    if (st != FKV_OK)
        return st;
    /* A dense layer selects nothing, whatever the policy. */
    if (fkvi_layer_policy(c, layer) != FKV_POLICY_FREEKV)
        return FKV_OK;
    /* q NULL: the query of the attend just made, whose selection is the
     * pending one unless something came between. */
    for (int32_t i = 0; !q && i < b.n; i++) {
        const fkvi_sequence *s = &c->seqs[b.slot[i]];
        if (s->attended[layer] != s->length[layer])
            return fkvi_fail(c, FKV_ERR_INVALID_STATE,
                             "fkv_select: q is NULL but sequence %lld has "
                             "no fkv_attend on layer %d since its last "
                             "fkv_append, fkv_recall, fkv_select with a "
                             "query or truncate (q NULL keeps the selection "
                             "an fkv_attend just made)",
                             (long long)batch->seq_ids[i], layer);
    }
    st = c->ops->select(c, layer, &b, q);
    if (st == FKV_OK && q)
        clear_attended(c, layer, &b);
    return st;
}

fkv_status fkv_recall(fkv_cache *c, int32_t layer, const fkv_batch *batch)
{
    NEED_CACHE(c, "fkv_recall");
    fkvi_batch b;
    fkv_status st =
        fkvi_resolve_batch(c, "fkv_recall", layer, batch, false, &b);
    if (st != FKV_OK)
        return st;
    if (fkvi_layer_policy(c, layer) != FKV_POLICY_FREEKV)
        return FKV_OK;
    st = c->ops->recall(c, layer, &b);
    if (st == FKV_OK) /* the pending selection is active now */
        clear_attended(c, layer, &b);
    return st;
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
        if (T > 1 && fkvi_layer_policy(c, layer) != FKV_POLICY_DENSE &&
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
    if (st == FKV_OK)
        mark_attended(c, layer, &b);
    return st;
}
