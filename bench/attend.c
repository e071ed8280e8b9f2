/*
 * bench/attend: the decode attention kernel's time and achieved bandwidth,
 * against a device-to-device cudaMemcpy measured in the same run.
 *
 * Method (public API only): a FKV_POLICY_DENSE cache on the CUDA backend
 * with one layer, each sequence's context equal to the budget and
 * max_tokens_per_sequence equal to it too, so that fkv_attend is exactly the
 * split attention kernel + the combine kernel over `budget` tokens (no
 * selection, no recall, the same split grid eagerly and under graph
 * capture). For budgets 512..8192 and batches 1..32 (Llama-3.1-8B's layer
 * by default: 32 query heads, 8 KV heads, head_dim 128, bf16):
 *   - the calls of a timing pass rotate over enough sequences that their K/V
 *     spans at least max(256 MiB, 4 x L2): each call reads K/V that is not
 *     in L2;
 *   - time per call from CUDA events around replays of a CUDA graph of a
 *     pass of calls (>= 32 calls; median of --reps replays): the kernels'
 *     time without host launch overhead; beside it the eager time per call
 *     (events around the same pass issued from the host: what an engine that
 *     does not use graphs sees);
 *   - achieved bandwidth = (unique K+V bytes + q + out) / time, and its
 *     share of the copy bandwidth (2 x bytes / time of one large
 *     cudaMemcpyAsync D2D). Target: >= 70% at batch >= 8;
 *   - beside it the same-traffic copy: a graph of as many D2D copies of
 *     half the call's bytes (read + written = the call's bytes), rotating
 *     over as much memory as the calls; copy time / call time is the
 *     call's share of what a copy of its size achieves (the fixed cost of
 *     a launch and of the first HBM round trips counted on both sides).
 * Then one RESIDENT configuration (selection + attention in one fkv_attend:
 * context 32K, budget 2048, batch 8 by default) for comparison with DENSE at
 * the same attended size.
 *
 * Self-check: before and after timing, outputs of the first and last
 * sequences of a batch are compared with a float64 attention computed on the
 * host from the same K/V/q (RESIDENT: over the sink, the selected pages that
 * fkv_get_selected_pages reports, the window and the partial page); exit 1
 * beyond the dtype's tolerance.
 *
 * Prints a compact table last; --csv FILE writes its rows. --smoke runs the
 * smallest configuration; without a usable CUDA device (or built with
 * CUDA=0) it prints one "skipped" line and exits 0 with --smoke, 1 without.
 * --cpu-check runs the same flow (data, reference, token sets) on the CPU
 * backend with host memory and host timing: a check of this program's
 * logic on any machine, not a benchmark.
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L

#include "bench.h"

#include <stdbool.h>

#ifdef FKV_WITH_CUDA
#include "kernels.h"
#endif

/* The backend of the GPU runs. A dry run of this program's CUDA-path logic
 * (events, graph capture) on a stand-in runtime can build it with
 * -DATTEND_GPU_BACKEND=FKV_BACKEND_CPU, as tests/test_cuda.c's
 * TST_CUDA_PEER. */
#ifndef ATTEND_GPU_BACKEND
#define ATTEND_GPU_BACKEND FKV_BACKEND_CUDA
#endif

#define MAX_LIST 16
#define MAX_BATCH 32
#define SLACK_TOKENS 512 /* sequences start at different offsets of the data */

typedef struct config {
    bool smoke, cpu_check;
    const char *csv;
    int device;
    int budgets[MAX_LIST], nbudgets;
    int batches[MAX_LIST], nbatches;
    int q_heads, kv_heads, head_dim;
    fkv_dtype dtype;
    int reps, eager_reps, min_calls;
    int rotate_mib; /* 0: max(256, 4 x L2) */
    bool resident;
    int res_context, res_batch, res_budget;
} config;

static const char k_usage[] =
    "usage: attend [--smoke] [--csv FILE] [--device N]\n"
    "              [--budgets 512,1024,2048,4096,8192] [--batches 1,2,4,8,16,32]\n"
    "              [--q-heads 32] [--kv-heads 8] [--head-dim 128]\n"
    "              [--dtype bf16|f16|f32] [--reps N] [--min-calls N]\n"
    "              [--rotate-mib N] [--no-resident] [--resident-context N]\n"
    "              [--resident-batch N] [--resident-budget N] [--cpu-check]\n"
    "  --rotate-mib: K/V bytes each timing pass rotates over (0: max(256 MiB,\n"
    "                4 x L2))\n"
    "  --cpu-check: the same flow on the CPU backend (host memory and host\n"
    "               timing): checks this program's logic, not a benchmark\n";

/* ------------------------------------------------------------------------ */
/* dtypes                                                                   */
/* ------------------------------------------------------------------------ */

/* Tolerance of the GPU's output against the float64 reference (relative
 * L2 error per query head), as tests/test_cuda.c's cu_tol. */
static double dtype_tol(fkv_dtype dt)
{
    return dt == FKV_DTYPE_F16 ? 3e-3 : dt == FKV_DTYPE_BF16 ? 2e-2 : 1e-4;
}

/* ------------------------------------------------------------------------ */
/* Arguments                                                                */
/* ------------------------------------------------------------------------ */

static int parse_args(int argc, char **argv, config *c)
{
    memset(c, 0, sizeof *c);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--smoke"))
            c->smoke = true;
        if (!strcmp(argv[i], "--cpu-check"))
            c->cpu_check = true;
    }
    const bool small = c->smoke || c->cpu_check;
    {
        const int bu[] = {512, 1024, 2048, 4096, 8192};
        const int ba[] = {1, 2, 4, 8, 16, 32};
        const int sbu[] = {512}, sba[] = {1};
        const int cbu[] = {512, 1024}, cba[] = {1, 2};
        if (c->cpu_check) {
            bench_set_list(c->budgets, &c->nbudgets, cbu, 2);
            bench_set_list(c->batches, &c->nbatches, cba, 2);
        } else if (c->smoke) {
            bench_set_list(c->budgets, &c->nbudgets, sbu, 1);
            bench_set_list(c->batches, &c->nbatches, sba, 1);
        } else {
            bench_set_list(c->budgets, &c->nbudgets, bu, 5);
            bench_set_list(c->batches, &c->nbatches, ba, 6);
        }
    }
    c->q_heads = 32;
    c->kv_heads = 8;
    c->head_dim = 128;
    c->dtype = FKV_DTYPE_BF16;
    c->reps = small ? 3 : 20;
    c->eager_reps = small ? 2 : 5;
    c->min_calls = small ? 4 : 32;
    c->rotate_mib = small ? 16 : 0;
    c->resident = true;
    c->res_context = small ? 4096 : 32768;
    c->res_batch = c->cpu_check ? 2 : small ? 1 : 8;
    c->res_budget = 2048;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
