/* llama: a Llama engine whose KV cache lives in libfreekv.
 *
 *   llama generate --model DIR (--prompt TEXT | --prompt-file F) --tokens N
 *   llama eval     --model DIR --text FILE --prefill N --steps M
 *   llama speculate --model DIR (--prompt TEXT | --prompt-file F) --tokens N --draft n
 *   llama bench    --shape llama3-8b|qwen2.5-7b|tiny|H,I,L,QH,KVH,HD,V
 *
 * See `llama --help` and docs/integration.md. Every failure is a message on
 * stderr and exit status 1 (2 for bad usage). */
#define _POSIX_C_SOURCE 200809L
#include "engine.h"
#include "speculate.h"
#ifdef LLAMA_WITH_CUDA
#include "gpu_selfcheck.h"
#ifdef LLAMA_WITH_CUDA
#include "gpu_tp.h"
#endif
#endif

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define ERRLEN 1024
#define MAX_CONFIGS 64

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void usage(FILE *f)
{
    fprintf(f,
        "usage: llama MODE [options]\n"
        "modes:\n"
        "  generate --model DIR (--prompt TEXT | --prompt-file F) --tokens N\n"
        "           [--temperature T] [--seed S]\n"
        "  speculate --model DIR (--prompt TEXT | --prompt-file F) --tokens N [--draft n]\n"
        "           greedy speculative decoding (n-gram drafter, CPU), checked against generate\n"
        "  eval     --model DIR --text FILE [--offset BYTES] --prefill N --steps M\n"
        "           [--policies a,b,...] [--budgets x,y,...] [--no-dense]\n"
        "  bench    --shape llama3-8b|qwen2.5-7b|tiny|H,I,L,QH,KVH,HD,V --batch B\n"
        "           --context C --steps S [--policies ...] [--budgets ...]\n"
        "           [--weights f32|f16|bf16] [--warmup W]\n"
        "cache options (defaults: the library's fkv_options_init):\n"
        "  --policy dense|resident|sync|freekv  --budget N  --page N  --sink N\n"
        "  --window N  --threshold X|off  --dtype f32|f16|bf16 (default f32)\n"
        "  --criterion cosine|bounded  --min-mass X  --max-pages N  --spec-mass X\n"
        "           (BOUNDED; --spec-mass: speculative_min_mass)\n"
        "  --dense-layers LIST  layers attending every token whatever the policy:\n"
        "           comma-separated indices, 'last' = the last layer (e.g. 0,last)\n"
        "other: --backend cpu|cuda|auto (default auto)  --threads N  --json\n"
        "       --graph (CUDA: replay decode steps from a captured CUDA graph;\n"
        "       the CUDA path's --dtype defaults to bf16)\n"
        "       --tp N (CUDA + NCCL: N GPUs, tensor parallel; KV heads divisible by N)\n"
        "  selfcheck-gpu [--model DIR] [--text FILE] [--prefill N] [--steps M]\n"
        "           the CUDA backend's logits against the CPU backend's\n"
        "           (and --tp 2 against one GPU, with 2 or more GPUs)\n");
}

/* ---- options ---------------------------------------------------------------- */

typedef struct args {
    const char *mode, *model, *prompt, *prompt_file, *text, *shape;
    const char *policies, *budgets, *backend, *weights;
    const char *dense_layers; /* --dense-layers LIST, resolved per model */
    int64_t tokens, offset, prefill, steps, batch, context, warmup, seed, draft;
    double temperature;
    int json, no_dense, threads;
    int graph, dtype_set; /* --graph; --dtype given */
    int64_t tp; /* --tp N (1: one GPU) */
    fkv_options opts; /* cache options as given (policy, budget, ...) */
} args;

static const char *policy_name(fkv_policy p)
{
    switch (p) {
    case FKV_POLICY_DENSE: return "dense";
    case FKV_POLICY_RESIDENT: return "resident";
    case FKV_POLICY_SYNC: return "sync";
    default: return "freekv";
    }
}

static int parse_policy(const char *s, fkv_policy *p)
{
    if (!strcmp(s, "dense")) *p = FKV_POLICY_DENSE;
    else if (!strcmp(s, "resident")) *p = FKV_POLICY_RESIDENT;
    else if (!strcmp(s, "sync")) *p = FKV_POLICY_SYNC;
    else if (!strcmp(s, "freekv")) *p = FKV_POLICY_FREEKV;
    else return -1;
    return 0;
}

static const char *dtype_name(fkv_dtype d)
{
    return d == FKV_DTYPE_F32 ? "f32" : d == FKV_DTYPE_F16 ? "f16" : "bf16";
}

