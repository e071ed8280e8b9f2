/*
 * bench/decode: decode-step latency of libfreekv's policies on a synthetic
 * model shaped like Llama-3.1-8B (or Qwen2.5-7B, or any shape by flag).
 *
 * Per decode step and layer, in the documented order:
 *   QKV GEMM, fkv_append, fkv_attend, fkv_select, fkv_recall, O GEMM,
 *   gate+up GEMM, down GEMM
 * on the engine's stream (fkv_set_stream). The GEMMs (cuBLAS, bf16 with fp32
 * accumulation, random weights of the real shapes) stand in for the model's
 * own work; they run on the CUDA backend only.
 *
 * For each (context, batch, policy) of the sweep: prefill by bulk appends
 * (chunks of --prefill-chunk tokens per layer), warm-up steps, timed steps
 * (CUDA events on the engine's stream around each whole step; the host clock
 * on the CPU backend), the stats' deltas over the timed steps, then a short
 * un-timed run that reads fkv_get_selected_pages on a sample of (layer,
 * sequence, KV head) to measure the churn of the selection. The same run
 * measures the step's lower bounds: the GEMMs alone (the same loop without
 * fkv calls), the recalled bytes over the PCIe bandwidth (one 256 MiB pinned
 * host-to-device copy) and the attended bytes over the device bandwidth (a
 * 1 GiB device-to-device copy, read + write counted).
 *
 * Synthetic data (the same for every policy of one context and batch):
 * keys are clustered by "topic" (the text is segments of 32-112 tokens of
 * one topic each; each (layer, KV head) has its own centre per topic, plus
 * low-rank noise and a few outlier channels), and each KV group's query
 * rotates slowly from one topic present in its sequence towards another,
 * with a per-head component, per-head noise and occasional jumps. Tuned so
 * that the adjacent-step query cosine averages 0.7-0.85 and 10-25% of the
 * selected pages change per step (DESIGN section 7); both are measured and
 * reported with every latency. --trace drift (the default) gives every head
 * the same spread of noise (cosine about 0.77, so about half of the KV
 * groups' mean cosine falls below 0.8); --trace paper makes most heads
 * stable (cosine above 0.9) and 15% volatile, the spread the FreeKV paper
 * reports, on the same keys.
 *
 * Also per row: the host time inside the fkv calls and, separately, in the
 * GEMM enqueues; the pages moved inside fkv_attend (critical path). FREEKV
 * runs once per --thresholds entry, with --criterion's rule. --graph (CUDA)
 * captures one whole step once per configuration and replays it for the
 * timed steps (docs/benchmarks.md, "Method"). The eager timed steps run
 * between cudaProfilerStart and cudaProfilerStop (no-ops without a
 * profiler), so `ncu --profile-from-start off` sees those steps only.
 *
 * Output: progress on stderr, the table (and the FREEKV ratios) on stdout
 * at the end, a CSV with one row per configuration with --csv FILE (written
 * as each configuration finishes). --help lists the flags.
 *
 * SPDX-License-Identifier: MIT
 */
#define BENCH_WITH_CUBLAS
#include "bench.h"

#include <stdbool.h>
#ifdef FKV_WITH_CUDA
#include <cuda_profiler_api.h>
#endif

/* ------------------------------------------------------------------------ */
/* Data model constants                                                     */
/* ------------------------------------------------------------------------ */

enum {
    MAX_LIST = 16,
    NUM_POLICIES = 4,
    KEY_NOISE_RANK = 16, /* R: rank of the per-token key noise */
    NUM_OUTLIERS = 3,    /* outlier key channels per (layer, KV head) */
    SEG_MIN = 32,        /* tokens of one topic in a row */
    SEG_MAX = 112,
    CHURN_LAYERS = 3,    /* layers sampled for the churn */
    CHURN_SEQS = 4       /* sequences sampled for the churn */
};

#define KEY_AMP 4.0f      /* norm of a key's topic component */
#define KEY_NOISE 0.45f   /* norm of each of the R noise directions */
#define OUTLIER_MIN 3.0f  /* |offset| of an outlier channel */
#define OUTLIER_MAX 6.0f
#define VALUE_NOISE 0.5f
#define Q_AMP 8.0f        /* norm of a query's direction component */
#define Q_HEAD_MIX 0.35f  /* weight of a head's own direction in its group */
#define Q_RHO_MIN 0.30    /* |noise| / |signal| per head, uniform in range */
#define Q_RHO_MAX 0.70
/* --trace paper: most heads stable, a minority volatile (the FreeKV paper's
 * spread of adjacent-step cosines: mean about 0.84, most heads above 0.9). */
#define Q_PAPER_VOLATILE 0.15 /* fraction of (layer, head) that is volatile */
#define Q_PAPER_STABLE_RHO_MIN 0.15
#define Q_PAPER_STABLE_RHO_MAX 0.40
#define Q_PAPER_VOLATILE_RHO_MIN 1.00
#define Q_PAPER_VOLATILE_RHO_MAX 1.40
#define Q_PAPER_JUMP_PROB 0.02
#define Q_ROTATE 0.07     /* radians per step from topic a towards b */
#define Q_JUMP_PROB 0.04  /* per step and group: an abrupt topic shift */
/* Topics are as many as make each one's pages about this share of the
 * selected pages K, so that a query's two topics fill about the budget. */
#define TOPIC_PAGES_FRAC 0.45

/* ------------------------------------------------------------------------ */
/* Command line                                                             */
/* ------------------------------------------------------------------------ */

typedef struct model_preset {
    const char *name;
    int layers, q_heads, kv_heads, head_dim, intermediate;
} model_preset;

static const model_preset MODELS[] = {
    {"llama3-8b", 32, 32, 8, 128, 14336},
    {"qwen2.5-7b", 28, 28, 4, 128, 18944},
};

typedef struct args {
    const model_preset *model;
    char model_label[48]; /* the preset's name, or "custom" */
    int layers, q_heads, kv_heads, head_dim, hidden, intermediate;
    int page, budget, sink, window;
    double threshold;                /* thresholds[0] */
    double thresholds[MAX_LIST];     /* FREEKV runs once per threshold */
    int n_thresholds;
    int criterion;                   /* fkv_correction_criterion */
    double min_mass;                 /* BOUNDED */
    int max_pages;                   /* BOUNDED */
    int graph;                       /* --graph: replay a captured step */
    int reserve;                     /* --reserve: time the pool apart */
    int select_q;                    /* --select-q: fkv_select(q), not NULL */
    int paper_trace; /* --trace paper (else drift) */
    int64_t contexts[MAX_LIST];
    int n_contexts;
    int64_t batches[MAX_LIST];
    int n_batches;
    fkv_policy policies[NUM_POLICIES];
    int n_policies;
    int steps, warmup, churn_steps, prefill_chunk;
    double host_mem_gib, time_limit_s;
    fkv_backend backend;
    int device;
    const char *csv;
    uint64_t seed;
    int smoke, gemm;
} args;

/* Table order: FREEKV, SYNC, RESIDENT, DENSE. */
static int policy_rank(fkv_policy p)
{
    switch (p) {
    case FKV_POLICY_FREEKV: return 0;
    case FKV_POLICY_SYNC: return 1;
    case FKV_POLICY_RESIDENT: return 2;
    case FKV_POLICY_DENSE: return 3;
    case FKV_POLICY_EXTERNAL: return 4;
    }
    return 4;
}

static void usage(FILE *f)
{
    fprintf(f,
        "usage: decode [flags]\n"
        "Decode-step latency of libfreekv's policies with the model's GEMMs\n"
        "stood in by cuBLAS (CUDA backend), over a sweep of contexts and batches.\n"
        "\n"
        "  --model llama3-8b|qwen2.5-7b  shape preset (default llama3-8b)\n"
        "  --layers N --q-heads N --kv-heads N --head-dim N   shape overrides\n"
        "  --intermediate N      MLP size (default: the preset's, scaled with\n"
        "                        hidden = q_heads * head_dim)\n"
        "  --contexts LIST       prompt tokens (default 8192,32768,131072; 32K ok)\n"
        "  --batches LIST        sequences per step (default 1,4,8)\n"
        "  --policies LIST       FREEKV,RESIDENT,SYNC,DENSE (default all)\n"
        "  --steps N             timed steps (default 50)\n"
        "  --warmup N            warm-up steps before them (default 5)\n"
        "  --churn-steps N       un-timed steps measuring the churn (default 10)\n"
        "  --prefill-chunk N     tokens per prefill append (default 8192)\n"
        "  --page N --budget N --sink N --window N   cache (default: the\n"
        "                        library's, 32, 2048, 512, 512)\n"
        "  --threshold X         correction threshold (default: the library's,\n"
        "                        0.9); \"off\" turns correction off\n"
        "  --thresholds LIST     FREEKV once per threshold, e.g. 0.8,0.9,off\n"
        "                        (the other policies run once)\n"
        "  --criterion cosine|bounded   FREEKV's correction criterion (default\n"
        "                        cosine); where a backend refuses an option\n"
        "                        the rows say \"unsupported\"\n"
        "  --min-mass X --max-pages N   bounded's correction_min_mass (default\n"
        "                        0.002) and correction_max_pages (default 32)\n"
        "  --graph               (CUDA) capture one whole decode step (every\n"
        "                        layer's fkv calls and GEMMs) in a CUDA graph\n"
        "                        after the warm-up, replay it for the timed\n"
        "                        steps; a policy whose step cannot be captured\n"
        "                        gets a \"no-graph\" row, not eager timings\n"
        "  --select-q            pass the query to fkv_select (the library then\n"
        "                        compares it with the attend's on the device)\n"
        "                        instead of NULL, the attend's query (default)\n"
        "  --reserve             fkv_seq_reserve every sequence's tokens\n"
        "                        before the prefill, timed apart from it (the\n"
        "                        host pool's pinned allocations, then the\n"
        "                        appends' writes alone)\n"
        "  --trace drift|paper   query trace: drift (default; every head\n"
        "                        drifts alike, cosine 0.7-0.85) or paper (most\n"
        "                        heads stable above 0.9, 15%% volatile)\n"
        "  --host-mem-gib X      host memory the pool may use (default 100);\n"
        "                        larger configurations are skipped\n"
        "  --time-limit S        skip the configurations not started after S\n"
        "                        seconds (default 0: no limit)\n"
        "  --backend auto|cpu|cuda   (default auto)\n"
        "  --device N            CUDA device (default 0)\n"
        "  --no-gemm             leave the GEMMs out of the step (CUDA)\n"
        "  --csv FILE            one row per configuration\n"
        "  --seed N              data seed (default 1)\n"
        "  --smoke               tiny sizes for CI: 2 layers, 4/2 heads, head_dim\n"
        "                        64, contexts 1024,2048, batches 1,2, budget 512,\n"
        "                        8 steps after 2 warm-up (later flags override)\n"
        "Sweep order: FREEKV and RESIDENT at contexts >= 32K first, then SYNC and\n"
        "DENSE there, then the shorter contexts; the table is sorted.\n");
}

static int parse_int(const char *flag, const char *v, int lo, int hi)
{
    int x;
    if (bench_parse_int(v, lo, hi, &x) != 0)
        bench_die("%s: expected an integer in [%d, %d], got '%s'", flag, lo,
                  hi, v);
    return x;
}

static double parse_double(const char *flag, const char *v)
{
    double x;
    if (bench_parse_double(v, &x) != 0)
        bench_die("%s: expected a number, got '%s'", flag, v);
    return x;
}

/* "0.8,0.9,off" into out[0..MAX_LIST); "off" is FKV_CORRECTION_OFF. */
static int parse_thresholds(const char *flag, const char *v, double *out)
{
    char buf[256];
    int n = 0;
    if (strlen(v) >= sizeof buf)
        bench_die("%s: list too long", flag);
    strcpy(buf, v);
    for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) {
        if (n == MAX_LIST)
            bench_die("%s: at most %d thresholds", flag, MAX_LIST);
        out[n++] = !strcmp(t, "off") ? (double)FKV_CORRECTION_OFF
                                     : parse_double(flag, t);
    }
    if (n == 0)
        bench_die("%s: expected numbers or off, got '%s'", flag, v);
    return n;
}

/* smoke_sizes: start from the --smoke sizes even without the flag (the CPU
 * backend's defaults). */