#define NEEDV                                                                \
    do {                                                                     \
        if (!v) {                                                            \
            fprintf(stderr, "attend: %s needs a value\n%s", a, k_usage);     \
            return -1;                                                       \
        }                                                                    \
        i++;                                                                 \
    } while (0)
        if (!strcmp(a, "--smoke") || !strcmp(a, "--cpu-check")) {
            continue;
        } else if (!strcmp(a, "--no-resident")) {
            c->resident = false;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            fputs(k_usage, stdout);
            exit(0);
        } else if (!strcmp(a, "--csv")) {
            NEEDV;
            c->csv = v;
        } else if (!strcmp(a, "--device")) {
            NEEDV;
            bad = bench_parse_int(v, 0, 1024, &c->device);
        } else if (!strcmp(a, "--budgets")) {
            NEEDV;
            bad = bench_parse_list(v, 1, 1 << 20, c->budgets, &c->nbudgets,
                                   MAX_LIST);
        } else if (!strcmp(a, "--batches")) {
            NEEDV;
            bad = bench_parse_list(v, 1, MAX_BATCH, c->batches, &c->nbatches,
                                   MAX_LIST);
        } else if (!strcmp(a, "--q-heads")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 1024, &c->q_heads);
        } else if (!strcmp(a, "--kv-heads")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 1024, &c->kv_heads);
        } else if (!strcmp(a, "--head-dim")) {
            NEEDV;
            bad = bench_parse_int(v, 64, 256, &c->head_dim) ||
                  (c->head_dim != 64 && c->head_dim != 128 &&
                   c->head_dim != 256);
        } else if (!strcmp(a, "--dtype")) {
            NEEDV;
            if (!strcmp(v, "bf16"))
                c->dtype = FKV_DTYPE_BF16;
            else if (!strcmp(v, "f16"))
                c->dtype = FKV_DTYPE_F16;
            else if (!strcmp(v, "f32"))
                c->dtype = FKV_DTYPE_F32;
            else
                bad = 1;
        } else if (!strcmp(a, "--reps")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 100000, &c->reps);
        } else if (!strcmp(a, "--min-calls")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 100000, &c->min_calls);
        } else if (!strcmp(a, "--rotate-mib")) {
            NEEDV;
            bad = bench_parse_int(v, 0, 1 << 20, &c->rotate_mib);
        } else if (!strcmp(a, "--resident-context")) {
            NEEDV;
            bad = bench_parse_int(v, 1, 1 << 22, &c->res_context);
        } else if (!strcmp(a, "--resident-batch")) {
            NEEDV;
            bad = bench_parse_int(v, 1, MAX_BATCH, &c->res_batch);
        } else if (!strcmp(a, "--resident-budget")) {
            NEEDV;
            bad = bench_parse_int(v, 64, 1 << 20, &c->res_budget);
        } else {
            fprintf(stderr, "attend: unknown argument '%s'\n%s", a, k_usage);
            return -1;
        }
