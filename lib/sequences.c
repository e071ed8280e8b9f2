/* Sequences and their pages: ids, open and close, page tables, and the
 * validation of a batch. */
#include <string.h>

#include "internal.h"

static int32_t slot_of(const fkv_cache *c, fkv_seq_id id)
{
    if (id < 0)
        return -1;
    int64_t n = c->opts.max_sequences;
    int32_t slot = (int32_t)(id % n);
    const fkvi_sequence *s = &c->seqs[slot];
    if (!s->open || s->generation != id / n)
        return -1;
    return slot;
}

static size_t page_table_entries(const fkv_cache *c)
{
    return (size_t)c->geo.layers * (size_t)c->geo.max_pages;
}

fkv_status fkv_seq_open(fkv_cache *c, fkv_seq_id *id)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_open: cache is NULL");
    fkvi_clear_error(c);
    if (!id)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_open: seq is NULL");
    int32_t slot = -1;
    for (int32_t i = 0; i < c->opts.max_sequences && slot < 0; i++)
        if (!c->seqs[i].open)
            slot = i;
    if (slot < 0)
        return fkvi_fail(c, FKV_ERR_CAPACITY,
                         "fkv_seq_open: %d sequences are open already "
                         "(max_sequences)", c->opts.max_sequences);
    fkvi_sequence *s = &c->seqs[slot];
    int64_t *length = fkvi_alloc(&c->mem, (size_t)c->geo.layers,
                                 sizeof *length);
    int64_t *attended = fkvi_alloc(&c->mem, (size_t)c->geo.layers,
                                   sizeof *attended);
    int32_t *mapped = fkvi_alloc(&c->mem, (size_t)c->geo.layers,
                                 sizeof *mapped);
    uint32_t *blocks =
        fkvi_alloc(&c->mem, page_table_entries(c), sizeof *blocks);
    if (!length || !attended || !mapped || !blocks) {
        fkvi_free(&c->mem, length);
        fkvi_free(&c->mem, attended);
        fkvi_free(&c->mem, mapped);
        fkvi_free(&c->mem, blocks);
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY,
                         "fkv_seq_open: no memory for the page table");
    }
    for (size_t i = 0; i < page_table_entries(c); i++)
        blocks[i] = FKV_POOL_NO_BLOCK;
    for (int32_t l = 0; l < c->geo.layers; l++)
        attended[l] = -1;
    s->length = length;
    s->attended = attended;
    s->mapped = mapped;
    s->blocks = blocks;
    fkv_status st = c->ops->seq_open(c, slot);
    if (st != FKV_OK) {
        fkvi_free(&c->mem, length);
        fkvi_free(&c->mem, attended);
        fkvi_free(&c->mem, mapped);
        fkvi_free(&c->mem, blocks);
        s->length = NULL;
        s->attended = NULL;
        s->mapped = NULL;
        s->blocks = NULL;
        return st;
    }
    s->open = true;
    s->generation++; /* ids are never reused */
    c->open_seqs++;
    c->host_bytes_other += c->geo.layers * (sizeof *length + sizeof *attended +
                                            sizeof *mapped) +
                           page_table_entries(c) * sizeof *blocks;
    *id = s->generation * (int64_t)c->opts.max_sequences + slot;
    return FKV_OK;
}