static void parse_args(int argc, char **argv, args *a, int smoke_sizes)
{
    memset(a, 0, sizeof *a);
    a->model = &MODELS[0];
    a->layers = a->q_heads = a->kv_heads = a->head_dim = -1;
    a->intermediate = -1;
    {   /* The cache as the library sets it up by default. */
        fkv_options lib;
        fkv_options_init(&lib, sizeof lib);
        a->page = lib.page_tokens;
        a->budget = lib.budget_tokens;
        a->sink = lib.sink_tokens;
        a->window = lib.window_tokens;
        a->threshold = lib.correction_threshold;
        a->criterion = lib.correction_criterion;
        a->min_mass = lib.correction_min_mass;
        a->max_pages = lib.correction_max_pages;
    }
    a->contexts[0] = 8192;
    a->contexts[1] = 32768;
    a->contexts[2] = 131072;
    a->n_contexts = 3;
    a->batches[0] = 1;
    a->batches[1] = 4;
    a->batches[2] = 8;
    a->n_batches = 3;
    a->policies[0] = FKV_POLICY_FREEKV;
    a->policies[1] = FKV_POLICY_RESIDENT;
    a->policies[2] = FKV_POLICY_SYNC;
    a->policies[3] = FKV_POLICY_DENSE;
    a->n_policies = 4;
    a->steps = 50;
    a->warmup = 5;
    a->churn_steps = 10;
    a->prefill_chunk = 8192;
    a->host_mem_gib = 100.0;
    a->backend = FKV_BACKEND_AUTO;
    a->seed = 1;
    a->gemm = 1;

    /* --smoke first, so that later flags override its sizes. */
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--smoke"))
            a->smoke = 1;
    if (a->smoke || smoke_sizes) {
        a->layers = 2;
        a->q_heads = 4;
        a->kv_heads = 2;
        a->head_dim = 64;
        a->contexts[0] = 1024;
        a->contexts[1] = 2048;
        a->n_contexts = 2;
        a->batches[0] = 1;
        a->batches[1] = 2;
        a->n_batches = 2;
        a->steps = 8;
        a->warmup = 2;
        a->churn_steps = 4;
        a->prefill_chunk = 1024;
        a->budget = 512;
        a->sink = 64;
        a->window = 128;
    }

    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i];
        const char *val = NULL;
        char name[64];
        const char *eq = strchr(flag, '=');
        if (!strcmp(flag, "--help") || !strcmp(flag, "-h")) {
            usage(stdout);
            exit(0);
        }
        if (!strcmp(flag, "--smoke"))
            continue;
        if (!strcmp(flag, "--no-gemm")) {
            a->gemm = 0;
            continue;
        }
        if (!strcmp(flag, "--graph")) {
            a->graph = 1;
            continue;
        }
        if (!strcmp(flag, "--reserve")) {
            a->reserve = 1;
            continue;
        }
        if (!strcmp(flag, "--select-q")) {
            a->select_q = 1;
            continue;
        }
        static const char *const with_value[] = {
            "--model", "--layers", "--q-heads", "--kv-heads", "--head-dim",
            "--intermediate", "--contexts", "--batches", "--policies",
            "--steps", "--warmup", "--churn-steps", "--prefill-chunk",
            "--page", "--budget", "--sink", "--window", "--threshold", "--trace",
            "--thresholds", "--criterion", "--min-mass", "--max-pages",
            "--host-mem-gib", "--time-limit", "--backend", "--device", "--csv",
            "--seed"};
        size_t flag_len = eq ? (size_t)(eq - flag) : strlen(flag);
        bool known = false;
        for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++)
            known |= strlen(with_value[k]) == flag_len &&
                     !strncmp(flag, with_value[k], flag_len);
        if (!known) {
            usage(stderr);
            bench_die("unknown argument '%s'", flag);
        }
        if (eq) {
            size_t n = (size_t)(eq - flag);
            if (n >= sizeof name)
                bench_die("unknown flag '%s'", flag);
            memcpy(name, flag, n);
            name[n] = '\0';
            val = eq + 1;
        } else {
            if (strlen(flag) >= sizeof name)
                bench_die("unknown flag '%s'", flag);
            strcpy(name, flag);
            if (i + 1 >= argc)
                bench_die("%s needs a value", flag);
            val = argv[++i];
        }
        if (!strcmp(name, "--model")) {
            a->model = NULL;
            for (size_t m = 0; m < sizeof MODELS / sizeof MODELS[0]; m++)
                if (!strcmp(val, MODELS[m].name))
                    a->model = &MODELS[m];
            if (!a->model)
                bench_die("--model: llama3-8b or qwen2.5-7b, not '%s'", val);
        } else if (!strcmp(name, "--layers"))
            a->layers = parse_int(name, val, 1, 1024);
        else if (!strcmp(name, "--q-heads"))
            a->q_heads = parse_int(name, val, 1, 1024);
        else if (!strcmp(name, "--kv-heads"))
            a->kv_heads = parse_int(name, val, 1, 1024);
        else if (!strcmp(name, "--head-dim"))
            a->head_dim = parse_int(name, val, 1, 1024);
        else if (!strcmp(name, "--intermediate"))
            a->intermediate = parse_int(name, val, 1, 1 << 20);
        else if (!strcmp(name, "--contexts")) {
            a->n_contexts = bench_parse_int_list(val, a->contexts, MAX_LIST);
            if (a->n_contexts <= 0)
                bench_die("--contexts: a list of positive token counts");
        } else if (!strcmp(name, "--batches")) {
            a->n_batches = bench_parse_int_list(val, a->batches, MAX_LIST);
            if (a->n_batches <= 0)
                bench_die("--batches: a list of positive batch sizes");
            for (int b = 0; b < a->n_batches; b++)
                if (a->batches[b] > 1024)
                    bench_die("--batches: at most 1024");
        } else if (!strcmp(name, "--policies")) {
            a->n_policies =
                bench_parse_policies(val, a->policies, NUM_POLICIES);
            if (a->n_policies <= 0)
                bench_die("--policies: a list of FREEKV, RESIDENT, SYNC, "
                          "DENSE, each once");
        } else if (!strcmp(name, "--steps"))
            a->steps = parse_int(name, val, 1, 100000);
        else if (!strcmp(name, "--warmup"))
            a->warmup = parse_int(name, val, 0, 100000);
        else if (!strcmp(name, "--churn-steps"))
            a->churn_steps = parse_int(name, val, 0, 100000);
        else if (!strcmp(name, "--prefill-chunk"))
            a->prefill_chunk = parse_int(name, val, 1, 1 << 24);
        else if (!strcmp(name, "--page"))
            a->page = parse_int(name, val, 1, 1024);
        else if (!strcmp(name, "--budget"))
            a->budget = parse_int(name, val, 0, 1 << 24);
        else if (!strcmp(name, "--sink"))
            a->sink = parse_int(name, val, 0, 1 << 24);
        else if (!strcmp(name, "--window"))
            a->window = parse_int(name, val, 0, 1 << 24);
        else if (!strcmp(name, "--threshold")) {
            a->n_thresholds = parse_thresholds(name, val, a->thresholds);
            if (a->n_thresholds != 1)
                bench_die("--threshold: one number or off (a list: "
                          "--thresholds)");
        } else if (!strcmp(name, "--thresholds"))
            a->n_thresholds = parse_thresholds(name, val, a->thresholds);
        else if (!strcmp(name, "--criterion")) {
            if (!strcmp(val, "cosine"))
                a->criterion = FKV_CRITERION_COSINE;
            else if (!strcmp(val, "bounded"))
                a->criterion = FKV_CRITERION_BOUNDED;
            else
                bench_die("--criterion: cosine or bounded, not '%s'", val);
        } else if (!strcmp(name, "--min-mass"))
            a->min_mass = parse_double(name, val);
        else if (!strcmp(name, "--max-pages"))
            a->max_pages = parse_int(name, val, 0, 1 << 20);
        else if (!strcmp(name, "--trace")) {
            if (!strcmp(val, "paper"))
                a->paper_trace = 1;
            else if (!strcmp(val, "drift"))
                a->paper_trace = 0;
            else
                bench_die("--trace: drift or paper, not '%s'", val);
        }
        else if (!strcmp(name, "--host-mem-gib"))
            a->host_mem_gib = parse_double(name, val);
        else if (!strcmp(name, "--time-limit"))
            a->time_limit_s = parse_double(name, val);
        else if (!strcmp(name, "--backend")) {
            if (!strcmp(val, "auto"))
                a->backend = FKV_BACKEND_AUTO;
            else if (!strcmp(val, "cpu"))
                a->backend = FKV_BACKEND_CPU;
            else if (!strcmp(val, "cuda"))
                a->backend = FKV_BACKEND_CUDA;
            else
                bench_die("--backend: auto, cpu or cuda, not '%s'", val);
        } else if (!strcmp(name, "--device"))
            a->device = parse_int(name, val, 0, 1023);
        else if (!strcmp(name, "--csv"))
            a->csv = val;
        else if (!strcmp(name, "--seed"))
            a->seed = (uint64_t)strtoull(val, NULL, 10);
        else
            bench_die("unknown flag '%s'", name); /* not in with_value */
    }

    if (a->n_thresholds == 0) {
        a->thresholds[0] = a->threshold;
        a->n_thresholds = 1;
    }
    a->threshold = a->thresholds[0];

    const model_preset *m = a->model;
    if (a->layers < 0)
        a->layers = m->layers;
    if (a->q_heads < 0)
        a->q_heads = m->q_heads;
    if (a->kv_heads < 0)
        a->kv_heads = m->kv_heads;
    if (a->head_dim < 0)
        a->head_dim = m->head_dim;
    a->hidden = a->q_heads * a->head_dim;
    if (a->intermediate < 0) {
        /* The preset's ratio to hidden, rounded up to a multiple of 64. */
        double r = (double)m->intermediate /
                   (double)(m->q_heads * m->head_dim);
        a->intermediate = (int)((r * a->hidden + 63.0) / 64.0) * 64;
    }
    if (a->q_heads % a->kv_heads != 0)
        bench_die("--q-heads (%d) must be a multiple of --kv-heads (%d)",
                  a->q_heads, a->kv_heads);
    bool preset = a->layers == m->layers && a->q_heads == m->q_heads &&
                  a->kv_heads == m->kv_heads && a->head_dim == m->head_dim &&
                  a->intermediate == m->intermediate;
    snprintf(a->model_label, sizeof a->model_label, "%s",
             preset ? m->name : "custom");
}

/* ------------------------------------------------------------------------ */
/* The engine: backend, stream, cuBLAS, weights, activations                */
/* ------------------------------------------------------------------------ */

typedef struct engine {
    fkv_backend backend; /* resolved: CPU or CUDA */
    char device_name[256];
    char why_cpu[256];
    int use_gemm;
    double pcie_gbs, dev_gbs; /* measured; 0 on the CPU backend */
    int max_batch;
    void *out; /* attention output [max_batch][q_heads * head_dim] */
    /* GEMMs alone, per batch index */
    int gemm_done[MAX_LIST];
    double gemm_ms[MAX_LIST], gemm_p90[MAX_LIST];
#ifdef FKV_WITH_CUDA
    cudaStream_t stream;
    cublasHandle_t blas;
    void *weights;
    size_t w_qkv, w_o, w_gu, w_down, w_layer; /* element offsets, per layer */
    size_t n_qkv;                              /* (q + 2 kv) * head_dim */
    void *x, *qkv, *h, *gu;
    void *blas_ws; /* --graph: cuBLAS's workspace, set explicitly */
    size_t weight_bytes;
#endif
} engine;

#ifdef FKV_WITH_CUDA
/* y[n][m] = x[n][k] . W, with W stored column-major m x k (lda = m),
 * x with row stride ldx, y with row stride m; bf16, fp32 accumulation. */
static void gemm_bf16(engine *e, int m, int n, int k, const void *w,
                      const void *x, int ldx, void *y)
{
    const float one = 1.0f, zero = 0.0f;
    BENCH_CUBLAS_CHECK(cublasGemmEx(e->blas, CUBLAS_OP_N, CUBLAS_OP_N, m, n, k,
                                    &one, w, CUDA_R_16BF, m, x, CUDA_R_16BF,
                                    ldx, &zero, y, CUDA_R_16BF, m,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* Fills n bf16 elements at dev with uniform values in [-amp, amp): a host
 * block copied once, then doubled by device-to-device copies. */
static void fill_random_bf16(void *dev, size_t n, float amp, uint64_t seed)
{
    size_t block = n < ((size_t)8 << 20) ? n : ((size_t)8 << 20);
    uint16_t *h = bench_xmalloc(block * sizeof *h);
    bench_rng r = bench_rng_seed(seed);
    for (size_t i = 0; i < block; i++)
        h[i] = bench_f32_to_bf16(
            (float)((2.0 * bench_rng_uniform(&r) - 1.0) * amp));
    BENCH_CUDA_CHECK(cudaMemcpy(dev, h, block * 2, cudaMemcpyHostToDevice));
    free(h);
    size_t done = block;
    while (done < n) {
        size_t c = done < n - done ? done : n - done;
        BENCH_CUDA_CHECK(cudaMemcpy((char *)dev + done * 2, dev, c * 2,
                                    cudaMemcpyDeviceToDevice));
        done += c;
    }
    /* The copies ran on the legacy stream, which the engine's
     * (non-blocking) stream does not wait for. */
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
}

/* Host to device on the engine's stream, waited for (set-up only). */
static void h2d(engine *e, void *dst, const void *src, size_t bytes)
{
    BENCH_CUDA_CHECK(
        cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, e->stream));
    BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
}

/* Median bandwidth of `reps` copies of `bytes` (GB/s), counting `factor`
 * times the bytes (2 for a device-to-device copy: read + write). */
static double copy_bandwidth(engine *e, void *dst, const void *src,
                             size_t bytes, enum cudaMemcpyKind kind,
                             double factor)
{
    enum { REPS = 7 };
    double ms[REPS];
    bench_timer t;
    bench_timer_init(&t, 1, e->stream);
    for (int i = -2; i < REPS; i++) {
        bench_timer_start(&t);
        BENCH_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, e->stream));
        bench_timer_stop(&t);
        double v = bench_timer_elapsed_ms(&t);
        if (i >= 0)
            ms[i] = v;
    }
    bench_timer_free(&t);
    return factor * (double)bytes / (bench_median(ms, REPS) * 1e-3) / 1e9;
}