#undef NEEDV
        if (bad) {
            fprintf(stderr, "attend: bad value '%s' for %s\n%s", v, a,
                    k_usage);
            return -1;
        }
    }
    if (c->q_heads % c->kv_heads != 0) {
        fprintf(stderr, "attend: --q-heads must be a multiple of --kv-heads\n");
        return -1;
    }
    if (c->res_budget % 32 != 0 || c->res_budget < 1024) {
        fprintf(stderr, "attend: --resident-budget must be a multiple of 32 "
                        "and >= 1024 (sink 512 + window 512)\n");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Memory and timing on the device (or, with --cpu-check, on the host)      */
/* ------------------------------------------------------------------------ */

static bool g_cpu; /* --cpu-check: CPU backend, host memory */
#ifdef FKV_WITH_CUDA
static cudaStream_t g_stream;
#else
static void *g_stream; /* never set: the timers use the host clock */
#endif

static void dsync(void)
{
#ifdef FKV_WITH_CUDA
    if (!g_cpu)
        BENCH_CUDA_CHECK(cudaStreamSynchronize(g_stream));
#endif
}

/* ------------------------------------------------------------------------ */
/* Data: one long K/V stream on the host and the device; sequence s holds    */
/* its tokens from offset seq_offset(s).                                     */
/* ------------------------------------------------------------------------ */

typedef struct data {
    fkv_dtype dt;
    size_t esize;
    int H, QH, G, D;
    int64_t tokens;            /* tokens in the stream */
    size_t row_elems;          /* H * D per token */
    unsigned char *hk, *hv;    /* host [tokens][H][D] */
    unsigned char *dk, *dv;    /* device copies */
    unsigned char *hq;         /* host [MAX_BATCH][QH][D] */
    unsigned char *dq, *dout;  /* device [MAX_BATCH][QH][D] */
    unsigned char *hout;       /* host copy of dout */
    float scale;
} data;

/* Uniform in [-1, 1), as float. */
static float uniform(bench_rng *s)
{
    return (float)bench_rng_uniform_in(s, -1.0, 1.0);
}

static int64_t seq_offset(int s)
{
    return (int64_t)((s * 61) % SLACK_TOKENS);
}

static void data_create(data *d, const config *c, int64_t max_context)
{
    memset(d, 0, sizeof *d);
    d->dt = c->dtype;
    d->esize = bench_dtype_size(c->dtype);
    d->H = c->kv_heads;
    d->QH = c->q_heads;
    d->G = c->q_heads / c->kv_heads;
    d->D = c->head_dim;
    d->scale = 1.0f / sqrtf((float)c->head_dim);
    d->tokens = max_context + SLACK_TOKENS;
    d->row_elems = (size_t)d->H * d->D;
    const size_t kv_elems = (size_t)d->tokens * d->row_elems;
    const size_t kv_bytes = kv_elems * d->esize;
    d->hk = bench_xmalloc(kv_bytes);
    d->hv = bench_xmalloc(kv_bytes);
    /* K, V uniform in [-1, 1); q uniform in [-a, a) with a such that the
     * logits scale * q.k have a standard deviation of about 2: the softmax
     * is neither flat (the output would be about mean(V) whatever tokens
     * were read, and the check would not discriminate) nor one-hot. */
    bench_rng s = {0xA77E4Dull};
    for (size_t i = 0; i < kv_elems; i++) {
        bench_store_elem(d->dt, d->hk, i, uniform(&s));
        bench_store_elem(d->dt, d->hv, i, uniform(&s));
    }
    const float qa = 6.0f; /* std of the logits: scale * qa * sqrt(D) / 3 */
    const size_t q_elems = (size_t)MAX_BATCH * d->QH * d->D;
    d->hq = bench_xmalloc(q_elems * d->esize);
    for (size_t i = 0; i < q_elems; i++)
        bench_store_elem(d->dt, d->hq, i, qa * uniform(&s));
    d->hout = bench_xmalloc(q_elems * d->esize);
    d->dk = bench_dev_alloc(g_cpu, kv_bytes);
    d->dv = bench_dev_alloc(g_cpu, kv_bytes);
    d->dq = bench_dev_alloc(g_cpu, q_elems * d->esize);
    d->dout = bench_dev_alloc(g_cpu, q_elems * d->esize);
    bench_to_dev(g_cpu, d->dk, d->hk, kv_bytes);
    bench_to_dev(g_cpu, d->dv, d->hv, kv_bytes);
    bench_to_dev(g_cpu, d->dq, d->hq, q_elems * d->esize);
}

static void data_destroy(data *d)
{
    bench_dev_free(g_cpu, d->dk);
    bench_dev_free(g_cpu, d->dv);
    bench_dev_free(g_cpu, d->dq);
    bench_dev_free(g_cpu, d->dout);
    free(d->hk);
    free(d->hv);
    free(d->hq);
    free(d->hout);
    memset(d, 0, sizeof *d);
}

/* Largest relative L2 error over the query heads of one output row against
 * a float64 attention of q row `qrow` over the tokens of sequence s:
 * toks[h] (count[h] entries) per KV head, or all of [0, n) when toks is
 * NULL. */
static double reference_error(const data *d, int s, int n, int32_t *const *toks,
                              const int32_t *count, int qrow, int orow)
{
    const int D = d->D, G = d->G;
    const int64_t base = seq_offset(s);
    double *logit = bench_xmalloc((size_t)G * (n > 0 ? n : 1) * sizeof *logit);
    double *q = bench_xmalloc((size_t)G * D * sizeof *q);
    double *acc = bench_xmalloc((size_t)G * D * sizeof *acc);
    float *kr = bench_xmalloc((size_t)D * sizeof *kr);
    double worst = 0.0;
    for (int h = 0; h < d->H; h++) {
        const int m = toks ? count[h] : n;
        for (int g = 0; g < G; g++)
            for (int e = 0; e < D; e++)
                q[g * D + e] = bench_load_elem(
                    d->dt, d->hq, ((size_t)qrow * d->QH + h * G + g) * D + e);
        double mx[64];
        for (int g = 0; g < G && g < 64; g++)
            mx[g] = -INFINITY;
        for (int j = 0; j < m; j++) {
            const int64_t t = base + (toks ? toks[h][j] : j);
            const size_t at = (size_t)t * d->row_elems + (size_t)h * D;
            for (int e = 0; e < D; e++)
                kr[e] = bench_load_elem(d->dt, d->hk, at + e);
            for (int g = 0; g < G; g++) {
                double dot = 0.0;
                for (int e = 0; e < D; e++)
                    dot += q[g * D + e] * (double)kr[e];
                dot *= (double)d->scale;
                logit[(size_t)g * m + j] = dot;
                if (g < 64 && dot > mx[g])
                    mx[g] = dot;
            }
        }
        memset(acc, 0, (size_t)G * D * sizeof *acc);
        double sum[64] = {0};
        for (int j = 0; j < m; j++) {
            const int64_t t = base + (toks ? toks[h][j] : j);
            const size_t at = (size_t)t * d->row_elems + (size_t)h * D;
            for (int e = 0; e < D; e++)
                kr[e] = bench_load_elem(d->dt, d->hv, at + e);
            for (int g = 0; g < G; g++) {
                const double p = exp(logit[(size_t)g * m + j] - mx[g]);
                sum[g] += p;
                for (int e = 0; e < D; e++)
                    acc[g * D + e] += p * (double)kr[e];
            }
        }
        for (int g = 0; g < G; g++) {
            double num = 0.0, den = 0.0;
            for (int e = 0; e < D; e++) {
                const double want = acc[g * D + e] / sum[g];
                const double got = (double)bench_load_elem(
                    d->dt, d->hout,
                    ((size_t)orow * d->QH + h * G + g) * D + e);
                num += (got - want) * (got - want);
                den += want * want;
            }
            const double err = den > 0.0 ? sqrt(num / den) : sqrt(num);
            if (isnan(err) || err > worst)
                worst = isnan(err) ? INFINITY : err;
        }
    }
    free(logit);
    free(q);
    free(acc);
    free(kr);
    return worst;
}

/* ------------------------------------------------------------------------ */
/* Caches                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct bench_cache {
    fkv_cache *c;
    fkv_policy policy;
    int nseq, context, budget;
    fkv_seq_id *ids;
} bench_cache;

static void cache_create(bench_cache *b, const config *c, const data *d,
                         fkv_policy policy, int nseq, int context, int budget)
{
    memset(b, 0, sizeof *b);
    b->policy = policy;
    b->nseq = nseq;
    b->context = context;
    b->budget = budget;
    fkv_options o;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = g_cpu ? FKV_BACKEND_CPU : ATTEND_GPU_BACKEND;
    o.device = c->device;
    o.num_layers = 1;
    o.num_q_heads = c->q_heads;
    o.num_kv_heads = c->kv_heads;
    o.head_dim = c->head_dim;
    o.dtype = c->dtype;
    o.policy = policy;
    if (policy == FKV_POLICY_RESIDENT)
        o.budget_tokens = budget; /* sink 512 + window 512 + selected */
    o.max_sequences = nseq;
    o.max_tokens_per_sequence = context;
    BENCH_FKV_CHECK(NULL, fkv_create(&o, &b->c));
#ifdef FKV_WITH_CUDA
    if (!g_cpu)
        BENCH_FKV_CHECK(b->c, fkv_set_stream(b->c, (void *)g_stream));
#endif
    b->ids = bench_xmalloc((size_t)nseq * sizeof *b->ids);
    const size_t row = d->row_elems * d->esize;
    for (int s = 0; s < nseq; s++) {
        BENCH_FKV_CHECK(b->c, fkv_seq_open(b->c, &b->ids[s]));
        const int32_t tokens = context;
        const fkv_batch one = {1, 0, &b->ids[s], &tokens};
        const size_t at = (size_t)seq_offset(s) * row;
        BENCH_FKV_CHECK(b->c,
                        fkv_append(b->c, 0, &one, d->dk + at, d->dv + at));
    }
    dsync();
    for (int s = 0; s < nseq; s++) {
        int64_t len = 0;
        BENCH_FKV_CHECK(b->c, fkv_seq_length(b->c, b->ids[s], &len));
        if (len != context)
            bench_die(
                "sequence %d holds %lld tokens after its prefill (want %d)", s,
                (long long)len, context);
    }
}

