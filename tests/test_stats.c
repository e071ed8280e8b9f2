/*
 * stats: steps count layer-0 attends; recall volume grows under FREEKV and
 * SYNC (and only by the pages not already resident: incremental recall),
 * stays 0 under RESIDENT and DENSE; memory figures; reset.
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

static void st_model(tst_model *m, fkv_policy pol, int *slots, uint64_t seed)
{
    fkv_options o;
    int n[2] = {1000, 700};
    tst_options(&o, 3, 8, 2, 64, FKV_DTYPE_F32);
    o.policy = pol;
    tst_model_init(m, &o, seed);
    slots[0] = tst_open(m);
    slots[1] = tst_open(m);
    tst_prefill(m, 2, slots, n);
}

START_TEST(st_steps_count_layer0_attends)
{
    tst_model m;
    int slots[2], t, l;
    float *q;
    fkv_stats st;
    st_model(&m, k_policies[_i], slots, 8000 + (uint64_t)_i);
    q = (float *)calloc((size_t)2 * m.QH * m.D, sizeof(float));
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.steps, 0);
    for (t = 0; t < 5; ++t)
        for (l = 0; l < m.L; ++l) {
            if (t)
                tst_append_rand(&m, l, 2, slots, NULL);
            tst_rand_query(&m, 2, q);
            tst_ok(tst_attend_raw(&m, l, 2, slots, q, q));
            tst_select(&m, l, 2, slots, q);
            tst_recall(&m, l, 2, slots);
        }
    /* Extra attends on layer 1 and a batch of one on layer 0. */
    tst_ok(tst_attend_raw(&m, 1, 2, slots, q, q));
    tst_ok(tst_attend_raw(&m, 0, 1, slots, q, q));
    tst_stats(&m, &st);
    ck_assert_msg(st.steps == 6, "steps %llu, want 6 (layer-0 attend calls)",
                  (unsigned long long)st.steps);
    free(q);
    tst_model_free(&m);
}
END_TEST

START_TEST(st_recall_by_policy)
{
    tst_model m;
    int slots[2], t, l;
    float *q;
    fkv_stats st;
    fkv_policy pol = k_policies[_i];
    st_model(&m, pol, slots, 8100 + (uint64_t)_i);
    q = (float *)calloc((size_t)2 * m.QH * m.D, sizeof(float));
    for (t = 0; t < 3; ++t)
        for (l = 0; l < m.L; ++l) {
            if (t)
                tst_append_rand(&m, l, 2, slots, NULL);
            tst_rand_query(&m, 2, q);
            tst_ok(tst_attend_raw(&m, l, 2, slots, q, q));
            tst_rand_query(&m, 2, q);
            tst_select(&m, l, 2, slots, q);
            tst_recall(&m, l, 2, slots);
        }
    tst_stats(&m, &st);
    if (pol == FKV_POLICY_FREEKV || pol == FKV_POLICY_SYNC) {
        ck_assert_msg(st.pages_recalled > 0, "no pages recalled");
        ck_assert_msg(st.bytes_recalled ==
                          st.pages_recalled * 2u * (uint64_t)m.lay.P * m.D *
                              sizeof(float),
                      "bytes_recalled %llu for %llu (page, head) units of "
                      "2*P*D floats",
                      (unsigned long long)st.bytes_recalled,
                      (unsigned long long)st.pages_recalled);
    } else {
        ck_assert_msg(st.pages_recalled == 0 && st.bytes_recalled == 0,
                      "policy %d: %llu pages / %llu bytes recalled, want 0",
                      (int)pol, (unsigned long long)st.pages_recalled,
                      (unsigned long long)st.bytes_recalled);
    }
    free(q);
    tst_model_free(&m);
}
END_TEST

/* Recall moves only the pages not already resident (docs/design.md 4):
 * the first FREEKV attend recalls K pages per head; selecting the same
 * pages again moves nothing; a new selection moves its new pages. */
