/*
 * libfreekv: a paged KV cache with query-aware retrieval for long-context
 * decoding (FreeKV, arXiv 2505.13109), as an embeddable C library.
 *
 * The whole public API is in this header. It is C99 and compiles as C++.
 * See docs/api.md for every call's arguments, tensor shapes, memory space,
 * call order, errors and thread rules.
 *
 * ABI rules: structs a caller holds (fkv_options, fkv_stats, fkv_batch) never
 * change layout; fkv_options and fkv_stats grow only at their end and carry
 * their own size in their first field.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef FREEKV_H
#define FREEKV_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define FKV_API
#elif defined(__GNUC__) && __GNUC__ >= 4
#  define FKV_API __attribute__((visibility("default")))
#else
#  define FKV_API
#endif

/* ------------------------------------------------------------------------ */
/* Version                                                                  */
/* ------------------------------------------------------------------------ */

#define FKV_VERSION_MAJOR 0
#define FKV_VERSION_MINOR 5
#define FKV_VERSION_PATCH 0
#define FKV_VERSION_NUMBER \
    (FKV_VERSION_MAJOR * 10000 + FKV_VERSION_MINOR * 100 + FKV_VERSION_PATCH)

/* The version of the library linked at run time (compare with the macros). */
FKV_API int fkv_version_number(void);
/* "MAJOR.MINOR.PATCH"; a static string, never freed. */
FKV_API const char *fkv_version_string(void);

/* ------------------------------------------------------------------------ */
/* Status codes. The numeric values are part of the ABI and never change.    */
/* ------------------------------------------------------------------------ */

typedef enum fkv_status {
    FKV_OK = 0,
    FKV_ERR_INVALID_ARGUMENT = 1, /* NULL pointer, bad count, malformed batch */
    FKV_ERR_OUT_OF_RANGE = 2,     /* layer or head index out of range */
    FKV_ERR_UNKNOWN_SEQUENCE = 3, /* sequence id never opened, or closed */
    FKV_ERR_CAPACITY = 4,         /* more tokens or sequences than configured */
    FKV_ERR_INVALID_STATE = 5,    /* call out of order (attend before append) */
    FKV_ERR_UNSUPPORTED = 6,      /* dtype, head_dim, backend not supported */
    FKV_ERR_VERSION_MISMATCH = 7, /* struct_size of a caller's struct unknown */
    FKV_ERR_OUT_OF_MEMORY = 8,    /* host or device allocation failed */
    FKV_ERR_DEVICE = 9,           /* CUDA or cuBLAS error; see fkv_last_error */
    FKV_ERR_INTERNAL = 10         /* a bug in libfreekv; please report it */
} fkv_status;

/* A short static description of a status ("invalid argument"); never NULL. */
FKV_API const char *fkv_status_string(fkv_status status);

/* ------------------------------------------------------------------------ */
/* Enumerations. Values are part of the ABI.                                */
/* ------------------------------------------------------------------------ */

typedef enum fkv_backend {
    FKV_BACKEND_AUTO = 0, /* CUDA when built with it and a device exists */
    FKV_BACKEND_CPU = 1,  /* portable C on host memory: the reference */
    FKV_BACKEND_CUDA = 2
} fkv_backend;

typedef enum fkv_dtype {
    /* fkv_options_init's value: fkv_create rejects it, so that a caller who
     * forgets to say which dtype its buffers hold is told so. */
    FKV_DTYPE_UNSET = -1,
    FKV_DTYPE_F32 = 0,
    FKV_DTYPE_F16 = 1, /* IEEE binary16 */
    FKV_DTYPE_BF16 = 2 /* bfloat16 */
} fkv_dtype;

typedef enum fkv_policy {
    /* Speculative selection with the previous step's query, recall off the
     * critical path, correction of KV heads whose query drifted. */
    FKV_POLICY_FREEKV = 0,
    /* Select with the current query and recall on the critical path
     * (ArkVale / InfiniGen style baseline). */
    FKV_POLICY_SYNC = 1,
    /* Select with the current query; all KV stays on the device (Quest). */
    FKV_POLICY_RESIDENT = 2,
    /* Full attention over all tokens; all KV stays on the device. */
    FKV_POLICY_DENSE = 3,
    /* The engine chooses the pages (fkv_set_pages); the library recalls
     * them and attends sink, window, partial page and those pages. */
    FKV_POLICY_EXTERNAL = 4
} fkv_policy;