static void cache_destroy(bench_cache *b)
{
    dsync();
    for (int s = 0; s < b->nseq; s++)
        BENCH_FKV_CHECK(b->c, fkv_seq_close(b->c, b->ids[s]));
    fkv_destroy(b->c);
    free(b->ids);
    memset(b, 0, sizeof *b);
}

static fkv_batch group_batch(const bench_cache *b, int group, int batch)
{
    fkv_batch fb = {batch, 0, b->ids + (size_t)group * batch, NULL};
    return fb;
}

/* Checks output rows `rows` (of the last attend, on group `group`) against
 * the reference; returns the largest error. */
static double check_rows(const bench_cache *b, const data *d, int group,
                         int batch, const int *rows, int nrows,
                         const char *what)
{
    dsync();
    bench_to_host(g_cpu, d->hout, d->dout,
                  (size_t)batch * d->QH * d->D * d->esize);
    const double tol = dtype_tol(d->dt);
    double worst = 0.0;
    int32_t **toks = NULL;
    int32_t *count = NULL;
    if (b->policy == FKV_POLICY_RESIDENT) {
        toks = bench_xmalloc((size_t)d->H * sizeof *toks);
        count = bench_xmalloc((size_t)d->H * sizeof *count);
        for (int h = 0; h < d->H; h++)
            toks[h] = bench_xmalloc((size_t)b->context * sizeof **toks);
    }
    for (int k = 0; k < nrows; k++) {
        const int r = rows[k];
        const int s = group * batch + r;
        if (toks) {
            /* sink + selected + window + partial (docs/design.md s.2) */
            const int P = 32, S = 512 / P, W = 512 / P;
            const int K = (b->budget - 1024) / P;
            const int n = b->context, sealed = n / P;
            const int sink_end = sealed < S ? sealed : S;
            const int wf = sealed - W < S ? sink_end : sealed - W;
            const int cand = wf - S > 0 ? wf - S : 0;
            int32_t *pages = bench_xmalloc((size_t)(K + 1) * sizeof *pages);
            for (int h = 0; h < d->H; h++) {
                int32_t np = 0, m = 0;
                BENCH_FKV_CHECK(b->c,
                                fkv_get_selected_pages(b->c, 0, b->ids[s], h,
                                                       pages, K + 1, &np));
                const int want = cand < K ? cand : K;
                if (np != want)
                    bench_die(
                        "%s: seq %d KV head %d: %d selected pages (want %d)",
                        what, s, h, np, want);
                for (int p = 0; p < sink_end; p++)
                    for (int t = 0; t < P; t++)
                        toks[h][m++] = p * P + t;
                for (int j = 0; j < np; j++) {
                    if (pages[j] < S || pages[j] >= wf ||
                        (j > 0 && pages[j] <= pages[j - 1]))
                        bench_die(
                            "%s: seq %d KV head %d: selected page %d is not a "
                            "candidate in [%d, %d) in ascending order",
                            what, s, h, pages[j], S, wf);
                    for (int t = 0; t < P; t++)
                        toks[h][m++] = pages[j] * P + t;
                }
                for (int p = wf; p < sealed; p++)
                    for (int t = 0; t < P; t++)
                        toks[h][m++] = p * P + t;
                for (int t = sealed * P; t < n; t++)
                    toks[h][m++] = t;
                count[h] = m;
            }
            free(pages);
        }
        const double e = reference_error(d, s, b->context, toks, count, r, r);
        if (!(e <= tol))
            bench_die(
                "%s: sequence %d (row %d): relative error %.3g > %.3g against "
                "the float64 reference",
                what, s, r, e, tol);
        if (e > worst)
            worst = e;
    }
    if (toks) {
        for (int h = 0; h < d->H; h++)
            free(toks[h]);
        free(toks);
        free(count);
    }
    return worst;
}

/* ------------------------------------------------------------------------ */
/* Timing of one (cache, batch)                                             */
/* ------------------------------------------------------------------------ */

typedef struct result {
    double graph_ms, eager_ms, err;
    int calls, groups;
    bool graph_ok;
} result;

static void attend_pass(const bench_cache *b, const data *d, int batch,
                        int groups, int calls)
{
    for (int k = 0; k < calls; k++) {
        const fkv_batch fb = group_batch(b, k % groups, batch);
        BENCH_FKV_CHECK(b->c, fkv_attend(b->c, 0, &fb, d->dq, d->dout));
    }
}

#ifdef FKV_WITH_CUDA
/* Median ms per call of `reps` timed replays of exec (a pass of `calls`),
 * after 2 warm-up replays; ms: room for reps values. */
