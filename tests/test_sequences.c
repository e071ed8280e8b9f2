/*
 * sequences: open / close / length, ids never reused, stale ids rejected,
 * reopened sequences start clean, max_sequences enforced.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void small_options(fkv_options *o, int max_seqs)
{
    tst_options(o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o->max_sequences = max_seqs;
    o->max_tokens_per_sequence = 4096;
}

START_TEST(seq_open_close_length)
{
    fkv_options o;
    tst_model m;
    int a, b, n[2] = {37, 300};
    int64_t len = -1;
    int slots[2];
    small_options(&o, 4);
    tst_model_init(&m, &o, 5000);
    a = tst_open(&m);
    b = tst_open(&m);
    ck_assert_msg(m.seq[a].id != m.seq[b].id, "two open sequences, one id");
    tst_ok(fkv_seq_length(m.c, m.seq[a].id, &len));
    ck_assert_int_eq(len, 0);
    slots[0] = a;
    slots[1] = b;
    tst_prefill(&m, 2, slots, n);
    tst_ok(fkv_seq_length(m.c, m.seq[a].id, &len));
    ck_assert_int_eq(len, 37);
    tst_ok(fkv_seq_length(m.c, m.seq[b].id, &len));
    ck_assert_int_eq(len, 300);
    tst_append_rand(&m, 0, 1, &a, NULL);
    tst_append_rand(&m, 1, 1, &a, NULL);
    tst_ok(fkv_seq_length(m.c, m.seq[a].id, &len));
    ck_assert_int_eq(len, 38);
    tst_close(&m, a);
    tst_ok(fkv_seq_length(m.c, m.seq[b].id, &len));
    ck_assert_int_eq(len, 300);
    tst_close(&m, b);
    tst_model_free(&m);
}
END_TEST

/* Length is the smallest per-layer count. */
START_TEST(seq_length_min_over_layers)
{
    fkv_options o;
    tst_model m;
    int s, n = 50, n2 = 20;
    int64_t len = -1;
    small_options(&o, 4);
    tst_model_init(&m, &o, 5100);
    s = tst_open(&m);
    tst_append_rand(&m, 0, 1, &s, &n);
    tst_ok(fkv_seq_length(m.c, m.seq[s].id, &len));
    ck_assert_int_eq(len, 0);
    tst_append_rand(&m, 1, 1, &s, &n2);
    tst_ok(fkv_seq_length(m.c, m.seq[s].id, &len));
    ck_assert_int_eq(len, 20);
    tst_append_rand(&m, 1, 1, &s, &n);
    tst_ok(fkv_seq_length(m.c, m.seq[s].id, &len));
    ck_assert_int_eq(len, 50);
    tst_model_free(&m);
}
END_TEST

START_TEST(seq_ids_not_reused)
{
    fkv_options o;
    fkv_cache *c = NULL;
    fkv_seq_id ids[64];
    int n = 0, i, j, r;
    small_options(&o, 3);
    tst_ok(fkv_create(&o, &c));
    for (r = 0; r < 20; ++r) {
        fkv_seq_id a, b;
        tst_ok(fkv_seq_open(c, &a));
        tst_ok(fkv_seq_open(c, &b));
        ids[n++] = a;
        ids[n++] = b;
        tst_ok(fkv_seq_close(c, a));
        tst_ok(fkv_seq_close(c, b));
    }
    for (i = 0; i < n; ++i)
        for (j = i + 1; j < n; ++j)
            ck_assert_msg(ids[i] != ids[j], "id %lld reused",
                          (long long)ids[i]);
    fkv_destroy(c);
}
END_TEST

START_TEST(seq_closed_id_unknown)
{
    fkv_options o;
    tst_model m;
    int a, b, n = 100;
    int64_t len = 7;
    small_options(&o, 4);
    tst_model_init(&m, &o, 5200);
    a = tst_open(&m);
    tst_prefill(&m, 1, &a, &n);
    tst_close(&m, a);
    tst_expect_error(m.c, fkv_seq_length(m.c, m.seq[a].id, &len),
                     FKV_ERR_UNKNOWN_SEQUENCE, "length of a closed sequence");
    tst_expect_error(m.c, fkv_seq_close(m.c, m.seq[a].id),
                     FKV_ERR_UNKNOWN_SEQUENCE, "closing twice");
    /* Reopening gives a new id; the old one stays unknown. */
    b = tst_open(&m);
    ck_assert(m.seq[b].id != m.seq[a].id);
    tst_expect_error(m.c, fkv_seq_length(m.c, m.seq[a].id, &len),
                     FKV_ERR_UNKNOWN_SEQUENCE,
                     "length of a closed sequence after a reopen");
    {
        float kv[2 * 64];
        memset(kv, 0, sizeof kv);
        tst_expect_error(m.c, tst_append(&m, 0, 1, &a, NULL, kv, kv),
                         FKV_ERR_UNKNOWN_SEQUENCE,
                         "append to a closed sequence");
    }
    tst_ok(fkv_seq_length(m.c, m.seq[b].id, &len));
    ck_assert_int_eq(len, 0);
    tst_model_free(&m);
}
END_TEST