static void engine_cuda_init(engine *e, const args *a)
{
    bench_device dev;
    bench_device_open(a->device, &dev);
    snprintf(e->device_name, sizeof e->device_name, "%s", dev.name);
    BENCH_CUDA_CHECK(
        cudaStreamCreateWithFlags(&e->stream, cudaStreamNonBlocking));
    BENCH_CUBLAS_CHECK(cublasCreate(&e->blas));
    BENCH_CUBLAS_CHECK(cublasSetStream(e->blas, e->stream));
    if (a->graph) {
        /* A workspace of our own, so that no capture makes cuBLAS allocate
         * one (as examples/llama does; set after the stream, which resets
         * it). */
        const size_t ws = (size_t)32 << 20;
        BENCH_CUDA_CHECK(cudaMalloc(&e->blas_ws, ws));
        BENCH_CUBLAS_CHECK(cublasSetWorkspace(e->blas, e->blas_ws, ws));
    }

    /* Bandwidths: one 256 MiB pinned host-to-device copy, one 1 GiB
     * device-to-device copy. */
    {
        size_t bytes = (size_t)256 << 20;
        void *host = NULL, *dev = NULL;
        BENCH_CUDA_CHECK(cudaMallocHost(&host, bytes));
        memset(host, 1, bytes);
        BENCH_CUDA_CHECK(cudaMalloc(&dev, bytes));
        e->pcie_gbs = copy_bandwidth(e, dev, host, bytes,
                                     cudaMemcpyHostToDevice, 1.0);
        BENCH_CUDA_CHECK(cudaFree(dev));
        BENCH_CUDA_CHECK(cudaFreeHost(host));
    }
    {
        size_t bytes = (size_t)1 << 30;
        void *src = NULL, *dst = NULL;
        BENCH_CUDA_CHECK(cudaMalloc(&src, bytes));
        BENCH_CUDA_CHECK(cudaMalloc(&dst, bytes));
        BENCH_CUDA_CHECK(cudaMemsetAsync(src, 1, bytes, e->stream));
        e->dev_gbs = copy_bandwidth(e, dst, src, bytes,
                                    cudaMemcpyDeviceToDevice, 2.0);
        BENCH_CUDA_CHECK(cudaFree(src));
        BENCH_CUDA_CHECK(cudaFree(dst));
    }

    /* Activations, and the attention output the O GEMM reads. */
    const size_t B = (size_t)e->max_batch, hid = (size_t)a->hidden;
    const size_t inter = (size_t)a->intermediate;
    e->n_qkv = (size_t)(a->q_heads + 2 * a->kv_heads) * (size_t)a->head_dim;
    BENCH_CUDA_CHECK(cudaMalloc(&e->x, B * hid * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->qkv, B * e->n_qkv * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->h, B * hid * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->gu, B * 2 * inter * 2));
    BENCH_CUDA_CHECK(cudaMalloc(&e->out, B * hid * 2));
    BENCH_CUDA_CHECK(cudaMemsetAsync(e->out, 0, B * hid * 2, e->stream));
    fill_random_bf16(e->x, B * hid, 1.0f, 7);

    if (e->use_gemm) {
        /* Every layer its own weights, as a real model (14 GiB for
         * Llama-3.1-8B): one layer's would sit in no cache anyway, but the
         * device memory left for the KV store is then realistic. */
        e->w_qkv = 0;
        e->w_o = e->w_qkv + hid * e->n_qkv;
        e->w_gu = e->w_o + hid * hid;
        e->w_down = e->w_gu + hid * 2 * inter;
        e->w_layer = e->w_down + inter * hid;
        e->weight_bytes = e->w_layer * (size_t)a->layers * 2;
        BENCH_CUDA_CHECK(cudaMalloc(&e->weights, e->weight_bytes));
        fill_random_bf16(e->weights, e->w_layer * (size_t)a->layers,
                         (float)(1.0 / sqrt((double)hid)), 11);
    }
    BENCH_CUDA_CHECK(cudaDeviceSynchronize());
}

static void engine_cuda_free(engine *e)
{
    BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
    BENCH_CUDA_CHECK(cudaFree(e->weights));
    BENCH_CUDA_CHECK(cudaFree(e->x));
    BENCH_CUDA_CHECK(cudaFree(e->qkv));
    BENCH_CUDA_CHECK(cudaFree(e->h));
    BENCH_CUDA_CHECK(cudaFree(e->gu));
    BENCH_CUDA_CHECK(cudaFree(e->out));
    BENCH_CUBLAS_CHECK(cublasDestroy(e->blas));
    if (e->blas_ws)
        BENCH_CUDA_CHECK(cudaFree(e->blas_ws));
    BENCH_CUDA_CHECK(cudaStreamDestroy(e->stream));
}
#endif /* FKV_WITH_CUDA */

static const char *backend_name(fkv_backend b)
{
    return b == FKV_BACKEND_CUDA ? "CUDA" : b == FKV_BACKEND_CPU ? "CPU"
                                                                : "AUTO";
}

/* Resolves --backend with a probe cache (the library's own rule for AUTO). */
static void resolve_backend(const args *a, engine *e)
{
    fkv_options o;
    fkv_cache *c = NULL;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = a->backend;
    o.device = a->device;
    o.num_layers = 1;
    o.num_q_heads = 1;
    o.num_kv_heads = 1;
    o.head_dim = 64;
    o.max_sequences = 1;
    o.max_tokens_per_sequence = 64;
    o.sink_tokens = 0;
    o.window_tokens = 0;
    o.budget_tokens = 32;
    o.dtype = FKV_DTYPE_BF16;
    BENCH_FKV_CHECK(NULL, fkv_create(&o, &c));
    fkv_options got;
    BENCH_FKV_CHECK(c, fkv_options_init(&got, sizeof got));
    BENCH_FKV_CHECK(c, fkv_get_options(c, &got));
    e->backend = got.backend;
    fkv_destroy(c);
    if (e->backend == FKV_BACKEND_CPU && a->backend == FKV_BACKEND_AUTO) {
        /* Why not CUDA: ask for it and keep the library's message. */
        o.backend = FKV_BACKEND_CUDA;
        c = NULL;
        if (fkv_create(&o, &c) == FKV_OK) {
            fkv_destroy(c);
            snprintf(e->why_cpu, sizeof e->why_cpu, "AUTO chose the CPU");
        } else {
            char msg[200];
            fkv_last_error(NULL, msg, sizeof msg);
            snprintf(e->why_cpu, sizeof e->why_cpu, "%s", msg);
        }
    } else if (e->backend == FKV_BACKEND_CPU) {
        snprintf(e->why_cpu, sizeof e->why_cpu, "--backend cpu");
    }
#ifndef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA)
        bench_die("libfreekv chose CUDA but this program was built without "
                  "it (build both with the same CUDA=)");
#endif
}

/* ------------------------------------------------------------------------ */
/* Synthetic workload of one (context, batch)                               */
/* ------------------------------------------------------------------------ */

typedef struct workload {
    const args *a;
    int64_t ctx;
    int batch, T; /* T: decode steps in all (warm-up, timed, churn) */
    int L, H, D, QH, G, HD;
    int NT, R, C; /* topics, noise rank, coefficient columns >= 1 + NT + R */
    uint64_t seed;
    float *center;             /* [L][H][NT][D] unit topic centres */
    float *head_dir;           /* [L][QH][D] unit */
    float *rho;                /* [L][QH] query noise ratio */
    uint16_t *kbasis, *vbasis; /* [L][C][HD] bf16 */
    int32_t *topic;            /* [batch][ctx + T] */
    uint16_t *q;               /* [T][L][batch][QH][D] bf16 */
    double cos_mean;           /* adjacent-step query cosine, timed steps */
    /* what the fkv calls read: host (CPU) or device (CUDA) memory */
    void *q_mem;               /* [T][L][batch][QH][D] */
    void *kdec, *vdec;         /* [L][T][batch][HD] */
    /* prefill staging */
    uint16_t *coef_host;       /* [max(batch * chunk, T * batch)][C] */
    void *kstage, *vstage;     /* [batch * chunk][HD] */
    size_t coef_rows;
#ifdef FKV_WITH_CUDA
    void *kbasis_dev, *vbasis_dev, *coef_dev;
    /* --graph: one step's inputs, where the captured step reads them
     * (copied from q_mem / kdec / vdec before each replay) */
    void *q_cur;               /* [L][batch][QH][D] */
    void *k_cur, *v_cur;       /* [L][batch][HD] */
#endif
    bool on_device;
} workload;

static uint64_t mix64(uint64_t a, uint64_t b)
{
    bench_rng r = bench_rng_seed(a * 0x100000001b3ull ^ (b + 0x9e37ull));
    return bench_rng_next(&r);
}

/* Approximately standard normal (Irwin-Hall of four 16-bit uniforms): for
 * the bulk query noise, where Box-Muller would dominate the set-up time. */
static float fast_normal(bench_rng *r)
{
    uint64_t x = bench_rng_next(r);
    double s = (double)(x & 0xffff) + (double)((x >> 16) & 0xffff) +
               (double)((x >> 32) & 0xffff) + (double)(x >> 48);
    return (float)((s * (1.0 / 65536.0) - 2.0) * 1.7320508075688772);
}

static void random_unit(bench_rng *r, float *x, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = (float)bench_rng_normal(r);
        s += (double)x[i] * x[i];
    }
    s = 1.0 / sqrt(s);
    for (int i = 0; i < n; i++)
        x[i] = (float)(x[i] * s);
}

static void normalize(float *x, int n)
{
    double s = 0.0;
    for (int i = 0; i < n; i++)
        s += (double)x[i] * x[i];
    if (s > 0.0) {
        s = 1.0 / sqrt(s);
        for (int i = 0; i < n; i++)
            x[i] = (float)(x[i] * s);
    }
}

static int selected_pages_k(const args *a)
{
    return (a->budget - a->sink - a->window) / a->page;
}

/* Topics: enough that each covers about TOPIC_PAGES_FRAC * K pages. */
static int topics_for(const args *a, int64_t ctx)
{
    int K = selected_pages_k(a);
    double pages = (double)ctx / a->page;
    double touches = pages * (1.0 + (double)a->page /
                                        (0.5 * (SEG_MIN + SEG_MAX)));
    double per = TOPIC_PAGES_FRAC * (K > 1 ? K : 1);
    int nt = (int)(touches / per + 0.5);
    return nt < 4 ? 4 : nt;
}