static double graph_ms_per_call(cudaGraphExec_t exec, int calls, int reps,
                                bench_timer *t, double *ms)
{
    for (int k = 0; k < 2; k++)
        BENCH_CUDA_CHECK(cudaGraphLaunch(exec, g_stream));
    for (int k = 0; k < reps; k++) {
        bench_timer_start(t);
        BENCH_CUDA_CHECK(cudaGraphLaunch(exec, g_stream));
        bench_timer_stop(t);
        ms[k] = bench_timer_elapsed_ms(t) / calls;
    }
    return bench_median(ms, (size_t)reps);
}
#endif

static result run_config(const config *c, const bench_cache *b, const data *d,
                         int batch, const char *what)
{
    result r;
    memset(&r, 0, sizeof r);
    r.groups = b->nseq / batch;
    const int passes = (c->min_calls + r.groups - 1) / r.groups;
    r.calls = r.groups * passes;
    const int last_group = (r.calls - 1) % r.groups;
    int rows[2] = {0, batch - 1};
    const int nrows = batch > 1 ? 2 : 1;
    char w[160];

    /* Eager, checked. */
    {
        const fkv_batch fb = group_batch(b, 0, batch);
        BENCH_FKV_CHECK(b->c, fkv_attend(b->c, 0, &fb, d->dq, d->dout));
        snprintf(w, sizeof w, "%s, eager", what);
        r.err = check_rows(b, d, 0, batch, rows, nrows, w);
    }
    bench_timer t;
    bench_timer_init(&t, !g_cpu, (void *)g_stream);
    double *ms = bench_xmalloc(
        (size_t)(c->reps > c->eager_reps ? c->reps : c->eager_reps) *
        sizeof *ms);
    attend_pass(b, d, batch, r.groups, r.calls); /* warm-up */
    for (int k = 0; k < c->eager_reps; k++) {
        bench_timer_start(&t);
        attend_pass(b, d, batch, r.groups, r.calls);
        bench_timer_stop(&t);
        ms[k] = bench_timer_elapsed_ms(&t) / r.calls;
    }
    r.eager_ms = bench_median(ms, (size_t)c->eager_reps);

    r.graph_ms = NAN;
#ifdef FKV_WITH_CUDA
    if (!g_cpu) {
        cudaGraph_t graph = NULL;
        cudaGraphExec_t exec = NULL;
        fkv_status st = FKV_OK;
        char msg[512] = "";
        dsync();
        BENCH_CUDA_CHECK(
            cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal));
        for (int k = 0; k < r.calls && st == FKV_OK; k++) {
            const fkv_batch fb = group_batch(b, k % r.groups, batch);
            st = fkv_attend(b->c, 0, &fb, d->dq, d->dout);
        }
        if (st != FKV_OK)
            fkv_last_error(b->c, msg, sizeof msg);
        cudaError_t e = cudaStreamEndCapture(g_stream, &graph);
        if (st == FKV_OK && e == cudaSuccess && graph)
            e = cudaGraphInstantiateWithFlags(
                &exec, graph, cudaGraphInstantiateFlagUseNodePriority);
        if (st != FKV_OK || e != cudaSuccess) {
            (void)cudaGetLastError();
            printf("  %s: CUDA graph capture failed (%s%s%s); eager times "
                   "only\n",
                   what,
                   st != FKV_OK ? fkv_status_string(st) : cudaGetErrorString(e),
                   msg[0] ? ": " : "", msg);
            if (exec)
                BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
            if (graph)
                BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
        } else {
            r.graph_ms = graph_ms_per_call(exec, r.calls, c->reps, &t, ms);
            r.graph_ok = true;
            BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
            BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
        }
    }
#endif
    /* The output now holds the last group's attention (the graph's last
     * call, else the eager pass's). */
    snprintf(w, sizeof w, "%s, after timing", what);
    rows[0] = 0;
    double e2 = check_rows(b, d, last_group, batch, rows, 1, w);
    if (e2 > r.err)
        r.err = e2;
    free(ms);
    bench_timer_free(&t);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Rows and output                                                          */
/* ------------------------------------------------------------------------ */

typedef struct arow {
    char policy[12];
    int context, budget, batch, splits, calls;
    double kv_mib, rot_mib, bytes;
    double graph_us, eager_us, gbps, pct, gbps_sum, err;
    double copy_us; /* the same-traffic copy (graph), per call */
    bool graph;
} arow;

static arow *g_rows;
static int g_nrows;
static size_t g_cap;

static arow *add_row(void)
{
    g_rows = bench_grow(g_rows, &g_cap, (size_t)g_nrows, sizeof *g_rows);
    arow *r = &g_rows[g_nrows++];
    memset(r, 0, sizeof *r);
    r->splits = -1;
    r->gbps_sum = NAN;
    r->copy_us = NAN;
    return r;
}

/* The call's share of what a copy of the same traffic achieves. */
static double same_pct(const arow *r)
{
    const double t = r->graph ? r->graph_us : r->eager_us;
    return 100.0 * r->copy_us / t;
}

static void print_table(const char *device, double copy_gbps, const config *c,
                        double l2_mib)
{
    printf("\n== attend: decode attention, %s, %d q heads / %d KV heads / "
           "head_dim %d, %s ==\n",
           device, c->q_heads, c->kv_heads, c->head_dim,
           bench_dtype_name(c->dtype));
    if (!isnan(copy_gbps))
        printf("copy D2D: %.1f GB/s (read + written); target: DENSE >= 70%% "
               "of it at batch >= 8; L2 %.0f MiB: each timing pass rotates "
               "over the MiB in 'rot'\n",
               copy_gbps, l2_mib);
    printf("%-8s %7s %6s %5s %6s %8s %6s %9s %9s %8s %6s %8s %6s %8s\n",
           "policy", "context", "budget", "batch", "splits", "KV_MiB", "rot",
           "graph_us", "eager_us", "GB/s", "%copy", "copy_us", "%same",
           "rel_err");
    for (int i = 0; i < g_nrows; i++) {
        const arow *r = &g_rows[i];
        char sp[16], gu[24], eu[24], gb[24], pc[24], cu[24], ps[24];
        if (r->splits < 0)
            snprintf(sp, sizeof sp, "-");
        else
            snprintf(sp, sizeof sp, "%d", r->splits);
        bench_fmt(gu, sizeof gu, "%.1f", r->graph_us);
        bench_fmt(eu, sizeof eu, "%.1f", r->eager_us);
        bench_fmt(gb, sizeof gb, "%.1f", r->gbps);
        bench_fmt(pc, sizeof pc, "%.1f", r->pct);
        bench_fmt(cu, sizeof cu, "%.1f", r->copy_us);
        bench_fmt(ps, sizeof ps, "%.1f", same_pct(r));
        printf("%-8s %7d %6d %5d %6s %8.1f %6.0f %9s %9s %8s %6s %8s %6s "
               "%8.1e%s\n",
               r->policy, r->context, r->budget, r->batch, sp, r->kv_mib,
               r->rot_mib, gu, eu, gb, pc, cu, ps, r->err,
               !strcmp(r->policy, "DENSE") && r->batch >= 8 && !isnan(r->pct)
                   ? (r->pct >= 70.0 ? "  ok" : "  below")
                   : "");
    }
    printf("GB/s: (unique K+V + q + out bytes) / time (graph time where "
           "captured, else eager); RESIDENT: attended K/V only (its selection "
           "also reads the page summaries: see the line above the table); "
           "copy_us: a copy of the same traffic in the same kind of graph, "
           "%%same = copy_us / graph_us\n");
}

