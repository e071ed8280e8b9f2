/*
 * always-attended: sink pages, window pages and the partial page are
 * attended whatever their scores. Their keys are orthogonal to every query
 * (page score 0, below every candidate's) and their values distinctive, so
 * leaving any of them out changes the output visibly.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AA_P 16
#define AA_D 64
#define AA_KVH 2
#define AA_QH 4

/* Row of a "special" token: keys only on channels >= D/2, values about
 * +2. Candidate tokens: N(0,1) everywhere. */
static void special_rows(ref_rng *r, float *k, float *v, int tokens)
{
    int t, i;
    for (t = 0; t < tokens * AA_KVH; ++t)
        for (i = 0; i < AA_D; ++i) {
            k[(size_t)t * AA_D + i] =
                i < AA_D / 2 ? 0.0f : (float)ref_rng_normal(r);
            v[(size_t)t * AA_D + i] = (float)(2.0 + 0.3 * ref_rng_normal(r));
        }
}

/* Queries only on channels < D/2; redrawn until the top-K is separated. */
static void aa_query(tst_model *m, int slot, float *q)
{
    int tries, i;
    for (tries = 0; tries < 200; ++tries) {
        for (i = 0; i < AA_QH * AA_D; ++i)
            q[i] = (i % AA_D) < AA_D / 2 ? (float)ref_rng_normal(&m->rng)
                                         : 0.0f;
        if (tst_query_gap(m, 0, 1, &slot, q) >= TST_MIN_GAP)
            return;
    }
    ck_abort_msg("no separated query");
}

/* Relative difference between the library output and the reference
 * attention without the tokens of pages [p0, p1). */
static double diff_without(tst_model *m, int slot, const float *q,
                           const float *got, int64_t p0, int64_t p1)
{
    tst_seq *s = &m->seq[slot];
    int64_t n = s->len[0], t;
    unsigned char *mask[AA_KVH];
    double *ref = (double *)calloc((size_t)AA_QH * AA_D, sizeof(double));
    double e;
    int g, h;
    for (g = 0; g < AA_KVH; ++g) {
        mask[g] = (unsigned char *)calloc((size_t)n, 1);
        ref_attended_mask(&m->lay, n, s->used[0][g].pages,
                          s->used[0][g].count, mask[g]);
        for (t = p0 * AA_P; t < p1 * AA_P && t < n; ++t)
            mask[g][t] = 0;
    }
    for (h = 0; h < AA_QH; ++h)
        ref_attention(s->k[0], s->v[0], n, AA_KVH, AA_D, h / m->G,
                      q + h * AA_D, m->scale, mask[h / m->G],
                      ref + h * AA_D);
    e = ref_rel_err(got, ref, (size_t)AA_QH * AA_D);
    for (g = 0; g < AA_KVH; ++g)
        free(mask[g]);
    free(ref);
    return e;
}