/* The bases, sequences' topic layout and the query trace. */
static void workload_build(workload *w, const args *a, int64_t ctx,
                           int batch, int T, int warmup, int steps)
{
    memset(w, 0, sizeof *w);
    w->a = a;
    w->ctx = ctx;
    w->batch = batch;
    w->T = T;
    w->L = a->layers;
    w->H = a->kv_heads;
    w->D = a->head_dim;
    w->QH = a->q_heads;
    w->G = a->q_heads / a->kv_heads;
    w->HD = w->H * w->D;
    w->NT = topics_for(a, ctx);
    w->R = KEY_NOISE_RANK;
    /* Padded with zero columns to a multiple of 8 (aligned GEMM rows). */
    w->C = (1 + w->NT + w->R + 7) / 8 * 8;
    w->seed = mix64(a->seed, (uint64_t)ctx);

    const int L = w->L, H = w->H, D = w->D, QH = w->QH, G = w->G;
    const int HD = w->HD, NT = w->NT, R = w->R, C = w->C;
    bench_rng r = bench_rng_seed(w->seed);

    w->center = bench_xmalloc((size_t)L * H * NT * D * sizeof(float));
    w->head_dir = bench_xmalloc((size_t)L * QH * D * sizeof(float));
    w->rho = bench_xmalloc((size_t)L * QH * sizeof(float));
    w->kbasis = bench_xcalloc((size_t)L * C * HD, sizeof(uint16_t));
    w->vbasis = bench_xcalloc((size_t)L * C * HD, sizeof(uint16_t));
    float *tmp = bench_xmalloc((size_t)D * sizeof(float));
    for (int l = 0; l < L; l++) {
        uint16_t *kb = w->kbasis + (size_t)l * C * HD;
        uint16_t *vb = w->vbasis + (size_t)l * C * HD;
        for (int g = 0; g < H; g++) {
            /* row 0: outlier channels (a constant offset of every key) */
            for (int j = 0; j < NUM_OUTLIERS; j++) {
                int ch = (int)bench_rng_int(&r, 0, D - 1);
                double v = OUTLIER_MIN + (OUTLIER_MAX - OUTLIER_MIN) *
                                             bench_rng_uniform(&r);
                if (bench_rng_uniform(&r) < 0.5)
                    v = -v;
                kb[(size_t)g * D + ch] = bench_f32_to_bf16((float)v);
            }
            /* rows 1..NT: topic centres; values: a mean per topic */
            for (int t = 0; t < NT; t++) {
                float *c = w->center + (((size_t)l * H + g) * NT + t) * D;
                random_unit(&r, c, D);
                size_t row = (size_t)(1 + t) * HD + (size_t)g * D;
                for (int i = 0; i < D; i++) {
                    kb[row + i] = bench_f32_to_bf16(KEY_AMP * c[i]);
                    vb[row + i] =
                        bench_f32_to_bf16((float)bench_rng_normal(&r));
                }
            }
            /* rows 1+NT..: noise directions */
            for (int n = 0; n < R; n++) {
                random_unit(&r, tmp, D);
                size_t row = (size_t)(1 + NT + n) * HD + (size_t)g * D;
                for (int i = 0; i < D; i++) {
                    kb[row + i] = bench_f32_to_bf16(KEY_NOISE * tmp[i]);
                    vb[row + i] = bench_f32_to_bf16(
                        (float)(VALUE_NOISE * bench_rng_normal(&r) /
                                sqrt((double)R)));
                }
            }
        }
        for (int h = 0; h < QH; h++) {
            random_unit(&r, w->head_dir + ((size_t)l * QH + h) * D, D);
            /* Drawn in both traces, so that they share their keys. */
            const bool vol = bench_rng_uniform(&r) < Q_PAPER_VOLATILE;
            double lo = Q_RHO_MIN, hi = Q_RHO_MAX;
            if (a->paper_trace) {
                lo = vol ? Q_PAPER_VOLATILE_RHO_MIN : Q_PAPER_STABLE_RHO_MIN;
                hi = vol ? Q_PAPER_VOLATILE_RHO_MAX : Q_PAPER_STABLE_RHO_MAX;
            }
            w->rho[(size_t)l * QH + h] =
                (float)(lo + (hi - lo) * bench_rng_uniform(&r));
        }
    }
    free(tmp);

    /* Each sequence's text: segments of one topic each. */
    const int64_t len = ctx + T;
    w->topic = bench_xmalloc((size_t)batch * (size_t)len * sizeof(int32_t));
    for (int s = 0; s < batch; s++) {
        bench_rng rs = bench_rng_seed(mix64(w->seed, 1000 + (uint64_t)s));
        int32_t *tp = w->topic + (size_t)s * (size_t)len;
        for (int64_t t = 0; t < len;) {
            int64_t n = bench_rng_int(&rs, SEG_MIN, SEG_MAX);
            int32_t topic = (int32_t)bench_rng_int(&rs, 0, NT - 1);
            for (int64_t i = 0; i < n && t < len; i++, t++)
                tp[t] = topic;
        }
    }

    /* Queries: per (layer, sequence, KV group) a direction rotating from
     * topic a towards topic b (both from the prompt), an occasional jump;
     * per head its own direction mixed in, and noise. */
    const size_t qrow = (size_t)QH * D;
    w->q = bench_xmalloc((size_t)T * L * batch * qrow * sizeof(uint16_t));
    float *dir = bench_xmalloc((size_t)D * sizeof(float));
    float *hd = bench_xmalloc((size_t)D * sizeof(float));
    int *qa = bench_xmalloc((size_t)H * sizeof(int));
    int *qb = bench_xmalloc((size_t)H * sizeof(int));
    double *phi = bench_xmalloc((size_t)H * sizeof(double));
    const double jump_prob = a->paper_trace ? Q_PAPER_JUMP_PROB : Q_JUMP_PROB;
    for (int l = 0; l < L; l++)
        for (int s = 0; s < batch; s++) {
            bench_rng rq = bench_rng_seed(
                mix64(w->seed, 1000000 + (uint64_t)l * 4096 + (uint64_t)s));
            const int32_t *tp = w->topic + (size_t)s * (size_t)len;
#define PROMPT_TOPIC() tp[bench_rng_int(&rq, 0, ctx - 1)]
            for (int g = 0; g < H; g++) {
                qa[g] = PROMPT_TOPIC();
                qb[g] = PROMPT_TOPIC();
                phi[g] = 1.4 * bench_rng_uniform(&rq);
            }
            for (int t = 0; t < T; t++) {
                for (int g = 0; g < H; g++) {
                    if (t > 0) {
                        if (bench_rng_uniform(&rq) < jump_prob) {
                            qa[g] = PROMPT_TOPIC();
                            qb[g] = PROMPT_TOPIC();
                            phi[g] = 1.4 * bench_rng_uniform(&rq);
                        } else if ((phi[g] += Q_ROTATE) >= 1.5707963) {
                            phi[g] -= 1.5707963;
                            qa[g] = qb[g];
                            qb[g] = PROMPT_TOPIC();
                        }
                    }
                    const float *ca =
                        w->center + (((size_t)l * H + g) * NT + qa[g]) * D;
                    const float *cb =
                        w->center + (((size_t)l * H + g) * NT + qb[g]) * D;
                    float cs = (float)cos(phi[g]), sn = (float)sin(phi[g]);
                    for (int i = 0; i < D; i++)
                        dir[i] = cs * ca[i] + sn * cb[i];
                    normalize(dir, D);
                    for (int j = 0; j < G; j++) {
                        int h = g * G + j;
                        const float *own = w->head_dir + ((size_t)l * QH + h) * D;
                        for (int i = 0; i < D; i++)
                            hd[i] = dir[i] + Q_HEAD_MIX * own[i];
                        normalize(hd, D);
                        float sigma = w->rho[(size_t)l * QH + h] * Q_AMP /
                                      (float)sqrt((double)D);
                        uint16_t *qo = w->q + (((size_t)t * L + l) * batch + s) *
                                                  qrow + (size_t)h * D;
                        for (int i = 0; i < D; i++)
                            qo[i] = bench_f32_to_bf16(Q_AMP * hd[i] +
                                                      sigma * fast_normal(&rq));
                    }
                }
            }
#undef PROMPT_TOPIC
        }
    free(dir);
    free(hd);
    free(qa);
    free(qb);
    free(phi);

    /* Mean adjacent-step cosine over the timed steps, as the library sees
     * the queries (bf16). */
    double sum = 0.0;
    long n = 0;
    for (int t = warmup + 1; t < warmup + steps && t < T; t++)
        for (size_t v = 0; v < (size_t)L * batch * QH; v++) {
            const uint16_t *x = w->q + ((size_t)t * L * batch * QH + v) * D;
            const uint16_t *y = x - (size_t)L * batch * qrow;
            double xy = 0.0, xx = 0.0, yy = 0.0;
            for (int i = 0; i < D; i++) {
                double p = bench_bf16_to_f32(x[i]), q = bench_bf16_to_f32(y[i]);
                xy += p * q;
                xx += p * p;
                yy += q * q;
            }
            sum += xy / sqrt(xx * yy);
            n++;
        }
    w->cos_mean = n ? sum / (double)n : NAN;
}

/* Coefficient rows of tokens [t0, t0 + n) of sequence s: [1, one-hot topic,
 * R normals]. Row i goes to rows + i * stride * C. */
static void fill_coef(const workload *w, int s, int64_t t0, int64_t n,
                      uint16_t *rows, size_t stride)
{
    const int C = w->C;
    const int32_t *tp = w->topic + (size_t)s * (size_t)(w->ctx + w->T);
    bench_rng r = bench_rng_seed(
        mix64(w->seed, ((uint64_t)s << 40) ^ (uint64_t)t0 ^ 0x5eedull));
    const uint16_t one = bench_f32_to_bf16(1.0f);
    for (int64_t i = 0; i < n; i++) {
        uint16_t *row = rows + (size_t)i * stride * (size_t)C;
        memset(row, 0, (size_t)C * sizeof *row);
        row[0] = one;
        row[1 + tp[t0 + i]] = one;
        for (int k = 0; k < w->R; k++)
            row[1 + w->NT + k] = bench_f32_to_bf16(fast_normal(&r));
    }
}

/* out[rows][HD] = coef[rows][C] . basis[C][HD] on the host (sparse coef). */
static void host_basis_gemm(const workload *w, const uint16_t *coef,
                            size_t rows, const uint16_t *basis, uint16_t *out)
{
    const int C = w->C, HD = w->HD;
    float *bf = bench_xmalloc((size_t)C * HD * sizeof(float));
    float *acc = bench_xmalloc((size_t)HD * sizeof(float));
    for (size_t i = 0; i < (size_t)C * HD; i++)
        bf[i] = bench_bf16_to_f32(basis[i]);
    for (size_t r = 0; r < rows; r++) {
        memset(acc, 0, (size_t)HD * sizeof *acc);
        for (int c = 0; c < C; c++) {
            float v = bench_bf16_to_f32(coef[r * C + c]);
            if (v == 0.0f)
                continue;
            const float *b = bf + (size_t)c * HD;
            for (int j = 0; j < HD; j++)
                acc[j] += v * b[j];
        }
        for (int j = 0; j < HD; j++)
            out[r * HD + j] = bench_f32_to_bf16(acc[j]);
    }
    free(bf);
    free(acc);
}

/* K or V rows from coefficients on either side: out = coef . basis(l). */
static void basis_gemm(engine *e, workload *w, int l, int which, size_t rows,
                       void *out)
{
    const size_t layer = (size_t)l * w->C * w->HD;
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        const uint16_t *b = which ? w->vbasis_dev : w->kbasis_dev;
        gemm_bf16(e, w->HD, (int)rows, w->C, b + layer, w->coef_dev, w->C,
                  out);
        return;
    }
#endif
    (void)e;
    host_basis_gemm(w, w->coef_host, rows,
                    (which ? w->vbasis : w->kbasis) + layer, out);
}

/* Copies coef_host[0..rows) where the GEMM reads it. */
static void upload_coef(engine *e, workload *w, size_t rows)
{
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        /* On the engine's stream, after the GEMMs that read the previous
         * rows; waited for, so that coef_host may be refilled at once (set-up
         * only, never in a timed step). */
        h2d(e, w->coef_dev, w->coef_host, rows * w->C * sizeof(uint16_t));
    }
#endif
    (void)e;
    (void)w;
    (void)rows;
}

/* Buffers the fkv calls read (decode K/V and queries), prefill staging. */
static void workload_alloc(engine *e, workload *w)
{
    const size_t B = (size_t)w->batch, T = (size_t)w->T, L = (size_t)w->L;
    const size_t HD = (size_t)w->HD, C = (size_t)w->C;
    const size_t chunk = (size_t)(w->a->prefill_chunk < w->ctx
                                      ? w->a->prefill_chunk
                                      : w->ctx);
    const size_t decbytes = L * T * B * HD * 2;
    const size_t stage = B * chunk * HD * 2;
    w->coef_rows = B * chunk > T * B ? B * chunk : T * B;
    w->coef_host = bench_xmalloc(w->coef_rows * C * sizeof(uint16_t));
    w->on_device = e->backend == FKV_BACKEND_CUDA;
    const int host = !w->on_device;
    w->q_mem = w->q;
    w->kdec = bench_dev_alloc(host, decbytes);
    w->vdec = bench_dev_alloc(host, decbytes);
    w->kstage = bench_dev_alloc(host, stage);
    w->vstage = bench_dev_alloc(host, stage);
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        const size_t qbytes = T * L * B * (size_t)w->QH * w->D * 2;
        w->q_mem = bench_dev_alloc(0, qbytes);
        h2d(e, w->q_mem, w->q, qbytes);
        w->coef_dev = bench_dev_alloc(0, w->coef_rows * C * 2);
        size_t basis = L * C * HD * 2;
        w->kbasis_dev = bench_dev_alloc(0, basis);
        w->vbasis_dev = bench_dev_alloc(0, basis);
        h2d(e, w->kbasis_dev, w->kbasis, basis);
        h2d(e, w->vbasis_dev, w->vbasis, basis);
        if (w->a->graph) {
            w->q_cur = bench_dev_alloc(0, L * B * (size_t)w->QH * w->D * 2);
            w->k_cur = bench_dev_alloc(0, L * B * HD * 2);
            w->v_cur = bench_dev_alloc(0, L * B * HD * 2);
        }
    }
#endif

    /* Decode tokens' K and V, rows (step, sequence), for every layer. */
    for (int t = 0; t < w->T; t++)
        for (int s = 0; s < w->batch; s++)
            fill_coef(w, s, w->ctx + t, 1,
                      w->coef_host + ((size_t)t * B + (size_t)s) * C, 1);
    upload_coef(e, w, T * B);
    for (int l = 0; l < w->L; l++) {
        size_t off = (size_t)l * T * B * HD * 2;
        basis_gemm(e, w, l, 0, T * B, (char *)w->kdec + off);
        basis_gemm(e, w, l, 1, T * B, (char *)w->vdec + off);
    }
#ifdef FKV_WITH_CUDA
    if (w->on_device)
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
#endif
}

static void workload_free(engine *e, workload *w)
{
    (void)e;
    const int host = !w->on_device;
#ifdef FKV_WITH_CUDA
    if (w->on_device) {
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
        bench_dev_free(0, w->q_mem);
        bench_dev_free(0, w->coef_dev);
        bench_dev_free(0, w->kbasis_dev);
        bench_dev_free(0, w->vbasis_dev);
        if (w->q_cur) {
            bench_dev_free(0, w->q_cur);
            bench_dev_free(0, w->k_cur);
            bench_dev_free(0, w->v_cur);
        }
    }
#endif
    bench_dev_free(host, w->kdec);
    bench_dev_free(host, w->vdec);
    bench_dev_free(host, w->kstage);
    bench_dev_free(host, w->vstage);
    free(w->coef_host);
    free(w->center);
    free(w->head_dir);
    free(w->rho);
    free(w->kbasis);
    free(w->vbasis);
    free(w->topic);
    free(w->q);
    memset(w, 0, sizeof *w);
}

/* ------------------------------------------------------------------------ */
/* One configuration                                                        */
/* ------------------------------------------------------------------------ */

typedef enum run_status {
    RUN_OK = 0,
    RUN_HOST_MEM,
    RUN_DEVICE_MEM,
    RUN_TIME_LIMIT,
    RUN_OOM,
    RUN_UNSUPPORTED, /* the library refused the options (FKV_ERR_UNSUPPORTED) */
    RUN_NO_GRAPH     /* --graph: the step could not be captured or replayed */
} run_status;

/* The four fkv calls of a decode step, for the host time by call. */
enum call_kind { CALL_APPEND, CALL_ATTEND, CALL_SELECT, CALL_RECALL, CALL_KINDS };
static const char *const call_names[CALL_KINDS] = {"append", "attend", "select",
                                                   "recall"};

