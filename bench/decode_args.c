/*
 * bench/decode's command line: the flags, their defaults and checks.
 *
 * SPDX-License-Identifier: MIT
 */
#include "decode.h"

/* ------------------------------------------------------------------------ */
/* Command line                                                             */
/* ------------------------------------------------------------------------ */

static const model_preset MODELS[] = {
    {"llama3-8b", 32, 32, 8, 128, 14336},
    {"qwen2.5-7b", 28, 28, 4, 128, 18944},
};

int policy_rank(fkv_policy p)
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

void usage(FILE *f)
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
        "  --spec-mass X         bounded's speculative_min_mass (default 0: the\n"
        "                        speculative recall moves the whole top-K)\n"
        "  --graph               (CUDA) capture one whole decode step (every\n"
        "                        layer's fkv calls and GEMMs) in a CUDA graph\n"
        "                        after the warm-up, replay it for the timed\n"
        "                        steps; a policy whose step cannot be captured\n"
        "                        gets a \"no-graph\" row, not eager timings\n"
        "  --select-q            pass the query to fkv_select (the library then\n"
        "                        compares it with the attend's on the device)\n"
        "                        instead of NULL, the attend's query (default)\n"
        "  --fixed-inputs        (CUDA) eager steps read q, k and v from one\n"
        "                        buffer each, as an engine's GEMM outputs are,\n"
        "                        staged before each step (outside its timing)\n"
        "                        instead of a pointer into the trace per step,\n"
        "                        so the library's launch cache\n"
        "                        sees the attend's launches repeat\n"
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

void parse_args(int argc, char **argv, args *a, int smoke_sizes)
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
        a->spec_mass = lib.speculative_min_mass;
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
        if (!strcmp(flag, "--fixed-inputs")) {
            a->fixed_inputs = 1;
            continue;
        }
        static const char *const with_value[] = {
            "--model", "--layers", "--q-heads", "--kv-heads", "--head-dim",
            "--intermediate", "--contexts", "--batches", "--policies",
            "--steps", "--warmup", "--churn-steps", "--prefill-chunk",
            "--page", "--budget", "--sink", "--window", "--threshold", "--trace",
            "--thresholds", "--criterion", "--min-mass", "--max-pages",
            "--spec-mass",
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
        else if (!strcmp(name, "--spec-mass"))
            a->spec_mass = parse_double(name, val);
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

