/* fkv_seq_truncate: drop a sequence's last tokens (rejected draft tokens)
 * on every layer. Host page-table work; the backend forgets what refers to
 * the dropped tokens. */
#include <string.h>

#include "internal.h"

/* The block of the page that becomes partial on layer l, when another
 * sequence (fkv_seq_fork) shares it: appends will write it, so this
 * sequence needs its own copy. NO_BLOCK when no copy is needed. */
static uint32_t shared_partial(const fkv_cache *c, const fkvi_sequence *s,
                               int32_t l, int64_t length)
{
    if (fkvi_pool_unused(c, l) || length % c->geo.page == 0 ||
        s->length[l] <= length)
        return FKV_POOL_NO_BLOCK;
    uint32_t id = s->blocks[(size_t)l * c->geo.max_pages +
                            length / c->geo.page];
    return fkvi_block_shared(c, id) ? id : FKV_POOL_NO_BLOCK;
}

fkv_status fkv_seq_truncate(fkv_cache *c, fkv_seq_id id, int64_t length)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_truncate: cache is NULL");
    int32_t slot;
    fkv_status st = fkvi_resolve_sequence(c, "fkv_seq_truncate", id, &slot);
    if (st != FKV_OK)
        return st;
    if (!c->ops->truncate)
        return fkvi_fail(c, FKV_ERR_UNSUPPORTED,
                         "fkv_seq_truncate: not implemented on the %s "
                         "backend yet", c->ops->name);
    fkvi_sequence *s = &c->seqs[slot];
    int64_t held = s->length[0];
    for (int32_t l = 1; l < c->geo.layers; l++)
        if (s->length[l] < held)
            held = s->length[l];
    if (length < 0 || length > held)
        return fkvi_fail(c, length < 0 ? FKV_ERR_INVALID_ARGUMENT
                                       : FKV_ERR_OUT_OF_RANGE,
                         "fkv_seq_truncate: length %lld is outside [0, %lld] "
                         "(the sequence's length)", (long long)length,
                         (long long)held);
    bool same = true;
    for (int32_t l = 0; l < c->geo.layers; l++)
        same &= s->length[l] == length;
    if (same) /* a no-op: reserved pages stay reserved */
        return FKV_OK;
    uint32_t copies = 0;
    for (int32_t l = 0; l < c->geo.layers; l++)
        copies += shared_partial(c, s, l, length) != FKV_POOL_NO_BLOCK;
    if (copies) {
        st = fkv_pool_reserve(&c->pool, copies);
        if (st != FKV_OK)
            return fkvi_fail(c, st, "fkv_seq_truncate: no room in the host "
                             "pool to copy %u pages shared with a fork",
                             copies);
    }
    /* Nothing below can fail: the cache is never left half truncated. */
    int32_t keep = (int32_t)((length + c->geo.page - 1) / c->geo.page);
    for (int32_t l = 0; l < c->geo.layers; l++) {
        if (s->length[l] == length && s->mapped[l] <= keep)
            continue;
        uint32_t shared = shared_partial(c, s, l, length);
        if (shared != FKV_POOL_NO_BLOCK) { /* copy on write */
            uint32_t *entry = &s->blocks[(size_t)l * c->geo.max_pages +
                                         length / c->geo.page];
            *entry = fkv_pool_take(&c->pool);
            memcpy(fkv_pool_block(&c->pool, *entry),
                   fkv_pool_block(&c->pool, shared), c->geo.block_bytes);
            fkvi_block_release(c, shared);
        }
        c->ops->truncate(c, slot, l, length);
        if (!fkvi_pool_unused(c, l) && s->mapped[l] > keep)
            fkvi_unmap_pages(c, slot, l, keep);
        s->length[l] = length;
        s->attended[l] = -1; /* the backend dropped the selections */
    }
    return FKV_OK;
}
