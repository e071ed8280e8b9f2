/*
 * cuda: cases that only make sense on a GPU. main.c adds this suite to the
 * "gpu:" run only (CK_NOFORK); every case creates its caches with explicit
 * backends and handles device memory itself (cudaMalloc, streams), so it does
 * not depend on g_test_backend.
 *
 *  cuda_vs_cpu_agreement     the same inputs to a CPU and a CUDA cache, long
 *                            contexts (4K-32K), every policy: attend outputs
 *                            within the dtype tolerance, selected pages
 *                            identical where the top-K is well separated,
 *                            equal correction counters.
 *  cuda_graph_capture        one decode step of every layer captured in a
 *                            CUDA graph and replayed; an identical cache runs
 *                            the same steps eagerly: same outputs, lengths
 *                            (after fkv_sync), selections and counters
 *                            (four policies, FREEKV under the BOUNDED
 *                            criterion, dense layers in FREEKV and SYNC).
 *  cuda_device_errors        CUDA errors come back as FKV_ERR_DEVICE with
 *                            CUDA's message; host pointers are
 *                            FKV_ERR_INVALID_ARGUMENT; the cache stays
 *                            usable and unchanged (compared with a twin).
 *  cuda_long_context_memory  device_bytes does not grow from 8K to 32K
 *                            tokens; host_bytes does.
 *  cuda_slot_reuse           sequences closed and reopened with the
 *                            previous ones' work in flight (the slots'
 *                            device regions are reused): byte-identical to
 *                            a twin that drained first; no new device
 *                            memory at reopen.
 *  cuda_pointer_checks       tensors are checked once per allocation
 *                            (none on a repeated step or for rows inside
 *                            one; again after fkv_sync).
 *  cuda_fused_combine        with FKV_CUDA_EXPERIMENTAL=1 only ("skipped"
 *                            otherwise): the fused split+combine attention
 *                            against the two-launch path (a cache created
 *                            with the switch at 0), eager and in 3 graph
 *                            replays (the ticket counters reset), bf16,
 *                            f16, f32, head_dim 64 and 128, batch 1-8,
 *                            splits of whole and of parts of pages.
 *  cuda_launch_cache         eager attends and recalls through the
 *                            launch cache (on by default: both caches
 *                            are made with FKV_CUDA_EXPERIMENTAL at 0)
 *                            (repeated calls as graph launches, batches
 *                            that change) against a twin with the cache
 *                            off: byte-identical outputs and state, five
 *                            policies, BOUNDED, a dense layer, and an
 *                            attend of 70 sequences that spills.
 *  cuda_recall_plan          (test_recall_plan.c) the recall plan's
 *                            prefix-sum slot assignment and the gather
 *                            against the rule, from random slot states.
 *
 * TST_CUDA_PEER (default FKV_BACKEND_CUDA) is the backend the agreement case
 * holds against the CPU; a dry run of that case's logic can build this file
 * with it set to FKV_BACKEND_CPU.
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv */
#include "tests.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef FKV_WITH_CUDA
#include <cuda_runtime_api.h>

#include "internal.h" /* the launch cache's test hooks (libfreekv.a) */
#endif

#ifndef TST_CUDA_PEER
#define TST_CUDA_PEER FKV_BACKEND_CUDA
#endif

#define CU_PAGE 32
#define CU_SINK 64
#define CU_WINDOW 128
#define CU_STEPS 4       /* decode steps of the agreement case */
#define CU_REPLAYS 5     /* graph replays */
#define CU_MAX_BATCH 72

/* Tolerances of CUDA against CPU outputs (the GPU computes in float). */
static double cu_tol(fkv_dtype dt)
{
    switch (dt) {
    case FKV_DTYPE_F16:
        return 3e-3;
    case FKV_DTYPE_BF16:
        return 2e-2;
    default:
        return 1e-4;
    }
}

static const char *cu_policy_name(fkv_policy p)
{
    switch (p) {
    case FKV_POLICY_FREEKV:
        return "FREEKV";
    case FKV_POLICY_SYNC:
        return "SYNC";
    case FKV_POLICY_RESIDENT:
        return "RESIDENT";
    default:
        return "DENSE";
    }
}

static const char *cu_dtype_name(fkv_dtype dt)
{
    return dt == FKV_DTYPE_F32 ? "f32" : dt == FKV_DTYPE_F16 ? "f16" : "bf16";
}

static void *cu_xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    ck_assert_msg(p != NULL, "malloc(%zu) failed", bytes);
    return p;
}

static void *cu_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    ck_assert_msg(p != NULL, "calloc(%zu, %zu) failed", n, size);
    return p;
}

static void cu_expect_ok_at(fkv_cache *c, fkv_status st, const char *what,
                            const char *file, int line)
{
    if (st != FKV_OK) {
        char buf[768];
        buf[0] = '\0';
        fkv_last_error(c, buf, sizeof buf);
        ck_abort_msg("%s:%d: %s returned %d (%s): %s", file, line, what,
                     (int)st, fkv_status_string(st), buf);
    }
}
#define CU_OK(c, call) cu_expect_ok_at((c), (call), #call, __FILE__, __LINE__)

static fkv_cache *cu_create(const fkv_options *o)
{
    fkv_cache *c = NULL;
    fkv_status st = fkv_create(o, &c);
    if (st != FKV_OK) {
        char buf[768];
        buf[0] = '\0';
        fkv_last_error(NULL, buf, sizeof buf);
        ck_abort_msg("fkv_create (%s backend, %s) returned %d (%s): %s",
                     o->backend == FKV_BACKEND_CPU ? "CPU" : "CUDA",
                     cu_policy_name(o->policy), (int)st,
                     fkv_status_string(st), buf);
    }
    return c;
}

/* The options of these cases: page 32, sink 64, window 128. */
static void cu_options(fkv_options *o, fkv_backend be, fkv_policy policy,
                       fkv_dtype dt, int layers, int qh, int kvh, int d,
                       int budget, int max_seqs, int64_t max_tokens)
{
    memset(o, 0, sizeof *o);
    ck_assert(fkv_options_init(o, sizeof *o) == FKV_OK);
    o->backend = be;
    o->device = 0;
    o->num_layers = layers;
    o->num_q_heads = qh;
    o->num_kv_heads = kvh;
    o->head_dim = d;
    o->dtype = dt;
    o->page_tokens = CU_PAGE;
    o->sink_tokens = CU_SINK;
    o->window_tokens = CU_WINDOW;
    o->budget_tokens = budget;
    o->correction_threshold = 0.8f;
    o->policy = policy;
    o->group_score = FKV_GROUP_MEAN_SOFTMAX;
    o->max_sequences = max_seqs;
    o->max_tokens_per_sequence = max_tokens;
}

/* ---------------------------------------------------------------------- */
/* Random values. K and V of long contexts are many (tens of millions):   */
/* an Irwin-Hall approximation of N(0, 1) from one splitmix64 draw.       */
/* ---------------------------------------------------------------------- */

static uint64_t cu_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double cu_normal(uint64_t *s)
{
    uint64_t x = cu_next(s);
    double u = (double)(x & 0xffff) + (double)((x >> 16) & 0xffff) +
               (double)((x >> 32) & 0xffff) + (double)(x >> 48);
    /* sum of 4 U(0,1): mean 2, variance 1/3 */
    return (u / 65535.0 - 2.0) * 1.7320508075688772;
}

/* n values ~N(0,1), each exactly representable in dt. */
static void cu_fill(uint64_t *s, fkv_dtype dt, float *dst, size_t n)
{
    size_t i;
    for (i = 0; i < n; ++i)
        dst[i] = ref_round(cu_normal(s), (int)dt);
}

/* q_out = q_in + noise * N(0,1), rounded to dt. */
static void cu_perturb(ref_rng *r, fkv_dtype dt, const float *q_in,
                       float *q_out, size_t n, double noise)
{
    size_t i;
    for (i = 0; i < n; ++i)
        q_out[i] = ref_round((double)q_in[i] + noise * ref_rng_normal(r),
                             (int)dt);
}

static const double k_noise[4] = {0.15, 0.5, 1.0, 3.0};

/* ---------------------------------------------------------------------- */
/* Tensors in a backend's memory space.                                   */
/* ---------------------------------------------------------------------- */

#ifdef FKV_WITH_CUDA
#define CK_CUDA(call)                                                        \
    do {                                                                     \
        cudaError_t ck_e_ = (call);                                          \
        ck_assert_msg(ck_e_ == cudaSuccess, "%s:%d: %s: %s (%s)", __FILE__, \
                      __LINE__, #call, cudaGetErrorString(ck_e_),            \
                      cudaGetErrorName(ck_e_));                              \
    } while (0)
#endif

static void *cu_buf_alloc(fkv_backend be, size_t bytes)
{
#ifdef FKV_WITH_CUDA
    if (be == FKV_BACKEND_CUDA) {
        void *p = NULL;
        CK_CUDA(cudaMalloc(&p, bytes ? bytes : 16));
        return p;
    }
#endif
    (void)be;
    return cu_xmalloc(bytes);
}

static void cu_buf_free(fkv_backend be, void *p)
{
#ifdef FKV_WITH_CUDA
    if (be == FKV_BACKEND_CUDA) {
        CK_CUDA(cudaDeviceSynchronize());
        CK_CUDA(cudaFree(p));
        return;
    }
#endif
    (void)be;
    free(p);
}

/* Synchronous copies on the legacy default stream, which the agreement
 * case's CUDA cache uses: they are ordered with its kernels. */
static void cu_buf_put(fkv_backend be, void *dst, const void *src,
                       size_t bytes)
{
#ifdef FKV_WITH_CUDA
    if (be == FKV_BACKEND_CUDA) {
        CK_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
        CK_CUDA(cudaDeviceSynchronize());
        return;
    }
#endif
    (void)be;
    memcpy(dst, src, bytes);
}

static void cu_buf_get(fkv_backend be, void *dst, const void *src,
                       size_t bytes)
{
#ifdef FKV_WITH_CUDA
    if (be == FKV_BACKEND_CUDA) {
        CK_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
        return;
    }
#endif
    (void)be;
    memcpy(dst, src, bytes);
}

/* ====================================================================== */
/* 1. cuda_vs_cpu_agreement                                               */
/* ====================================================================== */

typedef struct agree_cfg {
    fkv_policy policy;
    fkv_dtype dt;
    int head_dim, q_heads, kv_heads, layers;
    int budget, ctx, batch;
    fkv_group_score mode;
} agree_cfg;

/* Every value at least once: the four policies; bf16 (f16, f32 once);
 * head_dim 128 (64, 256 once); group 4 (5 and 16 once); budget 1024 and
 * 2048; contexts 4K, 16K, 32K; batches 1, 4, 8 (32K x 8 for FREEKV). The
 * last three reach the CUDA selection's longer paths: over 1024 candidates
 * (each pass of select_pages takes several rounds: 64K, and group 16 at
 * 96K, four heads a pass over the softmax's statistics), and 384K (12288
 * pages), whose keys do not fit in the selection block's shared memory and
 * are read back from the aggregate. */
static const agree_cfg k_agree[] = {
    {FKV_POLICY_FREEKV, FKV_DTYPE_BF16, 128, 8, 2, 1, 2048, 32768, 8,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_FREEKV, FKV_DTYPE_BF16, 128, 16, 4, 2, 1024, 4096, 4,
     FKV_GROUP_MEAN_SCORE},
    {FKV_POLICY_FREEKV, FKV_DTYPE_F16, 64, 10, 2, 2, 1024, 16384, 4,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_FREEKV, FKV_DTYPE_BF16, 128, 8, 2, 2, 2048, 16384, 1,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_SYNC, FKV_DTYPE_BF16, 128, 8, 2, 2, 2048, 16384, 4,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_SYNC, FKV_DTYPE_F32, 256, 8, 2, 1, 1024, 4096, 1,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_RESIDENT, FKV_DTYPE_BF16, 128, 8, 2, 2, 1024, 16384, 1,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_RESIDENT, FKV_DTYPE_BF16, 128, 8, 2, 1, 2048, 32768, 4,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_DENSE, FKV_DTYPE_BF16, 128, 8, 2, 1, 2048, 4096, 8,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_DENSE, FKV_DTYPE_BF16, 128, 8, 2, 1, 1024, 32768, 1,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_RESIDENT, FKV_DTYPE_BF16, 128, 8, 2, 1, 2048, 65536, 2,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_SYNC, FKV_DTYPE_BF16, 64, 16, 1, 1, 1024, 98304, 1,
     FKV_GROUP_MEAN_SOFTMAX},
    {FKV_POLICY_FREEKV, FKV_DTYPE_BF16, 128, 8, 2, 1, 2048, 393216, 1,
     FKV_GROUP_MEAN_SOFTMAX},
};
#define AGREE_CONFIGS ((int)(sizeof k_agree / sizeof k_agree[0]))

typedef struct agree {
    agree_cfg cfg;
    int idx;
    fkv_backend peer;
    fkv_cache *cpu, *dut; /* the CPU reference and the cache under test */
    fkv_seq_id cpu_id[CU_MAX_BATCH], dut_id[CU_MAX_BATCH];
    int B, L, H, QH, D, G, K;
    int max_pages;
    size_t esize;
    ref_layout lay;
    double scale;
    int64_t *len;      /* [L][B] tokens appended */
    double *smx, *smn; /* [L][B][H][max_pages][D] page summaries (K max/min) */
    uint64_t kv_rng;
    ref_rng q_rng;
} agree;

