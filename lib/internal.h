/* Internal declarations shared by the host code and the backends.
 * Nothing here is exported: the build hides every symbol but fkv_*. */
#ifndef FKV_INTERNAL_H
#define FKV_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "freekv.h"
#include "pool.h"

#ifdef FKV_WITH_CUDA
#include "kernels.h"
#endif

#define FKV_ERROR_LEN 512

#if defined(__GNUC__)
#define FKV_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define FKV_PRINTF(fmt, args)
#endif

/* Derived geometry, computed once from the options. */
typedef struct fkvi_geometry {
    int32_t layers, q_heads, kv_heads, group, head_dim;
    int32_t page;            /* P: tokens per page */
    int32_t sink_pages;      /* S */
    int32_t window_pages;    /* W */
    int32_t select_pages;    /* K */
    int32_t ring_pages;      /* W + 1: window plus partial page */
    int64_t max_tokens;
    int32_t max_pages;       /* ceil(max_tokens / P) */
    size_t elem_bytes;
    size_t unit_elems;       /* one (page, KV head) of K and V: 2 * P * D */
    size_t unit_bytes;
    size_t block_bytes;      /* one (page) for all KV heads */
    float scale;
} fkvi_geometry;

/* The host allocator in force (memory.c). */
typedef struct fkvi_mem {
    void *(*alloc)(void *user, size_t size, size_t alignment);
    void (*free)(void *user, void *ptr, size_t size);
    void *user;
} fkvi_mem;

/* memory.c. fkvi_alloc: n * size zeroed bytes (NULL on overflow or
 * failure), freed with fkvi_free, which needs no size. The _raw pair passes
 * size and alignment straight through (the pool's chunks). */
void fkvi_mem_init(fkvi_mem *m, const fkv_options *o);
void *fkvi_alloc(const fkvi_mem *m, size_t n, size_t size);
void fkvi_free(const fkvi_mem *m, void *p);
void *fkvi_alloc_raw(const fkvi_mem *m, size_t bytes, size_t alignment);
void fkvi_free_raw(const fkvi_mem *m, void *p, size_t bytes);
/* Tests only: every cudaMalloc / cudaHostAlloc of the CUDA backend counts
 * fkvi_device_alloc_calls up and fails when fkvi_device_fault_countdown,
 * if > 0, counts down to 0. Not thread safe; a test runs alone. */
extern int64_t fkvi_device_fault_countdown;
extern uint64_t fkvi_device_alloc_calls;
bool fkvi_device_fault(void);

/* A batch after validation: sequence slots and token offsets. */
typedef struct fkvi_batch {
    int32_t n;
    const int32_t *slot;      /* [n] sequence slot */
    const int32_t *tokens;    /* [n] tokens appended (1 outside fkv_append) */
    const int64_t *offset;    /* [n] first token row in k/v (or q rows:
                                 fkv_attend_tokens) */
    int64_t total_tokens;
} fkvi_batch;

typedef struct fkvi_sequence {
    bool open;
    int64_t generation;   /* id = generation * max_sequences + slot */
    int64_t *length;      /* [layers] tokens held per layer */
    /* [layers] FREEKV: the length at the layer's last fkv_attend while its
     * selection is the pending one (fkv_select with q NULL keeps it; the
     * CPU backend's select compares a query with the attend's while it
     * holds); -1 after an fkv_select with a query, fkv_recall, truncate or
     * fork */
    int64_t *attended;
    int32_t *mapped;      /* [layers] pages [0, mapped) have pool blocks */
    uint32_t *blocks;     /* [layers][max_pages] pool block of each page */
} fkvi_sequence;

typedef struct fkvi_counters {
    uint64_t steps, pages_recalled, bytes_recalled, corrections, heads_checked;
    uint64_t pages_recalled_critical; /* inside fkv_attend */
} fkvi_counters;

/* Sizes of the first published fkv_options and fkv_stats (0.1): the
 * offsets of the first fields added after them. */
#define FKVI_OPTIONS_SIZE_V0 offsetof(fkv_options, host_alloc)
/* Size of 0.2's fkv_options: where dense_layers begins. */
#define FKVI_OPTIONS_SIZE_V0_2 offsetof(fkv_options, dense_layers)
#define FKVI_STATS_SIZE_V0 offsetof(fkv_stats, pages_recalled_critical)

typedef struct fkv_cache fkv_cache;

/* What a backend implements. The host code validates every argument and
 * reserves pool blocks before calling in; a backend call that fails must
 * leave the backend's state as it was. destroy must also undo a create that
 * failed half way. */
