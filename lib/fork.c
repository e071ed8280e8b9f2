/* fkv_seq_fork: a child sequence sharing its parent's sealed pool blocks.
 * Sealed pages are never written again (only fkv_seq_truncate can reopen
 * one, and it copies a shared one first), so sharing them needs only a
 * count of the other holders per block; partial pages, which appends
 * write, are copied at the fork. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

bool fkvi_block_shared(const fkv_cache *c, uint32_t id)
{
    return id < c->block_shares_cap && c->block_shares[id] > 0;
}

void fkvi_block_release(fkv_cache *c, uint32_t id)
{
    if (fkvi_block_shared(c, id))
        c->block_shares[id]--;
    else
        fkv_pool_give(&c->pool, id);
}

/* Makes block_shares cover every block id the pool can have now. */
static fkv_status cover_blocks(fkv_cache *c)
{
    uint64_t need = (uint64_t)c->pool.n_chunks * c->pool.blocks_per_chunk;
    if (need <= c->block_shares_cap)
        return FKV_OK;
    if (need > UINT32_MAX)
        return FKV_ERR_CAPACITY;
    /* Through the embedder's allocator, which has no realloc: zeroed, the
     * old counts copied over. */
    uint32_t *shares = fkvi_alloc(&c->mem, (size_t)need, sizeof *shares);
    if (!shares)
        return FKV_ERR_OUT_OF_MEMORY;
    if (c->block_shares_cap)
        memcpy(shares, c->block_shares,
               (size_t)c->block_shares_cap * sizeof *shares);
    fkvi_free(&c->mem, c->block_shares);
    c->host_bytes_other += (need - c->block_shares_cap) * sizeof *shares;
    c->block_shares = shares;
    c->block_shares_cap = (uint32_t)need;
    return FKV_OK;
}

fkv_status fkv_seq_fork(fkv_cache *c, fkv_seq_id parent, fkv_seq_id *child)
{
    if (!c)
        return fkvi_fail(NULL, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_fork: cache is NULL");
    if (!child)
        return fkvi_fail(c, FKV_ERR_INVALID_ARGUMENT,
                         "fkv_seq_fork: child is NULL");
    int32_t ps;
    fkv_status st = fkvi_resolve_sequence(c, "fkv_seq_fork", parent, &ps);
    if (st != FKV_OK)
        return st;
    if (!c->ops->seq_fork)
        return fkvi_fail(c, FKV_ERR_UNSUPPORTED,
                         "fkv_seq_fork: not implemented on the %s backend "
                         "yet", c->ops->name);
    if (c->open_seqs >= c->opts.max_sequences)
        return fkvi_fail(c, FKV_ERR_CAPACITY,
                         "fkv_seq_fork: %d sequences are open already "
                         "(max_sequences)", c->opts.max_sequences);
    const fkvi_geometry *g = &c->geo;
    const fkvi_sequence *p = &c->seqs[ps];
    /* Everything that can fail comes first: the partial pages' copies,
     * the share counts, the child's own tables. */
    uint32_t partial = 0;
    for (int32_t l = 0; l < g->layers; l++)
        partial += !fkvi_pool_unused(c, l) && p->length[l] % g->page != 0;
    if (!c->pool_unused) {
        st = fkv_pool_reserve(&c->pool, partial);
        if (st != FKV_OK)
            return fkvi_fail(c, st,
                             st == FKV_ERR_CAPACITY
                                 ? "fkv_seq_fork: the host pool limit "
                                   "(host_pool_bytes) cannot hold the "
                                   "parent's %u partial pages"
                                 : "fkv_seq_fork: no host memory for the "
                                   "parent's %u partial pages",
                             partial);
        st = cover_blocks(c);
        if (st != FKV_OK)
            return fkvi_fail(c, st, "fkv_seq_fork: no memory for the "
                                    "pool's share counts");
    }
    fkv_seq_id id;
    st = fkv_seq_open(c, &id); /* sets the message on failure */
    if (st != FKV_OK)
        return st;
    int32_t cs;
    (void)fkvi_resolve_sequence(c, "fkv_seq_fork", id, &cs);
    fkvi_sequence *s = &c->seqs[cs];
    p = &c->seqs[ps];
    for (int32_t l = 0; l < g->layers; l++) {
        int64_t n = p->length[l];
        s->length[l] = n;
        if (fkvi_pool_unused(c, l))
            continue;
        const uint32_t *from = p->blocks + (size_t)l * g->max_pages;
        uint32_t *to = s->blocks + (size_t)l * g->max_pages;
        int32_t sealed = (int32_t)(n / g->page);
        for (int32_t q = 0; q < sealed; q++) {
            to[q] = from[q];
            c->block_shares[from[q]]++;
        }
        s->mapped[l] = sealed;
        if (n % g->page) {
            to[sealed] = fkv_pool_take(&c->pool);
            memcpy(fkv_pool_block(&c->pool, to[sealed]),
                   fkv_pool_block(&c->pool, from[sealed]), g->block_bytes);
            s->mapped[l] = sealed + 1;
        }
    }
    c->ops->seq_fork(c, ps, cs);
    *child = id;
    return FKV_OK;
}