static size_t agree_sidx(const agree *a, int l, int i, int g, int page)
{
    return ((((size_t)l * a->B + i) * a->H + g) * (size_t)a->max_pages +
            (size_t)page) * (size_t)a->D;
}

/* The caller's own page summaries (design section 3) of the keys rows
 * [n][H][D] appended to sequence i at layer l. */
static void agree_track(agree *a, int l, int i, const float *rows, int n)
{
    int t, g, d;
    int64_t *len = &a->len[(size_t)l * a->B + i];
    for (t = 0; t < n; ++t) {
        int64_t pos = *len + t;
        int page = (int)(pos / a->lay.P), off = (int)(pos % a->lay.P);
        for (g = 0; g < a->H; ++g) {
            const float *row = rows + ((size_t)t * a->H + g) * a->D;
            double *mx = a->smx + agree_sidx(a, l, i, g, page);
            double *mn = a->smn + agree_sidx(a, l, i, g, page);
            for (d = 0; d < a->D; ++d) {
                double v = row[d];
                if (off == 0 || v > mx[d])
                    mx[d] = v;
                if (off == 0 || v < mn[d])
                    mn[d] = v;
            }
        }
    }
    *len += n;
}

/* Appends ntok[i] (NULL: 1) random tokens to every sequence at layer l on
 * both caches. */
static void agree_append(agree *a, int l, const int32_t *ntok)
{
    size_t row = (size_t)a->H * a->D, total = 0, off = 0;
    float *f;
    unsigned char *hk, *hv;
    void *dk, *dv;
    fkv_batch bc = {a->B, 0, a->cpu_id, ntok};
    fkv_batch bd = {a->B, 0, a->dut_id, ntok};
    int i;
    for (i = 0; i < a->B; ++i)
        total += (size_t)(ntok ? ntok[i] : 1);
    f = (float *)cu_xmalloc(total * row * sizeof(float));
    hk = (unsigned char *)cu_xmalloc(total * row * a->esize);
    hv = (unsigned char *)cu_xmalloc(total * row * a->esize);
    cu_fill(&a->kv_rng, a->cfg.dt, f, total * row);
    for (i = 0; i < a->B; ++i) {
        int n = ntok ? ntok[i] : 1;
        agree_track(a, l, i, f + off * row, n);
        off += (size_t)n;
    }
    ref_encode((int)a->cfg.dt, f, hk, total * row);
    cu_fill(&a->kv_rng, a->cfg.dt, f, total * row);
    ref_encode((int)a->cfg.dt, f, hv, total * row);
    free(f);
    dk = cu_buf_alloc(a->peer, total * row * a->esize);
    dv = cu_buf_alloc(a->peer, total * row * a->esize);
    cu_buf_put(a->peer, dk, hk, total * row * a->esize);
    cu_buf_put(a->peer, dv, hv, total * row * a->esize);
    CU_OK(a->cpu, fkv_append(a->cpu, l, &bc, hk, hv));
    CU_OK(a->dut, fkv_append(a->dut, l, &bd, dk, dv));
    cu_buf_free(a->peer, dk);
    cu_buf_free(a->peer, dv);
    free(hk);
    free(hv);
}

/* The reference top-K of KV head g of (l, i) for the sequence's query
 * q_seq [QH][D] over the candidates of n tokens: pages (ascending) and
 * count, and the relative gap (ref_topk_gap; INFINITY when every candidate
 * fits). */
static double agree_select(const agree *a, int l, int i, int g,
                           const float *q_seq, int64_t n, int *pages,
                           int *count)
{
    int first, end, nc, p, h, c;
    double *scores, *agg, gap;
    int mode = a->cfg.mode == FKV_GROUP_MEAN_SCORE ? REF_GROUP_MEAN_SCORE
                                                   : REF_GROUP_MEAN_SOFTMAX;
    nc = ref_candidates(&a->lay, n, &first, &end);
    if (nc <= a->K) {
        for (p = 0; p < nc; ++p)
            pages[p] = first + p;
        *count = nc;
        return INFINITY;
    }
    scores = (double *)cu_xmalloc(sizeof(double) * (size_t)a->G * nc);
    agg = (double *)cu_xmalloc(sizeof(double) * (size_t)nc);
    for (p = 0; p < nc; ++p) {
        const double *mx = a->smx + agree_sidx(a, l, i, g, first + p);
        const double *mn = a->smn + agree_sidx(a, l, i, g, first + p);
        for (h = 0; h < a->G; ++h)
            scores[(size_t)h * nc + p] = ref_page_score(
                q_seq + ((size_t)g * a->G + h) * a->D, mx, mn, a->D);
    }
    ref_group_aggregate(scores, a->G, nc, a->scale, mode, agg);
    c = ref_topk(agg, nc, a->K, pages);
    for (p = 0; p < c; ++p)
        pages[p] += first;
    *count = c;
    gap = ref_topk_gap(agg, nc, a->K, mode);
    free(scores);
    free(agg);
    return gap;
}

/* Decode queries [B][QH][D]: fresh ones (prev NULL), else each (sequence,
 * KV head) group drifts from prev by 0.15, 0.5, 1 or 3 (some groups cross
 * the correction threshold, some do not); under FREEKV a group is redrawn
 * while its mean cosine against prev is within TST_MIN_COS_MARGIN of the
 * threshold, so that float and double agree on every decision. */
static void agree_query(agree *a, const float *prev, float *q)
{
    size_t qs = (size_t)a->QH * a->D, gs = (size_t)a->G * a->D;
    int i, g, tries;
    if (!prev) {
        ref_random_tensor(&a->q_rng, (int)a->cfg.dt, q, (size_t)a->B * qs,
                          1.0);
        return;
    }
    for (i = 0; i < a->B; ++i)
        for (g = 0; g < a->H; ++g) {
            const float *pg = prev + i * qs + g * gs;
            float *qg = q + i * qs + g * gs;
            for (tries = 0; tries < 100; ++tries) {
                double c;
                cu_perturb(&a->q_rng, a->cfg.dt, pg, qg, gs,
                           k_noise[ref_rng_below(&a->q_rng, 4)]);
                if (a->cfg.policy != FKV_POLICY_FREEKV)
                    break;
                c = ref_group_cosine(qg, pg, a->G, a->D);
                if (fabs(c - 0.8) >= TST_MIN_COS_MARGIN)
                    break;
            }
            ck_assert_msg(tries < 100, "could not draw a query clear of the "
                          "correction threshold");
        }
}

/* Prompt length of sequence i: contexts from ctx down to about 3/4 ctx,
 * with the partial page at varied fill (31 and 30, 29, 28 seal a page
 * during the 4 decode steps), and room for the decode steps. */
static int32_t agree_prompt(const agree_cfg *c, int i)
{
    static const int fill[8] = {30, 28, 7, 0, 31, 16, 29, 1};
    int64_t n = c->ctx - 40 - (int64_t)i * (c->ctx / 4) / c->batch;
    n -= n % CU_PAGE;
    n += fill[i % 8];
    ck_assert(n + CU_STEPS <= c->ctx);
    return (int32_t)n;
}