typedef struct fkvi_backend_ops {
    const char *name;
    fkv_status (*create)(fkv_cache *c);
    void (*destroy)(fkv_cache *c);
    fkv_status (*set_stream)(fkv_cache *c, void *stream);
    fkv_status (*seq_open)(fkv_cache *c, int32_t slot);
    void (*seq_close)(fkv_cache *c, int32_t slot);
    /* Tokens go to positions length[layer] .. +tokens of each sequence;
     * their pool blocks are already in the page table. */
    fkv_status (*append)(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                         const void *k, const void *v);
    fkv_status (*attend)(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                         const void *q, void *out);
    /* FREEKV layers only. q NULL: keep the selection the batch's attend
     * made at attend (the caller checked that nothing came between). */
    fkv_status (*select)(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                         const void *q);
    fkv_status (*recall)(fkv_cache *c, int32_t layer, const fkvi_batch *b);
    /* Pages [first, last) of (slot, layer) got or gave back pool blocks. */
    fkv_status (*pages_changed)(fkv_cache *c, int32_t slot, int32_t layer,
                                int32_t first, int32_t last);
    /* fkv_sync: wait, refresh lengths, report device-recorded errors. */
    fkv_status (*sync)(fkv_cache *c);
    fkv_status (*selected_pages)(fkv_cache *c, int32_t layer, int32_t slot,
                                 int32_t kv_head, int32_t *pages,
                                 int32_t capacity, int32_t *count);
    /* Adds the backend's counters and memory figures to *s. */
    fkv_status (*stats)(fkv_cache *c, fkv_stats *s);
    void (*reset_stats)(fkv_cache *c);
    /* fkvi_debug_audit; NULL: nothing to audit. */
    fkv_status (*audit)(fkv_cache *c);
    /* Calls added in 0.2; NULL: FKV_ERR_UNSUPPORTED on this backend. */
    /* Before (slot, layer) goes from its length down to `length`: forget
     * what refers to pages at or past the new partial page. Pool blocks of
     * pages [0, ceil(length / P)) are still mapped; must not fail. */
    void (*truncate)(fkv_cache *c, int32_t slot, int32_t layer,
                     int64_t length);
    /* b->tokens are query tokens (the last ones appended), q and out rows
     * at b->offset. */
    fkv_status (*attend_tokens)(fkv_cache *c, int32_t layer,
                                const fkvi_batch *b, const void *q,
                                void *out);
    /* child (opened, its page table filled: the parent's blocks, a copy of
     * each partial page) takes the parent's lengths; the backend copies
     * what it keeps per sequence. Must not fail. */
    void (*seq_fork)(fkv_cache *c, int32_t parent, int32_t child);
    /* FKV_POLICY_EXTERNAL: pages/counts validated (fkv_set_pages' layout);
     * makes them each head's active set and recalls them. Must not fail. */
    void (*set_pages)(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                      const int32_t *pages, const int32_t *counts);
    /* append with k/v element (row, head, channel) at row * *_token +
     * head * *_head + channel elements. */
    fkv_status (*append_strided)(fkv_cache *c, int32_t layer,
                                 const fkvi_batch *b, const void *k,
                                 int64_t k_token, int64_t k_head,
                                 const void *v, int64_t v_token,
                                 int64_t v_head);
} fkvi_backend_ops;

struct fkv_cache {
    fkv_options opts; /* resolved: backend and scale concrete */
    fkvi_mem mem;     /* every host allocation */
    fkvi_geometry geo;
    const fkvi_backend_ops *ops;
    void *backend;    /* the backend's own state */

    fkvi_sequence *seqs; /* [max_sequences] */
    int32_t open_seqs;
    fkv_pool pool;

    /* Scratch for batch validation, sized for max_sequences. */
    int32_t *batch_slot;
    int32_t *batch_tokens;
    int64_t *batch_offset;
    int32_t *batch_mapped; /* mapped pages before an append, for undo */
    uint32_t batch_chunks; /* pool chunks before an append, for undo */
    uint8_t *batch_seen;

    /* Other sequences sharing each pool block (fkv_seq_fork), by block id;
     * ids at or past block_shares_cap are shared by none. */
    uint32_t *block_shares;
    uint32_t block_shares_cap;

    fkvi_counters counters;
    uint64_t host_bytes_other;
    /* The backend keeps every page on the device and needs no host pool
     * (CUDA's RESIDENT and DENSE). */
    bool pool_unused; /* host memory held besides the pool */
    /* FKV_CUDA_EXPERIMENTAL=1 at fkv_create: CUDA paths not yet validated
     * on a GPU may run (otherwise they return FKV_ERR_UNSUPPORTED). */
    bool cuda_experimental;
    /* opts.dense_layers' copy, 0/1 per layer (opts.dense_layers points at
     * it); NULL when the caller gave none. any_dense: some flag is 1. */
    uint8_t *dense;
    bool any_dense;
    /* [layers] or NULL: layers whose pages the backend keeps on the device
     * only, so that they get no host pool blocks (CUDA's dense layers in a
     * cache whose policy recalls from the host). */
    uint8_t *layer_pool_unused;

