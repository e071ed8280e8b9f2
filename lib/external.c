/* fkv_set_pages: FKV_POLICY_EXTERNAL's pages, chosen by the engine. The
 * whole batch is validated before anything changes. */
#include "internal.h"

fkv_status fkv_set_pages(fkv_cache *c, int32_t layer, const fkv_batch *batch,
                         const int32_t *pages, const int32_t *counts,
                         uint32_t flags)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_set_pages: cache is NULL");
    fkvi_batch b;
    fkv_status st =
        fkvi_resolve_batch(c, "fkv_set_pages", layer, batch, false, &b);
    if (st != FKV_OK)
        return st;
    if (c->opts.policy != FKV_POLICY_EXTERNAL)
        return fkvi_fail(c, FKV_ERR_INVALID_STATE,
                         "fkv_set_pages: the cache's policy is %d, not "
                         "FKV_POLICY_EXTERNAL", (int)c->opts.policy);
    if (flags != 0)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_set_pages: flags must be 0");
    if (!counts)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_set_pages: counts is NULL");
    /* A dense layer attends every page: the engine's choice is moot. */
    if (fkvi_layer_dense(c, layer))
        return FKV_OK;
    if (!c->ops->set_pages)
        return fkvi_fail(c, FKV_ERR_UNSUPPORTED,
                         "fkv_set_pages: not implemented on the %s backend "
                         "yet", c->ops->name);
    const fkvi_geometry *g = &c->geo;
    const int32_t K = g->select_pages;
    for (int32_t i = 0; i < b.n; i++) {
        fkvi_pages r;
        fkvi_page_ranges(g, c->seqs[b.slot[i]].length[layer], &r);
        for (int32_t h = 0; h < g->kv_heads; h++) {
            size_t row = (size_t)i * g->kv_heads + h;
            int32_t n = counts[row];
            if (n < 0 || n > K)
                return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                                 "fkv_set_pages: counts[%d][%d] is %d; it "
                                 "must be in [0, K = %d]", i, h, n, K);
            if (n > 0 && !pages)
                return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                                 "fkv_set_pages: pages is NULL");
            const int32_t *list = n > 0 ? pages + row * (size_t)K : NULL;
            for (int32_t j = 0; j < n; j++) {
                int32_t p = list[j];
                if (p < r.cand_first || p >= r.cand_first + r.cand_count)
                    return fkvi_fail(
                        c, FKV_ERR_OUT_OF_RANGE,
                        "fkv_set_pages: pages[%d][%d][%d] = %d is not a "
                        "candidate page of sequence %lld at layer %d "
                        "(candidates [%d, %d): sealed, past the sink, "
                        "before the window)", i, h, j, p,
                        (long long)batch->seq_ids[i], layer, r.cand_first,
                        r.cand_first + r.cand_count);
                /* K is small (budget / page): a quadratic check needs no
                 * scratch memory on the decode path. */
                for (int32_t e = 0; e < j; e++)
                    if (list[e] == p)
                        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                                         "fkv_set_pages: page %d appears "
                                         "twice in pages[%d][%d]", p, i, h);
            }
        }
    }
    c->ops->set_pages(c, layer, &b, pages, counts);
    return FKV_OK;
}