/* Close and reopen several times while other sequences live: the new
 * sequences hold only their own tokens and every result is right. */
START_TEST(seq_reopen_results)
{
    fkv_options o;
    tst_model m;
    int keep, cur, r, l;
    int n_keep = 800;
    float *q;
    small_options(&o, 3);
    o.policy = _i ? FKV_POLICY_SYNC : FKV_POLICY_FREEKV;
    tst_model_init(&m, &o, 5300 + (uint64_t)_i);
    keep = tst_open(&m);
    tst_prefill(&m, 1, &keep, &n_keep);
    q = (float *)calloc((size_t)2 * m.QH * m.D, sizeof(float));
    for (r = 0; r < 5; ++r) {
        int n = 300 + 211 * r, pair[2];
        cur = tst_open(&m);
        tst_prefill(&m, 1, &cur, &n);
        pair[0] = cur;
        pair[1] = keep;
        for (l = 0; l < m.L; ++l) {
            tst_append_rand(&m, l, 2, pair, NULL);
            tst_good_query(&m, l, 2, pair, q);
            tst_attend_check(&m, l, 2, pair, q, TST_TOL_F32);
            tst_select(&m, l, 2, pair, q);
            tst_recall(&m, l, 2, pair);
        }
        tst_close(&m, cur);
    }
    free(q);
    tst_model_free(&m);
}
END_TEST

START_TEST(seq_max_sequences)
{
    fkv_options o;
    fkv_cache *c = NULL;
    fkv_seq_id ids[4], extra = -5, again;
    int i;
    int64_t len;
    small_options(&o, 4);
    tst_ok(fkv_create(&o, &c));
    for (i = 0; i < 4; ++i)
        tst_ok(fkv_seq_open(c, &ids[i]));
    tst_expect_error(c, fkv_seq_open(c, &extra), FKV_ERR_CAPACITY,
                     "opening one sequence more than max_sequences");
    for (i = 0; i < 4; ++i)
        tst_ok(fkv_seq_length(c, ids[i], &len));
    tst_ok(fkv_seq_close(c, ids[2]));
    tst_ok(fkv_seq_open(c, &again));
    for (i = 0; i < 4; ++i)
        ck_assert(again != ids[i]);
    tst_expect_error(c, fkv_seq_open(c, &extra), FKV_ERR_CAPACITY,
                     "max_sequences after a reopen");
    tst_expect_error(c, fkv_seq_open(c, NULL), FKV_ERR_INVALID_ARGUMENT,
                     "fkv_seq_open(NULL)");
    fkv_destroy(c);
}
END_TEST

/* Appending to one sequence does not change another's results. */
START_TEST(seq_independent)
{
    fkv_options o;
    tst_model m;
    int a, b, n[2] = {600, 640}, slots[2];
    float *q, *o1, *o2;
    small_options(&o, 4);
    o.policy = FKV_POLICY_SYNC;
    tst_model_init(&m, &o, 5400);
    a = tst_open(&m);
    b = tst_open(&m);
    slots[0] = a;
    slots[1] = b;
    tst_prefill(&m, 2, slots, n);
    q = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    o1 = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    o2 = (float *)calloc((size_t)m.QH * m.D, sizeof(float));
    tst_good_query(&m, 0, 1, &a, q);
    tst_ok(tst_attend_raw(&m, 0, 1, &a, q, o1));
    {
        int more = 333;
        tst_append_rand(&m, 0, 1, &b, &more);
        tst_append_rand(&m, 1, 1, &b, &more);
    }
    tst_ok(tst_attend_raw(&m, 0, 1, &a, q, o2));
    ck_assert_msg(memcmp(o1, o2, sizeof(float) * m.QH * m.D) == 0,
                  "a sequence's output changed when another grew");
    free(q);
    free(o1);
    free(o2);
    tst_model_free(&m);
}
END_TEST

Suite *suite_sequences(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "sequences"));
    TCase *tc = tst_tcase(s, "sequences");
    tcase_add_test(tc, seq_open_close_length);
    tcase_add_test(tc, seq_length_min_over_layers);
    tcase_add_test(tc, seq_ids_not_reused);
    tcase_add_test(tc, seq_closed_id_unknown);
    tcase_add_loop_test(tc, seq_reopen_results, 0, 2);
    tcase_add_test(tc, seq_max_sequences);
    tcase_add_test(tc, seq_independent);
    return s;
}
