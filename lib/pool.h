/* The host page pool: fixed-size blocks (one page of one (sequence, layer),
 * all KV heads, HND) carved from chunks that are allocated on demand. */
#ifndef FKV_POOL_H
#define FKV_POOL_H

#include <stddef.h>
#include <stdint.h>

#include "freekv.h"

#define FKV_POOL_NO_BLOCK UINT32_MAX

typedef struct fkv_pool_allocator {
    /* Returns NULL on failure. release gets the size alloc was asked for. */
    void *(*alloc)(size_t bytes, void *ctx);
    void (*release)(void *p, size_t bytes, void *ctx);
    void *ctx;
} fkv_pool_allocator;

typedef struct fkv_pool {
    size_t block_bytes;
    uint32_t blocks_per_chunk;
    uint64_t limit_bytes; /* 0: no limit */
    fkv_pool_allocator allocator; /* the chunks */
    fkv_pool_allocator meta;      /* the arrays below (host memory) */

    void **chunks;
    uint32_t *chunk_blocks; /* blocks in each chunk (the last may be short) */
    uint32_t n_chunks, cap_chunks;

    uint32_t *free_ids;
    uint32_t n_free, cap_free;
    uint64_t bytes_held;
} fkv_pool;

void fkv_pool_init(fkv_pool *p, size_t block_bytes, uint64_t limit_bytes,
                   size_t chunk_bytes, fkv_pool_allocator allocator,
                   fkv_pool_allocator meta);
void fkv_pool_destroy(fkv_pool *p);
/* Makes sure n blocks are free, growing the pool. Returns FKV_OK,
 * FKV_ERR_CAPACITY (limit_bytes reached) or FKV_ERR_OUT_OF_MEMORY; on
 * failure the pool holds the chunks it held before (the chunks this call
 * added are freed), so the memory figures are as they were. */
fkv_status fkv_pool_reserve(fkv_pool *p, uint32_t n);
/* Frees the chunks after the first n_chunks, whose blocks must all be free
 * (the undo of a reserve whose blocks were taken and given back). */
void fkv_pool_trim(fkv_pool *p, uint32_t n_chunks);
/* Takes a free block; call only after a successful reserve. */
uint32_t fkv_pool_take(fkv_pool *p);
void fkv_pool_give(fkv_pool *p, uint32_t id);
void *fkv_pool_block(const fkv_pool *p, uint32_t id);

#endif /* FKV_POOL_H */