static void write_csv(const char *path, double copy_gbps)
{
    FILE *f = fopen(path, "w");
    if (!f)
        bench_die("cannot open %s for writing", path);
    fprintf(f, "policy,context,budget,batch,splits,calls,kv_mib,rot_mib,"
               "bytes,graph_us,eager_us,gbps,pct_of_copy,copy_gbps,"
               "gbps_incl_summaries,max_rel_err,same_copy_us,"
               "pct_of_same_copy\n");
    for (int i = 0; i < g_nrows; i++) {
        const arow *r = &g_rows[i];
        fprintf(f, "%s,%d,%d,%d,", r->policy, r->context, r->budget, r->batch);
        if (r->splits >= 0)
            fprintf(f, "%d", r->splits);
        fprintf(f, ",%d,%.3f,%.1f,%.0f", r->calls, r->kv_mib, r->rot_mib,
                r->bytes);
        const double v[] = {r->graph_us, r->eager_us, r->gbps, r->pct,
                            copy_gbps, r->gbps_sum, r->err,
                            r->copy_us,   same_pct(r)};
        for (size_t j = 0; j < sizeof v / sizeof v[0]; j++) {
            fputc(',', f);
            if (!isnan(v[j]))
                fprintf(f, "%.6g", v[j]);
        }
        fputc('\n', f);
    }
    if (fclose(f) != 0)
        bench_die("writing %s failed", path);
    printf("wrote %s (%d rows)\n", path, g_nrows);
}

/* ------------------------------------------------------------------------ */
/* Device facts                                                             */
/* ------------------------------------------------------------------------ */

/* The split count fkv_attend uses (as lib/cuda_create.c: capped by the
 * max_splits it sized for one sequence); -1 on the CPU. */
static int split_count(const config *c, const bench_device *di, int batch,
                       int bound_pages, int max_bound_pages)
{
#ifdef FKV_WITH_CUDA
    if (g_cpu)
        return -1;
    fkv_dev_geometry g;
    memset(&g, 0, sizeof g);
    g.kv_heads = c->kv_heads;
    g.q_heads = c->q_heads;
    g.group = c->q_heads / c->kv_heads;
    g.head_dim = c->head_dim;
    g.dtype = c->dtype;
    /* The limits of the current device, as fkv_create reads them. */
    fkv_dev_limits lim;
    int dev = 0;
    BENCH_CUDA_CHECK(cudaGetDevice(&dev));
    BENCH_CUDA_CHECK(fkv_dev_limits_query(dev, &lim));
    (void)di;
    return fkv_attend_grid(&g, &lim, batch, bound_pages,
                           fkv_attend_splits(&g, &lim, 1, max_bound_pages), NULL);
#else
    (void)c;
    (void)di;
    (void)batch;
    (void)bound_pages;
    (void)max_bound_pages;
    return -1;
#endif
}

#ifdef FKV_WITH_CUDA
/* 2 x bytes / time of one large D2D cudaMemcpyAsync (read + written). */
static double copy_bandwidth(bool smoke)
{
    const size_t bytes = (size_t)(smoke ? 64 : 512) << 20;
    unsigned char *a = NULL, *b = NULL;
    BENCH_CUDA_CHECK(cudaMalloc((void **)&a, bytes));
    BENCH_CUDA_CHECK(cudaMalloc((void **)&b, bytes));
    BENCH_CUDA_CHECK(cudaMemsetAsync(a, 0x5A, bytes, g_stream));
    BENCH_CUDA_CHECK(cudaMemsetAsync(b, 0, bytes, g_stream));
    bench_timer t;
    bench_timer_init(&t, !g_cpu, (void *)g_stream);
    const int reps = smoke ? 3 : 20;
    double *ms = bench_xmalloc((size_t)reps * sizeof *ms);
    for (int r = -2; r < reps; r++) {
        bench_timer_start(&t);
        BENCH_CUDA_CHECK(
            cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, g_stream));
        bench_timer_stop(&t);
        const double m = bench_timer_elapsed_ms(&t);
        if (r >= 0)
            ms[r] = m;
    }
    /* The copy must have happened: spot-check both ends. */
    unsigned char head[4096], tail[4096];
    BENCH_CUDA_CHECK(cudaMemcpy(head, b, sizeof head, cudaMemcpyDeviceToHost));
    BENCH_CUDA_CHECK(cudaMemcpy(tail, b + bytes - sizeof tail, sizeof tail,
                                cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < sizeof head; i++)
        if (head[i] != 0x5A || tail[i] != 0x5A)
            bench_die("D2D copy: destination bytes differ from the source");
    const double t_ms = bench_median(ms, (size_t)reps);
    const double gbps = 2.0 * (double)bytes / (t_ms * 1e-3) / 1e9;
    printf("copy: one cudaMemcpyAsync D2D of %zu MiB: %.1f us, %.1f GB/s "
           "(read + written; median of %d)\n",
           bytes >> 20, t_ms * 1e3, gbps, reps);
    free(ms);
    bench_timer_free(&t);
    BENCH_CUDA_CHECK(cudaFree(a));
    BENCH_CUDA_CHECK(cudaFree(b));
    return gbps;
}
#endif