typedef enum fkv_group_score {
    /* Mean over the group's query heads of each head's softmax over page
     * scores ("MeanS" in the FreeKV paper). */
    FKV_GROUP_MEAN_SOFTMAX = 0,
    /* Mean over the group's query heads of the raw page scores. */
    FKV_GROUP_MEAN_SCORE = 1
} fkv_group_score;

/* When FKV_POLICY_FREEKV fetches pages inside fkv_attend (docs/design.md
 * section 4). */
typedef enum fkv_correction_criterion {
    /* Re-select a KV head with the current query, and recall all its
     * missing pages, when its mean query cosine against the query of its
     * resident selection is below correction_threshold. */
    FKV_CRITERION_COSINE = 0,
    /* Score every KV head with the current query; fetch now the missing
     * pages of the new top-K, most estimated mass first, until the
     * attended pages hold (1 - correction_min_mass) of the top-K's
     * estimated mass, at most correction_max_pages per head; the new
     * top-K is the next step's speculative selection. */
    FKV_CRITERION_BOUNDED = 1
} fkv_correction_criterion;

/* correction_threshold at or below this value turns correction off. */
#define FKV_CORRECTION_OFF (-2.0f)

/* ------------------------------------------------------------------------ */
/* Options                                                                  */
/* ------------------------------------------------------------------------ */

/* Fill with fkv_options_init(), change what you need, pass to fkv_create().
 * The first field is the struct's size as the caller compiled it; the struct
 * only ever grows at its end. */
typedef struct fkv_options {
    size_t struct_size;

    fkv_backend backend;
    int32_t device; /* CUDA device ordinal (CUDA backend) */

    /* Model shape. Required: there are no useful defaults. */
    int32_t num_layers;
    int32_t num_q_heads;  /* a multiple of num_kv_heads */
    int32_t num_kv_heads;
    int32_t head_dim;     /* 64, 128 or 256 */
    fkv_dtype dtype;      /* of K, V, Q and the output; required */
    float softmax_scale;  /* 0 means 1/sqrt(head_dim) */

    /* Retrieval. sink, window and budget are multiples of page_tokens, and
     * budget_tokens >= sink_tokens + window_tokens. */
    int32_t page_tokens;   /* default 32 */
    int32_t budget_tokens; /* default 2048, per (sequence, layer, KV head) */
    int32_t sink_tokens;   /* default 512 */
    int32_t window_tokens; /* default 512 */
    float correction_threshold;  /* default 0.9; FKV_CORRECTION_OFF: off */
    fkv_policy policy;           /* default FKV_POLICY_FREEKV */
    fkv_group_score group_score; /* default FKV_GROUP_MEAN_SOFTMAX */

    /* Capacity. */
    int32_t max_sequences;            /* open at once; default 8 */
    int64_t max_tokens_per_sequence;  /* default 131072 */
    uint64_t host_pool_bytes;         /* KV pool limit; 0 = no limit */

    /* Host allocator (added in 0.2; both NULL: the C library's malloc).
     * Every host allocation the library makes goes through it, except the
     * CUDA backend's pinned memory (the host pool: C-library memory
     * registered with cudaHostRegister; staging: cudaHostAlloc).
     * host_alloc returns memory aligned to `alignment` (a power of two) or
     * NULL; host_free gets the size that was asked for. Set both or neither. The functions may be
     * called from any thread that calls into the cache. */
    void *(*host_alloc)(void *user, size_t size, size_t alignment);
    void (*host_free)(void *user, void *ptr, size_t size);
    void *alloc_user; /* passed to both */

    /* Correction criterion (added in 0.2; a caller compiled against an
     * older header gets these defaults). */
    int32_t correction_criterion; /* fkv_correction_criterion; default
                                     FKV_CRITERION_COSINE */
    float correction_min_mass;    /* BOUNDED: share of the top-K's
                                     estimated mass the attended pages may
                                     miss; default 0.002, in [0, 1] */
    int32_t correction_max_pages; /* BOUNDED: most pages per KV head fetched
                                     inside fkv_attend; default 32, >= 0 */

    /* Dense layers (added in 0.3; a caller compiled against an older
     * header gets NULL). NULL: none. Otherwise num_layers flags: a layer
     * whose flag is non-zero attends every token of the sequence, as under
     * FKV_POLICY_DENSE, whatever the policy: no selection, correction or
     * recall there (fkv_select and fkv_recall are no-ops on it, fkv_set_pages
     * ignores its pages, fkv_get_selected_pages reports 0 pages) and its
     * pages never count in pages_recalled or corrections. Copied by
     * fkv_create; fkv_get_options returns the cache's copy (valid until
     * fkv_destroy). Cost: a dense layer's whole KV is attended at every step
     * and, on the CUDA backend, stays on the device: 2 * num_kv_heads *
     * head_dim * elem_size bytes per token of capacity
     * (max_tokens_per_sequence) per sequence and dense layer. */
    const uint8_t *dense_layers;

    /* Speculative set under BOUNDED (added in 0.5; a caller compiled
     * against an older header gets 0). 0: the set fkv_attend leaves for
     * the next step's speculative recall is the whole top-K of its query.
     * Otherwise the attended set moves towards that top-K only until it
     * holds (1 - speculative_min_mass) of the top-K's estimated mass, most
     * mass first, so that near-ties at the top-K's edge do not move pages
     * every step (docs/design.md section 4). In [0, 1]; ignored under
     * COSINE and by the other policies. */
    float speculative_min_mass;
} fkv_options;

