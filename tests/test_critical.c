/*
 * critical: fkv_stats.pages_recalled_critical counts the recalls inside
 * fkv_attend (corrections, SYNC) apart from fkv_recall's speculative ones;
 * fkv_get_selected_pages sizes its list with capacity 0.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <stdlib.h>
#include <string.h>

/* FREEKV: the first attend after prefill corrects every head (all its
 * recalls are critical); fkv_recall's are not; the simulation's recall
 * count matches the total. */
START_TEST(critical_freekv)
{
    fkv_options o;
    tst_model m;
    fkv_stats a, b;
    int s, n = 600, l;
    float q[4 * 64], q2[4 * 64];
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 17000);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    tst_ok(fkv_reset_stats(m.c));
    m.sim_recalled = 0;
    for (l = 0; l < m.L; ++l) {
        tst_good_query(&m, l, 1, &s, q);
        tst_attend_check(&m, l, 1, &s, q, TST_TOL_F32);
    }
    tst_stats(&m, &a);
    ck_assert_uint_gt(a.pages_recalled, 0);
    ck_assert_uint_eq(a.pages_recalled_critical, a.pages_recalled);
    for (l = 0; l < m.L; ++l) {
        tst_good_query(&m, l, 1, &s, q2); /* unrelated: new pages */
        tst_select(&m, l, 1, &s, q2);
        tst_recall(&m, l, 1, &s);
    }
    tst_stats(&m, &b);
    ck_assert_uint_gt(b.pages_recalled, a.pages_recalled);
    ck_assert_uint_eq(b.pages_recalled_critical, a.pages_recalled_critical);
    ck_assert_uint_eq(b.pages_recalled, m.sim_recalled);
    tst_ok(fkv_reset_stats(m.c));
    tst_stats(&m, &b);
    ck_assert_uint_eq(b.pages_recalled_critical, 0);
    tst_model_free(&m);
}
END_TEST

/* SYNC recalls only inside fkv_attend; RESIDENT never. */
START_TEST(critical_sync_resident)
{
    fkv_options o;
    tst_model m;
    fkv_stats st;
    int s, n = 600, l, t;
    float q[4 * 64];
    fkv_policy pol = _i ? FKV_POLICY_RESIDENT : FKV_POLICY_SYNC;
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    o.policy = pol;
    tst_model_init(&m, &o, 17100 + _i);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    for (t = 0; t < 3; ++t)
        for (l = 0; l < m.L; ++l) {
            tst_good_query(&m, l, 1, &s, q);
            tst_attend_check(&m, l, 1, &s, q, TST_TOL_F32);
        }
    tst_stats(&m, &st);
    ck_assert_uint_eq(st.pages_recalled_critical, st.pages_recalled);
    if (pol == FKV_POLICY_SYNC)
        ck_assert_uint_gt(st.pages_recalled, 0);
    else
        ck_assert_uint_eq(st.pages_recalled, 0);
    tst_model_free(&m);
}
END_TEST

/* capacity 0, pages NULL: *count is the number of pages (K here). */
START_TEST(selected_pages_sizing)
{
    fkv_options o;
    tst_model m;
    int s, n = 600;
    int32_t count = -1;
    float q[4 * 64];
    tst_options(&o, 2, 4, 2, 64, FKV_DTYPE_F32);
    tst_model_init(&m, &o, 17200);
    s = tst_open(&m);
    tst_prefill(&m, 1, &s, &n);
    tst_good_query(&m, 0, 1, &s, q);
    tst_attend_check(&m, 0, 1, &s, q, TST_TOL_F32);
    tst_ok(fkv_get_selected_pages(m.c, 0, m.seq[s].id, 1, NULL, 0, &count));
    ck_assert_int_eq(count, m.lay.K);
    ck_assert_int_eq(count, (o.budget_tokens - o.sink_tokens -
                             o.window_tokens) / o.page_tokens);
    tst_model_free(&m);
}
END_TEST

Suite *suite_critical(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "critical"));
    TCase *tc = tst_tcase(s, "critical");
    tcase_add_test(tc, selected_pages_sizing);
    tcase_add_test(tc, critical_freekv);
    tcase_add_loop_test(tc, critical_sync_resident, 0, 2);
    return s;
}
