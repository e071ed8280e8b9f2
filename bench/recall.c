/*
 * bench/recall: bandwidth of the recall path for selected pages, against the
 * host-to-device copy bandwidth measured in the same run, and its cost to the
 * engine's GEMMs when it runs beside them.
 *
 *   (a) one large pinned cudaMemcpyAsync H2D (--big-mib, 256 MiB): the
 *       reference bandwidth;
 *   (b) one cudaMemcpyAsync per (page, KV head) unit (16 KiB: K and V of 32
 *       tokens x 128 dims, bf16): FreeKV's and ArkVale's way; and, where the
 *       runtime has it, one cudaMemcpyBatchAsync of the same units;
 *   (c) our recall, driven directly through kernels/kernels.h: for batch x
 *       8 KV heads, K missing pages per (sequence, KV head) move from a
 *       pinned mapped host pool of 16 KiB units into the device slots with
 *       fkv_launch_recall(FKV_RECALL_PENDING) (plan + gather kernels), for
 *       gather_blocks 8, 16, 32, 64 and the SM count. Each (sequence, KV
 *       head) alternates between two disjoint page sets, so every run finds
 *       all K pages missing and copies them all (checked with the device's
 *       recall counters). Timed with CUDA events around the launch: median
 *       of --reps runs after warm-up;
 *   (c') the small calls of a decode step: (b) and (c) for one sequence and
 *       --small-units units in all (default 8, 16, 32, 64: K = units / KV
 *       heads pages per KV head), the sizes one layer's recall of a few
 *       changed pages moves, where the launch and per-call costs, not the
 *       bandwidth, decide; printed in their own table with the time per
 *       unit;
 *   (d) cuBLAS bf16 GEMMs of Llama-3.1-8B's per-layer shapes (QKV 4096x6144,
 *       O 4096x4096, gate+up 4096x28672, down 14336x4096) for 32 layers on a
 *       highest-priority stream, alone and with a recall variant running
 *       continuously on a lowest-priority stream (our recall with 16 and 32
 *       gather blocks, per-unit cudaMemcpyAsync, cudaMemcpyBatchAsync): GEMM
 *       time, slowdown, and the recall bandwidth achieved meanwhile (bytes of
 *       the recall chunks that completed inside the GEMM window).
 *
 * The host pool comes from cudaHostAlloc (mapped, portable), or with
 * --host-register from aligned_alloc + cudaHostRegister, as the library's
 * CUDA pool does (the gathers read both at the same rate on the H200).
 *
 * Every variant's copied bytes are compared with the host pool (exit 1 on a
 * mismatch). Prints a compact table last; --csv FILE writes its rows.
 *
 * The device region of each sequence is laid out by the CUDA backend's own
 * fkvi_cuda_layout (lib/cuda_layout.c) for a one-layer FREEKV cache without
 * sink and window pages, so recall sees the backend's arrays at the
 * backend's offsets; fkv_dev_state carries only what recall reads and
 * writes.
 *
 * --smoke: the smallest configuration, a few seconds. Without a usable CUDA
 * device (or built with CUDA=0) it prints one "skipped" line and exits 0
 * with --smoke, 1 without.
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L
#define BENCH_WITH_CUBLAS

#include "bench.h"

#include <stdbool.h>

#ifdef FKV_WITH_CUDA
#include <pthread.h>
#include <stdatomic.h>

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

static const char k_usage[] =
    "usage: recall [--smoke] [--csv FILE] [--device N]\n"
    "              [--batches 1,8] [--pages 32,64,128] [--blocks 2,4,8,16,32,0]\n"
    "              [--reps N] [--unit-reps N] [--big-mib N] [--pool-pages N]\n"
    "              [--kv-heads N] [--group N] [--head-dim N] [--page N]\n"
    "              [--no-gemm] [--gemm-batches 1,8] [--gemm-layers N]\n"
    "              [--gemm-reps N] [--conc-pages N] [--conc-blocks 2,4,8,16,32]\n"
    "              [--small-units 8,16,32,64|none] [--bulk-gather]\n"
    "              [--fused-plan]\n"
    "              [--host-register]\n"
    "  --blocks: gather blocks of fkv_launch_recall; 0 = the SM count\n"
    "  --bulk-gather: the gather by TMA bulk copies from one-warp blocks\n"
    "               (sm_90; FREEKV's speculative recall there)\n"
    "  --fused-plan: with --bulk-gather, every recall is one FKV_PLAN_FUSED\n"
    "               launch (each plan block copies its own head's units;\n"
    "               FKV_CUDA_EXPERIMENTAL's small speculative recalls);\n"
    "               the gather-block lists then do not apply\n"
    "  --host-register: the host pool is page-aligned memory pinned with\n"
    "               cudaHostRegister (mapped, portable), as the library's\n"
    "               CUDA pool is since 0.3, instead of cudaHostAlloc\n"
    "  --pages: K, missing pages per (sequence, KV head) per recall\n"
    "  --conc-pages: pages per (sequence, KV head) of each recall that runs\n"
    "               beside the GEMMs (one layer's worth)\n"
    "  --small-units: units (page x KV head) in all of the small calls\n"
    "               a decode step makes (one sequence; multiples of\n"
    "               --kv-heads), timed as (b) and (c); none: skip them\n";

static int parse_args(int argc, char **argv, config *c)
{
    memset(c, 0, sizeof *c);
    bool smoke = false;
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--smoke"))
            smoke = true;
    c->smoke = smoke;
    {
        const int b[] = {1, 8}, p[] = {32, 64, 128}, g[] = {2, 4, 8, 16, 32, 0};
        const int gb[] = {1, 8}, cb[] = {2, 4, 8, 16, 32};
        const int sb[] = {1}, sp[] = {32}, sg[] = {16, 0}, scb[] = {16};
        const int su[] = {8, 16, 32, 64}, ssu[] = {8, 64};
        if (smoke) {
            bench_set_list(c->batches, &c->nbatches, sb, 1);
            bench_set_list(c->pages, &c->npages, sp, 1);
            bench_set_list(c->blocks, &c->nblocks, sg, 2);
            bench_set_list(c->gemm_batches, &c->ngemm_batches, sb, 1);
            bench_set_list(c->conc_blocks, &c->nconc_blocks, scb, 1);
            bench_set_list(c->small_units, &c->nsmall_units, ssu, 2);
        } else {
            bench_set_list(c->batches, &c->nbatches, b, 2);
            bench_set_list(c->pages, &c->npages, p, 3);
            bench_set_list(c->blocks, &c->nblocks, g, 6);
            bench_set_list(c->gemm_batches, &c->ngemm_batches, gb, 2);
            bench_set_list(c->conc_blocks, &c->nconc_blocks, cb, 5);
            bench_set_list(c->small_units, &c->nsmall_units, su, 4);
        }
    }
    c->reps = smoke ? 5 : 50;
    c->warmup = smoke ? 2 : 5;
    c->unit_reps = smoke ? 2 : 10;
    c->big_mib = smoke ? 16 : 256;
    c->pool_pages = smoke ? 128 : 1024;
    c->kv_heads = 8;
    c->group = 4;
    c->head_dim = 128;
    c->page = 32;
    c->gemm = true;
    c->gemm_layers = smoke ? 2 : 32;
    c->gemm_reps = smoke ? 2 : 10;
    c->conc_pages = 16;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
#define NEEDV                                                                \
    do {                                                                     \
        if (!v) {                                                            \
            fprintf(stderr, "recall: %s needs a value\n%s", a, k_usage);     \
            return -1;                                                       \
        }                                                                    \
        i++;                                                                 \
    } while (0)
        if (!strcmp(a, "--smoke")) {
            continue;
        } else if (!strcmp(a, "--no-gemm")) {
            c->gemm = false;
        } else if (!strcmp(a, "--bulk-gather")) {
            c->bulk_gather = true;
        } else if (!strcmp(a, "--fused-plan")) {
            c->fused_plan = true;
        } else if (!strcmp(a, "--host-register")) {
            c->host_register = true;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(k_usage, stdout);
            exit(0);
        } else if (!strcmp(a, "--csv")) {
            NEEDV;
            c->csv = v;
        } else if (!strcmp(a, "--device")) {
            NEEDV;
            bad = bench_parse_int(v, 0, 1024, &c->device);
        } else if (!strcmp(a, "--batches")) {
            NEEDV;
            bad = bench_parse_list(v, 1, MAX_BATCH, c->batches, &c->nbatches,
                                   MAX_LIST);
        } else if (!strcmp(a, "--pages")) {
            NEEDV;
            bad = bench_parse_list(v, 1, 4096, c->pages, &c->npages, MAX_LIST);
        } else if (!strcmp(a, "--blocks")) {
            NEEDV;
            bad = bench_parse_list(v, 0, 65535, c->blocks, &c->nblocks,
                                   MAX_LIST);
        } else if (!strcmp(a, "--reps")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 100000, &c->reps);
        } else if (!strcmp(a, "--unit-reps")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 100000, &c->unit_reps);
        } else if (!strcmp(a, "--big-mib")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 65536, &c->big_mib);
        } else if (!strcmp(a, "--pool-pages")) {
            NEEDV;
            bad = bench_parse_int(v, 2, 1 << 20, &c->pool_pages);
        } else if (!strcmp(a, "--kv-heads")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 256, &c->kv_heads);
        } else if (!strcmp(a, "--group")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 64, &c->group);
        } else if (!strcmp(a, "--head-dim")) {
            NEEDV;
            bad = bench_parse_int(v, 64, 256, &c->head_dim) ||
                  (c->head_dim != 64 && c->head_dim != 128 &&
                   c->head_dim != 256);
        } else if (!strcmp(a, "--page")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 1024, &c->page);
        } else if (!strcmp(a, "--gemm-batches")) {
            NEEDV;
            bad = bench_parse_list(v, 1, MAX_BATCH, c->gemm_batches,
                                   &c->ngemm_batches, MAX_LIST);
        } else if (!strcmp(a, "--gemm-layers")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 128, &c->gemm_layers);
        } else if (!strcmp(a, "--gemm-reps")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 10000, &c->gemm_reps);
        } else if (!strcmp(a, "--conc-pages")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 4096, &c->conc_pages);
        } else if (!strcmp(a, "--conc-blocks")) {
            NEEDV;
            bad = bench_parse_list(v, 0, 65535, c->conc_blocks,
                                   &c->nconc_blocks, MAX_LIST);
        } else if (!strcmp(a, "--small-units")) {
            NEEDV;
            if (!strcmp(v, "none"))
                c->nsmall_units = 0;
            else
                bad = bench_parse_list(v, 1, 1 << 16, c->small_units,
                                       &c->nsmall_units, MAX_LIST);
        } else {
            fprintf(stderr, "recall: unknown argument '%s'\n%s", a, k_usage);
            return -1;
        }
#undef NEEDV
        if (bad) {
            fprintf(stderr, "recall: bad value '%s' for %s\n%s", v, a,
                    k_usage);
            return -1;
        }
    }
    int maxk = c->conc_pages;
    for (int i = 0; i < c->npages; i++)
        if (c->pages[i] > maxk)
            maxk = c->pages[i];
    for (int i = 0; i < c->nsmall_units; i++) {
        if (c->small_units[i] % c->kv_heads != 0) {
            fprintf(stderr,
                    "recall: --small-units %d is not a multiple of "
                    "--kv-heads %d (one sequence, K pages per KV head)\n",
                    c->small_units[i], c->kv_heads);
            return -1;
        }
        if (c->small_units[i] / c->kv_heads > maxk)
            maxk = c->small_units[i] / c->kv_heads;
    }
    if (c->pool_pages < 2 * maxk) {
        fprintf(stderr,
                "recall: --pool-pages (%d) must be at least twice the largest "
                "K (%d): each (sequence, KV head) alternates between two "
                "disjoint sets of K pages\n",
                c->pool_pages, maxk);
        return -1;
    }
    if ((2ull * c->page * c->head_dim * 2) % 16 != 0) {
        fprintf(stderr, "recall: a unit must be a multiple of 16 bytes\n");
        return -1;
    }
    return 0;
}

#ifndef FKV_WITH_CUDA

int main(int argc, char **argv)
{
    bench_set_die_prefix("recall: FAILED: ");
    config c;
    if (parse_args(argc, argv, &c) != 0)
        return 2;
    int rc = 1;
    (void)bench_skip_without_cuda("recall", c.device, c.smoke, &rc);
    return rc;
}

#else /* FKV_WITH_CUDA */

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