fkv_status fkv_seq_close(fkv_cache *c, fkv_seq_id id)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_close: cache is NULL");
    fkvi_clear_error(c);
    int32_t slot = slot_of(c, id);
    if (slot < 0)
        return fkvi_fail(c, FKV_ERR_UNKNOWN_SEQUENCE,
                         "fkv_seq_close: sequence %lld is not open",
                         (long long)id);
    fkvi_sequence *s = &c->seqs[slot];
    c->ops->seq_close(c, slot);
    for (size_t i = 0; i < page_table_entries(c); i++)
        if (s->blocks[i] != FKV_POOL_NO_BLOCK)
            fkvi_block_release(c, s->blocks[i]);
    c->host_bytes_other -= c->geo.layers * (sizeof *s->length +
                                            sizeof *s->attended +
                                            sizeof *s->mapped) +
                           page_table_entries(c) * sizeof *s->blocks;
    fkvi_free(&c->mem, s->length);
    fkvi_free(&c->mem, s->attended);
    fkvi_free(&c->mem, s->mapped);
    fkvi_free(&c->mem, s->blocks);
    s->length = NULL;
    s->attended = NULL;
    s->mapped = NULL;
    s->blocks = NULL;
    s->open = false;
    c->open_seqs--;
    return FKV_OK;
}

fkv_status fkv_seq_length(fkv_cache *c, fkv_seq_id id, int64_t *length)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_length: cache is NULL");
    fkvi_clear_error(c);
    if (!length)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_length: length is NULL");
    int32_t slot = slot_of(c, id);
    if (slot < 0)
        return fkvi_fail(c, FKV_ERR_UNKNOWN_SEQUENCE,
                         "fkv_seq_length: sequence %lld is not open",
                         (long long)id);
    const fkvi_sequence *s = &c->seqs[slot];
    int64_t n = s->length[0];
    for (int32_t l = 1; l < c->geo.layers; l++)
        if (s->length[l] < n)
            n = s->length[l];
    *length = n;
    return FKV_OK;
}

fkv_status fkvi_resolve_sequence(fkv_cache *c, const char *fn, fkv_seq_id id,
                                 int32_t *slot)
{
    *slot = slot_of(c, id);
    if (*slot < 0)
        return fkvi_fail(c, FKV_ERR_UNKNOWN_SEQUENCE,
                         "%s: sequence %lld is not open", fn, (long long)id);
    return FKV_OK;
}

fkv_status fkvi_resolve_batch(fkv_cache *c, const char *fn, int32_t layer,
                              const fkv_batch *batch, bool with_tokens,
                              fkvi_batch *out)
{
    if (!batch)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT, "%s: batch is NULL",
                         fn);
    if (layer < 0 || layer >= c->geo.layers)
        return fkvi_fail(c, FKV_ERR_OUT_OF_RANGE,
                         "%s: layer %d is out of range [0, %d)", fn, layer,
                         c->geo.layers);
    if (batch->num_seqs < 1 || batch->num_seqs > c->opts.max_sequences)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "%s: batch->num_seqs is %d; it must be in [1, %d]",
                         fn, batch->num_seqs, c->opts.max_sequences);
    if (!batch->seq_ids)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "%s: batch->seq_ids is NULL", fn);
    if (batch->reserved != 0)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "%s: batch->reserved must be 0", fn);

    fkv_status st = FKV_OK;
    int64_t offset = 0;
    int32_t marked = 0; /* entries whose slot is marked in batch_seen */
    for (int32_t i = 0; i < batch->num_seqs; i++) {
        fkv_seq_id id = batch->seq_ids[i];
        int32_t slot = slot_of(c, id);
        if (slot < 0) {
            st = fkvi_fail(c, FKV_ERR_UNKNOWN_SEQUENCE,
                           "%s: batch->seq_ids[%d] = %lld is not an open "
                           "sequence", fn, i, (long long)id);
            break;
        }
        if (c->batch_seen[slot]) {
            st = fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                           "%s: sequence %lld appears twice in the batch", fn,
                           (long long)id);
            break;
        }
        c->batch_seen[slot] = 1;
        c->batch_slot[marked++] = slot;
        int32_t tokens = 1;
        if (with_tokens && batch->num_tokens)
            tokens = batch->num_tokens[i];
        if (tokens < 1) {
            st = fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                           "%s: batch->num_tokens[%d] is %d; it must be >= 1",
                           fn, i, tokens);
            break;
        }
        int64_t held = c->seqs[slot].length[layer];
        if (with_tokens && held + tokens > c->geo.max_tokens) {
            st = fkvi_fail(c, FKV_ERR_CAPACITY,
                           "%s: sequence %lld holds %lld tokens at layer %d; "
                           "%d more exceed max_tokens_per_sequence (%lld)",
                           fn, (long long)id, (long long)held, layer, tokens,
                           (long long)c->geo.max_tokens);
            break;
        }
        c->batch_tokens[i] = tokens;
        c->batch_offset[i] = offset;
        offset += tokens;
    }
    for (int32_t j = 0; j < marked; j++)
        c->batch_seen[c->batch_slot[j]] = 0;
    if (st != FKV_OK)
        return st;
    out->n = batch->num_seqs;
    out->slot = c->batch_slot;
    out->tokens = c->batch_tokens;
    out->offset = c->batch_offset;
    out->total_tokens = offset;
    return FKV_OK;
}

