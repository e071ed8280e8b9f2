/*
 * dense: wherever the context fits the budget (and beyond, while the
 * candidates number at most K), and always under FKV_POLICY_DENSE,
 * attention equals dense attention over every token.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const fkv_policy k_policies[4] = {
    FKV_POLICY_FREEKV, FKV_POLICY_SYNC, FKV_POLICY_RESIDENT, FKV_POLICY_DENSE};
static const char *const k_policy_names[4] = {"FREEKV", "SYNC", "RESIDENT",
                                              "DENSE"};

/* fkv_attend against dense reference attention for every sequence; checks
 * that no selected pages are reported where the context fits the budget. */
static void dense_check(tst_model *m, int layer, int nseq, const int *slots,
                        const float *q)
{
    size_t qs = (size_t)m->QH * m->D;
    float *out = (float *)calloc((size_t)nseq * qs, sizeof(float));
    double *ref = (double *)calloc(qs, sizeof(double));
    int i, g;
    fkv_status st = tst_attend_raw(m, layer, nseq, slots, q, out);
    ck_assert_msg(st == FKV_OK, "fkv_attend returned %d (%s)", (int)st,
                  fkv_status_string(st));
    for (i = 0; i < nseq; ++i) {
        char what[160];
        int64_t n = m->seq[slots[i]].len[layer];
        tst_ref_output(m, layer, slots[i], q + i * qs, NULL, NULL, ref);
        snprintf(what, sizeof what,
                 "%s dense, layer %d, batch entry %d, n %lld",
                 k_policy_names[m->o.policy], layer, i, (long long)n);
        tst_assert_close(m, out + i * qs, ref, tst_tol(m->dt), what);
        if (m->o.policy == FKV_POLICY_DENSE)
            for (g = 0; g < m->KVH; ++g) {
                int pages[4];
                int c = tst_selected(m, layer, slots[i], g, pages, 4);
                ck_assert_msg(c == 0,
                              "%s: %d selected pages reported (kv head %d)",
                              what, c, g);
            }
    }
    free(out);
    free(ref);
}

/* Steps: append one token, attend, select, recall, on every layer. */
static void dense_steps(tst_model *m, int nseq, const int *slots, int steps)
{
    size_t qn = (size_t)nseq * m->QH * m->D;
    float *q = (float *)calloc(qn, sizeof(float));
    int t, l;
    for (t = 0; t < steps; ++t)
        for (l = 0; l < m->L; ++l) {
            tst_append_rand(m, l, nseq, slots, NULL);
            tst_rand_query(m, nseq, q);
            dense_check(m, l, nseq, slots, q);
            tst_select(m, l, nseq, slots, q);
            tst_recall(m, l, nseq, slots);
        }
    free(q);
}

/* Contexts grow from below the budget to 15 tokens past it: sealed pages
 * reach S + W + K but never exceed it, so every step is dense. */
START_TEST(dense_context_within_budget)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {200, 57};
    tst_options(&o, 2, 8, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    tst_model_init(&m, &o, 100 + (uint64_t)_i);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    {
        size_t qn = (size_t)2 * m.QH * m.D;
        float *q = (float *)calloc(qn, sizeof(float));
        int l;
        for (l = 0; l < m.L; ++l) {
            tst_rand_query(&m, 2, q);
            dense_check(&m, l, 2, slots, q);
            tst_select(&m, l, 2, slots, q);
            tst_recall(&m, l, 2, slots);
        }
        free(q);
    }
    /* 200 -> 271: S + W + K = 16 pages = 256 tokens sealed at most. */
    dense_steps(&m, 2, slots, 71);
    ck_assert(m.seq[slots[0]].len[0] == 271);
    tst_model_free(&m);
}
END_TEST