typedef struct result {
    int64_t ctx;
    int batch, batch_index;
    fkv_policy policy;
    double threshold; /* in the options (FREEKV's; the others ignore it) */
    int threshold_index; /* in args.thresholds: the table keeps that order */
    run_status status;
    char note[160];
    double ms_median, ms_p90, host_ms; /* per step; host: enqueue time */
    /* Host time per step inside the fkv calls, and enqueueing the GEMM
     * stand-ins (medians; NAN under --graph, where a step is one launch) */
    double lib_host_ms, gemm_host_ms;
    /* lib_host_ms by call (medians; call_kind order) */
    double lib_call_ms[CALL_KINDS];
    double crit_pages; /* pages_recalled_critical per step */
    double tokens_per_s;
    double corrections, heads_checked; /* per step */
    double pages, bytes;               /* recalled per step */
    double recall_frac;  /* pages / (layers * kv_heads * batch * K) */
    double churn;        /* selected pages changed per step; NAN: none */
    double cos_mean;
    uint64_t device_bytes, host_bytes;
    double gemm_ms, recall_bound_ms, attend_bound_ms, bound_ms;
    double prefill_s;
    double reserve_s; /* --reserve: fkv_seq_reserve before the prefill */
    int topics;
} result;

typedef struct run_ctx {
    engine *e;
    const args *a;
    workload *w;
    fkv_cache *cache;
    fkv_batch step;
    int batch;
    /* Host time of the last decode_step inside the fkv calls and in the
     * GEMM enqueues (a host clock read around each call). */
    double lib_ms, gemm_host_ms;
    double call_ms[CALL_KINDS]; /* lib_ms by call */
    /* Under capture: an fkv call that fails is recorded here (and the
     * step's later fkv calls skipped) instead of ending the program. */
    int soft;
    fkv_status failed;
    char fail_msg[140];
    /* --graph: the step reads its inputs from w->q_cur, k_cur, v_cur. */
    int staged;
} run_ctx;

static void step_check(run_ctx *rc, fkv_status st, const char *what,
                       const char *file, int line)
{
    if (st == FKV_OK)
        return;
    if (!rc->soft)
        bench_fkv_check(st, rc->cache, what, file, line);
    if (rc->failed == FKV_OK) {
        char msg[112];
        fkv_last_error(rc->cache, msg, sizeof msg);
        rc->failed = st;
        snprintf(rc->fail_msg, sizeof rc->fail_msg, "%s: %s",
                 fkv_status_string(st), msg);
    }
}

/* An fkv call of the step: timed into rc->lib_ms, checked. */
#define STEP_FKV(rc, kind, call)                                             \
    do {                                                                     \
        if ((rc)->failed == FKV_OK) {                                        \
            double t_ = bench_now_ms();                                      \
            fkv_status st_ = (call);                                         \
            t_ = bench_now_ms() - t_;                                        \
            (rc)->lib_ms += t_;                                              \
            (rc)->call_ms[kind] += t_;                                       \
            step_check((rc), st_, #call, __FILE__, __LINE__);                \
        }                                                                    \
    } while (0)

/* One decode step (every layer) at step index t of the trace. */
static void decode_step(run_ctx *rc, int t, int with_fkv)
{
    engine *e = rc->e;
    const args *a = rc->a;
    const int L = a->layers;
#ifdef FKV_WITH_CUDA
    const int use_gemm = e->backend == FKV_BACKEND_CUDA && e->use_gemm;
    const int B = rc->batch, hid = a->hidden, inter = a->intermediate;
#endif
    rc->lib_ms = rc->gemm_host_ms = 0.0;
    for (int k = 0; k < CALL_KINDS; k++)
        rc->call_ms[k] = 0.0;
    for (int l = 0; l < L; l++) {
#ifdef FKV_WITH_CUDA
        const uint16_t *wl = NULL;
        if (use_gemm) {
            double t0 = bench_now_ms();
            wl = (const uint16_t *)e->weights + (size_t)l * e->w_layer;
            gemm_bf16(e, (int)e->n_qkv, B, hid, wl + e->w_qkv, e->x, hid,
                      e->qkv);
            rc->gemm_host_ms += bench_now_ms() - t0;
        }
#endif
        if (with_fkv) {
            workload *w = rc->w;
            const size_t Bz = (size_t)w->batch;
            const void *k, *v, *q;
#ifdef FKV_WITH_CUDA
            if (rc->staged) {
                const size_t kv_off = (size_t)l * Bz * w->HD * 2;
                k = (const char *)w->k_cur + kv_off;
                v = (const char *)w->v_cur + kv_off;
                q = (const char *)w->q_cur +
                    (size_t)l * Bz * w->QH * w->D * 2;
            } else
#endif
            {
                const size_t kv_off =
                    (((size_t)l * w->T + (size_t)t) * Bz) * w->HD * 2;
                const size_t q_off =
                    (((size_t)t * w->L + (size_t)l) * Bz) * w->QH * w->D * 2;
                k = (const char *)w->kdec + kv_off;
                v = (const char *)w->vdec + kv_off;
                q = (const char *)w->q_mem + q_off;
            }
            fkv_cache *c = rc->cache;
            STEP_FKV(rc, CALL_APPEND, fkv_append(c, l, &rc->step, k, v));
            STEP_FKV(rc, CALL_ATTEND, fkv_attend(c, l, &rc->step, q, e->out));
            /* NULL: the attend's query (nothing launched). */
            STEP_FKV(rc, CALL_SELECT,
                     fkv_select(c, l, &rc->step, a->select_q ? q : NULL));
            STEP_FKV(rc, CALL_RECALL, fkv_recall(c, l, &rc->step));
        }
#ifdef FKV_WITH_CUDA
        if (use_gemm) {
            double t0 = bench_now_ms();
            gemm_bf16(e, hid, B, hid, wl + e->w_o, e->out, hid, e->h);
            gemm_bf16(e, 2 * inter, B, hid, wl + e->w_gu, e->h, hid, e->gu);
            gemm_bf16(e, hid, B, inter, wl + e->w_down, e->gu, 2 * inter,
                      e->x);
            rc->gemm_host_ms += bench_now_ms() - t0;
        }
#endif
    }
}

/* Per timed step: device (or host) time, host enqueue time, host time in
 * the fkv calls and in the GEMM enqueues (the last two NAN for a replay). */
typedef struct step_times {
    double *ms, *host, *lib, *gemm;
    double *call[CALL_KINDS]; /* lib by call */
} step_times;

static void step_times_alloc(step_times *st, int steps)
{
    st->ms = bench_xmalloc((size_t)steps * sizeof *st->ms);
    st->host = bench_xmalloc((size_t)steps * sizeof *st->host);
    st->lib = bench_xmalloc((size_t)steps * sizeof *st->lib);
    st->gemm = bench_xmalloc((size_t)steps * sizeof *st->gemm);
    for (int k = 0; k < CALL_KINDS; k++)
        st->call[k] = bench_xmalloc((size_t)steps * sizeof *st->call[k]);
}

static void step_times_free(step_times *st)
{
    free(st->ms);
    free(st->host);
    free(st->lib);
    free(st->gemm);
    for (int k = 0; k < CALL_KINDS; k++)
        free(st->call[k]);
}

#ifdef FKV_WITH_CUDA
/* Copies trace step t's queries and new K/V where the captured step reads
 * them (on the engine's stream, before the replay's start event). */
static void stage_inputs(run_ctx *rc, int t)
{
    engine *e = rc->e;
    workload *w = rc->w;
    const size_t B = (size_t)w->batch, L = (size_t)w->L;
    const size_t qstep = L * B * (size_t)w->QH * w->D * 2;
    const size_t kvrow = B * (size_t)w->HD * 2;
    BENCH_CUDA_CHECK(cudaMemcpyAsync(w->q_cur,
                                     (const char *)w->q_mem + (size_t)t * qstep,
                                     qstep, cudaMemcpyDeviceToDevice,
                                     e->stream));
    /* kdec is [L][T][batch][HD]: one row of batch * HD per layer. */
    BENCH_CUDA_CHECK(cudaMemcpy2DAsync(
        w->k_cur, kvrow, (const char *)w->kdec + (size_t)t * kvrow,
        (size_t)w->T * kvrow, kvrow, L, cudaMemcpyDeviceToDevice, e->stream));
    BENCH_CUDA_CHECK(cudaMemcpy2DAsync(
        w->v_cur, kvrow, (const char *)w->vdec + (size_t)t * kvrow,
        (size_t)w->T * kvrow, kvrow, L, cudaMemcpyDeviceToDevice, e->stream));
}

/* --graph: captures the step at trace index t0 once and replays it `steps`
 * times (inputs of steps t0, t0 + 1, ... staged before each replay).
 * Returns false with the reason in why when the step cannot be captured,
 * instantiated or replayed. */
static bool time_replays(run_ctx *rc, int t0, int steps, int with_fkv,
                         step_times *out, char *why, size_t why_len)
{
    engine *e = rc->e;
    cudaGraph_t graph = NULL;
    cudaGraphExec_t exec = NULL;
    cudaError_t ce;
    bool ok = false;
    bench_timer tm;
    if (with_fkv) {
        /* Pool blocks for every token the replays and the churn run add:
         * none can be allocated under capture (docs/design.md section 6). */
        for (int s = 0; s < rc->batch; s++) {
            fkv_status st = fkv_seq_reserve(rc->cache, rc->step.seq_ids[s],
                                            rc->w->ctx + rc->w->T);
            if (st != FKV_OK) {
                snprintf(why, why_len, "fkv_seq_reserve: %s",
                         fkv_status_string(st));
                return false;
            }
        }
        fkv_status st = fkv_sync(rc->cache);
        if (st != FKV_OK) {
            snprintf(why, why_len, "fkv_sync before capture: %s",
                     fkv_status_string(st));
            return false;
        }
    }
    rc->staged = 1;
    rc->soft = 1;
    rc->failed = FKV_OK;
    BENCH_CUDA_CHECK(cudaStreamBeginCapture(e->stream,
                                            cudaStreamCaptureModeThreadLocal));
    decode_step(rc, t0, with_fkv);
    ce = cudaStreamEndCapture(e->stream, &graph);
    rc->soft = 0;
    if (rc->failed != FKV_OK || ce != cudaSuccess || !graph) {
        snprintf(why, why_len, "not capturable: %s",
                 rc->failed != FKV_OK ? rc->fail_msg : cudaGetErrorString(ce));
        (void)cudaGetLastError(); /* a capture error is not sticky */
        goto done;
    }
    ce = cudaGraphInstantiateWithFlags(&exec, graph,
                                       cudaGraphInstantiateFlagUseNodePriority);
    if (ce == cudaSuccess)
        ce = cudaGraphUpload(exec, e->stream);
    if (ce != cudaSuccess) {
        snprintf(why, why_len, "graph instantiate: %s", cudaGetErrorString(ce));
        (void)cudaGetLastError();
        goto done;
    }
    bench_timer_init(&tm, 1, e->stream);
    for (int i = 0; i < steps; i++) {
        if (with_fkv)
            stage_inputs(rc, t0 + i);
        bench_timer_start(&tm);
        ce = cudaGraphLaunch(exec, e->stream);
        out->host[i] = bench_timer_stop(&tm);
        if (ce != cudaSuccess)
            break;
        out->ms[i] = bench_timer_elapsed_ms(&tm);
        out->lib[i] = out->gemm[i] = NAN;
        for (int k = 0; k < CALL_KINDS; k++)
            out->call[k][i] = NAN;
    }
    bench_timer_free(&tm);
    if (ce != cudaSuccess) {
        snprintf(why, why_len, "graph launch: %s", cudaGetErrorString(ce));
        goto done;
    }
    if (with_fkv) {
        /* Refreshes the host's lengths; reports an append past the
         * reservation. */
        fkv_status st = fkv_sync(rc->cache);
        if (st != FKV_OK) {
            char msg[96];
            fkv_last_error(rc->cache, msg, sizeof msg);
            snprintf(why, why_len, "fkv_sync after replays: %s: %s",
                     fkv_status_string(st), msg);
            goto done;
        }
    }
    ok = true;
done:
    rc->staged = 0;
    if (!ok && with_fkv) {
        /* A capture cut short counted its calls on the host: fkv_sync
         * brings the host's view back to the device's (its status is not
         * the reason reported). */
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
        (void)fkv_sync(rc->cache);
    }
    if (exec)
        BENCH_CUDA_CHECK(cudaGraphExecDestroy(exec));
    if (graph)
        BENCH_CUDA_CHECK(cudaGraphDestroy(graph));
    return ok;
}
#endif

/* Times `steps` steps after `warmup` ones, from trace step t0: eager, or
 * with --graph (CUDA) replays of the step captured after the warm-up.
 * Returns false (reason in why) when --graph cannot capture or replay. */
static bool time_steps(run_ctx *rc, int t0, int warmup, int steps,
                       int with_fkv, step_times *out, char *why,
                       size_t why_len)
{
    engine *e = rc->e;
    bench_timer tm;
    void *stream = NULL;
#ifdef FKV_WITH_CUDA
    stream = e->stream;
#endif
    for (int i = 0; i < warmup; i++)
        decode_step(rc, t0 + i, with_fkv);
    if (with_fkv)
        BENCH_FKV_CHECK(rc->cache, fkv_reset_stats(rc->cache)); /* waits */
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA)
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
    if (rc->a->graph && e->backend == FKV_BACKEND_CUDA)
        return time_replays(rc, t0 + warmup, steps, with_fkv, out, why,
                            why_len);
#endif
    if (rc->a->graph) {
        snprintf(why, why_len, "--graph needs the CUDA backend");
        return false;
    }
    bench_timer_init(&tm, e->backend == FKV_BACKEND_CUDA, stream);
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA && with_fkv)
        BENCH_CUDA_CHECK(cudaProfilerStart());