static int cmp_i32(const void *a, const void *b)
{
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return x < y ? -1 : x > y;
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------------------ */
/* Result rows                                                              */
/* ------------------------------------------------------------------------ */

typedef struct row {
    char section[8]; /* "h2d", "small" (the (c') calls) or "gemm" */
    char variant[48];
    int batch, pages, blocks;       /* -1: not applicable */
    double mib, us, gbps, pct;      /* h2d */
    double gemm_ms, alone_ms, slow_pct, rec_gbps, rec_alone_gbps; /* gemm */
} row;

static row *g_rows;
static int g_nrows;
static size_t g_cap;
/* The section (b) and (c) file their rows under: "small" during (c'). */
static const char *g_h2d_section = "h2d";

static row *add_row(const char *section, const char *variant, int batch,
                    int pages, int blocks)
{
    g_rows = bench_grow(g_rows, &g_cap, (size_t)g_nrows, sizeof *g_rows);
    row *r = &g_rows[g_nrows++];
    memset(r, 0, sizeof *r);
    snprintf(r->section, sizeof r->section, "%s", section);
    snprintf(r->variant, sizeof r->variant, "%s", variant);
    r->batch = batch;
    r->pages = pages;
    r->blocks = blocks;
    r->mib = r->us = r->gbps = r->pct = NAN;
    r->gemm_ms = r->alone_ms = r->slow_pct = r->rec_gbps = NAN;
    r->rec_alone_gbps = NAN;
    return r;
}

/* ------------------------------------------------------------------------ */
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

static void pool_create(pool *p, int seqs, int pages, int kv_heads,
                        uint64_t unit_bytes, bool registered)
{
    memset(p, 0, sizeof *p);
    p->seqs = seqs;
    p->pages = pages;
    p->unit_bytes = unit_bytes;
    p->block_bytes = unit_bytes * (uint64_t)kv_heads;
    const uint64_t blocks = (uint64_t)seqs * pages;
    p->bytes = blocks * p->block_bytes;
    p->registered = registered;
    if (registered) {
        const uint64_t page = 4096, n = (p->bytes + page - 1) / page * page;
        p->host = aligned_alloc(page, n);
        if (!p->host)
            bench_die("aligned_alloc of %llu bytes failed",
                      (unsigned long long)n);
        BENCH_CUDA_CHECK(cudaHostRegister(
            p->host, n, cudaHostRegisterMapped | cudaHostRegisterPortable));
    } else {
        BENCH_CUDA_CHECK(
            cudaHostAlloc((void **)&p->host, p->bytes,
                          cudaHostAllocMapped | cudaHostAllocPortable));
    }
    void *d = NULL;
    BENCH_CUDA_CHECK(cudaHostGetDevicePointer(&d, p->host, 0));
    p->dev = d;
    /* Random content: every unit differs, so a misplaced copy shows. */
    bench_rng s = {0x5EC0A11ull};
    uint64_t *w = (uint64_t *)p->host;
    for (uint64_t i = 0; i < p->bytes / 8; i++)
        w[i] = bench_rng_next(&s);
    p->perm = bench_xmalloc(blocks * sizeof *p->perm);
    for (uint64_t i = 0; i < blocks; i++)
        p->perm[i] = (uint32_t)i;
    for (uint64_t i = blocks - 1; i > 0; i--) {
        uint64_t j = bench_rng_next(&s) % (i + 1);
        uint32_t t = p->perm[i];
        p->perm[i] = p->perm[j];
        p->perm[j] = t;
    }
}

static void pool_destroy(pool *p)
{
    if (p->host && p->registered) {
        BENCH_CUDA_CHECK(cudaHostUnregister(p->host));
        free(p->host);
    } else if (p->host) {
        BENCH_CUDA_CHECK(cudaFreeHost(p->host));
    }
    free(p->perm);
    memset(p, 0, sizeof *p);
}

static uint64_t pool_block_offset(const pool *p, int seq, int page)
{
    return (uint64_t)p->perm[(uint64_t)seq * p->pages + page] * p->block_bytes;
}

/* ------------------------------------------------------------------------ */
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

/* The device geometry of a one-layer FREEKV cache with no sink and no
 * window (K selected pages, max_pages pages per sequence), laid out by the
 * CUDA backend's own fkvi_cuda_layout. */
static void rctx_layout(fkv_dev_geometry *d, const config *c, int K,
                        int max_pages)
{
    fkv_options o, opts;
    fkvi_geometry g;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = FKV_BACKEND_CUDA;
    o.num_layers = 1;
    o.num_q_heads = c->kv_heads * c->group;
    o.num_kv_heads = c->kv_heads;
    o.head_dim = c->head_dim;
    o.dtype = FKV_DTYPE_BF16;
    o.page_tokens = c->page;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    o.budget_tokens = K * c->page;
    o.policy = FKV_POLICY_FREEKV;
    o.max_sequences = FKV_DEV_MAX_BATCH;
    o.max_tokens_per_sequence = (int64_t)max_pages * c->page;
    BENCH_FKV_CHECK(NULL, fkvi_options_load(&o, &opts));
    fkvi_geometry_init(&opts, &g);
    fkvi_cuda_layout(&opts, &g, d);
}

static void rctx_create(rctx *x, const config *c, const pool *p, int n,
                        int K, uint64_t seed)
{
    memset(x, 0, sizeof *x);
    if (n > FKV_DEV_MAX_BATCH || n > p->seqs)
        bench_die(
            "batch %d exceeds the pool (%d sequences) or FKV_DEV_MAX_BATCH", n,
            p->seqs);
    if (2 * K > p->pages)
        bench_die("K %d needs at least %d pool pages per sequence", K, 2 * K);
    x->n = n;
    x->K = K;
    x->H = c->kv_heads;
    rctx_layout(&x->g, c, K, p->pages);
    x->unit_bytes = x->g.unit_bytes;
    if (x->unit_bytes != p->unit_bytes)
        bench_die("internal: unit size mismatch");
    const int H = x->H;
    x->units = (size_t)n * H * K;

    /* The pending arrays are contiguous: one 2D copy re-arms all sequences. */
    x->arm_ints = (size_t)H * K + 2 * (size_t)H;
    if (x->g.off_pending_count != x->g.off_pending_pages + (uint64_t)H * K * 4 ||
        x->g.off_pending_valid != x->g.off_pending_count + (uint64_t)H * 4)
        bench_die("internal: pending arrays are not contiguous");

    /* Regions, all metadata zero and the "-1" arrays -1, as seq_init does. */
    const uint64_t region = x->g.layer_bytes;
    BENCH_CUDA_CHECK(cudaMalloc((void **)&x->regions, region * n));
    BENCH_CUDA_CHECK(cudaMemset(x->regions, 0, region * n));
    for (int i = 0; i < n; i++)
        BENCH_CUDA_CHECK(cudaMemset(x->regions + region * i + x->g.neg_begin,
                                    0xFF, x->g.neg_bytes));
    unsigned char **bases = bench_xmalloc((size_t)n * sizeof *bases);
    for (int i = 0; i < n; i++)
        bases[i] = x->regions + region * i;
    BENCH_CUDA_CHECK(
        cudaMalloc((void **)&x->seq_base_dev, (size_t)n * sizeof *bases));
    BENCH_CUDA_CHECK(cudaMemcpy(x->seq_base_dev, bases,
                                (size_t)n * sizeof *bases,
                                cudaMemcpyHostToDevice));
    free(bases);

    /* Page table: the device address of each page's pool block. */
    const uint64_t P = (uint64_t)p->pages;
    uint64_t *bp = bench_xmalloc(n * P * sizeof *bp);
    for (int i = 0; i < n; i++)
        for (uint64_t pg = 0; pg < P; pg++)
            bp[i * P + pg] = (uint64_t)(uintptr_t)(p->dev +
                                                   pool_block_offset(p, i, (int)pg));
    BENCH_CUDA_CHECK(
        cudaMalloc((void **)&x->block_ptr_dev, n * P * sizeof *bp));
    BENCH_CUDA_CHECK(cudaMemcpy(x->block_ptr_dev, bp, n * P * sizeof *bp,
                                cudaMemcpyHostToDevice));
    free(bp);

    /* counters [FKV_DEV_COUNTERS] u64, error u32, len [n] i32 */
    uint64_t off = 0;
    const uint64_t o_counters = fkvi_cuda_place(&off, FKV_DEV_COUNTERS, 8);
    const uint64_t o_error = fkvi_cuda_place(&off, 1, 4);
    const uint64_t o_len = fkvi_cuda_place(&off, (uint64_t)n, 4);
    BENCH_CUDA_CHECK(cudaMalloc((void **)&x->small, off));
    BENCH_CUDA_CHECK(cudaMemset(x->small, 0, off));
    off = 0;
    const uint64_t o_src = fkvi_cuda_place(&off, x->units, 8);
    const uint64_t o_dst = fkvi_cuda_place(&off, x->units, 8);
    const uint64_t o_count = fkvi_cuda_place(&off, (uint64_t)n * H, 4);
    BENCH_CUDA_CHECK(cudaMalloc((void **)&x->work, off));
    BENCH_CUDA_CHECK(cudaMemset(x->work, 0, off));

    memset(&x->st, 0, sizeof x->st);
    x->st.seq_base = x->seq_base_dev;
    x->st.len = (int32_t *)(x->small + o_len);
    x->st.block_ptr = x->block_ptr_dev;
    x->st.counters = (unsigned long long *)(x->small + o_counters);
    x->st.error = (unsigned int *)(x->small + o_error);
    x->st.work_src = (uint64_t *)(x->work + o_src);
    x->st.work_dst = (uint64_t *)(x->work + o_dst);
    x->st.work_count = (int32_t *)(x->work + o_count);
    x->st.max_splits = 0;
    x->st.max_seqs = n;
    x->st.gather_bulk = c->bulk_gather;
    if (c->bulk_gather) {
        int dev = 0, major = 0;
        BENCH_CUDA_CHECK(cudaGetDevice(&dev));
        BENCH_CUDA_CHECK(cudaDeviceGetAttribute(
            &major, cudaDevAttrComputeCapabilityMajor, dev));
        if (major < 9)
            bench_die("--bulk-gather needs an sm_90 device (this one is "
                      "sm_%d0)", major);
        BENCH_CUDA_CHECK(fkv_recall_init(&x->g, 1, 1));
    }
    if (c->fused_plan && !c->bulk_gather)
        bench_die("--fused-plan needs --bulk-gather");
    x->plan = c->fused_plan ? FKV_PLAN_FUSED : FKV_PLAN_PREFIX;

    memset(&x->b, 0, sizeof x->b);
    x->b.n = n;
    for (int i = 0; i < n; i++) {
        x->b.slot[i] = i;
        x->b.tokens[i] = 1;
    }

    /* Two disjoint random page sets per (sequence, KV head). */
    int32_t *pick = bench_xmalloc(P * sizeof *pick);
    for (int s = 0; s < 2; s++)
        x->set[s] = bench_xmalloc(x->units * sizeof(int32_t));
    for (int i = 0; i < n; i++)
        for (int h = 0; h < H; h++) {
            bench_rng r = {seed ^ ((uint64_t)i << 32) ^ ((uint64_t)h << 16)};
            for (uint64_t pg = 0; pg < P; pg++)
                pick[pg] = (int32_t)pg;
            for (int j = 0; j < 2 * K; j++) {
                uint64_t t =
                    (uint64_t)j + bench_rng_next(&r) % (P - (uint64_t)j);
                int32_t tmp = pick[j];
                pick[j] = pick[t];
                pick[t] = tmp;
            }
            for (int s = 0; s < 2; s++) {
                int32_t *dst = x->set[s] + ((size_t)i * H + h) * K;
                memcpy(dst, pick + (size_t)s * K, (size_t)K * sizeof *dst);
                qsort(dst, (size_t)K, sizeof *dst, cmp_i32);
            }
        }
    free(pick);

    /* Arm templates: [pending_pages H*K][pending_count H][pending_valid H]. */
    int32_t *arm = bench_xmalloc((size_t)n * x->arm_ints * sizeof *arm);
    for (int s = 0; s < 2; s++) {
        for (int i = 0; i < n; i++) {
            int32_t *a = arm + (size_t)i * x->arm_ints;
            memcpy(a, x->set[s] + (size_t)i * H * K,
                   (size_t)H * K * sizeof *a);
            for (int h = 0; h < H; h++) {
                a[(size_t)H * K + h] = K;
                a[(size_t)H * K + H + h] = 1;
            }
        }
        BENCH_CUDA_CHECK(cudaMalloc((void **)&x->arm_dev[s],
                                    (size_t)n * x->arm_ints * sizeof *arm));
        BENCH_CUDA_CHECK(cudaMemcpy(x->arm_dev[s], arm,
                                    (size_t)n * x->arm_ints * sizeof *arm,
                                    cudaMemcpyHostToDevice));
    }
    free(arm);

    /* Per-unit copy lists (same units, same order as the sets). */
    BENCH_CUDA_CHECK(
        cudaMalloc((void **)&x->unit_dst, x->units * x->unit_bytes));
    BENCH_CUDA_CHECK(cudaMemset(x->unit_dst, 0, x->units * x->unit_bytes));
    x->udst = bench_xmalloc(x->units * sizeof *x->udst);
    x->usize = bench_xmalloc(x->units * sizeof *x->usize);
    for (int s = 0; s < 2; s++)
        x->usrc[s] = bench_xmalloc(x->units * sizeof *x->usrc[s]);
    for (size_t u = 0; u < x->units; u++) {
        const int i = (int)(u / ((size_t)H * K));
        const int h = (int)(u / (size_t)K % (size_t)H);
        x->udst[u] = x->unit_dst + u * x->unit_bytes;
        x->usize[u] = x->unit_bytes;
        for (int s = 0; s < 2; s++)
            x->usrc[s][u] = p->host + pool_block_offset(p, i, x->set[s][u]) +
                            (uint64_t)h * x->unit_bytes;
    }
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
}

static void rctx_destroy(rctx *x)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUDA_CHECK(cudaFree(x->regions));
    BENCH_CUDA_CHECK(cudaFree(x->seq_base_dev));
    BENCH_CUDA_CHECK(cudaFree(x->block_ptr_dev));
    BENCH_CUDA_CHECK(cudaFree(x->small));
    BENCH_CUDA_CHECK(cudaFree(x->work));
    BENCH_CUDA_CHECK(cudaFree(x->unit_dst));
    for (int s = 0; s < 2; s++) {
        BENCH_CUDA_CHECK(cudaFree(x->arm_dev[s]));
        free(x->set[s]);
        free((void *)x->usrc[s]);
    }
    free(x->udst);
    free(x->usize);
    memset(x, 0, sizeof *x);
}