/* Time per copy (us) of a CUDA graph of `calls` D2D copies of traffic / 2
 * bytes each (traffic read + written), the k-th at slice k % slices of a
 * source and a destination of rot_bytes each: the same-traffic bound of a
 * call timed as run_config times it. NAN on the CPU. */
static double same_traffic_copy_us(const config *c, double traffic,
                                   double rot_bytes, int calls)
{
#ifdef FKV_WITH_CUDA
    if (g_cpu)
        return NAN;
    const size_t slice = ((size_t)(traffic / 2) + 255) / 256 * 256;
    size_t slices = (size_t)ceil(rot_bytes / 2 / (double)slice);
    if (slices < 2)
        slices = 2; /* consecutive copies never touch the same bytes */
    unsigned char *src = NULL, *dst = NULL;
    BENCH_CUDA_CHECK(cudaMalloc((void **)&src, slices * slice));
    BENCH_CUDA_CHECK(cudaMalloc((void **)&dst, slices * slice));
    BENCH_CUDA_CHECK(cudaMemsetAsync(src, 0x3C, slices * slice, g_stream));
    dsync();
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    BENCH_CUDA_CHECK(
        cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal));
    for (int k = 0; k < calls; k++) {
        const size_t off = (size_t)k % slices * slice;
        BENCH_CUDA_CHECK(cudaMemcpyAsync(dst + off, src + off, slice,
                                         cudaMemcpyDeviceToDevice, g_stream));
    }
    BENCH_CUDA_CHECK(cudaStreamEndCapture(g_stream, &graph));
    BENCH_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    bench_timer t;
    bench_timer_init(&t, true, (void *)g_stream);
    double *ms = bench_xmalloc((size_t)c->reps * sizeof *ms);
    const double us = graph_ms_per_call(exec, calls, c->reps, &t, ms) * 1e3;
    /* The copies must have happened: the last slice's last bytes. */
    unsigned char tail[256];
    const size_t last = ((size_t)(calls - 1) % slices + 1) * slice;
    BENCH_CUDA_CHECK(cudaMemcpy(tail, dst + last - sizeof tail, sizeof tail,
                                cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < sizeof tail; i++)
        if (tail[i] != 0x3C)
            bench_die("same-traffic copy: destination bytes differ");
    free(ms);
    bench_timer_free(&t);
    BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
    BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
    BENCH_CUDA_CHECK(cudaFree(src));
    BENCH_CUDA_CHECK(cudaFree(dst));
    return us;
#else
    (void)c;
    (void)traffic;
    (void)rot_bytes;
    (void)calls;
    return NAN;
#endif
}

/* ------------------------------------------------------------------------ */

static double kv_bytes_per_seq(const data *d, int tokens)
{
    return (double)d->H * tokens * d->D * 2.0 * (double)d->esize;
}

static double qo_bytes(const data *d, int batch)
{
    return 2.0 * (double)batch * d->QH * d->D * (double)d->esize;
}

static void bench_dense(const config *c, const data *d, const bench_device *di,
                        double copy_gbps)
{
    int maxb = 1;
    for (int i = 0; i < c->nbatches; i++)
        if (c->batches[i] > maxb)
            maxb = c->batches[i];
    const double rot_target =
        c->rotate_mib > 0
            ? (double)c->rotate_mib * (1 << 20)
            : fmax(256.0 * (1 << 20), 4.0 * di->l2_mib * (1 << 20));
    for (int bi = 0; bi < c->nbudgets; bi++) {
        const int budget = c->budgets[bi];
        const double seq_bytes = kv_bytes_per_seq(d, budget);
        int nseq = (int)ceil(rot_target / seq_bytes);
        nseq = (nseq + maxb - 1) / maxb * maxb;
        if (nseq < maxb)
            nseq = maxb;
        bench_cache b;
        const double t0 = bench_now_ms();
        cache_create(&b, c, d, FKV_POLICY_DENSE, nseq, budget, budget);
        printf("DENSE context %d: %d sequences prefilled (%.0f MiB of K/V) "
               "in %.0f ms\n",
               budget, nseq, nseq * seq_bytes / (1 << 20),
               bench_now_ms() - t0);
        const int pages = (budget + 31) / 32;
        for (int ti = 0; ti < c->nbatches; ti++) {
            const int batch = c->batches[ti];
            char what[96];
            snprintf(what, sizeof what, "DENSE context %d batch %d", budget,
                     batch);
            const result r = run_config(c, &b, d, batch, what);
            arow *row = add_row();
            snprintf(row->policy, sizeof row->policy, "DENSE");
            row->context = budget;
            row->budget = budget;
            row->batch = batch;
            row->calls = r.calls;
            row->splits = split_count(c, di, batch, pages, pages);
            row->kv_mib = batch * seq_bytes / (1 << 20);
            row->rot_mib = (double)r.groups * batch * seq_bytes / (1 << 20);
            row->bytes = batch * seq_bytes + qo_bytes(d, batch);
            row->graph = r.graph_ok;
            row->graph_us = r.graph_ms * 1e3;
            row->eager_us = r.eager_ms * 1e3;
            const double t = r.graph_ok ? r.graph_ms : r.eager_ms;
            row->gbps = row->bytes / (t * 1e-3) / 1e9;
            row->pct = 100.0 * row->gbps / copy_gbps;
            row->err = r.err;
            row->copy_us = same_traffic_copy_us(
                c, row->bytes, row->rot_mib * (1 << 20), r.calls);
            char gu[32], pc[32];
            bench_fmt(gu, sizeof gu, "%.1f", row->graph_us);
            bench_fmt(pc, sizeof pc, "%.1f", row->pct);
            char cu[32];
            bench_fmt(cu, sizeof cu, "%.1f", row->copy_us);
            printf("  batch %2d: %s us/call (graph), %.1f us/call (eager), "
                   "%.1f GB/s, %s%% of copy (a same-traffic copy: %s us), "
                   "splits %d, rel err %.1e, verified\n",
                   batch, gu, row->eager_us, row->gbps, pc, cu, row->splits,
                   row->err);
        }
        cache_destroy(&b);
    }
}