/* Fills *opts with the defaults and sets opts->struct_size to opts_size.
 * Call as fkv_options_init(&opts, sizeof opts). Only the first opts_size
 * bytes are written. Returns FKV_ERR_VERSION_MISMATCH if opts_size is smaller
 * than the first published fkv_options. */
FKV_API fkv_status fkv_options_init(fkv_options *opts, size_t opts_size);

/* ------------------------------------------------------------------------ */
/* Cache handle                                                             */
/* ------------------------------------------------------------------------ */

typedef struct fkv_cache fkv_cache;

/* Creates a cache. On failure *cache is set to NULL and the message is
 * available from fkv_last_error(NULL, ...) on the calling thread. */
FKV_API fkv_status fkv_create(const fkv_options *opts, fkv_cache **cache);

/* Frees everything the cache holds. NULL is a no-op. On the CUDA backend it
 * first waits for the cache's outstanding work. */
FKV_API void fkv_destroy(fkv_cache *cache);

/* The options in force, with AUTO and 0 resolved (backend, softmax_scale).
 * out->struct_size must be set by the caller; only that many bytes are
 * written. */
FKV_API fkv_status fkv_get_options(fkv_cache *cache, fkv_options *out);

/* CUDA backend: the engine's stream (a cudaStream_t) on which attention runs
 * and with which the library orders its own streams. NULL is the legacy
 * default stream. The CPU backend accepts and ignores it. */
FKV_API fkv_status fkv_set_stream(fkv_cache *cache, void *stream);

/* Writes the message of the cache's most recent call into buf (always NUL
 * terminated when len > 0) and returns the message's full length, like
 * snprintf: "" when that call succeeded (like sqlite3_errmsg, a successful
 * call clears the message; fkv_last_error itself changes nothing). With
 * cache == NULL it reports the calling thread's most recent call that had
 * no handle (fkv_options_init, fkv_create, or a call given a NULL cache). */
FKV_API size_t fkv_last_error(const fkv_cache *cache, char *buf, size_t len);

/* ------------------------------------------------------------------------ */
/* Sequences                                                                */
/* ------------------------------------------------------------------------ */

/* Sequence ids are assigned by the library and never reused by one cache,
 * so a stale id is reported as FKV_ERR_UNKNOWN_SEQUENCE. */
typedef int64_t fkv_seq_id;

FKV_API fkv_status fkv_seq_open(fkv_cache *cache, fkv_seq_id *seq);
/* Frees the sequence's pages and slots (CUDA: the slot's device memory is
 * kept for its next sequence; fkv_destroy frees it). */
FKV_API fkv_status fkv_seq_close(fkv_cache *cache, fkv_seq_id seq);
/* Tokens held for every layer (the smallest per-layer count). */
FKV_API fkv_status fkv_seq_length(fkv_cache *cache, fkv_seq_id seq,
                                  int64_t *length);

/* Makes sure the sequence holds host pool blocks (and, on the CUDA backend,
 * device page-table entries) for `tokens` tokens on every layer, so that
 * appends up to that length allocate nothing. Call it before capturing
 * decode steps in a CUDA graph, for the tokens the replays will add. */
FKV_API fkv_status fkv_seq_reserve(fkv_cache *cache, fkv_seq_id seq,
                                   int64_t tokens);

/* Waits for the cache's outstanding device work, refreshes the host's view
 * of the sequences (lengths advanced by replays of a captured CUDA graph)
 * and reports an error the device recorded during replay (an append beyond
 * the reserved or configured capacity: FKV_ERR_CAPACITY). Call it after
 * replaying captured steps and before eager calls. A no-op on the CPU. */
