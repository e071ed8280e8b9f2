/*
 * Self-checks of the test reference (reference.c), so that a wrong
 * reference cannot pass the library's suites by agreeing with a wrong
 * library.
 *
 * SPDX-License-Identifier: MIT
 */
#include "tests.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

START_TEST(ref_f16_conversion)
{
    static const struct {
        double x;
        uint16_t h;
    } cases[] = {
        {0.0, 0x0000},
        {1.0, 0x3c00},
        {-2.0, 0xc000},
        {65504.0, 0x7bff},
        {65519.0, 0x7bff},            /* below the halfway point */
        {65520.0, 0x7c00},            /* halfway to 2^16: ties to even: inf */
        {1e10, 0x7c00},
        {5.9604644775390625e-08, 0x0001}, /* 2^-24, smallest subnormal */
        {2.98023223876953125e-08, 0x0000}, /* 2^-25: tie to even (0) */
        {8.94069671630859375e-08, 0x0002}, /* 3*2^-25: tie to even (2) */
        {6.103515625e-05, 0x0400},   /* 2^-14, smallest normal */
        {1.00048828125, 0x3c00},     /* 1 + 2^-11: tie, to even */
        {1.00146484375, 0x3c02},     /* 1 + 3*2^-11: tie, to even */
        {1.0009765625, 0x3c01},      /* 1 + 2^-10: exact */
        {0.333251953125, 0x3555},
        {-0.0, 0x8000},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        uint16_t h = ref_to_f16(cases[i].x);
        ck_assert_msg(h == cases[i].h, "f16(%.17g) = 0x%04x, want 0x%04x",
                      cases[i].x, h, cases[i].h);
    }
    ck_assert(ref_from_f16(0x3c00) == 1.0);
    ck_assert(ref_from_f16(0x0001) == ldexp(1.0, -24));
    ck_assert(ref_from_f16(0x7bff) == 65504.0);
    ck_assert(isinf(ref_from_f16(0x7c00)));
    ck_assert(isnan(ref_from_f16(0x7e00)));
    /* Every finite half round-trips. */
    for (i = 0; i < 0x10000; ++i) {
        uint16_t h = (uint16_t)i;
        if ((h & 0x7c00) == 0x7c00)
            continue;
        ck_assert_msg(ref_to_f16(ref_from_f16(h)) == h ||
                          (h == 0x8000 && ref_to_f16(-0.0) == 0x8000),
                      "f16 0x%04x does not round-trip", h);
    }
}
END_TEST

START_TEST(ref_bf16_conversion)
{
    static const struct {
        double x;
        uint16_t h;
    } cases[] = {
        {0.0, 0x0000},
        {1.0, 0x3f80},
        {-2.0, 0xc000},
        {1.00390625, 0x3f80},  /* 1 + 2^-8: tie, to even */
        {1.01171875, 0x3f82},  /* 1 + 3*2^-8: tie, to even */
        {1.0078125, 0x3f81},   /* exact */
        {1.005, 0x3f81},       /* above half */
        {3.3895313892515355e38, 0x7f7f},
        {1e39, 0x7f80},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        uint16_t h = ref_to_bf16(cases[i].x);
        ck_assert_msg(h == cases[i].h, "bf16(%.17g) = 0x%04x, want 0x%04x",
                      cases[i].x, h, cases[i].h);
    }
    ck_assert(ref_from_bf16(0x3f80) == 1.0);
    ck_assert(ref_from_bf16(0xc000) == -2.0);
    for (i = 0; i < 0x10000; ++i) {
        uint16_t h = (uint16_t)i;
        if ((h & 0x7f80) == 0x7f80)
            continue;
        ck_assert_msg(ref_to_bf16(ref_from_bf16(h)) == h,
                      "bf16 0x%04x does not round-trip", h);
    }
}
END_TEST

START_TEST(ref_rng_deterministic)
{
    ref_rng a, b;
    double s = 0.0, s2 = 0.0;
    int i;
    ref_rng_seed(&a, 42);
    ref_rng_seed(&b, 42);
    for (i = 0; i < 1000; ++i)
        ck_assert(ref_rng_u64(&a) == ref_rng_u64(&b));
    ref_rng_seed(&a, 7);
    for (i = 0; i < 20000; ++i) {
        double x = ref_rng_normal(&a);
        s += x;
        s2 += x * x;
    }
    ck_assert_msg(fabs(s / 20000) < 0.05, "mean %g", s / 20000);
    ck_assert_msg(fabs(s2 / 20000 - 1.0) < 0.05, "variance %g", s2 / 20000);
}
END_TEST

START_TEST(ref_topk_ties_lower_index)
{
    double a[] = {1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.5};
    int idx[7];
    int c = ref_topk(a, 7, 4, idx);
    ck_assert_int_eq(c, 4);
    /* 3.0 at 1 and 3, then 2.0 at 2 and 4 (lower than 5). */
    ck_assert_int_eq(idx[0], 1);
    ck_assert_int_eq(idx[1], 2);
    ck_assert_int_eq(idx[2], 3);
    ck_assert_int_eq(idx[3], 4);
    ck_assert(ref_topk_gap(a, 7, 4, REF_GROUP_MEAN_SOFTMAX) == 0.0);
    ck_assert(ref_topk_gap(a, 7, 2, REF_GROUP_MEAN_SOFTMAX) > 0.3);
    c = ref_topk(a, 3, 5, idx);
    ck_assert_int_eq(c, 3);
    ck_assert(isinf(ref_topk_gap(a, 3, 5, REF_GROUP_MEAN_SCORE)));
}
END_TEST