static int parse_int(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out)
{
    char *end;
    long long v;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "llama: %s needs an integer in [%lld, %lld], not \"%s\"\n", flag,
                (long long)lo, (long long)hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

static int parse_args(int argc, char **argv, args *a)
{
    int i;
    int64_t v;
    memset(a, 0, sizeof *a);
    fkv_options_init(&a->opts, sizeof a->opts);
    /* The engine always sets dtype itself; f32 is the CPU path's own. */
    a->opts.dtype = FKV_DTYPE_F32;
    a->backend = "auto";
    a->weights = "bf16";
    a->tokens = 64;
    a->draft = 4;
    a->batch = 1;
    a->steps = -1;
    a->warmup = 2;
    if (argc < 2) {
        usage(stderr);
        return -1;
    }
    a->mode = argv[1];
    if (!strcmp(a->mode, "--help") || !strcmp(a->mode, "-h")) {
        usage(stdout);
        exit(0);
    }
    for (i = 2; i < argc; i++) {
        const char *f = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDVAL()                                                                \
        do {                                                                     \
            if (!val) { fprintf(stderr, "llama: %s needs a value\n", f); return -1; } \
            i++;                                                                 \
        } while (0)
        if (!strcmp(f, "--json")) { a->json = 1; continue; }
        if (!strcmp(f, "--no-dense")) { a->no_dense = 1; continue; }
        if (!strcmp(f, "--graph")) { a->graph = 1; continue; }
        if (!strcmp(f, "--help") || !strcmp(f, "-h")) { usage(stdout); exit(0); }
        NEEDVAL();
        if (!strcmp(f, "--model")) a->model = val;
        else if (!strcmp(f, "--prompt")) a->prompt = val;
        else if (!strcmp(f, "--prompt-file")) a->prompt_file = val;
        else if (!strcmp(f, "--text")) a->text = val;
        else if (!strcmp(f, "--shape")) a->shape = val;
        else if (!strcmp(f, "--policies")) a->policies = val;
        else if (!strcmp(f, "--budgets")) a->budgets = val;
        else if (!strcmp(f, "--dense-layers")) a->dense_layers = val;
        else if (!strcmp(f, "--backend")) a->backend = val;
        else if (!strcmp(f, "--weights")) a->weights = val;
        else if (!strcmp(f, "--tokens")) { if (parse_int(f, val, 1, INT32_MAX, &a->tokens)) return -1; }
        else if (!strcmp(f, "--draft")) { if (parse_int(f, val, 1, LLAMA_MAX_VERIFY - 1, &a->draft)) return -1; }
        else if (!strcmp(f, "--offset")) { if (parse_int(f, val, 0, INT64_MAX, &a->offset)) return -1; }
        else if (!strcmp(f, "--prefill")) { if (parse_int(f, val, 1, INT32_MAX, &a->prefill)) return -1; }
        else if (!strcmp(f, "--steps")) { if (parse_int(f, val, 1, INT32_MAX, &a->steps)) return -1; }
        else if (!strcmp(f, "--batch")) { if (parse_int(f, val, 1, 8, &a->batch)) return -1; }
        else if (!strcmp(f, "--context")) { if (parse_int(f, val, 1, (int64_t)1 << 31, &a->context)) return -1; }
        else if (!strcmp(f, "--warmup")) { if (parse_int(f, val, 0, 1000, &a->warmup)) return -1; }
        else if (!strcmp(f, "--seed")) { if (parse_int(f, val, 0, INT64_MAX, &a->seed)) return -1; }
        else if (!strcmp(f, "--tp")) { if (parse_int(f, val, 1, 8, &a->tp)) return -1; }
        else if (!strcmp(f, "--threads")) { if (parse_int(f, val, 1, 1024, &v)) return -1; a->threads = (int)v; }
        else if (!strcmp(f, "--budget")) { if (parse_int(f, val, 1, INT32_MAX, &v)) return -1; a->opts.budget_tokens = (int32_t)v; }
        else if (!strcmp(f, "--page")) { if (parse_int(f, val, 1, INT32_MAX, &v)) return -1; a->opts.page_tokens = (int32_t)v; }
        else if (!strcmp(f, "--sink")) { if (parse_int(f, val, 0, INT32_MAX, &v)) return -1; a->opts.sink_tokens = (int32_t)v; }
        else if (!strcmp(f, "--window")) { if (parse_int(f, val, 0, INT32_MAX, &v)) return -1; a->opts.window_tokens = (int32_t)v; }
        else if (!strcmp(f, "--temperature")) {
            char *end;
            a->temperature = strtod(val, &end);
            if (end == val || *end || !(a->temperature >= 0) || !isfinite(a->temperature)) {
                fprintf(stderr, "llama: --temperature needs a number >= 0\n");
                return -1;
            }
        } else if (!strcmp(f, "--threshold")) {
            char *end;
            if (!strcmp(val, "off")) {
                a->opts.correction_threshold = FKV_CORRECTION_OFF;
            } else {
                double t = strtod(val, &end);
                if (end == val || *end || !isfinite(t)) {
                    fprintf(stderr, "llama: --threshold needs a number or \"off\"\n");
                    return -1;
                }
                a->opts.correction_threshold = (float)t;
            }
        } else if (!strcmp(f, "--criterion")) {
            if (!strcmp(val, "cosine")) a->opts.correction_criterion = FKV_CRITERION_COSINE;
            else if (!strcmp(val, "bounded")) a->opts.correction_criterion = FKV_CRITERION_BOUNDED;
            else { fprintf(stderr, "llama: --criterion must be cosine or bounded\n"); return -1; }
        } else if (!strcmp(f, "--min-mass")) {
            char *end;
            double t = strtod(val, &end);
            if (*end || end == val) { fprintf(stderr, "llama: --min-mass needs a number\n"); return -1; }
            a->opts.correction_min_mass = (float)t;
        } else if (!strcmp(f, "--spec-mass")) {
            char *end;
            double t = strtod(val, &end);
            if (*end || end == val) { fprintf(stderr, "llama: --spec-mass needs a number\n"); return -1; }
            a->opts.speculative_min_mass = (float)t;
        } else if (!strcmp(f, "--max-pages")) {
            if (parse_int(f, val, 0, INT32_MAX, &v)) return -1;
            a->opts.correction_max_pages = (int32_t)v;
        } else if (!strcmp(f, "--policy")) {
            if (parse_policy(val, &a->opts.policy)) {
                fprintf(stderr, "llama: --policy must be dense, resident, sync or freekv\n");
                return -1;
            }
        } else if (!strcmp(f, "--dtype")) {
            a->dtype_set = 1;
            if (!strcmp(val, "f32")) a->opts.dtype = FKV_DTYPE_F32;
            else if (!strcmp(val, "f16")) a->opts.dtype = FKV_DTYPE_F16;
            else if (!strcmp(val, "bf16")) a->opts.dtype = FKV_DTYPE_BF16;
            else {
                fprintf(stderr, "llama: --dtype must be f32, f16 or bf16\n");
                return -1;
            }
        } else {
            fprintf(stderr, "llama: unknown option %s\n", f);
            return -1;
        }
#undef NEEDVAL
    }
    return 0;
}

/* --dense-layers for a model of `layers` layers: sets o->dense_layers
 * (flags kept here: the cache copies them at fkv_create) or leaves it NULL
 * without the option. */
#define LLAMA_MAX_DENSE_LAYERS 4096
static uint8_t g_dense_flags[LLAMA_MAX_DENSE_LAYERS];

static int apply_dense_layers(const args *a, int32_t layers, fkv_options *o)
{
    char buf[1024], *tok, *save = NULL;
    if (!a->dense_layers)
        return 0;
    if (layers < 1 || layers > LLAMA_MAX_DENSE_LAYERS) {
        fprintf(stderr, "llama: --dense-layers: the model has %d layers (at most %d here)\n",
                layers, LLAMA_MAX_DENSE_LAYERS);
        return -1;
    }
    if (strlen(a->dense_layers) >= sizeof buf) {
        fprintf(stderr, "llama: --dense-layers: the list is too long\n");
        return -1;
    }
    memset(g_dense_flags, 0, (size_t)layers);
    snprintf(buf, sizeof buf, "%s", a->dense_layers);
    for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        int64_t l;
        if (!strcmp(tok, "last"))
            l = layers - 1;
        else if (parse_int("--dense-layers", tok, 0, layers - 1, &l))
            return -1;
        g_dense_flags[l] = 1;
    }
    o->dense_layers = g_dense_flags;
    return 0;
}