static void agree_run(int idx, fkv_backend peer)
{
    const agree_cfg *cfg = &k_agree[idx];
    agree a;
    fkv_options o;
    int32_t prompt[CU_MAX_BATCH];
    float *q, **qprev, *outc, *outd;
    unsigned char *hq, *houtc, *houtd;
    void *dq, *dout;
    double *pend_gap, *cur_gap, *used_gap;
    int *pend_pages, *pend_cnt, *cur_pages, *cur_cnt, *act_cnt;
    int32_t *got_c, *got_d;
    int t, l, i, g, h, heads_compared = 0, heads_skipped = 0;
    int outs_compared = 0, outs_skipped = 0, all_separated = 1;
    uint64_t sim_corrections = 0;
    double max_err = 0.0, tol = cu_tol(cfg->dt);
    size_t qs, qbytes;
    fkv_stats sc, sd;
    char ctx[160];

    memset(&a, 0, sizeof a);
    a.cfg = *cfg;
    a.idx = idx;
    a.peer = peer;
    a.B = cfg->batch;
    a.L = cfg->layers;
    a.H = cfg->kv_heads;
    a.QH = cfg->q_heads;
    a.D = cfg->head_dim;
    a.G = a.QH / a.H;
    a.lay.P = CU_PAGE;
    a.lay.S = CU_SINK / CU_PAGE;
    a.lay.W = CU_WINDOW / CU_PAGE;
    a.lay.K = (cfg->budget - CU_SINK - CU_WINDOW) / CU_PAGE;
    a.K = a.lay.K;
    a.max_pages = (cfg->ctx + CU_PAGE - 1) / CU_PAGE;
    a.esize = ref_dtype_bytes((int)cfg->dt);
    a.scale = 1.0 / sqrt((double)a.D);
    /* Seeds under which config 0 (FREEKV, 32K x 8) has every selection
     * well separated, so that its pages_recalled is compared too; others
     * have a few close ones (the skip path). */
    a.kv_rng = 0xC0DA0F44ull + (uint64_t)idx;
    ref_rng_seed(&a.q_rng, 0xC0DA1F44ull + (uint64_t)idx);
    ck_assert(a.B <= CU_MAX_BATCH && a.L <= TST_MAX_LAYERS);
    snprintf(ctx, sizeof ctx, "config %d (%s %s D%d G%d L%d budget %d ctx "
             "%d batch %d)", idx, cu_policy_name(cfg->policy),
             cu_dtype_name(cfg->dt), a.D, a.G, a.L, cfg->budget, cfg->ctx,
             a.B);

    cu_options(&o, FKV_BACKEND_CPU, cfg->policy, cfg->dt, a.L, a.QH, a.H,
               a.D, cfg->budget, a.B, cfg->ctx);
    o.group_score = cfg->mode;
    a.cpu = cu_create(&o);
    o.backend = peer;
    a.dut = cu_create(&o);
    for (i = 0; i < a.B; ++i) {
        CU_OK(a.cpu, fkv_seq_open(a.cpu, &a.cpu_id[i]));
        CU_OK(a.dut, fkv_seq_open(a.dut, &a.dut_id[i]));
    }
    a.len = (int64_t *)cu_xcalloc((size_t)a.L * a.B, sizeof(int64_t));
    a.smx = (double *)cu_xmalloc(sizeof(double) *
                                 agree_sidx(&a, a.L, 0, 0, 0));
    a.smn = (double *)cu_xmalloc(sizeof(double) *
                                 agree_sidx(&a, a.L, 0, 0, 0));

    /* Prefill: one bulk append per layer, sequences of different lengths. */
    for (i = 0; i < a.B; ++i)
        prompt[i] = agree_prompt(cfg, i);
    for (l = 0; l < a.L; ++l)
        agree_append(&a, l, prompt);

    qs = (size_t)a.QH * a.D;
    qbytes = (size_t)a.B * qs * a.esize;
    q = (float *)cu_xmalloc(sizeof(float) * a.B * qs);
    qprev = (float **)cu_xcalloc((size_t)a.L, sizeof(float *));
    for (l = 0; l < a.L; ++l)
        qprev[l] = (float *)cu_xmalloc(sizeof(float) * a.B * qs);
    outc = (float *)cu_xmalloc(sizeof(float) * a.B * qs);
    outd = (float *)cu_xmalloc(sizeof(float) * a.B * qs);
    hq = (unsigned char *)cu_xmalloc(qbytes);
    houtc = (unsigned char *)cu_xmalloc(qbytes);
    houtd = (unsigned char *)cu_xmalloc(qbytes);
    dq = cu_buf_alloc(peer, qbytes);
    dout = cu_buf_alloc(peer, qbytes);
    {
        size_t heads = (size_t)a.L * a.B * a.H;
        size_t kk = (size_t)(a.K > 0 ? a.K : 1);
        pend_gap = (double *)cu_xcalloc(heads, sizeof(double));
        pend_pages = (int *)cu_xcalloc(heads * kk, sizeof(int));
        pend_cnt = (int *)cu_xcalloc(heads, sizeof(int));
        act_cnt = (int *)cu_xcalloc(heads, sizeof(int));
        for (i = 0; i < (int)heads; ++i)
            act_cnt[i] = -1;
        cur_gap = (double *)cu_xcalloc((size_t)a.B * a.H, sizeof(double));
        used_gap = (double *)cu_xcalloc((size_t)a.B * a.H, sizeof(double));
        cur_pages = (int *)cu_xcalloc((size_t)a.B * a.H * kk, sizeof(int));
        cur_cnt = (int *)cu_xcalloc((size_t)a.B * a.H, sizeof(int));
        got_c = (int32_t *)cu_xcalloc(kk, sizeof(int32_t));
        got_d = (int32_t *)cu_xcalloc(kk, sizeof(int32_t));
    }

    for (t = 0; t < CU_STEPS; ++t)
        for (l = 0; l < a.L; ++l) {
            fkv_batch bc = {a.B, 0, a.cpu_id, NULL};
            fkv_batch bd = {a.B, 0, a.dut_id, NULL};
            size_t hl = (size_t)l * a.B * a.H;
            size_t kk = (size_t)(a.K > 0 ? a.K : 1);

            agree_append(&a, l, NULL);
            agree_query(&a, t ? qprev[l] : NULL, q);

            /* Which selection each KV head attends with, and its gap. */
            for (i = 0; i < a.B; ++i)
                for (g = 0; g < a.H; ++g) {
                    size_t ig = (size_t)i * a.H + g;
                    int64_t n = a.len[(size_t)l * a.B + i];
                    int first, end;
                    int nc = ref_candidates(&a.lay, n, &first, &end);
                    int corrected = 1;
                    cur_gap[ig] = agree_select(&a, l, i, g, q + i * qs, n,
                                               cur_pages + ig * kk,
                                               &cur_cnt[ig]);
                    if (cfg->policy == FKV_POLICY_FREEKV) {
                        int ac = act_cnt[hl + ig];
                        corrected =
                            ac < 0 || (nc <= a.K && ac < nc) ||
                            ref_group_cosine(q + i * qs + (size_t)g * a.G * a.D,
                                             qprev[l] + i * qs +
                                                 (size_t)g * a.G * a.D,
                                             a.G, a.D) < 0.8;
                        if (corrected) {
                            sim_corrections++;
                            act_cnt[hl + ig] = cur_cnt[ig];
                        }
                    }
                    if (cfg->policy == FKV_POLICY_DENSE)
                        used_gap[ig] = INFINITY;
                    else if (corrected) {
                        used_gap[ig] = cur_gap[ig];
                        if (cur_gap[ig] < TST_MIN_GAP)
                            all_separated = 0;
                    } else {
                        /* The speculative pages fkv_select chose last step. */
                        used_gap[ig] = pend_gap[hl + ig];
                        memcpy(cur_pages + ig * kk, pend_pages + (hl + ig) * kk,
                               sizeof(int) * kk);
                        cur_cnt[ig] = pend_cnt[hl + ig];
                    }
                }

            ref_encode((int)cfg->dt, q, hq, (size_t)a.B * qs);
            cu_buf_put(peer, dq, hq, qbytes);
            CU_OK(a.cpu, fkv_attend(a.cpu, l, &bc, hq, houtc));
            CU_OK(a.dut, fkv_attend(a.dut, l, &bd, dq, dout));
            cu_buf_get(peer, houtd, dout, qbytes);
            ref_decode((int)cfg->dt, houtc, outc, (size_t)a.B * qs);
            ref_decode((int)cfg->dt, houtd, outd, (size_t)a.B * qs);

            for (i = 0; i < a.B; ++i)
                for (g = 0; g < a.H; ++g) {
                    size_t ig = (size_t)i * a.H + g;
                    int32_t nc_ = -1, nd = -1;
                    int same, p;
                    CU_OK(a.cpu, fkv_get_selected_pages(a.cpu, l, a.cpu_id[i],
                                                        g, got_c, a.K, &nc_));
                    CU_OK(a.dut, fkv_get_selected_pages(a.dut, l, a.dut_id[i],
                                                        g, got_d, a.K, &nd));
                    ck_assert_msg(nc_ <= a.K && nd <= a.K,
                                  "%s: %d and %d selected pages, K is %d", ctx,
                                  nc_, nd, a.K);
                    same = nc_ == nd &&
                           memcmp(got_c, got_d, sizeof(int32_t) *
                                                    (size_t)(nc_ > 0 ? nc_ : 0)) == 0;
                    if (cfg->policy == FKV_POLICY_DENSE) {
                        ck_assert_msg(nc_ == 0 && nd == 0,
                                      "%s: DENSE reports %d (CPU) and %d "
                                      "(CUDA) selected pages", ctx, nc_, nd);
                    } else if (used_gap[ig] >= TST_MIN_GAP) {
                        /* The CPU is the reference backend: it must have
                         * used the selection simulated here (else the gap
                         * above is not the one that matters). */
                        ck_assert_msg(nc_ == cur_cnt[ig],
                                      "%s: step %d layer %d seq %d kv head "
                                      "%d: CPU used %d pages, the simulated "
                                      "selection has %d",
                                      ctx, t, l, i, g, nc_, cur_cnt[ig]);
                        for (p = 0; p < nc_; ++p)
                            ck_assert_msg(got_c[p] == cur_pages[ig * kk + p],
                                          "%s: step %d layer %d seq %d kv "
                                          "head %d: CPU page #%d is %d, the "
                                          "simulated selection has %d",
                                          ctx, t, l, i, g, p, got_c[p],
                                          cur_pages[ig * kk + p]);
                        ck_assert_msg(nd == nc_,
                                      "%s: step %d layer %d seq %d kv head "
                                      "%d: CUDA selected %d pages, CPU %d "
                                      "(top-K gap %.3g)",
                                      ctx, t, l, i, g, nd, nc_, used_gap[ig]);
                        for (p = 0; p < nc_; ++p)
                            ck_assert_msg(got_d[p] == got_c[p],
                                          "%s: step %d layer %d seq %d kv "
                                          "head %d: CUDA page #%d is %d, CPU "
                                          "%d (top-K gap %.3g)",
                                          ctx, t, l, i, g, p, got_d[p],
                                          got_c[p], used_gap[ig]);
                        heads_compared++;
                    } else {
                        heads_skipped++;
                    }
                    /* Outputs where both attended the same pages. */
                    for (h = g * a.G; h < (g + 1) * a.G; ++h) {
                        const float *od = outd + i * qs + (size_t)h * a.D;
                        const float *oc = outc + i * qs + (size_t)h * a.D;
                        double want[256], e;
                        int d;
                        if (!same) {
                            outs_skipped++;
                            continue;
                        }
                        for (d = 0; d < a.D; ++d)
                            want[d] = oc[d];
                        e = ref_rel_err(od, want, (size_t)a.D);
                        ck_assert_msg(e <= tol,
                                      "%s: step %d layer %d seq %d (n %lld) "
                                      "q head %d: CUDA vs CPU relative error "
                                      "%.3g > %.3g (cuda[0] %.6g cpu[0] "
                                      "%.6g)",
                                      ctx, t, l, i,
                                      (long long)a.len[(size_t)l * a.B + i],
                                      h, e, tol, (double)od[0], (double)oc[0]);
                        if (e > max_err)
                            max_err = e;
                        outs_compared++;
                    }
                }

            CU_OK(a.cpu, fkv_select(a.cpu, l, &bc, hq));
            CU_OK(a.dut, fkv_select(a.dut, l, &bd, dq));
            CU_OK(a.cpu, fkv_recall(a.cpu, l, &bc));
            CU_OK(a.dut, fkv_recall(a.dut, l, &bd));
            if (cfg->policy == FKV_POLICY_FREEKV)
                for (i = 0; i < a.B; ++i)
                    for (g = 0; g < a.H; ++g) {
                        size_t ig = (size_t)i * a.H + g;
                        int64_t n = a.len[(size_t)l * a.B + i];
                        /* fkv_select chose with q at this length: the
                         * same selection as a correction now would. */
                        pend_gap[hl + ig] =
                            agree_select(&a, l, i, g, q + i * qs, n,
                                         pend_pages + (hl + ig) * kk,
                                         &pend_cnt[hl + ig]);
                        act_cnt[hl + ig] = pend_cnt[hl + ig];
                        if (pend_gap[hl + ig] < TST_MIN_GAP)
                            all_separated = 0;
                    }
            memcpy(qprev[l], q, sizeof(float) * a.B * qs);
        }

    /* Counters. */
    memset(&sc, 0, sizeof sc);
    memset(&sd, 0, sizeof sd);
    sc.struct_size = sd.struct_size = sizeof sc;
    CU_OK(a.cpu, fkv_get_stats(a.cpu, &sc));
    CU_OK(a.dut, fkv_get_stats(a.dut, &sd));
    ck_assert_msg(sd.steps == sc.steps, "%s: steps %llu, CPU %llu", ctx,
                  (unsigned long long)sd.steps, (unsigned long long)sc.steps);
    ck_assert_msg(sd.corrections == sc.corrections,
                  "%s: corrections %llu, CPU %llu", ctx,
                  (unsigned long long)sd.corrections,
                  (unsigned long long)sc.corrections);
    ck_assert_msg(sd.heads_checked == sc.heads_checked,
                  "%s: heads_checked %llu, CPU %llu", ctx,
                  (unsigned long long)sd.heads_checked,
                  (unsigned long long)sc.heads_checked);
    if (cfg->policy == FKV_POLICY_FREEKV) {
        ck_assert_msg(sc.corrections == sim_corrections,
                      "%s: CPU corrections %llu, simulated %llu", ctx,
                      (unsigned long long)sc.corrections,
                      (unsigned long long)sim_corrections);
        ck_assert_msg(sc.heads_checked ==
                          (uint64_t)CU_STEPS * a.L * a.B * a.H,
                      "%s: CPU heads_checked %llu, want %d", ctx,
                      (unsigned long long)sc.heads_checked,
                      CU_STEPS * a.L * a.B * a.H);
        ck_assert_msg(sc.corrections > 0 && sc.corrections < sc.heads_checked,
                      "%s: %llu corrections of %llu checks: the queries "
                      "should make some heads correct and others not", ctx,
                      (unsigned long long)sc.corrections,
                      (unsigned long long)sc.heads_checked);
    }
    if (all_separated) {
        ck_assert_msg(sd.pages_recalled == sc.pages_recalled,
                      "%s: pages_recalled %llu, CPU %llu (every selection "
                      "was well separated)", ctx,
                      (unsigned long long)sd.pages_recalled,
                      (unsigned long long)sc.pages_recalled);
        ck_assert_msg(sd.bytes_recalled == sc.bytes_recalled,
                      "%s: bytes_recalled %llu, CPU %llu", ctx,
                      (unsigned long long)sd.bytes_recalled,
                      (unsigned long long)sc.bytes_recalled);
    }
    if (cfg->policy != FKV_POLICY_DENSE) {
        int total = heads_compared + heads_skipped;
        /* MEAN_SCORE's gap is relative to the largest score: ~20% of its
         * selections count as close although float is far more precise. */
        ck_assert_msg(3 * heads_compared >= 2 * total,
                      "%s: only %d of %d (step, layer, sequence, KV head) "
                      "selections were well separated enough to compare",
                      ctx, heads_compared, total);
    }
    ck_assert_msg(outs_compared > 0 && 3 * outs_compared >=
                                           2 * (outs_compared + outs_skipped),
                  "%s: only %d of %d outputs compared", ctx, outs_compared,
                  outs_compared + outs_skipped);
    printf("  %s: %d/%d selections compared, %d/%d outputs, max rel err "
           "%.2e; corrections %llu/%llu, pages recalled %llu (CPU %llu)%s\n",
           ctx, heads_compared, heads_compared + heads_skipped, outs_compared,
           outs_compared + outs_skipped, max_err,
           (unsigned long long)sd.corrections,
           (unsigned long long)sd.heads_checked,
           (unsigned long long)sd.pages_recalled,
           (unsigned long long)sc.pages_recalled,
           all_separated ? "" : " (not compared: a selection was close)");
    fflush(stdout);

    for (l = 0; l < a.L; ++l)
        free(qprev[l]);
    free(qprev);
    free(q);
    free(outc);
    free(outd);
    free(hq);
    free(houtc);
    free(houtd);
    cu_buf_free(peer, dq);
    cu_buf_free(peer, dout);
    free(pend_gap);
    free(pend_pages);
    free(pend_cnt);
    free(act_cnt);
    free(cur_gap);
    free(used_gap);
    free(cur_pages);
    free(cur_cnt);
    free(got_c);
    free(got_d);
    free(a.len);
    free(a.smx);
    free(a.smn);
    fkv_destroy(a.cpu);
    fkv_destroy(a.dut);
}

START_TEST(cuda_vs_cpu_agreement)
{
    agree_run(_i, TST_CUDA_PEER);
}
END_TEST

#ifdef FKV_WITH_CUDA

/* ====================================================================== */
/* A CUDA cache on its own stream with fixed per-layer tensors of one     */
/* decode step (what a captured graph reads and writes).                  */
/* ====================================================================== */

#define GC_BATCH 2

typedef struct gcache {
    fkv_cache *c;
    cudaStream_t s;
    fkv_seq_id id[CU_MAX_BATCH];
    int L, H, QH, D, B;
    size_t esize, kv_bytes, q_bytes; /* one decode step of one layer */
    void *dk[TST_MAX_LAYERS], *dv[TST_MAX_LAYERS];
    void *dq[TST_MAX_LAYERS], *dout[TST_MAX_LAYERS];
} gcache;

/* One decode step's inputs, dtype bytes per layer (and q as floats, for the
 * next step's drift). */
typedef struct gstep {
    unsigned char *k[TST_MAX_LAYERS], *v[TST_MAX_LAYERS], *q[TST_MAX_LAYERS];
    float *qf[TST_MAX_LAYERS];
} gstep;