/* Gives (slot, layer) pool blocks for pages [mapped, pages). The caller
 * has reserved them in the pool. */
static fkv_status map_pages(fkv_cache *c, int32_t slot, int32_t layer,
                            int32_t pages)
{
    fkvi_sequence *s = &c->seqs[slot];
    int32_t first = s->mapped[layer];
    if (pages <= first)
        return FKV_OK;
    uint32_t *table = s->blocks + (size_t)layer * c->geo.max_pages;
    for (int32_t p = first; p < pages; p++)
        table[p] = fkv_pool_take(&c->pool);
    s->mapped[layer] = pages;
    return c->ops->pages_changed
               ? c->ops->pages_changed(c, slot, layer, first, pages)
               : FKV_OK;
}

void fkvi_unmap_pages(fkv_cache *c, int32_t slot, int32_t layer,
                        int32_t keep)
{
    fkvi_sequence *s = &c->seqs[slot];
    uint32_t *table = s->blocks + (size_t)layer * c->geo.max_pages;
    for (int32_t p = keep; p < s->mapped[layer]; p++) {
        fkvi_block_release(c, table[p]);
        table[p] = FKV_POOL_NO_BLOCK;
    }
    if (keep < s->mapped[layer]) {
        int32_t last = s->mapped[layer];
        s->mapped[layer] = keep;
        /* Clears the device's entries; should that fail, the stale ones lie
         * past every length and no kernel reads them before a remap. */
        if (c->ops->pages_changed)
            (void)c->ops->pages_changed(c, slot, layer, keep, last);
    }
}

static fkv_status pool_failure(fkv_cache *c, const char *fn, fkv_status st,
                               uint64_t pages)
{
    if (st == FKV_ERR_CAPACITY)
        return fkvi_fail(c, st,
                         "%s: the host pool limit (host_pool_bytes %llu) "
                         "cannot hold %llu more pages", fn,
                         (unsigned long long)c->opts.host_pool_bytes,
                         (unsigned long long)pages);
    return fkvi_fail(c, st,
                     "%s: no host memory for %llu more pages (the pool holds "
                     "%llu bytes)", fn, (unsigned long long)pages,
                     (unsigned long long)c->pool.bytes_held);
}

static int32_t pages_for(const fkv_cache *c, int64_t tokens)
{
    return (int32_t)((tokens + c->geo.page - 1) / c->geo.page);
}

