/* fkv_seq_truncate: drop a sequence's last tokens (rejected draft tokens)
 * on every layer. Host page-table work; the backend forgets what refers to
 * the dropped tokens. */
#include "internal.h"

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
    /* Nothing below can fail: the cache is never left half truncated. */
    int32_t keep = (int32_t)((length + c->geo.page - 1) / c->geo.page);
    for (int32_t l = 0; l < c->geo.layers; l++) {
        if (s->length[l] == length && s->mapped[l] <= keep)
            continue;
        c->ops->truncate(c, slot, l, length);
        if (!c->pool_unused && s->mapped[l] > keep)
            fkvi_unmap_pages(c, slot, l, keep);
        s->length[l] = length;
    }
    return FKV_OK;
}
