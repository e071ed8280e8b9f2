/*
 * accuracy: a small run of the retrieval-accuracy benchmark (bench/accuracy.c)
 * with the same generators and measurement (bench/workload.h):
 *
 *  - W1 (topic-mixture query traces, realistic adjacent-step similarity):
 *    FREEKV at the library's default correction threshold keeps at least
 *    99% of the attention mass that selection with the current query
 *    (RESIDENT, the oracle) keeps;
 *  - W2 (planted needles asked right after a query shift): every needle is
 *    attended at its ask with correction on, and at least one is missed
 *    with correction off (so the check can fail);
 *  - the measurement itself against the float64 reference of the tests
 *    (tests/reference.h): the dense output, the attended set of a policy,
 *    its mass and output.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../bench/workload.h"

#define ACC_CONTEXT 4096
#define ACC_BUDGET 1024 /* K = 24 of 120 candidate pages at 4K */
#define ACC_STEPS 24
#define ACC_SEED 1

/* Tensor memory of the backend under test (tst_dev_*). */
static void *acc_alloc(void *ctx, size_t n)
{
    (void)ctx;
    return tst_dev_alloc(n);
}
static void acc_release(void *ctx, void *p)
{
    (void)ctx;
    tst_dev_free(p);
}
static int acc_put(void *ctx, void *dst, const void *src, size_t n)
{
    (void)ctx;
    tst_dev_put(dst, src, n);
    return 0;
}
static int acc_get(void *ctx, void *dst, const void *src, size_t n)
{
    (void)ctx;
    tst_dev_get(dst, src, n);
    return 0;
}

static wl_mem acc_mem(void)
{
    wl_mem m;
    m.alloc = acc_alloc;
    m.release = acc_release;
    m.put = acc_put;
    m.get = acc_get;
    m.ctx = NULL;
    return m;
}

static wl_shape acc_shape(void)
{
    wl_shape sh = wl_default_shape();
    sh.budget = ACC_BUDGET;
    return sh;
}

static int find_variant(const wl_session *s, fkv_policy p, float tau)
{
    int v;
    for (v = 0; v < s->nvar; ++v)
        if (s->var[v].policy == p &&
            (isnan(tau) ? isnan(s->var[v].threshold)
                        : s->var[v].threshold == tau))
            return v;
    ck_abort_msg("variant not found");
    return -1;
}

/* Generates `kind` and runs it through `steps` steps with FREEKV at the
 * default threshold, FREEKV without correction, SYNC, RESIDENT and, with
 * `all`, every variant of the benchmark (DENSE and the other thresholds
 * too). The generator and session are left for the caller to inspect. */
static void acc_run(int kind, int64_t context, int steps, wl_params *pp,
                    wl_gen *g, wl_session *s, int close, int all)
{
    wl_shape sh = acc_shape();
    wl_variant var[WL_MAX_VARIANTS];
    wl_mem mem = acc_mem();
    int nvar = wl_default_variants(var), t;
    if (!all) {
        /* FREEKV, SYNC, RESIDENT, FREEKV off: DENSE costs the CPU backend
         * more than the rest together; the outputs are compared with the
         * exact dense output instead. */
        var[3] = var[7];
        nvar = 4;
    }
    ck_assert_int_eq(wl_gen_init(g, kind, &sh, pp, context, steps, ACC_SEED), 0);
    ck_assert_msg(wl_session_open(s, g, var, nvar, g_test_backend, &mem, 1) == 0,
                  "wl_session_open: %s", s->err);
    for (t = 0; t < steps; ++t)
        ck_assert_msg(wl_session_step(s) == 0, "step %d: %s", t, s->err);
    if (close)
        ck_assert_msg(wl_session_close(s) == 0, "close: %s", s->err);
}

/* What every run must satisfy: outputs equal exact attention over the
 * attended sets measured, SYNC selects RESIDENT's pages, DENSE keeps all
 * the mass, RESIDENT is its own oracle. */