/* The dense layers of o (layers of them) as a JSON array of indices ([]
 * without any). */
static void print_dense_layers(FILE *f, const fkv_options *o, int32_t layers)
{
    int32_t l, n = 0;
    fputc('[', f);
    for (l = 0; o->dense_layers && l < layers; l++)
        if (o->dense_layers[l])
            fprintf(f, "%s%d", n++ ? "," : "", l);
    fputc(']', f);
}

static const llama_backend_ops *pick_backend(const char *name)
{
    if (!strcmp(name, "cpu"))
        return &llama_cpu_backend;
#ifdef LLAMA_WITH_CUDA
    if (!strcmp(name, "cuda"))
        return &llama_cuda_backend;
    if (!strcmp(name, "auto"))
        return llama_cuda_available() ? &llama_cuda_backend : &llama_cpu_backend;
#else
    if (!strcmp(name, "cuda")) {
        fprintf(stderr, "llama: --backend cuda: this build has no CUDA path (make examples CUDA=1)\n");
        return NULL;
    }
    if (!strcmp(name, "auto"))
        return &llama_cpu_backend;
#endif
    fprintf(stderr, "llama: --backend must be cpu, cuda or auto\n");
    return NULL;
}

static void print_threshold(FILE *f, float t)
{
    if (t <= FKV_CORRECTION_OFF)
        fprintf(f, "\"off\"");
    else
        fprintf(f, "%g", (double)t);
}

/* ---- configurations (policies x budgets) ------------------------------------ */

typedef struct run_config {
    fkv_policy policy;
    int32_t budget;
} run_config;

static int parse_list_configs(const args *a, int with_dense, run_config *out, int *n)
{
    fkv_policy pols[8];
    int32_t buds[32];
    int np = 0, nb = 0, i, j;
    char buf[512], *tok, *save;
    if (a->policies) {
        snprintf(buf, sizeof buf, "%s", a->policies);
        for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            if (np == 8 || parse_policy(tok, &pols[np])) {
                fprintf(stderr, "llama: --policies: \"%s\" is not dense, resident, sync or freekv (or too many)\n", tok);
                return -1;
            }
            np++;
        }
    } else {
        pols[np++] = a->opts.policy;
    }
    if (a->budgets) {
        snprintf(buf, sizeof buf, "%s", a->budgets);
        for (tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            int64_t v;
            if (nb == 32 || parse_int("--budgets", tok, 1, INT32_MAX, &v))
                return -1;
            buds[nb++] = (int32_t)v;
        }
    } else {
        buds[nb++] = a->opts.budget_tokens;
    }
    *n = 0;
    /* Dense first: every other result's ratio is to it. The budget does not
     * change dense attention, so it runs once. */
    if (with_dense) {
        out[(*n)++] = (run_config){FKV_POLICY_DENSE, a->opts.budget_tokens};
    }
    for (i = 0; i < np; i++) {
        if (pols[i] == FKV_POLICY_DENSE) {
            if (!with_dense)
                out[(*n)++] = (run_config){FKV_POLICY_DENSE, a->opts.budget_tokens};
            continue;
        }
        for (j = 0; j < nb && *n < MAX_CONFIGS; j++)
            out[(*n)++] = (run_config){pols[i], buds[j]};
    }
    return 0;
}

/* ---- generate ---------------------------------------------------------------- */

static int read_all(const char *path, unsigned char **data, size_t *len)
{
    FILE *f = fopen(path, "rb");
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf;
    if (!f) {
        fprintf(stderr, "llama: %s: %s\n", path, strerror(errno));
        return -1;
    }
    buf = malloc(cap);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n < cap) break;
        unsigned char *nb = realloc(buf, cap * 2);
        if (!nb) { free(buf); buf = NULL; break; }
        buf = nb;
        cap *= 2;
    }
    if (!buf || ferror(f)) {
        fprintf(stderr, "llama: %s: cannot read\n", path);
        free(buf);
        fclose(f);
        return -1;
    }
    fclose(f);
    *data = buf;
    *len = n;
    return 0;
}

static int32_t sample(const float *logits, int32_t vocab, double temperature, uint64_t *rng)
{
    int32_t i, best = 0;
    double mx, sum = 0, r;
    for (i = 1; i < vocab; i++)
        if (logits[i] > logits[best]) best = i;
    if (temperature <= 0)
        return best;
    mx = logits[best];
    for (i = 0; i < vocab; i++)
        sum += exp((logits[i] - mx) / temperature);
    *rng ^= *rng << 13; *rng ^= *rng >> 7; *rng ^= *rng << 17;
    r = (double)(*rng >> 11) / 9007199254740992.0 * sum;
    for (i = 0; i < vocab; i++) {
        r -= exp((logits[i] - mx) / temperature);
        if (r <= 0) return i;
    }
    return best;
}