/* A cache of `nseq` open sequences (at most CU_MAX_BATCH). */
static void gc_open_n(gcache *gc, const fkv_options *o, int nseq)
{
    int l, i;
    memset(gc, 0, sizeof *gc);
    ck_assert(o->num_layers <= TST_MAX_LAYERS);
    ck_assert(nseq >= 1 && nseq <= CU_MAX_BATCH);
    gc->L = o->num_layers;
    gc->H = o->num_kv_heads;
    gc->QH = o->num_q_heads;
    gc->D = o->head_dim;
    gc->B = nseq;
    gc->esize = ref_dtype_bytes((int)o->dtype);
    gc->kv_bytes = (size_t)gc->B * gc->H * gc->D * gc->esize;
    gc->q_bytes = (size_t)gc->B * gc->QH * gc->D * gc->esize;
    gc->c = cu_create(o);
    CK_CUDA(cudaStreamCreateWithFlags(&gc->s, cudaStreamNonBlocking));
    /* The stream first, so that the sequences' initialisation runs on it. */
    CU_OK(gc->c, fkv_set_stream(gc->c, (void *)gc->s));
    for (i = 0; i < gc->B; ++i)
        CU_OK(gc->c, fkv_seq_open(gc->c, &gc->id[i]));
    for (l = 0; l < gc->L; ++l) {
        CK_CUDA(cudaMalloc(&gc->dk[l], gc->kv_bytes));
        CK_CUDA(cudaMalloc(&gc->dv[l], gc->kv_bytes));
        CK_CUDA(cudaMalloc(&gc->dq[l], gc->q_bytes));
        CK_CUDA(cudaMalloc(&gc->dout[l], gc->q_bytes));
    }
}

static void gc_open(gcache *gc, const fkv_options *o)
{
    gc_open_n(gc, o, GC_BATCH);
}

static void gc_close(gcache *gc)
{
    int l;
    CK_CUDA(cudaStreamSynchronize(gc->s));
    fkv_destroy(gc->c);
    gc->c = NULL;
    for (l = 0; l < gc->L; ++l) {
        CK_CUDA(cudaFree(gc->dk[l]));
        CK_CUDA(cudaFree(gc->dv[l]));
        CK_CUDA(cudaFree(gc->dq[l]));
        CK_CUDA(cudaFree(gc->dout[l]));
    }
    CK_CUDA(cudaStreamDestroy(gc->s));
}

static void gc_batch(const gcache *gc, fkv_batch *b, const int32_t *ntok)
{
    b->num_seqs = gc->B;
    b->reserved = 0;
    b->seq_ids = gc->id;
    b->num_tokens = ntok;
}

/* Prefill of layer l: rows [sum ntok][H][D] of dtype bytes, on the
 * cache's stream. */
static void gc_prefill(gcache *gc, int l, const int32_t *ntok, const void *hk,
                       const void *hv, size_t bytes)
{
    void *dk = NULL, *dv = NULL;
    fkv_batch b;
    gc_batch(gc, &b, ntok);
    CK_CUDA(cudaMalloc(&dk, bytes));
    CK_CUDA(cudaMalloc(&dv, bytes));
    CK_CUDA(cudaMemcpyAsync(dk, hk, bytes, cudaMemcpyHostToDevice, gc->s));
    CK_CUDA(cudaMemcpyAsync(dv, hv, bytes, cudaMemcpyHostToDevice, gc->s));
    CU_OK(gc->c, fkv_append(gc->c, l, &b, dk, dv));
    CK_CUDA(cudaStreamSynchronize(gc->s));
    CK_CUDA(cudaFree(dk));
    CK_CUDA(cudaFree(dv));
}

/* The same random prompt (tokens ntok[i]) into every cache of gcs. */
static void gc_prefill_all(gcache **gcs, int n, const int32_t *ntok,
                           fkv_dtype dt, uint64_t *rng)
{
    gcache *g0 = gcs[0];
    size_t rows = 0, elems, bytes;
    float *f;
    unsigned char *hk, *hv;
    int l, i;
    for (i = 0; i < g0->B; ++i)
        rows += (size_t)ntok[i];
    elems = rows * g0->H * g0->D;
    bytes = elems * g0->esize;
    f = (float *)cu_xmalloc(elems * sizeof(float));
    hk = (unsigned char *)cu_xmalloc(bytes);
    hv = (unsigned char *)cu_xmalloc(bytes);
    for (l = 0; l < g0->L; ++l) {
        cu_fill(rng, dt, f, elems);
        ref_encode((int)dt, f, hk, elems);
        cu_fill(rng, dt, f, elems);
        ref_encode((int)dt, f, hv, elems);
        for (i = 0; i < n; ++i)
            gc_prefill(gcs[i], l, ntok, hk, hv, bytes);
    }
    free(f);
    free(hk);
    free(hv);
}

static void gstep_alloc(gstep *st, const gcache *gc)
{
    int l;
    memset(st, 0, sizeof *st);
    for (l = 0; l < gc->L; ++l) {
        st->k[l] = (unsigned char *)cu_xmalloc(gc->kv_bytes);
        st->v[l] = (unsigned char *)cu_xmalloc(gc->kv_bytes);
        st->q[l] = (unsigned char *)cu_xmalloc(gc->q_bytes);
        st->qf[l] = (float *)cu_xmalloc(sizeof(float) * gc->B * gc->QH *
                                        gc->D);
    }
}

static void gstep_free(gstep *st)
{
    int l;
    for (l = 0; l < TST_MAX_LAYERS; ++l) {
        free(st->k[l]);
        free(st->v[l]);
        free(st->q[l]);
        free(st->qf[l]);
    }
    memset(st, 0, sizeof *st);
}

/* Random inputs of one decode step; q drifts from the previous step's
 * (first: fresh) by 0.15, 0.5, 1 or 3 per (sequence, KV head) group. */
static void gstep_fill(gstep *st, const gcache *gc, fkv_dtype dt,
                       uint64_t *rng, ref_rng *qr, int first)
{
    size_t kv = (size_t)gc->B * gc->H * gc->D;
    size_t qn = (size_t)gc->B * gc->QH * gc->D;
    size_t gs = (size_t)(gc->QH / gc->H) * gc->D;
    float *f = (float *)cu_xmalloc(sizeof(float) * (kv > qn ? kv : qn));
    int l;
    size_t j;
    for (l = 0; l < gc->L; ++l) {
        cu_fill(rng, dt, f, kv);
        ref_encode((int)dt, f, st->k[l], kv);
        cu_fill(rng, dt, f, kv);
        ref_encode((int)dt, f, st->v[l], kv);
        if (first) {
            ref_random_tensor(qr, (int)dt, st->qf[l], qn, 1.0);
        } else {
            memcpy(f, st->qf[l], sizeof(float) * qn);
            for (j = 0; j < qn; j += gs)
                cu_perturb(qr, dt, f + j, st->qf[l] + j, gs,
                           k_noise[ref_rng_below(qr, 4)]);
        }
        ref_encode((int)dt, st->qf[l], st->q[l], qn);
    }
    free(f);
}

/* Inputs into the cache's fixed tensors, in its stream's order. */
static void gc_put(gcache *gc, const gstep *st)
{
    int l;
    for (l = 0; l < gc->L; ++l) {
        CK_CUDA(cudaMemcpyAsync(gc->dk[l], st->k[l], gc->kv_bytes,
                                cudaMemcpyHostToDevice, gc->s));
        CK_CUDA(cudaMemcpyAsync(gc->dv[l], st->v[l], gc->kv_bytes,
                                cudaMemcpyHostToDevice, gc->s));
        CK_CUDA(cudaMemcpyAsync(gc->dq[l], st->q[l], gc->q_bytes,
                                cudaMemcpyHostToDevice, gc->s));
    }
}

/* out[l]: q_bytes each. Waits for the stream. */
static void gc_get(gcache *gc, unsigned char **out)
{
    int l;
    for (l = 0; l < gc->L; ++l)
        CK_CUDA(cudaMemcpyAsync(out[l], gc->dout[l], gc->q_bytes,
                                cudaMemcpyDeviceToHost, gc->s));
    CK_CUDA(cudaStreamSynchronize(gc->s));
}

/* One eager decode step of every layer from the fixed tensors, over the
 * first n sequences (their first n rows); fkv_select with the attend's
 * query, or with NULL (keep the attend's selection) unless select_q. */
static void gc_step_n(gcache *gc, int n, int select_q)
{
    fkv_batch b;
    int l;
    gc_batch(gc, &b, NULL);
    b.num_seqs = n;
    for (l = 0; l < gc->L; ++l) {
        CU_OK(gc->c, fkv_append(gc->c, l, &b, gc->dk[l], gc->dv[l]));
        CU_OK(gc->c, fkv_attend(gc->c, l, &b, gc->dq[l], gc->dout[l]));
        CU_OK(gc->c, fkv_select(gc->c, l, &b, select_q ? gc->dq[l] : NULL));
        CU_OK(gc->c, fkv_recall(gc->c, l, &b));
    }
}

/* The whole batch, selecting with the query. */
static void gc_step(gcache *gc)
{
    gc_step_n(gc, gc->B, 1);
}

/* Inputs, one eager step, outputs. */
static void gc_eager(gcache *gc, const gstep *st, unsigned char **out)
{
    gc_put(gc, st);
    gc_step(gc);
    gc_get(gc, out);
}

static unsigned char **gc_outs(const gcache *gc)
{
    unsigned char **o = (unsigned char **)cu_xcalloc(TST_MAX_LAYERS,
                                                     sizeof *o);
    int l;
    for (l = 0; l < gc->L; ++l)
        o[l] = (unsigned char *)cu_xmalloc(gc->q_bytes);
    return o;
}

static void gc_outs_free(unsigned char **o)
{
    int l;
    for (l = 0; l < TST_MAX_LAYERS; ++l)
        free(o[l]);
    free(o);
}

/* Compares two caches' outputs of one step. exact: byte for byte; else
 * relative error per (sequence, q head) within tol. Returns the number of
 * elements that differ in any bit; *max_err gets the largest error. */
static int gc_compare(const gcache *gc, fkv_dtype dt, unsigned char **a,
                      unsigned char **b, int exact, double tol,
                      double *max_err, const char *what)
{
    size_t qn = (size_t)gc->B * gc->QH * gc->D;
    float *fa = (float *)cu_xmalloc(sizeof(float) * qn);
    float *fb = (float *)cu_xmalloc(sizeof(float) * qn);
    double want[256];
    int l, i, h, d, diff = 0;
    for (l = 0; l < gc->L; ++l) {
        ref_decode((int)dt, a[l], fa, qn);
        ref_decode((int)dt, b[l], fb, qn);
        for (i = 0; i < gc->B; ++i)
            for (h = 0; h < gc->QH; ++h) {
                size_t at = ((size_t)i * gc->QH + h) * gc->D;
                double e;
                int differs = memcmp(a[l] + at * gc->esize,
                                     b[l] + at * gc->esize,
                                     (size_t)gc->D * gc->esize) != 0;
                for (d = 0; d < gc->D; ++d) {
                    want[d] = fb[at + d];
                    if (differs && memcmp(a[l] + (at + d) * gc->esize,
                                          b[l] + (at + d) * gc->esize,
                                          gc->esize) != 0)
                        diff++;
                }
                e = ref_rel_err(fa + at, want, (size_t)gc->D);
                if (e > *max_err)
                    *max_err = e;
                if (exact)
                    ck_assert_msg(!differs,
                                  "%s: layer %d seq %d q head %d differs "
                                  "(relative error %.3g; first values %.8g "
                                  "and %.8g)",
                                  what, l, i, h, e, (double)fa[at],
                                  (double)fb[at]);
                else
                    ck_assert_msg(e <= tol,
                                  "%s: layer %d seq %d q head %d: relative "
                                  "error %.3g > %.3g",
                                  what, l, i, h, e, tol);
            }
    }
    free(fa);
    free(fb);
    return diff;
}

/* Lengths, selected pages and counters of two caches that must agree;
 * device_bytes too if same_bytes. */
static void gc_same_state_x(gcache *a, gcache *b, const char *what,
                            int same_bytes)
{
    fkv_stats sa, sb;
    int32_t pa[1024], pb[1024];
    int l, i, g, p;
    for (i = 0; i < a->B; ++i) {
        int64_t na = -1, nb = -1;
        CU_OK(a->c, fkv_seq_length(a->c, a->id[i], &na));
        CU_OK(b->c, fkv_seq_length(b->c, b->id[i], &nb));
        ck_assert_msg(na == nb, "%s: seq %d holds %lld tokens, its twin %lld",
                      what, i, (long long)na, (long long)nb);
    }
    for (l = 0; l < a->L; ++l)
        for (i = 0; i < a->B; ++i)
            for (g = 0; g < a->H; ++g) {
                int32_t ca = -1, cb = -1;
                CU_OK(a->c, fkv_get_selected_pages(a->c, l, a->id[i], g, pa,
                                                   1024, &ca));
                CU_OK(b->c, fkv_get_selected_pages(b->c, l, b->id[i], g, pb,
                                                   1024, &cb));
                ck_assert_msg(ca == cb && ca <= 1024,
                              "%s: layer %d seq %d kv head %d: %d selected "
                              "pages, twin %d", what, l, i, g, ca, cb);
                for (p = 0; p < ca; ++p)
                    ck_assert_msg(pa[p] == pb[p],
                                  "%s: layer %d seq %d kv head %d: page #%d "
                                  "is %d, twin %d", what, l, i, g, p, pa[p],
                                  pb[p]);
            }
    memset(&sa, 0, sizeof sa);
    memset(&sb, 0, sizeof sb);
    sa.struct_size = sb.struct_size = sizeof sa;
    CU_OK(a->c, fkv_get_stats(a->c, &sa));
    CU_OK(b->c, fkv_get_stats(b->c, &sb));
    ck_assert_msg(sa.pages_recalled == sb.pages_recalled &&
                      sa.bytes_recalled == sb.bytes_recalled,
                  "%s: pages_recalled %llu, twin %llu", what,
                  (unsigned long long)sa.pages_recalled,
                  (unsigned long long)sb.pages_recalled);
    ck_assert_msg(sa.corrections == sb.corrections,
                  "%s: corrections %llu, twin %llu", what,
                  (unsigned long long)sa.corrections,
                  (unsigned long long)sb.corrections);
    ck_assert_msg(sa.heads_checked == sb.heads_checked,
                  "%s: heads_checked %llu, twin %llu", what,
                  (unsigned long long)sa.heads_checked,
                  (unsigned long long)sb.heads_checked);
    ck_assert_msg(!same_bytes || sa.device_bytes == sb.device_bytes,
                  "%s: device_bytes %llu, twin %llu", what,
                  (unsigned long long)sa.device_bytes,
                  (unsigned long long)sb.device_bytes);
}

