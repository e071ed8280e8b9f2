/* bench/recall's parts (recall.c has the program's description and its
 * main): the command line (recall_args.c), the host pool and the recall
 * context driven through kernels/kernels.h (recall_rctx.c), the copies and
 * recalls of (a)-(c) (recall_copies.c), (d)'s GEMMs with a recall beside
 * them (recall_gemm.c) and the rows and their output (recall_report.c).
 * One program: these are not a library's interface.
 *
 * SPDX-License-Identifier: MIT
 */
#ifndef BENCH_RECALL_H
#define BENCH_RECALL_H

/* Included first by every part: nanosleep, pthreads. */
#define _POSIX_C_SOURCE 200809L
#define BENCH_WITH_CUBLAS

#include "bench.h"

#include <stdbool.h>

#ifdef FKV_WITH_CUDA
#include "gemm_model.h"
#include "internal.h" /* fkvi_cuda_layout: the backend's own layout */
#include "kernels.h"
#endif

#define MAX_LIST 16
#define MAX_BATCH 32 /* FKV_DEV_MAX_BATCH: sequences per launch */

typedef struct config {
    bool smoke;
    const char *csv;
    int device;
    int batches[MAX_LIST], nbatches;
    int pages[MAX_LIST], npages;   /* K: missing pages per (seq, KV head) */
    int blocks[MAX_LIST], nblocks; /* gather blocks; 0 = SM count */
    int reps, warmup, unit_reps;
    int big_mib;
    int pool_pages;                /* pages per sequence in the host pool */
    int kv_heads, group, head_dim, page;
    bool gemm;
    bool bulk_gather;              /* TMA bulk copies (st.gather_bulk) */
    bool fused_plan;               /* FKV_PLAN_FUSED (with bulk_gather) */
    bool host_register;            /* pool: aligned_alloc + cudaHostRegister */
    int gemm_batches[MAX_LIST], ngemm_batches;
    int gemm_layers, gemm_reps;
    int conc_pages;                /* pages per (seq, KV head) per recall */
    int conc_blocks[MAX_LIST], nconc_blocks;
    int small_units[MAX_LIST], nsmall_units; /* (c'); none: 0 entries */
} config;

/* The flags into *c: 0, or -1 after a message for a bad flag (--help
 * prints the usage and exits). */
int parse_args(int argc, char **argv, config *c);

#ifdef FKV_WITH_CUDA

/* ---- rows (recall_report.c) --------------------------------------------- */

typedef struct row {
    char section[8]; /* "h2d", "small" (the (c') calls) or "gemm" */
    char variant[48];
    int batch, pages, blocks;       /* -1: not applicable */
    double mib, us, gbps, pct;      /* h2d */
    double gemm_ms, alone_ms, slow_pct, rec_gbps, rec_alone_gbps; /* gemm */
} row;

extern row *g_rows;
extern int g_nrows;
/* The section (b) and (c) file their rows under: "small" during (c'). */
extern const char *g_h2d_section;

/* A new row of g_rows, its numbers NAN and its counts as given. */
row *add_row(const char *section, const char *variant, int batch, int pages,
             int blocks);
void print_table(const char *device_name, double big_gbps, int kv_heads);
void write_csv(const char *path);

/* ---- the pool and the recall context (recall_rctx.c) -------------------- */

/* Host pool: pinned, mapped; one block per (sequence, page) holding every   */
/* KV head's unit ([kv_head][K|V][P][D]), blocks in a random order.          */
/* ------------------------------------------------------------------------ */

typedef struct pool {
    unsigned char *host; /* cudaHostAlloc(mapped), or registered */
    bool registered;     /* aligned_alloc + cudaHostRegister */
    unsigned char *dev;  /* its device alias */
    uint64_t unit_bytes, block_bytes, bytes;
    int seqs, pages;
    uint32_t *perm;      /* [seqs * pages] block of (seq, page) */
} pool;

void pool_create(pool *p, int seqs, int pages, int kv_heads,
                 uint64_t unit_bytes, bool registered);
void pool_destroy(pool *p);

/* A recall context: n sequences, each one layer region laid out by          */
/* fkvi_cuda_layout as the CUDA backend lays out FREEKV, and the device      */
/* state that fkv_launch_recall reads and writes.                            */
/* ------------------------------------------------------------------------ */

typedef struct rctx {
    int n, K, H;
    uint64_t unit_bytes;
    size_t units;                  /* n * H * K per recall */
    fkv_dev_geometry g;
    fkv_dev_state st;
    fkv_dev_batch b;
    unsigned char *regions;        /* device: n regions of g.layer_bytes */
    unsigned char **seq_base_dev;  /* device [n] */
    uint64_t *block_ptr_dev;       /* device [n][max_pages] */
    unsigned char *small;          /* device: counters, error, len */
    unsigned char *work;           /* device: work_src, work_dst, count */
    int32_t *arm_dev[2];           /* device [n][arm_ints]: pending state */
    size_t arm_ints;
    int32_t *set[2];               /* host [n][H][K], ascending pages */
    int parity;                    /* the set the next recall brings in */
    fkv_plan_kind plan;            /* FKV_PLAN_PREFIX, or --fused-plan's */
    int64_t runs;                  /* recalls since the counters' reset */
    /* per-unit copies of each set, for the memcpy variants */
    unsigned char *unit_dst;       /* device [n][H][K] units */
    void **udst;                   /* [units] */
    const void **usrc[2];          /* [units] host (mapped) pool units */
    size_t *usize;                 /* [units] */
} rctx;

void rctx_create(rctx *x, const config *c, const pool *p, int n, int K,
                 uint64_t seed);
void rctx_destroy(rctx *x);
void rctx_reset_counters(rctx *x);
/* One recall of all n sequences: re-arm the pending set (outside the
 * events), then plan + gather. Returns the first error (no exit: the feeder
 * thread calls it). */
cudaError_t rctx_enqueue(rctx *x, int blocks, cudaStream_t s,
                         cudaEvent_t before, cudaEvent_t after);
/* Checks the state after the last recall: every (sequence, KV head) has the
 * last set active, each page in a distinct slot whose 16 KiB equal the pool
 * unit, and the device counted exactly runs * units copies. */
void rctx_verify(const rctx *x, const pool *p, const char *what);
/* Checks unit_dst after per-unit copies: units [0, upto) hold set `par`,
 * the rest set `par ^ 1` (when `rest` is set). */
void units_verify(const rctx *x, int par, size_t upto, bool rest,
                  const char *what);
/* cudaMemcpyBatchAsync where the runtime has it (12.8+). */
cudaError_t batch_copy(void **dst, const void **src, size_t *sizes,
                       size_t count, cudaStream_t s);

/* ---- (a), (b), (c) (recall_copies.c) ------------------------------------ */

/* (a): the reference bandwidth, GB/s. */
double bench_big_copy(const config *c, cudaStream_t s);
/* (b): per-unit cudaMemcpyAsync and (where supported) one batched copy of
 * the same units. Returns whether cudaMemcpyBatchAsync works here. */
bool bench_unit_copies(const config *c, rctx *x, cudaStream_t s,
                       double big_gbps, bool try_batch);
/* (c): fkv_launch_recall for each gather grid. */
void bench_recall(const config *c, rctx *x, const pool *p, cudaStream_t s,
                  int sm_count, double big_gbps);

/* ---- (d) (recall_gemm.c) ------------------------------------------------ */

void bench_gemm(const config *c, const pool *p, int device, int sm_count,
                bool batch_ok);

#endif /* FKV_WITH_CUDA */

#endif /* BENCH_RECALL_H */
