/* The CUDA backend's state and what its files share. The backend is split
 * by concern: lib/backend_cuda.c (errors, the ops table; the device guard
 * is inline here), cuda_create.c (fkv_create's device side, the engine's
 * stream), cuda_sequences.c (sequence regions and page tables),
 * cuda_layer_calls.c (the per-layer calls of the decode path) and
 * cuda_host_calls.c (the calls off it: stats, sync, the debug audit).
 * Streams and events: the comment at the top of backend_cuda.c. */
#ifndef FKV_CUDA_BACKEND_H
#define FKV_CUDA_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include <cuda.h> /* types of cuPointerGetAttributes (no -lcuda: see
                      range_query_entry in cuda_create.c) */
#include <cuda_runtime_api.h>

#include "cuda_launch_cache.h"
#include "internal.h"
#include "kernels.h"

/* The user pointers (k, v, q, out) are checked once per allocation: the
 * last PTR_RANGES allocations accepted are remembered, so that the decode
 * path does not query CUDA per call (design §6). */
#define PTR_RANGES 16
typedef struct ptr_range {
    uintptr_t begin, end; /* [begin, end); empty when begin == end */
} ptr_range;
typedef CUresult (CUDAAPI *range_query_fn)(unsigned int, CUpointer_attribute *,
                                          void **, CUdeviceptr);

typedef struct cuda_backend {
    int device;
    fkv_dev_limits lim; /* read once at fkv_create; passed to the launches */
    cudaStream_t stream; /* the engine's; NULL: legacy default stream */
    cudaStream_t side;   /* ours, highest priority */
    cudaEvent_t *select_ready; /* [layers] */
    cudaEvent_t *recall_done;  /* [layers] */
    cudaEvent_t stream_switch;
    /* Recorded on the side stream at fkv_seq_close: a slot's region is
     * reused at its next open after the side stream's work on it so far. */
    cudaEvent_t seq_closed;

    fkv_dev_geometry geo;   /* the policy's layout (region_off 0) */
    /* [layers]: each layer's layout and region (a dense layer's is the
     * DENSE layout); kernels get their layer's. */
    fkv_dev_geometry *lgeo;
    uint64_t seq_bytes;     /* device memory of one sequence, all layers */
    /* The last layer that is not dense (-1: none): its fkv_recall is the
     * step's last side-stream work, which a captured step joins there. */
    int32_t last_sparse;
    fkv_dev_state st_main; /* kernels on the engine's stream */
    fkv_dev_state st_side; /* the same with the side stream's own scratch */
    int32_t gather_blocks_main, gather_blocks_side;
    int32_t max_bound_pages; /* of the policy's layers */
    /* Set by the first fkv_seq_fork or fkv_seq_truncate: pool blocks were
     * copied on the host, so fkv_seq_close waits for the streams. */
    bool host_block_copies;
    /* FKV_CUDA_EXPERIMENTAL's parts, set at create: the attend's
     * selections take FKV_TAIL_PLAN_LATE; small speculative recalls take
     * FKV_PLAN_FUSED. */
    bool late_check, side_fused;
    /* Eager attends' and recalls' kernels as one graph launch where a
     * call repeats (cuda_launch_cache.h); n_slots 0: off (tests only). */
    fkv_launch_cache launches;
    /* FREEKV with FKV_CRITERION_BOUNDED: select at attend.
     * Per layer, whether work of one stream that the other must follow
     * has not been joined yet: the attend's pending selection (engine),
     * which the side stream's recall reads, and the side stream's
     * selection, which the next attend overwrites. */
    bool bounded;
    bool *attend_unjoined; /* [layers] */
    bool *select_unjoined; /* [layers] */

    /* [max_seqs] each slot's region, allocated at the slot's first open
     * and kept (reused by later sequences in the slot) until destroy, so
     * that no open or close frees device memory (cudaFree synchronises the
     * device). Set once per slot: the copy to seq_base_dev reads it. */
    unsigned char **seq_base_host; /* pinned */
    unsigned char **seq_base_dev;
    uint64_t block_ptr_entries;
    void *small;                   /* len, counters, error, append_done */
    void *scratch[2];              /* scores, agg, work lists: main, side */
    void *partials;
    void *q_last; /* [FKV_DEV_MAX_BATCH] q rows: attend_tokens' selection */
    /* EXTERNAL: one sequence's sorted pages [kv_heads][K] and counts
     * [kv_heads], pageable (an async copy from pageable memory is staged
     * before it returns, so the next sequence may reuse it at once). */
    int32_t *ext_pages;
    int32_t *ext_counts;
    uint64_t device_bytes;
    ptr_range ranges[PTR_RANGES];
    int32_t next_range;
    uint64_t pointer_queries; /* fkvi_debug_pointer_queries */
    range_query_fn range_query; /* NULL: remember exact pointers only */
} cuda_backend;