static void acc_common_checks(const wl_session *s)
{
    int v;
    double tol = tst_tol(s->g->sh.dtype);
    for (v = 0; v < s->nvar; ++v)
        ck_assert_msg(s->met[v].self_err <= tol,
                      "%s: output differs from exact attention over its "
                      "attended pages by %g",
                      s->var[v].name, s->met[v].self_err);
    ck_assert_msg(s->sync_mismatch == 0, "SYNC differs from RESIDENT %llu times",
                  (unsigned long long)s->sync_mismatch);
    if (s->idx_dense >= 0)
        ck_assert_msg(fabs(wl_mass(&s->met[s->idx_dense]) - 1.0) < 1e-9,
                      "DENSE mass %.12f", wl_mass(&s->met[s->idx_dense]));
    ck_assert_msg(fabs(wl_oracle_ratio(&s->met[s->idx_oracle]) - 1.0) < 1e-12,
                  "RESIDENT / oracle %.12f",
                  wl_oracle_ratio(&s->met[s->idx_oracle]));
}

START_TEST(acc_topics_mass)
{
    wl_params pp = wl_default_params();
    wl_gen g;
    wl_session s;
    int fk, off;
    double r, r_off, cos;
    acc_run(WL_TOPICS, ACC_CONTEXT, ACC_STEPS, &pp, &g, &s, 1, 0);
    acc_common_checks(&s);
    fk = find_variant(&s, FKV_POLICY_FREEKV, NAN);
    off = find_variant(&s, FKV_POLICY_FREEKV, FKV_CORRECTION_OFF);
    r = wl_oracle_ratio(&s.met[fk]);
    r_off = wl_oracle_ratio(&s.met[off]);
    cos = s.tr.cos_sum / s.tr.cos_n;
    /* The trace is the realistic one (docs/accuracy.md): adjacent-step
     * cosine about 0.84, most heads above 0.9, a minority much lower. */
    ck_assert_msg(cos > 0.78 && cos < 0.92, "trace mean cosine %.3f", cos);
    ck_assert_msg(wl_heads_above(&s.tr, &g.sh, 0.9) >= 0.6,
                  "only %.0f%% of heads above 0.9",
                  100.0 * wl_heads_above(&s.tr, &g.sh, 0.9));
    ck_assert_msg(s.met[fk].st.corrections > 0 &&
                      s.met[fk].st.corrections < s.met[fk].st.heads_checked,
                  "corrections %llu of %llu",
                  (unsigned long long)s.met[fk].st.corrections,
                  (unsigned long long)s.met[fk].st.heads_checked);
    ck_assert_msg(r >= 0.99,
                  "FREEKV (threshold %.2f) keeps %.3f%% of the oracle's mass "
                  "(correction off: %.3f%%)",
                  (double)s.met[fk].threshold, 100.0 * r, 100.0 * r_off);
    wl_session_release(&s);
    wl_gen_free(&g);
}
END_TEST

START_TEST(acc_needles_hit)
{
    wl_params pp = wl_default_params();
    wl_gen g;
    wl_session s;
    int fk, off;
    pp.needles = 8;
    acc_run(WL_NEEDLES, ACC_CONTEXT, wl_needle_steps(&pp), &pp, &g, &s, 1, 0);
    acc_common_checks(&s);
    fk = find_variant(&s, FKV_POLICY_FREEKV, NAN);
    off = find_variant(&s, FKV_POLICY_FREEKV, FKV_CORRECTION_OFF);
    /* 8 asks x 2 layers x 2 KV heads. */
    ck_assert_int_eq(s.met[fk].asks, 8 * 2 * 2);
    ck_assert_msg(s.met[s.idx_oracle].hits == s.met[s.idx_oracle].asks,
                  "the oracle found %llu of %llu needles: the needles are "
                  "too weak for Quest scoring",
                  (unsigned long long)s.met[s.idx_oracle].hits,
                  (unsigned long long)s.met[s.idx_oracle].asks);
    ck_assert_msg(s.met[fk].hits == s.met[fk].asks,
                  "FREEKV with correction found %llu of %llu needles",
                  (unsigned long long)s.met[fk].hits,
                  (unsigned long long)s.met[fk].asks);
    ck_assert_msg(s.met[off].hits < s.met[off].asks,
                  "FREEKV without correction found every needle (%llu): "
                  "the asks do not test correction",
                  (unsigned long long)s.met[off].hits);
    wl_session_release(&s);
    wl_gen_free(&g);
}
END_TEST

/* The measurement of workload.h against the tests' float64 reference, on
 * the last layer of the last step (still held by the session). */