static void rctx_reset_counters(rctx *x)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUDA_CHECK(cudaMemset(
        x->st.counters, 0, FKV_DEV_COUNTERS * sizeof(unsigned long long)));
    BENCH_CUDA_CHECK(cudaMemset(x->st.error, 0, sizeof(unsigned int)));
    x->runs = 0;
}

/* One recall of all n sequences: re-arm the pending set (outside the
 * events), then plan + gather. Returns the first error (no exit: the feeder
 * thread calls it). */
static cudaError_t rctx_enqueue(rctx *x, int blocks, cudaStream_t s,
                                cudaEvent_t before, cudaEvent_t after)
{
    const size_t w = x->arm_ints * sizeof(int32_t);
    cudaError_t e = cudaMemcpy2DAsync(
        x->regions + x->g.off_pending_pages, (size_t)x->g.layer_bytes,
        x->arm_dev[x->parity], w, w, (size_t)x->n, cudaMemcpyDeviceToDevice, s);
    if (e == cudaSuccess && before)
        e = cudaEventRecord(before, s);
    if (e == cudaSuccess)
        e = fkv_launch_recall(&x->g, &x->st, &x->b, 0, FKV_RECALL_PENDING,
                              blocks, x->plan, s);
    if (e == cudaSuccess && after)
        e = cudaEventRecord(after, s);
    if (e == cudaSuccess) {
        x->parity ^= 1;
        x->runs++;
    }
    return e;
}