/* _i: policy (FREEKV, SYNC, RESIDENT) x group score. */
START_TEST(aa_sink_window_partial)
{
    fkv_options o;
    tst_model m;
    const int n = 40 * AA_P + 7; /* sealed 40, partial 7, cand [2, 36) */
    size_t row = (size_t)AA_KVH * AA_D;
    float *k, *v, *q, *out;
    int s, step, p;
    tst_options(&o, 1, AA_QH, AA_KVH, AA_D, FKV_DTYPE_F32);
    tst_geometry(&o, AA_P, 32, 64, 160); /* S 2, W 4, K 4 */
    o.policy = (_i / 2) == 0 ? FKV_POLICY_FREEKV
               : (_i / 2) == 1 ? FKV_POLICY_SYNC
                               : FKV_POLICY_RESIDENT;
    o.group_score = (_i & 1) ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(&m, &o, 6000 + (uint64_t)_i);
    s = tst_open(&m);
    k = (float *)calloc((size_t)n * row, sizeof(float));
    v = (float *)calloc((size_t)n * row, sizeof(float));
    q = (float *)calloc((size_t)AA_QH * AA_D, sizeof(float));
    out = (float *)calloc((size_t)AA_QH * AA_D, sizeof(float));
    ref_random_tensor(&m.rng, REF_F32, k, (size_t)n * row, 1.0);
    ref_random_tensor(&m.rng, REF_F32, v, (size_t)n * row, 1.0);
    for (p = 0; p <= 40; ++p)
        if (p < 2 || p >= 36) {
            int tokens = p == 40 ? 7 : AA_P;
            special_rows(&m.rng, k + (size_t)p * AA_P * row,
                         v + (size_t)p * AA_P * row, tokens);
        }
    tst_ok(tst_append(&m, 0, 1, &s, &n, k, v));
    aa_query(&m, s, q);
    tst_attend_check(&m, 0, 1, &s, q, TST_TOL_F32);
    tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out));
    {
        double e_sink = diff_without(&m, s, q, out, 0, 2);
        double e_win = diff_without(&m, s, q, out, 36, 40);
        double e_part = diff_without(&m, s, q, out, 40, 41);
        ck_assert_msg(e_sink > 0.02 && e_win > 0.02 && e_part > 0.005,
                      "output hardly depends on the always-attended tokens "
                      "(%g %g %g): test not discriminating",
                      e_sink, e_win, e_part);
    }
    /* Decode: every new token is special (orthogonal key). Pages seal,
     * the window slides; the page leaving the window becomes a candidate
     * with score 0 and is never selected. */
    for (step = 0; step < 2 * AA_P + 3; ++step) {
        float kr[AA_KVH * AA_D], vr[AA_KVH * AA_D];
        special_rows(&m.rng, kr, vr, 1);
        tst_ok(tst_append(&m, 0, 1, &s, NULL, kr, vr));
        ck_assert_msg(tst_query_gap(&m, 0, 1, &s, q) >= TST_MIN_GAP,
                      "precondition: top-K separated (change the seed)");
        tst_attend_check(&m, 0, 1, &s, q, TST_TOL_F32);
        tst_select(&m, 0, 1, &s, q);
        tst_recall(&m, 0, 1, &s);
    }
    free(k);
    free(v);
    free(q);
    free(out);
    tst_model_free(&m);
}
END_TEST

/* The token appended by this step is attended at once (partial page of 1
 * token, and a token that completes a page). */
START_TEST(aa_newest_token)
{
    fkv_options o;
    tst_model m;
    int s, n0 = 40 * AA_P - 1 - _i, step; /* 638 or 639 */
    size_t row = (size_t)AA_KVH * AA_D;
    float *q, *out, *out2;
    tst_options(&o, 1, AA_QH, AA_KVH, AA_D, FKV_DTYPE_F32);
    tst_geometry(&o, AA_P, 32, 64, 160);
    o.policy = FKV_POLICY_SYNC;
    tst_model_init(&m, &o, 6100 + (uint64_t)_i);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n0);
    q = (float *)calloc((size_t)AA_QH * AA_D, sizeof(float));
    out = (float *)calloc((size_t)AA_QH * AA_D, sizeof(float));
    out2 = (float *)calloc((size_t)AA_QH * AA_D, sizeof(float));
    aa_query(&m, s, q);
    for (step = 0; step < 3; ++step) {
        float kr[AA_KVH * AA_D], vr[AA_KVH * AA_D];
        int i;
        /* A key aligned with q (large weight) and a large value. */
        for (i = 0; i < (int)row; ++i) {
            kr[i] = q[(i / AA_D) * m.G * AA_D + i % AA_D];
            vr[i] = 10.0f;
        }
        tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out));
        tst_ok(tst_append(&m, 0, 1, &s, NULL, kr, vr));
        ck_assert_msg(tst_query_gap(&m, 0, 1, &s, q) >= TST_MIN_GAP,
                      "precondition: top-K separated (change the seed)");
        tst_attend_check(&m, 0, 1, &s, q, TST_TOL_F32);
        tst_ok(tst_attend_raw(&m, 0, 1, &s, q, out2));
        ck_assert_msg(fabsf(out2[0] - out[0]) > 0.1f,
                      "step %d: the appended token did not change the "
                      "output (%g -> %g)",
                      step, (double)out[0], (double)out2[0]);
    }
    free(q);
    free(out);
    free(out2);
    tst_model_free(&m);
}
END_TEST

Suite *suite_always(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "always"));
    TCase *tc = tst_tcase(s, "always");
    tcase_add_loop_test(tc, aa_sink_window_partial, 0, 6);
    tcase_add_loop_test(tc, aa_newest_token, 0, 2);
    return s;
}
