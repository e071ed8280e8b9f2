/*
 * selection: with the context beyond the budget, SYNC and RESIDENT (and
 * FREEKV's first step) attend to sink + window + partial page + the
 * reference's top-K pages of the current query, and report exactly those
 * pages. Queries are redrawn until the top-K is well separated.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Asserts that the selected pages of every KV head are the reference top-K
 * of q (independently of the policy simulation). */
static void check_topk_of(tst_model *m, int layer, int nseq, const int *slots,
                          const float *q)
{
    size_t qs = (size_t)m->QH * m->D;
    int want[64], got[64];
    int i, g, j;
    for (i = 0; i < nseq; ++i)
        for (g = 0; g < m->KVH; ++g) {
            int nw = tst_ref_select(m, layer, slots[i], q + i * qs, g, want,
                                    NULL);
            int ng = tst_selected(m, layer, slots[i], g, got, 64);
            ck_assert_msg(ng == nw, "kv head %d: %d pages, reference %d", g,
                          ng, nw);
            for (j = 0; j < nw; ++j)
                ck_assert_msg(got[j] == want[j],
                              "kv head %d: page #%d is %d, reference %d", g,
                              j, got[j], want[j]);
        }
}

/* On every layer: append (1 token each, or 1..max_step drawn per
 * sequence), draw a well separated query, attend and compare, check the
 * reported pages against the reference top-K (SYNC and RESIDENT select
 * with the current query), select, recall. */
static void sel_steps(tst_model *m, int nseq, const int *slots, int steps,
                      int max_step)
{
    size_t qn = (size_t)nseq * m->QH * m->D;
    float *q = (float *)calloc(qn, sizeof(float));
    int ntok[TST_MAX_SEQS];
    int t, l, i;
    ck_assert(nseq <= TST_MAX_SEQS);
    for (t = 0; t < steps; ++t)
        for (l = 0; l < m->L; ++l) {
            for (i = 0; i < nseq; ++i)
                ntok[i] = max_step > 1
                              ? 1 + (int)(ref_rng_u64(&m->rng) % max_step)
                              : 1;
            tst_append_rand(m, l, nseq, slots, ntok);
            tst_good_query(m, l, nseq, slots, q);
            tst_attend_check(m, l, nseq, slots, q, tst_tol(m->dt));
            check_topk_of(m, l, nseq, slots, q);
            tst_select(m, l, nseq, slots, q);
            tst_recall(m, l, nseq, slots);
        }
    free(q);
}

/* _i: bit 0 policy (SYNC, RESIDENT), bit 1 group score. */
START_TEST(sel_current_query)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {1500, 1037};
    tst_options(&o, 2, 8, 2, 64, FKV_DTYPE_F32);
    o.policy = (_i & 1) ? FKV_POLICY_RESIDENT : FKV_POLICY_SYNC;
    o.group_score = (_i & 2) ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(&m, &o, 1000 + (uint64_t)_i);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    sel_steps(&m, 2, slots, 3, 1);
    tst_model_free(&m);
}
END_TEST

/* Page 32, context about 6K; SYNC and RESIDENT. */
START_TEST(sel_long_context)
{
    fkv_options o;
    tst_model m;
    int s, n = 6000;
    tst_options(&o, 1, 4, 2, 128, FKV_DTYPE_F32);
    tst_geometry(&o, 32, 64, 128, 512);
    o.policy = _i ? FKV_POLICY_RESIDENT : FKV_POLICY_SYNC;
    tst_model_init(&m, &o, 1100 + (uint64_t)_i);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    sel_steps(&m, 1, &s, 2, 1);
    tst_model_free(&m);
}
END_TEST

/* FREEKV's first attend after a prefill selects with its own query. */
START_TEST(sel_freekv_first_step)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {900, 1333};
    size_t qn;
    float *q;
    int l;
    tst_options(&o, 2, 8, 2, 64, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_FREEKV;
    o.group_score = _i ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(&m, &o, 1200 + (uint64_t)_i);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    qn = (size_t)2 * m.QH * m.D;
    q = (float *)calloc(qn, sizeof(float));
    for (l = 0; l < m.L; ++l) {
        tst_good_query(&m, l, 2, slots, q);
        tst_attend_check(&m, l, 2, slots, q, TST_TOL_F32);
        check_topk_of(&m, l, 2, slots, q);
    }
    free(q);
    tst_model_free(&m);
}
END_TEST