START_TEST(acc_metric_reference)
{
    wl_params pp = wl_default_params();
    wl_gen g;
    wl_session s;
    const int L = acc_shape().L;
    int fk, h;
    int64_t n;
    ref_layout lay;
    unsigned char *mask;
    double *out = (double *)malloc(sizeof(double) * 256);
    acc_run(WL_TOPICS, 2048, 6, &pp, &g, &s, 0, 1);
    acc_common_checks(&s);
    n = g.n;
    lay.P = s.P;
    lay.S = s.S;
    lay.W = s.W;
    lay.K = s.K;
    mask = (unsigned char *)malloc((size_t)n);
    ck_assert(mask != NULL && out != NULL);
    fk = find_variant(&s, FKV_POLICY_FREEKV, NAN);
    for (h = 0; h < g.sh.QH; ++h) {
        const float *q = s.q + ((size_t)(L - 1) * g.sh.QH + h) * g.sh.D;
        const int kvh = h / g.G;
        const double scale = 1.0 / sqrt((double)g.sh.D);
        int vi, which[2];
        which[0] = s.idx_oracle;
        which[1] = fk;
        /* Dense output. */
        ref_attention(g.k[L - 1], g.v[L - 1], n, g.sh.KVH, g.sh.D, kvh, q,
                      scale, NULL, out);
        ck_assert_msg(ref_rel_err_dd(s.dense + (size_t)h * g.sh.D, out,
                                     (size_t)g.sh.D) < 1e-12,
                      "dense output of head %d", h);
        for (vi = 0; vi < 2; ++vi) {
            int v = which[vi], cnt, j, sel[64], nsel;
            double mass = 0.0, mass_ref = 0.0, top = -INFINITY, sum = 0.0;
            int64_t t;
            const double *pm = s.pm + (size_t)h * s.maxpages;
            nsel = s.nsel[v * g.sh.KVH + kvh];
            ck_assert(nsel <= 64);
            for (j = 0; j < nsel; ++j)
                sel[j] = s.sel[((size_t)v * g.sh.KVH + kvh) * (s.K + 1) + j];
            /* Library output = reference attention over the reference's
             * attended mask of the pages it reported. */
            ref_attended_mask(&lay, n, sel, nsel, mask);
            ref_attention(g.k[L - 1], g.v[L - 1], n, g.sh.KVH, g.sh.D, kvh, q,
                          scale, mask, out);
            ck_assert_msg(ref_rel_err(s.out + ((size_t)v * g.sh.QH + h) * g.sh.D,
                                      out, (size_t)g.sh.D) <= tst_tol(g.sh.dtype),
                          "%s head %d: output vs reference", s.var[v].name, h);
            /* Mass of the attended set: the metric's page sums against
             * softmax weights summed token by token over the mask. */
            cnt = wl_attended(&s, v, L - 1, kvh, n);
            for (j = 0; j < cnt; ++j)
                mass += pm[s.att[j]];
            for (t = 0; t < n; ++t) {
                double x = 0.0;
                int i;
                for (i = 0; i < g.sh.D; ++i)
                    x += (double)q[i] *
                         g.k[L - 1][((size_t)t * g.sh.KVH + kvh) * g.sh.D + i];
                s.w[t] = x * scale;
                if (s.w[t] > top)
                    top = s.w[t];
            }
            for (t = 0; t < n; ++t) {
                double e = exp(s.w[t] - top);
                sum += e;
                if (mask[t])
                    mass_ref += e;
            }
            mass_ref /= sum;
            ck_assert_msg(fabs(mass - mass_ref) < 1e-12,
                          "%s head %d: mass %.15f, reference %.15f",
                          s.var[v].name, h, mass, mass_ref);
        }
    }
    free(mask);
    free(out);
    ck_assert_msg(wl_session_close(&s) == 0, "close: %s", s.err);
    wl_session_release(&s);
    wl_gen_free(&g);
}
END_TEST

Suite *suite_accuracy(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "accuracy"));
    TCase *tc = tst_tcase(s, "accuracy");
    tcase_add_test(tc, acc_topics_mass);
    tcase_add_test(tc, acc_needles_hit);
    tcase_add_test(tc, acc_metric_reference);
    return s;
}