/* Checks the state after the last recall: every (sequence, KV head) has the
 * last set active, each page in a distinct slot whose 16 KiB equal the pool
 * unit, and the device counted exactly runs * units copies. */
static void rctx_verify(const rctx *x, const pool *p, const char *what)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    if (x->runs == 0)
        return;
    const int last = x->parity ^ 1, H = x->H, K = x->K;
    const fkv_dev_geometry *g = &x->g;
    unsigned char *meta = bench_xmalloc(g->meta_bytes);
    const size_t slot_bytes = (size_t)H * K * x->unit_bytes;
    unsigned char *slots = bench_xmalloc(slot_bytes);
    unsigned char *seen = bench_xmalloc((size_t)K);
    for (int i = 0; i < x->n; i++) {
        const unsigned char *base = x->regions + g->layer_bytes * i;
        BENCH_CUDA_CHECK(
            cudaMemcpy(meta, base, g->meta_bytes, cudaMemcpyDeviceToHost));
        BENCH_CUDA_CHECK(cudaMemcpy(slots, base + g->off_slots, slot_bytes,
                                    cudaMemcpyDeviceToHost));
        const int32_t *count = (const int32_t *)(meta + g->off_active_count);
        const int32_t *valid = (const int32_t *)(meta + g->off_pending_valid);
        for (int h = 0; h < H; h++) {
            const int32_t *pages =
                (const int32_t *)(meta + g->off_active_pages) + (size_t)h * K;
            const int32_t *slot =
                (const int32_t *)(meta + g->off_active_slot) + (size_t)h * K;
            const int32_t *slot_page =
                (const int32_t *)(meta + g->off_slot_page) + (size_t)h * K;
            const int32_t *want = x->set[last] + ((size_t)i * H + h) * K;
            if (count[h] != K || valid[h] != 0)
                bench_die("%s: seq %d KV head %d: active_count %d (want %d), "
                          "pending_valid %d (want 0)",
                          what, i, h, count[h], K, valid[h]);
            memset(seen, 0, (size_t)K);
            for (int j = 0; j < K; j++) {
                const int32_t s = slot[j];
                if (pages[j] != want[j] || s < 0 || s >= K || seen[s] ||
                    slot_page[s] != want[j])
                    bench_die(
                        "%s: seq %d KV head %d entry %d: page %d in slot %d "
                        "(want page %d in a distinct slot)",
                        what, i, h, j, pages[j], s, want[j]);
                seen[s] = 1;
                const unsigned char *src = p->host +
                                           pool_block_offset(p, i, want[j]) +
                                           (uint64_t)h * x->unit_bytes;
                if (memcmp(slots + ((size_t)h * K + s) * x->unit_bytes, src,
                           x->unit_bytes) != 0)
                    bench_die("%s: seq %d KV head %d page %d: slot %d's "
                              "bytes differ from the host pool's unit",
                              what, i, h, want[j], s);
            }
        }
    }
    unsigned long long counters[FKV_DEV_COUNTERS];
    unsigned int error = 0;
    BENCH_CUDA_CHECK(cudaMemcpy(counters, x->st.counters, sizeof counters,
                                cudaMemcpyDeviceToHost));
    BENCH_CUDA_CHECK(
        cudaMemcpy(&error, x->st.error, sizeof error, cudaMemcpyDeviceToHost));
    const unsigned long long want = (unsigned long long)x->runs * x->units;
    if (error || counters[FKV_DEV_PAGES_RECALLED] != want ||
        counters[FKV_DEV_BYTES_RECALLED] != want * x->unit_bytes)
        bench_die(
            "%s: device error bits 0x%x, %llu units / %llu bytes recalled "
            "(want 0, %llu units / %llu bytes: every recall must copy all K "
            "pages of every (sequence, KV head))",
            what, error, counters[FKV_DEV_PAGES_RECALLED],
            counters[FKV_DEV_BYTES_RECALLED], want,
            want * (unsigned long long)x->unit_bytes);
    free(meta);
    free(slots);
    free(seen);
}

/* Checks unit_dst after per-unit copies: units [0, upto) hold set `par`,
 * the rest set `par ^ 1` (when `rest` is set). */
static void units_verify(const rctx *x, int par, size_t upto, bool rest,
                         const char *what)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    const size_t n = rest ? x->units : upto;
    if (n == 0)
        return;
    unsigned char *buf = bench_xmalloc(n * x->unit_bytes);
    BENCH_CUDA_CHECK(cudaMemcpy(buf, x->unit_dst, n * x->unit_bytes,
                                cudaMemcpyDeviceToHost));
    for (size_t u = 0; u < n; u++) {
        const int s = u < upto ? par : par ^ 1;
        if (memcmp(buf + u * x->unit_bytes, x->usrc[s][u], x->unit_bytes) != 0)
            bench_die(
                "%s: unit %zu (seq %zu, KV head %zu) differs from the host "
                "pool's unit",
                what, u, u / ((size_t)x->H * x->K),
                u / (size_t)x->K % (size_t)x->H);
    }
    free(buf);
}

