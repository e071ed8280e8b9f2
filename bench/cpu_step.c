/*
 * cpu_step: decode-step latency of the CPU backend per cache dtype. One
 * sequence is prefilled with random K/V, then every timed step appends one
 * token and attends on each layer (the CPU backend's whole decode work for
 * DENSE and RESIDENT; FREEKV and SYNC also select and recall). Prints the
 * median, 10th and 90th percentile step times in milliseconds of wall time,
 * and the median of the thread's CPU time (steadier on a shared machine).
 *
 *   cpu_step [--dtypes f32,f16,bf16] [--policies DENSE,RESIDENT]
 *            [--contexts 8192,32768] [--layers 1] [--q-heads 32]
 *            [--kv-heads 8] [--head-dim 128] [--steps 30] [--warmup 3]
 *            [--smoke]   (tiny sizes for CI; later flags override)
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L
#include "bench.h"

typedef struct args {
    fkv_dtype dtypes[3];
    int ndtypes;
    fkv_policy policies[4];
    int npolicies;
    int64_t contexts[16];
    int ncontexts;
    int layers, q_heads, kv_heads, head_dim, steps, warmup;
} args;

static void usage(void)
{
    fprintf(stderr,
            "usage: cpu_step [--dtypes f32,f16,bf16] "
            "[--policies DENSE,RESIDENT,FREEKV,SYNC]\n"
            "                [--contexts 8192,32768] [--layers 1] "
            "[--q-heads 32] [--kv-heads 8]\n"
            "                [--head-dim 128] [--steps 30] [--warmup 3] "
            "[--smoke]\n"
            "--smoke: tiny sizes for CI (context 1024, 4/2 heads, head_dim "
            "64, 3 steps\n"
            "after 1 warm-up); later flags override.\n"
            "A step: on each layer, append one token and attend (then "
            "select and recall).\n");
}

static int parse_dtypes(const char *s, args *a)
{
    a->ndtypes = 0;
    while (*s && a->ndtypes < 3) {
        size_t n = strcspn(s, ",");
        if (n == 3 && !strncmp(s, "f32", 3))
            a->dtypes[a->ndtypes++] = FKV_DTYPE_F32;
        else if (n == 3 && !strncmp(s, "f16", 3))
            a->dtypes[a->ndtypes++] = FKV_DTYPE_F16;
        else if (n == 4 && !strncmp(s, "bf16", 4))
            a->dtypes[a->ndtypes++] = FKV_DTYPE_BF16;
        else
            return -1;
        s += n + (s[n] == ',');
    }
    return a->ndtypes > 0 ? 0 : -1;
}

static void parse_args(int argc, char **argv, args *a)
{
    a->dtypes[0] = FKV_DTYPE_F32;
    a->dtypes[1] = FKV_DTYPE_F16;
    a->dtypes[2] = FKV_DTYPE_BF16;
    a->ndtypes = 3;
    a->policies[0] = FKV_POLICY_DENSE;
    a->policies[1] = FKV_POLICY_RESIDENT;
    a->npolicies = 2;
    a->contexts[0] = 8192;
    a->contexts[1] = 32768;
    a->ncontexts = 2;
    a->layers = 1;
    a->q_heads = 32;
    a->kv_heads = 8;
    a->head_dim = 128;
    a->steps = 30;
    a->warmup = 3;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
            usage();
            exit(0);
        }
        if (!strcmp(f, "--smoke")) {
            a->contexts[0] = 1024;
            a->ncontexts = 1;
            a->q_heads = 4;
            a->kv_heads = 2;
            a->head_dim = 64;
            a->steps = 3;
            a->warmup = 1;
            continue;
        }
        if (i + 1 >= argc)
            bench_die("%s needs a value", f);
        const char *v = argv[++i];
        int *ip = !strcmp(f, "--layers")     ? &a->layers
                  : !strcmp(f, "--q-heads")  ? &a->q_heads
                  : !strcmp(f, "--kv-heads") ? &a->kv_heads
                  : !strcmp(f, "--head-dim") ? &a->head_dim
                  : !strcmp(f, "--steps")    ? &a->steps
                  : !strcmp(f, "--warmup")   ? &a->warmup
                                             : NULL;
        if (ip) {
            if (bench_parse_int(v, 0, 1 << 20, ip))
                bench_die("%s: not a count: '%s'", f, v);
        } else if (!strcmp(f, "--dtypes")) {
            if (parse_dtypes(v, a))
                bench_die("--dtypes: f32, f16 or bf16, not '%s'", v);
        } else if (!strcmp(f, "--policies")) {
            a->npolicies = bench_parse_policies(v, a->policies, 4);
            if (a->npolicies < 0)
                bench_die("--policies: DENSE, RESIDENT, FREEKV or SYNC, "
                          "not '%s'", v);
        } else if (!strcmp(f, "--contexts")) {
            a->ncontexts = bench_parse_int_list(v, a->contexts, 16);
            if (a->ncontexts <= 0)
                bench_die("--contexts: not a list of token counts: '%s'", v);
        } else {
            usage();
            bench_die("unknown flag '%s'", f);
        }
    }
    if (a->steps < 1 || a->layers < 1)
        bench_die("--steps and --layers must be at least 1");
}

/* n random elements of dtype dt in [-1, 1). */
static void *random_elems(fkv_dtype dt, size_t n, bench_rng *r)
{
    void *p = bench_xmalloc(n * bench_dtype_size(dt));
    for (size_t i = 0; i < n; i++)
        bench_store_elem(dt, p, i, (float)bench_rng_uniform_in(r, -1, 1));
    return p;
}