static void json_string(FILE *f, const unsigned char *s, size_t n)
{
    size_t i;
    fputc('"', f);
    for (i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c == '\n') fputs("\\n", f);
        else if (c == '\t') fputs("\\t", f);
        else if (c < 0x20 || c >= 0x7F) fprintf(f, "\\u%04x", c); /* bytes as code points */
        else fputc(c, f);
    }
    fputc('"', f);
}

static int load_model(const args *a, llama_model *m)
{
    char err[ERRLEN];
    if (!a->model) {
        fprintf(stderr, "llama: %s needs --model DIR\n", a->mode);
        return -1;
    }
    if (llama_model_load(a->model, m, err, sizeof err)) {
        fprintf(stderr, "llama: %s: %s\n", a->model, err);
        return -1;
    }
    return 0;
}

static int make_backend(const args *a, const llama_model *m, int64_t max_context, int32_t batch,
                        int keep, const llama_backend_ops **ops, llama_backend **b)
{
    llama_run_config rc;
    char err[ERRLEN];
    *ops = pick_backend(a->backend);
    if (!*ops)
        return -1;
    memset(&rc, 0, sizeof rc);
    rc.max_batch = batch;
    rc.max_context = max_context;
    rc.keep_prefill = keep;
    rc.threads = a->threads;
    rc.cuda_graph = a->graph;
#ifdef LLAMA_WITH_CUDA
    if (a->tp > 1) { /* gpu_tp.h: the CUDA path on tp GPUs */
        if (*ops != &llama_cuda_backend) {
            fprintf(stderr, "llama: --tp %lld needs the CUDA backend\n", (long long)a->tp);
            return -1;
        }
        *ops = &llama_cuda_tp_backend;
        rc.tp = (int32_t)a->tp;
    }
#else
    if (a->tp > 1) {
        fprintf(stderr, "llama: --tp: this build has no CUDA path (make examples CUDA=1)\n");
        return -1;
    }
#endif
    if ((*ops)->create(m, &rc, b, err, sizeof err)) {
        fprintf(stderr, "llama: %s backend: %s\n", (*ops)->name, err);
        return -1;
    }
    return 0;
}

static int cmd_generate(const args *a)
{
    llama_model m;
    const llama_backend_ops *ops;
    llama_backend *b = NULL;
    unsigned char *text = NULL, *outb = NULL;
    size_t tlen = 0;
    int32_t *toks = NULL, *gen = NULL;
    int64_t n = 0, i;
    float *logits = NULL;
    char err[ERRLEN];
    int rc = 1, bytes;
    uint64_t rng = (uint64_t)a->seed * 2654435761u + 88172645463325252ull;
    double t0, t_prefill, t_decode = 0;
    fkv_options o = a->opts;
    if ((!a->prompt) == (!a->prompt_file)) {
        fprintf(stderr, "llama: generate needs exactly one of --prompt and --prompt-file\n");
        return 2;
    }
    if (load_model(a, &m))
        return 1;
    bytes = m.cfg.vocab == 256;
    if (a->prompt) {
        tlen = strlen(a->prompt);
        text = malloc(tlen + 1);
        if (text) memcpy(text, a->prompt, tlen + 1);
    } else if (read_all(a->prompt_file, &text, &tlen)) {
        goto out;
    }
    if (!text) { fprintf(stderr, "llama: out of memory\n"); goto out; }
    toks = malloc((tlen + 1) * sizeof *toks);
    gen = malloc((size_t)a->tokens * sizeof *gen);
    outb = malloc((size_t)a->tokens);
    logits = malloc((size_t)m.cfg.vocab * sizeof *logits);
    if (!toks || !gen || !outb || !logits) { fprintf(stderr, "llama: out of memory\n"); goto out; }
    if (bytes) {
        for (i = 0; i < (int64_t)tlen; i++) toks[n++] = text[i];
    } else {
        /* Token ids separated by white space. */
        char *p = (char *)text, *end;
        p[tlen] = '\0'; /* both sources leave room for it */
        for (;;) {
            long v;
            while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r' || *p == ',') p++;
            if (!*p) break;
            errno = 0;
            v = strtol(p, &end, 10);
            if (end == p || errno || v < 0 || v >= m.cfg.vocab) {
                fprintf(stderr, "llama: the prompt must be token ids in [0, %d) separated by spaces\n", m.cfg.vocab);
                goto out;
            }
            toks[n++] = (int32_t)v;
            p = end;
        }
    }
    if (n == 0) { fprintf(stderr, "llama: empty prompt\n"); goto out; }
    if (make_backend(a, &m, n + a->tokens, 1, 0, &ops, &b))
        goto out;
    if (apply_dense_layers(a, m.cfg.layers, &o))
        goto out;
    if (ops->cache_open(b, &o, err, sizeof err)) {
        fprintf(stderr, "llama: %s\n", err);
        goto out;
    }
    t0 = now_ms();
    if (ops->prefill(b, 0, toks, n, logits, err, sizeof err)) {
        fprintf(stderr, "llama: %s\n", err);
        goto out;
    }
    t_prefill = now_ms() - t0;
    for (i = 0; i < a->tokens; i++) {
        int32_t slot = 0;
        gen[i] = sample(logits, m.cfg.vocab, a->temperature, &rng);
        if (!a->json) {
            if (bytes) { fputc(gen[i], stdout); fflush(stdout); }
            else printf("%s%d", i ? " " : "", gen[i]);
        }
        if (i + 1 == a->tokens)
            break;
        t0 = now_ms();
        if (ops->decode(b, 1, &slot, &gen[i], logits, err, sizeof err)) {
            fprintf(stderr, "\nllama: %s\n", err);
            goto out;
        }
        t_decode += now_ms() - t0;
    }
    if (a->json) {
        printf("{\"mode\":\"generate\",\"backend\":\"%s\",\"policy\":\"%s\",\"dtype\":\"%s\","
               "\"prompt_tokens\":%lld,\"tokens\":%lld,\"prefill_ms\":%.3f,\"ms_per_step\":%.3f,",
               ops->name, policy_name(a->opts.policy), dtype_name(a->opts.dtype), (long long)n,
               (long long)a->tokens, t_prefill, a->tokens > 1 ? t_decode / (double)(a->tokens - 1) : 0.0);
        if (bytes) {
            for (i = 0; i < a->tokens; i++) outb[i] = (unsigned char)gen[i];
            printf("\"text\":");
            json_string(stdout, outb, (size_t)a->tokens);
        } else {
            printf("\"ids\":[");
            for (i = 0; i < a->tokens; i++) printf("%s%d", i ? "," : "", gen[i]);
            printf("]");
        }
        printf("}\n");
    } else {
        printf("\n");
        fprintf(stderr, "llama: prompt %lld tokens, prefill %.1f ms, %.2f ms/step\n", (long long)n,
                t_prefill, a->tokens > 1 ? t_decode / (double)(a->tokens - 1) : 0.0);
    }
    rc = 0;
out:
    if (b) ops->destroy(b);
    llama_model_free(&m);
    free(text); free(toks); free(gen); free(outb); free(logits);
    return rc;
}

