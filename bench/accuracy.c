/*
 * Retrieval accuracy of libfreekv's policies on generated workloads
 * (bench/workload.h): attention mass kept against dense attention and
 * against the oracle (selection with the current query), output error
 * against DENSE, needle hits, correction rate and pages recalled, for
 * FREEKV (library default threshold, 0.9), SYNC, RESIDENT, DENSE and FREEKV
 * at correction thresholds 0.7, 0.8, 0.95 and off. See docs/accuracy.md.
 * --bounded MASS:M[:S][,...] (at most 4) compares the BOUNDED correction
 * criterion (correction_min_mass MASS, correction_max_pages M,
 * speculative_min_mass S, default 0) with the
 * cosine criterion instead: FREEKV at 0.9 and 0.8, RESIDENT, DENSE and one
 * BOUNDED variant per pair. --dense-layers LIST (layer indices, "last" for
 * the last layer) adds FREEKV and RESIDENT with those layers dense
 * (fkv_options.dense_layers) to either list.
 *
 *   accuracy [--backend cpu|cuda] [--seed N] [--csv FILE] [--smoke]
 *            [--workload all|topics|needles|drift[,...]]
 *            [--contexts 8k,16k,32k,64k,128k] [--steps N] [--needles N]
 *            [--layers N] [--budget TOKENS] [--dtype bf16|f16|f32]
 *            [--head-dim D] [--bounded MASS:M[:S][,MASS:M[:S]...]]
 *            [--dense-layers LIST]
 *
 * --steps sets the decode steps of W1 and W3 (W2 runs 2 + 3 x needles:
 * every ask and a plain step between asks). Defaults: 64 steps up to 32K,
 * 48 at 64K, 40 at 128K; 10 needles, 8 at 128K. --smoke: context 4K,
 * 10 steps, 4 needles.
 *
 * Exits 0 on success, also when --backend cuda finds no GPU (it says
 * "skipped"); 1 on a library error or when a self-check fails (a policy's
 * output differs from exact attention over the pages it reports, or SYNC
 * selects other pages than RESIDENT); 2 on bad arguments.
 *
 * SPDX-License-Identifier: MIT
 */
#define _POSIX_C_SOURCE 200809L

#include "bench.h"
#include "workload.h"

#ifdef FKV_WITH_CUDA
static void *cu_alloc(void *ctx, size_t n)
{
    void *p = NULL;
    (void)ctx;
    return cudaMalloc(&p, n ? n : 1) == cudaSuccess ? p : NULL;
}
static void cu_release(void *ctx, void *p)
{
    (void)ctx;
    cudaFree(p);
}
static int cu_put(void *ctx, void *dst, const void *src, size_t n)
{
    (void)ctx;
    return cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice) != cudaSuccess;
}
static int cu_get(void *ctx, void *dst, const void *src, size_t n)
{
    (void)ctx;
    return cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost) != cudaSuccess;
}
#endif

typedef struct options {
    fkv_backend backend;
    uint64_t seed;
    const char *csv;
    int smoke;
    int kinds[3], nkinds;
    int64_t contexts[16];
    int ncontexts;
    int steps;  /* 0: per context default */
    int needles; /* 0: per context default */
    wl_shape shape;
    float bounded_mass[4]; /* --bounded items */
    float bounded_spec[4];
    int bounded_pages[4];
    int nbounded;
    uint64_t dense_mask; /* --dense-layers: indices */
    int dense_last;      /* --dense-layers: "last" */
    char dense_label[24];
} options;

static void usage(FILE *f)
{
    fprintf(f,
            "usage: accuracy [--backend cpu|cuda] [--seed N] [--csv FILE] "
            "[--smoke]\n"
            "                [--workload all|topics|needles|drift[,...]]\n"
            "                [--contexts 8k,16k,32k,64k,128k] [--steps N] "
            "[--needles N] [--layers N]\n"
            "                [--budget TOKENS] [--dtype bf16|f16|f32] "
            "[--head-dim D]\n"
            "                [--bounded MASS:M[:S][,MASS:M[:S]...]] "
            "[--dense-layers LIST|last]\n");
}