START_TEST(st_incremental_recall_freekv)
{
    tst_model m;
    int slots[2], l;
    size_t pl;
    float *q0, *qa;
    fkv_stats st;
    uint64_t units = 0;
    st_model(&m, FKV_POLICY_FREEKV, slots, 8200);
    pl = (size_t)2 * m.QH * m.D;
    q0 = (float *)calloc(pl * m.L, sizeof(float));
    qa = (float *)calloc(pl * m.L, sizeof(float));
    for (l = 0; l < m.L; ++l) {
        tst_good_query(&m, l, 2, slots, q0 + l * pl);
        tst_attend_check(&m, l, 2, slots, q0 + l * pl, TST_TOL_F32);
    }
    tst_stats(&m, &st);
    units = (uint64_t)2 * m.L * m.KVH * m.lay.K;
    ck_assert_msg(st.pages_recalled == units,
                  "first step: %llu units recalled, want %llu (K per head)",
                  (unsigned long long)st.pages_recalled,
                  (unsigned long long)units);
    ck_assert_msg(st.pages_recalled == m.sim_recalled, "simulation disagrees");
    /* Re-select with the query that made the active selection: the pages
     * are resident, nothing moves. */
    tst_ok(fkv_reset_stats(m.c));
    for (l = 0; l < m.L; ++l) {
        tst_select(&m, l, 2, slots, q0 + l * pl);
        tst_recall(&m, l, 2, slots);
    }
    tst_stats(&m, &st);
    ck_assert_msg(st.pages_recalled == 0,
                  "re-selecting the resident pages moved %llu units",
                  (unsigned long long)st.pages_recalled);
    /* New queries: exactly the pages not in the old selection. */
    m.sim_recalled = 0;
    for (l = 0; l < m.L; ++l) {
        tst_good_query(&m, l, 2, slots, qa + l * pl);
        tst_select(&m, l, 2, slots, qa + l * pl);
        tst_recall(&m, l, 2, slots);
    }
    tst_stats(&m, &st);
    ck_assert_msg(m.sim_recalled > 0, "test not discriminating");
    ck_assert_msg(st.pages_recalled == m.sim_recalled,
                  "incremental recall moved %llu units, the new pages are "
                  "%llu",
                  (unsigned long long)st.pages_recalled,
                  (unsigned long long)m.sim_recalled);
    free(q0);
    free(qa);
    tst_model_free(&m);
}
END_TEST

/* SYNC recalls at attend, also incrementally. */
START_TEST(st_incremental_recall_sync)
{
    tst_model m;
    int slots[2], l;
    size_t pl;
    float *q0, *qa;
    fkv_stats st;
    st_model(&m, FKV_POLICY_SYNC, slots, 8300);
    pl = (size_t)2 * m.QH * m.D;
    q0 = (float *)calloc(pl * m.L, sizeof(float));
    qa = (float *)calloc(pl * m.L, sizeof(float));
    for (l = 0; l < m.L; ++l) {
        tst_good_query(&m, l, 2, slots, q0 + l * pl);
        tst_attend_check(&m, l, 2, slots, q0 + l * pl, TST_TOL_F32);
    }
    tst_stats(&m, &st);
    ck_assert_msg(st.pages_recalled == (uint64_t)2 * m.L * m.KVH * m.lay.K,
                  "first SYNC step: %llu units, want %d",
                  (unsigned long long)st.pages_recalled,
                  2 * m.L * m.KVH * m.lay.K);
    tst_ok(fkv_reset_stats(m.c));
    m.sim_recalled = 0;
    /* One more token (no page seals) and the same queries: nothing. */
    for (l = 0; l < m.L; ++l) {
        tst_append_rand(&m, l, 2, slots, NULL);
        tst_attend_check(&m, l, 2, slots, q0 + l * pl, TST_TOL_F32);
    }
    tst_stats(&m, &st);
    ck_assert_msg(st.pages_recalled == 0,
                  "same query, same pages: %llu units moved",
                  (unsigned long long)st.pages_recalled);
    /* New queries: the new pages only. */
    for (l = 0; l < m.L; ++l) {
        tst_append_rand(&m, l, 2, slots, NULL);
        tst_good_query(&m, l, 2, slots, qa + l * pl);
        tst_attend_check(&m, l, 2, slots, qa + l * pl, TST_TOL_F32);
    }
    tst_stats(&m, &st);
    ck_assert_msg(st.pages_recalled == m.sim_recalled && m.sim_recalled > 0,
                  "SYNC moved %llu units, the new pages are %llu",
                  (unsigned long long)st.pages_recalled,
                  (unsigned long long)m.sim_recalled);
    free(q0);
    free(qa);
    tst_model_free(&m);
}
END_TEST