START_TEST(dense_context_equals_budget)
{
    fkv_options o;
    tst_model m;
    int s, n = 256;
    float *q;
    tst_options(&o, 1, 4, 2, 128, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    tst_model_init(&m, &o, 200 + (uint64_t)_i);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    q = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    tst_rand_query(&m, 1, q);
    dense_check(&m, 0, 1, &s, q);
    free(q);
    tst_model_free(&m);
}
END_TEST

START_TEST(dense_policy_long_context)
{
    fkv_options o;
    tst_model m;
    int slots[2], ntok[2] = {2000, 1111};
    tst_options(&o, 2, 8, 2, 64, FKV_DTYPE_F32);
    o.policy = FKV_POLICY_DENSE;
    o.group_score = _i ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(&m, &o, 300);
    slots[0] = tst_open(&m);
    slots[1] = tst_open(&m);
    tst_prefill(&m, 2, slots, ntok);
    dense_steps(&m, 2, slots, 3);
    tst_model_free(&m);
}
END_TEST

START_TEST(dense_tiny_contexts)
{
    static const int lens[] = {1, 5, 15, 16, 17, 31, 32, 33, 95, 96, 97};
    fkv_options o;
    tst_model m;
    size_t i;
    float *q;
    tst_options(&o, 1, 4, 1, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    o.max_sequences = 16;
    tst_model_init(&m, &o, 400 + (uint64_t)_i);
    q = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    for (i = 0; i < sizeof lens / sizeof lens[0]; ++i) {
        int s = tst_open(&m);
        tst_prefill(&m, 1, &s, &lens[i]);
        tst_rand_query(&m, 1, q);
        dense_check(&m, 0, 1, &s, q);
    }
    free(q);
    tst_model_free(&m);
}
END_TEST

/* A larger case: budget 4096, context 4000 with page 32. */
START_TEST(dense_large_budget)
{
    fkv_options o;
    tst_model m;
    int s, n = 3990;
    tst_options(&o, 1, 8, 2, 128, FKV_DTYPE_F32);
    tst_geometry(&o, 32, 64, 128, 4096);
    o.policy = _i ? FKV_POLICY_SYNC : FKV_POLICY_FREEKV;
    tst_model_init(&m, &o, 500 + (uint64_t)_i);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    dense_steps(&m, 1, &s, 3);
    tst_model_free(&m);
}
END_TEST

/* Prefill in several appends (chunked prefill) still gives dense results. */
START_TEST(dense_chunked_prefill)
{
    fkv_options o;
    tst_model m;
    int s, l, c;
    static const int chunks[] = {7, 16, 33, 1, 64, 50};
    float *q;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    tst_model_init(&m, &o, 600 + (uint64_t)_i);
    s = tst_open(&m);
    for (c = 0; c < (int)(sizeof chunks / sizeof chunks[0]); ++c)
        for (l = 0; l < m.L; ++l)
            tst_append_rand(&m, l, 1, &s, &chunks[c]);
    q = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    for (l = 0; l < m.L; ++l) {
        tst_rand_query(&m, 1, q);
        dense_check(&m, l, 1, &s, q);
    }
    free(q);
    tst_model_free(&m);
}
END_TEST

/* include/freekv.h: "While the candidate pages number at most the budget's
 * K, they are all selected and all listed", and DENSE lists none. */
START_TEST(dense_report_all_within_budget)
{
    fkv_options o;
    tst_model m;
    int s, n = 200, g, pages[16];
    float *q;
    tst_options(&o, 1, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    tst_model_init(&m, &o, 700 + (uint64_t)_i);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n); /* 12 sealed pages: candidates [2, 8) */
    q = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    tst_rand_query(&m, 1, q);
    dense_check(&m, 0, 1, &s, q);
    for (g = 0; g < m.KVH; ++g) {
        int c = tst_selected(&m, 0, s, g, pages, 16);
        int j, want = o.policy == FKV_POLICY_DENSE ? 0 : 6;
        ck_assert_msg(c == want,
                      "%s, n %d <= budget %d: fkv_get_selected_pages "
                      "reports %d pages, not %d",
                      k_policy_names[_i], n, o.budget_tokens, c, want);
        for (j = 0; j < c; ++j)
            ck_assert_msg(pages[j] == 2 + j, "%s: page %d is %d, not %d",
                          k_policy_names[_i], j, pages[j], 2 + j);
    }
    free(q);
    tst_model_free(&m);
}
END_TEST

Suite *suite_dense(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "dense"));
    TCase *tc = tst_tcase(s, "dense");
    tcase_add_loop_test(tc, dense_context_within_budget, 0, 4);
    tcase_add_loop_test(tc, dense_context_equals_budget, 0, 4);
    tcase_add_loop_test(tc, dense_policy_long_context, 0, 2);
    tcase_add_loop_test(tc, dense_tiny_contexts, 0, 4);
    tcase_add_loop_test(tc, dense_large_budget, 0, 2);
    tcase_add_loop_test(tc, dense_chunked_prefill, 0, 4);
    tcase_add_loop_test(tc, dense_report_all_within_budget, 0, 4);
#ifdef FKV_WITH_CUDA
    /* Host arithmetic only: once, in the CPU run (no device needed). */
    if (!prefix[0])
        tst_add_attend_grid(s);
#endif
    return s;
}