/* cudaMemcpyBatchAsync where the runtime has it (12.8+). */
static cudaError_t batch_copy(void **dst, const void **src, size_t *sizes,
                              size_t count, cudaStream_t s)
{
#if defined(CUDART_VERSION) && CUDART_VERSION >= 12080
    struct cudaMemcpyAttributes attr;
    memset(&attr, 0, sizeof attr);
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    size_t idx = 0;
#if CUDART_VERSION >= 13000
    return cudaMemcpyBatchAsync((void *const *)dst, (const void *const *)src,
                                sizes, count, &attr, &idx, 1, s);
#else
    size_t fail = 0;
    return cudaMemcpyBatchAsync((void **)dst, (void **)src, sizes, count,
                                &attr, &idx, 1, &fail, s);
#endif
#else
    (void)dst;
    (void)src;
    (void)sizes;
    (void)count;
    (void)s;
    return cudaErrorNotSupported;
#endif
}

/* ------------------------------------------------------------------------ */
/* (a), (b), (c)                                                            */
/* ------------------------------------------------------------------------ */

static double bench_big_copy(const config *c, cudaStream_t s)
{
    const size_t bytes = (size_t)c->big_mib << 20;
    unsigned char *h = NULL, *d = NULL, *back = bench_xmalloc(bytes);
    BENCH_CUDA_CHECK(cudaHostAlloc((void **)&h, bytes, cudaHostAllocDefault));
    BENCH_CUDA_CHECK(cudaMalloc((void **)&d, bytes));
    bench_rng seed = {0xB16C0B1ull};
    for (size_t i = 0; i < bytes / 8; i++)
        ((uint64_t *)h)[i] = bench_rng_next(&seed);
    const int reps = c->smoke ? 3 : 20, warm = 2;
    cudaEvent_t e0, e1;
    BENCH_CUDA_CHECK(cudaEventCreate(&e0));
    BENCH_CUDA_CHECK(cudaEventCreate(&e1));
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    for (int r = -warm; r < reps; r++) {
        BENCH_CUDA_CHECK(cudaEventRecord(e0, s));
        BENCH_CUDA_CHECK(
            cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s));
        BENCH_CUDA_CHECK(cudaEventRecord(e1, s));
        BENCH_CUDA_CHECK(cudaEventSynchronize(e1));
        if (r >= 0)
            ms[r] = bench_event_ms(e0, e1);
    }
    BENCH_CUDA_CHECK(cudaMemcpy(back, d, bytes, cudaMemcpyDeviceToHost));
    if (memcmp(back, h, bytes) != 0)
        bench_die("large copy: device bytes differ from the host buffer");
    const double t = bench_median(ms, (size_t)reps);
    const double gbps = (double)bytes / (t * 1e-3) / 1e9;
    row *r = add_row("h2d", "big pinned cudaMemcpyAsync", -1, -1, -1);
    r->mib = (double)bytes / (1 << 20);
    r->us = t * 1e3;
    r->gbps = gbps;
    r->pct = 100.0;
    printf("(a) one pinned cudaMemcpyAsync of %d MiB: %.1f us, %.2f GB/s "
           "(median of %d, bytes verified)\n",
           c->big_mib, t * 1e3, gbps, reps);
    BENCH_CUDA_CHECK(cudaEventDestroy(e0));
    BENCH_CUDA_CHECK(cudaEventDestroy(e1));
    BENCH_CUDA_CHECK(cudaFreeHost(h));
    BENCH_CUDA_CHECK(cudaFree(d));
    free(back);
    free(ms);
    return gbps;
}

/* (b): per-unit cudaMemcpyAsync and (where supported) one batched copy of
 * the same units. Returns whether cudaMemcpyBatchAsync works here. */
static bool bench_unit_copies(const config *c, rctx *x, cudaStream_t s,
                              double big_gbps, bool try_batch)
{
    const int reps = c->unit_reps, warm = 1;
    cudaEvent_t e0, e1;
    BENCH_CUDA_CHECK(cudaEventCreate(&e0));
    BENCH_CUDA_CHECK(cudaEventCreate(&e1));
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    const double mib = (double)(x->units * x->unit_bytes) / (1 << 20);
    int par = 0;
    for (int r = -warm; r < reps; r++, par ^= 1) {
        BENCH_CUDA_CHECK(cudaEventRecord(e0, s));
        for (size_t u = 0; u < x->units; u++)
            BENCH_CUDA_CHECK(cudaMemcpyAsync(x->udst[u], x->usrc[par][u],
                                             x->unit_bytes,
                                             cudaMemcpyHostToDevice, s));
        BENCH_CUDA_CHECK(cudaEventRecord(e1, s));
        BENCH_CUDA_CHECK(cudaEventSynchronize(e1));
        if (r >= 0)
            ms[r] = bench_event_ms(e0, e1);
    }
    units_verify(x, par ^ 1, x->units, false, "per-unit cudaMemcpyAsync");
    double t = bench_median(ms, (size_t)reps);
    row *rw = add_row(g_h2d_section, "per-unit cudaMemcpyAsync", x->n, x->K,
                      -1);
    rw->mib = mib;
    rw->us = t * 1e3;
    rw->gbps = mib * (1 << 20) / (t * 1e-3) / 1e9;
    rw->pct = 100.0 * rw->gbps / big_gbps;
    printf("(b) batch %2d K %3d: %zu x cudaMemcpyAsync(%llu B): %.1f us, "
           "%.2f GB/s (%.1f%% of (a))\n",
           x->n, x->K, x->units, (unsigned long long)x->unit_bytes,
           rw->us, rw->gbps, rw->pct);

    bool batch_ok = try_batch;
    if (try_batch) {
        for (int r = -warm; r < reps && batch_ok; r++, par ^= 1) {
            BENCH_CUDA_CHECK(cudaEventRecord(e0, s));
            cudaError_t e = batch_copy(x->udst, x->usrc[par], x->usize,
                                       x->units, s);
            if (e != cudaSuccess) {
                (void)cudaGetLastError();
                printf("(b) cudaMemcpyBatchAsync: not available here (%s); "
                       "skipped\n",
                       cudaGetErrorString(e));
                batch_ok = false;
                break;
            }
            BENCH_CUDA_CHECK(cudaEventRecord(e1, s));
            BENCH_CUDA_CHECK(cudaEventSynchronize(e1));
            if (r >= 0)
                ms[r] = bench_event_ms(e0, e1);
        }
        if (batch_ok) {
            units_verify(x, par ^ 1, x->units, false, "cudaMemcpyBatchAsync");
            t = bench_median(ms, (size_t)reps);
            rw = add_row(g_h2d_section, "cudaMemcpyBatchAsync (units)", x->n,
                         x->K, -1);
            rw->mib = mib;
            rw->us = t * 1e3;
            rw->gbps = mib * (1 << 20) / (t * 1e-3) / 1e9;
            rw->pct = 100.0 * rw->gbps / big_gbps;
            printf("(b) batch %2d K %3d: one cudaMemcpyBatchAsync of %zu "
                   "units: %.1f us, %.2f GB/s (%.1f%% of (a))\n",
                   x->n, x->K, x->units, rw->us, rw->gbps, rw->pct);
        }
    }
    BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
    BENCH_CUDA_CHECK(cudaEventDestroy(e0));
    BENCH_CUDA_CHECK(cudaEventDestroy(e1));
    free(ms);
    return batch_ok;
}

