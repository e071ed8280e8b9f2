/* The C interface between the CUDA backend's host code (lib/backend_cuda.c
 * and the lib/cuda_*.c files beside it) and the kernels (kernels/ *.cu).
 * Plain C structs passed by value, so that a launch captured in a CUDA
 * graph holds everything it needs; all state that changes from step to
 * step lives in device memory.
 *
 * Every launcher enqueues on `stream` and returns cudaGetLastError(). */
#ifndef FKV_KERNELS_H
#define FKV_KERNELS_H

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Sequences per launch; larger batches are split by the host code. */
#define FKV_DEV_MAX_BATCH 32

/* Device counters (fkv_stats), indices into fkv_dev_state.counters. */
enum {
    FKV_DEV_PAGES_RECALLED = 0,
    FKV_DEV_BYTES_RECALLED = 1,
    FKV_DEV_CORRECTIONS = 2,
    FKV_DEV_HEADS_CHECKED = 3,
    /* of PAGES_RECALLED, the FIX recalls of fkv_attend (critical path) */
    FKV_DEV_PAGES_RECALLED_CRITICAL = 4,
    FKV_DEV_COUNTERS = 5
};

/* Bits of fkv_dev_state.error (sticky until fkv_sync reads them). */
enum {
    FKV_DEV_ERR_CAPACITY = 1, /* append past max_tokens or unmapped page */
    FKV_DEV_ERR_INTERNAL = 2
};

/* Geometry and the layout of one (sequence, layer) region. A sequence slot
 * owns the regions of all its layers, one after the other, from
 * seq_base[slot]; layer l's region starts region_off bytes in (l *
 * layer_bytes when every layer has the same layout; a dense layer,
 * fkv_options.dense_layers, has the DENSE layout and its own size). The
 * host keeps one geometry per layer and passes the layer's to each launch.
 * Each region holds the arrays below at the given byte offsets. Arrays a
 * policy does not use have size 0. "Units" are one (page, KV head) of K
 * then V: [2][page][head_dim] elements of the cache dtype. */
typedef struct fkv_dev_geometry {
    int32_t layers, q_heads, kv_heads, group, head_dim, page;
    int32_t sink_pages, window_pages, select_pages, ring_pages, max_pages;
    int32_t dtype;        /* fkv_dtype */
    int32_t policy;       /* fkv_policy */
    int32_t group_score;  /* fkv_group_score */
    int32_t store;        /* 1: every page on the device (RESIDENT, DENSE) */
    int32_t max_tokens;
    float scale;
    float threshold;      /* correction threshold */
    /* correction_criterion (fkv_criterion) and BOUNDED's m and M */
    int32_t criterion;
    float min_mass;
    int32_t max_fetch;
    /* BOUNDED's speculative_min_mass; 0: the pending set is the top-K.
     * Fills what was the padding before unit_bytes, so the offsets of the
     * fields below are those of the kernels validated without it. */
    float spec_min_mass;
    uint64_t unit_bytes;
    uint64_t layer_bytes; /* this layout's region size */
    uint64_t region_off;  /* this layer's region from seq_base[slot] */
    /* units */
    uint64_t off_sink;    /* [kv_heads][sink_pages] */
    uint64_t off_ring;    /* [kv_heads][ring_pages]; page p >= S in
                             (p - S) % ring_pages */
    uint64_t off_slots;   /* [kv_heads][select_pages] */
    uint64_t off_store;   /* [kv_heads][max_pages] (store policies) */
    /* summaries, cache dtype, [kv_heads][max_pages][head_dim] */
    uint64_t off_smax, off_smin;
    /* int32 arrays; "-1" ones are set to -1 at sequence open */
    uint64_t off_slot_page;     /* [kv_heads][K] page in slot, -1 empty */
    uint64_t off_active_count;  /* [kv_heads] -1: no selection yet */
    uint64_t off_fix_count;     /* [kv_heads] -1: nothing to correct */
    uint64_t off_active_pages;  /* [kv_heads][K] ascending */
    uint64_t off_active_slot;   /* [kv_heads][K] */
    uint64_t off_pending_pages; /* [kv_heads][K] */
    uint64_t off_pending_count; /* [kv_heads] */
    uint64_t off_pending_valid; /* [kv_heads] 0/1 */
    uint64_t off_fix_pages;     /* [kv_heads][K] */
    uint64_t off_snap_len;      /* [1] length when fkv_select was called */
    /* [1] FREEKV: 1 while pending_pages/q and snap_len were made by
     * fkv_attend (select at attend), so fkv_select with the same query at
     * the same length keeps them */
    uint64_t off_pending_attend;
    /* float arrays */
    uint64_t off_active_q;      /* [q_heads][head_dim] */
    uint64_t off_pending_q;     /* [q_heads][head_dim] */
    uint64_t neg_begin, neg_bytes; /* the "-1" arrays: one range per layer */
    /* what the last attend used (FREEKV, SYNC), for fkv_get_selected_pages */
    uint64_t off_used_pages;    /* [kv_heads][K] */
    uint64_t off_used_count;    /* [kv_heads] */
    uint64_t meta_bytes;        /* metadata [0, meta_bytes) of each layer
                                   region, zeroed at open; units follow */
} fkv_dev_geometry;