START_TEST(sel_report_capacity)
{
    fkv_options o;
    tst_model m;
    int s, n = 1000, g;
    int32_t buf[8], cnt;
    float *q;
    int all[16];
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_SYNC;
    tst_model_init(&m, &o, 1300);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    q = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    tst_good_query(&m, 0, 1, &s, q);
    tst_attend_check(&m, 0, 1, &s, q, TST_TOL_F32);
    for (g = 0; g < m.KVH; ++g) {
        int full = tst_selected(&m, 0, s, g, all, 16);
        int i;
        ck_assert_int_eq(full, m.lay.K);
        for (i = 0; i < 8; ++i)
            buf[i] = -77;
        cnt = -1;
        tst_ok(fkv_get_selected_pages(m.c, 0, m.seq[s].id, g, buf, 3, &cnt));
        ck_assert_int_eq(cnt, m.lay.K);
        for (i = 0; i < 3; ++i)
            ck_assert_int_eq(buf[i], all[i]);
        for (i = 3; i < 8; ++i)
            ck_assert_msg(buf[i] == -77, "entry %d written past capacity", i);
        cnt = -1;
        buf[0] = -77;
        tst_ok(fkv_get_selected_pages(m.c, 0, m.seq[s].id, g, buf, 0, &cnt));
        ck_assert_int_eq(cnt, m.lay.K);
        ck_assert_msg(buf[0] == -77, "entry written with capacity 0");
        /* ascending, distinct, candidates */
        for (i = 0; i < full; ++i) {
            ck_assert(all[i] >= m.lay.S);
            ck_assert(all[i] < n / m.lay.P - m.lay.W);
            if (i)
                ck_assert(all[i] > all[i - 1]);
        }
    }
    free(q);
    tst_model_free(&m);
}
END_TEST

/* Before any attend the report is empty. */
START_TEST(sel_report_before_attend)
{
    fkv_options o;
    tst_model m;
    int s, n = 1000, g, pages[4];
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 1350);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    for (g = 0; g < m.KVH; ++g) {
        ck_assert_int_eq(tst_selected(&m, 0, s, g, pages, 4), 0);
        ck_assert_int_eq(tst_selected(&m, 1, s, g, pages, 4), 0);
    }
    tst_model_free(&m);
}
END_TEST

/* Ties go to the lower page index: all candidate pages but two are copies
 * of one page (equal scores); the two planted pages score higher. With
 * K = 4 the selection is the planted pages plus the two lowest copies. */