#endif
    for (int i = 0; i < steps; i++) {
        bench_timer_start(&tm);
        decode_step(rc, t0 + warmup + i, with_fkv);
        out->host[i] = bench_timer_stop(&tm);
        out->lib[i] = rc->lib_ms;
        for (int k = 0; k < CALL_KINDS; k++)
            out->call[k][i] = rc->call_ms[k];
        out->gemm[i] = rc->gemm_host_ms;
        /* Waits for the step, as an engine waits for its sampled token. */
        out->ms[i] = bench_timer_elapsed_ms(&tm);
    }
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA && with_fkv)
        BENCH_CUDA_CHECK(cudaProfilerStop());
#endif
    bench_timer_free(&tm);
    return true;
}

/* The GEMMs alone at batch index bi (once per batch). */
static void measure_gemm(engine *e, const args *a, int bi)
{
    if (e->gemm_done[bi])
        return;
    e->gemm_done[bi] = 1;
    e->gemm_ms[bi] = e->gemm_p90[bi] = NAN;
    if (e->backend != FKV_BACKEND_CUDA || !e->use_gemm)
        return;
    run_ctx rc;
    memset(&rc, 0, sizeof rc);
    rc.e = e;
    rc.a = a;
    rc.batch = (int)a->batches[bi];
    step_times tt;
    char why[160];
    step_times_alloc(&tt, a->steps);
    /* Under --graph the GEMMs alone are captured and replayed too, so that
     * the bound is measured the way the steps are. */
    if (time_steps(&rc, 0, a->warmup, a->steps, 0, &tt, why, sizeof why)) {
        e->gemm_ms[bi] = bench_median(tt.ms, (size_t)a->steps);
        e->gemm_p90[bi] = bench_percentile(tt.ms, (size_t)a->steps, 90.0);
    } else
        fprintf(stderr, "GEMMs alone at batch %d: %s\n", rc.batch, why);
    step_times_free(&tt);
}

static uint64_t div_up(uint64_t x, uint64_t y)
{
    return (x + y - 1) / y;
}

/* Host bytes the configuration needs: the library's pool and (CPU backend)
 * its "device" state, plus the benchmark's own trace buffers. */
static double host_bytes_needed(const engine *e, const args *a, int64_t ctx,
                                int batch, fkv_policy p, int T)
{
    const double pages = (double)div_up((uint64_t)(ctx + T), (uint64_t)a->page);
    const double unit = 2.0 * a->page * a->head_dim * 2.0;
    const double per_layer_seq = pages * a->kv_heads * unit;
    const double LB = (double)a->layers * batch;
    double need = 0.0;
    bool cpu = e->backend == FKV_BACKEND_CPU;
    if (cpu || p == FKV_POLICY_FREEKV || p == FKV_POLICY_SYNC)
        need += LB * per_layer_seq + 32.0 * 1048576.0; /* last pool chunk */
    if (cpu && p != FKV_POLICY_DENSE)
        need += LB * a->kv_heads * pages * 2.0 * a->head_dim * 4.0;
    /* benchmark: query trace (+ its host copy), coefficients, staging */
    double q = (double)T * a->layers * batch * a->q_heads * a->head_dim * 2.0;
    need += cpu ? q : 2.0 * q;
    return need;
}

#ifdef FKV_WITH_CUDA
/* Device bytes the library will take for the configuration (CUDA). */
static double device_bytes_needed(const args *a, int64_t ctx, int batch,
                                  fkv_policy p, int T)
{
    const double pages = (double)div_up((uint64_t)(ctx + T), (uint64_t)a->page);
    const double unit = 2.0 * a->page * a->head_dim * 2.0;
    const int S = a->sink / a->page, W = a->window / a->page;
    const int K = selected_pages_k(a);
    double per = 0.0;
    if (p == FKV_POLICY_RESIDENT || p == FKV_POLICY_DENSE)
        per += a->kv_heads * pages * unit;
    else
        per += a->kv_heads * (double)(S + W + 1 + K) * unit;
    if (p != FKV_POLICY_DENSE)
        per += 2.0 * a->kv_heads * pages * a->head_dim * 2.0;
    return per * a->layers * batch + 64.0 * 1048576.0;
}
#endif

/* Warm-up, timed steps, stats and the churn of a prefilled cache. */
static void measure(run_ctx *rc, const fkv_seq_id *seqs, fkv_policy policy,
                    result *res)
{
    const args *a = rc->a;
    fkv_cache *cache = rc->cache;
    const int batch = rc->batch;
    const int K = selected_pages_k(a);
    /* Warm-up and timed steps; stats over the timed steps only. */
    step_times tt;
    char why[160];
    step_times_alloc(&tt, a->steps);
    if (!time_steps(rc, 0, a->warmup, a->steps, 1, &tt, why, sizeof why)) {
        res->status = RUN_NO_GRAPH;
        snprintf(res->note, sizeof res->note, "%s", why);
        step_times_free(&tt);
        return;
    }
    fkv_stats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    BENCH_FKV_CHECK(cache, fkv_get_stats(cache, &st));
    /* steps counts fkv_attend calls on layer 0 on the host, which a
     * captured step makes once however often it is replayed (the device
     * counters count every replay): checked for eager steps only. */
    if (!a->graph && st.steps != (uint64_t)a->steps)
        bench_die("fkv_get_stats counted %llu steps, %d were timed",
                  (unsigned long long)st.steps, a->steps);
    const double n_steps = (double)a->steps;
    res->ms_median = bench_median(tt.ms, (size_t)a->steps);
    res->ms_p90 = bench_percentile(tt.ms, (size_t)a->steps, 90.0);
    res->host_ms = bench_median(tt.host, (size_t)a->steps);
    res->lib_host_ms = bench_median(tt.lib, (size_t)a->steps);
    for (int k = 0; k < CALL_KINDS; k++)
        res->lib_call_ms[k] = bench_median(tt.call[k], (size_t)a->steps);
    res->gemm_host_ms = bench_median(tt.gemm, (size_t)a->steps);
    res->crit_pages = (double)st.pages_recalled_critical / n_steps;
    if (!rc->e->use_gemm)
        res->gemm_host_ms = NAN;
    res->tokens_per_s = batch / (res->ms_median * 1e-3);
    res->corrections = (double)st.corrections / n_steps;
    res->heads_checked = (double)st.heads_checked / n_steps;
    res->pages = (double)st.pages_recalled / n_steps;
    res->bytes = (double)st.bytes_recalled / n_steps;
    res->recall_frac = K > 0 ? res->pages / ((double)a->layers * a->kv_heads *
                                             batch * K)
                             : 0.0;
    res->device_bytes = st.device_bytes;
    res->host_bytes = st.host_bytes;
    step_times_free(&tt);

    /* Churn: an un-timed run reading the selected pages of a sample of
     * (layer, sequence, KV head) after every step. */
    if (a->churn_steps > 0 && K > 0 && policy != FKV_POLICY_DENSE) {
        int layers[CHURN_LAYERS] = {0, a->layers / 2, a->layers - 1};
        int nl = a->layers >= 3 ? 3 : a->layers;
        if (a->layers == 2)
            layers[1] = 1;
        int ns = batch < CHURN_SEQS ? batch : CHURN_SEQS;
        size_t samples = (size_t)nl * ns * a->kv_heads;
        int32_t *prev = bench_xmalloc(samples * K * sizeof *prev);
        int32_t *cur = bench_xmalloc(samples * K * sizeof *cur);
        int32_t *pn = bench_xmalloc(samples * sizeof *pn);
        int32_t *cn = bench_xmalloc(samples * sizeof *cn);
        double changed = 0.0, total = 0.0;
        for (int i = -1; i < a->churn_steps; i++) {
            if (i >= 0)
                decode_step(rc, a->warmup + a->steps + i, 1);
            size_t k = 0;
            for (int li = 0; li < nl; li++)
                for (int s = 0; s < ns; s++)
                    for (int g = 0; g < a->kv_heads; g++, k++) {
                        int32_t *dst = (i < 0 ? prev : cur) + k * K;
                        int32_t *cnt = (i < 0 ? pn : cn) + k;
                        BENCH_FKV_CHECK(cache, fkv_get_selected_pages(
                                                   cache, layers[li], seqs[s],
                                                   g, dst, K, cnt));
                        if (*cnt > K)
                            bench_die("%d selected pages, the budget "
                                      "allows %d", (int)*cnt, K);
                    }
            if (i < 0)
                continue;
            for (k = 0; k < samples; k++) {
                const int32_t *c = cur + k * K, *p = prev + k * K;
                int same = 0;
                for (int x = 0, y = 0; x < cn[k] && y < pn[k];) {
                    if (c[x] == p[y]) {
                        same++;
                        x++;
                        y++;
                    } else if (c[x] < p[y])
                        x++;
                    else
                        y++;
                }
                changed += cn[k] - same;
                total += cn[k];
            }
            memcpy(prev, cur, samples * K * sizeof *prev);
            memcpy(pn, cn, samples * sizeof *pn);
        }
        res->churn = total > 0 ? changed / total : NAN;
        free(prev);
        free(cur);
        free(pn);
        free(cn);
    }
}

/* A set-up call (create, open, prefill append): out of memory means the
 * configuration does not fit after all (the estimate missed), and
 * FKV_ERR_UNSUPPORTED that the backend lacks the options: recorded in res and returned as true; any
 * other failure ends the program. */
static bool setup_call(fkv_status st, const fkv_cache *cache,
                       const char *what, result *res)
{
    if (st == FKV_OK)
        return false;
    if (st != FKV_ERR_OUT_OF_MEMORY && st != FKV_ERR_UNSUPPORTED)
        bench_fkv_check(st, cache, what, __FILE__, __LINE__);
    char msg[112];
    fkv_last_error(cache, msg, sizeof msg);
    res->status = st == FKV_ERR_UNSUPPORTED ? RUN_UNSUPPORTED : RUN_OOM;
    snprintf(res->note, sizeof res->note, "%s in %s: %s",
             st == FKV_ERR_UNSUPPORTED ? "unsupported" : "out of memory",
             what, msg);
    return true;
}

static void run_config(engine *e, const args *a, int ci, int bi,
                       fkv_policy policy, double threshold, result *res)
{
    const int64_t ctx = a->contexts[ci];
    const int batch = (int)a->batches[bi];
    const int T = a->warmup + a->steps + a->churn_steps;

    res->status = RUN_OK;
    res->churn = NAN;

    double host_need = host_bytes_needed(e, a, ctx, batch, policy, T);
    if (host_need > a->host_mem_gib * 1073741824.0) {
        res->status = RUN_HOST_MEM;
        snprintf(res->note, sizeof res->note,
                 "does not fit in host memory (%.3g GiB > --host-mem-gib %g)",
                 host_need / 1073741824.0, a->host_mem_gib);
        return;
    }

    measure_gemm(e, a, bi);
    res->gemm_ms = e->gemm_ms[bi];

    workload w;
    workload_build(&w, a, ctx, batch, T, a->warmup, a->steps);
    workload_alloc(e, &w);
    res->cos_mean = w.cos_mean;
    res->topics = w.NT;

#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA) {
        size_t free_b = 0, total_b = 0;
        BENCH_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
        double need = device_bytes_needed(a, ctx, batch, policy, T);
        double margin = 512.0 * 1048576.0;
        if (need + margin > (double)free_b) {
            res->status = RUN_DEVICE_MEM;
            snprintf(res->note, sizeof res->note,
                     "does not fit on the device (%.3g GiB > %.3g GiB free)",
                     need / 1073741824.0, (double)free_b / 1073741824.0);
            workload_free(e, &w);
            return;
        }
    }
#endif

    fkv_options o;
    fkv_cache *cache = NULL;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = e->backend;
    o.device = a->device;
    o.num_layers = a->layers;
    o.num_q_heads = a->q_heads;
    o.num_kv_heads = a->kv_heads;
    o.head_dim = a->head_dim;
    o.dtype = FKV_DTYPE_BF16;
    o.page_tokens = a->page;
    o.budget_tokens = a->budget;
    o.sink_tokens = a->sink;
    o.window_tokens = a->window;
    o.correction_threshold = (float)threshold;
    o.correction_criterion = a->criterion;
    o.correction_min_mass = (float)a->min_mass;
    o.correction_max_pages = a->max_pages;
    o.policy = policy;
    o.max_sequences = batch;
    o.max_tokens_per_sequence = ctx + T;
    fkv_seq_id *seqs = bench_xmalloc((size_t)batch * sizeof *seqs);
    int32_t *ntok = bench_xmalloc((size_t)batch * sizeof *ntok);
    int opened = 0;
    bool oom = setup_call(fkv_create(&o, &cache), NULL, "fkv_create", res);
#ifdef FKV_WITH_CUDA
    if (!oom && e->backend == FKV_BACKEND_CUDA)
        BENCH_FKV_CHECK(cache, fkv_set_stream(cache, e->stream));