/* ---- speculate --------------------------------------------------------------- */

/* The prompt of --prompt / --prompt-file as tokens, as generate reads it:
 * bytes for a byte-level model (vocab 256), else token ids. */
static int read_prompt_tokens(const args *a, int32_t vocab, int32_t **toks, int64_t *n)
{
    unsigned char *text = NULL;
    size_t tlen = 0, i;
    *toks = NULL;
    *n = 0;
    if (a->prompt) {
        tlen = strlen(a->prompt);
        text = malloc(tlen + 1);
        if (text) memcpy(text, a->prompt, tlen + 1);
    } else if (read_all(a->prompt_file, &text, &tlen)) {
        return -1;
    }
    if (!text || !(*toks = malloc((tlen + 1) * sizeof **toks))) {
        fprintf(stderr, "llama: out of memory\n");
        free(text);
        return -1;
    }
    if (vocab == 256) {
        for (i = 0; i < tlen; i++) (*toks)[(*n)++] = text[i];
    } else {
        char *p = (char *)text, *end;
        p[tlen] = '\0';
        for (;;) {
            long v;
            while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r' || *p == ',') p++;
            if (!*p) break;
            errno = 0;
            v = strtol(p, &end, 10);
            if (end == p || errno || v < 0 || v >= vocab) {
                fprintf(stderr, "llama: the prompt must be token ids in [0, %d) separated by spaces\n", vocab);
                free(text);
                return -1;
            }
            (*toks)[(*n)++] = (int32_t)v;
            p = end;
        }
    }
    free(text);
    if (*n == 0) {
        fprintf(stderr, "llama: empty prompt\n");
        return -1;
    }
    return 0;
}

/* Speculative greedy decoding and plain greedy generate of the same prompt
 * in one process (slot 0 and slot 1 of one cache); prints the text, the
 * acceptance rate and whether both outputs are equal (exit 1 if not). */
static int cmd_speculate(const args *a)
{
    llama_model m;
    const llama_backend_ops *ops;
    const llama_verify_ops *vops;
    llama_backend *b = NULL;
    int32_t *toks = NULL, *spec = NULL, *plain = NULL;
    int64_t n = 0, i, diff = -1;
    char err[ERRLEN];
    int rc = 1;
    llama_spec_stats st;
    double t0, t_spec, t_plain;
    fkv_options o = a->opts;
    if ((!a->prompt) == (!a->prompt_file)) {
        fprintf(stderr, "llama: speculate needs exactly one of --prompt and --prompt-file\n");
        return 2;
    }
    if (load_model(a, &m))
        return 1;
    if (read_prompt_tokens(a, m.cfg.vocab, &toks, &n))
        goto out;
    spec = malloc((size_t)a->tokens * sizeof *spec);
    plain = malloc((size_t)a->tokens * sizeof *plain);
    if (!spec || !plain) { fprintf(stderr, "llama: out of memory\n"); goto out; }
    /* The verify step appends up to draft + 1 tokens past the output. */
    if (make_backend(a, &m, n + a->tokens + a->draft + 1, 2, 0, &ops, &b))
        goto out;
    vops = ops == &llama_cpu_backend ? &llama_cpu_verify : NULL;
    if (!vops) {
        fprintf(stderr, "llama: speculate runs on the CPU backend only for now (--backend cpu)\n");
        goto out;
    }
    if (apply_dense_layers(a, m.cfg.layers, &o))
        goto out;
    if (ops->cache_open(b, &o, err, sizeof err)) {
        fprintf(stderr, "llama: %s\n", err);
        goto out;
    }
    t0 = now_ms();
    if (llama_spec_generate(ops, vops, b, 0, m.cfg.vocab, toks, n, a->tokens, (int32_t)a->draft, NULL,
                            NULL, spec, &st, err, sizeof err)) {
        fprintf(stderr, "llama: %s\n", err);
        goto out;
    }
    t_spec = now_ms() - t0;
    t0 = now_ms();
    if (llama_greedy_generate(ops, b, 1, m.cfg.vocab, toks, n, a->tokens, plain, err, sizeof err)) {
        fprintf(stderr, "llama: %s\n", err);
        goto out;
    }
    t_plain = now_ms() - t0;
    for (i = 0; i < a->tokens && diff < 0; i++)
        if (spec[i] != plain[i]) diff = i;
    if (m.cfg.vocab == 256) {
        for (i = 0; i < a->tokens; i++) fputc(spec[i], stdout);
    } else {
        for (i = 0; i < a->tokens; i++) printf("%s%d", i ? " " : "", spec[i]);
    }
    printf("\n");
    printf("speculate: policy %s, draft %lld: %lld steps for %lld tokens, accepted %lld of %lld drafted (%.1f%%), %lld truncations\n",
           policy_name(a->opts.policy), (long long)a->draft, (long long)st.steps, (long long)a->tokens,
           (long long)st.accepted, (long long)st.drafted,
           st.drafted ? 100.0 * (double)st.accepted / (double)st.drafted : 0.0, (long long)st.truncated);
    printf("speculate: %.1f ms, plain generate %.1f ms (prefill included)\n", t_spec, t_plain);
    if (diff < 0) {
        printf("speculate: output equals plain greedy generate (%lld tokens)\n", (long long)a->tokens);
        rc = 0;
    } else {
        printf("speculate: MISMATCH with plain greedy generate at token %lld (%d vs %d)\n",
               (long long)diff, spec[diff], plain[diff]);
    }
out:
    if (b) ops->destroy(b);
    llama_model_free(&m);
    free(toks); free(spec); free(plain);
    return rc;
}

