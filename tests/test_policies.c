/*
 * policies x GQA: every policy with group sizes 1, 4, 5 and 7, head_dim 64,
 * 128 and 256, several layers, batches of sequences of different lengths
 * (per-sequence token counts, K/V packed sequence after sequence), decode
 * steps appending 1 or more tokens per sequence. Every result is checked
 * against the reference (and the policy simulation) per sequence.
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

static const struct {
    int layers, qh, kvh, d;
} k_configs[4] = {
    {3, 2, 2, 64},   /* G 1 */
    {2, 8, 2, 128},  /* G 4 */
    {2, 10, 2, 256}, /* G 5 */
    {3, 14, 2, 64},  /* G 7 */
};

/* One decode step per layer: append ntok (NULL: 1 each), draw the next
 * query, attend and compare, select, recall. q/prev: [L][nseq][QH][D]. */
static void pol_step(tst_model *m, int nseq, const int *slots,
                     const int *ntok, float *q, float *prev, int first,
                     int append)
{
    size_t pl = (size_t)nseq * m->QH * m->D;
    int l;
    for (l = 0; l < m->L; ++l) {
        if (append)
            tst_append_rand(m, l, nseq, slots, ntok);
        tst_next_query(m, l, nseq, slots, first ? NULL : prev + l * pl,
                       q + l * pl);
        tst_attend_check(m, l, nseq, slots, q + l * pl, tst_tol(m->dt));
        tst_select(m, l, nseq, slots, q + l * pl);
        tst_recall(m, l, nseq, slots);
        memcpy(prev + l * pl, q + l * pl, sizeof(float) * pl);
    }
}

/* _i: policy = _i % 4, config = _i / 4. */
START_TEST(pol_gqa_varlen)
{
    fkv_options o;
    tst_model m;
    int cfg = _i / 4, slots[3], t;
    int prefill[3] = {700, 333, 1201};
    static const int multi[3] = {1, 3, 2};
    float *q, *prev;
    size_t pl;
    tst_options(&o, k_configs[cfg].layers, k_configs[cfg].qh,
                k_configs[cfg].kvh, k_configs[cfg].d, FKV_DTYPE_F32);
    o.policy = k_policies[_i % 4];
    o.group_score = (cfg & 1) ? FKV_GROUP_MEAN_SCORE : FKV_GROUP_MEAN_SOFTMAX;
    tst_model_init(&m, &o, 3000 + (uint64_t)_i);
    for (t = 0; t < 3; ++t)
        slots[t] = tst_open(&m);
    tst_prefill(&m, 3, slots, prefill);
    pl = (size_t)3 * m.QH * m.D;
    q = (float *)calloc(pl * m.L, sizeof(float));
    prev = (float *)calloc(pl * m.L, sizeof(float));
    /* First step attends right after the prefill. */
    pol_step(&m, 3, slots, NULL, q, prev, 1, 0);
    for (t = 0; t < 5; ++t)
        pol_step(&m, 3, slots, (t % 2) ? multi : NULL, q, prev, 0, 1);
    free(q);
    free(prev);
    tst_model_free(&m);
}
END_TEST

/* Batches naming a subset of the sequences, in another order than they
 * were opened; sequences advance at different rates. */
START_TEST(pol_batch_subsets)
{
    fkv_options o;
    tst_model m;
    int all[3], sub1[2], sub2[1], prefill[3] = {500, 900, 1300}, t, l;
    float *q, *prev_a, *prev_b;
    size_t qs;
    tst_options(&o, 2, 8, 2, 64, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    tst_model_init(&m, &o, 3100 + (uint64_t)_i);
    for (t = 0; t < 3; ++t)
        all[t] = tst_open(&m);
    tst_prefill(&m, 3, all, prefill);
    sub1[0] = all[2];
    sub1[1] = all[0];
    sub2[0] = all[1];
    qs = (size_t)m.QH * m.D;
    q = (float *)calloc(2 * qs, sizeof(float));
    prev_a = (float *)calloc(2 * qs * m.L, sizeof(float));
    prev_b = (float *)calloc(qs * m.L, sizeof(float));
    for (t = 0; t < 4; ++t) {
        for (l = 0; l < m.L; ++l) {
            tst_append_rand(&m, l, 2, sub1, NULL);
            tst_next_query(&m, l, 2, sub1, t ? prev_a + l * 2 * qs : NULL, q);
            tst_attend_check(&m, l, 2, sub1, q, TST_TOL_F32);
            tst_select(&m, l, 2, sub1, q);
            tst_recall(&m, l, 2, sub1);
            memcpy(prev_a + l * 2 * qs, q, sizeof(float) * 2 * qs);
        }
        if (t % 2)
            continue;
        for (l = 0; l < m.L; ++l) {
            tst_append_rand(&m, l, 1, sub2, NULL);
            tst_next_query(&m, l, 1, sub2, t ? prev_b + l * qs : NULL, q);
            tst_attend_check(&m, l, 1, sub2, q, TST_TOL_F32);
            tst_select(&m, l, 1, sub2, q);
            tst_recall(&m, l, 1, sub2);
            memcpy(prev_b + l * qs, q, sizeof(float) * qs);
        }
    }
    {
        int64_t len;
        tst_ok(fkv_seq_length(m.c, m.seq[all[0]].id, &len));
        ck_assert_int_eq(len, 504);
        tst_ok(fkv_seq_length(m.c, m.seq[all[1]].id, &len));
        ck_assert_int_eq(len, 902);
        tst_ok(fkv_seq_length(m.c, m.seq[all[2]].id, &len));
        ck_assert_int_eq(len, 1304);
    }
    free(q);
    free(prev_a);
    free(prev_b);
    tst_model_free(&m);
}
END_TEST

/* A batched prefill that mixes a sequence within the budget, one just
 * beyond it and a long one; then a multi-token append to all. */
START_TEST(pol_mixed_regimes)
{
    fkv_options o;
    tst_model m;
    int slots[4], t;
    int prefill[4] = {100, 260, 1700, 16};
    int more[4] = {17, 5, 31, 1};
    float *q, *prev;
    size_t pl;
    tst_options(&o, 2, 4, 1, 128, FKV_DTYPE_F32);
    o.policy = k_policies[_i];
    tst_model_init(&m, &o, 3200 + (uint64_t)_i);
    for (t = 0; t < 4; ++t)
        slots[t] = tst_open(&m);
    tst_prefill(&m, 4, slots, prefill);
    pl = (size_t)4 * m.QH * m.D;
    q = (float *)calloc(pl * m.L, sizeof(float));
    prev = (float *)calloc(pl * m.L, sizeof(float));
    pol_step(&m, 4, slots, NULL, q, prev, 1, 0);
    pol_step(&m, 4, slots, more, q, prev, 0, 1);
    pol_step(&m, 4, slots, NULL, q, prev, 0, 1);
    free(q);
    free(prev);
    tst_model_free(&m);
}
END_TEST

Suite *suite_policies(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "policies"));
    TCase *tc = tst_tcase(s, "policies");
    tcase_add_loop_test(tc, pol_gqa_varlen, 0, 16);
    tcase_add_loop_test(tc, pol_batch_subsets, 0, 4);
    tcase_add_loop_test(tc, pol_mixed_regimes, 0, 4);
    return s;
}
