/* The CPU backend's state and what its files share: lib/backend_cpu.c
 * (create, sequences, truncate, fork, the audit, the ops table) and
 * lib/cpu_decode.c (the per-layer calls: append, select, recall, attend,
 * set pages). The backend keeps FreeKV's semantics in portable C on host
 * memory with the structure of the CUDA backend (sink, window ring and
 * recall slots as "device" copies, incremental recall from the pool), so
 * that it serves as the reference the CUDA backend is held to. */
#ifndef FKV_CPU_BACKEND_H
#define FKV_CPU_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include "internal.h"

/* One (sequence, layer). Units are one (page, KV head) of K then V:
 * [2][P][D] in the cache dtype. */
typedef struct cpu_layer {
    unsigned char *sink;  /* [kv_heads][S] units */
    unsigned char *ring;  /* [kv_heads][W + 1] units: window + partial */
    unsigned char *slots; /* [kv_heads][K] units: recalled pages */
    float *smax, *smin;   /* [kv_heads][max_pages][D] page summaries */
    int32_t *slot_page;   /* [kv_heads][K] page in each slot, -1: empty */
    int32_t *active_pages;   /* [kv_heads][K] ascending */
    int32_t *active_slot;    /* [kv_heads][K] slot of each active page */
    int32_t *active_count;   /* [kv_heads]; -1: no selection yet */
    int32_t *used_pages;     /* [kv_heads][K] what the last attend used */
    int32_t *used_count;     /* [kv_heads] */
    int32_t *pending_pages;  /* [kv_heads][K] */
    int32_t *pending_count;  /* [kv_heads] */
    bool pending_valid;
    float *active_q;  /* [q_heads][D] query that made each active set */
    float *pending_q; /* [q_heads][D]; FREEKV: the attend's query while
                         fkvi_sequence.attended says pending is its
                         selection (select at attend) */
} cpu_layer;

typedef struct cpu_segment {
    const unsigned char *unit; /* K rows, then V rows at + P*D elements */
    int32_t rows;
} cpu_segment;

typedef struct cpu_backend {
    cpu_layer *layers;          /* [max_sequences][layers] */
    fkvi_select_scratch select;
    fkvi_correction_scratch corr; /* BOUNDED only */
    float *query;               /* [q_heads][D] one sequence's query */
    float *query_tok;           /* [q_heads][D] one query token of several */
    float *row;                 /* [D] */
    float *stage;               /* [P][D] a page's K or V as float */
    double *ktile;              /* [round_to_block(P)][D] transposed K */
    double *vtile;              /* [P][D] V as double */
    double *logits;             /* [group][max_tokens] */
    double *acc;                /* [group][D] */
    cpu_segment *segments;      /* [max_pages + 1] */
    int32_t *selected;          /* [max(K, 1)] */
    uint8_t *keep;              /* [max(K, 1)] */
    uint64_t bytes;             /* host memory held by this backend */
    size_t seq_bytes;           /* per sequence, all layers */
} cpu_backend;

/* Tokens per block of the transposed K tile: the loops over a block's
 * tokens have this constant trip count, so that they vectorise at -O2 (GCC's
 * very-cheap cost model) and keep their accumulators in registers. */
#define CPU_TOKEN_BLOCK 16 /* CPU_FOR_BLOCK spells out 16 */

static inline int32_t round_to_block(int32_t rows)
{
    return (rows + CPU_TOKEN_BLOCK - 1) / CPU_TOKEN_BLOCK * CPU_TOKEN_BLOCK;
}

static inline cpu_backend *backend_of(fkv_cache *c)
{
    return (cpu_backend *)c->backend;
}

static inline cpu_layer *layer_of(fkv_cache *c, int32_t slot, int32_t layer)
{
    return &backend_of(c)->layers[(size_t)slot * c->geo.layers + layer];
}

/* The policy helpers take the layer: a dense layer (opts.dense_layers)
 * follows FKV_POLICY_DENSE whatever the cache's policy. */
static inline bool uses_slots(const fkv_cache *c, int32_t layer)
{
    const fkv_policy p = fkvi_layer_policy(c, layer);
    return p == FKV_POLICY_FREEKV || p == FKV_POLICY_SYNC ||
           p == FKV_POLICY_EXTERNAL;
}

static inline bool bounded(const fkv_cache *c, int32_t layer)
{
    return fkvi_layer_policy(c, layer) == FKV_POLICY_FREEKV &&
           c->opts.correction_criterion == FKV_CRITERION_BOUNDED;
}

static inline bool uses_summaries(const fkv_cache *c, int32_t layer)
{
    /* EXTERNAL: the engine scores pages, the library does not. */
    const fkv_policy p = fkvi_layer_policy(c, layer);
    return p != FKV_POLICY_DENSE && p != FKV_POLICY_EXTERNAL;
}

/* ---- addressing ------------------------------------------------------- */

static inline unsigned char *pool_unit(fkv_cache *c, int32_t slot,
                                       int32_t layer, int32_t page,
                                       int32_t kv_head)
{
    uint32_t id =
        c->seqs[slot].blocks[(size_t)layer * c->geo.max_pages + page];
    return (unsigned char *)fkv_pool_block(&c->pool, id) +
           (size_t)kv_head * c->geo.unit_bytes;
}

static inline unsigned char *unit_at(const fkvi_geometry *g,
                                     unsigned char *base, int32_t kv_head,
                                     int32_t per_head, int32_t i)
{
    return base + ((size_t)kv_head * per_head + i) * g->unit_bytes;
}

/* Where a sealed or partial page lives on the "device" (slots policies). */
static inline unsigned char *resident_unit(fkv_cache *c, cpu_layer *L,
                                           int32_t page, int32_t kv_head)
{
    const fkvi_geometry *g = &c->geo;
    if (page < g->sink_pages)
        return unit_at(g, L->sink, kv_head, g->sink_pages, page);
    return unit_at(g, L->ring, kv_head, g->ring_pages,
                   (page - g->sink_pages) % g->ring_pages);
}

/* ---- cpu_decode.c: the per-layer calls -------------------------------- */

fkv_status fkvi_cpu_append(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                           const void *k, const void *v);
fkv_status fkvi_cpu_append_strided(fkv_cache *c, int32_t layer,
                                   const fkvi_batch *b, const void *k,
                                   int64_t k_token, int64_t k_head,
                                   const void *v, int64_t v_token,
                                   int64_t v_head);
fkv_status fkvi_cpu_attend(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                           const void *q, void *out);
fkv_status fkvi_cpu_attend_tokens(fkv_cache *c, int32_t layer,
                                  const fkvi_batch *b, const void *q,
                                  void *out);
fkv_status fkvi_cpu_select(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                           const void *q);
fkv_status fkvi_cpu_recall(fkv_cache *c, int32_t layer, const fkvi_batch *b);
fkv_status fkvi_cpu_selected_pages(fkv_cache *c, int32_t layer, int32_t slot,
                                   int32_t kv_head, int32_t *pages,
                                   int32_t capacity, int32_t *count);
void fkvi_cpu_set_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                        const int32_t *pages, const int32_t *counts);

#endif /* FKV_CPU_BACKEND_H */