START_TEST(sel_ties_lower_index)
{
    fkv_options o;
    tst_model m;
    const int P = 16, D = 64, KVH = 2, QH = 4, G = 2;
    const int n = 20 * 16 + 5; /* sealed 20, candidates [2, 16) */
    size_t row = (size_t)KVH * D;
    float *k, *v, *q;
    int s, t, i, g, h;
    static const int want[4] = {2, 3, 9, 14};
    int layer_pol = _i >> 1;
    tst_options(&o, 1, QH, KVH, D, FKV_DTYPE_F32);
    tst_geometry(&o, P, 32, 64, 160); /* S 2, W 4, K 4 */
    o.group_score = (_i & 1) ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    o.policy = layer_pol == 0   ? FKV_POLICY_SYNC
               : layer_pol == 1 ? FKV_POLICY_RESIDENT
                                : FKV_POLICY_FREEKV;
    tst_model_init(&m, &o, 1400 + (uint64_t)_i);
    s = tst_open(&m);
    k = (float *)calloc((size_t)n * row, sizeof(float));
    v = (float *)calloc((size_t)n * row, sizeof(float));
    q = (float *)calloc((size_t)QH * D, sizeof(float));
    ref_random_tensor(&m.rng, REF_F32, k, (size_t)n * row, 1.0);
    ref_random_tensor(&m.rng, REF_F32, v, (size_t)n * row, 1.0);
    /* One query per group, shared by its heads. */
    for (g = 0; g < KVH; ++g) {
        ref_random_tensor(&m.rng, REF_F32, q + (size_t)g * G * D, (size_t)D,
                          1.0);
        for (h = 1; h < G; ++h)
            memcpy(q + ((size_t)g * G + h) * D, q + (size_t)g * G * D,
                   sizeof(float) * D);
    }
    /* Candidates 2..15 copy page 2; pages 9 and 14 shifted along q. */
    for (i = 3; i < 16; ++i)
        memcpy(k + (size_t)i * P * row, k + (size_t)2 * P * row,
               sizeof(float) * P * row);
    for (t = 0; t < P; ++t)
        for (g = 0; g < KVH; ++g)
            for (i = 0; i < D; ++i) {
                float qi = q[(size_t)g * G * D + i];
                k[((size_t)(9 * P + t) * KVH + g) * D + i] += 0.5f * qi;
                k[((size_t)(14 * P + t) * KVH + g) * D + i] += 0.25f * qi;
            }
    tst_ok(tst_append(&m, 0, 1, &s, &n, k, v));
    tst_attend_check(&m, 0, 1, &s, q, TST_TOL_F32);
    for (g = 0; g < KVH; ++g) {
        int got[8];
        int c = tst_selected(&m, 0, s, g, got, 8);
        ck_assert_int_eq(c, 4);
        for (i = 0; i < 4; ++i)
            ck_assert_msg(got[i] == want[i],
                          "kv head %d: page #%d = %d, want %d (ties to the "
                          "lower index)",
                          g, i, got[i], want[i]);
    }
    free(k);
    free(v);
    free(q);
    tst_model_free(&m);
}
END_TEST

/* A page whose keys align with the query is found wherever it is. */
START_TEST(sel_planted_needle)
{
    static const int positions[] = {2, 17, 40, 60, 113}; /* candidate pages */
    const int P = 16, D = 64, KVH = 2, QH = 8, G = 4;
    const int n = 2000; /* sealed 125, candidates [2, 121) */
    fkv_options o;
    tst_model m;
    size_t row = (size_t)KVH * D;
    float *k, *v, *q;
    size_t pi;
    int g, h, t, i;
    tst_options(&o, 1, QH, KVH, D, FKV_DTYPE_F32);
    o.policy = _i == 0 ? FKV_POLICY_SYNC
               : _i == 1 ? FKV_POLICY_RESIDENT
                         : FKV_POLICY_FREEKV;
    o.max_sequences = 8;
    tst_model_init(&m, &o, 1500 + (uint64_t)_i);
    k = (float *)calloc((size_t)n * row, sizeof(float));
    v = (float *)calloc((size_t)n * row, sizeof(float));
    q = (float *)calloc((size_t)QH * D, sizeof(float));
    for (pi = 0; pi < sizeof positions / sizeof positions[0]; ++pi) {
        int s = tst_open(&m);
        int needle = positions[pi];
        int tries;
        for (tries = 0; tries < 100; ++tries) {
            double gap = INFINITY;
            int pages[16];
            ref_random_tensor(&m.rng, REF_F32, k, (size_t)n * row, 1.0);
            ref_random_tensor(&m.rng, REF_F32, v, (size_t)n * row, 1.0);
            ref_random_tensor(&m.rng, REF_F32, q, (size_t)QH * D, 1.0);
            /* The needle's keys: the mean of its group's queries, scaled. */
            for (g = 0; g < KVH; ++g)
                for (t = 0; t < P; ++t)
                    for (i = 0; i < D; ++i) {
                        double mq = 0.0;
                        for (h = 0; h < G; ++h)
                            mq += q[((size_t)g * G + h) * D + i];
                        k[((size_t)(needle * P + t) * KVH + g) * D + i] =
                            (float)(12.0 * mq / G);
                    }
            for (g = 0; g < KVH; ++g) {
                double gg;
                ref_select(&m.lay, k, n, KVH, D, g, q + (size_t)g * G * D, G,
                           m.scale, REF_GROUP_MEAN_SOFTMAX, pages, &gg);
                if (gg < gap)
                    gap = gg;
            }
            if (gap >= TST_MIN_GAP)
                break;
        }
        ck_assert_msg(tries < 100, "no well separated draw");
        tst_ok(tst_append(&m, 0, 1, &s, &n, k, v));
        tst_attend_check(&m, 0, 1, &s, q, TST_TOL_F32);
        for (g = 0; g < KVH; ++g) {
            int got[16], c, found = 0;
            c = tst_selected(&m, 0, s, g, got, 16);
            for (i = 0; i < c && i < 16; ++i)
                found |= got[i] == needle;
            ck_assert_msg(found, "kv head %d: needle page %d not selected", g,
                          needle);
        }
        tst_close(&m, s);
    }
    free(k);
    free(v);
    free(q);
    tst_model_free(&m);
}
END_TEST