/* ---- eval ------------------------------------------------------------------ */

static double nll_of(const float *logits, int32_t vocab, int32_t target)
{
    double mx = logits[0], sum = 0;
    int32_t i;
    for (i = 1; i < vocab; i++) if (logits[i] > mx) mx = logits[i];
    for (i = 0; i < vocab; i++) sum += exp((double)logits[i] - mx);
    return log(sum) + mx - (double)logits[target];
}

static int cmd_eval(const args *a)
{
    llama_model m;
    const llama_backend_ops *ops = NULL;
    llama_backend *b = NULL;
    unsigned char *text = NULL;
    size_t tlen = 0;
    int32_t *toks = NULL;
    float *logits = NULL;
    run_config cfgs[MAX_CONFIGS];
    int ncfg = 0, c, rc = 1, prefilled = 0;
    double dense_ppl = -1, prefill_ms = 0;
    int64_t N = a->prefill, M = a->steps, i;
    char err[ERRLEN];
    if (!a->text || N < 1 || M < 1) {
        fprintf(stderr, "llama: eval needs --text FILE --prefill N --steps M\n");
        return 2;
    }
    if (parse_list_configs(a, !a->no_dense, cfgs, &ncfg))
        return 2;
    if (read_all(a->text, &text, &tlen))
        return 1;
    if ((uint64_t)a->offset > tlen || tlen - (size_t)a->offset < (size_t)(N + M + 1)) {
        fprintf(stderr, "llama: %s: eval needs %lld bytes from offset %lld (prefill %lld + steps %lld + 1), "
                "the file has %zu there\n", a->text, (long long)(N + M + 1), (long long)a->offset,
                (long long)N, (long long)M, (uint64_t)a->offset > tlen ? (size_t)0 : tlen - (size_t)a->offset);
        free(text);
        return 1;
    }
    if (load_model(a, &m)) {
        free(text);
        return 1;
    }
    if (m.cfg.vocab != 256) {
        fprintf(stderr, "llama: eval reads bytes and needs a byte-level model (vocab 256), not vocab %d\n",
                m.cfg.vocab);
        goto out;
    }
    toks = malloc((size_t)(N + M + 1) * sizeof *toks);
    logits = malloc((size_t)m.cfg.vocab * sizeof *logits);
    if (!toks || !logits) { fprintf(stderr, "llama: out of memory\n"); goto out; }
    for (i = 0; i < N + M + 1; i++)
        toks[i] = text[a->offset + i];
    if (make_backend(a, &m, N + M, 1, ncfg > 1, &ops, &b))
        goto out;
    for (c = 0; c < ncfg; c++) {
        fkv_options o = a->opts;
        fkv_stats st;
        double t0, nll = 0, ms = 0, ppl, replay_ms = 0;
        o.policy = cfgs[c].policy;
        o.budget_tokens = cfgs[c].budget;
        if (apply_dense_layers(a, m.cfg.layers, &o))
            goto out;
        if (ops->cache_open(b, &o, err, sizeof err)) {
            fprintf(stderr, "llama: %s budget %d: %s\n", policy_name(o.policy), o.budget_tokens, err);
            goto out;
        }
        t0 = now_ms();
        if (!prefilled) {
            if (ops->prefill(b, 0, toks, N, NULL, err, sizeof err)) {
                fprintf(stderr, "llama: %s\n", err);
                goto out;
            }
            prefill_ms = now_ms() - t0;
            prefilled = 1;
        } else {
            if (ops->replay_prefill(b, 0, err, sizeof err)) {
                fprintf(stderr, "llama: %s\n", err);
                goto out;
            }
            replay_ms = now_ms() - t0;
        }
        for (i = 0; i < M; i++) {
            int32_t slot = 0;
            t0 = now_ms();
            if (ops->decode(b, 1, &slot, &toks[N + i], logits, err, sizeof err)) {
                fprintf(stderr, "llama: %s budget %d step %lld: %s\n", policy_name(o.policy),
                        o.budget_tokens, (long long)i, err);
                goto out;
            }
            ms += now_ms() - t0;
            nll += nll_of(logits, m.cfg.vocab, toks[N + i + 1]);
        }
        if (ops->stats(b, &st, err, sizeof err)) {
            fprintf(stderr, "llama: %s\n", err);
            goto out;
        }
        ppl = exp(nll / (double)M);
        if (o.policy == FKV_POLICY_DENSE && dense_ppl < 0)
            dense_ppl = ppl;
        if (a->json) {
            printf("{\"mode\":\"eval\",\"backend\":\"%s\",\"policy\":\"%s\",\"budget\":%d,\"page\":%d,"
                   "\"sink\":%d,\"window\":%d,\"threshold\":",
                   ops->name, policy_name(o.policy), o.budget_tokens, o.page_tokens,
                   o.sink_tokens, o.window_tokens);
            print_threshold(stdout, o.correction_threshold);
            printf(",\"dense_layers\":");
            print_dense_layers(stdout, &o, m.cfg.layers);
            printf(",\"dtype\":\"%s\",\"offset\":%lld,\"prefill\":%lld,\"steps\":%lld,"
                   "\"nll\":%.6f,\"ppl\":%.6f,\"ratio\":",
                   dtype_name(o.dtype), (long long)a->offset, (long long)N, (long long)M,
                   nll / (double)M, ppl);
            if (dense_ppl > 0) printf("%.6f", ppl / dense_ppl); else printf("null");
            printf(",\"corrections\":%llu,\"heads_checked\":%llu,\"pages_recalled_per_step\":%.3f,"
                   "\"pages_recalled_critical_per_step\":%.3f,\"criterion\":\"%s\","
                   "\"min_mass\":%g,\"max_pages\":%d,\"spec_mass\":%g,"
                   "\"ms_per_step\":%.3f,\"prefill_ms\":%.1f,\"replay_ms\":%.1f}\n",
                   (unsigned long long)st.corrections, (unsigned long long)st.heads_checked,
                   (double)st.pages_recalled / (double)M,
                   (double)st.pages_recalled_critical / (double)M,
                   o.correction_criterion == FKV_CRITERION_BOUNDED ? "bounded" : "cosine",
                   (double)o.correction_min_mass, (int)o.correction_max_pages,
                   (double)o.speculative_min_mass, ms / (double)M, prefill_ms, replay_ms);
        } else {
            printf("%-8s budget %6d page %d sink %d window %d threshold ", policy_name(o.policy),
                   o.budget_tokens, o.page_tokens, o.sink_tokens, o.window_tokens);
            print_threshold(stdout, o.correction_threshold);
            if (o.dense_layers) {
                printf(" dense layers ");
                print_dense_layers(stdout, &o, m.cfg.layers);
            }
            printf(" %s: ppl %.4f", dtype_name(o.dtype), ppl);
            if (dense_ppl > 0) printf(" (x%.4f dense)", ppl / dense_ppl);
            printf(", corrections %llu/%llu, %.1f pages recalled/step, %.2f ms/step, prefill %.0f ms\n",
                   (unsigned long long)st.corrections, (unsigned long long)st.heads_checked,
                   (double)st.pages_recalled / (double)M, ms / (double)M, prefill_ms);
        }
        fflush(stdout);
    }
    rc = 0;
out:
    if (b) ops->destroy(b);
    llama_model_free(&m);
    free(text); free(toks); free(logits);
    return rc;
}