FKV_API fkv_status fkv_sync(fkv_cache *cache);

/* Drops every token at and after position `length` on every layer (e.g.
 * rejected draft tokens) and frees the pages past it. length == the current
 * length is a no-op; a larger one is FKV_ERR_OUT_OF_RANGE. Selections that
 * the dropped tokens could affect are forgotten: the next fkv_attend of a
 * FREEKV sequence re-selects every KV head (docs/design.md section 11). */
FKV_API fkv_status fkv_seq_truncate(fkv_cache *cache, fkv_seq_id seq,
                                    int64_t length);

/* Opens *child as a copy of parent (all its tokens on every layer) that
 * shares the parent's sealed host pages: they are reference counted and
 * counted once in host_bytes; partial pages are copied. The child has its
 * own device slots and selections (FREEKV: it re-selects at its first
 * attend). Closing either leaves the other intact. */
FKV_API fkv_status fkv_seq_fork(fkv_cache *cache, fkv_seq_id parent,
                                fkv_seq_id *child);

/* ------------------------------------------------------------------------ */
/* Per-layer calls on a batch                                               */
/* ------------------------------------------------------------------------ */

/* A batch names its sequences (distinct, open) and, for fkv_append, each
 * one's token count. Both arrays are host memory and are read during the
 * call only. The layout of this struct never changes. */
typedef struct fkv_batch {
    int32_t num_seqs;
    int32_t reserved; /* set to 0 */
    const fkv_seq_id *seq_ids;   /* [num_seqs] */
    const int32_t *num_tokens;   /* [num_seqs]; NULL means 1 token each */
} fkv_batch;

/* Decode order for each layer: fkv_append, fkv_attend, fkv_select,
 * fkv_recall. Prefill: one fkv_append per layer with the whole prompt.
 *
 * Tensors are device pointers on the CUDA backend and host pointers on the
 * CPU backend, contiguous, in opts.dtype:
 *   k, v    [sum of num_tokens, num_kv_heads, head_dim], sequence after
 *           sequence in batch order, after RoPE;
 *   q, out  [num_seqs, num_q_heads, head_dim].
 * A failed call leaves the cache exactly as it was. */
FKV_API fkv_status fkv_append(fkv_cache *cache, int32_t layer,
                              const fkv_batch *batch, const void *k,
                              const void *v);

/* A K or V tensor [sum of num_tokens, num_kv_heads, head_dim] in any
 * layout whose channels are contiguous: element (row, head, channel) is at
 * data + (row * token_stride + head * head_stride + channel) elements. A
 * model holding K as [heads, tokens, head_dim] passes token_stride =
 * head_dim, head_stride = tokens * head_dim. Set struct_size to
 * sizeof(fkv_tensor); the struct only ever grows at its end. */
typedef struct fkv_tensor {
    size_t struct_size;
    const void *data;     /* same memory space and dtype as fkv_append's */
    int64_t token_stride; /* elements, >= 0 */
    int64_t head_stride;  /* elements, >= 0 */
} fkv_tensor;

/* fkv_append with strided k and v. Contiguous strides (token_stride =
 * num_kv_heads * head_dim, head_stride = head_dim) are fkv_append; any
 * other non-negative strides work on both backends. */
FKV_API fkv_status fkv_append_strided(fkv_cache *cache, int32_t layer,
                                      const fkv_batch *batch,
                                      const fkv_tensor *k,
                                      const fkv_tensor *v);

/* Attention of q over the layer's cache for each sequence: sink, window,
 * partial page and the selected pages (all tokens for FKV_POLICY_DENSE or
 * when the context fits in the budget). FREEKV: corrects the KV heads whose
 * query drifted (mean cosine < correction_threshold) before attending, and
 * selects every KV head's pages with q for the next step (select at
 * attend: fkv_select(q = NULL) then keeps that selection). */
FKV_API fkv_status fkv_attend(fkv_cache *cache, int32_t layer,
                              const fkv_batch *batch, const void *q,
                              void *out);

/* FREEKV: selects each KV head's pages for the next step with q (the query
 * just attended with). q NULL (since 0.4): the query of the fkv_attend (or
 * fkv_attend_tokens) just made on this layer, whose selection is kept at no
 * cost (the CUDA backend launches nothing); FKV_ERR_INVALID_STATE if a
 * sequence had an fkv_append, fkv_recall, fkv_select with a query or
 * truncate on the layer since its attend. A q equal (bitwise) to the
 * attend's, at the same length, also keeps it. A no-op (q NULL allowed)
 * for the other policies and on dense layers. */