#endif
    while (!oom && opened < batch) {
        oom = setup_call(fkv_seq_open(cache, &seqs[opened]), cache,
                         "fkv_seq_open", res);
        opened += !oom;
    }

    /* --reserve: the pool's allocations first, so that the prefill below
     * times the appends' writes alone. */
    double t0 = bench_now_ms();
    for (int s = 0; !oom && a->reserve && s < opened; s++)
        oom = setup_call(fkv_seq_reserve(cache, seqs[s], ctx + T), cache,
                         "fkv_seq_reserve", res);
    res->reserve_s = a->reserve ? (bench_now_ms() - t0) * 1e-3 : NAN;

    /* Prefill: chunks of tokens, one bulk append per layer and chunk. */
    t0 = bench_now_ms();
    for (int64_t p0 = 0; !oom && p0 < ctx; p0 += a->prefill_chunk) {
        int64_t n = ctx - p0 < a->prefill_chunk ? ctx - p0 : a->prefill_chunk;
        for (int s = 0; s < batch; s++) {
            fill_coef(&w, s, p0, n, w.coef_host + (size_t)s * n * w.C, 1);
            ntok[s] = (int32_t)n;
        }
        upload_coef(e, &w, (size_t)batch * n);
        fkv_batch pre = {batch, 0, seqs, ntok};
        for (int l = 0; !oom && l < a->layers; l++) {
            basis_gemm(e, &w, l, 0, (size_t)batch * n, w.kstage);
            basis_gemm(e, &w, l, 1, (size_t)batch * n, w.vstage);
            oom = setup_call(fkv_append(cache, l, &pre, w.kstage, w.vstage),
                             cache, "fkv_append (prefill)", res);
        }
    }
#ifdef FKV_WITH_CUDA
    if (e->backend == FKV_BACKEND_CUDA)
        BENCH_CUDA_CHECK(cudaStreamSynchronize(e->stream));
#endif
    res->prefill_s = (bench_now_ms() - t0) * 1e-3;
    if (!oom) {
        for (int s = 0; s < batch; s++) {
            int64_t len = 0;
            BENCH_FKV_CHECK(cache, fkv_seq_length(cache, seqs[s], &len));
            if (len != ctx)
                bench_die("sequence %d holds %lld tokens after prefill, not "
                          "%lld", s, (long long)len, (long long)ctx);
        }
        run_ctx rc;
        memset(&rc, 0, sizeof rc);
        rc.e = e;
        rc.a = a;
        rc.w = &w;
        rc.cache = cache;
        rc.batch = batch;
        rc.step = (fkv_batch){batch, 0, seqs, NULL};
        measure(&rc, seqs, policy, res);
    }

    for (int s = 0; s < opened; s++)
        BENCH_FKV_CHECK(cache, fkv_seq_close(cache, seqs[s]));
    fkv_destroy(cache);
    free(seqs);
    free(ntok);
    workload_free(e, &w);
    if (oom || res->status != RUN_OK)
        return;

    /* Lower bounds. */
    if (e->backend == FKV_BACKEND_CUDA) {
        double attended = policy == FKV_POLICY_DENSE
                              ? (double)ctx + a->warmup + a->steps / 2.0
                              : (double)(ctx < a->budget ? ctx : a->budget);
        double bytes = attended * a->layers * a->kv_heads * 2.0 *
                       a->head_dim * 2.0 * batch;
        res->attend_bound_ms = bytes / (e->dev_gbs * 1e9) * 1e3;
        res->recall_bound_ms = res->bytes / (e->pcie_gbs * 1e9) * 1e3;
        double b = res->attend_bound_ms;
        if (res->recall_bound_ms > b)
            b = res->recall_bound_ms;
        if (res->gemm_ms == res->gemm_ms && res->gemm_ms > b)
            b = res->gemm_ms;
        res->bound_ms = b;
    } else {
        res->attend_bound_ms = res->recall_bound_ms = res->bound_ms = NAN;
    }
}

/* ------------------------------------------------------------------------ */
/* Output                                                                   */
/* ------------------------------------------------------------------------ */

static const char *status_name(run_status s)
{
    switch (s) {
    case RUN_OK: return "ok";
    case RUN_HOST_MEM: return "host-mem";
    case RUN_DEVICE_MEM: return "device-mem";
    case RUN_TIME_LIMIT: return "time-limit";
    case RUN_OOM: return "out-of-memory";
    case RUN_UNSUPPORTED: return "unsupported";
    case RUN_NO_GRAPH: return "no-graph";
    }
    return "?";
}

static const char *criterion_name(int c)
{
    return c == FKV_CRITERION_BOUNDED ? "bounded" : "cosine";
}

/* "0.90", or "off" for a threshold that turns correction off. */
static void fmt_threshold(char *buf, size_t n, double t)
{
    if (t <= FKV_CORRECTION_OFF)
        snprintf(buf, n, "off");
    else
        snprintf(buf, n, "%.2f", t);
}

static void csv_header(FILE *f)
{
    fprintf(f, "backend,device,model,layers,q_heads,kv_heads,head_dim,hidden,"
               "intermediate,page,budget,sink,window,threshold,trace,policy,context,"
               "batch,status,note,warmup,steps,step_ms_median,step_ms_p90,"
               "host_enqueue_ms,tokens_per_s,corrections_per_step,"
               "heads_checked_per_step,correction_rate,pages_recalled_per_step,"
               "bytes_recalled_per_step,recall_fraction,churn,adjacent_cos,"
               "topics,device_bytes,host_bytes,gemm_ms,pcie_gbs,device_gbs,"
               "recall_bound_ms,attend_bound_ms,lower_bound_ms,prefill_s,"
               "criterion,min_mass,max_pages,graph,lib_host_ms,gemm_host_ms,"
               "pages_critical_per_step,bound_ratio,reserve_s,lib_append_ms,"
               "lib_attend_ms,lib_select_ms,lib_recall_ms\n");
}

/* A number, or nothing for NAN. */
static void csv_num(FILE *f, double v)
{
    if (v == v)
        fprintf(f, ",%.6g", v);
    else
        fputs(",", f);
}

static void csv_row(FILE *f, const engine *e, const args *a, const result *r)
{
    bool ok = r->status == RUN_OK;
    fprintf(f, "%s,\"%s\",%s,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%g,%s,%s,%lld,%d,%s,"
               "\"%s\",%d,%d",
            backend_name(e->backend), e->device_name, a->model_label,
            a->layers, a->q_heads, a->kv_heads, a->head_dim, a->hidden,
            a->intermediate, a->page, a->budget, a->sink, a->window,
            r->threshold, a->paper_trace ? "paper" : "drift",
            bench_policy_name(r->policy), (long long)r->ctx,
            r->batch, status_name(r->status), r->note, a->warmup, a->steps);
    double rate = r->heads_checked > 0 ? r->corrections / r->heads_checked
                                       : NAN;
    double vals[] = {
        ok ? r->ms_median : NAN, ok ? r->ms_p90 : NAN, ok ? r->host_ms : NAN,
        ok ? r->tokens_per_s : NAN, ok ? r->corrections : NAN,
        ok ? r->heads_checked : NAN, ok ? rate : NAN, ok ? r->pages : NAN,
        ok ? r->bytes : NAN, ok ? r->recall_frac : NAN, ok ? r->churn : NAN,
        ok ? r->cos_mean : NAN, ok ? (double)r->topics : NAN,
        ok ? (double)r->device_bytes : NAN, ok ? (double)r->host_bytes : NAN,
        r->gemm_ms == 0.0 ? NAN : r->gemm_ms,
        e->pcie_gbs > 0 ? e->pcie_gbs : NAN, e->dev_gbs > 0 ? e->dev_gbs : NAN,
        ok ? r->recall_bound_ms : NAN, ok ? r->attend_bound_ms : NAN,
        ok ? r->bound_ms : NAN, ok ? r->prefill_s : NAN};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++)
        csv_num(f, vals[i]);
    fprintf(f, ",%s,%g,%d,%d", criterion_name(a->criterion), a->min_mass,
            a->max_pages, a->graph);
    double more[] = {ok ? r->lib_host_ms : NAN, ok ? r->gemm_host_ms : NAN,
                     ok ? r->crit_pages : NAN,
                     ok && r->bound_ms > 0 ? r->ms_median / r->bound_ms : NAN,
                     ok ? r->reserve_s : NAN, ok ? r->lib_call_ms[CALL_APPEND] : NAN,
                     ok ? r->lib_call_ms[CALL_ATTEND] : NAN,
                     ok ? r->lib_call_ms[CALL_SELECT] : NAN,
                     ok ? r->lib_call_ms[CALL_RECALL] : NAN};
    for (size_t i = 0; i < sizeof more / sizeof more[0]; i++)
        csv_num(f, more[i]);
    fputc('\n', f);
    fflush(f);
}

static int cmp_result(const void *x, const void *y)
{
    const result *a = x, *b = y;
    if (a->ctx != b->ctx)
        return a->ctx < b->ctx ? -1 : 1;
    if (a->batch != b->batch)
        return a->batch < b->batch ? -1 : 1;
    if (a->policy != b->policy)
        return policy_rank(a->policy) - policy_rank(b->policy);
    return a->threshold_index - b->threshold_index;
}

/* Eager rows: the host time inside each fkv call per step (the decode
 * path's enqueue cost by call; none under --graph). */
static void print_call_table(const result *res, int n)
{
    int rows = 0;
    for (int i = 0; i < n; i++)
        rows += res[i].status == RUN_OK && res[i].lib_call_ms[0] == res[i].lib_call_ms[0];
    if (rows == 0)
        return;
    bench_table t;
    bench_table_init(&t, 4 + CALL_KINDS);
    bench_table_add(&t, "%s", "context");
    bench_table_add(&t, "%s", "batch");
    bench_table_add(&t, "%s", "policy");
    bench_table_add(&t, "%s", "lib ms");
    for (int k = 0; k < CALL_KINDS; k++)
        bench_table_add(&t, "%s ms", call_names[k]);
    for (int i = 0; i < n; i++) {
        const result *r = &res[i];
        if (r->status != RUN_OK || r->lib_call_ms[0] != r->lib_call_ms[0])
            continue;
        bench_table_add(&t, "%lld", (long long)r->ctx);
        bench_table_add(&t, "%d", r->batch);
        bench_table_add(&t, "%s", bench_policy_name(r->policy));
        bench_table_add(&t, "%.3f", r->lib_host_ms);
        for (int k = 0; k < CALL_KINDS; k++)
            bench_table_add(&t, "%.3f", r->lib_call_ms[k]);
    }
    printf("host time inside each fkv call per step (eager rows, medians):\n");
    bench_table_print(&t, stdout);
    bench_table_free(&t);
}