static int parse_args(int argc, char **argv, options *o)
{
    int i;
    memset(o, 0, sizeof *o);
    o->backend = FKV_BACKEND_CPU;
    o->seed = 1;
    o->shape = wl_default_shape();
    o->kinds[0] = WL_TOPICS;
    o->kinds[1] = WL_NEEDLES;
    o->kinds[2] = WL_DRIFT;
    o->nkinds = 3;
    for (i = 1; i < argc; ++i) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        int64_t x;
        if (!strcmp(a, "--smoke")) {
            o->smoke = 1;
            continue;
        }
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        }
        {
            static const char *const known[] = {
                "--backend", "--seed",   "--csv",    "--workload", "--contexts",
                "--steps",   "--needles", "--layers", "--budget",  "--head-dim",
                "--dtype",   "--bounded", "--dense-layers"};
            size_t k;
            int found = 0;
            for (k = 0; k < sizeof known / sizeof known[0]; ++k)
                found |= !strcmp(a, known[k]);
            if (!found) {
                fprintf(stderr, "accuracy: unknown option %s\n", a);
                return -1;
            }
        }
        if (!val) {
            fprintf(stderr, "accuracy: %s needs a value\n", a);
            return -1;
        }
        i++;
        if (!strcmp(a, "--backend")) {
            if (!strcmp(val, "cpu"))
                o->backend = FKV_BACKEND_CPU;
            else if (!strcmp(val, "cuda"))
                o->backend = FKV_BACKEND_CUDA;
            else
                return fprintf(stderr, "accuracy: unknown backend %s\n", val), -1;
        } else if (!strcmp(a, "--seed")) {
            if (bench_parse_int64(val, &x) || x < 0)
                return fprintf(stderr, "accuracy: bad seed %s\n", val), -1;
            o->seed = (uint64_t)x;
        } else if (!strcmp(a, "--csv")) {
            o->csv = val;
        } else if (!strcmp(a, "--workload")) {
            char buf[128], *tok, *save = NULL;
            snprintf(buf, sizeof buf, "%s", val);
            o->nkinds = 0;
            for (tok = strtok_r(buf, ",", &save); tok;
                 tok = strtok_r(NULL, ",", &save)) {
                int k = !strcmp(tok, "topics") || !strcmp(tok, "1") ? WL_TOPICS
                      : !strcmp(tok, "needles") || !strcmp(tok, "2") ? WL_NEEDLES
                      : !strcmp(tok, "drift") || !strcmp(tok, "3") ? WL_DRIFT
                      : !strcmp(tok, "all") ? -1 : 0;
                if (k == 0 || o->nkinds >= 3)
                    return fprintf(stderr, "accuracy: bad workload %s\n", tok), -1;
                if (k < 0) {
                    o->kinds[0] = WL_TOPICS;
                    o->kinds[1] = WL_NEEDLES;
                    o->kinds[2] = WL_DRIFT;
                    o->nkinds = 3;
                    break;
                }
                o->kinds[o->nkinds++] = k;
            }
        } else if (!strcmp(a, "--contexts")) {
            char buf[256], *tok, *save = NULL;
            snprintf(buf, sizeof buf, "%s", val);
            o->ncontexts = 0;
            for (tok = strtok_r(buf, ",", &save); tok;
                 tok = strtok_r(NULL, ",", &save)) {
                if (bench_parse_int64(tok, &x) || x < 1 || o->ncontexts >= 16)
                    return fprintf(stderr, "accuracy: bad context %s\n", tok), -1;
                o->contexts[o->ncontexts++] = x;
            }
        } else if (!strcmp(a, "--steps")) {
            if (bench_parse_int64(val, &x) || x < 2 || x > 100000)
                return fprintf(stderr, "accuracy: bad steps %s\n", val), -1;
            o->steps = (int)x;
        } else if (!strcmp(a, "--needles")) {
            if (bench_parse_int64(val, &x) || x < 1 || x > WL_MAX_NEEDLES)
                return fprintf(stderr, "accuracy: bad needles %s\n", val), -1;
            o->needles = (int)x;
        } else if (!strcmp(a, "--layers")) {
            if (bench_parse_int64(val, &x) || x < 1 || x > WL_MAX_LAYERS)
                return fprintf(stderr, "accuracy: bad layers %s\n", val), -1;
            o->shape.L = (int)x;
        } else if (!strcmp(a, "--budget")) {
            if (bench_parse_int64(val, &x) || x < 1 || x > (1 << 20))
                return fprintf(stderr, "accuracy: bad budget %s\n", val), -1;
            o->shape.budget = (int)x;
        } else if (!strcmp(a, "--head-dim")) {
            if (bench_parse_int64(val, &x) ||
                (x != 64 && x != 128 && x != 256))
                return fprintf(stderr, "accuracy: bad head dim %s\n", val), -1;
            o->shape.D = (int)x;
        } else if (!strcmp(a, "--bounded")) {
            char buf[256], *tok, *save = NULL;
            snprintf(buf, sizeof buf, "%s", val);
            o->nbounded = 0;
            for (tok = strtok_r(buf, ",", &save); tok;
                 tok = strtok_r(NULL, ",", &save)) {
                float mass, spec = 0.0f;
                int pages, got = o->nbounded == 4 ? 0
                                 : sscanf(tok, "%f:%d:%f", &mass, &pages, &spec);
                if (got < 2 || !(mass >= 0.0f && mass <= 1.0f) || pages < 0 ||
                    !(spec >= 0.0f && spec <= 1.0f))
                    return fprintf(stderr, "accuracy: bad --bounded %s "
                                           "(MASS:M[:S], at most 4)\n", tok), -1;
                o->bounded_spec[o->nbounded] = spec;
                o->bounded_mass[o->nbounded] = mass;
                o->bounded_pages[o->nbounded++] = pages;
            }
        } else if (!strcmp(a, "--dense-layers")) {
            char buf[256], *tok, *save = NULL;
            snprintf(buf, sizeof buf, "%s", val);
            snprintf(o->dense_label, sizeof o->dense_label, "%s", val);
            for (tok = strtok_r(buf, ",", &save); tok;
                 tok = strtok_r(NULL, ",", &save)) {
                if (!strcmp(tok, "last"))
                    o->dense_last = 1;
                else if (bench_parse_int64(tok, &x) || x < 0 || x >= 64)
                    return fprintf(stderr, "accuracy: bad --dense-layers %s "
                                           "(indices below 64 or last)\n",
                                   tok), -1;
                else
                    o->dense_mask |= (uint64_t)1 << x;
            }
        } else if (!strcmp(a, "--dtype")) {
            if (!strcmp(val, "bf16"))
                o->shape.dtype = FKV_DTYPE_BF16;
            else if (!strcmp(val, "f16"))
                o->shape.dtype = FKV_DTYPE_F16;
            else if (!strcmp(val, "f32"))
                o->shape.dtype = FKV_DTYPE_F32;
            else
                return fprintf(stderr, "accuracy: bad dtype %s\n", val), -1;
        } else {
            fprintf(stderr, "accuracy: unknown option %s\n", a);
            return -1;
        }
    }
    if (o->dense_mask >> o->shape.L)
        return fprintf(stderr, "accuracy: --dense-layers names a layer past "
                               "the %d of --layers\n", o->shape.L), -1;
    if (o->ncontexts == 0) {
        if (o->smoke) {
            o->contexts[0] = 4096;
            o->ncontexts = 1;
        } else {
            static const int64_t def[5] = {8192, 16384, 32768, 65536, 131072};
            memcpy(o->contexts, def, sizeof def);
            o->ncontexts = 5;
        }
    }
    return 0;
}