FKV_API fkv_status fkv_select(fkv_cache *cache, int32_t layer,
                              const fkv_batch *batch, const void *q);

/* FREEKV: starts moving the pages chosen by the last fkv_select that are not
 * resident yet into the device slots; returns at once on the CUDA backend.
 * A no-op for the other policies. */
FKV_API fkv_status fkv_recall(fkv_cache *cache, int32_t layer,
                              const fkv_batch *batch);

/* The most query tokens per sequence of one fkv_attend_tokens call. */
#define FKV_MAX_QUERY_TOKENS 16

/* fkv_attend for several query tokens per sequence (speculative decoding
 * verification, chunked prefill tails): batch->num_tokens (NULL: 1 each,
 * at most FKV_MAX_QUERY_TOKENS) counts each sequence's query tokens, which
 * are its LAST num_tokens tokens appended; q and out are
 * [sum of num_tokens, num_q_heads, head_dim], sequence after sequence.
 * Token j attends causally: to the tokens fkv_attend would attend to, up to
 * and including itself. The page selection is shared by a sequence's tokens
 * and made (or checked for correction) with its last token's query. The
 * query tokens must lie in the window and partial page (or every page must
 * be attended), else FKV_ERR_INVALID_ARGUMENT. */
FKV_API fkv_status fkv_attend_tokens(fkv_cache *cache, int32_t layer,
                                     const fkv_batch *batch, const void *q,
                                     void *out);

/* FKV_POLICY_EXTERNAL: the pages each (sequence, KV head) attends at the
 * layer's next fkv_attend besides sink, window and partial page, chosen by
 * the engine. counts: [num_seqs][num_kv_heads], each in [0, K] with
 * K = (budget_tokens - sink_tokens - window_tokens) / page_tokens; pages:
 * [num_seqs][num_kv_heads][K] (row stride K, entries past the count
 * ignored; may be NULL when every count is 0), in any order, each a
 * candidate page (sealed, past the sink, before the window) and none twice.
 * Host arrays read during the call. Starts recalling the pages not yet in
 * the device slots, like fkv_recall. Invalid pages: FKV_ERR_OUT_OF_RANGE or
 * FKV_ERR_INVALID_ARGUMENT, and nothing changes.
 * flags: 0 (reserved). */
FKV_API fkv_status fkv_set_pages(fkv_cache *cache, int32_t layer,
                                 const fkv_batch *batch,
                                 const int32_t *pages, const int32_t *counts,
                                 uint32_t flags);

/* ------------------------------------------------------------------------ */
/* Introspection (off the decode path: may wait for the device)             */
/* ------------------------------------------------------------------------ */

/* The selected pages (indices from 0 in token order, ascending) that the
 * last fkv_attend of (layer, seq) used for kv_head besides the sink, the
 * window and the partial page. While the candidate pages number at most the
 * budget's K, they are all selected and all listed. Writes at most capacity
 * entries and sets *count to the number there are (0 before the first
 * attend, under FKV_POLICY_DENSE and on a dense layer: opts.dense_layers). */
FKV_API fkv_status fkv_get_selected_pages(fkv_cache *cache,
                                          int32_t layer, fkv_seq_id seq,
                                          int32_t kv_head, int32_t *pages,
                                          int32_t capacity, int32_t *count);

typedef struct fkv_stats {
    size_t struct_size;       /* set by the caller: sizeof(fkv_stats) */
    uint64_t steps;           /* fkv_attend calls on layer 0 */
    uint64_t pages_recalled;  /* (page, KV head) units moved to the device */
    uint64_t bytes_recalled;  /* K and V bytes of those units */
    uint64_t corrections;     /* (sequence, layer, KV head) re-selections */
    uint64_t heads_checked;   /* (sequence, layer, KV head) correction checks */
    uint64_t host_bytes;      /* host memory held now */
    uint64_t device_bytes;    /* device memory held now (0 on the CPU) */
    /* Added in 0.2 (a caller compiled against 0.1 passes the smaller size
     * and gets the fields above only). */
    uint64_t pages_recalled_critical; /* of pages_recalled: inside
                                         fkv_attend (SYNC, corrections) */
} fkv_stats;

/* Counters since creation or the last fkv_reset_stats. */
FKV_API fkv_status fkv_get_stats(fkv_cache *cache, fkv_stats *stats);
/* Zeroes the counters (not the memory figures). */
FKV_API fkv_status fkv_reset_stats(fkv_cache *cache);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FREEKV_H */
