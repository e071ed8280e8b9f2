/*
 * `llama selfcheck-gpu`: runs the same prompts and teacher-forced decode
 * steps through the CPU backend (f32 weights, the reference) and the CUDA
 * backend (bf16 weights and activations), eager and with the decode step
 * captured in a CUDA graph, and compares every logit:
 *   - tiny random models (bf16 weights, so both backends hold the same
 *     weights) with head_dim 64, 128 and 256, llama3 rope scaling, GQA,
 *     batches of 3 sequences of different lengths, cache dtypes f32, f16 and
 *     bf16, DENSE, FREEKV with every page selected
 *     (exactly dense: judged with the dense limits) and FREEKV with a small
 *     budget (selection active: random page scores are near-ties, so only
 *     graph vs eager is judged; cuda vs cpu is printed as INFO);
 *   - the real model (--model DIR), a prompt of --prefill bytes (default
 *     5000: more than one 4096-token prefill chunk) and --steps decode
 *     steps, DENSE and FREEKV, a batch of 3, and one run whose graph
 *     replays exhaust a 5-token reservation and recapture.
 * Metrics per case: rel_max = max |a - b| / max |b|, rel_rms = rms(a - b) /
 * rms(b) over all logits, and top1 = the fraction of positions where the
 * argmax agrees. The limits are bf16-sized (see LIMITS below); a graph run
 * must match the eager CUDA run to 1e-3.
 *
 * It first runs gpu_kernel_check.cu: each kernel against a float64
 * reference. Without a CUDA build or device it prints "skipped" and
 * returns 0.
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "gpu_selfcheck.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#ifdef LLAMA_WITH_CUDA
#include <cuda_runtime_api.h>

#include "gpu_tp.h"
#endif

#ifndef LLAMA_WITH_CUDA

int llama_gpu_selfcheck(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    printf("selfcheck-gpu: skipped (built without CUDA)\n");
    return 0;
}

#else

/* LIMITS: CPU vs CUDA (bf16 weights and GEMM inputs on the GPU). */
#define LIM_DENSE_RMS 0.03
#define LIM_DENSE_MAX 0.08
#define LIM_DENSE_TOP1 0.90 /* real model only: random logits are flat */
/* FREEKV may select a different page where two scores are within bf16
 * rounding of each other (real model, selective budgets). */
#define LIM_FREEKV_RMS 0.10
#define LIM_FREEKV_TOP1 0.85
/* Graph replay vs eager: the same kernels on the same inputs. */
#define LIM_GRAPH_MAX 1e-3

#define SC_MAXSEQ 3

typedef struct sc_spec {
    const char *name;
    fkv_policy policy;
    fkv_dtype dtype;
    int32_t budget, page, sink, window; /* 0: the library's defaults */
    int32_t nseq;
    int64_t off[SC_MAXSEQ], len[SC_MAXSEQ]; /* prompts: text[off, off+len) */
    int32_t steps;
    int real; /* the real model: gate top1 too */
    /* How "cuda vs cpu" is judged (printed on each line):
     *   SC_SELECTIVE: pages are selected (a real model: its scores are
     *     separated, so bf16 rounding rarely flips a choice): FREEKV limits;
     *   SC_ALLSELECTED: every candidate page is selected (budget >= context:
     *     exactly dense, design.md section 2): DENSE limits, while select,
     *     recall and the graph still run;
     *   SC_GRAPHONLY: selective on a random model, whose page scores are
     *     near-ties, so bf16 differences between the backends' K choose other
     *     pages and the outputs diverge over the steps: cuda vs cpu is printed
     *     but not judged; graph vs eager (same backend) still is. */
    int regime;
} sc_spec;

enum { SC_SELECTIVE = 0, SC_ALLSELECTED = 1, SC_GRAPHONLY = 2 };
static const char *const sc_regime_name[] = {"selective", "all-selected",
                                             "graph-only"};

typedef struct sc_out {
    float *logits; /* [(nseq + steps * nseq), vocab] */
    size_t rows;
} sc_out;

static int verbose;

/* Prefill every slot, then steps teacher-forced decode steps of the whole
 * batch: slot i is fed text[off_i + len_i + t] at step t. */