static void bench_resident(const config *c, const data *d,
                           const bench_device *di, double copy_gbps)
{
    const int batch = c->res_batch, context = c->res_context;
    const int budget = c->res_budget;
    const int nseq = 2 * batch; /* two groups: consecutive calls differ */
    bench_cache b;
    const double t0 = bench_now_ms();
    cache_create(&b, c, d, FKV_POLICY_RESIDENT, nseq, context, budget);
    printf("RESIDENT context %d budget %d: %d sequences prefilled in %.0f "
           "ms\n",
           context, budget, nseq, bench_now_ms() - t0);
    char what[96];
    snprintf(what, sizeof what, "RESIDENT context %d budget %d batch %d",
             context, budget, batch);
    const result r = run_config(c, &b, d, batch, what);
    /* Attended tokens: sink + K selected + window (+ partial page). */
    const int P = 32, sealed = context / P, S = 512 / P, W = 512 / P;
    const int K = (budget - 1024) / P;
    const int sink_end = sealed < S ? sealed : S;
    const int wf = sealed - W < S ? sink_end : sealed - W;
    const int cand = wf - S > 0 ? wf - S : 0;
    const int attended = (sink_end + (cand < K ? cand : K) + (sealed - wf)) *
                             P + context % P;
    arow *row = add_row();
    snprintf(row->policy, sizeof row->policy, "RESIDENT");
    row->context = context;
    row->budget = attended;
    row->batch = batch;
    row->calls = r.calls;
    const int bound = S + K + W + 1;
    row->splits = split_count(c, di, batch, bound, bound);
    const double kv = batch * kv_bytes_per_seq(d, attended);
    row->kv_mib = kv / (1 << 20);
    row->rot_mib = (double)nseq * kv_bytes_per_seq(d, context) / (1 << 20);
    row->bytes = kv + qo_bytes(d, batch);
    row->graph = r.graph_ok;
    row->graph_us = r.graph_ms * 1e3;
    row->eager_us = r.eager_ms * 1e3;
    const double t = r.graph_ok ? r.graph_ms : r.eager_ms;
    row->gbps = row->bytes / (t * 1e-3) / 1e9;
    row->pct = 100.0 * row->gbps / copy_gbps;
    /* The selection reads every page's max and min summary. */
    const double summaries =
        (double)batch * d->H * sealed * d->D * 2.0 * (double)d->esize;
    row->gbps_sum = (row->bytes + summaries) / (t * 1e-3) / 1e9;
    row->err = r.err;
    double dense_us = NAN;
    for (int i = 0; i < g_nrows; i++)
        if (!strcmp(g_rows[i].policy, "DENSE") &&
            g_rows[i].budget == attended && g_rows[i].batch == batch)
            dense_us = g_rows[i].graph ? g_rows[i].graph_us
                                       : g_rows[i].eager_us;
    const double res_us = r.graph_ok ? row->graph_us : row->eager_us;
    char cmp[96];
    if (isnan(dense_us))
        snprintf(cmp, sizeof cmp, "DENSE over %d tokens at batch %d: not "
                 "measured in this run", attended, batch);
    else
        snprintf(cmp, sizeof cmp, "DENSE over %d tokens: %.1f us, "
                 "RESIDENT/DENSE %.2fx", attended, dense_us, res_us / dense_us);
    printf("  RESIDENT fkv_attend (selection over %d pages + attention over "
           "%d tokens), batch %d: %.1f us/call (%s), %.1f us eager; %.1f GB/s "
           "on attended K/V, %.1f GB/s counting the %.1f MiB of summaries; "
           "%s; rel err %.1e, verified\n",
           sealed, attended, batch, res_us, r.graph_ok ? "graph" : "eager",
           row->eager_us, row->gbps, row->gbps_sum, summaries / (1 << 20),
           cmp, row->err);
    cache_destroy(&b);
}

int main(int argc, char **argv)
{
    bench_set_die_prefix("attend: FAILED: ");
    config c;
    if (parse_args(argc, argv, &c) != 0)
        return 2;
    g_cpu = c.cpu_check;
    bench_device di;
    memset(&di, 0, sizeof di);
    double copy_gbps = NAN;
    if (!g_cpu) {
        int rc;
        if (bench_skip_without_cuda("attend", c.device, c.smoke, &rc))
            return rc;
#ifdef FKV_WITH_CUDA
        bench_device_open(c.device, &di);
        BENCH_CUDA_CHECK(
            cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking));
#endif
    } else {
        snprintf(di.name, sizeof di.name, "CPU backend (--cpu-check)");
    }
    const double t_start = bench_now_ms();
    printf("attend: %s, libfreekv %s%s\n", di.name, fkv_version_string(),
           c.smoke ? " (smoke)" : "");
    if (!g_cpu)
        printf("device: %d SMs, L2 %.0f MiB\n", di.sms, di.l2_mib);
    printf("method: public API; DENSE cache, 1 layer, context = budget = "
           "max_tokens_per_sequence: fkv_attend = split + combine kernels; "
           "time per call from %s, median of %d; each pass rotates over "
           "enough sequences that K/V is read from HBM, not L2\n",
           g_cpu ? "the host clock (CPU backend: a logic check, not a "
                   "benchmark)"
                 : "CUDA events around CUDA graph replays of a pass of calls "
                   "(eager, host-issued times beside)",
           c.reps);
#ifdef FKV_WITH_CUDA
    if (!g_cpu)
        copy_gbps = copy_bandwidth(c.smoke);
#endif

    int maxctx = 0;
    for (int i = 0; i < c.nbudgets; i++)
        if (c.budgets[i] > maxctx)
            maxctx = c.budgets[i];
    if (c.resident && c.res_context > maxctx)
        maxctx = c.res_context;
    data d;
    data_create(&d, &c, maxctx);

    bench_dense(&c, &d, &di, copy_gbps);
    if (c.resident)
        bench_resident(&c, &d, &di, copy_gbps);

    print_table(di.name, copy_gbps, &c, di.l2_mib);
    if (c.csv)
        write_csv(c.csv, copy_gbps);
    data_destroy(&d);
    free(g_rows);
#ifdef FKV_WITH_CUDA
    if (!g_cpu)
        BENCH_CUDA_CHECK(cudaStreamDestroy(g_stream));
#endif
    printf("attend: all outputs verified against a float64 reference; %.1f "
           "s\n",
           (bench_now_ms() - t_start) / 1e3);
    return 0;
}