/* Steps of W1 and W3 at a context (W2 runs all its asks). */
static int default_steps(const options *o, int64_t ctx)
{
    if (o->steps)
        return o->steps;
    if (o->smoke)
        return 10;
    return ctx >= 131072 ? 40 : ctx >= 65536 ? 48 : 64;
}

/* Needles asked at a context. */
static int default_needles(const options *o, int64_t ctx)
{
    if (o->needles)
        return o->needles;
    if (o->smoke)
        return 4;
    return ctx >= 131072 ? 8 : 10;
}

static void fmt_pct(char *buf, size_t len, double x, int prec)
{
    if (isnan(x) || isinf(x))
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.*f%%", prec, 100.0 * x);
}

static void fmt_tau(char *buf, size_t len, const wl_variant *v, float tau)
{
    if (v->policy != FKV_POLICY_FREEKV || v->criterion)
        snprintf(buf, len, "-");
    else if (tau <= FKV_CORRECTION_OFF)
        snprintf(buf, len, "off");
    else
        snprintf(buf, len, "%.2g", (double)tau);
}

/* --bounded: the cosine criterion at 0.9 and 0.8, the oracle, dense, and
 * one BOUNDED variant per (mass, M). */
static int bounded_variants(const options *o, wl_variant *v)
{
    int n = 0, i;
    v[n++] = wl_make_variant("FREEKV", FKV_POLICY_FREEKV, NAN);
    v[n++] = wl_make_variant("FREEKV tau=0.8", FKV_POLICY_FREEKV, 0.8f);
    v[n++] = wl_make_variant("RESIDENT", FKV_POLICY_RESIDENT, NAN);
    v[n++] = wl_make_variant("DENSE", FKV_POLICY_DENSE, NAN);
    for (i = 0; i < o->nbounded; ++i) {
        char name[64];
        if (o->bounded_spec[i] > 0.0f)
            snprintf(name, sizeof name, "BOUNDED m=%g M=%d s=%g",
                     (double)o->bounded_mass[i], o->bounded_pages[i],
                     (double)o->bounded_spec[i]);
        else
            snprintf(name, sizeof name, "BOUNDED m=%g M=%d",
                     (double)o->bounded_mass[i], o->bounded_pages[i]);
        v[n] = wl_make_variant(name, FKV_POLICY_FREEKV, NAN);
        v[n].criterion = FKV_CRITERION_BOUNDED;
        v[n].min_mass = o->bounded_mass[i];
        v[n].max_pages = o->bounded_pages[i];
        v[n].spec_mass = o->bounded_spec[i];
        n++;
    }
    return n;
}

