/* Host page pool. Block ids are chunk * blocks_per_chunk + index, so that a
 * block's address is two loads away; only the last chunk can be short (when
 * the pool's byte limit cuts it). */
#include "pool.h"

#include <stdbool.h>
#include <string.h>

void fkv_pool_init(fkv_pool *p, size_t block_bytes, uint64_t limit_bytes,
                   size_t chunk_bytes, fkv_pool_allocator allocator,
                   fkv_pool_allocator meta)
{
    memset(p, 0, sizeof *p);
    p->block_bytes = block_bytes;
    p->limit_bytes = limit_bytes;
    p->allocator = allocator;
    p->meta = meta;
    uint64_t per_chunk = chunk_bytes / block_bytes;
    if (limit_bytes) {
        /* Under a limit, chunks of a quarter of it at most, so that the pool
         * grows gradually and only its very last chunk is short. */
        uint64_t quarter = (limit_bytes / block_bytes + 3) / 4;
        if (per_chunk > quarter)
            per_chunk = quarter;
    }
    p->blocks_per_chunk = per_chunk < 1 ? 1 : (uint32_t)per_chunk;
}

static void meta_release(fkv_pool *p, void *ptr, size_t bytes)
{
    if (ptr)
        p->meta.release(ptr, bytes, p->meta.ctx);
}

/* realloc through the meta allocator: *ptr grows from old to new bytes or
 * stays as it was. */
static bool meta_grow(fkv_pool *p, void **ptr, size_t old_bytes,
                      size_t new_bytes)
{
    void *n = p->meta.alloc(new_bytes, p->meta.ctx);
    if (!n)
        return false;
    if (*ptr)
        memcpy(n, *ptr, old_bytes);
    meta_release(p, *ptr, old_bytes);
    *ptr = n;
    return true;
}

void fkv_pool_destroy(fkv_pool *p)
{
    fkv_pool_trim(p, 0);
    meta_release(p, p->chunks, (size_t)p->cap_chunks * sizeof *p->chunks);
    meta_release(p, p->chunk_blocks,
                 (size_t)p->cap_chunks * sizeof *p->chunk_blocks);
    meta_release(p, p->free_ids, (size_t)p->cap_free * sizeof *p->free_ids);
    memset(p, 0, sizeof *p);
}

void fkv_pool_trim(fkv_pool *p, uint32_t n_chunks)
{
    if (n_chunks >= p->n_chunks)
        return;
    /* Drop the ids of the chunks that go from the free list, keeping the
     * order of the others. */
    uint64_t first = (uint64_t)n_chunks * p->blocks_per_chunk;
    uint32_t kept = 0;
    for (uint32_t i = 0; i < p->n_free; i++)
        if (p->free_ids[i] < first)
            p->free_ids[kept++] = p->free_ids[i];
    p->n_free = kept;
    while (p->n_chunks > n_chunks) {
        uint32_t i = --p->n_chunks;
        size_t bytes = (size_t)p->chunk_blocks[i] * p->block_bytes;
        p->allocator.release(p->chunks[i], bytes, p->allocator.ctx);
        p->bytes_held -= bytes;
        p->chunks[i] = NULL;
        p->chunk_blocks[i] = 0;
    }
}

static uint64_t total_blocks(const fkv_pool *p)
{
    uint64_t n = 0;
    for (uint32_t i = 0; i < p->n_chunks; i++)
        n += p->chunk_blocks[i];
    return n;
}

/* Adds one chunk of `blocks` blocks to the free list. */
static fkv_status grow(fkv_pool *p, uint32_t blocks)
{
    if (p->n_chunks == p->cap_chunks) {
        uint32_t cap = p->cap_chunks ? 2 * p->cap_chunks : 8;
        size_t old = (size_t)p->cap_chunks;
        /* Both arrays grow or neither does (the capacity is shared). */
        void *chunks = p->chunks, *counts = p->chunk_blocks;
        if (!meta_grow(p, &chunks, old * sizeof *p->chunks,
                       cap * sizeof *p->chunks))
            return FKV_ERR_OUT_OF_MEMORY;
        p->chunks = chunks;
        if (!meta_grow(p, &counts, old * sizeof *p->chunk_blocks,
                       cap * sizeof *p->chunk_blocks))
            return FKV_ERR_OUT_OF_MEMORY; /* chunks is merely larger */
        p->chunk_blocks = counts;
        p->cap_chunks = cap;
    }
    /* Every block can be free at once (all sequences closed). */
    uint64_t need_free = total_blocks(p) + blocks;
    if (need_free > UINT32_MAX)
        return FKV_ERR_CAPACITY;
    if (need_free > p->cap_free) {
        uint32_t cap = (uint32_t)need_free;
        void *ids = p->free_ids;
        if (!meta_grow(p, &ids, (size_t)p->cap_free * sizeof *p->free_ids,
                       (size_t)cap * sizeof *p->free_ids))
            return FKV_ERR_OUT_OF_MEMORY;
        p->free_ids = ids;
        p->cap_free = cap;
    }
    void *mem = p->allocator.alloc((size_t)blocks * p->block_bytes,
                                   p->allocator.ctx);
    if (!mem)
        return FKV_ERR_OUT_OF_MEMORY;
    uint32_t chunk = p->n_chunks++;
    p->chunks[chunk] = mem;
    p->chunk_blocks[chunk] = blocks;
    p->bytes_held += (uint64_t)blocks * p->block_bytes;
    /* Push in reverse so that blocks are taken in address order. */
    uint32_t base = chunk * p->blocks_per_chunk;
    for (uint32_t i = blocks; i-- > 0;)
        p->free_ids[p->n_free++] = base + i;
    return FKV_OK;
}

fkv_status fkv_pool_reserve(fkv_pool *p, uint32_t n)
{
    if (n <= p->n_free)
        return FKV_OK;
    uint64_t need = n - p->n_free;
    uint64_t have = total_blocks(p);
    if (p->limit_bytes) {
        uint64_t max_blocks = p->limit_bytes / p->block_bytes;
        if (have + need > max_blocks)
            return FKV_ERR_CAPACITY;
    }
    const uint32_t chunks_before = p->n_chunks;
    while (p->n_free < n) {
        uint32_t blocks = p->blocks_per_chunk;
        if (p->limit_bytes) {
            /* The chunk that reaches the limit may be short; it is the last
             * one there can be, as block ids assume full chunks before it. */
            uint64_t room = p->limit_bytes / p->block_bytes - total_blocks(p);
            if (room < blocks)
                blocks = (uint32_t)room;
        }
        fkv_status st = grow(p, blocks);
        if (st != FKV_OK) {
            /* Issue 12: a failed reserve holds no more memory than before. */
            fkv_pool_trim(p, chunks_before);
            return st;
        }
    }
    return FKV_OK;
}

uint32_t fkv_pool_take(fkv_pool *p)
{
    return p->free_ids[--p->n_free];
}

void fkv_pool_give(fkv_pool *p, uint32_t id)
{
    p->free_ids[p->n_free++] = id;
}

void *fkv_pool_block(const fkv_pool *p, uint32_t id)
{
    uint32_t chunk = id / p->blocks_per_chunk;
    uint32_t index = id % p->blocks_per_chunk;
    return (char *)p->chunks[chunk] + (size_t)index * p->block_bytes;
}