/* Device memory shared by all kernels of one cache. */
typedef struct fkv_dev_state {
    unsigned char *const *seq_base;  /* [max_seqs] (device array) */
    int32_t *len;                    /* [max_seqs][layers] tokens held */
    const uint64_t *block_ptr;       /* [max_seqs][layers][max_pages] device
                                        address of each page's pool block
                                        (mapped host memory), 0: none */
    unsigned long long *counters;    /* [FKV_DEV_COUNTERS] */
    unsigned int *error;             /* FKV_DEV_ERR_* bits */
    unsigned int *append_done;       /* [layers] last-block counters */
    float *scores;                   /* [max_seqs][kv_heads][group][max_pages] */
    float *agg;                      /* [max_seqs][kv_heads][max_pages] */
    /* recall work lists, [max_seqs][kv_heads][K] */
    uint64_t *work_src;              /* device address of a pool unit */
    uint64_t *work_dst;              /* device address of a slot unit */
    int32_t *work_count;             /* [max_seqs][kv_heads] */
    /* [max_seqs][kv_heads][K]: a FIX plan's source for each position j of
     * the set it made active: the pool unit of a listed page (the
     * attention reads it there and writes it to its slot), 0 where the slot
     * holds the page. NULL: not written (states that attend nothing). */
    uint64_t *fetch_src;
    /* split attention partials */
    float *part_ml;                  /* [max_seqs][q_heads][max_splits][2] */
    float *part_acc;                 /* [max_seqs][q_heads][max_splits][D] */
    int32_t max_splits;
    int32_t max_seqs;
    /* Fused combine (FKV_CUDA_EXPERIMENTAL): the split blocks of one
     * (sequence, KV head, group chunk) take a ticket here when their
     * partial is written; the last one combines and puts the counter back
     * to 0, so it is 0 between launches (zeroed once at fkv_create).
     * [max_seqs][q_heads] (kv_heads * group chunks <= q_heads). */
    unsigned int *part_ticket;
    int32_t fused_combine;           /* 1: one launch per attend */
    /* 1: fkv_launch_recall's gather is TMA bulk copies by one-warp blocks
     * (sm_90; fkv_recall_init must have run): the side stream's state on
     * sm_90 for FREEKV, the engine's with FKV_CUDA_EXPERIMENTAL. */
    int32_t gather_bulk;
} fkv_dev_state;

typedef struct fkv_dev_batch {
    int32_t n;
    int32_t max_tokens;                   /* largest tokens[i] */
    int32_t slot[FKV_DEV_MAX_BATCH];
    int32_t tokens[FKV_DEV_MAX_BATCH];    /* append only */
    int64_t offset[FKV_DEV_MAX_BATCH];    /* first row in k/v (append) */
    /* attend: row of entry i in q and out (i for fkv_attend; the query
     * token's row for fkv_attend_tokens) and how many of the last attended
     * tokens it must not see (its causal limit; 0 for fkv_attend). */
    int32_t row[FKV_DEV_MAX_BATCH];
    int32_t cut[FKV_DEV_MAX_BATCH];
} fkv_dev_batch;

/* What the launchers need to know of the device, read once at fkv_create
 * (fkv_dev_limits_query), so that no launch queries the device: grids and
 * split counts follow the SM count and shared memory of the device the
 * cache was created on. */