/* budget == sink + window: K = 0, nothing is selected; attention covers
 * the sink, the window and the partial page only. */
START_TEST(sel_no_selection_budget)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {700, 333}, t, l, g, pages[4];
    float *q;
    tst_options(&o, 2, 8, 2, 64, FKV_DTYPE_F32);
    tst_geometry(&o, 16, 32, 64, 96);
    o.policy = _i == 0 ? FKV_POLICY_FREEKV
               : _i == 1 ? FKV_POLICY_SYNC
                         : FKV_POLICY_RESIDENT;
    tst_model_init(&m, &o, 1600 + (uint64_t)_i);
    ck_assert_int_eq(m.lay.K, 0);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    q = (float *)calloc((size_t)2 * m.QH * m.D, sizeof(float));
    for (t = 0; t < 3; ++t)
        for (l = 0; l < m.L; ++l) {
            if (t)
                tst_append_rand(&m, l, 2, slots, NULL);
            tst_rand_query(&m, 2, q);
            tst_attend_check(&m, l, 2, slots, q, TST_TOL_F32);
            for (g = 0; g < m.KVH; ++g)
                ck_assert_int_eq(tst_selected(&m, l, slots[0], g, pages, 4),
                                 0);
            tst_select(&m, l, 2, slots, q);
            tst_recall(&m, l, 2, slots);
        }
    free(q);
    tst_model_free(&m);
}
END_TEST

/* Sequences whose candidate pages fill one, two and many scoring chunks
 * (the CUDA backend scores 64 pages or more per block, then selects from
 * all of a head's chunks), in one batch, appending 1-40 tokens a
 * step so that counts cross chunk edges; every step's selection is the
 * reference top-K of the current query. _i: policy (SYNC, RESIDENT, the
 * group score MEAN_SCORE with RESIDENT). */
START_TEST(sel_chunk_edges)
{
    fkv_options o;
    tst_model m;
    /* Page 16, sink 2 and window 4 pages: about 64, 65, 128 and 560
     * candidate pages at the start. */
    int slots[4], ntok[4] = {1118, 1135, 2150, 9061};
    int i;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = _i == 0 ? FKV_POLICY_SYNC : FKV_POLICY_RESIDENT;
    o.group_score = _i == 2 ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(&m, &o, 1700 + (uint64_t)_i);
    for (i = 0; i < 4; ++i)
        slots[i] = tst_open(&m);
    tst_prefill(&m, 4, slots, ntok);
    sel_steps(&m, 4, slots, 6, 40);
    tst_model_free(&m);
}
END_TEST

Suite *suite_selection(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "selection"));
    TCase *tc = tst_tcase(s, "selection");
    tcase_add_loop_test(tc, sel_current_query, 0, 4);
    tcase_add_loop_test(tc, sel_long_context, 0, 2);
    tcase_add_loop_test(tc, sel_freekv_first_step, 0, 2);
    tcase_add_test(tc, sel_report_capacity);
    tcase_add_test(tc, sel_report_before_attend);
    tcase_add_loop_test(tc, sel_ties_lower_index, 0, 6);
    tcase_add_loop_test(tc, sel_planted_needle, 0, 3);
    tcase_add_loop_test(tc, sel_no_selection_budget, 0, 3);
    tcase_add_loop_test(tc, sel_chunk_edges, 0, 3);
    return s;
}