/* (c): fkv_launch_recall for each gather grid. */
static void bench_recall(const config *c, rctx *x, const pool *p,
                         cudaStream_t s, int sm_count, double big_gbps)
{
    const int reps = c->reps, warm = c->warmup;
    cudaEvent_t *e0 = bench_xmalloc((size_t)(reps + warm) * sizeof *e0);
    cudaEvent_t *e1 = bench_xmalloc((size_t)(reps + warm) * sizeof *e1);
    for (int r = 0; r < reps + warm; r++) {
        BENCH_CUDA_CHECK(cudaEventCreate(&e0[r]));
        BENCH_CUDA_CHECK(cudaEventCreate(&e1[r]));
    }
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    const double bytes = (double)x->units * (double)x->unit_bytes;
    /* --fused-plan: one launch whose blocks are the (sequence, KV head)s;
     * the gather-block list does not apply, so one row. */
    const int nvariants = x->plan == FKV_PLAN_FUSED ? 1 : c->nblocks;
    for (int bi = 0; bi < nvariants; bi++) {
        const int blocks = x->plan == FKV_PLAN_FUSED ? x->n * x->H
                           : c->blocks[bi] > 0       ? c->blocks[bi]
                                                     : sm_count;
        char what[96];
        snprintf(what, sizeof what, "recall batch %d K %d gather_blocks %d",
                 x->n, x->K, blocks);
        rctx_reset_counters(x);
        /* One checked recall before timing: from whatever the slots held
         * (empty at first) to the next set. */
        BENCH_CUDA_CHECK(rctx_enqueue(x, blocks, s, NULL, NULL));
        rctx_verify(x, p, what);
        for (int r = 0; r < reps + warm; r++)
            BENCH_CUDA_CHECK(rctx_enqueue(x, blocks, s, e0[r], e1[r]));
        BENCH_CUDA_CHECK(cudaStreamSynchronize(s));
        for (int r = 0; r < reps; r++)
            ms[r] = bench_event_ms(e0[warm + r], e1[warm + r]);
        rctx_verify(x, p, what);
        const double t = bench_median(ms, (size_t)reps);
        row *rw = add_row(g_h2d_section,
                          x->plan == FKV_PLAN_FUSED ? "recall fused plan+gather"
                          : x->st.gather_bulk       ? "recall bulk gather"
                                                    : "recall fkv_launch_recall",
                          x->n,
                          x->K, blocks);
        rw->mib = bytes / (1 << 20);
        rw->us = t * 1e3;
        rw->gbps = bytes / (t * 1e-3) / 1e9;
        rw->pct = 100.0 * rw->gbps / big_gbps;
        printf("(c) batch %2d K %3d gather_blocks %3d: %.1f us, %.2f GB/s "
               "(%.1f%% of (a)%s), verified\n",
               x->n, x->K, blocks, rw->us, rw->gbps, rw->pct,
               rw->pct >= 90.0 ? ", target met" : ", below the 90% target");
    }
    for (int r = 0; r < reps + warm; r++) {
        BENCH_CUDA_CHECK(cudaEventDestroy(e0[r]));
        BENCH_CUDA_CHECK(cudaEventDestroy(e1[r]));
    }
    free(e0);
    free(e1);
    free(ms);
}

/* ------------------------------------------------------------------------ */
/* (d) GEMMs of a Llama-3.1-8B decode step, with recall beside them          */
/* ------------------------------------------------------------------------ */

/* One pass of the GEMM stand-ins (bench/gemm_model.h); GPU time in ms
 * between events on the model's stream, which first waits for `wait` when
 * given. */
static double model_step(bench_gemm_model *m, int batch, cudaEvent_t wait,
                         cudaEvent_t g0, cudaEvent_t g1)
{
    if (wait)
        BENCH_CUDA_CHECK(cudaStreamWaitEvent(m->s, wait, 0));
    bench_gemm_enqueue(m, batch, g0, g1);
    BENCH_CUDA_CHECK(cudaEventSynchronize(g1));
    return bench_event_ms(g0, g1);
}

/* A host thread that keeps one recall variant running on a stream, a
 * bounded number of chunks ahead, recording an event after each chunk. */
typedef enum feed_kind { FEED_RECALL, FEED_MEMCPY, FEED_BATCH } feed_kind;

typedef struct feeder {
    feed_kind kind;
    rctx *x;
    int blocks;            /* FEED_RECALL */
    size_t chunk_units;    /* FEED_MEMCPY, FEED_BATCH */
    size_t cursor;         /* next unit; wraps with par ^= 1 */
    int par;
    int64_t cycles;
    double chunk_bytes;
    cudaStream_t s;
    int device;
    cudaEvent_t begin;
    cudaEvent_t *ev;
    int nev, depth, limit; /* limit: stop after that many chunks */
    atomic_int state;      /* 0 starting, 1 first chunk recorded, 2 failed */
    atomic_int stop;
    int issued;
    char err[256];
} feeder;

static cudaError_t feed_chunk(feeder *f)
{
    rctx *x = f->x;
    if (f->kind == FEED_RECALL)
        return rctx_enqueue(x, f->blocks, f->s, NULL, NULL);
    if (f->kind == FEED_BATCH) {
        cudaError_t e = batch_copy(x->udst + f->cursor,
                                   x->usrc[f->par] + f->cursor,
                                   x->usize + f->cursor, f->chunk_units, f->s);
        if (e != cudaSuccess)
            return e;
    } else {
        for (size_t u = 0; u < f->chunk_units; u++) {
            cudaError_t e = cudaMemcpyAsync(x->udst[f->cursor + u],
                                            x->usrc[f->par][f->cursor + u],
                                            x->unit_bytes,
                                            cudaMemcpyHostToDevice, f->s);
            if (e != cudaSuccess)
                return e;
        }
    }
    f->cursor += f->chunk_units;
    if (f->cursor == x->units) {
        f->cursor = 0;
        f->par ^= 1;
        f->cycles++;
    }
    return cudaSuccess;
}

static void *feeder_main(void *arg)
{
    feeder *f = arg;
    cudaError_t e = cudaSetDevice(f->device);
    const char *what = "cudaSetDevice";
    if (e == cudaSuccess) {
        e = cudaEventRecord(f->begin, f->s);
        what = "cudaEventRecord";
    }
    for (int i = 0; e == cudaSuccess && i < f->limit; i++) {
        if (i > 0 && atomic_load(&f->stop))
            break;
        if (i >= f->depth) {
            e = cudaEventSynchronize(f->ev[i - f->depth]);
            what = "cudaEventSynchronize";
            if (e != cudaSuccess)
                break;
        }
        e = feed_chunk(f);
        what = f->kind == FEED_RECALL  ? "fkv_launch_recall"
               : f->kind == FEED_BATCH ? "cudaMemcpyBatchAsync"
                                       : "cudaMemcpyAsync";
        if (e == cudaSuccess) {
            e = cudaEventRecord(f->ev[i], f->s);
            what = "cudaEventRecord";
        }
        if (e == cudaSuccess) {
            f->issued = i + 1;
            if (i == 0)
                atomic_store(&f->state, 1);
        }
    }
    if (e != cudaSuccess) {
        snprintf(f->err, sizeof f->err, "feeder: %s: %s (%s)", what,
                 cudaGetErrorString(e), cudaGetErrorName(e));
        atomic_store(&f->state, 2);
    }
    return NULL;
}

static void feeder_init(feeder *f, feed_kind kind, rctx *x, int blocks,
                        cudaStream_t s, int device, int nev)
{
    memset(f, 0, sizeof *f);
    atomic_init(&f->state, 0);
    atomic_init(&f->stop, 0);
    f->kind = kind;
    f->x = x;
    f->blocks = blocks;
    f->s = s;
    f->device = device;
    f->nev = nev;
    f->depth = 8;
    /* Copies: chunks of 64 units (1 MiB), so that a few milliseconds of
     * GEMMs hold several event intervals. */
    f->chunk_units = x->units;
    if (kind != FEED_RECALL && x->units % 64 == 0)
        f->chunk_units = 64;
    f->chunk_bytes = kind == FEED_RECALL
                         ? (double)x->units * (double)x->unit_bytes
                         : (double)f->chunk_units * (double)x->unit_bytes;
    BENCH_CUDA_CHECK(cudaEventCreate(&f->begin));
    f->ev = bench_xmalloc((size_t)nev * sizeof *f->ev);
    for (int i = 0; i < nev; i++)
        BENCH_CUDA_CHECK(cudaEventCreate(&f->ev[i]));
}

static void feeder_free(feeder *f)
{
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
    BENCH_CUDA_CHECK(cudaEventDestroy(f->begin));
    for (int i = 0; i < f->nev; i++)
        BENCH_CUDA_CHECK(cudaEventDestroy(f->ev[i]));
    free(f->ev);
}