typedef struct fkv_dev_limits {
    int32_t sm_count;
    int32_t smem_per_sm;             /* bytes an SM gives its blocks */
    int32_t smem_reserved_per_block; /* bytes the system keeps per block */
    int32_t smem_per_block_optin;    /* most static + dynamic bytes a block
                                        may opt in to */
    int32_t cc_major;                /* compute capability (9: TMA bulk) */
    int32_t bulk_copy;               /* 1: the bulk gather's code for this
                                        device has its TMA copies (cc >= 9
                                        and code from compute_90 or newer) */
} fkv_dev_limits;

/* Reads `device`'s limits (attribute queries: call off the decode path),
 * with `device` current. */
cudaError_t fkv_dev_limits_query(int device, fkv_dev_limits *lim);
/* *built = 1 where the bulk gather kernel's code for the current device
 * comes from sm_90 or newer code (compute_80 PTX, which a build may carry
 * and the driver compiles for a newer device, has no TMA copies). */
cudaError_t fkv_recall_bulk_built(int32_t *built);

/* How a cache will launch the kernels, for fkv_kernels_init. */
typedef struct fkv_kernel_use {
    /* the attend's selections make the correction's plan in their tail
     * (every policy but FREEKV under BOUNDED) */
    int32_t fuse_plan;
    /* the engine stream's recalls gather by bulk copies
     * (FKV_CUDA_EXPERIMENTAL) */
    int32_t gather_bulk;
    /* the side stream's do (FREEKV on sm_90) */
    int32_t side_bulk;
    /* the selections' tails also take FKV_TAIL_PLAN_LATE (implies
     * fuse_plan; FKV_CUDA_EXPERIMENTAL) */
    int32_t late_check;
    /* the side stream's recalls also take FKV_PLAN_FUSED (implies
     * side_bulk; FKV_CUDA_EXPERIMENTAL) */
    int32_t side_fused;
} fkv_kernel_use;

/* Once per cache at fkv_create, with the cache's device current: sets the
 * function attributes (shared memory opt-in) of every kernel instantiation
 * the geometry launches as `use` says, so that no launch sets one. A
 * geometry that needs more shared memory than a block may have gives
 * cudaErrorInvalidValue. The parts, one per kernel file, follow. */
cudaError_t fkv_kernels_init(const fkv_dev_geometry *g,
                             const fkv_dev_limits *lim,
                             const fkv_kernel_use *use);
cudaError_t fkv_attend_init(const fkv_dev_geometry *g,
                            const fkv_dev_limits *lim);
cudaError_t fkv_select_init(const fkv_dev_geometry *g,
                            const fkv_dev_limits *lim, int32_t fuse_plan,
                            int32_t gather_bulk, int32_t late_check);
/* FREEKV under BOUNDED: allows the rule kernel its shared memory. */
cudaError_t fkv_bounded_init(const fkv_dev_geometry *g);
/* gather_bulk: allows the bulk gather its shared memory; fused: the
 * FKV_PLAN_FUSED kernel too. */
cudaError_t fkv_recall_init(const fkv_dev_geometry *g, int32_t gather_bulk,
                            int32_t fused);
/* The plan kernel's shared memory (5 K int32) where K needs the opt-in;
 * fails for a K beyond what a block may have. */
cudaError_t fkv_recall_plan_init(const fkv_dev_geometry *g, const fkv_dev_limits *lim);
/* The bulk gather's dynamic shared memory at the largest batch. */
size_t fkv_recall_bulk_smem(const fkv_dev_geometry *g);

/* ---- recorded launches (FKV_CUDA_EXPERIMENTAL) -------------------------
 * Between fkv_record_begin and fkv_record_end on one thread, the launches
 * that fkv_launch_select, fkv_launch_bounded, fkv_launch_attend and
 * fkv_launch_recall make on the record's stream are appended to the record
 * (kernel, grid, block, shared memory and the argument bytes) instead of
 * being enqueued; the caller then enqueues the record, as it is
 * (fkv_record_enqueue) or as a CUDA graph (lib/cuda_launch_cache.c), so
 * that the kernels of a repeated call cost one launch of host time. A
 * launch that does not fit, or is for another stream, first enqueues what
 * the record holds and then goes to its stream as without a record
 * (`spilled`), so the order of the launches is always kept. */