static int sc_run(const llama_backend_ops *ops, const llama_model *m,
                  const sc_spec *sp, int graph, int32_t tp,
                  const int32_t *text, sc_out *out, char *err, size_t errlen)
{
    const int32_t V = m->cfg.vocab;
    llama_run_config rc;
    memset(&rc, 0, sizeof rc);
    rc.max_batch = sp->nseq;
    int64_t most = 0;
    for (int32_t i = 0; i < sp->nseq; i++)
        if (sp->len[i] > most)
            most = sp->len[i];
    rc.max_context = most + sp->steps + 1;
    rc.cuda_graph = graph;
    rc.tp = tp;
    out->rows = (size_t)sp->nseq * (1 + (size_t)sp->steps);
    out->logits = (float *)malloc(out->rows * V * sizeof(float));
    if (!out->logits) {
        llama_errf(err, errlen, "out of memory");
        return -1;
    }
    llama_backend *b = NULL;
    if (ops->create(m, &rc, &b, err, errlen))
        return -1;
    fkv_options o;
    fkv_options_init(&o, sizeof o);
    o.policy = sp->policy;
    o.dtype = sp->dtype;
    if (sp->page)
        o.page_tokens = sp->page;
    if (sp->budget)
        o.budget_tokens = sp->budget;
    if (sp->sink)
        o.sink_tokens = sp->sink;
    if (sp->window)
        o.window_tokens = sp->window;
    int rcode = ops->cache_open(b, &o, err, errlen);
    for (int32_t i = 0; i < sp->nseq && !rcode; i++)
        rcode = ops->prefill(b, i, text + sp->off[i], sp->len[i],
                             out->logits + (size_t)i * V, err, errlen);
    int32_t slots[SC_MAXSEQ], toks[SC_MAXSEQ];
    for (int32_t t = 0; t < sp->steps && !rcode; t++) {
        for (int32_t i = 0; i < sp->nseq; i++) {
            slots[i] = i;
            toks[i] = text[sp->off[i] + sp->len[i] + t];
        }
        rcode = ops->decode(b, sp->nseq, slots, toks,
                            out->logits + ((size_t)(1 + t) * sp->nseq) * V,
                            err, errlen);
    }
    ops->destroy(b);
    return rcode;
}

typedef struct sc_cmp {
    double rel_max, rel_rms, top1, nll_a, nll_b;
} sc_cmp;

static double log_softmax_at(const float *l, int32_t V, int32_t tok)
{
    double mx = l[0], s = 0.0;
    for (int32_t j = 1; j < V; j++)
        if (l[j] > mx)
            mx = l[j];
    for (int32_t j = 0; j < V; j++)
        s += exp((double)l[j] - mx);
    return (double)l[tok] - mx - log(s);
}

/* a against the reference b; nll over the decode steps' next tokens. */
static sc_cmp sc_compare(const sc_spec *sp, const sc_out *a, const sc_out *b,
                         int32_t V, const int32_t *text)
{
    sc_cmp c = {0, 0, 0, 0, 0};
    double maxd = 0, maxr = 0, sd = 0, sr = 0;
    size_t agree = 0, n_nll = 0;
    for (size_t r = 0; r < a->rows; r++) {
        const float *x = a->logits + r * V, *y = b->logits + r * V;
        int32_t ax = 0, ay = 0;
        for (int32_t j = 0; j < V; j++) {
            double d = fabs((double)x[j] - y[j]);
            if (d > maxd || d != d)
                maxd = d != d ? INFINITY : d;
            if (fabs(y[j]) > maxr)
                maxr = fabs(y[j]);
            sd += d * d;
            sr += (double)y[j] * y[j];
            if (x[j] > x[ax])
                ax = j;
            if (y[j] > y[ay])
                ay = j;
        }
        agree += ax == ay;
        /* Row r = (1 + t) * nseq + i predicts text[off_i + len_i + t + 1]. */
        if (r >= (size_t)sp->nseq) {
            size_t t = r / sp->nseq - 1, i = r % sp->nseq;
            int32_t next = text[sp->off[i] + sp->len[i] + (int64_t)t + 1];
            c.nll_a -= log_softmax_at(x, V, next);
            c.nll_b -= log_softmax_at(y, V, next);
            n_nll++;
        }
    }
    c.rel_max = maxr > 0 ? maxd / maxr : maxd;
    c.rel_rms = sr > 0 ? sqrt(sd / sr) : sqrt(sd);
    c.top1 = (double)agree / (double)a->rows;
    if (n_nll) {
        c.nll_a /= (double)n_nll;
        c.nll_b /= (double)n_nll;
    }
    return c;
}