/* This thread's CPU time in ms. */
static double cpu_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

/* Median step time in ms (p10, p90 in *lo, *hi; CPU time median in *cpu). */
static double run_one(const args *a, fkv_dtype dt, fkv_policy pol,
                      int64_t ctx, double *lo, double *hi, double *cpu)
{
    fkv_options o;
    fkv_cache *cache = NULL;
    BENCH_FKV_CHECK(NULL, fkv_options_init(&o, sizeof o));
    o.backend = FKV_BACKEND_CPU;
    o.num_layers = a->layers;
    o.num_q_heads = a->q_heads;
    o.num_kv_heads = a->kv_heads;
    o.head_dim = a->head_dim;
    o.dtype = dt;
    o.policy = pol;
    o.max_sequences = 1;
    int total = a->warmup + a->steps;
    o.max_tokens_per_sequence = ctx + total;
    BENCH_FKV_CHECK(NULL, fkv_create(&o, &cache));
    fkv_seq_id seq;
    BENCH_FKV_CHECK(cache, fkv_seq_open(cache, &seq));

    bench_rng r = bench_rng_seed(1);
    const size_t kvrow = (size_t)a->kv_heads * a->head_dim;
    const size_t qrow = (size_t)a->q_heads * a->head_dim;
    const int64_t chunk = 4096;
    void *k = random_elems(dt, (size_t)chunk * kvrow, &r);
    void *v = random_elems(dt, (size_t)chunk * kvrow, &r);
    void *q = random_elems(dt, (size_t)total * a->layers * qrow, &r);
    void *out = bench_xmalloc(qrow * bench_dtype_size(dt));
    for (int l = 0; l < a->layers; l++)
        for (int64_t done = 0; done < ctx; done += chunk) {
            int32_t n = (int32_t)(ctx - done < chunk ? ctx - done : chunk);
            fkv_batch b = {1, 0, &seq, &n};
            BENCH_FKV_CHECK(cache, fkv_append(cache, l, &b, k, v));
        }

    double *ms = bench_xmalloc((size_t)a->steps * sizeof *ms);
    double *cms = bench_xmalloc((size_t)a->steps * sizeof *cms);
    fkv_batch b = {1, 0, &seq, NULL};
    const size_t es = bench_dtype_size(dt);
    for (int t = 0; t < total; t++) {
        double c0 = cpu_ms(), t0 = bench_now_ms();
        for (int l = 0; l < a->layers; l++) {
            /* the new token's K/V: any rows of the prefill chunk */
            size_t row = (size_t)(t % chunk) * kvrow * es;
            const void *qt =
                (const char *)q + ((size_t)t * a->layers + l) * qrow * es;
            BENCH_FKV_CHECK(cache, fkv_append(cache, l, &b,
                                              (const char *)k + row,
                                              (const char *)v + row));
            BENCH_FKV_CHECK(cache, fkv_attend(cache, l, &b, qt, out));
            BENCH_FKV_CHECK(cache, fkv_select(cache, l, &b, qt));
            BENCH_FKV_CHECK(cache, fkv_recall(cache, l, &b));
        }
        double t1 = bench_now_ms(), c1 = cpu_ms();
        if (t >= a->warmup) {
            ms[t - a->warmup] = t1 - t0;
            cms[t - a->warmup] = c1 - c0;
        }
    }
    double med = bench_median(ms, (size_t)a->steps);
    *lo = bench_percentile(ms, (size_t)a->steps, 10);
    *hi = bench_percentile(ms, (size_t)a->steps, 90);
    *cpu = bench_median(cms, (size_t)a->steps);
    free(ms);
    free(cms);
    free(k);
    free(v);
    free(q);
    free(out);
    fkv_destroy(cache);
    return med;
}

int main(int argc, char **argv)
{
    bench_set_die_prefix("cpu_step: ");
    args a;
    parse_args(argc, argv, &a);
    printf("CPU backend, %d layer(s), q_heads %d, kv_heads %d, head_dim %d, "
           "batch 1, library defaults otherwise; %d steps after %d warm-up\n",
           a.layers, a.q_heads, a.kv_heads, a.head_dim, a.steps, a.warmup);
    printf("%-9s %-5s %8s %10s %10s %10s %10s\n", "policy", "dtype",
           "context", "median_ms", "p10_ms", "p90_ms", "cpu_ms");
    for (int p = 0; p < a.npolicies; p++)
        for (int c = 0; c < a.ncontexts; c++)
            for (int d = 0; d < a.ndtypes; d++) {
                double lo, hi, cpu;
                double med = run_one(&a, a.dtypes[d], a.policies[p],
                                     a.contexts[c], &lo, &hi, &cpu);
                printf("%-9s %-5s %8lld %10.3f %10.3f %10.3f %10.3f\n",
                       bench_policy_name(a.policies[p]),
                       bench_dtype_name(a.dtypes[d]),
                       (long long)a.contexts[c], med, lo, hi, cpu);
                fflush(stdout);
            }
    return 0;
}