START_TEST(ref_layout_sets)
{
    /* P 4, S 2, W 3, K 2 */
    ref_layout L = {4, 2, 3, 2};
    unsigned char mask[64];
    int first, end, sel[2] = {3, 5};
    int64_t t;
    /* n = 41: sealed 10, partial page 10 (1 token). Candidates [2, 7). */
    ck_assert_int_eq(ref_candidates(&L, 41, &first, &end), 5);
    ck_assert_int_eq(first, 2);
    ck_assert_int_eq(end, 7);
    ref_attended_mask(&L, 41, sel, 2, mask);
    for (t = 0; t < 41; ++t) {
        int64_t p = t / 4;
        int want = p < 2 || p == 3 || p == 5 || (p >= 7 && p < 10) || p == 10;
        ck_assert_msg(mask[t] == want, "token %lld: mask %d want %d",
                      (long long)t, mask[t], want);
    }
    /* Short contexts: sealed 3 <= S + W: no candidates. */
    ck_assert_int_eq(ref_candidates(&L, 13, &first, &end), 0);
    ref_attended_mask(&L, 13, NULL, 0, mask);
    for (t = 0; t < 13; ++t)
        ck_assert(mask[t] == 1);
    /* Only a partial page. */
    ref_attended_mask(&L, 3, NULL, 0, mask);
    for (t = 0; t < 3; ++t)
        ck_assert(mask[t] == 1);
    /* n = 24: sealed 6, window [3, 6), candidates [2, 3). */
    ck_assert_int_eq(ref_candidates(&L, 24, &first, &end), 1);
    ref_attended_mask(&L, 24, NULL, 0, mask);
    for (t = 0; t < 24; ++t)
        ck_assert(mask[t] == (t / 4 != 2));
}
END_TEST

START_TEST(ref_scores_and_aggregation)
{
    /* One page of 2 tokens, D 3, one KV head. */
    float k[] = {1.0f, -2.0f, 0.5f, -1.0f, 3.0f, 0.25f};
    float q[] = {2.0f, -1.0f, 0.0f};
    double mx[3], mn[3], s, scores[4], agg[2];
    ref_page_minmax(k, 1, 3, 0, 2, 0, mx, mn);
    ck_assert(mx[0] == 1.0 && mn[0] == -1.0);
    ck_assert(mx[1] == 3.0 && mn[1] == -2.0);
    ck_assert(mx[2] == 0.5 && mn[2] == 0.25);
    s = ref_page_score(q, mx, mn, 3);
    /* max(2,-2) + max(-3, 2) + 0 = 4 */
    ck_assert(s == 4.0);
    /* Two heads, two pages. */
    scores[0] = 1.0; scores[1] = 0.0; /* head 0 */
    scores[2] = 0.0; scores[3] = 2.0; /* head 1 */
    ref_group_aggregate(scores, 2, 2, 1.0, REF_GROUP_MEAN_SCORE, agg);
    ck_assert(agg[0] == 0.5 && agg[1] == 1.0);
    ref_group_aggregate(scores, 2, 2, 1.0, REF_GROUP_MEAN_SOFTMAX, agg);
    {
        double e1 = exp(1.0), e2 = exp(2.0);
        double a0 = 0.5 * (e1 / (e1 + 1.0) + 1.0 / (1.0 + e2));
        ck_assert(fabs(agg[0] - a0) < 1e-15);
        ck_assert(fabs(agg[0] + agg[1] - 1.0) < 1e-15);
    }
}
END_TEST

START_TEST(ref_attention_basic)
{
    /* Two tokens, D 2: equal scores average the values; mask picks one. */
    float k[] = {1.0f, 0.0f, 1.0f, 0.0f};
    float v[] = {2.0f, 4.0f, 6.0f, 8.0f};
    float q[] = {0.0f, 5.0f};
    unsigned char mask[2] = {0, 1};
    double out[2];
    ref_attention(k, v, 2, 1, 2, 0, q, 1.0, NULL, out);
    ck_assert(fabs(out[0] - 4.0) < 1e-15 && fabs(out[1] - 6.0) < 1e-15);
    ref_attention(k, v, 2, 1, 2, 0, q, 1.0, mask, out);
    ck_assert(out[0] == 6.0 && out[1] == 8.0);
    /* Weights follow exp(scale * q.k). */
    {
        float k2[] = {1.0f, 0.0f, 0.0f, 1.0f};
        float q2[] = {1.0f, 0.0f};
        double w0 = exp(0.5), w1 = 1.0;
        ref_attention(k2, v, 2, 1, 2, 0, q2, 0.5, NULL, out);
        ck_assert(fabs(out[0] - (2.0 * w0 + 6.0 * w1) / (w0 + w1)) < 1e-14);
    }
}
END_TEST

Suite *suite_reference(const char *prefix)
{
    Suite *s = suite_create(tst_suite_name(prefix, "reference"));
    TCase *tc = tst_tcase(s, "reference");
    tcase_add_test(tc, ref_f16_conversion);
    tcase_add_test(tc, ref_bf16_conversion);
    tcase_add_test(tc, ref_rng_deterministic);
    tcase_add_test(tc, ref_topk_ties_lower_index);
    tcase_add_test(tc, ref_layout_sets);
    tcase_add_test(tc, ref_scores_and_aggregation);
    tcase_add_test(tc, ref_attention_basic);
    return s;
}