#define FKV_RECORD_OPS 12
#define FKV_RECORD_ARGS 12
#define FKV_RECORD_BYTES 16384
typedef struct fkv_record_op {
    const void *func;                 /* the kernel (its host symbol) */
    uint32_t grid[3], block[3];
    uint32_t smem;                    /* dynamic shared memory, bytes */
    int32_t nargs;
    uint32_t arg_off[FKV_RECORD_ARGS]; /* each argument's bytes in blob */
} fkv_record_op;
typedef struct fkv_launch_record {
    cudaStream_t stream;
    int32_t n_ops;
    int32_t spilled; /* 1: the launches go to the stream (see above) */
    uint32_t bytes;  /* of blob in use */
    fkv_record_op op[FKV_RECORD_OPS];
    uint64_t blob[FKV_RECORD_BYTES / 8]; /* arguments, 8-byte aligned */
} fkv_launch_record;

/* Resets r; this thread's launches on `stream` are recorded into it. */
void fkv_record_begin(fkv_launch_record *r, cudaStream_t stream);
/* This thread's launches are enqueued again. */
void fkv_record_end(void);
/* The record this thread's launches go to (NULL: none). */
fkv_launch_record *fkv_recording(void);
/* Enqueues the record's launches on its stream in order (nothing if it
 * spilled: those were enqueued then). */
cudaError_t fkv_record_enqueue(const fkv_launch_record *r);
/* 1 where two records enqueue the same work (the ops and the argument
 * bytes in use compared, not the whole arrays; the stream is not part of
 * it); 0 otherwise. */
int32_t fkv_record_same(const fkv_launch_record *a, const fkv_launch_record *b);
/* Copies the part of `from` in use into `to`. */
void fkv_record_copy(fkv_launch_record *to, const fkv_launch_record *from);

/* Sets the "-1" arrays of (slot, layer) of a freshly opened slot and
 * zeroes its length; g is the layer's geometry. */
cudaError_t fkv_launch_seq_init(const fkv_dev_geometry *g,
                                const fkv_dev_state *st, int32_t slot,
                                int32_t layer, cudaStream_t stream);

/* Page-table entries [first, first + n) of fkv_dev_state.block_ptr (index
 * (slot * layers + layer) * max_pages + page), by value: the launch holds
 * the values (kernels/page_table.cu). */
#define FKV_DEV_PAGE_ENTRIES 64
typedef struct fkv_dev_page_entries {
    int32_t n;
    uint64_t addr[FKV_DEV_PAGE_ENTRIES]; /* device address of a pool block; 0:
                                            none */
} fkv_dev_page_entries;

cudaError_t fkv_launch_page_table(const fkv_dev_state *st, uint64_t first,
                                  const fkv_dev_page_entries *e,
                                  cudaStream_t stream);

/* fkv_seq_truncate of (slot, layer) to `length`: metadata as at open, the
 * device length, the window ring reloaded from the host pool
 * (kernels/truncate.cu). */
cudaError_t fkv_launch_truncate(const fkv_dev_geometry *g,
                                const fkv_dev_state *st, int32_t slot,
                                int32_t layer, int32_t length,
                                cudaStream_t stream);

/* Writes the batch's tokens (k, v: [rows][kv_heads][head_dim]) at the end of
 * each sequence: to the host pool block (sliding-window policies) and to the
 * device copy (sink, ring or store); summarises each page it completes;
 * then advances len. Positions come from len on the device. */
/* Element strides of K and V rows (token) and heads; channels contiguous. */
typedef struct fkv_dev_strides {
    int64_t k_token, k_head, v_token, v_head;
    int32_t vec16; /* every row 16-byte aligned: vector copies */
} fkv_dev_strides;

cudaError_t fkv_launch_append(const fkv_dev_geometry *g,
                              const fkv_dev_state *st,
                              const fkv_dev_batch *b, int32_t layer,
                              const void *k, const void *v,
                              cudaStream_t stream);
/* fkv_launch_append with K element (row, head, channel) at row * k_token +
 * head * k_head + channel (V alike), rows counted from k / v. */
cudaError_t fkv_launch_append_strided(const fkv_dev_geometry *g,
                                      const fkv_dev_state *st,
                                      const fkv_dev_batch *b, int32_t layer,
                                      const void *k, int64_t k_token,
                                      int64_t k_head, const void *v,
                                      int64_t v_token, int64_t v_head,
                                      cudaStream_t stream);

/* Copies q ([n][q_heads][D], cache dtype) into pending_q as float and len
 * into snap_len, so that a selection on another stream sees this moment.
 * A sequence whose pending selection was made at attend (pending_attend)
 * with the same query, bitwise as float, at the same length keeps it
 * (pending_attend stays 1: the FKV_SELECT_PENDING selection skips it);
 * otherwise pending_attend is cleared. */