static int failures, cases;

/* pass < 0: printed for information, not counted. */
static void sc_report(const char *name, const char *what, const char *regime,
                      sc_cmp c, int pass)
{
    if (pass >= 0) {
        cases++;
        failures += !pass;
    }
    printf("selfcheck-gpu: %-34s %-16s [%s] rel_max %.2e rel_rms %.2e "
           "top1 %.3f ppl %.4f vs %.4f: %s\n",
           name, what, regime, c.rel_max, c.rel_rms, c.top1, exp(c.nll_a),
           exp(c.nll_b), pass < 0 ? "INFO (not judged)"
                                  : pass ? "PASS" : "FAIL");
    fflush(stdout);
}

/* One spec: CPU reference, CUDA eager, CUDA graph. */
static int sc_case(const llama_model *m, const sc_spec *sp,
                   const int32_t *text)
{
    char err[1024] = "";
    sc_out cpu = {0, 0}, eager = {0, 0}, graph = {0, 0};
    int rcode = 0;
    const int32_t V = m->cfg.vocab;
    if (sc_run(&llama_cpu_backend, m, sp, 0, 1, text, &cpu, err, sizeof err)) {
        printf("selfcheck-gpu: %s: cpu backend: %s: FAIL\n", sp->name, err);
        rcode = -1;
    } else if (sc_run(&llama_cuda_backend, m, sp, 0, 1, text, &eager, err,
                      sizeof err)) {
        printf("selfcheck-gpu: %s: cuda backend (eager): %s: FAIL\n",
               sp->name, err);
        rcode = -1;
    } else if (sc_run(&llama_cuda_backend, m, sp, 1, 1, text, &graph, err,
                      sizeof err)) {
        printf("selfcheck-gpu: %s: cuda backend (graph): %s: FAIL\n",
               sp->name, err);
        rcode = -1;
    }
    if (rcode) {
        cases++;
        failures++;
    } else {
        const int selects = sp->policy == FKV_POLICY_FREEKV ||
                            sp->policy == FKV_POLICY_SYNC;
        /* DENSE, and FREEKV with every candidate selected, are the same
         * attention on both backends: the dense limits apply. */
        const int dense = !selects || sp->regime == SC_ALLSELECTED;
        const char *regime =
            selects ? sc_regime_name[sp->regime] : "dense";
        const double lim_rms = dense ? LIM_DENSE_RMS : LIM_FREEKV_RMS;
        const double lim_top1 =
            sp->real ? (dense ? LIM_DENSE_TOP1 : LIM_FREEKV_TOP1) : 0.0;
        sc_cmp c = sc_compare(sp, &eager, &cpu, V, text);
        int pass = c.rel_rms <= lim_rms &&
                   (!dense || c.rel_max <= LIM_DENSE_MAX) &&
                   c.top1 >= lim_top1;
        sc_report(sp->name, "cuda vs cpu", regime, c,
                  selects && sp->regime == SC_GRAPHONLY ? -1 : pass);
        c = sc_compare(sp, &graph, &eager, V, text);
        sc_report(sp->name, "graph vs eager", regime, c,
                  c.rel_max <= LIM_GRAPH_MAX);
    }
    free(cpu.logits);
    free(eager.logits);
    free(graph.logits);
    return rcode;
}

/* One spec on 2 GPUs (--tp 2) against one GPU: the same bf16 weights and
 * kernels, the sums of the o and down projections split in two and added by
 * NCCL; judged with the dense limits (the regimes as in sc_case). The tp
 * graph must match the tp eager run to LIM_GRAPH_MAX. */