fkv_status fkvi_reserve_pages(fkv_cache *c, const char *fn, int32_t layer,
                              const fkvi_batch *b)
{
    if (fkvi_pool_unused(c, layer))
        return FKV_OK;
    uint64_t needed = 0;
    for (int32_t i = 0; i < b->n; i++) {
        const fkvi_sequence *s = &c->seqs[b->slot[i]];
        int32_t want = pages_for(c, s->length[layer] + b->tokens[i]);
        c->batch_mapped[i] = s->mapped[layer];
        if (want > s->mapped[layer])
            needed += (uint64_t)(want - s->mapped[layer]);
    }
    c->batch_chunks = c->pool.n_chunks;
    if (needed == 0)
        return FKV_OK;
    fkv_status st = fkv_pool_reserve(&c->pool, (uint32_t)needed);
    if (st != FKV_OK)
        return pool_failure(c, fn, st, needed);
    for (int32_t i = 0; i < b->n; i++) {
        const fkvi_sequence *s = &c->seqs[b->slot[i]];
        st = map_pages(c, b->slot[i], layer,
                       pages_for(c, s->length[layer] + b->tokens[i]));
        if (st != FKV_OK) {
            fkvi_release_pages(c, layer, b);
            return st;
        }
    }
    return FKV_OK;
}

void fkvi_release_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b)
{
    if (fkvi_pool_unused(c, layer))
        return;
    for (int32_t i = 0; i < b->n; i++)
        fkvi_unmap_pages(c, b->slot[i], layer, c->batch_mapped[i]);
    /* The chunks the append added go too: "as it was" covers host_bytes. */
    fkv_pool_trim(&c->pool, c->batch_chunks);
}

fkv_status fkv_seq_reserve(fkv_cache *c, fkv_seq_id id, int64_t tokens)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_reserve: cache is NULL");
    fkvi_clear_error(c);
    int32_t slot;
    fkv_status st = fkvi_resolve_sequence(c, "fkv_seq_reserve", id, &slot);
    if (st != FKV_OK)
        return st;
    if (tokens < 0 || tokens > c->geo.max_tokens)
        return fkvi_fail(c, tokens < 0 ? FKV_ERR_INVALID_ARGUMENT
                                       : FKV_ERR_CAPACITY,
                         "fkv_seq_reserve: %lld tokens; the range is [0, "
                         "max_tokens_per_sequence = %lld]", (long long)tokens,
                         (long long)c->geo.max_tokens);
    if (c->pool_unused)
        return FKV_OK;
    fkvi_sequence *s = &c->seqs[slot];
    int32_t want = pages_for(c, tokens);
    uint64_t needed = 0;
    for (int32_t l = 0; l < c->geo.layers; l++)
        if (!fkvi_pool_unused(c, l) && want > s->mapped[l])
            needed += (uint64_t)(want - s->mapped[l]);
    if (needed == 0)
        return FKV_OK;
    if (needed > UINT32_MAX)
        return fkvi_fail(c, FKV_ERR_CAPACITY,
                         "fkv_seq_reserve: too many pages at once");
    int32_t *before =
        fkvi_alloc(&c->mem, (size_t)c->geo.layers, sizeof *before);
    if (!before)
        return fkvi_fail(c, FKV_ERR_OUT_OF_MEMORY, "fkv_seq_reserve: no memory");
    memcpy(before, s->mapped, (size_t)c->geo.layers * sizeof *before);
    const uint32_t chunks = c->pool.n_chunks;
    st = fkv_pool_reserve(&c->pool, (uint32_t)needed);
    if (st != FKV_OK) {
        fkvi_free(&c->mem, before);
        return pool_failure(c, "fkv_seq_reserve", st, needed);
    }
    for (int32_t l = 0; l < c->geo.layers && st == FKV_OK; l++)
        if (!fkvi_pool_unused(c, l))
            st = map_pages(c, slot, l, want);
    if (st != FKV_OK) { /* all or nothing, the pool's chunks included */
        for (int32_t l = 0; l < c->geo.layers; l++)
            fkvi_unmap_pages(c, slot, l, before[l]);
        fkv_pool_trim(&c->pool, chunks);
    }
    fkvi_free(&c->mem, before);
    return st;
}

fkv_status fkv_sync(fkv_cache *c)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_sync: cache is NULL");
    fkvi_clear_error(c);
    return c->ops->sync ? c->ops->sync(c) : FKV_OK;
}