cudaError_t fkv_launch_snapshot(const fkv_dev_geometry *g,
                                const fkv_dev_state *st,
                                const fkv_dev_batch *b, int32_t layer,
                                const void *q, cudaStream_t stream);

typedef enum fkv_select_mode {
    /* FREEKV's fkv_select: query pending_q, length snap_len; writes
     * pending_pages/count and sets pending_valid. */
    FKV_SELECT_PENDING = 0,
    /* FREEKV's attend under FKV_CRITERION_COSINE (select at attend): per KV
     * head, count a check and select with q into pending_pages/count
     * (pending_valid set; q into pending_q, the length into snap_len,
     * pending_attend set). If there is no active selection, or the
     * candidates fit in K but are not all active, or the mean cosine of q
     * with active_q is under the threshold: count a correction, copy the
     * selection into fix_pages/count and set active_q to q. Otherwise
     * fix_count = -1. */
    FKV_SELECT_CORRECT = 1,
    /* SYNC's attend: select every head with q into fix_pages/count. */
    FKV_SELECT_FIX_ALL = 2,
    /* RESIDENT's attend: select every head with q into active_pages/count. */
    FKV_SELECT_ACTIVE = 3,
    /* FREEKV's attend under FKV_CRITERION_BOUNDED (select at attend): per
     * KV head, count a check and select with q into pending_pages/count
     * (pending_valid set; q into pending_q, the length into snap_len,
     * pending_attend set). If there is no active selection, or the
     * candidates fit in K but are not all active: count a correction and
     * copy the selection into fix_pages/count. If the candidates fit in K
     * otherwise: fix_count = -1. Else fix_count is left to
     * fkv_launch_bounded, which must follow on the same stream. */
    FKV_SELECT_BOUNDED = 4
} fkv_select_mode;

/* What the selection launch does after the top-K (FKV_SELECT_CORRECT and
 * FKV_SELECT_FIX_ALL only, and only after fkv_select_init with fuse_plan). */
typedef enum fkv_select_tail {
    FKV_TAIL_NONE = 0,
    /* Each block also makes the correction recall's plan (the one
     * fkv_launch_recall's FKV_RECALL_FIX would make next, from the set and
     * the slots in its shared memory), so that the gather follows with
     * FKV_PLAN_DONE, or nothing when the attention fetches the units. */
    FKV_TAIL_PLAN = 1,
    /* The plan and the gather (TMA bulk copies; needs st->gather_bulk,
     * FKV_CUDA_EXPERIMENTAL): nothing follows. */
    FKV_TAIL_GATHER = 2,
    /* FKV_TAIL_PLAN, and under FKV_SELECT_CORRECT the block computes the
     * cosines before its top-K and decides after it, with no barrier of
     * its own (select.cu, select_head's kLate): the same decisions. Needs
     * fkv_select_init with late_check (FKV_CUDA_EXPERIMENTAL). */
    FKV_TAIL_PLAN_LATE = 3
} fkv_select_tail;

/* q: [n][q_heads][D] cache dtype (unused by FKV_SELECT_PENDING).
 * seq_base_host: the host's copy of st->seq_base, needed with a tail (the
 * tail's launch takes each entry's region by value). */
cudaError_t fkv_launch_select(const fkv_dev_geometry *g,
                              const fkv_dev_limits *lim,
                              const fkv_dev_state *st,
                              const fkv_dev_batch *b, int32_t layer,
                              const void *q, fkv_select_mode mode,
                              fkv_select_tail tail,
                              unsigned char *const *seq_base_host,
                              cudaStream_t stream);

/* BOUNDED's cumulative rule (docs/design.md section 4, step 4) for the
 * heads FKV_SELECT_BOUNDED left to it (more than K candidates, an active
 * selection): from the page scores that launch left in st->scores and its
 * top-K in pending_pages, the missing pages to fetch now and the resident
 * ones they replace; fix_pages/count is the attended set (ascending) when
 * a page is fetched (a correction counted), else fix_count = -1. Then, for
 * every head of the batch, the correction recall's plan (the one
 * fkv_launch_recall's FKV_RECALL_FIX would make next), so that the gather
 * follows with FKV_PLAN_DONE, or nothing when the attention fetches.
 * seq_base_host: the host's copy of every slot's region (passed by value,
 * as the selection's tail takes it). */