static int sc_case_tp(const llama_model *m, const sc_spec *sp,
                      const int32_t *text)
{
    char err[1024] = "", name[128];
    sc_out one = {0, 0}, eager = {0, 0}, graph = {0, 0};
    int rcode = 0;
    const int32_t V = m->cfg.vocab;
    snprintf(name, sizeof name, "tp2 %s", sp->name);
    if (sc_run(&llama_cuda_backend, m, sp, 0, 1, text, &one, err,
               sizeof err)) {
        printf("selfcheck-gpu: %s: cuda backend (1 GPU): %s: FAIL\n", name,
               err);
        rcode = -1;
    } else if (sc_run(&llama_cuda_tp_backend, m, sp, 0, 2, text, &eager, err,
                      sizeof err)) {
        printf("selfcheck-gpu: %s: cuda-tp backend (eager): %s: FAIL\n", name,
               err);
        rcode = -1;
    } else if (sc_run(&llama_cuda_tp_backend, m, sp, 1, 2, text, &graph, err,
                      sizeof err)) {
        printf("selfcheck-gpu: %s: cuda-tp backend (graph): %s: FAIL\n", name,
               err);
        rcode = -1;
    }
    if (rcode) {
        cases++;
        failures++;
    } else {
        const int selects = sp->policy == FKV_POLICY_FREEKV ||
                            sp->policy == FKV_POLICY_SYNC;
        const char *regime = selects ? sc_regime_name[sp->regime] : "dense";
        const double lim_top1 = sp->real ? LIM_DENSE_TOP1 : 0.0;
        sc_cmp c = sc_compare(sp, &eager, &one, V, text);
        int pass = c.rel_rms <= LIM_DENSE_RMS && c.rel_max <= LIM_DENSE_MAX &&
                   c.top1 >= lim_top1;
        sc_report(name, "tp2 vs 1 gpu", regime, c,
                  selects && sp->regime == SC_GRAPHONLY ? -1 : pass);
        c = sc_compare(sp, &graph, &eager, V, text);
        sc_report(name, "tp2 graph/eager", regime, c,
                  c.rel_max <= LIM_GRAPH_MAX);
    }
    free(one.logits);
    free(eager.logits);
    free(graph.logits);
    return rcode;
}

static int tiny_model(int32_t hidden, int32_t inter, int32_t layers,
                      int32_t qh, int32_t kvh, int32_t hd, int scaling,
                      llama_model *m, char *err, size_t errlen)
{
    llama_config c;
    memset(&c, 0, sizeof c);
    c.hidden = hidden;
    c.intermediate = inter;
    c.layers = layers;
    c.q_heads = qh;
    c.kv_heads = kvh;
    c.head_dim = hd;
    c.vocab = 256;
    c.max_position = 4096;
    c.rope_theta = 10000.0;
    c.rms_norm_eps = 1e-6;
    if (scaling) { /* small enough to change frequencies at these lengths */
        c.rope_scaling.enabled = 1;
        c.rope_scaling.factor = 8.0;
        c.rope_scaling.low_freq_factor = 1.0;
        c.rope_scaling.high_freq_factor = 4.0;
        c.rope_scaling.original_max_position_embeddings = 64.0;
    }
    return llama_model_random(&c, LLAMA_BF16, 0x5eedULL + (uint64_t)hd, m,
                              err, errlen);
}

/* Python-like bytes when no --text is given. */
static int32_t *builtin_text(int64_t n)
{
    int32_t *t = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    char line[160];
    int64_t k = 0;
    for (int i = 0; t && k < n; i++) {
        int len = snprintf(line, sizeof line,
                           "def f_%d(x, y=%d):\n    \"\"\"Return x scaled.\"\"\"\n"
                           "    if x > %d:\n        return x * %d + y\n"
                           "    return [v for v in range(x) if v %% %d]\n\n",
                           i, i % 17, i % 101, i % 7 + 2, i % 5 + 2);
        for (int j = 0; j < len && k < n; j++)
            t[k++] = (unsigned char)line[j];
    }
    return t;
}

static int32_t *file_text(const char *path, int64_t n, char *err,
                          size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        llama_errf(err, errlen, "cannot open %s", path);
        return NULL;
    }
    int32_t *t = (int32_t *)malloc(sizeof(int32_t) * (size_t)n);
    int64_t k = 0;
    int ch;
    while (t && k < n && (ch = fgetc(f)) != EOF)
        t[k++] = ch;
    fclose(f);
    if (t && k < n) {
        llama_errf(err, errlen, "%s holds %lld bytes; %lld needed", path,
                   (long long)k, (long long)n);
        free(t);
        return NULL;
    }
    return t;
}