/* ---- bench ----------------------------------------------------------------- */

static int parse_shape(const char *s, llama_config *c)
{
    memset(c, 0, sizeof *c);
    c->rms_norm_eps = 1e-5;
    if (!strcmp(s, "llama3-8b")) {
        *c = (llama_config){4096, 14336, 32, 32, 8, 128, 128256, 131072, 500000.0, 1e-5, 0,
                            {1, 8.0, 1.0, 4.0, 8192.0}};
    } else if (!strcmp(s, "qwen2.5-7b")) {
        /* Qwen2 has q/k/v biases; the stand-in omits them (same cost class). */
        *c = (llama_config){3584, 18944, 28, 28, 4, 128, 152064, 131072, 1000000.0, 1e-6, 0, {0, 0, 0, 0, 0}};
    } else if (!strcmp(s, "tiny")) {
        *c = (llama_config){512, 1536, 6, 8, 2, 64, 256, 32768, 500000.0, 1e-6, 0, {0, 0, 0, 0, 0}};
    } else {
        int v[7], k;
        if (sscanf(s, "%d,%d,%d,%d,%d,%d,%d%n", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &k) != 7 ||
            s[k] != '\0') {
            fprintf(stderr, "llama: --shape must be llama3-8b, qwen2.5-7b, tiny or H,I,L,QH,KVH,HD,V\n");
            return -1;
        }
        for (k = 0; k < 7; k++)
            if (v[k] < 1) { fprintf(stderr, "llama: --shape values must be >= 1\n"); return -1; }
        if (v[3] % v[4] || v[5] % 2) {
            fprintf(stderr, "llama: --shape: QH must be a multiple of KVH and HD even\n");
            return -1;
        }
        *c = (llama_config){v[0], v[1], v[2], v[3], v[4], v[5], v[6], 0, 500000.0, 1e-6, 0, {0, 0, 0, 0, 0}};
    }
    return 0;
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

static int cmd_bench(const args *a)
{
    llama_config cfg;
    llama_model m;
    llama_dtype wd;
    const llama_backend_ops *ops = NULL;
    llama_backend *b = NULL;
    run_config cfgs[MAX_CONFIGS];
    int ncfg, c, rc = 1;
    int64_t C = a->context, S = a->steps < 0 ? 16 : a->steps, i, s;
    int32_t B = (int32_t)a->batch, slots[8], toks[8];
    double *times = NULL;
    float *logits = NULL;
    char err[ERRLEN];
    if (!a->shape || C < 1) {
        fprintf(stderr, "llama: bench needs --shape and --context\n");
        return 2;
    }
    if (parse_shape(a->shape, &cfg))
        return 2;
    if (!strcmp(a->weights, "f32")) wd = LLAMA_F32;
    else if (!strcmp(a->weights, "f16")) wd = LLAMA_F16;
    else if (!strcmp(a->weights, "bf16")) wd = LLAMA_BF16;
    else { fprintf(stderr, "llama: --weights must be f32, f16 or bf16\n"); return 2; }
    if (parse_list_configs(a, 0, cfgs, &ncfg))
        return 2;
    if (llama_model_random(&cfg, wd, 1234, &m, err, sizeof err)) {
        fprintf(stderr, "llama: %s\n", err);
        return 1;
    }
    times = malloc((size_t)(S + a->warmup) * sizeof *times);
    logits = malloc((size_t)B * cfg.vocab * sizeof *logits);
    if (!times || !logits) { fprintf(stderr, "llama: out of memory\n"); goto out; }
    if (make_backend(a, &m, C + S + a->warmup, B, 0, &ops, &b))
        goto out;
    for (c = 0; c < ncfg; c++) {
        fkv_options o = a->opts;
        fkv_stats st;
        double t0, fill_ms, med;
        o.policy = cfgs[c].policy;
        o.budget_tokens = cfgs[c].budget;
        if (apply_dense_layers(a, cfg.layers, &o))
            goto out;
        if (ops->cache_open(b, &o, err, sizeof err)) {
            fprintf(stderr, "llama: %s budget %d: %s\n", policy_name(o.policy), o.budget_tokens, err);
            goto out;
        }
        t0 = now_ms();
        for (i = 0; i < B; i++) {
            slots[i] = (int32_t)i;
            toks[i] = (int32_t)((i * 37 + 11) % cfg.vocab);
            if (ops->fill_random(b, (int32_t)i, C, (uint64_t)(i + 1), err, sizeof err)) {
                fprintf(stderr, "llama: %s\n", err);
                goto out;
            }
        }
        fill_ms = now_ms() - t0;
        for (s = 0; s < S + a->warmup; s++) {
            t0 = now_ms();
            if (ops->decode(b, B, slots, toks, logits, err, sizeof err)) {
                fprintf(stderr, "llama: %s\n", err);
                goto out;
            }
            times[s] = now_ms() - t0;
            for (i = 0; i < B; i++) /* greedy: the next input */
                toks[i] = sample(logits + i * cfg.vocab, cfg.vocab, 0, NULL);
        }
        qsort(times + a->warmup, (size_t)S, sizeof *times, cmp_double);
        med = times[a->warmup + S / 2];
        if (ops->stats(b, &st, err, sizeof err)) {
            fprintf(stderr, "llama: %s\n", err);
            goto out;
        }
        if (a->json) {
            printf("{\"mode\":\"bench\",\"backend\":\"%s\",\"shape\":\"%s\",\"policy\":\"%s\",\"budget\":%d,"
                   "\"page\":%d,\"sink\":%d,\"window\":%d,\"threshold\":",
                   ops->name, a->shape, policy_name(o.policy), o.budget_tokens, o.page_tokens,
                   o.sink_tokens, o.window_tokens);
            print_threshold(stdout, o.correction_threshold);
            printf(",\"dtype\":\"%s\",\"batch\":%d,\"context\":%lld,\"steps\":%lld,\"kv_fill\":\"random\","
                   "\"fill_ms\":%.1f,\"ms_per_step\":%.3f,\"tokens_per_s\":%.2f,\"host_bytes\":%llu,"
                   "\"device_bytes\":%llu,\"weight_bytes\":%llu,\"pages_recalled_per_step\":%.3f,"
                   "\"corrections\":%llu,\"heads_checked\":%llu,\"tp\":%lld}\n",
                   dtype_name(o.dtype), B, (long long)C, (long long)S, fill_ms, med, B * 1000.0 / med,
                   (unsigned long long)st.host_bytes, (unsigned long long)st.device_bytes,
                   (unsigned long long)ops->weight_bytes(b),
                   (double)st.pages_recalled / (double)(S + a->warmup),
                   (unsigned long long)st.corrections, (unsigned long long)st.heads_checked,
                   (long long)(a->tp > 1 ? a->tp : 1));
        } else {
            printf("%s %s %-8s budget %d batch %d context %lld (random K/V via fkv_append, not a real "
                   "prefill): %.2f ms/step (median of %lld), %.1f tokens/s; memory: cache host %.1f MiB, "
                   "device %.1f MiB, weights %.1f MiB%s\n",
                   ops->name, a->shape, policy_name(o.policy), o.budget_tokens, B, (long long)C, med,
                   (long long)S, B * 1000.0 / med, st.host_bytes / 1048576.0, st.device_bytes / 1048576.0,
                   ops->weight_bytes(b) / 1048576.0, a->tp > 1 ? " (per GPU: --tp)" : "");
        }
        fflush(stdout);
    }
    rc = 0;
out:
    if (b) ops->destroy(b);
    llama_model_free(&m);
    free(times);
    free(logits);
    return rc;
}

int main(int argc, char **argv)
{
    args a;
    /* libgomp spins idle threads by default, which on a shared or
     * oversubscribed machine costs several times the step time; it reads
     * OMP_WAIT_POLICY only when it loads, so set it and start again. */
    if (!getenv("OMP_WAIT_POLICY") && setenv("OMP_WAIT_POLICY", "passive", 1) == 0)
        execv("/proc/self/exe", argv); /* on failure: carry on as we are */
    if (argc >= 2 && !strcmp(argv[1], "selfcheck-gpu")) {
#ifdef LLAMA_WITH_CUDA
        return llama_gpu_selfcheck(argc - 1, argv + 1);
#else
        printf("selfcheck-gpu: skipped (built without CUDA)\n");
        return 0;
#endif
    }
    if (parse_args(argc, argv, &a))
        return 2;
#ifdef LLAMA_WITH_CUDA
    /* The CUDA path's cache dtype defaults to bf16 (the CPU path's: f32). */
    if (!a.dtype_set && (!strcmp(a.backend, "cuda") ||
                         (!strcmp(a.backend, "auto") && llama_cuda_available())))
        a.opts.dtype = FKV_DTYPE_BF16;
#endif
    if (!strcmp(a.mode, "generate"))
        return cmd_generate(&a);
    if (!strcmp(a.mode, "speculate"))
        return cmd_speculate(&a);
    if (!strcmp(a.mode, "eval"))
        return cmd_eval(&a);
    if (!strcmp(a.mode, "bench"))
        return cmd_bench(&a);
    fprintf(stderr, "llama: unknown mode \"%s\"\n", a.mode);
    usage(stderr);
    return 2;
}