cudaError_t fkv_launch_bounded(const fkv_dev_geometry *g,
                               const fkv_dev_state *st,
                               const fkv_dev_batch *b, int32_t layer,
                               unsigned char *const *seq_base_host,
                               cudaStream_t stream);

typedef enum fkv_recall_mode {
    /* Make pending active where pending_valid (and copy pending_q to
     * active_q, clear pending_valid). */
    FKV_RECALL_PENDING = 0,
    /* Make fix active where fix_count >= 0 (then set fix_count to -1). */
    FKV_RECALL_FIX = 1
} fkv_recall_mode;

/* Whether fkv_launch_recall launches the plan (kernels/plan.cuh: the r-th
 * missing page takes the r-th free slot, from block prefix sums). */
typedef enum fkv_plan_kind {
    FKV_PLAN_PREFIX = 0,
    /* FKV_RECALL_FIX after a selection launched with FKV_TAIL_PLAN or
     * after fkv_launch_bounded: they made the same plan, only the gather
     * runs. */
    FKV_PLAN_DONE = 1,
    /* One launch: each (sequence, KV head)'s block makes its plan, then its
     * thread 0 gathers the head's units by TMA bulk copies (needs
     * st->gather_bulk and fkv_recall_init with fused; gather_blocks
     * is unused). FKV_CUDA_EXPERIMENTAL: FREEKV's speculative recall at
     * small batches. */
    FKV_PLAN_FUSED = 2
} fkv_plan_kind;

/* Incremental recall: pages of the new set already in a slot stay; the
 * others are copied from the host pool into slots whose pages left the set.
 * gather_blocks: blocks of the copy kernel (the PCIe/SM trade-off): of 256
 * threads, or one warp each with st->gather_bulk. */
cudaError_t fkv_launch_recall(const fkv_dev_geometry *g,
                              const fkv_dev_state *st,
                              const fkv_dev_batch *b, int32_t layer,
                              fkv_recall_mode mode, int32_t gather_blocks,
                              fkv_plan_kind plan, cudaStream_t stream);

/* Decode attention (split along the keys, then combined) over the sink,
 * the active selection, the window and the partial page (every page for
 * DENSE). q, out: [n][q_heads][D] cache dtype. bound_pages: the most pages
 * any sequence of the batch can attend now (sets the split grid).
 * With st->fused_combine the last split block of each (sequence, KV head,
 * group chunk) combines (one launch), splits are ranges of rows
 * (fkv_attend_splits_fused), and seq_base_host (the host's copy
 * of st->seq_base, indexed by slot; a slot's value never changes once
 * set) gives the kernel each entry's region by value; otherwise a split
 * launch, then a combine launch, and seq_base_host is unused (may be
 * NULL). fetch (FREEKV's and SYNC's fkv_attend, right after the
 * correction's plan with no gather between): the units on that
 * plan's work lists (st) are read from the pool and written back to their
 * slots by the split kernel, so the correction needs no gather launch. */
cudaError_t fkv_launch_attend(const fkv_dev_geometry *g,
                              const fkv_dev_limits *lim,
                              const fkv_dev_state *st,
                              const fkv_dev_batch *b, int32_t layer,
                              const void *q, void *out, int32_t bound_pages,
                              unsigned char *const *seq_base_host,
                              int32_t fetch, cudaStream_t stream);

/* The most splits fkv_launch_attend's two-launch path uses for n
 * sequences and bound_pages or fewer (for sizing st->max_splits):
 * arithmetic on the geometry and lim only, no device query. */
int32_t fkv_attend_splits(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                          int32_t n, int32_t bound_pages);
/* The grid that path launches: fkv_attend_splits capped at max_splits
 * (none if < 1), whole pages per split (*pages_per_split, may be NULL),
 * and no split empty at the bound (so possibly fewer splits). */
int32_t fkv_attend_grid(const fkv_dev_geometry *g, const fkv_dev_limits *lim,
                        int32_t n, int32_t bound_pages, int32_t max_splits,
                        int32_t *pages_per_split);
/* The most splits the fused path (st->fused_combine) uses for bound_pages:
 * splits of whole steps of rows rather than pages, and a cap on what the
 * combining block reads (for sizing max_splits as well). */
int32_t fkv_attend_splits_fused(const fkv_dev_geometry *g,
                                const fkv_dev_limits *lim, int32_t n,
                                int32_t bound_pages);

#ifdef __cplusplus
}
#endif

#endif /* FKV_KERNELS_H */