static void gc_same_state(gcache *a, gcache *b, const char *what)
{
    gc_same_state_x(a, b, what, 1);
}

/* ====================================================================== */
/* 2. cuda_graph_capture                                                  */
/* ====================================================================== */

/* 4: FREEKV with FKV_CRITERION_BOUNDED (select at attend). 5..7: a dense
 * layer (dense_layers) in
 * FREEKV and SYNC caches; a dense last layer moves the capture's join of
 * the side stream to the last layer that is not dense. */
static const fkv_policy k_graph_policies[8] = {
    FKV_POLICY_FREEKV, FKV_POLICY_SYNC, FKV_POLICY_RESIDENT,
    FKV_POLICY_DENSE, FKV_POLICY_FREEKV, FKV_POLICY_FREEKV,
    FKV_POLICY_FREEKV, FKV_POLICY_SYNC};
static const uint8_t k_graph_dense[8][3] = {
    {0, 0, 0}, {0, 0, 0}, {0, 0, 0}, {0, 0, 0},
    {0, 0, 0}, {0, 0, 1}, {1, 0, 0}, {0, 0, 1}};

/* _i: the policy (and dense layers). Cache A captures one decode step of
 * its 3 layers on its stream and replays it; its twin B runs the same
 * steps eagerly. */
START_TEST(cuda_graph_capture)
{
    const fkv_policy policy = k_graph_policies[_i];
    const int dense_layers = _i >= 5;
    const fkv_dtype dt = FKV_DTYPE_BF16;
    const int32_t prompt[GC_BATCH] = {1500, 2103};
    fkv_options o;
    gcache A, B;
    gcache *both[2] = {&A, &B};
    gstep in;
    unsigned char **outA, **outB;
    uint64_t rng = 0x6A0000ull + (uint64_t)_i;
    ref_rng qr;
    int64_t len0[GC_BATCH], after_capture[GC_BATCH];
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t ce;
    fkv_status cst = FKV_OK;
    char cmsg[768], cwhat[64], what[96];
    fkv_batch b;
    fkv_stats sa, sb;
    int l, i, r, diff = 0;
    double max_err = 0.0;
    /* DENSE sizes its split-K grid from the host's lengths eagerly and from
     * the capacity under capture (replays see longer sequences): the float
     * summation order differs, so only the dtype tolerance holds. */
    const int exact = policy != FKV_POLICY_DENSE && !dense_layers;

    ref_rng_seed(&qr, 0x6A1000ull + (uint64_t)_i);
    cu_options(&o, FKV_BACKEND_CUDA, policy, dt, 3, 8, 2, 128, 512, GC_BATCH,
               4096);
    if (_i == 4) {
        o.correction_criterion = FKV_CRITERION_BOUNDED;
        o.correction_min_mass = 0.002f;
        o.correction_max_pages = 4;
    }
    if (dense_layers)
        o.dense_layers = k_graph_dense[_i];
    gc_open(&A, &o);
    gc_open(&B, &o);
    gc_prefill_all(both, 2, prompt, dt, &rng);
    outA = gc_outs(&A);
    outB = gc_outs(&B);
    gstep_alloc(&in, &A);

    /* One eager step on both. */
    gstep_fill(&in, &A, dt, &rng, &qr, 1);
    gc_eager(&A, &in, outA);
    gc_eager(&B, &in, outB);
    gc_compare(&A, dt, outA, outB, 1, 0.0, &max_err, "eager step");

    /* Reserve for the replays, drain both of A's streams, capture. */
    for (i = 0; i < GC_BATCH; ++i) {
        CU_OK(A.c, fkv_seq_length(A.c, A.id[i], &len0[i]));
        ck_assert_int_eq(len0[i], prompt[i] + 1);
        CU_OK(A.c, fkv_seq_reserve(A.c, A.id[i], len0[i] + CU_REPLAYS));
        CU_OK(B.c, fkv_seq_reserve(B.c, B.id[i], len0[i] + CU_REPLAYS));
    }
    /* fkv_sync also waits for the side stream's recall of the eager step,
     * which the first replay's attend does not wait for. */
    CU_OK(A.c, fkv_sync(A.c));
    CK_CUDA(cudaStreamSynchronize(A.s));

    gc_batch(&A, &b, NULL);
    cmsg[0] = '\0';
    cwhat[0] = '\0';
    CK_CUDA(cudaStreamBeginCapture(A.s, cudaStreamCaptureModeGlobal));
    for (l = 0; l < A.L && cst == FKV_OK; ++l) {
        snprintf(cwhat, sizeof cwhat, "fkv_append(layer %d)", l);
        cst = fkv_append(A.c, l, &b, A.dk[l], A.dv[l]);
        if (cst == FKV_OK) {
            snprintf(cwhat, sizeof cwhat, "fkv_attend(layer %d)", l);
            cst = fkv_attend(A.c, l, &b, A.dq[l], A.dout[l]);
        }
        if (cst == FKV_OK) {
            snprintf(cwhat, sizeof cwhat, "fkv_select(layer %d)", l);
            cst = fkv_select(A.c, l, &b, A.dq[l]);
        }
        if (cst == FKV_OK) {
            snprintf(cwhat, sizeof cwhat, "fkv_recall(layer %d)", l);
            cst = fkv_recall(A.c, l, &b);
        }
    }
    if (cst != FKV_OK)
        fkv_last_error(A.c, cmsg, sizeof cmsg);
    ce = cudaStreamEndCapture(A.s, &graph); /* ends it in every case */
    if (ce != cudaSuccess)
        (void)cudaGetLastError();
    ck_assert_msg(cst == FKV_OK, "%s under capture returned %d (%s): %s",
                  cwhat, (int)cst, fkv_status_string(cst), cmsg);
    ck_assert_msg(ce == cudaSuccess && graph != NULL,
                  "cudaStreamEndCapture: %s (%s)", cudaGetErrorString(ce),
                  cudaGetErrorName(ce));
    /* As docs/integration.md asks of engines: nodes keep their stream's
     * priority (the side stream's) in replays. */
    CK_CUDA(cudaGraphInstantiateWithFlags(
        &exec, graph, cudaGraphInstantiateFlagUseNodePriority));
    /* The captured calls did the host's bookkeeping once (the appends
     * counted one token); the device, which fkv_sync reads back, has not
     * run anything yet. */
    for (i = 0; i < GC_BATCH; ++i)
        CU_OK(A.c, fkv_seq_length(A.c, A.id[i], &after_capture[i]));

    for (r = 0; r < CU_REPLAYS; ++r) {
        gstep_fill(&in, &A, dt, &rng, &qr, 0);
        gc_put(&A, &in); /* outside the graph, in the stream's order */
        CK_CUDA(cudaGraphLaunch(exec, A.s));
        gc_get(&A, outA);
        gc_eager(&B, &in, outB);
        snprintf(what, sizeof what, "%s replay %d vs eager",
                 cu_policy_name(policy), r);
        diff += gc_compare(&A, dt, outA, outB, exact, tst_tol(dt), &max_err,
                           what);
    }

    /* The device is the truth after fkv_sync: each replay appended one
     * token; the capture itself appended nothing. */
    CU_OK(A.c, fkv_sync(A.c));
    for (i = 0; i < GC_BATCH; ++i) {
        int64_t n = -1;
        CU_OK(A.c, fkv_seq_length(A.c, A.id[i], &n));
        ck_assert_msg(n == len0[i] + CU_REPLAYS,
                      "seq %d: %lld tokens after %d replays and fkv_sync, "
                      "want %lld (%lld before capture, %lld right after it)",
                      i, (long long)n, CU_REPLAYS,
                      (long long)(len0[i] + CU_REPLAYS), (long long)len0[i],
                      (long long)after_capture[i]);
    }
    snprintf(what, sizeof what, "%s after %d replays", cu_policy_name(policy),
             CU_REPLAYS);
    gc_same_state(&A, &B, what);

    /* Eager calls after fkv_sync: both caches hold the same K/V and
     * lengths, so every policy must now agree bit for bit. */
    gstep_fill(&in, &A, dt, &rng, &qr, 0);
    gc_eager(&A, &in, outA);
    gc_eager(&B, &in, outB);
    snprintf(what, sizeof what, "%s eager step after the replays",
             cu_policy_name(policy));
    gc_compare(&A, dt, outA, outB, 1, 0.0, &max_err, what);
    gc_same_state(&A, &B, what);
    for (i = 0; i < GC_BATCH; ++i) {
        int64_t n = -1;
        CU_OK(A.c, fkv_seq_length(A.c, A.id[i], &n));
        ck_assert_int_eq(n, len0[i] + CU_REPLAYS + 1);
    }

    memset(&sa, 0, sizeof sa);
    memset(&sb, 0, sizeof sb);
    sa.struct_size = sb.struct_size = sizeof sa;
    CU_OK(A.c, fkv_get_stats(A.c, &sa));
    CU_OK(B.c, fkv_get_stats(B.c, &sb));
    printf("  graph %s%s: %d replays; %d output elements differ from eager "
           "(max rel err %.2e); host length right after capture %lld "
           "(before %lld); steps counted %llu, eager twin %llu\n",
           cu_policy_name(policy),
           !dense_layers ? "" : k_graph_dense[_i][0] ? " (layer 0 dense)"
                                                     : " (last layer dense)",
           CU_REPLAYS, diff, max_err,
           (long long)after_capture[0], (long long)len0[0],
           (unsigned long long)sa.steps, (unsigned long long)sb.steps);
    fflush(stdout);

    CK_CUDA(cudaGraphExecDestroy(exec));
    CK_CUDA(cudaGraphDestroy(graph));
    gstep_free(&in);
    gc_outs_free(outA);
    gc_outs_free(outB);
    gc_close(&A);
    gc_close(&B);
}
END_TEST

/* ====================================================================== */
/* 3. cuda_device_errors                                                  */
/* ====================================================================== */

/* Whether msg carries a CUDA error as cuda_fail writes it: the error's
 * name in parentheses and its description (cudaGetErrorString). */
static int has_cuda_error(const char *msg, char *why, size_t len)
{
    const char *open = strstr(msg, "(cudaError");
    char name[96];
    size_t n = 0;
    int code;
    if (!open) {
        snprintf(why, len, "no \"(cudaError...)\" in it");
        return 0;
    }
    open++;
    while (open[n] && open[n] != ')' && n + 1 < sizeof name) {
        name[n] = open[n];
        n++;
    }
    name[n] = '\0';
    for (code = 1; code < 1100; ++code) {
        const char *text;
        if (strcmp(cudaGetErrorName((cudaError_t)code), name) != 0)
            continue;
        text = cudaGetErrorString((cudaError_t)code);
        if (strstr(msg, text))
            return 1;
        snprintf(why, len, "it lacks %s's description \"%s\"", name, text);
        return 0;
    }
    snprintf(why, len, "%s is not a CUDA error name", name);
    return 0;
}

static void expect_device_error(fkv_cache *c, fkv_status st, const char *msg,
                                const char *what)
{
    char why[256];
    ck_assert_msg(st == FKV_ERR_DEVICE,
                  "%s: got status %d (%s), want FKV_ERR_DEVICE; message: %s",
                  what, (int)st, fkv_status_string(st), msg);
    ck_assert_msg(msg[0] != '\0', "%s: fkv_last_error is empty", what);
    ck_assert_msg(has_cuda_error(msg, why, sizeof why),
                  "%s: the message \"%s\" does not carry CUDA's error: %s",
                  what, msg, why);
    (void)c;
}

/* Cache X meets CUDA errors and host pointers; its twin T does not. After
 * each error X is put back on its stream; both then run the same steps and
 * must agree bit for bit (the failed calls changed nothing). */