/* --dense-layers: FREEKV (the library's threshold) and RESIDENT with those
 * layers dense, after the n variants in v. */
static int dense_variants(const options *o, wl_variant *v, int n)
{
    uint64_t mask = o->dense_mask;
    if (o->dense_last)
        mask |= (uint64_t)1 << (o->shape.L - 1);
    if (!mask)
        return n;
    static const fkv_policy pol[2] = {FKV_POLICY_FREEKV, FKV_POLICY_RESIDENT};
    for (int i = 0; i < 2; ++i) {
        char name[40];
        snprintf(name, sizeof name, "%.8s dense %.23s",
                 bench_policy_name(pol[i]), o->dense_label);
        v[n] = wl_make_variant(name, pol[i], NAN);
        v[n].dense_layers = mask;
        n++;
    }
    return n;
}

/* One (workload, context) run; appends to csv. Returns 0, 1 (a check
 * failed), -1 (error), or 2 (CUDA unavailable: skipped). */
static int run_one(const options *o, int kind, int64_t ctx, FILE *csv,
                   int *csv_header)
{
    wl_params pp = wl_default_params();
    wl_variant var[WL_MAX_VARIANTS];
    int nvar = o->nbounded ? bounded_variants(o, var) : wl_default_variants(var);
    nvar = dense_variants(o, var, nvar);
    wl_gen g;
    wl_session s;
    wl_mem mem = wl_host_mem();
    int steps, st, v, bad = 0;
    double t0 = bench_now_s(), t1, t2;
    const wl_shape *sh = &o->shape;
    double tol = sh->dtype == FKV_DTYPE_F32 ? 1e-4
               : sh->dtype == FKV_DTYPE_F16 ? 4e-3 : 2.5e-2;
    char tau[16];

#ifdef FKV_WITH_CUDA
    if (o->backend == FKV_BACKEND_CUDA) {
        mem.alloc = cu_alloc;
        mem.release = cu_release;
        mem.put = cu_put;
        mem.get = cu_get;
    }
#endif
    pp.needles = default_needles(o, ctx);
    steps = kind == WL_NEEDLES ? wl_needle_steps(&pp) : default_steps(o, ctx);
    if (wl_gen_init(&g, kind, sh, &pp, ctx, steps, o->seed)) {
        fprintf(stderr, "accuracy: cannot generate %s at context %lld "
                        "(out of memory or context too short)\n",
                wl_kind_name(kind), (long long)ctx);
        return -1;
    }
    if (wl_session_open(&s, &g, var, nvar, o->backend, &mem, 1)) {
        wl_gen_free(&g);
        if (s.status == FKV_ERR_UNSUPPORTED && o->backend == FKV_BACKEND_CUDA) {
            printf("accuracy: %s\n", s.err);
            return 2;
        }
        fprintf(stderr, "accuracy: %s\n", s.err);
        return -1;
    }
    t1 = bench_now_s();
    for (st = 0; st < steps; ++st)
        if (wl_session_step(&s)) {
            fprintf(stderr, "accuracy: step %d: %s\n", st, s.err);
            wl_session_release(&s);
            wl_gen_free(&g);
            return -1;
        }
    if (wl_session_close(&s)) {
        fprintf(stderr, "accuracy: %s\n", s.err);
        wl_session_release(&s);
        wl_gen_free(&g);
        return -1;
    }
    t2 = bench_now_s();

    {
        const wl_trace *tr = &s.tr;
        double cm = tr->cos_n > 0 ? tr->cos_sum / tr->cos_n : NAN;
        printf("\n### %s, context %lld: %d decode steps (%d measured), "
               "%d layers\n\n",
               kind == WL_TOPICS ? "W1 topics"
               : kind == WL_NEEDLES ? "W2 needles" : "W3 drift",
               (long long)ctx, steps, steps - s.warmup, sh->L);
        printf("Trace: adjacent-step query cosine mean %.3f; query heads with "
               "mean >= 0.9: %.0f%%, < 0.7: %.0f%%; head-steps < 0.5: %.1f%%; "
               "(step, layer, KV head) with group-mean cosine < 0.7/0.8/0.9/"
               "0.95: %.1f/%.1f/%.1f/%.1f%%. Dense mass on the sink %.1f%%, "
               "on the window and partial page %.1f%%; the best K pages per KV "
               "head (by dense mass) would keep %.2f%%",
               cm, 100.0 * wl_heads_above(tr, sh, 0.9),
               100.0 * (1.0 - wl_heads_above(tr, sh, 0.7)),
               tr->cos_n > 0 ? 100.0 * tr->cos_below05 / tr->cos_n : NAN,
               100.0 * tr->gcos_below[0] / tr->gcos_n,
               100.0 * tr->gcos_below[1] / tr->gcos_n,
               100.0 * tr->gcos_below[2] / tr->gcos_n,
               100.0 * tr->gcos_below[3] / tr->gcos_n,
               100.0 * tr->sink_mass / tr->mass_n,
               100.0 * tr->window_mass / tr->mass_n,
               100.0 * tr->ideal_mass / tr->mass_n);
        if (kind == WL_NEEDLES)
            printf("; dense mass of the needle token at its ask %.1f%% "
                   "(%d needles)",
                   100.0 * tr->needle_mass / tr->needle_n, g.nneedle);
        printf(". Time %.1f s (prefill %.1f s).\n\n", t2 - t0, t1 - t0);
        printf("| variant | tau | mass vs dense | mass / oracle | selected "
               "mass / oracle's | worst step | worst head | oracle pages kept "
               "| out rel err | needle hits | corrections | pages/step/head "
               "(in attend) | self-check |\n");
        printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (v = 0; v < nvar; ++v) {
            const wl_metrics *m = &s.met[v];
            char c1[24], c2[24], c3[24], c4[24], c5[24], c6[24], c7[24],
                c8[24], c9[24], c10[24];
            int is_dense = var[v].policy == FKV_POLICY_DENSE;
            fmt_tau(tau, sizeof tau, &var[v], m->threshold);
            fmt_pct(c1, sizeof c1, wl_mass(m), 2);
            fmt_pct(c2, sizeof c2, is_dense ? NAN : wl_oracle_ratio(m), 2);
            fmt_pct(c10, sizeof c10, is_dense ? NAN : wl_sel_ratio(m), 2);
            fmt_pct(c3, sizeof c3, is_dense ? NAN : m->worst_step, 2);
            fmt_pct(c4, sizeof c4, is_dense ? NAN : m->worst_head, 1);
            fmt_pct(c5, sizeof c5, is_dense ? NAN : wl_overlap(m), 1);
            fmt_pct(c6, sizeof c6, wl_err(m), 2);
            if (kind == WL_NEEDLES)
                snprintf(c7, sizeof c7, "%llu/%llu",
                         (unsigned long long)m->hits,
                         (unsigned long long)m->asks);
            else
                snprintf(c7, sizeof c7, "-");
            fmt_pct(c8, sizeof c8,
                    var[v].policy == FKV_POLICY_FREEKV ? wl_correction_rate(m)
                                                       : NAN, 1);
            if (var[v].policy == FKV_POLICY_FREEKV ||
                var[v].policy == FKV_POLICY_SYNC)
                snprintf(c9, sizeof c9, "%.2f (%.2f)", wl_recall_per_step(m, sh),
                         wl_crit_per_step(m, sh));
            else
                snprintf(c9, sizeof c9, "-");
            printf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | "
                   "%s | %.1e%s |\n",
                   var[v].name, tau, c1, c2, c10, c3, c4, c5, c6, c7, c8, c9,
                   m->self_err, m->self_err > tol ? " FAIL" : "");
            if (m->self_err > tol) {
                fprintf(stderr,
                        "accuracy: CHECK FAILED: %s output differs from exact "
                        "attention over its attended pages by %.3g (tol %.3g)\n",
                        var[v].name, m->self_err, tol);
                bad = 1;
            }
            if (csv) {
                if (!*csv_header) {
                    fprintf(csv,
                            "backend,dtype,workload,context,layers,q_heads,"
                            "kv_heads,head_dim,page,sink,window,budget,steps,"
                            "measured_steps,seed,variant,policy,threshold,"
                            "mass,oracle_ratio,selected_oracle_ratio,"
                            "worst_step_ratio,"
                            "worst_head_ratio,oracle_overlap,out_rel_err,"
                            "needle_hits,needle_asks,ask_oracle_ratio,"
                            "corrections,heads_checked,correction_rate,"
                            "pages_recalled,pages_per_step_head,"
                            "pages_in_attend_per_step_head,self_err,"
                            "cos_mean,heads_cos_ge_0.9,group_cos_lt_0.8,"
                            "sink_mass,window_mass,seconds\n");
                    *csv_header = 1;
                }
                fprintf(csv,
                        "%s,%s,%s,%lld,%d,%d,%d,%d,%d,%d,%d,%d,%d,%d,%llu,"
                        "\"%s\",%s,%s,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,"
                        "%llu,%llu,"
                        "%.6f,%llu,%llu,%.6f,%llu,%.4f,%.4f,%.3g,%.4f,%.4f,%.4f,"
                        "%.4f,%.4f,%.2f\n",
                        o->backend == FKV_BACKEND_CUDA ? "cuda" : "cpu",
                        bench_dtype_name(sh->dtype), wl_kind_name(kind),
                        (long long)ctx, sh->L, sh->QH, sh->KVH, sh->D, sh->P,
                        sh->sink, sh->window, sh->budget, steps,
                        steps - s.warmup, (unsigned long long)o->seed,
                        var[v].name, bench_policy_name(var[v].policy), tau,
                        wl_mass(m), wl_oracle_ratio(m), wl_sel_ratio(m),
                        m->worst_step,
                        m->worst_head, wl_overlap(m), wl_err(m),
                        (unsigned long long)m->hits,
                        (unsigned long long)m->asks,
                        m->ask_oracle > 0 ? m->ask_mass / m->ask_oracle : NAN,
                        (unsigned long long)m->st.corrections,
                        (unsigned long long)m->st.heads_checked,
                        wl_correction_rate(m),
                        (unsigned long long)m->st.pages_recalled,
                        wl_recall_per_step(m, sh), wl_crit_per_step(m, sh),
                        m->self_err, cm,
                        wl_heads_above(tr, sh, 0.9),
                        tr->gcos_below[1] / tr->gcos_n,
                        tr->sink_mass / tr->mass_n,
                        tr->window_mass / tr->mass_n, t2 - t0);
            }
        }
        if (s.sync_mismatch) {
            fprintf(stderr,
                    "accuracy: CHECK FAILED: SYNC selected other pages than "
                    "RESIDENT on %llu (step, layer, KV head)\n",
                    (unsigned long long)s.sync_mismatch);
            bad = 1;
        }
        if (kind == WL_DRIFT)
            printf("\nMass lost against the oracle, in %% of the oracle's "
                   "total, by head-step (- / KV group moving faster than "
                   "%.2f segments per step / slower; head-steps %.0f / %.0f "
                   "/ %.0f):",
                   sqrt(pp.speed_lo * pp.speed_hi), tr->cat_n[0],
                   tr->cat_n[1], tr->cat_n[2]);
        else
            printf("\nMass lost against the oracle, in %% of the oracle's "
                   "total, by head-step (volatile head / stable head whose "
                   "focus jumped / other%s; head-steps %.0f / %.0f / %.0f):",
                   kind == WL_NEEDLES ? " / needle ask or the step after" : "",
                   tr->cat_n[0], tr->cat_n[1], tr->cat_n[2]);
        if (kind == WL_NEEDLES)
            printf(" [%.0f ask head-steps]", tr->cat_n[3]);
        for (v = 0; v < nvar; ++v) {
            const wl_metrics *m = &s.met[v];
            if (var[v].policy != FKV_POLICY_FREEKV || m->oracle <= 0)
                continue;
            printf(" %s: %.2f / %.2f / %.2f", var[v].name,
                   100.0 * m->loss[0] / m->oracle,
                   100.0 * m->loss[1] / m->oracle,
                   100.0 * m->loss[2] / m->oracle);
            if (kind == WL_NEEDLES)
                printf(" / %.2f", 100.0 * m->loss[3] / m->oracle);
            printf(";");
        }
        printf("\n");
        if (kind == WL_NEEDLES)
            for (v = 0; v < nvar; ++v)
                if (var[v].policy == FKV_POLICY_FREEKV &&
                    s.met[v].ask_oracle > 0)
                    printf("%s%s mass / oracle at the asks %.1f%%",
                           v ? "; " : "At needle asks: ", var[v].name,
                           100.0 * s.met[v].ask_mass / s.met[v].ask_oracle);
        if (kind == WL_NEEDLES)
            printf(".\n");
        fflush(stdout);
    }
    wl_session_release(&s);
    wl_gen_free(&g);
    return bad;
}