    char error[FKV_ERROR_LEN];
};

/* The policy layer `layer` follows: FKV_POLICY_DENSE on a dense layer. */
static inline fkv_policy fkvi_layer_policy(const fkv_cache *c, int32_t layer)
{
    return c->dense && c->dense[layer] ? FKV_POLICY_DENSE : c->opts.policy;
}

static inline bool fkvi_layer_dense(const fkv_cache *c, int32_t layer)
{
    return c->dense && c->dense[layer];
}

/* Whether (any sequence's) layer `layer` has no host pool blocks. */
static inline bool fkvi_pool_unused(const fkv_cache *c, int32_t layer)
{
    return c->pool_unused ||
           (c->layer_pool_unused && c->layer_pool_unused[layer]);
}

/* errors.c */
fkv_status fkvi_fail(fkv_cache *c, fkv_status st, const char *fmt, ...)
    FKV_PRINTF(3, 4);
/* A public call begins: the message of the previous one goes (c == NULL:
 * the thread's handle-less message). */
void fkvi_clear_error(fkv_cache *c);

/* Debugging (tests reach it through libfreekv.a; not exported): checks that
 * every recall slot holds the pool's copy of the page it claims and that
 * the pages the last attend used were resident. FKV_OK or FKV_ERR_INTERNAL
 * with the first difference in the message. */
fkv_status fkvi_debug_audit(fkv_cache *c);
/* Tests only (CUDA build): how many times the CUDA backend of c asked CUDA
 * about a user pointer (its allocation was not among those remembered);
 * 0 for other backends. */
uint64_t fkvi_debug_pointer_queries(const fkv_cache *c);
/* What the CUDA backend's launch cache (FKV_CUDA_EXPERIMENTAL) has done. */
typedef struct fkvi_launch_cache_counts {
    uint64_t graph_launches;
    uint64_t graphs_built;   /* instantiated */
    uint64_t graphs_updated; /* an earlier record's graph updated in place */
    uint64_t spilled_calls;  /* records that outgrew a record */
} fkvi_launch_cache_counts;
/* Tests only (CUDA): whether the launch cache is on, and its counts so far;
 * and turning it off for a twin that launches the same kernels directly. */
bool fkvi_debug_launch_cache(const fkv_cache *c,
                             fkvi_launch_cache_counts *counts);
void fkvi_debug_launch_cache_off(fkv_cache *c);

/* options.c */
fkv_status fkvi_options_load(const fkv_options *user, fkv_options *out);
void fkvi_geometry_init(const fkv_options *o, fkvi_geometry *g);

/* sequences.c */
fkv_status fkvi_resolve_sequence(fkv_cache *c, const char *fn, fkv_seq_id id,
                                 int32_t *slot);
/* Validates a batch for `layer`; with_tokens: an append (token counts and
 * capacity). Fills *out with views of the cache's batch scratch. */
fkv_status fkvi_resolve_batch(fkv_cache *c, const char *fn, int32_t layer,
                              const fkv_batch *batch, bool with_tokens,
                              fkvi_batch *out);
/* Maps pool blocks for the pages the batch's tokens reach, all or none;
 * fkvi_release_pages undoes it (the old counts are kept in batch_mapped). */
fkv_status fkvi_reserve_pages(fkv_cache *c, const char *fn, int32_t layer,
                              const fkvi_batch *b);
void fkvi_release_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b);
/* fork.c: drops one reference to a pool block, freeing it with the last. */
void fkvi_block_release(fkv_cache *c, uint32_t id);
bool fkvi_block_shared(const fkv_cache *c, uint32_t id);

/* Gives back pages [keep, mapped) of (slot, layer). */
void fkvi_unmap_pages(fkv_cache *c, int32_t slot, int32_t layer,
                      int32_t keep);

/* dtype.c */
size_t fkvi_dtype_size(fkv_dtype dt);
float fkvi_f16_to_float(uint16_t h);
uint16_t fkvi_float_to_f16(float f);
float fkvi_bf16_to_float(uint16_t h);
uint16_t fkvi_float_to_bf16(float f);
/* Converts n elements starting at element index first. */
void fkvi_load_row(fkv_dtype dt, const void *src, size_t first, size_t n,
                   float *dst);
void fkvi_store_row(fkv_dtype dt, const float *src, size_t n, void *dst,
                    size_t first);

/* selection.c: the host selection algorithm (docs/design.md section 3). */
typedef struct fkvi_select_scratch {
    double *scores;   /* [group][max_pages] */
    double *agg;      /* [max_pages] */
    void *order;      /* [max_pages] sort records */
    const fkvi_mem *mem;
} fkvi_select_scratch;