START_TEST(cuda_device_errors)
{
    const fkv_dtype dt = FKV_DTYPE_BF16;
    const int32_t prompt[GC_BATCH] = {1200, 1711};
    fkv_options o;
    gcache X, T;
    gcache *both[2] = {&X, &T};
    gstep in;
    unsigned char **outX, **outT;
    uint64_t rng = 0xE220000ull;
    ref_rng qr;
    fkv_batch b;
    fkv_status st;
    cudaGraph_t graph;
    cudaError_t ce;
    enum cudaStreamCaptureStatus cap;
    char msg[768];
    void *scratch = NULL, *hbuf;
    int64_t len_before[GC_BATCH];
    double max_err = 0.0;
    fkv_stats stats;
    int i, step;

    ref_rng_seed(&qr, 0xE221000ull);
    cu_options(&o, FKV_BACKEND_CUDA, FKV_POLICY_FREEKV, dt, 2, 8, 2, 128,
               512, GC_BATCH, 4096);
    gc_open(&X, &o);
    gc_open(&T, &o);
    gc_prefill_all(both, 2, prompt, dt, &rng);
    outX = gc_outs(&X);
    outT = gc_outs(&T);
    gstep_alloc(&in, &X);
    gstep_fill(&in, &X, dt, &rng, &qr, 1);
    gc_eager(&X, &in, outX);
    gc_eager(&T, &in, outT);
    gc_compare(&X, dt, outX, outT, 1, 0.0, &max_err, "first step");
    /* The next step's inputs sit in X's tensors: the failing calls below get
     * valid device pointers except where a host pointer is the point. */
    gstep_fill(&in, &X, dt, &rng, &qr, 0);
    gc_put(&X, &in);
    CU_OK(X.c, fkv_sync(X.c));
    CK_CUDA(cudaStreamSynchronize(X.s));
    CK_CUDA(cudaMalloc(&scratch, 256));
    gc_batch(&X, &b, NULL);

    /* (a) The legacy stream while a blocking stream is capturing is
     * unusable (cudaErrorStreamCaptureImplicit): fkv_attend on it fails on
     * its first stream operation, before it launches anything. */
    {
        cudaStream_t blocking;
        CK_CUDA(cudaStreamCreate(&blocking));
        CU_OK(X.c, fkv_set_stream(X.c, NULL));
        CK_CUDA(cudaStreamBeginCapture(blocking,
                                       cudaStreamCaptureModeRelaxed));
        ce = cudaMemsetAsync(scratch, 0, 256, blocking);
        st = fkv_attend(X.c, 0, &b, X.dq[0], X.dout[0]);
        msg[0] = '\0';
        fkv_last_error(X.c, msg, sizeof msg);
        graph = NULL;
        (void)cudaStreamEndCapture(blocking, &graph);
        if (graph)
            (void)cudaGraphDestroy(graph);
        (void)cudaGetLastError();
        CK_CUDA(cudaStreamIsCapturing(blocking, &cap));
        ck_assert(cap == cudaStreamCaptureStatusNone);
        CK_CUDA(cudaStreamDestroy(blocking));
        CU_OK(X.c, fkv_set_stream(X.c, (void *)X.s));
        ck_assert_msg(ce == cudaSuccess, "cudaMemsetAsync under capture: %s",
                      cudaGetErrorString(ce));
        expect_device_error(X.c, st, msg,
                            "fkv_attend on the legacy stream during a "
                            "blocking stream's capture");
        printf("  device error (legacy stream): %s\n", msg);
    }

    /* (b) fkv_get_stats waits for the engine's stream, which is capturing:
     * cudaStreamSynchronize fails (cudaErrorStreamCaptureUnsupported). The
     * caller's stats are left as they were. */
    CK_CUDA(cudaStreamBeginCapture(X.s, cudaStreamCaptureModeRelaxed));
    ce = cudaMemsetAsync(scratch, 0, 256, X.s);
    memset(&stats, 0xAB, sizeof stats);
    stats.struct_size = sizeof stats;
    st = fkv_get_stats(X.c, &stats);
    msg[0] = '\0';
    fkv_last_error(X.c, msg, sizeof msg);
    graph = NULL;
    (void)cudaStreamEndCapture(X.s, &graph);
    if (graph)
        (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();
    CK_CUDA(cudaStreamIsCapturing(X.s, &cap));
    ck_assert(cap == cudaStreamCaptureStatusNone);
    ck_assert_msg(ce == cudaSuccess, "cudaMemsetAsync under capture: %s",
                  cudaGetErrorString(ce));
    expect_device_error(X.c, st, msg,
                        "fkv_get_stats while the engine's stream captures");
    ck_assert_msg(stats.steps == 0xABABABABABABABABull &&
                      stats.device_bytes == 0xABABABABABABABABull,
                  "a failed fkv_get_stats wrote the caller's stats");
    printf("  device error (sync under capture): %s\n", msg);

    /* (c) Opt-in (FKV_TEST_DESTROYED_STREAM=1): a destroyed stream. Using
     * one is undefined in CUDA (the runtime usually answers "invalid
     * resource handle", but it may also crash or find a new stream at the
     * same address), so it is not run by default. */
    if (getenv("FKV_TEST_DESTROYED_STREAM") &&
        strcmp(getenv("FKV_TEST_DESTROYED_STREAM"), "1") == 0) {
        cudaStream_t dead;
        CK_CUDA(cudaStreamCreateWithFlags(&dead, cudaStreamNonBlocking));
        CK_CUDA(cudaStreamDestroy(dead));
        st = fkv_set_stream(X.c, (void *)dead);
        if (st == FKV_OK)
            st = fkv_attend(X.c, 0, &b, X.dq[0], X.dout[0]);
        msg[0] = '\0';
        fkv_last_error(X.c, msg, sizeof msg);
        (void)cudaGetLastError();
        CU_OK(X.c, fkv_set_stream(X.c, (void *)X.s));
        expect_device_error(X.c, st, msg,
                            "fkv_set_stream/fkv_attend with a destroyed "
                            "stream");
        printf("  device error (destroyed stream): %s\n", msg);
    }

    /* (d) Host (malloc) pointers as tensors: FKV_ERR_INVALID_ARGUMENT, and
     * nothing changes. */
    for (i = 0; i < GC_BATCH; ++i)
        CU_OK(X.c, fkv_seq_length(X.c, X.id[i], &len_before[i]));
    hbuf = cu_xcalloc(1, X.q_bytes > X.kv_bytes ? X.q_bytes : X.kv_bytes);
    tst_expect_error(X.c, fkv_append(X.c, 0, &b, hbuf, X.dv[0]),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_append(k on the host)");
    tst_expect_error(X.c, fkv_append(X.c, 0, &b, X.dk[0], hbuf),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_append(v on the host)");
    tst_expect_error(X.c, fkv_attend(X.c, 0, &b, hbuf, X.dout[0]),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_attend(q on the host)");
    tst_expect_error(X.c, fkv_attend(X.c, 0, &b, X.dq[0], hbuf),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_attend(out on the host)");
    tst_expect_error(X.c, fkv_select(X.c, 0, &b, hbuf),
                     FKV_ERR_INVALID_ARGUMENT, "fkv_select(q on the host)");
    free(hbuf);
    for (i = 0; i < GC_BATCH; ++i) {
        int64_t n = -1;
        CU_OK(X.c, fkv_seq_length(X.c, X.id[i], &n));
        ck_assert_msg(n == len_before[i],
                      "seq %d: %lld tokens after failed calls, %lld before",
                      i, (long long)n, (long long)len_before[i]);
    }

    /* (e) X is usable and unchanged: the same steps as its twin. */
    gc_step(&X);
    gc_get(&X, outX);
    gc_eager(&T, &in, outT);
    gc_compare(&X, dt, outX, outT, 1, 0.0, &max_err,
               "first step after the errors");
    for (step = 0; step < 2; ++step) {
        gstep_fill(&in, &X, dt, &rng, &qr, 0);
        gc_eager(&X, &in, outX);
        gc_eager(&T, &in, outT);
        gc_compare(&X, dt, outX, outT, 1, 0.0, &max_err,
                   "step after the errors");
    }
    gc_same_state(&X, &T, "after the errors");
    {
        fkv_stats sx, sy;
        memset(&sx, 0, sizeof sx);
        memset(&sy, 0, sizeof sy);
        sx.struct_size = sy.struct_size = sizeof sx;
        CU_OK(X.c, fkv_get_stats(X.c, &sx));
        CU_OK(T.c, fkv_get_stats(T.c, &sy));
        ck_assert_msg(sx.steps == sy.steps, "steps %llu, twin %llu",
                      (unsigned long long)sx.steps,
                      (unsigned long long)sy.steps);
    }

    CK_CUDA(cudaFree(scratch));
    gstep_free(&in);
    gc_outs_free(outX);
    gc_outs_free(outT);
    gc_close(&X);
    gc_close(&T);
}
END_TEST

/* ====================================================================== */
/* 4. cuda_long_context_memory                                            */
/* ====================================================================== */

/* Appends `tokens` tokens (a constant pattern: the values do not matter
 * here) to the one sequence at every layer, then runs one decode step. */
static void mem_grow(fkv_cache *c, fkv_seq_id id, int layers, int32_t tokens,
                     void *dk, void *dq, void *dout)
{
    int32_t nt = tokens;
    fkv_batch bulk = {1, 0, &id, &nt};
    fkv_batch one = {1, 0, &id, NULL};
    int l;
    for (l = 0; l < layers; ++l)
        CU_OK(c, fkv_append(c, l, &bulk, dk, dk));
    for (l = 0; l < layers; ++l) {
        CU_OK(c, fkv_append(c, l, &one, dk, dk));
        CU_OK(c, fkv_attend(c, l, &one, dq, dout));
        CU_OK(c, fkv_select(c, l, &one, dq));
        CU_OK(c, fkv_recall(c, l, &one));
    }
    CK_CUDA(cudaDeviceSynchronize());
}

START_TEST(cuda_long_context_memory)
{
    const int L = 2, QH = 32, H = 8, D = 128, budget = 2048;
    const int64_t cap = 32768;
    const size_t esize = 2; /* bf16 */
    fkv_options o;
    fkv_cache *c;
    fkv_seq_id id;
    fkv_stats s0, s8, s32;
    void *dk = NULL, *dq = NULL, *dout = NULL;
    size_t kbytes = (size_t)(cap - 8192) * H * D * esize;
    int64_t n = 0;
    uint64_t kv_8k, full_kv, floor_bytes;
    int S = CU_SINK / CU_PAGE, W = CU_WINDOW / CU_PAGE;
    int K = (budget - CU_SINK - CU_WINDOW) / CU_PAGE;
    int max_pages = (int)(cap / CU_PAGE);

    cu_options(&o, FKV_BACKEND_CUDA, FKV_POLICY_FREEKV, FKV_DTYPE_BF16, L, QH,
               H, D, budget, 1, cap);
    c = cu_create(&o);
    CU_OK(c, fkv_seq_open(c, &id));
    CK_CUDA(cudaMalloc(&dk, kbytes));
    CK_CUDA(cudaMalloc(&dq, (size_t)QH * D * esize));
    CK_CUDA(cudaMalloc(&dout, (size_t)QH * D * esize));
    /* bf16 0x3c3c = 0.0115 everywhere. */
    CK_CUDA(cudaMemset(dk, 0x3c, kbytes));
    CK_CUDA(cudaMemset(dq, 0x3c, (size_t)QH * D * esize));
    CK_CUDA(cudaDeviceSynchronize());

    memset(&s0, 0, sizeof s0);
    s0.struct_size = sizeof s0;
    s8 = s32 = s0;
    CU_OK(c, fkv_get_stats(c, &s0));
    mem_grow(c, id, L, 8192 - 1, dk, dq, dout);
    CU_OK(c, fkv_seq_length(c, id, &n));
    ck_assert_int_eq(n, 8192);
    CU_OK(c, fkv_get_stats(c, &s8));
    mem_grow(c, id, L, (int32_t)(cap - 8192 - 1), dk, dq, dout);
    CU_OK(c, fkv_seq_length(c, id, &n));
    ck_assert_int_eq(n, cap);
    CU_OK(c, fkv_get_stats(c, &s32));

    /* Device memory is allocated at fkv_create and fkv_seq_open for the
     * capacity; only lengths change after that. */
    ck_assert_msg(s8.device_bytes > 0, "device_bytes is 0 on the CUDA "
                  "backend");
    ck_assert_msg(s8.device_bytes == s0.device_bytes,
                  "device_bytes %llu after 8K tokens, %llu after open",
                  (unsigned long long)s8.device_bytes,
                  (unsigned long long)s0.device_bytes);
    ck_assert_msg(s32.device_bytes == s8.device_bytes,
                  "device_bytes grew from %llu (8K tokens) to %llu (32K)",
                  (unsigned long long)s8.device_bytes,
                  (unsigned long long)s32.device_bytes);
    /* At least what docs/api.md section 12 lists per (layer, KV head):
     * S + (W + 1) + K pages and the summaries of the capacity ... */
    floor_bytes = (uint64_t)L * H *
                  ((uint64_t)(S + W + 1 + K) * 2 * CU_PAGE * D * esize +
                   (uint64_t)2 * max_pages * D * esize);
    ck_assert_msg(s32.device_bytes >= floor_bytes,
                  "device_bytes %llu is below the documented %llu",
                  (unsigned long long)s32.device_bytes,
                  (unsigned long long)floor_bytes);
    /* ... and far from the K/V of the whole context, which stays on the
     * host. */
    full_kv = (uint64_t)cap * L * H * D * 2 * esize;
    ck_assert_msg(s32.device_bytes < full_kv / 4,
                  "device_bytes %llu: FREEKV holds most of the %llu bytes of "
                  "K/V on the device", (unsigned long long)s32.device_bytes,
                  (unsigned long long)full_kv);
    /* The host pool holds every token's K and V: it grows with the
     * context and holds at least the K/V of all of it. */
    kv_8k = (uint64_t)8192 * L * H * D * 2 * esize;
    ck_assert_msg(s8.host_bytes >= kv_8k,
                  "host_bytes %llu at 8K tokens, below their %llu bytes of "
                  "K/V", (unsigned long long)s8.host_bytes,
                  (unsigned long long)kv_8k);
    ck_assert_msg(s32.host_bytes > s8.host_bytes && s32.host_bytes >= full_kv,
                  "host_bytes %llu at 32K tokens (%llu at 8K): it should "
                  "grow and hold the %llu bytes of K/V",
                  (unsigned long long)s32.host_bytes,
                  (unsigned long long)s8.host_bytes,
                  (unsigned long long)full_kv);
    printf("  memory: device %llu bytes (8K and 32K tokens), host %llu -> "
           "%llu bytes\n", (unsigned long long)s32.device_bytes,
           (unsigned long long)s8.host_bytes,
           (unsigned long long)s32.host_bytes);
    fflush(stdout);

    CU_OK(c, fkv_seq_close(c, id));
    fkv_destroy(c);
    CK_CUDA(cudaFree(dk));
    CK_CUDA(cudaFree(dq));
    CK_CUDA(cudaFree(dout));
}
END_TEST

/* ====================================================================== */
/* 5. cuda_slot_reuse                                                     */
/* ====================================================================== */

/* _i: the policy. A sequence slot's device region is kept at fkv_seq_close
 * and reused by the slot's next sequence, without waiting for the host.
 * Cache X closes and reopens its sequences with the previous ones' work
 * (and the side stream's speculative selection and recall) still queued;
 * its twin T runs the same calls but drains everything (fkv_sync) before
 * the close. Every later output, selection, length and counter agrees
 * byte for byte, and reopening allocates no device memory. */
START_TEST(cuda_slot_reuse)
{
    const fkv_policy policy = k_graph_policies[_i];
    const fkv_dtype dt = FKV_DTYPE_BF16;
    const int32_t prompt_old[GC_BATCH] = {700, 1333};
    const int32_t prompt[GC_BATCH] = {1500, 2103};
    fkv_options o;
    gcache X, T;
    gcache *both[2] = {&X, &T};
    gstep in;
    unsigned char **outX, **outT;
    uint64_t rng = 0x5E0000ull + (uint64_t)_i;
    ref_rng qr;
    fkv_stats s0, s1;
    int i, step;
    double max_err = 0.0;

    ref_rng_seed(&qr, 0x5E1000ull + (uint64_t)_i);
    cu_options(&o, FKV_BACKEND_CUDA, policy, dt, 3, 8, 2, 128, 512, GC_BATCH,
               4096);
    gc_open(&X, &o);
    gc_open(&T, &o);
    outX = gc_outs(&X);
    outT = gc_outs(&T);
    gstep_alloc(&in, &X);

    /* The previous sequences: a prompt and two decode steps, left in
     * flight on X. */
    gc_prefill_all(both, 2, prompt_old, dt, &rng);
    for (step = 0; step < 2; ++step) {
        gstep_fill(&in, &X, dt, &rng, &qr, step == 0);
        gc_put(&X, &in);
        gc_step(&X);
        gc_put(&T, &in);
        gc_step(&T);
    }
    CU_OK(T.c, fkv_sync(T.c));
    for (i = 0; i < GC_BATCH; ++i) {
        CU_OK(X.c, fkv_seq_close(X.c, X.id[i]));
        CU_OK(T.c, fkv_seq_close(T.c, T.id[i]));
    }
    for (i = 0; i < GC_BATCH; ++i) {
        CU_OK(X.c, fkv_seq_open(X.c, &X.id[i]));
        CU_OK(T.c, fkv_seq_open(T.c, &T.id[i]));
    }

    /* The new sequences in the same slots. */
    gc_prefill_all(both, 2, prompt, dt, &rng);
    for (step = 0; step < 3; ++step) {
        gstep_fill(&in, &X, dt, &rng, &qr, step == 0);
        gc_eager(&X, &in, outX);
        gc_eager(&T, &in, outT);
        gc_compare(&X, dt, outX, outT, 1, 0.0, &max_err,
                   "step after the slots were reused");
    }
    gc_same_state(&X, &T, "after the slots were reused");

    /* Reopening a slot allocates nothing. */
    memset(&s0, 0, sizeof s0);
    s0.struct_size = sizeof s0;
    s1 = s0;
    CU_OK(X.c, fkv_get_stats(X.c, &s0));
    CU_OK(X.c, fkv_seq_close(X.c, X.id[0]));
    CU_OK(X.c, fkv_seq_open(X.c, &X.id[0]));
    CU_OK(X.c, fkv_get_stats(X.c, &s1));
    ck_assert_msg(s1.device_bytes == s0.device_bytes,
                  "device_bytes %llu after reopening a slot, %llu before",
                  (unsigned long long)s1.device_bytes,
                  (unsigned long long)s0.device_bytes);

    gstep_free(&in);
    gc_outs_free(outX);
    gc_outs_free(outT);
    gc_close(&X);
    gc_close(&T);
}
END_TEST

/* ====================================================================== */
/* 6. cuda_pointer_checks                                                 */
/* ====================================================================== */


/* The user tensors are checked once per allocation: a decode step with the
 * tensors of the step before asks CUDA nothing; rows at an offset inside
 * those allocations neither (the allocation's range is remembered); after
 * fkv_sync they are checked again. */
START_TEST(cuda_pointer_checks)
{
    const fkv_dtype dt = FKV_DTYPE_BF16;
    const int32_t prompt[GC_BATCH] = {600, 913};
    fkv_options o;
    gcache X;
    gcache *one[1] = {&X};
    gstep in;
    unsigned char **outX;
    uint64_t rng = 0x9C0000ull;
    ref_rng qr;
    uint64_t q0, q1, q2, q3;
    fkv_batch b1;
    size_t qrow;
    int l;

    ref_rng_seed(&qr, 0x9C1000ull);
    cu_options(&o, FKV_BACKEND_CUDA, FKV_POLICY_FREEKV, dt, 3, 8, 2, 128, 512,
               GC_BATCH, 4096);
    gc_open(&X, &o);
    gc_prefill_all(one, 1, prompt, dt, &rng);
    outX = gc_outs(&X);
    gstep_alloc(&in, &X);
    gstep_fill(&in, &X, dt, &rng, &qr, 1);
    gc_eager(&X, &in, outX);
    q0 = fkvi_debug_pointer_queries(X.c);
    ck_assert_msg(q0 > 0, "no pointer was ever checked");

    gstep_fill(&in, &X, dt, &rng, &qr, 0);
    gc_eager(&X, &in, outX);
    q1 = fkvi_debug_pointer_queries(X.c);
    ck_assert_msg(q1 == q0, "a decode step with the same tensors asked CUDA "
                  "about %llu pointers", (unsigned long long)(q1 - q0));

    /* The second sequence alone: its q and out rows one row into the same
     * allocations. */
    qrow = (size_t)X.QH * X.D * X.esize;
    b1.num_seqs = 1;
    b1.reserved = 0;
    b1.seq_ids = &X.id[1];
    b1.num_tokens = NULL;
    for (l = 0; l < X.L; ++l)
        CU_OK(X.c, fkv_attend(X.c, l, &b1, (char *)X.dq[l] + qrow,
                              (char *)X.dout[l] + qrow));
    CK_CUDA(cudaStreamSynchronize(X.s));
    q2 = fkvi_debug_pointer_queries(X.c);
    ck_assert_msg(q2 == q1, "rows inside accepted allocations were checked "
                  "again (%llu queries): the driver gave no allocation "
                  "range (cuPointerGetAttributes)",
                  (unsigned long long)(q2 - q1));

    CU_OK(X.c, fkv_sync(X.c));
    gstep_fill(&in, &X, dt, &rng, &qr, 0);
    gc_eager(&X, &in, outX);
    q3 = fkvi_debug_pointer_queries(X.c);
    ck_assert_msg(q3 > q2, "after fkv_sync the tensors were not checked "
                  "again");

    gstep_free(&in);
    gc_outs_free(outX);
    gc_close(&X);
}
END_TEST

/* ====================================================================== */
/* 7. cuda_fused_combine                                                  */
/* ====================================================================== */

/* Configurations: split counts > 1 everywhere (batch 1 at long contexts
 * splits most); every dtype, head_dim 64 and 128, GQA groups 1-8, f32's
 * CUDA-core engine with 1, 3 and 4 heads per block; the last two attend
 * few pages, so the fused path's splits are parts of pages (16 rows). */
typedef struct fused_cfg {
    fkv_dtype dt;
    fkv_policy policy;
    int d, qh, kvh, batch;
    int32_t ctx;
} fused_cfg;
static const fused_cfg k_fused[] = {
    {FKV_DTYPE_BF16, FKV_POLICY_FREEKV, 128, 32, 8, 1, 8192},
    {FKV_DTYPE_BF16, FKV_POLICY_DENSE, 64, 8, 2, 4, 3000},
    {FKV_DTYPE_F16, FKV_POLICY_SYNC, 128, 16, 4, 2, 6000},
    {FKV_DTYPE_F16, FKV_POLICY_RESIDENT, 64, 8, 8, 8, 1200},
    {FKV_DTYPE_F32, FKV_POLICY_FREEKV, 128, 8, 2, 2, 5000},
    {FKV_DTYPE_F32, FKV_POLICY_DENSE, 64, 12, 4, 1, 9000},
    {FKV_DTYPE_F32, FKV_POLICY_DENSE, 128, 4, 4, 3, 2500},
    /* short lists: the fused path splits inside pages */
    {FKV_DTYPE_BF16, FKV_POLICY_DENSE, 128, 8, 2, 1, 300},
    {FKV_DTYPE_F16, FKV_POLICY_FREEKV, 64, 16, 2, 1, 1000},
};
#define FUSED_CONFIGS ((int)(sizeof k_fused / sizeof k_fused[0]))
#define FUSED_REPLAYS 3

/* Whether FKV_CUDA_EXPERIMENTAL=1, which `test` needs for `part`; else says
 * "skipped". */
static int switch_on(const char *test, const char *part)
{
    if (tst_cuda_experimental())
        return 1;
    printf("  %s: skipped (FKV_CUDA_EXPERIMENTAL is not 1: %s is off)\n",
           test, part);
    fflush(stdout);
    return 0;
}

/* A cache created with FKV_CUDA_EXPERIMENTAL set to `value` (the switch is
 * read at fkv_create only), the caller's setting restored after. */
static void fused_open(gcache *gc, const fkv_options *o, int nseq,
                       const char *value)
{
    const char *was = getenv("FKV_CUDA_EXPERIMENTAL");
    char keep[16];
    snprintf(keep, sizeof keep, "%s", was ? was : "");
    ck_assert(setenv("FKV_CUDA_EXPERIMENTAL", value, 1) == 0);
    gc_open_n(gc, o, nseq);
    if (was)
        ck_assert(setenv("FKV_CUDA_EXPERIMENTAL", keep, 1) == 0);
    else
        ck_assert(unsetenv("FKV_CUDA_EXPERIMENTAL") == 0);
}

/* _i: k_fused. Cache F (switch on: one fused launch per attend) against
 * cache U (switch off: split and combine launches), same inputs: eager
 * steps, then one step captured in a CUDA graph (node priorities) and
 * replayed FUSED_REPLAYS times with fresh inputs, each replay against U's
 * eager step. A ticket counter that was not put back to 0 leaves the next
 * launch without a combining block: its outputs would stay those of the
 * step before, which fresh inputs tell apart. Then eager again after
 * fkv_sync. Outputs agree within the dtype's tolerance (the combine sums
 * the splits in another order); the counts of bit-identical elements are
 * printed. */
START_TEST(cuda_fused_combine)
{
    const fused_cfg *cf = &k_fused[_i];
    const fkv_dtype dt = cf->dt;
    const int sparse = cf->policy != FKV_POLICY_DENSE;
    int32_t prompt[CU_MAX_BATCH];
    fkv_options o;
    gcache F, U;
    gcache *both[2] = {&F, &U};
    gstep in;
    unsigned char **outF, **outU;
    uint64_t rng = 0x7C0000ull + (uint64_t)_i;
    ref_rng qr;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t ce;
    fkv_status cst = FKV_OK;
    char cmsg[768], what[128];
    fkv_batch b;
    int l, i, r, step, diff = 0, total = 0;
    double max_err = 0.0;

    if (!switch_on("cuda_fused_combine", "the fused combine"))
        return;
    for (i = 0; i < cf->batch; ++i)
        prompt[i] = cf->ctx - 97 * i;
    ref_rng_seed(&qr, 0x7C1000ull + (uint64_t)_i);
    cu_options(&o, FKV_BACKEND_CUDA, cf->policy, dt, 2, cf->qh, cf->kvh,
               cf->d, 512, cf->batch, cf->ctx + 64);
    fused_open(&F, &o, cf->batch, "1");
    fused_open(&U, &o, cf->batch, "0");
    gc_prefill_all(both, 2, prompt, dt, &rng);
    outF = gc_outs(&F);
    outU = gc_outs(&U);
    gstep_alloc(&in, &F);

    for (step = 0; step < 2; ++step) {
        gstep_fill(&in, &F, dt, &rng, &qr, step == 0);
        gc_eager(&F, &in, outF);
        gc_eager(&U, &in, outU);
        snprintf(what, sizeof what, "config %d eager step %d", _i, step);
        diff += gc_compare(&F, dt, outF, outU, 0, tst_tol(dt), &max_err,
                           what);
        total += F.L * F.B * F.QH * F.D;
    }

    for (i = 0; i < cf->batch; ++i) {
        int64_t n = -1;
        CU_OK(F.c, fkv_seq_length(F.c, F.id[i], &n));
        CU_OK(F.c, fkv_seq_reserve(F.c, F.id[i], n + FUSED_REPLAYS));
        CU_OK(U.c, fkv_seq_reserve(U.c, U.id[i], n + FUSED_REPLAYS));
    }
    CU_OK(F.c, fkv_sync(F.c));
    CK_CUDA(cudaStreamSynchronize(F.s));
    gc_batch(&F, &b, NULL);
    cmsg[0] = '\0';
    CK_CUDA(cudaStreamBeginCapture(F.s, cudaStreamCaptureModeGlobal));
    for (l = 0; l < F.L && cst == FKV_OK; ++l) {
        cst = fkv_append(F.c, l, &b, F.dk[l], F.dv[l]);
        if (cst == FKV_OK)
            cst = fkv_attend(F.c, l, &b, F.dq[l], F.dout[l]);
        if (cst == FKV_OK)
            cst = fkv_select(F.c, l, &b, F.dq[l]);
        if (cst == FKV_OK)
            cst = fkv_recall(F.c, l, &b);
    }
    if (cst != FKV_OK)
        fkv_last_error(F.c, cmsg, sizeof cmsg);
    ce = cudaStreamEndCapture(F.s, &graph);
    if (ce != cudaSuccess)
        (void)cudaGetLastError();
    ck_assert_msg(cst == FKV_OK, "a call under capture returned %d (%s): %s",
                  (int)cst, fkv_status_string(cst), cmsg);
    ck_assert_msg(ce == cudaSuccess && graph != NULL,
                  "cudaStreamEndCapture: %s (%s)", cudaGetErrorString(ce),
                  cudaGetErrorName(ce));
    CK_CUDA(cudaGraphInstantiateWithFlags(
        &exec, graph, cudaGraphInstantiateFlagUseNodePriority));
    for (r = 0; r < FUSED_REPLAYS; ++r) {
        gstep_fill(&in, &F, dt, &rng, &qr, 0);
        gc_put(&F, &in);
        CK_CUDA(cudaGraphLaunch(exec, F.s));
        gc_get(&F, outF);
        gc_eager(&U, &in, outU);
        snprintf(what, sizeof what, "config %d replay %d vs unfused eager",
                 _i, r);
        diff += gc_compare(&F, dt, outF, outU, 0, tst_tol(dt), &max_err,
                           what);
        total += F.L * F.B * F.QH * F.D;
    }
    CU_OK(F.c, fkv_sync(F.c));
    if (sparse) {
        /* device_bytes may differ: the fused path sizes its partials for
         * more splits. */
        snprintf(what, sizeof what, "config %d after the replays", _i);
        gc_same_state_x(&F, &U, what, 0);
    }
    gstep_fill(&in, &F, dt, &rng, &qr, 0);
    gc_eager(&F, &in, outF);
    gc_eager(&U, &in, outU);
    snprintf(what, sizeof what, "config %d eager step after the replays", _i);
    diff += gc_compare(&F, dt, outF, outU, 0, tst_tol(dt), &max_err, what);
    total += F.L * F.B * F.QH * F.D;

    printf("  fused combine %s %s D=%d %d/%d heads batch %d ctx %d: %d of %d "
           "output elements differ in some bit from the two-launch path "
           "(max rel err %.2e)\n",
           cu_policy_name(cf->policy), cu_dtype_name(dt), cf->d, cf->qh,
           cf->kvh, cf->batch, (int)cf->ctx, diff, total, max_err);
    fflush(stdout);

    CK_CUDA(cudaGraphExecDestroy(exec));
    CK_CUDA(cudaGraphDestroy(graph));
    gstep_free(&in);
    gc_outs_free(outF);
    gc_outs_free(outU);
    gc_close(&F);
    gc_close(&U);
}
END_TEST

/* ====================================================================== */
/* cuda_launch_cache                                                      */
/* ====================================================================== */

typedef struct lc_cfg {
    fkv_policy policy;
    int bounded;     /* FKV_CRITERION_BOUNDED */
    int dense_first; /* dense_layers = {1, 0, 0} */
    int batch;       /* sequences; the middle steps run one fewer */
    int spills;      /* the attend's record outgrows a record */
    int rebuilds;    /* one fewer sequence is one launch chunk fewer */
} lc_cfg;
/* 33 sequences are two launch chunks and 32 one: the attend's graph then
 * has other kernel counts, so it is built again instead of updated. 70
 * are three chunks, and BOUNDED's four kernels a chunk outgrow a record's
 * 16 KiB in the third, so the attend spills (its recorded kernels first,
 * the rest straight to the stream) while the recall (two kernels a chunk)
 * is still cached. */
static const lc_cfg k_lc[] = {
    {FKV_POLICY_FREEKV, 0, 0, 3, 0, 0},  {FKV_POLICY_FREEKV, 1, 0, 3, 0, 0},
    {FKV_POLICY_SYNC, 0, 0, 3, 0, 0},    {FKV_POLICY_RESIDENT, 0, 0, 3, 0, 0},
    {FKV_POLICY_FREEKV, 0, 1, 3, 0, 0},  {FKV_POLICY_DENSE, 0, 0, 3, 0, 0},
    {FKV_POLICY_FREEKV, 0, 0, 33, 0, 1}, {FKV_POLICY_FREEKV, 1, 0, 70, 1, 0},
};
#define LC_CONFIGS ((int)(sizeof k_lc / sizeof k_lc[0]))

/* Inputs, one eager step over the first n sequences with fkv_select(NULL)
 * (nothing launched between the attend and the recall), outputs. */
static void lc_step(gcache *gc, const gstep *in, int n, unsigned char **out)
{
    gc_put(gc, in);
    gc_step_n(gc, n, 0);
    gc_get(gc, out);
}

/* _i: k_lc. Cache X launches through the launch cache, on by default
 * (X is made with FKV_CUDA_EXPERIMENTAL at 0); its twin U is made the same
 * way with the cache turned off, so both run the same kernels with the
 * same arguments, X's as graph launches where a call repeats. Steps: 4 over
 * the whole batch (the second of each call builds its graph, the next ones
 * replay it), 3 over one sequence fewer (other records: direct, then the
 * graph updated in place, or built again where the kernel count changed),
 * 2 over the whole batch again. Every step's outputs are byte-identical to
 * U's, and so are the lengths, selections and counters; X made graph
 * launches wherever a call has two kernels or more. */
START_TEST(cuda_launch_cache)
{
    const lc_cfg *cf = &k_lc[_i];
    const fkv_policy policy = cf->policy;
    const fkv_dtype dt = FKV_DTYPE_BF16;
    const int B = cf->batch;
    static const uint8_t dense_first[3] = {1, 0, 0};
    int32_t prompt[CU_MAX_BATCH];
    int sizes[9];
    fkv_options o;
    gcache X, U;
    gcache *both[2] = {&X, &U};
    gstep in;
    unsigned char **outX, **outU;
    uint64_t rng = 0x7D0000ull + (uint64_t)_i;
    fkvi_launch_cache_counts n, un;
    ref_rng qr;
    char what[96];
    int step, i;
    double max_err = 0.0;

    ck_assert(B <= CU_MAX_BATCH);
    for (i = 0; i < B; ++i)
        prompt[i] = B > 3 ? 1000 + 13 * i : 1500 + 301 * i;
    for (step = 0; step < 9; ++step)
        sizes[step] = step >= 4 && step < 7 ? B - 1 : B;
    ref_rng_seed(&qr, 0x7D1000ull + (uint64_t)_i);
    cu_options(&o, FKV_BACKEND_CUDA, policy, dt, 3, 8, 2, 128, 512, B, 4096);
    if (cf->bounded) {
        o.correction_criterion = FKV_CRITERION_BOUNDED;
        o.correction_min_mass = 0.002f;
        o.correction_max_pages = 4;
    }
    if (cf->dense_first)
        o.dense_layers = dense_first;
    fused_open(&X, &o, B, "0");
    fused_open(&U, &o, B, "0");
    ck_assert_msg(fkvi_debug_launch_cache(X.c, &n),
                  "the launch cache is off by default");
    fkvi_debug_launch_cache_off(U.c);
    ck_assert(!fkvi_debug_launch_cache(U.c, &un));
    gc_prefill_all(both, 2, prompt, dt, &rng);
    outX = gc_outs(&X);
    outU = gc_outs(&U);
    gstep_alloc(&in, &X);

    for (step = 0; step < 9; ++step) {
        gstep_fill(&in, &X, dt, &rng, &qr, step == 0);
        lc_step(&X, &in, sizes[step], outX);
        lc_step(&U, &in, sizes[step], outU);
        snprintf(what, sizeof what, "%s config %d step %d (%d sequences)",
                 cu_policy_name(policy), _i, step, sizes[step]);
        gc_compare(&X, dt, outX, outU, 1, 0.0, &max_err, what);
        CU_OK(X.c, fkv_sync(X.c));
        CU_OK(U.c, fkv_sync(U.c));
        gc_same_state(&X, &U, what);
    }
    ck_assert(fkvi_debug_launch_cache(X.c, &n));
    ck_assert(!fkvi_debug_launch_cache(U.c, &un));
    ck_assert(un.graph_launches == 0 && un.graphs_built == 0 &&
              un.graphs_updated == 0 && un.spilled_calls == 0);
    /* Every attend of a layer that selects has two kernels or more (the
     * selection, the attention), and so has a recall of two chunks: a
     * call's record repeats on steps 1-3, 5-6 and 8 (a new batch on steps 4
     * and 7 is enqueued directly, then its graph made at its first
     * repeat), so at least 6 graph launches per such layer, one graph built
     * and two updates (or three builds where the kernel count changes).
     * Fewer: a record that changes between identical calls. A spilling
     * attend makes no graph, and spills on each of its 27 calls. */
    if (cf->policy != FKV_POLICY_DENSE) {
        const uint64_t sparse = (uint64_t)(cf->dense_first ? 2 : 3);
        ck_assert_msg(n.graph_launches >= 6 * sparse &&
                          n.graphs_built >= (cf->rebuilds ? 3 : 1) * sparse &&
                          (cf->rebuilds || n.graphs_updated >= 2 * sparse),
                      "%s config %d: %llu graph launches, %llu graphs built, "
                      "%llu updated over %llu selecting layers",
                      cu_policy_name(policy), _i,
                      (unsigned long long)n.graph_launches,
                      (unsigned long long)n.graphs_built,
                      (unsigned long long)n.graphs_updated,
                      (unsigned long long)sparse);
    }
    ck_assert_msg(cf->spills ? n.spilled_calls >= 27 : n.spilled_calls == 0,
                  "%llu calls spilled their record (config %d)",
                  (unsigned long long)n.spilled_calls, _i);
    ck_assert_msg(n.graphs_built + n.graphs_updated <= n.graph_launches,
                  "%llu graphs built and %llu updated for %llu graph launches",
                  (unsigned long long)n.graphs_built,
                  (unsigned long long)n.graphs_updated,
                  (unsigned long long)n.graph_launches);
    printf("  launch cache %s config %d, %d sequences: %llu graph launches, "
           "%llu graphs built, %llu updated, %llu spilled calls over 9 steps "
           "of 3 layers; outputs byte-identical\n",
           cu_policy_name(policy), _i, B, (unsigned long long)n.graph_launches,
           (unsigned long long)n.graphs_built,
           (unsigned long long)n.graphs_updated,
           (unsigned long long)n.spilled_calls);
    fflush(stdout);

    gstep_free(&in);
    gc_outs_free(outX);
    gc_outs_free(outU);
    gc_close(&X);
    gc_close(&U);
}
END_TEST

#endif /* FKV_WITH_CUDA */

Suite *suite_cuda(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "cuda"));
#ifdef FKV_WITH_CUDA
    tcase_add_loop_test(tst_tcase(s, "cuda_vs_cpu_agreement"),
                        cuda_vs_cpu_agreement, 0, AGREE_CONFIGS);
    tcase_add_loop_test(tst_tcase(s, "cuda_graph_capture"),
                        cuda_graph_capture, 0, 8);
    tcase_add_test(tst_tcase(s, "cuda_device_errors"), cuda_device_errors);
    tcase_add_test(tst_tcase(s, "cuda_long_context_memory"),
                   cuda_long_context_memory);
    tcase_add_loop_test(tst_tcase(s, "cuda_slot_reuse"), cuda_slot_reuse, 0,
                        4);
    tcase_add_test(tst_tcase(s, "cuda_pointer_checks"), cuda_pointer_checks);
    /* With FKV_CUDA_EXPERIMENTAL=1 only ("skipped" otherwise). */
    tcase_add_loop_test(tst_tcase(s, "cuda_fused_combine"), cuda_fused_combine,
                        0, FUSED_CONFIGS);
    tcase_add_loop_test(tst_tcase(s, "cuda_launch_cache"), cuda_launch_cache,
                        0, LC_CONFIGS);
    tst_add_recall_plan(s);
#else
    /* Without CUDA the suite has no cases (main.c never adds it then). */
    (void)cuda_vs_cpu_agreement;
#endif
    return s;
}