int main(int argc, char **argv)
{
    options o;
    FILE *csv = NULL;
    int csv_header = 0, ki, ci, rc = 0;
    double t0 = bench_now_s();

    if (parse_args(argc, argv, &o)) {
        usage(stderr);
        return 2;
    }
    if (o.backend == FKV_BACKEND_CUDA) {
#ifdef FKV_WITH_CUDA
        int ndev = 0;
        if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev < 1) {
            printf("accuracy: --backend cuda skipped: no CUDA device\n");
            return 0;
        }
#else
        printf("accuracy: --backend cuda skipped: built without CUDA "
               "(make CUDA=1)\n");
        return 0;
#endif
    }
    if (o.csv) {
        csv = fopen(o.csv, "w");
        if (!csv) {
            fprintf(stderr, "accuracy: cannot write %s: %s\n", o.csv,
                    strerror(errno));
            return 1;
        }
    }
    printf("# libfreekv retrieval accuracy (%s backend, library %s)\n\n",
           o.backend == FKV_BACKEND_CUDA ? "CUDA" : "CPU",
           fkv_version_string());
    printf("Shape: %d layers, %d query heads, %d KV heads, head_dim %d, %s; "
           "page %d, sink %d, window %d, budget %d (K = %d selected pages); "
           "seed %llu%s.\n",
           o.shape.L, o.shape.QH, o.shape.KVH, o.shape.D,
           bench_dtype_name(o.shape.dtype), o.shape.P, o.shape.sink,
           o.shape.window, o.shape.budget,
           (o.shape.budget - o.shape.sink - o.shape.window) / o.shape.P,
           (unsigned long long)o.seed, o.smoke ? " (smoke)" : "");
    for (ki = 0; ki < o.nkinds && rc >= 0; ++ki)
        for (ci = 0; ci < o.ncontexts; ++ci) {
            int r = run_one(&o, o.kinds[ki], o.contexts[ci], csv, &csv_header);
            if (r == 2) {
                printf("accuracy: --backend cuda skipped: no usable CUDA "
                       "device\n");
                if (csv)
                    fclose(csv);
                return 0;
            }
            if (r < 0) {
                rc = -1;
                break;
            }
            if (r > 0)
                rc = 1;
        }
    if (csv)
        fclose(csv);
    printf("\nTotal time %.1f s.\n", bench_now_s() - t0);
    return rc < 0 ? 1 : rc;
}