int llama_gpu_selfcheck(int argc, char **argv)
{
    const char *model_dir = NULL, *text_path = NULL;
    int64_t prefill = 5000;
    int32_t steps = 32;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc)
            model_dir = argv[++i];
        else if (!strcmp(argv[i], "--text") && i + 1 < argc)
            text_path = argv[++i];
        else if (!strcmp(argv[i], "--prefill") && i + 1 < argc)
            prefill = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--steps") && i + 1 < argc)
            steps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-v"))
            verbose = 1;
        else {
            fprintf(stderr, "selfcheck-gpu: unknown or incomplete option "
                            "'%s' (--model DIR --text FILE --prefill N "
                            "--steps M -v)\n", argv[i]);
            return 2;
        }
    }
    if (prefill < 1 || steps < 1) {
        fprintf(stderr, "selfcheck-gpu: --prefill and --steps must be >= 1\n");
        return 2;
    }
    if (!llama_cuda_available()) {
        printf("selfcheck-gpu: skipped (no CUDA device)\n");
        return 0;
    }
    char err[1024] = "";
    /* --tp 2 cases: with NCCL and 2 GPUs, on models whose KV heads (and
     * intermediate size) divide by 2. */
    int ndev = 0;
    if (cudaGetDeviceCount(&ndev) != cudaSuccess)
        ndev = 0;
    const int tp_on = llama_tp_available() && ndev >= 2;
    if (!tp_on)
        printf("selfcheck-gpu: tp2 cases skipped (%s)\n",
               llama_tp_available() ? "fewer than 2 CUDA devices"
                                    : "built without NCCL");

    /* Each kernel alone first: a failing end-to-end case below is then
     * traced to a kernel (or cleared of them). */
    {
        int checks = 0;
        failures += llama_gpu_kernel_check(&checks);
        cases += checks;
    }

    /* Tiny random models. Text: random bytes (fixed seed). */
    const int64_t tiny_len = 700;
    int32_t *rnd = (int32_t *)malloc(sizeof(int32_t) * tiny_len);
    if (!rnd) {
        fprintf(stderr, "selfcheck-gpu: out of memory\n");
        return 2;
    }
    uint64_t s = 12345;
    for (int64_t i = 0; i < tiny_len; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        rnd[i] = (int32_t)(s >> 56);
    }
    struct {
        const char *name;
        int32_t hidden, inter, layers, qh, kvh, hd;
        int scaling;
    } models[] = {
        {"tiny d64 gqa2", 256, 384, 2, 4, 2, 64, 0},
        {"tiny d64 llama3-scaling", 256, 384, 2, 4, 2, 64, 1},
        {"tiny d128 gqa4", 256, 320, 2, 4, 1, 128, 0},
        {"tiny d256 mha", 256, 320, 1, 2, 2, 256, 0},
    };
    for (size_t mi = 0; mi < sizeof models / sizeof models[0]; mi++) {
        llama_model m;
        memset(&m, 0, sizeof m);
        if (tiny_model(models[mi].hidden, models[mi].inter, models[mi].layers,
                       models[mi].qh, models[mi].kvh, models[mi].hd,
                       models[mi].scaling, &m, err, sizeof err)) {
            fprintf(stderr, "selfcheck-gpu: random model: %s\n", err);
            free(rnd);
            return 2;
        }
        static const fkv_dtype dts[] = {FKV_DTYPE_BF16, FKV_DTYPE_F16,
                                        FKV_DTYPE_F32};
        static const char *dtn[] = {"bf16", "f16", "f32"};
        for (int d = 0; d < 3; d++) {
            if (mi > 0 && d > 0)
                continue; /* every dtype on the first model only */
            char name[96];
            snprintf(name, sizeof name, "%s dense %s", models[mi].name,
                     dtn[d]);
            sc_spec sp = {name, FKV_POLICY_DENSE, dts[d], 0, 0, 0, 0, 3,
                          {0, 50, 100}, {37, 300, 129}, 8, 0, SC_SELECTIVE};
            sc_case(&m, &sp, rnd);
        }
        char name[96];
        /* budget 320 = sink 16 + window 16 + 18 pages of 16: the longest
         * sequence (300 + 8 tokens) has at most 17 candidates, so every one
         * is selected (exactly dense) but select/recall move pages into the
         * device slots as the sequences grow. */
        snprintf(name, sizeof name, "%s freekv bf16 b320", models[mi].name);
        sc_spec sa = {name, FKV_POLICY_FREEKV, FKV_DTYPE_BF16, 320, 16, 16, 16,
                      3, {0, 50, 100}, {37, 300, 129}, 8, 0, SC_ALLSELECTED};
        sc_case(&m, &sa, rnd);
        const int tp_model = tp_on && models[mi].kvh % 2 == 0 &&
                             models[mi].inter % 2 == 0;
        if (tp_model) {
            char dn[96];
            snprintf(dn, sizeof dn, "%s dense bf16", models[mi].name);
            sc_spec sd = {dn, FKV_POLICY_DENSE, FKV_DTYPE_BF16, 0, 0, 0, 0, 3,
                          {0, 50, 100}, {37, 300, 129}, 8, 0, SC_SELECTIVE};
            sc_case_tp(&m, &sd, rnd);
            sc_case_tp(&m, &sa, rnd);
        }
        /* budget 64 = sink 16 + window 16 + 2 selected pages of 16. */
        snprintf(name, sizeof name, "%s freekv bf16 b64", models[mi].name);
        sc_spec sp = {name, FKV_POLICY_FREEKV, FKV_DTYPE_BF16, 64, 16, 16, 16,
                      3, {0, 50, 100}, {37, 300, 129}, 8, 0, SC_GRAPHONLY};
        sc_case(&m, &sp, rnd);
        if (tp_model)
            sc_case_tp(&m, &sp, rnd);
        llama_model_free(&m);
    }
    free(rnd);

    if (model_dir) {
        llama_model m;
        memset(&m, 0, sizeof m);
        if (llama_model_load(model_dir, &m, err, sizeof err)) {
            fprintf(stderr, "selfcheck-gpu: %s\n", err);
            return 2;
        }
        const int64_t need = prefill + steps + 1 + 64;
        int32_t *text = text_path ? file_text(text_path, need, err, sizeof err)
                                  : builtin_text(need);
        if (!text) {
            fprintf(stderr, "selfcheck-gpu: %s\n",
                    err[0] ? err : "out of memory");
            llama_model_free(&m);
            return 2;
        }
        sc_spec dense = {"real dense bf16", FKV_POLICY_DENSE, FKV_DTYPE_BF16,
                         0, 0, 0, 0, 1, {0}, {prefill}, steps, 1, SC_SELECTIVE};
        sc_case(&m, &dense, text);
        sc_spec fk = {"real freekv bf16 (defaults)", FKV_POLICY_FREEKV,
                      FKV_DTYPE_BF16, 0, 0, 0, 0, 1, {0}, {prefill}, steps, 1, SC_SELECTIVE};
        sc_case(&m, &fk, text);
        /* A batch of 3 of different lengths, a small budget. */
        int64_t l2 = prefill / 2 > 0 ? prefill / 2 : 1;
        int64_t l3 = prefill / 3 > 0 ? prefill / 3 : 1;
        sc_spec fb = {"real freekv bf16 batch3 b512", FKV_POLICY_FREEKV,
                      FKV_DTYPE_BF16, 512, 32, 64, 64, 3, {0, 17, 64},
                      {prefill, l2, l3}, steps, 1, SC_SELECTIVE};
        sc_case(&m, &fb, text);
        if (tp_on && m.cfg.kv_heads % 2 == 0 && m.cfg.intermediate % 2 == 0) {
            sc_case_tp(&m, &dense, text);
            sc_case_tp(&m, &fk, text);
            sc_case_tp(&m, &fb, text);
        } else if (tp_on) {
            printf("selfcheck-gpu: tp2 real-model cases skipped (%d KV heads, "
                   "intermediate %d: not divisible by 2)\n",
                   (int)m.cfg.kv_heads, (int)m.cfg.intermediate);
        }
        /* Replays run out of a 5-token reservation: recapture every 5
         * steps (LLAMA_GRAPH_RESERVE, read by the CUDA backend's create). */
        setenv("LLAMA_GRAPH_RESERVE", "5", 1);
        sc_spec fr = {"real freekv bf16 batch3 recapture", FKV_POLICY_FREEKV,
                      FKV_DTYPE_BF16, 512, 32, 64, 64, 3, {0, 17, 64},
                      {prefill, l2, l3}, steps, 1, SC_SELECTIVE};
        sc_case(&m, &fr, text);
        unsetenv("LLAMA_GRAPH_RESERVE");
        free(text);
        llama_model_free(&m);
    } else {
        printf("selfcheck-gpu: real-model cases skipped (no --model DIR)\n");
    }

    printf("selfcheck-gpu: %s (%d of %d comparisons failed)\n",
           failures ? "FAIL" : "PASS", failures, cases);
    return failures ? 1 : 0;
}

#endif /* LLAMA_WITH_CUDA */