/* Quest scores of `count` candidate pages from `first` for one query head
 * (selection.c; shared by the top-K and the BOUNDED criterion). */
double fkvi_quest_scores(int32_t dim, const float *smax, const float *smin,
                         const float *qh, int32_t first, int32_t count,
                         double *sh);
/* x[i] = exp(scale * (x[i] - top)) / sum over the n: the per-head page
 * probabilities of selection (MEAN_SOFTMAX) and of BOUNDED's mass. */
void fkvi_softmax(double *x, int32_t n, double scale, double top);

fkv_status fkvi_select_scratch_init(fkvi_select_scratch *s,
                                    const fkvi_geometry *g,
                                    const fkvi_mem *m);
void fkvi_select_scratch_free(fkvi_select_scratch *s);
/* Candidates are pages [first, first + count). smax/smin: [max_pages][D]
 * summaries of this KV head. q: [group][D]. Writes the selected pages in
 * ascending order and returns how many. */
int32_t fkvi_select_pages(const fkvi_geometry *g, fkv_group_score mode,
                          const float *smax, const float *smin,
                          const float *q, int32_t first, int32_t count,
                          fkvi_select_scratch *s, int32_t *selected);
/* Mean over the group's heads of cos(a[h], b[h]); a zero vector gives 0. */
double fkvi_group_cosine(const float *a, const float *b, int32_t group,
                         int32_t dim);

/* correction.c: the BOUNDED correction criterion (docs/design.md
 * section 4). */
typedef struct fkvi_correction_scratch {
    double *scores; /* [group][max_pages] raw page scores */
    double *mass;   /* [max_pages] mean softmax probability */
    double *rank;   /* [max_pages] the group_score aggregation */
    void *order;    /* [2 * max_pages] sort records */
} fkvi_correction_scratch;

/* The correction options of resolved options o (criterion, mass, M). */
fkv_status fkvi_correction_validate(const fkv_options *o);
fkv_status fkvi_correction_scratch_init(fkvi_correction_scratch *s,
                                        const fkvi_geometry *g);
void fkvi_correction_scratch_free(fkvi_correction_scratch *s);
/* BOUNDED at attend for one KV head with more than K candidates
 * [first, first + count), with the current queries q [group][D];
 * active[nactive] (ascending) is the resident selection, all candidates.
 * Writes the attended set (ascending) to attended[] and returns its size;
 * *fetched is how many of its pages are not in active. Writes the next
 * step's speculative set (ascending) to pending[] and its size to
 * *npending: the top-K T, or with o->speculative_min_mass > 0 the set the
 * same walk reaches (design.md section 4). smax/smin: [max_pages][D] of
 * this KV head. */
int32_t fkvi_correction_bounded(const fkvi_geometry *g, const fkv_options *o,
                                const float *smax, const float *smin,
                                const float *q, int32_t first, int32_t count,
                                const int32_t *active, int32_t nactive,
                                fkvi_correction_scratch *s, int32_t *pending,
                                int32_t *npending, int32_t *attended,
                                int32_t *fetched);

/* Page ranges of one (sequence, layer) holding n tokens. */
typedef struct fkvi_pages {
    int32_t sealed;     /* full pages */
    int32_t partial;    /* tokens in the partial page (0: none) */
    int32_t sink_end;   /* sink pages [0, sink_end) */
    int32_t cand_first; /* candidates [cand_first, cand_first + cand_count) */
    int32_t cand_count;
    int32_t window_first; /* window pages [window_first, sealed) */
} fkvi_pages;

void fkvi_page_ranges(const fkvi_geometry *g, int64_t n, fkvi_pages *r);

/* Backends. */
extern const fkvi_backend_ops fkvi_cpu_backend;
#ifdef FKV_WITH_CUDA
extern const fkvi_backend_ops fkvi_cuda_backend;
/* Why the CUDA backend cannot be used here (NULL when it can). */
const char *fkvi_cuda_unavailable(int device);

/* cuda_layout.c: the device geometry and the layout of one (sequence,
 * layer) region for resolved options o and their geometry g (also used by
 * bench/recall). */
void fkvi_cuda_layout(const fkv_options *o, const fkvi_geometry *g,
                      fkv_dev_geometry *d);
/* x rounded up to a multiple of a. */
uint64_t fkvi_cuda_align_up(uint64_t x, uint64_t a);
/* Places an array of n elements of `size` bytes at *off (aligned to the
 * element size, at most 16) and moves *off past it; returns its offset. */
uint64_t fkvi_cuda_place(uint64_t *off, uint64_t n, uint64_t size);
#endif

#endif /* FKV_INTERNAL_H */