static inline cuda_backend *backend_of(fkv_cache *c)
{
    return (cuda_backend *)c->backend;
}

/* Whether the attend's selection launches make the correction recall's
 * plan (attend_choose, cuda_layer_calls.c): except under BOUNDED, whose rule kernel
 * comes between the selection and the recall and makes the plan itself.
 * Fixed at fkv_create, which sets up the kernels for it. */
static inline int32_t fuse_plan(const cuda_backend *cb)
{
    return !cb->bounded;
}

/* ---- errors (backend_cuda.c) and the current device --------------------- */

/* An fkv_status and fkv_last_error's message for a failed CUDA call. */
fkv_status fkvi_cuda_fail(fkv_cache *c, cudaError_t e, const char *what);

#define CUDA_TRY(c, call, what)                                              \
    do {                                                                     \
        cudaError_t e_ = (call);                                             \
        if (e_ != cudaSuccess)                                               \
            return fkvi_cuda_fail((c), e_, (what));                          \
    } while (0)

typedef struct device_guard {
    int previous;
    int switched;
} device_guard;

/* The library works on its device and gives the caller's thread its own
 * current device back. Inline: every call of the decode path enters. */
static inline fkv_status fkvi_cuda_enter(fkv_cache *c, device_guard *g)
{
    g->switched = 0;
    CUDA_TRY(c, cudaGetDevice(&g->previous), "cudaGetDevice");
    if (g->previous != backend_of(c)->device) {
        CUDA_TRY(c, cudaSetDevice(backend_of(c)->device), "cudaSetDevice");
        g->switched = 1;
    }
    return FKV_OK;
}

static inline void fkvi_cuda_leave(const device_guard *g)
{
    if (g->switched)
        (void)cudaSetDevice(g->previous);
}

/* ---- cuda_create.c ---------------------------------------------------- */

/* cudaMalloc, failing where the tests' fault injection says. */
cudaError_t fkvi_cuda_dev_malloc(void **p, size_t bytes);
fkv_status fkvi_cuda_create(fkv_cache *c);
void fkvi_cuda_destroy(fkv_cache *c);
fkv_status fkvi_cuda_set_stream(fkv_cache *c, void *stream);

/* ---- cuda_sequences.c ------------------------------------------------- */

fkv_status fkvi_cuda_seq_open(fkv_cache *c, int32_t slot);
void fkvi_cuda_seq_close(fkv_cache *c, int32_t slot);
fkv_status fkvi_cuda_pages_changed(fkv_cache *c, int32_t slot, int32_t layer,
                                   int32_t first, int32_t last);
void fkvi_cuda_seq_fork(fkv_cache *c, int32_t parent, int32_t child);
void fkvi_cuda_truncate(fkv_cache *c, int32_t slot, int32_t layer,
                        int64_t length);

/* ---- cuda_layer_calls.c ----------------------------------------------- */

fkv_status fkvi_cuda_append(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                            const void *k, const void *v);
void fkvi_cuda_set_pages(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                         const int32_t *pages, const int32_t *counts);
fkv_status fkvi_cuda_append_strided(fkv_cache *c, int32_t layer,
                                    const fkvi_batch *b, const void *k,
                                    int64_t k_token, int64_t k_head,
                                    const void *v, int64_t v_token,
                                    int64_t v_head);
fkv_status fkvi_cuda_attend(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                            const void *q, void *out);
fkv_status fkvi_cuda_attend_tokens(fkv_cache *c, int32_t layer,
                                   const fkvi_batch *b, const void *q,
                                   void *out);
fkv_status fkvi_cuda_select(fkv_cache *c, int32_t layer, const fkvi_batch *b,
                            const void *q);
fkv_status fkvi_cuda_recall(fkv_cache *c, int32_t layer, const fkvi_batch *b);
/* Forgets the remembered allocations (fkv_sync, a new stream). */
void fkvi_cuda_forget_ranges(cuda_backend *cb);

/* ---- cuda_host_calls.c ------------------------------------------------ */

fkv_status fkvi_cuda_selected_pages(fkv_cache *c, int32_t layer,
                                    int32_t slot, int32_t kv_head,
                                    int32_t *pages, int32_t capacity,
                                    int32_t *count);
fkv_status fkvi_cuda_stats(fkv_cache *c, fkv_stats *s);
void fkvi_cuda_reset_stats(fkv_cache *c);
fkv_status fkvi_cuda_sync(fkv_cache *c);
fkv_status fkvi_cuda_audit(fkv_cache *c);

#endif /* FKV_CUDA_BACKEND_H */