static void feeder_start(feeder *f, pthread_t *t, int limit)
{
    atomic_store(&f->state, 0);
    atomic_store(&f->stop, 0);
    f->issued = 0;
    f->limit = limit < f->nev ? limit : f->nev;
    int rc = pthread_create(t, NULL, feeder_main, f);
    if (rc != 0)
        bench_die("pthread_create failed (%d)", rc);
    while (atomic_load(&f->state) == 0)
        sleep_us(20);
    if (atomic_load(&f->state) == 2) {
        pthread_join(*t, NULL);
        bench_die("%s", f->err);
    }
}

static void feeder_join(feeder *f, pthread_t t)
{
    atomic_store(&f->stop, 1);
    pthread_join(t, NULL);
    if (atomic_load(&f->state) == 2)
        bench_die("%s", f->err);
    BENCH_CUDA_CHECK(cudaStreamSynchronize(f->s));
}

/* Bandwidth of the chunks that completed in [t0, t1] ms after f->begin
 * (NAN with fewer than two completions there). */
static double feeder_gbps(const feeder *f, double t0, double t1)
{
    int first = -1, last = -1;
    double tf = 0.0, tl = 0.0;
    for (int i = 0; i < f->issued; i++) {
        const double t = bench_event_ms(f->begin, f->ev[i]);
        if (t < t0 || t > t1)
            continue;
        if (first < 0) {
            first = i;
            tf = t;
        }
        last = i;
        tl = t;
    }
    if (first < 0 || last <= first || tl <= tf)
        return NAN;
    return (double)(last - first) * f->chunk_bytes / ((tl - tf) * 1e-3) / 1e9;
}

static void feeder_verify(feeder *f, const pool *p, const char *what)
{
    if (f->kind == FEED_RECALL) {
        rctx_verify(f->x, p, what);
    } else {
        /* Units before the cursor hold the current set, the others the
         * previous one (or nothing yet, before the first full cycle). */
        units_verify(f->x, f->par, f->cursor, f->cycles > 0, what);
    }
}

static void bench_gemm(const config *c, const pool *p, int device,
                       int sm_count, bool batch_ok)
{
    int least = 0, greatest = 0;
    BENCH_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    cudaStream_t gs, rs;
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithPriority(&gs, cudaStreamNonBlocking, greatest));
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithPriority(&rs, cudaStreamNonBlocking, least));
    int max_batch = 1;
    for (int i = 0; i < c->ngemm_batches; i++)
        if (c->gemm_batches[i] > max_batch)
            max_batch = c->gemm_batches[i];
    bench_gemm_model m;
    bench_gemm_create(&m, c->gemm_layers, max_batch, gs);
    printf("(d) %d layers of Llama-3.1-8B GEMMs (bf16 cuBLAS, %.2f GB of "
           "weights) on a stream of priority %d; recall beside them on a "
           "stream of priority %d (lower)\n",
           c->gemm_layers, (double)m.layer_bytes * c->gemm_layers / 1e9,
           greatest, least);
    cudaEvent_t g0, g1;
    BENCH_CUDA_CHECK(cudaEventCreate(&g0));
    BENCH_CUDA_CHECK(cudaEventCreate(&g1));
    const int reps = c->gemm_reps;
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    double *bw = bench_xmalloc((size_t)reps * sizeof *bw);

    for (int bi = 0; bi < c->ngemm_batches; bi++) {
        const int batch = c->gemm_batches[bi];
        for (int r = 0; r < 3; r++)
            (void)model_step(&m, batch, NULL, g0, g1);
        for (int r = 0; r < reps; r++)
            ms[r] = model_step(&m, batch, NULL, g0, g1);
        const double alone = bench_median(ms, (size_t)reps);
        row *rw = add_row("gemm", "GEMMs alone", batch, -1, -1);
        rw->gemm_ms = alone;
        rw->alone_ms = alone;
        rw->slow_pct = 0.0;
        printf("(d) batch %d: GEMMs alone %.3f ms\n", batch, alone);

        rctx x;
        rctx_create(&x, c, p, batch, c->conc_pages, 0xC0C0ull + (uint64_t)batch);
        const int nvar = c->nconc_blocks + 1 + (batch_ok ? 1 : 0);
        for (int vi = 0; vi < nvar; vi++) {
            feed_kind kind = vi < c->nconc_blocks        ? FEED_RECALL
                             : vi == c->nconc_blocks     ? FEED_MEMCPY
                                                         : FEED_BATCH;
            int blocks = 0;
            char name[48];
            if (kind == FEED_RECALL) {
                blocks = c->conc_blocks[vi] > 0 ? c->conc_blocks[vi] : sm_count;
                snprintf(name, sizeof name, "recall %s %d",
                         c->fused_plan    ? "fused, ignored blocks"
                         : c->bulk_gather ? "bulk blocks"
                                          : "gather_blocks",
                         blocks);
            } else {
                snprintf(name, sizeof name, "%s",
                         kind == FEED_MEMCPY ? "per-unit cudaMemcpyAsync"
                                             : "cudaMemcpyBatchAsync");
            }
            feeder f;
            feeder_init(&f, kind, &x, blocks, rs, device, 4096);
            if (kind == FEED_RECALL)
                rctx_reset_counters(&x);
            pthread_t t;
            /* The variant alone: 48 chunks, bandwidth over all but the
             * first. */
            feeder_start(&f, &t, 48);
            feeder_join(&f, t);
            const double alone_bw = feeder_gbps(&f, 0.0, INFINITY);
            /* Beside the GEMMs. */
            for (int r = 0; r < reps; r++) {
                feeder_start(&f, &t, f.nev);
                ms[r] = model_step(&m, batch, f.ev[0], g0, g1);
                feeder_join(&f, t);
                const double t0 = bench_event_ms(f.begin, g0);
                const double t1 = bench_event_ms(f.begin, g1);
                bw[r] = feeder_gbps(&f, t0, t1);
                if (f.issued == f.nev &&
                    bench_event_ms(f.begin, f.ev[f.nev - 1]) < t1)
                    printf("    (the feeder ran out of events before the "
                           "GEMMs ended: bandwidth covers part of the "
                           "window)\n");
            }
            char what[96];
            snprintf(what, sizeof what, "beside GEMMs, batch %d, %s", batch,
                     name);
            feeder_verify(&f, p, what);
            feeder_free(&f);
            const double with = bench_median(ms, (size_t)reps);
            int nbw = 0;
            for (int r = 0; r < reps; r++)
                if (!isnan(bw[r]))
                    bw[nbw++] = bw[r];
            rw = add_row("gemm", name, batch,
                         kind == FEED_RECALL ? x.K : -1,
                         kind == FEED_RECALL ? blocks : -1);
            rw->gemm_ms = with;
            rw->alone_ms = alone;
            rw->slow_pct = 100.0 * (with / alone - 1.0);
            rw->rec_gbps = nbw ? bench_median(bw, (size_t)nbw) : NAN;
            rw->rec_alone_gbps = alone_bw;
            printf("(d) batch %d, %s beside: GEMMs %.3f ms (%+.1f%%), recall "
                   "%.2f GB/s meanwhile (%.2f GB/s alone), verified\n",
                   batch, name, with, rw->slow_pct, rw->rec_gbps, alone_bw);
        }
        rctx_destroy(&x);
    }
    free(ms);
    free(bw);
    BENCH_CUDA_CHECK(cudaEventDestroy(g0));
    BENCH_CUDA_CHECK(cudaEventDestroy(g1));
    bench_gemm_destroy(&m);
    BENCH_CUDA_CHECK(cudaStreamDestroy(gs));
    BENCH_CUDA_CHECK(cudaStreamDestroy(rs));
}

/* ------------------------------------------------------------------------ */
/* Output                                                                   */
/* ------------------------------------------------------------------------ */

static void fmt_int(char *buf, size_t n, int v)
{
    if (v < 0)
        snprintf(buf, n, "-");
    else
        snprintf(buf, n, "%d", v);
}