static void print_tables(const engine *e, const args *a, result *res, int n)
{
    qsort(res, (size_t)n, sizeof *res, cmp_result);
    bench_table t;
    enum { NCOL = 25 };
    bench_table_init(&t, NCOL);
    const char *head[NCOL] = {"context", "batch", "policy", "tau", "ms med",
                              "ms p90", "host ms", "lib ms", "GEMM host",
                              "tok/s", "corr/st", "chk/st", "pages/st",
                              "crit/st", "MiB/st", "churn%", "cos", "dev GiB",
                              "host GiB", "GEMM ms", "PCIe ms", "attn ms",
                              "bound", "x bnd", "note"};
    for (size_t i = 0; i < sizeof head / sizeof head[0]; i++)
        bench_table_add(&t, "%s", head[i]);
    for (int i = 0; i < n; i++) {
        const result *r = &res[i];
        char b[NCOL - 1][48];
        bool ok = r->status == RUN_OK;
        snprintf(b[0], 48, "%lld", (long long)r->ctx);
        snprintf(b[1], 48, "%d", r->batch);
        snprintf(b[2], 48, "%s", bench_policy_name(r->policy));
        if (r->policy == FKV_POLICY_FREEKV)
            fmt_threshold(b[3], 48, r->threshold);
        else
            snprintf(b[3], 48, "-");
        bench_fmt(b[4], 48, "%.3f", ok ? r->ms_median : NAN);
        bench_fmt(b[5], 48, "%.3f", ok ? r->ms_p90 : NAN);
        bench_fmt(b[6], 48, "%.3f", ok ? r->host_ms : NAN);
        bench_fmt(b[7], 48, "%.3f", ok ? r->lib_host_ms : NAN);
        bench_fmt(b[8], 48, "%.3f", ok ? r->gemm_host_ms : NAN);
        bench_fmt(b[9], 48, "%.0f", ok ? r->tokens_per_s : NAN);
        bench_fmt(b[10], 48, "%.1f",
                  ok && r->heads_checked > 0 ? r->corrections : NAN);
        bench_fmt(b[11], 48, "%.0f",
                  ok && r->heads_checked > 0 ? r->heads_checked : NAN);
        bench_fmt(b[12], 48, "%.1f", ok ? r->pages : NAN);
        bench_fmt(b[13], 48, "%.1f", ok ? r->crit_pages : NAN);
        bench_fmt(b[14], 48, "%.2f", ok ? r->bytes / 1048576.0 : NAN);
        bench_fmt(b[15], 48, "%.1f", ok ? 100.0 * r->churn : NAN);
        bench_fmt(b[16], 48, "%.3f", ok ? r->cos_mean : NAN);
        bench_fmt(b[17], 48, "%.2f",
                  ok ? r->device_bytes / 1073741824.0 : NAN);
        bench_fmt(b[18], 48, "%.2f", ok ? r->host_bytes / 1073741824.0 : NAN);
        bench_fmt(b[19], 48, "%.3f", r->gemm_ms == 0.0 ? NAN : r->gemm_ms);
        bench_fmt(b[20], 48, "%.3f", ok ? r->recall_bound_ms : NAN);
        bench_fmt(b[21], 48, "%.3f", ok ? r->attend_bound_ms : NAN);
        bench_fmt(b[22], 48, "%.3f", ok ? r->bound_ms : NAN);
        bench_fmt(b[23], 48, "%.2f",
                  ok && r->bound_ms > 0 ? r->ms_median / r->bound_ms : NAN);
        for (int c = 0; c < NCOL - 1; c++)
            bench_table_add(&t, "%s", b[c]);
        bench_table_add(&t, "%s", r->note);
    }
    bench_table_print(&t, stdout);
    bench_table_free(&t);
    print_call_table(res, n);
    printf("ms med/p90: step latency over the timed steps (%s%s); host ms: "
           "host time to enqueue a step\n",
           e->backend == FKV_BACKEND_CUDA ? "CUDA events on the engine's "
                                            "stream"
                                          : "host clock",
           a->graph && e->backend == FKV_BACKEND_CUDA
               ? ", one graph replay per step" : "");
    printf("lib ms: host time inside the fkv calls per step; GEMM host: "
           "host time enqueueing the GEMM stand-ins (medians; - under "
           "--graph)\n");
    printf("tau: FREEKV's correction threshold (criterion %s); crit/st: "
           "pages moved inside fkv_attend per step (of pages/st)\n",
           criterion_name(a->criterion));
    printf("corr/st, chk/st: corrections and heads checked per step "
           "(FREEKV); pages/st, MiB/st: recalled per step\n");
    printf("churn%%: selected pages that changed per step (sampled, un-timed "
           "run); cos: mean adjacent-step query cosine\n");
    printf("bound: max(GEMM ms, PCIe ms = recalled bytes / H2D bandwidth, "
           "attn ms = attended bytes / device bandwidth); x bnd = ms med / "
           "bound\n");

    /* FREEKV against RESIDENT and SYNC, per (context, batch). */
    bench_table r;
    bench_table_init(&r, 9);
    const char *rh[] = {"context", "batch", "tau", "FREEKV ms", "RESIDENT ms",
                        "SYNC ms", "FREEKV/RESIDENT", "FREEKV/SYNC", "target"};
    for (size_t i = 0; i < sizeof rh / sizeof rh[0]; i++)
        bench_table_add(&r, "%s", rh[i]);
    int rows = 0;
    for (int i = 0; i < n; i++) {
        if (res[i].policy != FKV_POLICY_FREEKV || res[i].status != RUN_OK)
            continue;
        double fk = res[i].ms_median, rs = NAN, sy = NAN;
        for (int j = 0; j < n; j++) {
            if (res[j].ctx != res[i].ctx || res[j].batch != res[i].batch ||
                res[j].status != RUN_OK)
                continue;
            if (res[j].policy == FKV_POLICY_RESIDENT)
                rs = res[j].ms_median;
            if (res[j].policy == FKV_POLICY_SYNC)
                sy = res[j].ms_median;
        }
        char c[5][48];
        bench_fmt(c[0], 48, "%.3f", fk);
        bench_fmt(c[1], 48, "%.3f", rs);
        bench_fmt(c[2], 48, "%.3f", sy);
        bench_fmt(c[3], 48, "%.3f", fk / rs);
        bench_fmt(c[4], 48, "%.3f", fk / sy);
        char tau[16];
        fmt_threshold(tau, sizeof tau, res[i].threshold);
        bench_table_add(&r, "%lld", (long long)res[i].ctx);
        bench_table_add(&r, "%d", res[i].batch);
        bench_table_add(&r, "%s", tau);
        for (int k = 0; k < 5; k++)
            bench_table_add(&r, "%s", c[k]);
        bench_table_add(&r, "%s", "<= 1.10 / <= 0.50");
        rows++;
    }
    if (rows) {
        printf("\n");
        bench_table_print(&r, stdout);
    }
    bench_table_free(&r);
}

/* ------------------------------------------------------------------------ */
/* Main                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct plan_item {
    int ci, bi, ti; /* ti: index in thresholds (FREEKV; else 0) */
    fkv_policy policy;
    int tier;
} plan_item;

static int cmp_plan(const void *x, const void *y)
{
    const plan_item *a = x, *b = y;
    if (a->tier != b->tier)
        return a->tier - b->tier;
    if (a->ci != b->ci)
        return a->ci - b->ci;
    if (a->bi != b->bi)
        return a->bi - b->bi;
    if (a->policy != b->policy)
        return policy_rank(a->policy) - policy_rank(b->policy);
    return a->ti - b->ti;
}

int main(int argc, char **argv)
{
    args a;
    parse_args(argc, argv, &a, 0);

    if (fkv_version_number() / 10000 != FKV_VERSION_MAJOR ||
        fkv_version_number() < FKV_VERSION_NUMBER)
        bench_die("built against libfreekv %d.%d.%d, linked with %s",
                  FKV_VERSION_MAJOR, FKV_VERSION_MINOR, FKV_VERSION_PATCH,
                  fkv_version_string());

    const double t_start = bench_now_ms();
    engine e;
    memset(&e, 0, sizeof e);
    resolve_backend(&a, &e);
    /* The CPU backend runs the --smoke sizes unless flags say otherwise:
     * the model's sizes would take hours there. */
    int cpu_sizes = e.backend == FKV_BACKEND_CPU && !a.smoke;
    if (cpu_sizes)
        parse_args(argc, argv, &a, 1);
    e.use_gemm = a.gemm && e.backend == FKV_BACKEND_CUDA;
    for (int b = 0; b < a.n_batches; b++)
        if (a.batches[b] > e.max_batch)
            e.max_batch = (int)a.batches[b];
    snprintf(e.device_name, sizeof e.device_name, "host");
#ifdef FKV_WITH_CUDA
    if (e.backend == FKV_BACKEND_CUDA)
        engine_cuda_init(&e, &a);
#endif
    if (e.backend == FKV_BACKEND_CPU)
        e.out = bench_xcalloc((size_t)e.max_batch * a.hidden, 2);

    /* Header (stderr: progress; the table goes to stdout at the end). */
    const int K = selected_pages_k(&a);
    fprintf(stderr, "libfreekv %s decode benchmark\n", fkv_version_string());
    fprintf(stderr, "backend: %s (%s)%s%s\n", backend_name(e.backend),
            e.device_name, e.why_cpu[0] ? ": " : "", e.why_cpu);
    fprintf(stderr, "model: %s, %d layers, %d query heads, %d KV heads, "
            "head_dim %d, hidden %d, intermediate %d, bf16\n", a.model_label,
            a.layers, a.q_heads, a.kv_heads, a.head_dim, a.hidden,
            a.intermediate);
    char taus[MAX_LIST * 8 + 1] = "";
    for (int i = 0; i < a.n_thresholds; i++) {
        char one[16];
        fmt_threshold(one, sizeof one, a.thresholds[i]);
        snprintf(taus + strlen(taus), sizeof taus - strlen(taus), "%s%s",
                 i ? "," : "", one);
    }
    fprintf(stderr, "cache: page %d, budget %d (sink %d, window %d, %d "
            "selected pages), threshold %s, criterion %s", a.page, a.budget,
            a.sink, a.window, K, taus, criterion_name(a.criterion));
    if (a.criterion == FKV_CRITERION_BOUNDED)
        fprintf(stderr, " (min mass %g, max pages %d)", a.min_mass,
                a.max_pages);
    fprintf(stderr, "%s%s\n", a.graph ? "; timed steps replay a CUDA graph"
                                       : "",
            a.select_q ? "; fkv_select given the query" : "");
    fprintf(stderr, "steps: %d warm-up, %d timed, %d for the churn\n",
            a.warmup, a.steps, a.churn_steps);
    if (cpu_sizes)
        fprintf(stderr, "sizes: --smoke's (the CPU backend's default); "
                "flags override them\n");
    if (e.backend == FKV_BACKEND_CUDA) {
#ifdef FKV_WITH_CUDA
        fprintf(stderr, "measured: H2D pinned %.1f GB/s, device %.0f GB/s "
                "(read + write); GEMM weights %.2f GiB%s\n", e.pcie_gbs,
                e.dev_gbs, e.weight_bytes / 1073741824.0,
                e.use_gemm ? "" : " (--no-gemm)");
#endif
    } else {
        fprintf(stderr, "CPU backend: no GEMMs, host clock\n");
    }
    if (K <= 0)
        bench_die("budget %d leaves no selected pages after sink %d and "
                  "window %d", a.budget, a.sink, a.window);

    /* The sweep, most important first (see usage). */
    int per_cb = 0; /* runs per (context, batch) */
    for (int p = 0; p < a.n_policies; p++)
        per_cb += a.policies[p] == FKV_POLICY_FREEKV ? a.n_thresholds : 1;
    const int n_items = a.n_contexts * a.n_batches * per_cb;
    plan_item *plan = bench_xmalloc((size_t)n_items * sizeof *plan);
    int64_t long_ctx = 32768;
    int64_t max_ctx = 0;
    for (int c = 0; c < a.n_contexts; c++)
        if (a.contexts[c] > max_ctx)
            max_ctx = a.contexts[c];
    if (max_ctx < long_ctx)
        long_ctx = max_ctx;
    int k = 0;
    for (int c = 0; c < a.n_contexts; c++)
        for (int b = 0; b < a.n_batches; b++)
            for (int p = 0; p < a.n_policies; p++)
            for (int ti = 0; ti < (a.policies[p] == FKV_POLICY_FREEKV
                                       ? a.n_thresholds : 1); ti++) {
                plan_item *it = &plan[k++];
                it->ci = c;
                it->bi = b;
                it->ti = ti;
                it->policy = a.policies[p];
                bool lng = a.contexts[c] >= long_ctx;
                int tier = it->policy == FKV_POLICY_FREEKV ||
                                   it->policy == FKV_POLICY_RESIDENT
                               ? 0
                               : it->policy == FKV_POLICY_SYNC ? 1 : 2;
                it->tier = lng ? tier : 3 + tier;
            }
    qsort(plan, (size_t)n_items, sizeof *plan, cmp_plan);

    FILE *csv = NULL;
    if (a.csv) {
        csv = fopen(a.csv, "w");
        if (!csv)
            bench_die("cannot write %s", a.csv);
        csv_header(csv);
        fflush(csv);
    }

    result *res = bench_xcalloc((size_t)n_items, sizeof *res);
    for (int i = 0; i < n_items; i++) {
        const plan_item *it = &plan[i];
        result *r = &res[i];
        r->ctx = a.contexts[it->ci];
        r->batch = (int)a.batches[it->bi];
        r->batch_index = it->bi;
        r->policy = it->policy;
        r->threshold = a.thresholds[it->ti];
        r->threshold_index = it->ti;
        double elapsed = (bench_now_ms() - t_start) * 1e-3;
        if (a.time_limit_s > 0 && elapsed > a.time_limit_s) {
            r->status = RUN_TIME_LIMIT;
            r->churn = NAN;
            snprintf(r->note, sizeof r->note, "not run: --time-limit %g s",
                     a.time_limit_s);
        } else {
            double t0 = bench_now_ms();
            run_config(&e, &a, it->ci, it->bi, it->policy, r->threshold, r);
            char tau[24] = "";
            if (r->policy == FKV_POLICY_FREEKV && a.n_thresholds > 1) {
                char one[16];
                fmt_threshold(one, sizeof one, r->threshold);
                snprintf(tau, sizeof tau, " tau %s", one);
            }
            fprintf(stderr, "[%d/%d %5.0f s] %-8s%s context %7lld batch %3d: ",
                    i + 1, n_items, elapsed, bench_policy_name(r->policy),
                    tau, (long long)r->ctx, r->batch);
            if (r->status == RUN_OK) {
                char churn[32];
                bench_fmt(churn, sizeof churn, "%.1f%%", 100.0 * r->churn);
                char reserve[48] = "";
                if (r->reserve_s == r->reserve_s)
                    snprintf(reserve, sizeof reserve, "reserve %.1f s, ",
                             r->reserve_s);
                fprintf(stderr, "%.3f ms (p90 %.3f), %.1f pages/step, "
                        "%.1f corrections/step, churn %s, cos %.3f, %sprefill "
                        "%.1f s, %.1f s in all\n", r->ms_median, r->ms_p90,
                        r->pages, r->corrections, churn, r->cos_mean, reserve,
                        r->prefill_s, (bench_now_ms() - t0) * 1e-3);
            } else
                fprintf(stderr, "%s\n", r->note);
        }
        if (csv)
            csv_row(csv, &e, &a, r);
    }
    if (csv && fclose(csv) != 0)
        bench_die("cannot write %s", a.csv);

    fflush(stderr);
    printf("libfreekv %s decode: backend %s (%s), %s (%d layers, %d/%d "
           "heads, head_dim %d), budget %d, threshold %s, criterion %s, "
           "trace %s, %d timed steps%s; %.0f s\n",
           fkv_version_string(), backend_name(e.backend), e.device_name,
           a.model_label, a.layers, a.q_heads, a.kv_heads, a.head_dim,
           a.budget, taus, criterion_name(a.criterion),
           a.paper_trace ? "paper" : "drift", a.steps,
           a.graph ? " (CUDA graph replays)" : "", (bench_now_ms() - t_start) * 1e-3);
    if (e.backend == FKV_BACKEND_CUDA)
        printf("H2D pinned %.1f GB/s, device %.0f GB/s (read + write)\n",
               e.pcie_gbs, e.dev_gbs);
    print_tables(&e, &a, res, n_items);

    free(res);
    free(plan);
#ifdef FKV_WITH_CUDA
    if (e.backend == FKV_BACKEND_CUDA)
        engine_cuda_free(&e);
#endif
    if (e.backend == FKV_BACKEND_CPU)
        free(e.out);
    return 0;
}