START_TEST(st_memory_figures)
{
    fkv_options o;
    tst_model m;
    fkv_stats st0, st1;
    int s, n = 500;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 8400);
    tst_stats(&m, &st0);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    tst_stats(&m, &st1);
    ck_assert_msg(st1.host_bytes > 0, "host_bytes 0 after an append");
    ck_assert_msg(st1.host_bytes >= st0.host_bytes, "host_bytes shrank");
    /* At least the K and V of the sealed pages are held. */
    ck_assert_msg(st1.host_bytes >= (uint64_t)2 * 2 * (n / 16 * 16) * 2 * 64 *
                                        sizeof(float),
                  "host_bytes %llu below the K/V appended",
                  (unsigned long long)st1.host_bytes);
    if (g_test_backend == FKV_BACKEND_CPU)
        ck_assert_msg(st1.device_bytes == 0, "device_bytes %llu on the CPU",
                      (unsigned long long)st1.device_bytes);
    else
        ck_assert_msg(st1.device_bytes > 0, "device_bytes 0 on CUDA");
    tst_model_free(&m);
}
END_TEST

START_TEST(st_reset)
{
    tst_model m;
    int slots[2], t, l;
    float *q;
    fkv_stats st;
    st_model(&m, FKV_POLICY_FREEKV, slots, 8500);
    q = (float *)calloc((size_t)2 * m.QH * m.D, sizeof(float));
    for (t = 0; t < 3; ++t)
        for (l = 0; l < m.L; ++l) {
            if (t)
                tst_append_rand(&m, l, 2, slots, NULL);
            tst_rand_query(&m, 2, q);
            tst_ok(tst_attend_raw(&m, l, 2, slots, q, q));
            tst_select(&m, l, 2, slots, q);
            tst_recall(&m, l, 2, slots);
        }
    tst_stats(&m, &st);
    ck_assert(st.steps == 3 && st.pages_recalled > 0 && st.bytes_recalled > 0
              && st.corrections > 0 && st.heads_checked > 0);
    tst_ok(fkv_reset_stats(m.c));
    tst_stats(&m, &st);
    ck_assert_msg(st.steps == 0 && st.pages_recalled == 0 &&
                      st.bytes_recalled == 0 && st.corrections == 0 &&
                      st.heads_checked == 0,
                  "counters after reset: %llu %llu %llu %llu %llu",
                  (unsigned long long)st.steps,
                  (unsigned long long)st.pages_recalled,
                  (unsigned long long)st.bytes_recalled,
                  (unsigned long long)st.corrections,
                  (unsigned long long)st.heads_checked);
    ck_assert_msg(st.host_bytes > 0, "reset zeroed host_bytes");
    /* Counting resumes. */
    tst_ok(tst_attend_raw(&m, 0, 2, slots, q, q));
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.steps, 1);
    free(q);
    tst_model_free(&m);
}
END_TEST

Suite *suite_stats(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "stats"));
    TCase *tc = tst_tcase(s, "stats");
    tcase_add_loop_test(tc, st_steps_count_layer0_attends, 0, 4);
    tcase_add_loop_test(tc, st_recall_by_policy, 0, 4);
    tcase_add_test(tc, st_incremental_recall_freekv);
    tcase_add_test(tc, st_incremental_recall_sync);
    tcase_add_test(tc, st_memory_figures);
    tcase_add_test(tc, st_reset);
    return s;
}