static void print_table(const char *device_name, double big_gbps,
                        int kv_heads)
{
    printf("\n== recall: host -> device, %s (one large pinned copy: %.2f "
           "GB/s; target: recall >= 90%%) ==\n",
           device_name, big_gbps);
    printf("%-30s %5s %6s %6s %8s %10s %8s %7s\n", "variant", "batch",
           "K/head", "blocks", "MiB", "time_us", "GB/s", "%big");
    for (int i = 0; i < g_nrows; i++) {
        const row *r = &g_rows[i];
        if (strcmp(r->section, "h2d"))
            continue;
        char b[16], k[16], g[16], mib[24], us[24], gb[24], pct[24];
        fmt_int(b, sizeof b, r->batch);
        fmt_int(k, sizeof k, r->pages);
        fmt_int(g, sizeof g, r->blocks);
        bench_fmt(mib, sizeof mib, "%.1f", r->mib);
        bench_fmt(us, sizeof us, "%.1f", r->us);
        bench_fmt(gb, sizeof gb, "%.2f", r->gbps);
        bench_fmt(pct, sizeof pct, "%.1f", r->pct);
        printf("%-30s %5s %6s %6s %8s %10s %8s %7s\n", r->variant, b, k, g,
               mib, us, gb, pct);
    }
    bool small = false;
    for (int i = 0; i < g_nrows; i++)
        small = small || !strcmp(g_rows[i].section, "small");
    if (small) {
        printf("\n== the small calls of a decode step: one sequence, a few "
               "units (launch and per-call cost) ==\n");
        printf("%-30s %6s %6s %6s %10s %9s %8s %7s\n", "variant", "units",
               "K/head", "blocks", "time_us", "us/unit", "GB/s", "%big");
        for (int i = 0; i < g_nrows; i++) {
            const row *r = &g_rows[i];
            if (strcmp(r->section, "small"))
                continue;
            const int units = r->batch * kv_heads * r->pages;
            char u[16], k[16], g[16], us[24], per[24], gb[24], pct[24];
            fmt_int(u, sizeof u, units);
            fmt_int(k, sizeof k, r->pages);
            fmt_int(g, sizeof g, r->blocks);
            bench_fmt(us, sizeof us, "%.1f", r->us);
            bench_fmt(per, sizeof per, "%.2f", r->us / units);
            bench_fmt(gb, sizeof gb, "%.2f", r->gbps);
            bench_fmt(pct, sizeof pct, "%.1f", r->pct);
            printf("%-30s %6s %6s %6s %10s %9s %8s %7s\n", r->variant, u, k,
                   g, us, per, gb, pct);
        }
    }
    bool any = false;
    for (int i = 0; i < g_nrows; i++)
        any = any || !strcmp(g_rows[i].section, "gemm");
    if (!any)
        return;
    printf("\n== recall beside the GEMMs of a Llama-3.1-8B decode step "
           "(continuous recall on a lower-priority stream) ==\n");
    printf("%-30s %5s %9s %9s %9s %13s %11s\n", "variant", "batch", "gemm_ms",
           "alone_ms", "slowdown%", "recall_GB/s*", "alone_GB/s");
    for (int i = 0; i < g_nrows; i++) {
        const row *r = &g_rows[i];
        if (strcmp(r->section, "gemm"))
            continue;
        char b[16], gm[24], am[24], sl[24], rb[24], ab[24];
        fmt_int(b, sizeof b, r->batch);
        bench_fmt(gm, sizeof gm, "%.3f", r->gemm_ms);
        bench_fmt(am, sizeof am, "%.3f", r->alone_ms);
        bench_fmt(sl, sizeof sl, "%.1f", r->slow_pct);
        bench_fmt(rb, sizeof rb, "%.2f", r->rec_gbps);
        bench_fmt(ab, sizeof ab, "%.2f", r->rec_alone_gbps);
        printf("%-30s %5s %9s %9s %9s %13s %11s\n", r->variant, b, gm, am, sl,
               rb, ab);
    }
    printf("* recall bandwidth achieved while the GEMMs ran\n");
}

static void csv_num(FILE *f, double v)
{
    if (!isnan(v))
        fprintf(f, "%.4f", v);
}

static void csv_int(FILE *f, int v)
{
    if (v >= 0)
        fprintf(f, "%d", v);
}

static void write_csv(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        bench_die("cannot open %s for writing", path);
    fprintf(f, "section,variant,batch,pages_per_head,gather_blocks,mib,"
               "time_us,gbps,pct_of_big_copy,gemm_ms,gemm_alone_ms,"
               "slowdown_pct,recall_gbps_meanwhile,recall_gbps_alone\n");
    for (int i = 0; i < g_nrows; i++) {
        const row *r = &g_rows[i];
        fprintf(f, "%s,%s,", r->section, r->variant);
        csv_int(f, r->batch);
        fputc(',', f);
        csv_int(f, r->pages);
        fputc(',', f);
        csv_int(f, r->blocks);
        const double v[] = {r->mib,     r->us,       r->gbps,
                            r->pct,     r->gemm_ms,  r->alone_ms,
                            r->slow_pct, r->rec_gbps, r->rec_alone_gbps};
        for (size_t j = 0; j < sizeof v / sizeof v[0]; j++) {
            fputc(',', f);
            csv_num(f, v[j]);
        }
        fputc('\n', f);
    }
    if (fclose(f) != 0)
        bench_die("writing %s failed", path);
    printf("wrote %s (%d rows)\n", path, g_nrows);
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    bench_set_die_prefix("recall: FAILED: ");
    config c;
    if (parse_args(argc, argv, &c) != 0)
        return 2;
    int rc;
    if (bench_skip_without_cuda("recall", c.device, c.smoke, &rc))
        return rc;
    const double t_start = bench_now_s();
    bench_device dev;
    bench_device_open(c.device, &dev);
    const int sm_count = dev.sms;
    const uint64_t unit = 2ull * c.page * c.head_dim * 2;
    printf("recall: %s, %d SMs, libfreekv %s%s\n", dev.name, sm_count,
           fkv_version_string(), c.smoke ? " (smoke)" : "");
    printf("method: direct, through kernels/kernels.h: each sequence's "
           "device region laid out as lib/backend_cuda.c does for a FREEKV "
           "layer; fkv_launch_recall(FKV_RECALL_PENDING) = plan + gather; "
           "units of %llu B (K and V of %d tokens x %d dims, bf16), %d KV "
           "heads; pool pages per sequence %d (random block order)\n",
           (unsigned long long)unit, c.page, c.head_dim, c.kv_heads,
           c.pool_pages);

    cudaStream_t s;
    BENCH_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));

    int max_batch = 1;
    for (int i = 0; i < c.nbatches; i++)
        if (c.batches[i] > max_batch)
            max_batch = c.batches[i];
    if (c.gemm)
        for (int i = 0; i < c.ngemm_batches; i++)
            if (c.gemm_batches[i] > max_batch)
                max_batch = c.gemm_batches[i];
    pool p;
    pool_create(&p, max_batch, c.pool_pages, c.kv_heads, unit,
                c.host_register);
    printf("host pool: %.1f MiB pinned mapped by %s (%d sequences x %d "
           "pages x %d KV heads)\n",
           (double)p.bytes / (1 << 20),
           c.host_register ? "cudaHostRegister" : "cudaHostAlloc", p.seqs,
           p.pages, c.kv_heads);

    const double big = bench_big_copy(&c, s);
    bool batch_ok = true;
    for (int bi = 0; bi < c.nbatches; bi++)
        for (int pi = 0; pi < c.npages; pi++) {
            rctx x;
            rctx_create(&x, &c, &p, c.batches[bi], c.pages[pi],
                        0xABCD00ull + (uint64_t)(bi * 64 + pi));
            batch_ok = bench_unit_copies(&c, &x, s, big, batch_ok);
            bench_recall(&c, &x, &p, s, sm_count, big);
            rctx_destroy(&x);
        }
    /* (c'): the small calls, one sequence. */
    g_h2d_section = "small";
    for (int i = 0; i < c.nsmall_units; i++) {
        rctx x;
        const int K = c.small_units[i] / c.kv_heads;
        printf("(c') %d units in all: one sequence, K %d per KV head\n",
               c.small_units[i], K);
        rctx_create(&x, &c, &p, 1, K, 0x5A11ull + (uint64_t)i);
        batch_ok = bench_unit_copies(&c, &x, s, big, batch_ok);
        bench_recall(&c, &x, &p, s, sm_count, big);
        rctx_destroy(&x);
    }
    g_h2d_section = "h2d";
    if (c.gemm)
        bench_gemm(&c, &p, c.device, sm_count, batch_ok);

    print_table(dev.name, big, c.kv_heads);
    if (c.csv)
        write_csv(c.csv);
    BENCH_CUDA_CHECK(cudaStreamDestroy(s));
    pool_destroy(&p);
    free(g_rows);
    printf("recall: all copies verified; %.1f s\n", bench_now_s() - t_start);
    return 0;
}

#endif /* FKV_WITH_CUDA */
